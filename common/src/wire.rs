//! Reads and writes the frames described in [`crate::protocol`].

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

use crate::protocol::{DATA_CHUNK_LEN, FRAME_DATA, FRAME_MESSAGE, MAX_FRAME_LEN};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed by peer")]
    Closed,
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN}")]
    Oversized(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// One frame as read off the wire.
#[derive(Debug)]
pub enum Frame {
    Message(Vec<u8>),
    Data(Vec<u8>),
}

/// A framed, bidirectional connection. Buffered both ways: a data frame is three small
/// writes plus a large one, and messages are flushed as soon as they are written.
pub struct FramedStream<S> {
    inner: BufStream<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner: BufStream::with_capacity(DATA_CHUNK_LEN * 2, DATA_CHUNK_LEN * 2, inner),
        }
    }

    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), WireError> {
        let payload =
            serde_json::to_vec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
        self.write_frame(FRAME_MESSAGE, &payload).await
    }

    pub async fn send_data(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        for chunk in bytes.chunks(DATA_CHUNK_LEN) {
            self.write_frame(FRAME_DATA, chunk).await?;
        }
        Ok(())
    }

    /// Receives the next frame, which must be a message of type `T`.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, WireError> {
        match self.recv_frame().await? {
            Frame::Message(bytes) => decode(&bytes),
            Frame::Data(_) => Err(WireError::Malformed(
                "expected a message, got a data frame".into(),
            )),
        }
    }

    pub async fn recv_frame(&mut self) -> Result<Frame, WireError> {
        let len = match self.inner.read_u32().await {
            Ok(len) => len as usize,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(WireError::Closed)
            }
            Err(e) => return Err(e.into()),
        };
        if len == 0 {
            return Err(WireError::Malformed("empty frame".into()));
        }
        if len > MAX_FRAME_LEN {
            return Err(WireError::Oversized(len));
        }
        let mut buf = vec![0; len];
        self.inner.read_exact(&mut buf).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                WireError::Closed
            } else {
                e.into()
            }
        })?;
        let payload = buf.split_off(1);
        match buf[0] {
            FRAME_MESSAGE => Ok(Frame::Message(payload)),
            FRAME_DATA => Ok(Frame::Data(payload)),
            kind => Err(WireError::Malformed(format!("unknown frame kind {kind}"))),
        }
    }

    async fn write_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), WireError> {
        let len = payload.len() + 1;
        if len > MAX_FRAME_LEN {
            return Err(WireError::Oversized(len));
        }
        self.inner.write_u32(len as u32).await?;
        self.inner.write_u8(kind).await?;
        self.inner.write_all(payload).await?;
        // Data frames are always followed by a message, which flushes them.
        if kind == FRAME_MESSAGE {
            self.inner.flush().await?;
        }
        Ok(())
    }
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Counts and hashes the bytes of a stream as they go by, on either end.
#[derive(Default)]
pub struct StreamDigest {
    hasher: Sha256,
    bytes: u64,
}

impl StreamDigest {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Byte count and hex SHA-256 of everything seen.
    pub fn finish(self) -> (u64, String) {
        (self.bytes, hex::encode(self.hasher.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ClientMessage;

    #[tokio::test]
    async fn message_and_data_roundtrip() {
        let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        a.send(&ClientMessage::Abort).await.unwrap();
        a.send_data(&vec![7u8; DATA_CHUNK_LEN + 10]).await.unwrap();
        a.send(&ClientMessage::Finish).await.unwrap();
        assert_eq!(
            b.recv::<ClientMessage>().await.unwrap(),
            ClientMessage::Abort
        );
        let mut total = 0;
        for _ in 0..2 {
            match b.recv_frame().await.unwrap() {
                Frame::Data(d) => total += d.len(),
                Frame::Message(_) => panic!("expected data"),
            }
        }
        assert_eq!(total, DATA_CHUNK_LEN + 10);
        assert_eq!(
            b.recv::<ClientMessage>().await.unwrap(),
            ClientMessage::Finish
        );
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_reading_it() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = FramedStream::new(b);
        a.write_u32(u32::MAX).await.unwrap();
        assert!(matches!(b.recv_frame().await, Err(WireError::Oversized(_))));
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = FramedStream::new(b);
        a.write_all(&[0, 0, 0, 4, FRAME_MESSAGE, b'x', b'y', b'z'])
            .await
            .unwrap();
        assert!(matches!(
            b.recv::<ClientMessage>().await,
            Err(WireError::Malformed(_))
        ));
        let (mut a, b) = tokio::io::duplex(64);
        let mut b = FramedStream::new(b);
        a.write_all(&[0, 0, 0, 1, 9]).await.unwrap();
        assert!(matches!(b.recv_frame().await, Err(WireError::Malformed(_))));
    }

    #[tokio::test]
    async fn eof_is_closed() {
        let (a, b) = tokio::io::duplex(64);
        drop(a);
        let mut b = FramedStream::new(b);
        assert!(matches!(b.recv_frame().await, Err(WireError::Closed)));
    }

    #[test]
    fn digest_of_known_input() {
        let mut d = StreamDigest::default();
        d.update(b"ab");
        d.update(b"c");
        let (bytes, sha) = d.finish();
        assert_eq!(bytes, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
