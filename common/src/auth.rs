//! Mutual authentication with a pre-shared token (HMAC-SHA256 challenge-response).
//!
//! Each side sends a fresh random nonce and answers with
//! `HMAC(token, role || client_nonce || server_nonce)`; the role label keeps a proof from
//! being replayed in the other direction. The token itself never crosses the wire.

use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
use crate::wire::{FramedStream, WireError};

const NONCE_LEN: usize = 32;
/// Shorter tokens are refused: they could be guessed offline from one captured handshake.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("token in {0} is shorter than {MIN_TOKEN_LEN} characters")]
    TokenTooShort(String),
    #[error("protocol version mismatch: we speak {ours}, peer speaks {theirs}")]
    Version { ours: u32, theirs: u32 },
    #[error("authentication failed: the peer does not hold the same token")]
    BadProof,
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("unexpected message during handshake: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The pre-shared secret, as read from the token file.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(AuthError::TokenTooShort(path.display().to_string()));
        }
        Ok(Self(token.as_bytes().to_vec()))
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
        ServerMessage::Error { message } => return Err(AuthError::Refused(message)),
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
        ServerMessage::Welcome => Ok(()),
        ServerMessage::Error { message } => Err(AuthError::Refused(message)),
        other => Err(AuthError::Unexpected(format!("{other:?}"))),
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
            Ok(())
        }
        ClientMessage::Prove { .. } => Err(AuthError::BadProof),
        other => Err(AuthError::Unexpected(format!("{other:?}"))),
    }
}

#[cfg(test)]
mod tests {
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
            matches!(reply, ServerMessage::Error { ref message } if message.contains("version"))
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
        a.send(&ClientMessage::Abort).await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(AuthError::Unexpected(_))
        ));
    }

    #[test]
    fn short_token_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("lm-token-test-{}", std::process::id()));
        std::fs::write(&dir, "short\n").unwrap();
        assert!(matches!(
            Token::from_file(&dir),
            Err(AuthError::TokenTooShort(_))
        ));
        std::fs::remove_file(&dir).unwrap();
    }
}
