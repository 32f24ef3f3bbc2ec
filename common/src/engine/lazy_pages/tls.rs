//! The TLS that secures one migration's page connection (CRIU's `--tls`, GnuTLS).
//!
//! Why TLS and not the tunnel: through the userspace WireGuard tunnel (wireguard-go) the
//! pages moved at about 180 MB/s, and CRIU's lazy-pages daemon asks for one chunk at a
//! time, so the copy of the memory was most of a streamed stop-copy's freeze. CRIU's own
//! TLS, straight between the hosts, is AES-GCM in GnuTLS, several times faster here.
//!
//! Both ends present, and trust, one certificate only: a self-signed one that the source
//! makes for this migration ([`PageCredentials::generate`]) and hands, with its key, to the
//! destination over the sealed session, as the session's own keys are secret to the two
//! agents. A third party that reaches the page server's port fails the handshake (CRIU
//! requires the client's certificate); the migration then fails as if the link were cut.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::protocol::PageCredentials;

/// Largest PEM text accepted for the certificate or the key (an ECDSA P-256 pair is well
/// under 1 KiB each).
const MAX_PEM_LEN: usize = 4096;

impl PageCredentials {
    /// A fresh key (ECDSA P-256) and a certificate for it, signed by itself, that may
    /// stand as its own authority: GnuTLS then trusts exactly this certificate.
    pub fn generate() -> Result<Self> {
        let key = rcgen::KeyPair::generate().context("generate the page connection's key")?;
        let mut params = rcgen::CertificateParams::new(Vec::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "live-migrate pages");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyCertSign,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params
            .self_signed(&key)
            .context("sign the page connection's certificate")?;
        Ok(Self {
            certificate: certificate.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Refuses anything but one PEM certificate and one PEM private key, each of bounded
    /// size (peer input: GnuTLS parses them, as root).
    pub fn validate(&self) -> Result<()> {
        for (text, tag) in [
            (&self.certificate, "CERTIFICATE"),
            (&self.key, "PRIVATE KEY"),
        ] {
            if text.len() > MAX_PEM_LEN {
                bail!("the page connection's {tag} is over {MAX_PEM_LEN} bytes");
            }
            let blocks = pem::parse_many(text)
                .with_context(|| format!("the page connection's {tag} is not PEM"))?;
            match blocks.as_slice() {
                [one] if one.tag() == tag => {}
                _ => bail!("the page connection's {tag} must be one PEM block of that type"),
            }
        }
        rcgen::KeyPair::from_pem(&self.key).context("the page connection's key")?;
        Ok(())
    }

    /// Writes certificate and key into one file, readable by root only, where CRIU reads
    /// both (and the certificate again as the one it trusts): [`criu_options`].
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!("{}{}", self.certificate, self.key);
        crate::files::write_atomic(path, text.as_bytes())
            .with_context(|| format!("write {}", path.display()))
    }
}

/// CRIU's options for a page connection secured with the credentials in `pem`
/// ([`PageCredentials::write`]), as option names and values, for a configuration file or a
/// command line. The peer's name is not checked: its certificate is the only one trusted.
pub fn criu_options(pem: &Path) -> Vec<(&'static str, Option<&Path>)> {
    vec![
        ("tls", None),
        ("tls-cacert", Some(pem)),
        ("tls-cert", Some(pem)),
        ("tls-key", Some(pem)),
        ("tls-no-cn-verify", None),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_validate() {
        let credentials = PageCredentials::generate().unwrap();
        credentials.validate().unwrap();
        assert!(credentials
            .certificate
            .starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn anything_else_is_refused() {
        let good = PageCredentials::generate().unwrap();
        let other = PageCredentials::generate().unwrap();
        let swapped = PageCredentials {
            certificate: good.key.clone(),
            key: good.certificate.clone(),
        };
        let two_certificates = PageCredentials {
            certificate: format!("{}{}", good.certificate, other.certificate),
            key: good.key.clone(),
        };
        let oversized = PageCredentials {
            certificate: "A".repeat(MAX_PEM_LEN + 1),
            key: good.key.clone(),
        };
        let garbage = PageCredentials {
            certificate: "not a certificate".into(),
            key: good.key.clone(),
        };
        let bad_key = PageCredentials {
            certificate: good.certificate.clone(),
            key: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
        };
        for refused in [swapped, two_certificates, oversized, garbage, bad_key] {
            assert!(refused.validate().is_err(), "{refused:?}");
        }
    }

    #[test]
    fn written_file_is_private_and_holds_both() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages.pem");
        let credentials = PageCredentials::generate().unwrap();
        credentials.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let blocks = pem::parse_many(std::fs::read(&path).unwrap()).unwrap();
        let tags: Vec<_> = blocks.iter().map(|b| b.tag().to_string()).collect();
        assert_eq!(tags, ["CERTIFICATE", "PRIVATE KEY"]);
    }
}
