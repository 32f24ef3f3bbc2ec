//! Mutual authentication with a pre-shared token (HMAC-SHA256 challenge-response), then
//! an encrypted session.
//!
//! Each side sends a fresh random nonce and answers with
//! `HMAC(token, role || client_nonce || server_nonce)`; the role label keeps a proof from
//! being replayed in the other direction. The token itself never crosses the wire.
//!
//! After `Welcome` both sides run a Noise handshake ([`NOISE_PARAMS`]: fresh X25519 keys
//! on both sides, the token-derived pre-shared key mixed in) in two data frames, and seal
//! every later frame with its keys: the session, checkpoint archives included, is
//! confidential and tamper-evident, and recordings of it stay sealed even if the token
//! leaks later (forward secrecy).

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::{ClientMessage, ErrorCode, ServerMessage, PROTOCOL_VERSION};
use crate::session::wire::{Frame, FramedStream, WireError};

const NONCE_LEN: usize = 32;
/// Noise pattern of the session: no static keys (the token authenticates), ephemeral
/// Diffie-Hellman, the pre-shared key mixed in from the first message, AES-256-GCM
/// (hardware-accelerated on the hosts that run containers).
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Domain separation of the Noise pre-shared key from other uses of the token.
const PSK_LABEL: &[u8] = b"live-migrate noise psk";
/// Shorter tokens are refused: they could be guessed offline from one captured handshake.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    /// Refused as ssh refuses a private key others can read: anyone who can read the
    /// token can impersonate either agent.
    #[error(
        "token file {path} is open to group or others (mode {mode:04o}); fix it with: chmod 600 {path}"
    )]
    TokenFileMode { path: String, mode: u32 },
    #[error("token in {0} is shorter than {MIN_TOKEN_LEN} characters")]
    TokenTooShort(String),
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("authentication failed: the peer does not hold the same token")]
    BadProof,
    #[error("peer refused: {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("unexpected message during handshake: {0}")]
    Unexpected(String),
    #[error("encryption handshake failed: {0}")]
    Noise(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

impl AuthError {
    /// The code a refusal carries on the wire.
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::BadProof => ErrorCode::Unauthenticated,
            AuthError::Version { .. } => ErrorCode::Version,
            _ => ErrorCode::Protocol,
        }
    }

    /// The peer holds another token (whichever side found out).
    pub fn is_token_mismatch(&self) -> bool {
        matches!(
            self,
            AuthError::BadProof
                | AuthError::Refused {
                    code: ErrorCode::Unauthenticated,
                    ..
                }
        )
    }
}

/// The pre-shared secret, as read from the token file.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// Bytes of randomness in a token [`Token::create_file`] makes (written as hex).
const NEW_TOKEN_BYTES: usize = 32;

/// Why [`Token::create_file`] wrote no token.
#[derive(Debug, thiserror::Error)]
pub enum CreateTokenError {
    #[error("{0} holds a token already: it stays (give --force to replace it, and then copy the new one to every host)")]
    Exists(String),
    #[error("cannot write token file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl Token {
    /// Writes a new random token to `path` (mode 0600, its directory created 0700 where it
    /// is missing). A file already there stays, unless `replace`.
    pub fn create_file(path: &Path, replace: bool) -> Result<Self, CreateTokenError> {
        let display = || path.display().to_string();
        if !replace && path.exists() {
            return Err(CreateTokenError::Exists(display()));
        }
        let mut bytes = [0u8; NEW_TOKEN_BYTES];
        rand::thread_rng().fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        let written = path
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .map_or(Ok(()), crate::files::create_private_dir)
            .and_then(|()| crate::files::write_atomic(path, format!("{token}\n").as_bytes()));
        written.map_err(|source| CreateTokenError::Write {
            path: display(),
            source,
        })?;
        Ok(Self(token.into_bytes()))
    }

    /// Reads the token from `path`, which only its owner may read or write (mode 0600 or
    /// stricter).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let file_error = |source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        };
        // The mode of the file that is read, not of whatever the path names a moment later.
        let mut file = std::fs::File::open(path).map_err(file_error)?;
        let mode = file.metadata().map_err(file_error)?.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(AuthError::TokenFileMode {
                path: path.display().to_string(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(file_error)?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TokenTooShort(path.display().to_string()));
        }
        Ok(Self(token.as_bytes().to_vec()))
    }

    /// The Noise pre-shared key: HMAC(token, label), 32 bytes.
    fn noise_psk(&self) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(PSK_LABEL);
        mac.finalize().into_bytes().into()
    }

    fn proof(&self, role: &[u8], client_nonce: &str, server_nonce: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(role);
        mac.update(client_nonce.as_bytes());
        mac.update(server_nonce.as_bytes());
        mac
    }

    fn sign(&self, role: &[u8], client_nonce: &str, server_nonce: &str) -> String {
        hex::encode(
            self.proof(role, client_nonce, server_nonce)
                .finalize()
                .into_bytes(),
        )
    }

    /// Constant-time comparison, so timing reveals nothing about the expected proof.
    fn verify(&self, role: &[u8], client_nonce: &str, server_nonce: &str, proof: &str) -> bool {
        let Ok(bytes) = hex::decode(proof) else {
            return false;
        };
        self.proof(role, client_nonce, server_nonce)
            .verify_slice(&bytes)
            .is_ok()
    }
}

impl From<&str> for Token {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

const CLIENT_ROLE: &[u8] = b"live-migrate client\0";
const SERVER_ROLE: &[u8] = b"live-migrate server\0";

fn nonce() -> String {
    let mut bytes = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Runs the client side of the handshake; returns once both sides are authenticated.
pub async fn authenticate_to_server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FramedStream<S>,
    token: &Token,
) -> Result<(), AuthError> {
    let client_nonce = nonce();
    stream
        .send(&ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            client_nonce: client_nonce.clone(),
        })
        .await?;
    let (server_nonce, server_proof) = match stream.recv::<ServerMessage>().await? {
        ServerMessage::Challenge {
            version,
            server_nonce,
            server_proof,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(AuthError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            (server_nonce, server_proof)
        }
        ServerMessage::Error { code, message } => return Err(AuthError::Refused { code, message }),
        other => return Err(AuthError::Unexpected(format!("{other:?}"))),
    };
    if !token.verify(SERVER_ROLE, &client_nonce, &server_nonce, &server_proof) {
        return Err(AuthError::BadProof);
    }
    stream
        .send(&ClientMessage::Prove {
            client_proof: token.sign(CLIENT_ROLE, &client_nonce, &server_nonce),
        })
        .await?;
    match stream.recv::<ServerMessage>().await? {
        ServerMessage::Welcome => {}
        ServerMessage::Error { code, message } => return Err(AuthError::Refused { code, message }),
        other => return Err(AuthError::Unexpected(format!("{other:?}"))),
    }
    let mut noise = noise_session(token, true)?;
    let mut buf = [0u8; 256];
    let n = noise.write_message(&[], &mut buf).map_err(noise_error)?;
    stream.send_data_now(&buf[..n]).await?;
    noise
        .read_message(&handshake_frame(stream).await?, &mut buf)
        .map_err(noise_error)?;
    stream.encrypt(noise.into_transport_mode().map_err(noise_error)?);
    Ok(())
}

/// A fresh Noise handshake for one side of a session.
fn noise_session(token: &Token, initiator: bool) -> Result<snow::HandshakeState, AuthError> {
    let params = NOISE_PARAMS.parse().map_err(noise_error)?;
    let psk = token.noise_psk();
    let builder = snow::Builder::new(params).psk(0, &psk);
    if initiator {
        builder.build_initiator()
    } else {
        builder.build_responder()
    }
    .map_err(noise_error)
}

fn noise_error(e: snow::Error) -> AuthError {
    AuthError::Noise(e.to_string())
}

/// The next frame, which must be a data frame holding a Noise handshake message.
async fn handshake_frame<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FramedStream<S>,
) -> Result<Vec<u8>, AuthError> {
    match stream.recv_frame().await? {
        Frame::Data(bytes) => Ok(bytes),
        Frame::Message(bytes) => Err(AuthError::Unexpected(
            String::from_utf8_lossy(&bytes).into_owned(),
        )),
    }
}

/// Runs the server side of the handshake. On failure the caller has already had an
/// `Error` message sent to the peer where that was possible, and must close the connection.
pub async fn authenticate_client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FramedStream<S>,
    token: &Token,
) -> Result<(), AuthError> {
    let result = server_handshake(stream, token).await;
    if let Err(e) = &result {
        if !matches!(e, AuthError::Wire(WireError::Closed)) {
            // Best effort: the peer may be gone or not speak our protocol at all.
            let _ = stream
                .send(&ServerMessage::Error {
                    code: e.code(),
                    message: e.to_string(),
                })
                .await;
        }
    }
    result
}

async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut FramedStream<S>,
    token: &Token,
) -> Result<(), AuthError> {
    let client_nonce = match stream.recv::<ClientMessage>().await? {
        ClientMessage::Hello {
            version,
            client_nonce,
        } => {
            if version != PROTOCOL_VERSION {
                return Err(AuthError::Version {
                    ours: PROTOCOL_VERSION,
                    theirs: version,
                });
            }
            client_nonce
        }
        other => return Err(AuthError::Unexpected(format!("{other:?}"))),
    };
    if client_nonce.len() != NONCE_LEN * 2 {
        return Err(AuthError::Unexpected("nonce of wrong length".into()));
    }
    let server_nonce = nonce();
    stream
        .send(&ServerMessage::Challenge {
            version: PROTOCOL_VERSION,
            server_proof: token.sign(SERVER_ROLE, &client_nonce, &server_nonce),
            server_nonce: server_nonce.clone(),
        })
        .await?;
    match stream.recv::<ClientMessage>().await? {
        ClientMessage::Prove { client_proof }
            if token.verify(CLIENT_ROLE, &client_nonce, &server_nonce, &client_proof) =>
        {
            stream.send(&ServerMessage::Welcome).await?;
        }
        ClientMessage::Prove { .. } => return Err(AuthError::BadProof),
        other => return Err(AuthError::Unexpected(format!("{other:?}"))),
    }
    let mut noise = noise_session(token, false)?;
    let mut buf = [0u8; 256];
    noise
        .read_message(&handshake_frame(stream).await?, &mut buf)
        .map_err(noise_error)?;
    let n = noise.write_message(&[], &mut buf).map_err(noise_error)?;
    stream.send_data_now(&buf[..n]).await?;
    stream.encrypt(noise.into_transport_mode().map_err(noise_error)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `init` writes a token the agents accept, and leaves an existing one alone unless
    /// told to replace it.
    #[test]
    fn a_new_token_is_private_and_never_overwrites_one_unasked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/token");
        let first = Token::create_file(&path, false).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Token::from_file(&path).unwrap().0, first.0);
        assert!(matches!(
            Token::create_file(&path, false),
            Err(CreateTokenError::Exists(_))
        ));
        assert_eq!(Token::from_file(&path).unwrap().0, first.0, "overwritten");
        let second = Token::create_file(&path, true).unwrap();
        assert_ne!(second.0, first.0);
        assert_eq!(Token::from_file(&path).unwrap().0, second.0);
    }

    use super::*;

    async fn handshake(
        client: &str,
        server: &str,
    ) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        let (ct, st) = (Token::from(client), Token::from(server));
        let server = tokio::spawn(async move { authenticate_client(&mut b, &st).await });
        let client = authenticate_to_server(&mut a, &ct).await;
        // A client that gave up closes the connection; the server must notice.
        drop(a);
        (client, server.await.unwrap())
    }

    #[tokio::test]
    async fn same_token_authenticates_both_ways() {
        let (c, s) = handshake("0123456789abcdef0123", "0123456789abcdef0123").await;
        assert!(c.is_ok(), "{c:?}");
        assert!(s.is_ok(), "{s:?}");
    }

    /// What crossed a [`relay`] from client to server, and a switch that flips one bit of
    /// the next bytes that cross it.
    #[derive(Default)]
    struct Wire {
        seen: std::sync::Mutex<Vec<u8>>,
        flip_next: std::sync::atomic::AtomicBool,
    }

    /// Client and server streams joined through a relay that records (and may tamper with)
    /// the client's bytes.
    fn relay() -> (
        FramedStream<tokio::io::DuplexStream>,
        FramedStream<tokio::io::DuplexStream>,
        std::sync::Arc<Wire>,
    ) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut client_end) = tokio::io::duplex(1 << 20);
        let (server, mut server_end) = tokio::io::duplex(1 << 20);
        let wire = std::sync::Arc::new(Wire::default());
        let tap = wire.clone();
        tokio::spawn(async move {
            let (mut from_client, mut to_client) = tokio::io::split(&mut client_end);
            let (mut from_server, mut to_server) = tokio::io::split(&mut server_end);
            let up = async {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n @ 1..) = from_client.read(&mut buf).await {
                    if tap.flip_next.swap(false, Ordering::SeqCst) {
                        buf[n / 2] ^= 1;
                    }
                    tap.seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_server.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            };
            let down = tokio::io::copy(&mut from_server, &mut to_client);
            let _ = tokio::join!(up, down);
        });
        (FramedStream::new(client), FramedStream::new(server), wire)
    }

    /// After the handshake, messages and streams larger than a record travel sealed, and
    /// nothing of them appears in the clear on the wire.
    #[tokio::test]
    async fn the_session_is_sealed() {
        let (mut a, mut b, wire) = relay();
        let token = Token::from("0123456789abcdef0123");
        let server_token = token.clone();
        let payload: Vec<u8> = b"secret memory page ".repeat(40_000); // 760 kB
        let expected = payload.clone();
        let server = tokio::spawn(async move {
            authenticate_client(&mut b, &server_token).await.unwrap();
            let mut got = Vec::new();
            while let Frame::Data(chunk) = b.recv_frame().await.unwrap() {
                got.extend_from_slice(&chunk);
            }
            b.send(&ServerMessage::Finished).await.unwrap();
            got
        });
        authenticate_to_server(&mut a, &token).await.unwrap();
        a.send_data(&payload).await.unwrap();
        a.send(&ClientMessage::Finish).await.unwrap();
        assert_eq!(
            a.recv::<ServerMessage>().await.unwrap(),
            ServerMessage::Finished
        );
        assert_eq!(server.await.unwrap(), expected);
        let seen = wire.seen.lock().unwrap();
        assert!(seen.len() > payload.len());
        assert!(!seen.windows(6).any(|w| w == b"secret"));
        assert!(!seen.windows(6).any(|w| w == b"finish"));
    }

    /// A flipped bit in a sealed record is an error, not a changed message.
    #[tokio::test]
    async fn a_tampered_record_is_refused() {
        let (mut a, mut b, wire) = relay();
        let token = Token::from("0123456789abcdef0123");
        let server_token = token.clone();
        let server = tokio::spawn(async move {
            authenticate_client(&mut b, &server_token).await.unwrap();
            b.recv::<ClientMessage>().await
        });
        authenticate_to_server(&mut a, &token).await.unwrap();
        wire.flip_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
        a.send(&ClientMessage::Finish).await.unwrap();
        let got = server.await.unwrap();
        assert!(
            matches!(got, Err(WireError::Malformed(ref m)) if m.contains("authentication")),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn wrong_token_fails_on_both_sides() {
        let (c, s) = handshake("0123456789abcdef0123", "ffffffffffffffffffff").await;
        // The client detects the server's bad proof first and never proves itself.
        assert!(matches!(c, Err(AuthError::BadProof)), "{c:?}");
        assert!(s.is_err());
    }

    #[tokio::test]
    async fn version_mismatch_is_reported() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        let token = Token::from("0123456789abcdef0123");
        let server = tokio::spawn(async move { authenticate_client(&mut b, &token).await });
        a.send(&ClientMessage::Hello {
            version: PROTOCOL_VERSION + 1,
            client_nonce: "00".repeat(NONCE_LEN),
        })
        .await
        .unwrap();
        let reply: ServerMessage = a.recv().await.unwrap();
        assert!(
            matches!(reply, ServerMessage::Error { code: ErrorCode::Version, ref message } if message.contains("version"))
        );
        assert!(matches!(
            server.await.unwrap(),
            Err(AuthError::Version { .. })
        ));
    }

    #[tokio::test]
    async fn request_before_handshake_does_nothing() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (mut a, mut b) = (FramedStream::new(a), FramedStream::new(b));
        let token = Token::from("0123456789abcdef0123");
        let server = tokio::spawn(async move { authenticate_client(&mut b, &token).await });
        a.send(&ClientMessage::Finish).await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(AuthError::Unexpected(_))
        ));
    }

    /// A token file with `content` and mode 0600 (as `tempfile` creates it).
    fn token_file(content: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), content).unwrap();
        file
    }

    fn set_mode(file: &tempfile::NamedTempFile, mode: u32) {
        std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn short_token_file_is_refused() {
        let file = token_file("short\n");
        assert!(matches!(
            Token::from_file(file.path()),
            Err(AuthError::TokenTooShort(_))
        ));
    }

    #[test]
    fn token_file_open_to_others_is_refused() {
        let file = token_file("0123456789abcdef0123\n");
        let path = file.path().display().to_string();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            set_mode(&file, mode);
            match Token::from_file(file.path()) {
                Err(e @ AuthError::TokenFileMode { mode: m, .. }) => {
                    assert_eq!(m, mode);
                    let text = e.to_string();
                    assert!(text.contains(&format!("mode {mode:04o}")), "{text}");
                    assert!(text.contains(&format!("chmod 600 {path}")), "{text}");
                }
                other => panic!("mode {mode:o} accepted: {other:?}"),
            }
        }
        for mode in [0o600, 0o400] {
            set_mode(&file, mode);
            let token = Token::from_file(file.path()).unwrap();
            assert_eq!(token.0, b"0123456789abcdef0123");
        }
    }
}
