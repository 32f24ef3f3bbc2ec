//! Reads and writes the frames described in [`crate::protocol`], in the clear during the
//! handshake and sealed by the session's Noise transport after it
//! ([`FramedStream::encrypt`]).

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};

use crate::protocol::{DATA_CHUNK_LEN, FRAME_DATA, FRAME_MESSAGE, MAX_FRAME_LEN};

/// How long sent data may stay unacknowledged, or a silent connection unanswered, before
/// the kernel gives up on it: a cut network fails a migration's reads and writes within
/// this, not after TCP's 15 minutes of retransmissions.
pub const DEAD_PEER_SECONDS: u32 = 10;

/// Sets up a request-response connection (the agents', CRIU's page server's): no Nagle
/// delay for the small requests (held behind the peer's delayed ACK, up to 200 ms each),
/// and [`detect_dead_peer`].
pub fn tune_connection(tcp: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    nix::sys::socket::setsockopt(tcp, nix::sys::socket::sockopt::TcpNoDelay, &true)?;
    detect_dead_peer(tcp)
}

/// Keepalive probes and a user timeout that fail a TCP connection within
/// [`DEAD_PEER_SECONDS`] of its peer going silent.
pub fn detect_dead_peer(tcp: &impl std::os::fd::AsFd) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(tcp, sockopt::KeepAlive, &true)?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &3)?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &2)?;
    setsockopt(tcp, sockopt::TcpKeepCount, &3)?;
    setsockopt(tcp, sockopt::TcpUserTimeout, &(DEAD_PEER_SECONDS * 1000))?;
    Ok(())
}

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

/// Largest plaintext of one Noise transport message (its limit, less the 16-byte tag).
const RECORD_PLAINTEXT: usize = 65535 - 16;

/// A framed, bidirectional connection. Buffered both ways: a data frame is three small
/// writes plus a large one, and messages are flushed as soon as they are written.
pub struct FramedStream<S> {
    inner: BufStream<S>,
    sealed: Option<Sealed>,
}

/// The byte stream under the frames once encrypted: records of a big-endian `u16` length
/// and one Noise transport message holding up to [`RECORD_PLAINTEXT`] bytes of it.
struct Sealed {
    noise: snow::TransportState,
    /// Frame bytes written and not yet sealed.
    outgoing: Vec<u8>,
    /// The last record opened; `incoming[read_at..read_end]` is not read yet.
    incoming: Vec<u8>,
    read_at: usize,
    read_end: usize,
    record: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FramedStream<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner: BufStream::with_capacity(DATA_CHUNK_LEN * 2, DATA_CHUNK_LEN * 2, inner),
            sealed: None,
        }
    }

    /// From now on every frame is sealed with `noise` (confidential and authenticated), and
    /// every frame read must open with it.
    pub fn encrypt(&mut self, noise: snow::TransportState) {
        self.sealed = Some(Sealed {
            noise,
            outgoing: Vec::with_capacity(DATA_CHUNK_LEN * 2),
            incoming: vec![0; RECORD_PLAINTEXT],
            read_at: 0,
            read_end: 0,
            record: vec![0; 65535],
        });
    }

    /// Sends one data frame and flushes it: for the handshake, which waits for the answer.
    pub async fn send_data_now(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.write_frame(FRAME_DATA, bytes).await?;
        self.flush().await
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
        let mut len = [0u8; 4];
        self.read_exact(&mut len).await?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            return Err(WireError::Malformed("empty frame".into()));
        }
        if len > MAX_FRAME_LEN {
            return Err(WireError::Oversized(len));
        }
        let mut buf = vec![0; len];
        self.read_exact(&mut buf).await?;
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
        let header = (len as u32).to_be_bytes();
        match &mut self.sealed {
            None => {
                self.inner.write_all(&header).await?;
                self.inner.write_u8(kind).await?;
                self.inner.write_all(payload).await?;
            }
            Some(sealed) => {
                sealed.outgoing.extend_from_slice(&header);
                sealed.outgoing.push(kind);
                sealed.outgoing.extend_from_slice(payload);
                sealed.seal(&mut self.inner, false).await?;
            }
        }
        // Data frames are always followed by a message, which flushes them.
        if kind == FRAME_MESSAGE {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), WireError> {
        if let Some(sealed) = &mut self.sealed {
            sealed.seal(&mut self.inner, true).await?;
        }
        Ok(self.inner.flush().await?)
    }

    /// Fills `buf` from the connection, opening records if it is encrypted.
    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), WireError> {
        let Some(sealed) = &mut self.sealed else {
            return self
                .inner
                .read_exact(buf)
                .await
                .map(drop)
                .map_err(closed_on_eof);
        };
        let mut filled = 0;
        while filled < buf.len() {
            if sealed.read_at == sealed.read_end {
                sealed.open_next(&mut self.inner).await?;
            }
            let available = &sealed.incoming[sealed.read_at..sealed.read_end];
            let n = available.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&available[..n]);
            sealed.read_at += n;
            filled += n;
        }
        Ok(())
    }
}

impl Sealed {
    /// Seals and writes the full records of `outgoing`, and with `all` the rest too.
    async fn seal<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut W,
        all: bool,
    ) -> Result<(), WireError> {
        let mut start = 0;
        while self.outgoing.len() - start >= RECORD_PLAINTEXT
            || (all && start < self.outgoing.len())
        {
            let end = (start + RECORD_PLAINTEXT).min(self.outgoing.len());
            let n = self
                .noise
                .write_message(&self.outgoing[start..end], &mut self.record)
                .map_err(|e| WireError::Malformed(format!("sealing a record: {e}")))?;
            out.write_all(&(n as u16).to_be_bytes()).await?;
            out.write_all(&self.record[..n]).await?;
            start = end;
        }
        self.outgoing.drain(..start);
        Ok(())
    }

    /// Reads and opens the next record into `incoming`.
    async fn open_next<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> Result<(), WireError> {
        let mut len = [0u8; 2];
        from.read_exact(&mut len).await.map_err(closed_on_eof)?;
        let len = usize::from(u16::from_be_bytes(len));
        from.read_exact(&mut self.record[..len])
            .await
            .map_err(closed_on_eof)?;
        let n = self
            .noise
            .read_message(&self.record[..len], &mut self.incoming)
            .map_err(|_| WireError::Malformed("a record failed its authentication".into()))?;
        self.read_at = 0;
        self.read_end = n;
        Ok(())
    }
}

fn closed_on_eof(e: std::io::Error) -> WireError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        WireError::Closed
    } else {
        e.into()
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
        a.send(&ClientMessage::Finish).await.unwrap();
        a.send_data(&vec![7u8; DATA_CHUNK_LEN + 10]).await.unwrap();
        a.send(&ClientMessage::Finish).await.unwrap();
        assert_eq!(
            b.recv::<ClientMessage>().await.unwrap(),
            ClientMessage::Finish
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

    mod properties {
        use std::time::Duration;

        use proptest::collection::vec;
        use proptest::prelude::*;
        use proptest::sample::{select, Index};
        use proptest::test_runner::{RngAlgorithm, RngSeed};

        use super::*;
        use crate::protocol::{ContainerRef, Flow};

        /// The same cases on every run, and no files written for failed ones.
        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 256,
                failure_persistence: None,
                rng_algorithm: RngAlgorithm::ChaCha,
                rng_seed: RngSeed::Fixed(0x6c6d_7769_7265),
                ..ProptestConfig::default()
            }
        }

        fn samples() -> Vec<ClientMessage> {
            let container = ContainerRef {
                id: "ab".repeat(32),
                name: "victim".into(),
                image_id: "cd".repeat(32),
                image_name: "localhost/counter:latest".into(),
                address: Some([10, 88, 1, 2].into()),
                published_ports: vec![],
            };
            vec![
                ClientMessage::Finish,
                ClientMessage::Hello {
                    version: 4,
                    client_nonce: "00".repeat(32),
                },
                ClientMessage::EndOfStream {
                    bytes: u64::MAX,
                    sha256: "ef".repeat(32),
                },
                ClientMessage::PrepareTraffic {
                    source_public_key: "A".repeat(43) + "=",
                    container_ip: [10, 88, 1, 2].into(),
                    flows: vec![Flow::tcp(
                        "10.88.1.2:80".parse().unwrap(),
                        "10.0.0.9:40000".parse().unwrap(),
                    )],
                },
                ClientMessage::BeginMigration {
                    migration_id: "0".repeat(32),
                    container: container.clone(),
                    source_public_key: "A".repeat(43) + "=",
                },
                ClientMessage::PutCheckpoint {
                    migration_id: "0".repeat(32),
                    container,
                },
            ]
        }

        /// The JSON of a real message, whole, cut short or with one byte changed: input
        /// that gets past the first bytes of the parser.
        fn mutated_json() -> impl Strategy<Value = Vec<u8>> {
            (select(samples()), 0..3u8, any::<Index>(), any::<u8>()).prop_map(
                |(message, how, at, byte)| {
                    let mut json = serde_json::to_vec(&message).unwrap();
                    match how {
                        0 => {}
                        1 => json.truncate(at.index(json.len())),
                        _ => {
                            let i = at.index(json.len());
                            json[i] = byte;
                        }
                    }
                    json
                },
            )
        }

        fn payload() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                vec(any::<u8>(), 0..512),
                any::<String>().prop_map(String::into_bytes),
                mutated_json(),
            ]
        }

        /// A frame as [`FramedStream`] writes it.
        fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
            let mut bytes = ((payload.len() + 1) as u32).to_be_bytes().to_vec();
            bytes.push(kind);
            bytes.extend_from_slice(payload);
            bytes
        }

        /// Byte strings: noise, or well-formed frames (of any kind byte) around payloads,
        /// followed by noise.
        fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
            let kind = prop_oneof![Just(FRAME_MESSAGE), Just(FRAME_DATA), any::<u8>()];
            let frames = vec((kind, payload()), 0..4);
            prop_oneof![
                vec(any::<u8>(), 0..2048),
                (frames, vec(any::<u8>(), 0..16)).prop_map(|(frames, tail)| {
                    let mut bytes: Vec<u8> =
                        frames.iter().flat_map(|(k, p)| frame(*k, p)).collect();
                    bytes.extend(tail);
                    bytes
                }),
            ]
        }

        /// Bound on reading one case: far longer than it takes, so only a hang reaches it.
        const HANG: Duration = Duration::from_secs(10);

        /// Receives messages from `bytes` (then end of stream) until the first error;
        /// returns the messages and that error.
        fn receive_all(bytes: &[u8]) -> (Vec<ClientMessage>, WireError) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (mut peer, ours) = tokio::io::duplex(bytes.len().max(1));
                peer.write_all(bytes).await.unwrap();
                drop(peer);
                let mut stream = FramedStream::new(ours);
                let mut messages = Vec::new();
                let error = tokio::time::timeout(HANG, async {
                    loop {
                        match stream.recv::<ClientMessage>().await {
                            Ok(message) => messages.push(message),
                            Err(e) => break e,
                        }
                    }
                })
                .await
                .expect("recv hung");
                (messages, error)
            })
        }

        proptest! {
            #![proptest_config(config())]

            /// Whatever a peer sends, `recv` returns a message or an error, and the stream
            /// ends with an error: no panic, no hang.
            #[test]
            fn recv_of_any_bytes_ends(bytes in wire_bytes()) {
                let (messages, _error) = receive_all(&bytes);
                // Each message took a frame header of at least 5 bytes.
                prop_assert!(messages.len() * 5 <= bytes.len());
            }

            /// Frames of real messages come out as they went in, then the end of stream.
            #[test]
            fn recv_of_messages_returns_them(sent in vec(select(samples()), 0..4)) {
                let bytes: Vec<u8> = sent
                    .iter()
                    .flat_map(|m| frame(FRAME_MESSAGE, &serde_json::to_vec(m).unwrap()))
                    .collect();
                let (received, error) = receive_all(&bytes);
                prop_assert_eq!(received, sent);
                prop_assert!(matches!(error, WireError::Closed), "{:?}", error);
            }

            /// A length above the limit is refused at once: the frame body is neither
            /// awaited (the peer stays open and sends none) nor allocated.
            #[test]
            fn oversized_length_is_refused(
                len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
                tail in vec(any::<u8>(), 0..64),
            ) {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .unwrap();
                let got = runtime.block_on(async {
                    let (mut peer, ours) = tokio::io::duplex(128);
                    peer.write_u32(len).await.unwrap();
                    peer.write_all(&tail).await.unwrap();
                    let mut stream = FramedStream::new(ours);
                    let got = tokio::time::timeout(HANG, stream.recv::<ClientMessage>()).await;
                    drop(peer);
                    got
                });
                prop_assert!(
                    matches!(got, Ok(Err(WireError::Oversized(n))) if n == len as usize),
                    "{:?}",
                    got
                );
            }

            /// Decoding a message payload never panics, whatever it holds.
            #[test]
            fn decode_of_any_bytes_does_not_panic(bytes in payload()) {
                let _ = decode::<ClientMessage>(&bytes);
            }
        }
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
