//! TLS for the `smtps` and `imaps` checks (rustls, with the ring provider).
//!
//! On 465 and 993 the client speaks first, with its TLS hello: after the PROXY header,
//! a check does the handshake, then the smtp or imap dialogue inside TLS, and closes
//! with a `close_notify` alert before its FIN, as TLS asks. (Postfix and Dovecot close
//! first after QUIT and LOGOUT, and logged nothing either way in
//! tests/tests/health_tls.rs; a server that waits for the client to close might.)
//!
//! By default the certificate is not verified: servers are addressed by IP, often with
//! self-signed certificates, and the check asks whether the server answers, not who it
//! is; the handshake still proves that the server holds the key of the certificate it
//! shows. With `tls_verify = true` the chain must lead to `tls_ca_file` (or the system's
//! CAs) and the certificate must carry `tls_server_name` (or the address checked); a
//! certificate that is itself in `tls_ca_file` is trusted as it is (a self-signed
//! server certificate, which webpki would not take as a CA).
//!
//! Every check does a full handshake (no session resumption), so every check sees the
//! certificate a new client sees.

use std::{
    fmt, io,
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        Resumption, WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{WebPkiSupportedAlgorithms, ring},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::failure::{CheckFailure, Step, quote};
use crate::config::{CheckTls, Trust};

/// How many of the server's first bytes a failed handshake may quote.
const FIRST_BYTES: usize = 120;

/// The TLS side of the checks of one backend: made once (at start and at each reload),
/// used by every check of its servers.
pub struct TlsClient {
    settings: CheckTls,
    /// The error when it could not be made (no CA certificate in the system's store):
    /// every check then fails with it.
    config: Result<Arc<ClientConfig>, String>,
}

impl TlsClient {
    pub fn new(settings: &CheckTls) -> TlsClient {
        TlsClient {
            settings: settings.clone(),
            config: client_config(settings).map(Arc::new),
        }
    }

    /// The name given in the hello and, when verifying, expected in the certificate:
    /// `tls_server_name`, else the address checked (rustls sends no SNI for an address).
    pub(super) fn server_name(&self, address: IpAddr) -> ServerName<'static> {
        self.settings
            .server_name
            .clone()
            .unwrap_or(ServerName::IpAddress(address.into()))
    }

    pub(super) fn connector(&self) -> Result<TlsConnector, CheckFailure> {
        match &self.config {
            Ok(config) => Ok(TlsConnector::from(config.clone())),
            Err(reason) => Err(CheckFailure::Tls(reason.clone())),
        }
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl Eq for TlsClient {}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.settings.fmt(f)
    }
}

fn client_config(settings: &CheckTls) -> Result<ClientConfig, String> {
    let provider = Arc::new(ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .dangerous();
    let verifier: Arc<dyn ServerCertVerifier> = match &settings.verify {
        None => Arc::new(AnyCertificate { algorithms }),
        Some(trust) => {
            let (roots, pinned) = roots(trust)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("cannot set up certificate verification: {e}"))?;
            Arc::new(Verified { webpki, pinned })
        }
    };
    let mut config = builder
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The trust anchors, and the certificates trusted as they are (those of the CA file).
fn roots(trust: &Trust) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), String> {
    let mut roots = RootCertStore::empty();
    match trust {
        Trust::CaFile { path, certificates } => {
            // The config module has checked each one.
            let (_, unusable) = roots.add_parsable_certificates(certificates.iter().cloned());
            if roots.is_empty() {
                return Err(format!(
                    "no usable certificate in tls_ca_file `{}` ({unusable} refused)",
                    path.display()
                ));
            }
            Ok((roots, certificates.clone()))
        }
        Trust::System => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                return Err(format!(
                    "tls_verify = true without tls_ca_file verifies with the system's CA \
                     certificates, and none could be read ({}): install ca-certificates, or \
                     give tls_ca_file",
                    if errors.is_empty() {
                        "none found".to_owned()
                    } else {
                        errors.join("; ")
                    }
                ));
            }
            Ok((roots, Vec::new()))
        }
    }
}

/// `tls_verify = false`: any certificate is accepted, but the handshake's signature is
/// still checked (the server holds the certificate's key).
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// `tls_verify = true`: webpki's verification, except that a certificate listed in
/// `tls_ca_file` is trusted as it is. webpki refuses a self-signed server certificate
/// made as a CA (`openssl req -x509` marks it so) even when it is its own anchor.
#[derive(Debug)]
struct Verified {
    webpki: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for Verified {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self
            .pinned
            .iter()
            .any(|c| c.as_ref() == end_entity.as_ref())
        {
            return Ok(ServerCertVerified::assertion());
        }
        self.webpki
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The TCP stream under TLS, keeping the first bytes the server sent: when they are
/// not TLS, a failed handshake quotes them (`220 mx.example ESMTP` from a plain port).
pub struct Recording {
    stream: TcpStream,
    first: Vec<u8>,
}

impl Recording {
    pub(super) fn new(stream: TcpStream) -> Recording {
        Recording {
            stream,
            first: Vec::new(),
        }
    }

    pub(super) fn into_inner(self) -> TcpStream {
        self.stream
    }

    pub(super) fn first_bytes(&self) -> &[u8] {
        &self.first
    }
}

impl AsyncRead for Recording {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        let room = FIRST_BYTES.saturating_sub(this.first.len());
        if room > 0 {
            let new = &buf.filled()[before..];
            this.first.extend_from_slice(&new[..new.len().min(room)]);
        }
        polled
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Why a handshake failed, from tokio-rustls's error and what the server sent first.
pub(super) fn handshake_failure(error: &io::Error, first: &[u8]) -> CheckFailure {
    if !first.is_empty() && !starts_like_tls(first) {
        let line = first.split(|&b| b == b'\n').next().unwrap_or_default();
        return CheckFailure::Tls(format!(
            "the server answered in clear text, not TLS: {:?} (does this port speak TLS from \
             the first byte? For a plain port use check = \"smtp\" or \"imap\")",
            quote(line)
        ));
    }
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(problem)) => CheckFailure::Tls(format!(
            "the server's certificate is not trusted (tls_verify = true): {}",
            certificate_problem(problem)
        )),
        Some(rustls::Error::AlertReceived(alert)) => CheckFailure::Tls(format!(
            "the server ended it with the alert {alert:?} (no protocol version or cipher in \
             common?)"
        )),
        Some(other) => CheckFailure::Tls(other.to_string()),
        None if error.kind() == io::ErrorKind::UnexpectedEof => {
            CheckFailure::Closed(Step::TlsHandshake)
        }
        None => CheckFailure::io(Step::TlsHandshake, error),
    }
}

/// A TLS record starts with its type (20 to 24) and the major version 3.
fn starts_like_tls(bytes: &[u8]) -> bool {
    (20..=24).contains(&bytes[0]) && bytes.get(1).is_none_or(|&major| major == 3)
}

/// What is wrong with the certificate, and what to do about it.
fn certificate_problem(problem: &CertificateError) -> String {
    match problem {
        CertificateError::UnknownIssuer => "its issuer is not a known CA: put the CA that signed \
             it in tls_ca_file (or, for a self-signed certificate, the certificate itself)"
            .to_owned(),
        CertificateError::BadSignature => "its signature does not verify with the certificate \
             of its issuer in tls_ca_file (a different CA of the same name?)"
            .to_owned(),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!(
                "{problem}: set tls_server_name to a name the certificate carries (in its \
                 subjectAltName)"
            )
        }
        CertificateError::Other(other)
            if other
                .0
                .downcast_ref::<webpki::Error>()
                .is_some_and(|e| matches!(e, webpki::Error::CaUsedAsEndEntity)) =>
        {
            "it is a CA certificate, not a server's (a self-signed one made with `openssl req \
             -x509`?): put it in tls_ca_file to trust it as it is"
                .to_owned()
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, path::PathBuf, time::Duration};

    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    use tokio::net::TcpListener;

    use super::*;
    use crate::health::{
        check::{CheckKind, CheckSpec, run_check},
        test_server::{Act, End, LONG, scripted, scripted_tls},
    };

    /// A certificate (DER) and its key (PKCS#8 DER).
    struct Identity {
        certificate: Vec<u8>,
        key: Vec<u8>,
    }

    /// A self-signed certificate for `names`; marked as a CA when `ca` (as `openssl req
    /// -x509` makes them).
    fn self_signed(names: &[&str], ca: bool) -> Identity {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if ca {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        let certificate = params.self_signed(&key).unwrap();
        Identity {
            certificate: certificate.der().to_vec(),
            key: key.serialize_der(),
        }
    }

    /// A CA named `ca`, and a server certificate for `names` that it signed.
    fn ca_and_server(ca: &str, names: &[&str]) -> (Identity, Identity) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, ca);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_certificate = ca_params.self_signed(&ca_key).unwrap();
        let ca = Identity {
            certificate: ca_certificate.der().to_vec(),
            key: ca_key.serialize_der(),
        };
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let server = Identity {
            certificate: params.signed_by(&key, &issuer).unwrap().der().to_vec(),
            key: key.serialize_der(),
        };
        (ca, server)
    }

    /// Verification against `ca_file` (as if read from tls_ca_file), for `server_name`.
    fn verified(ca_file: &[&Identity], server_name: Option<&str>) -> CheckTls {
        CheckTls {
            verify: Some(Trust::CaFile {
                path: PathBuf::from("/etc/kgate/test-ca.pem"),
                certificates: ca_file
                    .iter()
                    .map(|i| CertificateDer::from(i.certificate.clone()))
                    .collect(),
            }),
            server_name: server_name.map(|n| ServerName::try_from(n.to_owned()).unwrap()),
        }
    }

    fn spec(kind: CheckKind, address: SocketAddr, tls: &CheckTls) -> CheckSpec {
        CheckSpec {
            kind,
            address,
            proxy_local: true,
            timeout: LONG,
            helo_name: "kgate.test".to_owned(),
            tls: Some(Arc::new(TlsClient::new(tls))),
        }
    }

    fn smtp_dialogue() -> Vec<Act> {
        vec![
            Act::Send("220 mx.example ESMTP\r\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("250-mx.example\r\n250 PIPELINING\r\n"),
            Act::Expect(b"QUIT\r\n"),
            Act::Send("221 2.0.0 Bye\r\n"),
        ]
    }

    async fn smtps_against(server: Identity, tls: &CheckTls) -> (Result<(), CheckFailure>, End) {
        let (addr, handle) = scripted_tls(server.certificate, server.key, smtp_dialogue()).await;
        let result = run_check(&spec(CheckKind::Smtps, addr, tls)).await;
        let (rest, end) = handle.await.unwrap();
        assert_eq!(rest, Vec::<u8>::new());
        (result, end)
    }

    #[tokio::test]
    async fn smtps_speaks_smtp_inside_tls_and_closes_with_close_notify_then_fin() {
        let server = self_signed(&["mx.example"], true);
        let (result, end) = smtps_against(server, &CheckTls::default()).await;
        assert_eq!(result, Ok(()));
        assert_eq!(end, End::Fin);
    }

    #[tokio::test]
    async fn imaps_speaks_imap_inside_tls() {
        let server = self_signed(&["imap.example"], false);
        let (addr, handle) = scripted_tls(
            server.certificate,
            server.key,
            vec![
                Act::Send("* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n"),
                Act::Expect(b"a1 LOGOUT\r\n"),
                Act::Send("* BYE Logging out\r\na1 OK Logout completed.\r\n"),
            ],
        )
        .await;
        let result = run_check(&spec(CheckKind::Imaps, addr, &CheckTls::default())).await;
        assert_eq!(result, Ok(()));
        assert_eq!(handle.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn smtps_that_is_refused_still_quits_inside_tls() {
        let server = self_signed(&["mx.example"], false);
        let (addr, handle) = scripted_tls(
            server.certificate,
            server.key,
            vec![
                Act::Send("554 5.3.2 not now\r\n"),
                Act::Expect(b"QUIT\r\n"),
                Act::Send("221 2.0.0 Bye\r\n"),
            ],
        )
        .await;
        let failure = run_check(&spec(CheckKind::Smtps, addr, &CheckTls::default()))
            .await
            .unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad greeting: expected 220, got "554 5.3.2 not now""#
        );
        assert_eq!(handle.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn a_plain_server_on_a_tls_port_fails_naming_tls_and_quoting_it() {
        let (addr, handle) = scripted(vec![
            Act::Expect(crate::health::test_server::LOCAL),
            Act::Send("220 mx.example ESMTP Postfix\r\n"),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtps, addr, &CheckTls::default()))
            .await
            .unwrap_err();
        assert!(matches!(failure, CheckFailure::Tls(_)), "{failure:?}");
        assert!(
            failure.to_string().starts_with(
                r#"TLS handshake failed: the server answered in clear text, not TLS: "220 mx.example ESMTP Postfix" (does this port speak TLS"#
            ),
            "{failure}"
        );
        // The check's TLS hello was read as garbage; it still closes with a FIN.
        let (rest, end) = handle.await.unwrap();
        assert_eq!(rest.first(), Some(&22), "a TLS handshake record: {rest:?}");
        assert_eq!(end, End::Fin);
    }

    #[tokio::test]
    async fn a_handshake_that_never_ends_times_out_naming_tls() {
        // Connections complete in the backlog; nobody answers.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec = CheckSpec {
            timeout: Duration::from_millis(300),
            ..spec(
                CheckKind::Imaps,
                listener.local_addr().unwrap(),
                &CheckTls::default(),
            )
        };
        let failure = run_check(&spec).await.unwrap_err();
        assert_eq!(failure, CheckFailure::TimedOut(Step::TlsHandshake));
        assert_eq!(failure.to_string(), "timed out doing the TLS handshake");
    }

    #[tokio::test]
    async fn a_server_hanging_up_in_the_handshake_is_reported_with_the_step() {
        let (addr, _server) = scripted(vec![
            Act::Expect(crate::health::test_server::LOCAL),
            Act::Hangup,
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtps, addr, &CheckTls::default()))
            .await
            .unwrap_err();
        // A FIN, or a reset if the hello arrived after the server closed.
        assert!(
            failure
                .to_string()
                .ends_with("while doing the TLS handshake"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn with_verification_a_certificate_from_the_ca_file_for_the_server_name_passes() {
        let (ca, server) = ca_and_server("Lab CA", &["mx.example"]);
        let (result, end) = smtps_against(server, &verified(&[&ca], Some("mx.example"))).await;
        assert_eq!(result, Ok(()));
        assert_eq!(end, End::Fin);
    }

    #[tokio::test]
    async fn with_verification_an_unknown_issuer_fails_naming_the_certificate() {
        let (_, server) = ca_and_server("Lab CA", &["mx.example"]);
        let (other_ca, _) = ca_and_server("Other CA", &["other.example"]);
        let (result, end) =
            smtps_against(server, &verified(&[&other_ca], Some("mx.example"))).await;
        let failure = result.unwrap_err();
        assert_eq!(
            failure.to_string(),
            "TLS handshake failed: the server's certificate is not trusted (tls_verify = true): \
             its issuer is not a known CA: put the CA that signed it in tls_ca_file (or, for a \
             self-signed certificate, the certificate itself)"
        );
        // The check told the server why (an alert), and the server saw the handshake fail.
        assert_eq!(end, End::ServerClosed);
    }

    #[tokio::test]
    async fn with_verification_a_name_the_certificate_does_not_carry_fails() {
        let (ca, server) = ca_and_server("Lab CA", &["mx.example"]);
        // No tls_server_name: the address checked, 127.0.0.1.
        let (result, _) = smtps_against(server, &verified(&[&ca], None)).await;
        let failure = result.unwrap_err().to_string();
        assert!(
            failure.starts_with(
                "TLS handshake failed: the server's certificate is not trusted (tls_verify = \
                 true): certificate not valid for name \"127.0.0.1\""
            ) && failure.ends_with(
                "set tls_server_name to a name the certificate carries (in its subjectAltName)"
            ),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn with_verification_a_self_signed_certificate_passes_only_from_the_ca_file() {
        // As `openssl req -x509` makes it: a CA certificate used as the server's own.
        let server = self_signed(&["imap.example"], true);
        let same = Identity {
            certificate: server.certificate.clone(),
            key: Vec::new(),
        };
        let (result, _) = smtps_against(server, &verified(&[&same], None)).await;
        assert_eq!(result, Ok(()));

        let server = self_signed(&["imap.example"], true);
        let (other_ca, _) = ca_and_server("Other CA", &[]);
        let (result, _) = smtps_against(server, &verified(&[&other_ca], None)).await;
        assert_eq!(
            result.unwrap_err().to_string(),
            "TLS handshake failed: the server's certificate is not trusted (tls_verify = true): \
             it is a CA certificate, not a server's (a self-signed one made with `openssl req \
             -x509`?): put it in tls_ca_file to trust it as it is"
        );
    }

    #[test]
    fn tls_records_are_told_from_clear_text() {
        assert!(starts_like_tls(&[22, 3, 1]));
        assert!(starts_like_tls(&[21]));
        assert!(!starts_like_tls(b"220 mx"));
        assert!(!starts_like_tls(b"* OK"));
        assert!(!starts_like_tls(&[22, 2]));
    }
}
