//! The `tls_*` keys of `[backends.health]`: how the `smtps` and `imaps` checks treat
//! the server's certificate (proxy-user/src/health/tls.rs uses them).
//!
//! ```toml
//! [backends.health]
//! check           = "smtps"
//! tls_verify      = true                          # default false
//! tls_ca_file     = "/etc/kgate/mail-ca.pem"      # optional; else the system's CAs
//! tls_server_name = "mail.example.org"            # optional; else the address checked
//! ```
//!
//! The CA file is read here, so `kgate check` (and a reload) reports a file that cannot
//! be read or holds no usable certificate at the line of `tls_ca_file`.

use std::path::PathBuf;

use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use toml::Spanned;

use super::{CheckType, Located, at};

/// How an `smtps` or `imaps` check treats the server's certificate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckTls {
    /// `None`: not verified (the default: servers are addressed by IP, often with
    /// self-signed certificates). `Some`: verified against these.
    pub verify: Option<Trust>,
    /// The name sent in the TLS hello (SNI) and, when verifying, the name the
    /// certificate must carry. `None`: the address checked (no SNI is sent for it).
    pub server_name: Option<ServerName<'static>>,
}

/// What a verified certificate must chain to.
#[derive(Clone, Debug, PartialEq)]
pub enum Trust {
    /// The certificates of `tls_ca_file`: CAs, or the servers' own self-signed
    /// certificates (each then trusted as it is).
    CaFile {
        path: PathBuf,
        certificates: Vec<CertificateDer<'static>>,
    },
    /// The system's CA certificates (Debian's `ca-certificates`), read when the checks
    /// start.
    System,
}

/// The keys as written in `[backends.health]` (its fields there: serde cannot flatten
/// them into a section that denies unknown keys).
pub(super) struct TlsKeys {
    pub tls_verify: Option<Spanned<bool>>,
    pub tls_ca_file: Option<Spanned<PathBuf>>,
    pub tls_server_name: Option<Spanned<String>>,
}

impl TlsKeys {
    pub(super) fn validate(self, check: CheckType) -> Result<CheckTls, Located> {
        if !matches!(check, CheckType::Smtps | CheckType::Imaps) {
            let check = match check {
                CheckType::None => "none",
                CheckType::Tcp => "tcp",
                CheckType::Smtp => "smtp",
                CheckType::Imap => "imap",
                CheckType::Smtps | CheckType::Imaps => unreachable!("matched above"),
            };
            let misplaced = |key: &str| {
                format!(
                    "`{key}` is a setting of the smtps and imaps checks, and this backend's check \
                     is `{check}`: remove it, or use check = \"smtps\" or \"imaps\" for a port \
                     that speaks TLS from the first byte (465, 993)"
                )
            };
            if let Some(key) = &self.tls_verify {
                return Err(at(key, misplaced("tls_verify")));
            }
            if let Some(key) = &self.tls_ca_file {
                return Err(at(key, misplaced("tls_ca_file")));
            }
            if let Some(key) = &self.tls_server_name {
                return Err(at(key, misplaced("tls_server_name")));
            }
            return Ok(CheckTls::default());
        }
        let server_name = match self.tls_server_name {
            None => None,
            Some(name) => Some(ServerName::try_from(name.get_ref().clone()).map_err(|_| {
                at(
                    &name,
                    format!(
                        "`{}` is not a DNS name or an IP address: give the name the servers' \
                         certificates carry, like \"mail.example.org\"",
                        name.get_ref()
                    ),
                )
            })?),
        };
        let verify = self.tls_verify.as_ref().is_some_and(|v| *v.get_ref());
        let verify = match (verify, self.tls_ca_file) {
            (false, None) => None,
            (false, Some(file)) => {
                return Err(at(
                    &file,
                    "tls_ca_file is used only to verify certificates: add `tls_verify = true`, \
                     or remove tls_ca_file",
                ));
            }
            (true, None) => Some(Trust::System),
            (true, Some(file)) => Some(Trust::CaFile {
                certificates: read_ca_file(&file).map_err(|message| at(&file, message))?,
                path: file.into_inner(),
            }),
        };
        Ok(CheckTls {
            verify,
            server_name,
        })
    }
}

/// The certificates of a PEM file, each checked to be usable as a trust anchor.
fn read_ca_file(file: &Spanned<PathBuf>) -> Result<Vec<CertificateDer<'static>>, String> {
    let path = file.get_ref();
    let shown = path.display();
    if !path.is_absolute() {
        return Err(format!(
            "`tls_ca_file` must be an absolute path, like \"/etc/kgate/mail-ca.pem\" (`{shown}` \
             is not)"
        ));
    }
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "cannot read tls_ca_file `{shown}`: {e}: give the PEM file of the CA that signed \
             the servers' certificates (or of their self-signed certificates)"
        )
    })?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "tls_ca_file `{shown}` is not a PEM file of certificates ({e}): give \
                 certificates as -----BEGIN CERTIFICATE----- blocks"
            )
        })?;
    if certificates.is_empty() {
        return Err(format!(
            "tls_ca_file `{shown}` holds no certificate (no -----BEGIN CERTIFICATE----- \
             block): give the PEM file of the CA that signed the servers' certificates"
        ));
    }
    let mut roots = RootCertStore::empty();
    for (i, certificate) in certificates.iter().enumerate() {
        roots.add(certificate.clone()).map_err(|e| {
            format!(
                "certificate {} of tls_ca_file `{shown}` cannot be read as a certificate ({e}): \
                 give the CA's certificate in PEM",
                i + 1
            )
        })?;
    }
    Ok(certificates)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, HealthConfig};

    /// A config whose only backend has `health` as its `[backends.health]`.
    fn health(health: &str) -> Result<HealthConfig, String> {
        let text = format!(
            "[[frontends]]\nname = \"f\"\nlisten = [\"127.0.0.1:465\"]\nbackend = \"b\"\n\
             [[backends]]\nname = \"b\"\n[backends.health]\n{health}\n\
             [[backends.servers]]\nname = \"s\"\naddress = \"127.0.0.1:30465\"\n"
        );
        Config::parse(&text, Path::new("kgate.toml"))
            .map(|c| c.backends[0].health.clone())
            .map_err(|e| e.to_string())
    }

    /// A directory of files for one test, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("kgate-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn tls_checks_verify_nothing_by_default() {
        let smtps = health("check = \"smtps\"").unwrap();
        assert_eq!(smtps.check, CheckType::Smtps);
        assert_eq!(smtps.tls, CheckTls::default());
        // Like smtp: an SMTP server may hold its greeting back.
        assert_eq!(smtps.timeout, std::time::Duration::from_secs(10));
        let imaps = health("check = \"imaps\"\ntls_server_name = \"mail.example.org\"").unwrap();
        assert_eq!(imaps.timeout, std::time::Duration::from_secs(2));
        assert_eq!(imaps.tls.verify, None);
        assert_eq!(
            imaps.tls.server_name,
            Some(ServerName::try_from("mail.example.org").unwrap())
        );
        let verified = health("check = \"imaps\"\ntls_verify = true").unwrap();
        assert_eq!(verified.tls.verify, Some(Trust::System));
    }

    #[test]
    fn a_ca_file_is_read_at_check_time() {
        let pem = rcgen::generate_simple_self_signed(vec!["mail.example.org".into()])
            .unwrap()
            .cert
            .pem();
        let dir = TempDir::new("ca-file-read");
        let file = dir.file("ca.pem", pem.as_bytes());
        let config = health(&format!(
            "check = \"smtps\"\ntls_verify = true\ntls_ca_file = {:?}",
            file.display().to_string()
        ))
        .unwrap();
        let Some(Trust::CaFile { path, certificates }) = config.tls.verify else {
            panic!("{:?}", config.tls);
        };
        assert_eq!(path, file);
        assert_eq!(certificates.len(), 1);
    }

    #[test]
    fn a_ca_file_that_cannot_be_read_or_parsed_is_an_error_at_its_key() {
        let with = |file: &str| {
            health(&format!(
                "check = \"smtps\"\ntls_verify = true\ntls_ca_file = {file:?}"
            ))
            .unwrap_err()
        };
        // The key is on line 10 of the file `health` writes.
        let missing = with("/nonexistent/kgate/ca.pem");
        assert!(
            missing.starts_with("kgate.toml:10:15: cannot read tls_ca_file `/nonexistent/kgate/ca.pem`: No such file or directory"),
            "{missing}"
        );
        let dir = TempDir::new("ca-file-errors");
        let not_pem = dir.file("not-pem.pem", b"just some text\n");
        let message = with(&not_pem.display().to_string());
        assert!(message.starts_with("kgate.toml:10:15: "), "{message}");
        assert!(message.contains("holds no certificate"), "{message}");
        let broken = dir.file(
            "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        );
        let message = with(&broken.display().to_string());
        assert!(
            message.contains("is not a PEM file of certificates"),
            "{message}"
        );
        let garbage = dir.file(
            "garbage.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
        );
        let message = with(&garbage.display().to_string());
        assert!(
            message.contains("certificate 1 of tls_ca_file") && message.contains("cannot be read"),
            "{message}"
        );
        let relative = with("ca.pem");
        assert!(relative.contains("must be an absolute path"), "{relative}");
    }

    #[test]
    fn tls_keys_elsewhere_or_alone_say_what_to_change() {
        let message = health("check = \"smtp\"\ntls_verify = true").unwrap_err();
        assert!(message.starts_with("kgate.toml:9:14: "), "{message}");
        assert!(
            message.contains("`tls_verify` is a setting of the smtps and imaps checks, and this backend's check is `smtp`"),
            "{message}"
        );
        let message = health("check = \"tcp\"\ntls_server_name = \"x.example\"").unwrap_err();
        assert!(message.contains("`tls_server_name`"), "{message}");
        let message = health("check = \"imaps\"\ntls_ca_file = \"/etc/kgate/ca.pem\"").unwrap_err();
        assert!(message.contains("add `tls_verify = true`"), "{message}");
        let message = health("check = \"imaps\"\ntls_server_name = \"not a name\"").unwrap_err();
        assert!(
            message.contains("`not a name` is not a DNS name or an IP address"),
            "{message}"
        );
    }
}
