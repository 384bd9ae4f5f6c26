//! Scripted servers for the checks' unit tests: plain TCP, or TLS after the PROXY
//! header, each accepting one connection on 127.0.0.1 and playing a script.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpListener,
    task::JoinHandle,
    time::timeout,
};
use tokio_rustls::TlsAcceptor;

/// A PROXY v2 header with the LOCAL command and no addresses.
pub const LOCAL: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";
pub const LONG: Duration = Duration::from_secs(5);

/// One step of a scripted server.
pub enum Act {
    /// Write these bytes.
    Send(&'static str),
    /// Read exactly these bytes and fail unless they match.
    Expect(&'static [u8]),
    /// Wait this long, and fail if the client sends anything meanwhile.
    Silence(Duration),
    /// Close (FIN) at once, leaving whatever the client sends unread.
    Hangup,
}

/// How the client ended the connection, as the server saw it.
#[derive(Debug, PartialEq)]
pub enum End {
    /// A clean close: read returned 0 (over TLS: after the client's `close_notify`).
    Fin,
    /// Over TLS: the TCP connection ended without a `close_notify`.
    FinWithoutCloseNotify,
    Reset,
    /// Neither within 5 s.
    StillOpen,
    /// The script hung up first.
    ServerClosed,
}

/// A server on 127.0.0.1 that accepts one connection and plays `script`. Its handle
/// gives the bytes received beyond the script's expectations, and how the client
/// closed. A failed expectation panics in the handle (awaited by the test).
pub async fn scripted(script: Vec<Act>) -> (SocketAddr, JoinHandle<(Vec<u8>, End)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        play(stream, script).await
    });
    (addr, handle)
}

/// Like [`scripted`], over TLS with `certificate` (and its `key`, PKCS#8 DER): the
/// server reads a LOCAL header, does the handshake, then plays `script` inside TLS.
pub async fn scripted_tls(
    certificate: Vec<u8>,
    key: Vec<u8>,
    script: Vec<Act>,
) -> (SocketAddr, JoinHandle<(Vec<u8>, End)>) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![certificate.into()],
        rustls_pki_types::PrivatePkcs8KeyDer::from(key).into(),
    )
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        expect(&mut stream, LOCAL).await;
        match timeout(LONG, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => play(tls, script).await,
            // The client refused the handshake (a certificate it does not trust).
            Ok(Err(_)) => (Vec::new(), End::ServerClosed),
            Err(_) => panic!("no TLS handshake within {LONG:?}"),
        }
    });
    (addr, handle)
}

async fn play<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    script: Vec<Act>,
) -> (Vec<u8>, End) {
    for act in script {
        match act {
            Act::Send(text) => {
                stream.write_all(text.as_bytes()).await.unwrap();
                stream.flush().await.unwrap();
            }
            Act::Expect(bytes) => expect(&mut stream, bytes).await,
            Act::Silence(pause) => {
                let mut byte = [0; 1];
                match timeout(pause, stream.read(&mut byte)).await {
                    Err(_) => {}
                    // The client gave up (its timeout) and closed.
                    Ok(Ok(0)) => return (Vec::new(), End::Fin),
                    Ok(read) => panic!("the client talked early: {read:?} {byte:?}"),
                }
            }
            Act::Hangup => return (Vec::new(), End::ServerClosed),
        }
    }
    read_to_end(&mut stream).await
}

async fn expect<S: AsyncRead + Unpin>(stream: &mut S, bytes: &[u8]) {
    let mut got = vec![0; bytes.len()];
    timeout(LONG, stream.read_exact(&mut got))
        .await
        .expect("the client did not send what was expected in time")
        .unwrap_or_else(|e| panic!("reading {:?}: {e}", String::from_utf8_lossy(bytes)));
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(bytes),
    );
}

async fn read_to_end<S: AsyncRead + Unpin>(stream: &mut S) -> (Vec<u8>, End) {
    let mut rest = Vec::new();
    let mut buf = [0; 1024];
    loop {
        match timeout(LONG, stream.read(&mut buf)).await {
            Err(_) => return (rest, End::StillOpen),
            Ok(Ok(0)) => return (rest, End::Fin),
            Ok(Ok(n)) => rest.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                return (rest, End::Reset);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return (rest, End::FinWithoutCloseNotify);
            }
            Ok(Err(e)) => panic!("server read: {e}"),
        }
    }
}
