//! Receiving the PROXY header a trusted proxy sends before its client's bytes, on a
//! frontend with `accept_proxy` (HAProxy's `accept-proxy`): v1 (text) or v2 (binary),
//! parsed with `ppp`.
//!
//! Nothing past the header is read: kgate peeks at what has arrived and consumes only
//! bytes known to belong to the header, so the client's first bytes stay in the socket
//! for the data plane, exactly as if no header had been there. Every valid header is
//! at least [`SHORTEST`] bytes long, so that many are read at once; a v2 header then
//! says its own length; a v1 line is read up to its LF, at most [`V1_MAX`] bytes.
//!
//! Which addresses a header gives, as HAProxy does: a v2 PROXY command for TCP over
//! IPv4 or IPv6, or a v1 `TCP4`/`TCP6` line, gives the client's address and the
//! address it connected to; a v2 LOCAL command (the proxy's own health check), a v1
//! `UNKNOWN` line, or a v2 header of another family or protocol (UDP, a Unix socket)
//! keeps the connection's own addresses.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use ppp::{v1, v2};
use tokio::{io::AsyncReadExt, net::TcpStream, time::timeout};

use crate::config::AcceptProxy;

/// The 12 bytes that open a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version and command, family and protocol, length.
const V2_FIXED: usize = 16;
/// What a v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 line, CRLF included (the protocol's own limit).
const V1_MAX: usize = 107;
/// The shortest header of either version: `PROXY UNKNOWN\r\n`.
const SHORTEST: usize = 15;
/// The longest v2 header taken, TLVs included: HAProxy's buffer size. Real proxies
/// send far less (addresses, and a few TLVs such as a cloud's endpoint id).
pub const V2_MAX: usize = 16 * 1024;

/// The addresses a connection carries on from its PROXY header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The client, as the header names it (or the connection's peer).
    pub source: SocketAddr,
    /// Where the client connected to, as the header names it (or the frontend address).
    pub destination: SocketAddr,
    /// The header's bytes, read off the connection.
    pub header_length: u64,
}

/// (source, destination) from a header; `None`: keep the connection's own.
type Addresses = Option<(SocketAddr, SocketAddr)>;

/// Why a connection was closed before its header was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The peer is not in `trusted_sources`.
    Untrusted(IpAddr),
    /// The whole header did not arrive within `accept_proxy_timeout`.
    TimedOut { after: Duration, got: usize },
    /// The connection did not start with a PROXY header (or closed before sending one).
    Missing { began_with: Vec<u8> },
    /// The connection closed inside the header.
    Truncated { got: usize },
    /// Longer than a header may be.
    Oversized { length: usize, max: usize },
    /// A header `ppp` (or its TLV walk) refuses.
    Malformed(String),
}

impl Rejection {
    /// The label of the rejection's counter in the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Untrusted(_) => "untrusted",
            Rejection::TimedOut { .. } => "timeout",
            Rejection::Missing { .. } => "missing",
            Rejection::Truncated { .. } => "truncated",
            Rejection::Oversized { .. } => "oversized",
            Rejection::Malformed(_) => "malformed",
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Untrusted(ip) => {
                write!(f, "PROXY header refused: {ip} is not in trusted_sources")
            }
            Rejection::TimedOut { after, got: 0 } => write!(
                f,
                "PROXY header timed out: nothing received in {}",
                humantime::format_duration(*after)
            ),
            Rejection::TimedOut { after, got } => write!(
                f,
                "PROXY header timed out: {got} bytes received in {}, the header unfinished",
                humantime::format_duration(*after)
            ),
            Rejection::Missing { began_with } if began_with.is_empty() => {
                f.write_str("PROXY header missing: closed before sending one")
            }
            Rejection::Missing { began_with } => write!(
                f,
                "PROXY header missing: the connection began with {}",
                quoted(began_with)
            ),
            Rejection::Truncated { got } => {
                write!(f, "PROXY header truncated: closed after {got} bytes of it")
            }
            Rejection::Oversized { length, max } => write!(
                f,
                "PROXY header oversized: {length} bytes, over the {max} taken"
            ),
            Rejection::Malformed(why) => write!(f, "PROXY header malformed: {why}"),
        }
    }
}

/// Bytes in single quotes, quotes and unprintable ones escaped: safe inside the log
/// line's `end="..."`.
fn quoted(bytes: &[u8]) -> String {
    format!("'{}'", bytes.escape_ascii())
}

/// Connections closed before their header was taken, by reason, per frontend.
#[derive(Debug, Default)]
pub struct Rejections {
    untrusted: AtomicU64,
    timeout: AtomicU64,
    missing: AtomicU64,
    truncated: AtomicU64,
    oversized: AtomicU64,
    malformed: AtomicU64,
}

impl Rejections {
    pub fn count(&self, rejection: &Rejection) {
        self.counter(rejection.kind())
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Each reason's label and count, every reason listed.
    pub fn by_kind(&self) -> [(&'static str, u64); 6] {
        [
            "untrusted",
            "timeout",
            "missing",
            "truncated",
            "oversized",
            "malformed",
        ]
        .map(|kind| (kind, self.counter(kind).load(Ordering::Relaxed)))
    }

    fn counter(&self, kind: &str) -> &AtomicU64 {
        match kind {
            "untrusted" => &self.untrusted,
            "timeout" => &self.timeout,
            "missing" => &self.missing,
            "truncated" => &self.truncated,
            "oversized" => &self.oversized,
            _ => &self.malformed,
        }
    }
}

/// Takes the header off `client`, a connection from `peer` to the frontend address
/// `local`, when `peer` is trusted and the header is whole and valid within the
/// timeout. On an error the connection is to be closed.
pub async fn receive(
    client: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    settings: &AcceptProxy,
) -> Result<Received, Rejection> {
    if !settings.trusts(peer.ip()) {
        return Err(Rejection::Untrusted(peer.ip().to_canonical()));
    }
    let mut header = Vec::new();
    let read = timeout(settings.timeout, read_header(client, &mut header)).await;
    let addresses = match read {
        Err(_) => {
            return Err(Rejection::TimedOut {
                after: settings.timeout,
                got: header.len(),
            });
        }
        Ok(result) => result?,
    };
    let (source, destination) = addresses.unwrap_or((peer, local));
    Ok(Received {
        source,
        destination,
        header_length: header.len() as u64,
    })
}

/// Reads one whole header into `header` and parses it: the addresses it names, or
/// `None` when the connection's own are to be kept.
async fn read_header(client: &mut TcpStream, header: &mut Vec<u8>) -> Result<Addresses, Rejection> {
    // A client that talks first without a header is told apart at its first bytes,
    // not after the timeout.
    while header.len() < SHORTEST {
        take(client, header, SHORTEST).await?;
        if !could_be_header(header) {
            return Err(Rejection::Missing {
                began_with: header.clone(),
            });
        }
    }
    if header.starts_with(&V2_SIGNATURE[..]) {
        take_all(client, header, V2_FIXED).await?;
        let length = V2_FIXED + usize::from(u16::from_be_bytes([header[14], header[15]]));
        if length > V2_MAX {
            return Err(Rejection::Oversized {
                length,
                max: V2_MAX,
            });
        }
        take_all(client, header, length).await?;
        parse_v2(header)
    } else {
        take_line(client, header).await?;
        parse_v1(header)
    }
}

/// Whether `bytes` start a v2 header or a v1 line, or are the start of either.
fn could_be_header(bytes: &[u8]) -> bool {
    [&V2_SIGNATURE[..], V1_PREFIX].iter().any(|opening| {
        let n = bytes.len().min(opening.len());
        bytes[..n] == opening[..n]
    })
}

/// Reads until `header` holds `length` bytes; they are known to be header bytes.
async fn take_all(
    client: &mut TcpStream,
    header: &mut Vec<u8>,
    length: usize,
) -> Result<(), Rejection> {
    while header.len() < length {
        take(client, header, length).await?;
    }
    Ok(())
}

/// One read of at most `length - header.len()` bytes onto `header`. Cancel safe:
/// `header` only grows by what was read.
async fn take(
    client: &mut TcpStream,
    header: &mut Vec<u8>,
    length: usize,
) -> Result<(), Rejection> {
    let mut buf = vec![0u8; length.saturating_sub(header.len())];
    match client.read(&mut buf).await {
        Ok(n) if n > 0 => {
            header.extend_from_slice(&buf[..n]);
            Ok(())
        }
        _ => Err(closed_inside(header)),
    }
}

/// Reads the rest of a v1 line, through its LF and not a byte further: peeks at what
/// has arrived, and consumes it up to the LF (or all of it when there is none yet, so
/// that the next peek waits for more).
async fn take_line(client: &mut TcpStream, header: &mut Vec<u8>) -> Result<(), Rejection> {
    let mut peeked = [0u8; V1_MAX];
    while !header.ends_with(b"\n") {
        if header.len() >= V1_MAX {
            return Err(Rejection::Oversized {
                length: header.len(),
                max: V1_MAX,
            });
        }
        let room = V1_MAX - header.len();
        let n = match client.peek(&mut peeked[..room]).await {
            Ok(0) | Err(_) => return Err(closed_inside(header)),
            Ok(n) => n,
        };
        let line = peeked[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |lf| lf + 1);
        take_all(client, header, header.len() + line).await?;
    }
    Ok(())
}

fn closed_inside(header: &[u8]) -> Rejection {
    if header.is_empty() {
        Rejection::Missing { began_with: vec![] }
    } else {
        Rejection::Truncated { got: header.len() }
    }
}

/// `ppp`'s reason, without its full stop, and the v1 line it is about.
fn malformed(error: &dyn fmt::Display, line: Option<&[u8]>) -> Rejection {
    let reason = error.to_string();
    let reason = reason.trim_end_matches('.');
    Rejection::Malformed(match line {
        Some(line) => format!("{reason} (in {})", quoted(line)),
        None => reason.to_owned(),
    })
}

fn parse_v2(header: &[u8]) -> Result<Addresses, Rejection> {
    let parsed = v2::Header::try_from(header).map_err(|e| malformed(&e, None))?;
    // A TLV whose length runs past the header is as bad as a wrong length field.
    if let Some(Err(e)) = parsed.tlvs().find(Result::is_err) {
        return Err(malformed(&e, None));
    }
    if parsed.command == v2::Command::Local || parsed.protocol != v2::Protocol::Stream {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        v2::Addresses::IPv4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v2::Addresses::IPv6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

fn parse_v1(header: &[u8]) -> Result<Addresses, Rejection> {
    let parsed = v1::Header::try_from(header).map_err(|e| malformed(&e, Some(header)))?;
    Ok(match parsed.addresses {
        v1::Addresses::Tcp4(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v1::Addresses::Tcp6(a) => Some((
            (a.source_address, a.source_port).into(),
            (a.destination_address, a.destination_port).into(),
        )),
        v1::Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::AsyncWriteExt,
        net::TcpListener,
        time::{sleep, timeout},
    };

    use super::*;

    const PAYLOAD: &[u8] = b"EHLO client.example\r\n";

    fn settings(trusted: &str, wait: Duration) -> AcceptProxy {
        AcceptProxy {
            trusted_sources: vec![trusted.parse().unwrap()],
            timeout: wait,
        }
    }

    fn v2(command: u8, family_protocol: u8, body: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([command, family_protocol]);
        header.extend((body.len() as u16).to_be_bytes());
        header.extend(body);
        header
    }

    fn v2_ipv4_body() -> Vec<u8> {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1];
        body.extend(40000u16.to_be_bytes());
        body.extend(25u16.to_be_bytes());
        body
    }

    /// The client writes each of `pieces` (after a short pause, so they arrive apart),
    /// then keeps its side open unless `close`; kgate's side receives the header.
    /// Returns the result and what was left unread after it (up to the client's end or
    /// one second of quiet).
    async fn exchange(
        pieces: Vec<Vec<u8>>,
        close: bool,
        settings: AcceptProxy,
    ) -> (Result<Received, Rejection>, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(address).await.unwrap();
            for piece in pieces {
                stream.write_all(&piece).await.unwrap();
                sleep(Duration::from_millis(30)).await;
            }
            if close {
                stream.shutdown().await.unwrap();
            }
            // Held open until the server side is done.
            sleep(Duration::from_secs(3)).await;
        });
        let (mut server, peer) = listener.accept().await.unwrap();
        let local = server.local_addr().unwrap();
        let result = receive(&mut server, peer, local, &settings).await;
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) = timeout(Duration::from_millis(300), server.read(&mut buf)).await {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
        client.abort();
        (result, rest)
    }

    fn trusted() -> AcceptProxy {
        settings("127.0.0.0/8", Duration::from_secs(5))
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn a_v2_header_gives_its_addresses_and_leaves_the_clients_bytes() {
        let mut first = v2(0x21, 0x11, &v2_ipv4_body());
        first.extend(PAYLOAD);
        let (result, rest) = exchange(vec![first], true, trusted()).await;
        assert_eq!(
            result.unwrap(),
            Received {
                source: addr("192.0.2.7:40000"),
                destination: addr("198.51.100.1:25"),
                header_length: 28,
            }
        );
        assert_eq!(rest, PAYLOAD);
    }

    #[tokio::test]
    async fn a_v2_ipv6_header_with_tlvs_arriving_in_pieces_is_taken_whole() {
        let mut body = Vec::new();
        body.extend(
            "2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend(
            "2001:db8:1::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend(40000u16.to_be_bytes());
        body.extend(993u16.to_be_bytes());
        // PP2_TYPE_AUTHORITY "mail.example", then PP2_TYPE_NOOP with 3 bytes.
        body.extend([0x02, 0, 12]);
        body.extend(b"mail.example");
        body.extend([0x04, 0, 3, 0, 0, 0]);
        let header = v2(0x21, 0x21, &body);
        let pieces = vec![
            header[..5].to_vec(),
            header[5..20].to_vec(),
            [&header[20..], PAYLOAD].concat(),
        ];
        let (result, rest) = exchange(pieces, true, trusted()).await;
        assert_eq!(
            result.unwrap(),
            Received {
                source: addr("[2001:db8::7]:40000"),
                destination: addr("[2001:db8:1::1]:993"),
                header_length: header.len() as u64,
            }
        );
        assert_eq!(rest, PAYLOAD);
    }

    #[tokio::test]
    async fn v1_lines_give_their_addresses_even_split_and_followed_by_data() {
        let line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n";
        let pieces = vec![
            line[..17].to_vec(),
            line[17..30].to_vec(),
            [&line[30..], PAYLOAD].concat(),
        ];
        let (result, rest) = exchange(pieces, true, trusted()).await;
        assert_eq!(
            result.unwrap(),
            Received {
                source: addr("192.0.2.7:40000"),
                destination: addr("198.51.100.1:25"),
                header_length: line.len() as u64,
            }
        );
        assert_eq!(rest, PAYLOAD);

        let line = b"PROXY TCP6 2001:db8::7 2001:db8:1::1 40000 993\r\n";
        let (result, rest) = exchange(vec![[&line[..], PAYLOAD].concat()], true, trusted()).await;
        assert_eq!(result.unwrap().source, addr("[2001:db8::7]:40000"));
        assert_eq!(rest, PAYLOAD);
    }

    #[tokio::test]
    async fn local_unknown_and_non_tcp_headers_keep_the_connections_own_addresses() {
        for header in [
            v2(0x20, 0x00, &[]),
            v2(0x21, 0x12, &v2_ipv4_body()),
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN 192.0.2.7 198.51.100.1 40000 25\r\n".to_vec(),
        ] {
            let (result, rest) =
                exchange(vec![[&header[..], PAYLOAD].concat()], true, trusted()).await;
            let received = result.unwrap_or_else(|e| panic!("{header:02x?}: {e}"));
            assert!(received.source.ip().is_loopback(), "{received:?}");
            assert_eq!(received.destination.ip(), addr("127.0.0.1:1").ip());
            assert_eq!(rest, PAYLOAD);
        }
    }

    #[tokio::test]
    async fn a_peer_outside_trusted_sources_is_refused_before_anything_is_read() {
        let mut first = v2(0x21, 0x11, &v2_ipv4_body());
        first.extend(PAYLOAD);
        let (result, _) = exchange(
            vec![first],
            true,
            settings("10.0.0.0/8", Duration::from_secs(5)),
        )
        .await;
        let rejection = result.unwrap_err();
        assert_eq!(rejection, Rejection::Untrusted(addr("127.0.0.1:1").ip()));
        assert_eq!(
            rejection.to_string(),
            "PROXY header refused: 127.0.0.1 is not in trusted_sources"
        );
    }

    #[tokio::test]
    async fn a_client_talking_first_is_refused_at_once_not_after_the_timeout() {
        let started = Instant::now();
        let (result, _) = exchange(
            vec![b"EHLO x\r\n".to_vec()],
            false,
            settings("127.0.0.0/8", Duration::from_secs(20)),
        )
        .await;
        let rejection = result.unwrap_err();
        assert_eq!(
            rejection.to_string(),
            "PROXY header missing: the connection began with 'EHLO x\\r\\n'"
        );
        assert_eq!(rejection.kind(), "missing");
        assert!(started.elapsed() < Duration::from_secs(5));

        let (result, _) = exchange(vec![], true, trusted()).await;
        assert_eq!(
            result.unwrap_err().to_string(),
            "PROXY header missing: closed before sending one"
        );
    }

    #[tokio::test]
    async fn a_header_that_stops_coming_times_out_and_one_cut_short_is_truncated() {
        let header = v2(0x21, 0x11, &v2_ipv4_body());
        let wait = Duration::from_millis(300);
        let (result, _) = exchange(
            vec![header[..5].to_vec()],
            false,
            settings("127.0.0.0/8", wait),
        )
        .await;
        assert_eq!(
            result.unwrap_err(),
            Rejection::TimedOut {
                after: wait,
                got: 5
            }
        );

        // The length field says 100 bytes follow; 12 do, and the client waits.
        let mut lying = v2(0x21, 0x11, &v2_ipv4_body());
        lying[14..16].copy_from_slice(&100u16.to_be_bytes());
        let (result, _) = exchange(vec![lying.clone()], false, settings("127.0.0.0/8", wait)).await;
        assert_eq!(result.unwrap_err().kind(), "timeout");

        // ... and closes.
        let (result, _) = exchange(vec![lying], true, trusted()).await;
        let rejection = result.unwrap_err();
        assert_eq!(rejection, Rejection::Truncated { got: 28 });
        assert_eq!(
            rejection.to_string(),
            "PROXY header truncated: closed after 28 bytes of it"
        );

        let line = b"PROXY TCP4 192.0.2.7 198.51";
        let (result, _) = exchange(vec![line.to_vec()], true, trusted()).await;
        assert_eq!(
            result.unwrap_err(),
            Rejection::Truncated { got: line.len() }
        );
    }

    #[tokio::test]
    async fn headers_that_lie_or_are_garbage_are_malformed() {
        // The length field says 4 bytes: too few for IPv4 addresses.
        let mut short = v2(0x21, 0x11, &v2_ipv4_body()[..4]);
        short.extend(PAYLOAD);
        // A TLV whose length runs past the header.
        let mut body = v2_ipv4_body();
        body.extend([0x02, 0, 40, b'x']);
        let bad_tlv = v2(0x21, 0x11, &body);
        // Version 3.
        let bad_version = v2(0x31, 0x11, &v2_ipv4_body());
        for (header, why) in [
            (short, "cannot store the 12 bytes"),
            (bad_tlv, "TLV"),
            (bad_version, "version"),
            (
                b"PROXY TCP4 garbage 198.51.100.1 40000 25\r\n".to_vec(),
                "source",
            ),
            (
                b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\n".to_vec(),
                "'",
            ),
            (b"PROXY HTTP/1.1\r\n".to_vec(), "protocol"),
        ] {
            let (result, _) = exchange(vec![header.clone()], false, trusted()).await;
            let rejection = result.unwrap_err();
            assert_eq!(rejection.kind(), "malformed", "{header:02x?}: {rejection}");
            let text = rejection.to_string();
            assert!(text.starts_with("PROXY header malformed: "), "{text}");
            assert!(text.contains(why), "{text} should say {why}");
        }
    }

    #[tokio::test]
    async fn oversized_headers_are_refused_without_reading_them() {
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend([0x21, 0x11, 0xff, 0xff]);
        let (result, _) = exchange(vec![huge], false, trusted()).await;
        assert_eq!(
            result.unwrap_err(),
            Rejection::Oversized {
                length: 16 + 0xffff,
                max: V2_MAX
            }
        );

        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        let (result, _) = exchange(vec![long], false, trusted()).await;
        let rejection = result.unwrap_err();
        assert_eq!(
            rejection,
            Rejection::Oversized {
                length: V1_MAX,
                max: V1_MAX
            }
        );
        assert_eq!(
            rejection.to_string(),
            "PROXY header oversized: 107 bytes, over the 107 taken"
        );
    }

    #[test]
    fn rejections_are_counted_by_kind() {
        let rejections = Rejections::default();
        rejections.count(&Rejection::Untrusted(addr("10.0.0.1:1").ip()));
        rejections.count(&Rejection::Truncated { got: 3 });
        rejections.count(&Rejection::Truncated { got: 4 });
        let counts: Vec<_> = rejections
            .by_kind()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .collect();
        assert_eq!(counts, [("untrusted", 1), ("truncated", 2)]);
    }
}
