//! Moving a byte stream (an image or a checkpoint archive) over a framed connection with an
//! integrity check: data frames, then `EndOfStream` carrying the size and SHA-256.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{ClientMessage, DATA_CHUNK_LEN};
use crate::session::wire::{decode, Frame, FramedStream, StreamDigest, WireError};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("integrity check failed: received {got_bytes} bytes with SHA-256 {got_sha}, sender announced {want_bytes} bytes with {want_sha}")]
    Corrupt {
        got_bytes: u64,
        got_sha: String,
        want_bytes: u64,
        want_sha: String,
    },
    #[error("stream larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("expected data or end of stream, got {0}")]
    Unexpected(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Sends everything `reader` yields as data frames followed by `EndOfStream`.
/// `progress` is called with the running byte count after each chunk.
pub async fn send_stream<S, R>(
    stream: &mut FramedStream<S>,
    mut reader: R,
    mut progress: impl FnMut(u64),
) -> Result<u64, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let mut digest = StreamDigest::default();
    let mut buf = vec![0u8; DATA_CHUNK_LEN];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        stream.send_data(&buf[..n]).await?;
        digest.update(&buf[..n]);
        progress(digest.bytes());
    }
    let (bytes, sha256) = digest.finish();
    stream
        .send(&ClientMessage::EndOfStream { bytes, sha256 })
        .await?;
    Ok(bytes)
}

pub async fn send_file<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FramedStream<S>,
    path: &Path,
    progress: impl FnMut(u64),
) -> Result<u64, TransferError> {
    let file = tokio::fs::File::open(path).await?;
    send_stream(stream, file, progress).await
}

/// Receives data frames into `writer` until `EndOfStream`, verifying size and SHA-256.
/// Refuses streams larger than `limit` bytes.
pub async fn receive_stream<S, W>(
    stream: &mut FramedStream<S>,
    writer: &mut W,
    limit: u64,
) -> Result<u64, TransferError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut digest = StreamDigest::default();
    loop {
        match stream.recv_frame().await? {
            Frame::Data(chunk) => {
                if digest.bytes() + chunk.len() as u64 > limit {
                    return Err(TransferError::TooLarge(limit));
                }
                writer.write_all(&chunk).await?;
                digest.update(&chunk);
            }
            Frame::Message(bytes) => match decode::<ClientMessage>(&bytes)? {
                ClientMessage::EndOfStream { bytes, sha256 } => {
                    writer.flush().await?;
                    let (got_bytes, got_sha) = digest.finish();
                    if got_bytes != bytes || got_sha != sha256 {
                        return Err(TransferError::Corrupt {
                            got_bytes,
                            got_sha,
                            want_bytes: bytes,
                            want_sha: sha256,
                        });
                    }
                    return Ok(got_bytes);
                }
                other => return Err(TransferError::Unexpected(format!("{other:?}"))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stream_arrives_intact() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let sender =
            tokio::spawn(async move { send_stream(&mut a, sent.as_slice(), |_| {}).await });
        let mut out = Vec::new();
        let n = receive_stream(&mut b, &mut out, u64::MAX).await.unwrap();
        assert_eq!(sender.await.unwrap().unwrap(), n);
        assert_eq!(out, data);
    }

    #[tokio::test]
    async fn tampered_stream_is_rejected() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        a.send_data(b"hello").await.unwrap();
        a.send(&ClientMessage::EndOfStream {
            bytes: 5,
            sha256: "00".repeat(32),
        })
        .await
        .unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            receive_stream(&mut b, &mut out, u64::MAX).await,
            Err(TransferError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn oversized_stream_is_refused() {
        let (a, b) = tokio::io::duplex(1024 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        a.send_data(&[0u8; 100]).await.unwrap();
        a.send(&ClientMessage::Finish).await.unwrap();
        let mut out = Vec::new();
        assert!(matches!(
            receive_stream(&mut b, &mut out, 50).await,
            Err(TransferError::TooLarge(50))
        ));
    }
}
