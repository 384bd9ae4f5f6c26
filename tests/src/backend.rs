//! Peers behind the proxy: reading the PROXY protocol header exactly as a backend must,
//! a generic threaded TCP server, and a mock mail server for the demo and the tests.
//!
//! Servers stop without hanging: the accept loop polls a stop flag, and every accepted
//! connection is shut down (both ways) on stop, which ends any blocking read or write in
//! its handler; threads that still do not finish are left behind after a deadline.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::{self, NetNs};
use crate::proc;

/// The 12 bytes that open every PROXY protocol v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A v1 header is at most 107 bytes, CRLF included (proxy-protocol.txt, 2.1).
const V1_MAX_LEN: usize = 107;

/// One PROXY protocol header as a backend received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The header's bytes exactly as received (v2: signature to the last TLV byte;
    /// v1: `PROXY` to the CRLF).
    pub raw: Vec<u8>,
    /// 1 (text) or 2 (binary).
    pub version: u8,
    /// v2 `LOCAL` (a health check or the proxy's own connection): the addresses are to
    /// be ignored. Always false for v1, which has no commands (`UNKNOWN` shows as
    /// `source: None`).
    pub command_local: bool,
    /// The client's address, when the header carries a TCP/UDP over IPv4/IPv6 one.
    pub source: Option<SocketAddr>,
    /// The address the client connected to, likewise.
    pub destination: Option<SocketAddr>,
}

/// Reads one PROXY protocol header (v2 binary, or v1 text line) from `stream`, byte-exact
/// and nothing more: whatever the peer sent after the header is still unread. Parsing is
/// done by the `ppp` crate; this function only finds where the header ends.
///
/// Errors with `InvalidData` when the stream does not start with a valid header, and
/// with `UnexpectedEof` when it ends inside one. Timeouts are the caller's (set a read
/// timeout on the stream).
pub fn read_proxy_header<R: Read + ?Sized>(stream: &mut R) -> io::Result<ProxyHeader> {
    // 12 bytes decide: the v2 signature is 12 bytes long, and the shortest v1 header
    // ("PROXY UNKNOWN\r\n") is 15.
    let mut raw = vec![0; V2_SIGNATURE.len()];
    stream.read_exact(&mut raw)?;
    if raw == V2_SIGNATURE {
        read_v2_rest(stream, raw)
    } else if raw.starts_with(b"PROXY ") {
        read_v1_rest(stream, raw)
    } else {
        Err(invalid(format!(
            "not a PROXY protocol header: starts with {:?}",
            String::from_utf8_lossy(&raw)
        )))
    }
}

fn read_v2_rest<R: Read + ?Sized>(stream: &mut R, mut raw: Vec<u8>) -> io::Result<ProxyHeader> {
    // Version/command, family/protocol, then the length of what follows (big-endian).
    let mut fixed = [0; 4];
    stream.read_exact(&mut fixed)?;
    raw.extend_from_slice(&fixed);
    let len = usize::from(u16::from_be_bytes([fixed[2], fixed[3]]));
    let start = raw.len();
    raw.resize(start + len, 0);
    stream.read_exact(&mut raw[start..])?;

    let header = ppp::v2::Header::try_from(raw.as_slice())
        .map_err(|e| invalid(format!("bad PROXY v2 header {raw:02x?}: {e:?}")))?;
    let (source, destination) = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v2::Addresses::IPv6(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => (None, None),
    };
    let command_local = header.command == ppp::v2::Command::Local;
    Ok(ProxyHeader {
        raw,
        version: 2,
        command_local,
        source,
        destination,
    })
}

fn read_v1_rest<R: Read + ?Sized>(stream: &mut R, mut raw: Vec<u8>) -> io::Result<ProxyHeader> {
    // One byte at a time: reading ahead would swallow what follows the line.
    let mut byte = [0; 1];
    while !raw.ends_with(b"\r\n") {
        if raw.len() >= V1_MAX_LEN {
            return Err(invalid(format!(
                "PROXY v1 line longer than {V1_MAX_LEN} bytes: {:?}",
                String::from_utf8_lossy(&raw)
            )));
        }
        stream.read_exact(&mut byte)?;
        raw.push(byte[0]);
    }
    let text = std::str::from_utf8(&raw)
        .map_err(|_| invalid(format!("PROXY v1 line is not text: {raw:02x?}")))?;
    let header = ppp::v1::Header::try_from(text)
        .map_err(|e| invalid(format!("bad PROXY v1 line {text:?}: {e:?}")))?;
    let (source, destination) = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v1::Addresses::Tcp6(a) => (
            Some(SocketAddr::from((a.source_address, a.source_port))),
            Some(SocketAddr::from((
                a.destination_address,
                a.destination_port,
            ))),
        ),
        ppp::v1::Addresses::Unknown => (None, None),
    };
    Ok(ProxyHeader {
        raw,
        version: 1,
        command_local: false,
        source,
        destination,
    })
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// How long `Drop` waits for a server's threads before leaving them behind.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the accept loop sleeps in `poll` before it looks at the stop flag again.
const ACCEPT_POLL_MS: i32 = 20;

/// The connections a server is serving. The server keeps a second handle on each
/// socket so that `stop` can shut it down (which ends a handler blocked in a read); the
/// handle is dropped as soon as its handler returns, so that the connection closes
/// when the handler is done with it, as the handler would expect.
#[derive(Default)]
struct Conns {
    next_id: u64,
    streams: HashMap<u64, TcpStream>,
    threads: Vec<JoinHandle<()>>,
}

type SharedConns = Arc<Mutex<Conns>>;

fn lock(conns: &SharedConns) -> MutexGuard<'_, Conns> {
    conns.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drops the server's handle on a connection when its handler returns (or panics).
struct ForgetOnDrop {
    conns: SharedConns,
    id: u64,
}

impl Drop for ForgetOnDrop {
    fn drop(&mut self) {
        lock(&self.conns).streams.remove(&self.id);
    }
}

/// A TCP listener in a namespace that runs `handler(stream)` on a thread per accepted
/// connection (the thread is inside the namespace too) until stopped; Drop stops it.
pub struct TcpServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: SharedConns,
    acceptor: Option<JoinHandle<()>>,
}

/// The accept queue of a [`TcpServer`].
const LISTEN_BACKLOG: i32 = 4096;

impl TcpServer {
    /// Binds `listen` inside `ns` (listening before it returns; port 0 picks one, see
    /// [`TcpServer::local_addr`]) and starts accepting. Panics if it cannot bind.
    pub fn start<F>(ns: &NetNs, listen: SocketAddr, handler: F) -> TcpServer
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = ns
            .run(move || -> io::Result<TcpListener> {
                // A deep accept queue: a burst of connections (hundreds at once, on a
                // busy machine) must not lose SYNs, each sent again only a second later.
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(listen),
                    socket2::Type::STREAM,
                    None,
                )?;
                socket.set_reuse_address(true)?;
                socket.bind(&listen.into())?;
                socket.listen(LISTEN_BACKLOG)?;
                socket.set_nonblocking(true)?;
                Ok(socket.into())
            })
            .unwrap_or_else(|e| panic!("binding {listen} in namespace {}: {e}", ns.name()));
        let local_addr = listener
            .local_addr()
            .expect("local address of a bound listener");

        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns = SharedConns::default();
        let acceptor = {
            let acceptor = Acceptor {
                listener,
                // Opened now, so connection threads can still enter the namespace if
                // the lab's /run/netns entry goes away first.
                ns_file: ns.open(),
                ns_name: ns.name().to_owned(),
                stop: stop.clone(),
                accepted: accepted.clone(),
                conns: conns.clone(),
                handler: Arc::new(handler),
            };
            ns.spawn(move || acceptor.run())
        };
        TcpServer {
            local_addr,
            stop,
            accepted,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` connections were accepted. A client's `connect` returns
    /// before the server's `accept` does, so counts are only meaningful after waiting.
    pub fn wait_accepted(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.accepted() < n {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(proc::POLL);
        }
        true
    }

    /// Stops accepting, shuts down open connections and joins the threads (bounded).
    pub fn stop(self) {}

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            proc::join_bounded(vec![acceptor], STOP_TIMEOUT);
        }
        // The acceptor is gone: nothing adds to `conns` any more.
        let (streams, threads) = {
            let mut conns = lock(&self.conns);
            (
                std::mem::take(&mut conns.streams),
                std::mem::take(&mut conns.threads),
            )
        };
        for stream in streams.values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        // Dropped only after the shutdowns: the handlers' sockets are closed by them.
        drop(streams);
        let left = proc::join_bounded(threads, STOP_TIMEOUT);
        if left > 0 {
            eprintln!(
                "tcp server {}: {left} handler threads still running, left behind",
                self.local_addr
            );
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The accept loop's state, moved into its thread.
struct Acceptor {
    listener: TcpListener,
    ns_file: File,
    ns_name: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: SharedConns,
    handler: Arc<dyn Fn(TcpStream) + Send + Sync>,
}

impl Acceptor {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, bounded timeout.
            if unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) } <= 0 {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.accepted.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = self.serve(stream) {
                        eprintln!("tcp server in {}: {e}", self.ns_name);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // EMFILE and the like: say so, and try again after a pause.
                    eprintln!("tcp server in {}: accept: {e}", self.ns_name);
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS as u64));
                }
            }
        }
    }

    /// Starts the handler thread for one accepted connection.
    fn serve(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let handle = stream.try_clone()?;
        let ns = self.ns_file.try_clone()?;
        let mut conns = lock(&self.conns);
        let id = conns.next_id;
        conns.next_id += 1;
        conns.streams.insert(id, handle);
        let forget = ForgetOnDrop {
            conns: self.conns.clone(),
            id,
        };
        let handler = self.handler.clone();
        let thread = lab::spawn_in(ns, self.ns_name.clone(), move || {
            let _forget = forget;
            handler(stream);
        });
        // Forget finished threads, so a long benchmark does not pile them up.
        conns.threads.retain(|t| !t.is_finished());
        conns.threads.push(thread);
        Ok(())
    }
}

/// Backstop for a mail session's reads and writes; `stop` ends sessions sooner.
const MAIL_IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest command line the mock mail server reads (SMTP allows 512; be generous).
const MAIL_MAX_LINE: u64 = 4096;

/// A mock mail server for the demo and the tests. Per connection it reads the PROXY
/// header, sends `220 <name> ESMTP kgate-lab`, answers `EHLO`/`HELO` with
/// `250 <name> hello <client address from the header>`, `DATA` like a real server
/// (354, then the message up to the `.` line, then 250), `QUIT` with `221 bye` (and
/// closes), anything else with `250 ok`. It records every header it saw, before it
/// sends the greeting: a client that has read the greeting can rely on `headers()`.
pub struct MailBackend {
    server: TcpServer,
    headers: Arc<Mutex<Vec<ProxyHeader>>>,
}

impl MailBackend {
    /// Listens on `listen` in `ns` before it returns.
    pub fn start(ns: &NetNs, listen: SocketAddr, name: &str) -> MailBackend {
        let headers = Arc::new(Mutex::new(Vec::new()));
        let name = name.to_owned();
        let recorded = headers.clone();
        let server = TcpServer::start(ns, listen, move |stream| {
            if let Err(e) = serve_mail(stream, &name, &recorded) {
                // Expected when a client or the proxy hangs up mid-session.
                eprintln!("mail backend {name}: {e}");
            }
        });
        MailBackend { server, headers }
    }

    /// Every PROXY header received so far, in order of arrival.
    pub fn headers(&self) -> Vec<ProxyHeader> {
        self.headers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Connections accepted so far (health checks included).
    pub fn accepted(&self) -> usize {
        self.server.accepted()
    }

    /// Stops accepting and ends the sessions (bounded); Drop does the same.
    pub fn stop(self) {}
}

fn serve_mail(stream: TcpStream, name: &str, headers: &Mutex<Vec<ProxyHeader>>) -> io::Result<()> {
    stream.set_read_timeout(Some(MAIL_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(MAIL_IO_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    // Read straight from the socket: the header must not be read through the buffer
    // of a line reader (it is exactly what a real backend does, too).
    let header = read_proxy_header(reader.get_mut())?;
    let client: Option<IpAddr> = header
        .source
        .map(|a| a.ip())
        .or_else(|| reader.get_ref().peer_addr().ok().map(|a| a.ip()));
    let client = client.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    headers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(header);

    writer.write_all(format!("220 {name} ESMTP kgate-lab\r\n").as_bytes())?;
    let mut line = Vec::new();
    loop {
        if !read_line(&mut reader, &mut line)? {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let verb = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        let reply = match verb.as_str() {
            "EHLO" | "HELO" => format!("250 {name} hello {client}\r\n"),
            "QUIT" => {
                writer.write_all(b"221 bye\r\n")?;
                return Ok(());
            }
            "DATA" => {
                writer.write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")?;
                loop {
                    if !read_line(&mut reader, &mut line)? {
                        return Ok(());
                    }
                    if line == b".\r\n" || line == b".\n" {
                        break;
                    }
                }
                "250 ok queued\r\n".to_owned()
            }
            _ => "250 ok\r\n".to_owned(),
        };
        writer.write_all(reply.as_bytes())?;
    }
}

/// Reads one line (at most `MAIL_MAX_LINE` bytes) into `line`; false at end of stream.
fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<bool> {
    line.clear();
    let n = reader
        .by_ref()
        .take(MAIL_MAX_LINE)
        .read_until(b'\n', line)?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::{Lab, skip_without_root};
    use std::io::Cursor;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A v2 PROXY TCP header built by hand from proxy-protocol.txt section 2.2.
    fn v2_header(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x21); // version 2, command PROXY
        let mut addrs = Vec::new();
        match (source, destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                h.push(0x11); // AF_INET, STREAM
                addrs.extend_from_slice(&s.ip().octets());
                addrs.extend_from_slice(&d.ip().octets());
            }
            (SocketAddr::V6(s), SocketAddr::V6(d)) => {
                h.push(0x21); // AF_INET6, STREAM
                addrs.extend_from_slice(&s.ip().octets());
                addrs.extend_from_slice(&d.ip().octets());
            }
            _ => unreachable!("same family"),
        }
        addrs.extend_from_slice(&source.port().to_be_bytes());
        addrs.extend_from_slice(&destination.port().to_be_bytes());
        addrs.extend_from_slice(tlvs);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(&addrs);
        h
    }

    fn parse_leaving_rest(bytes: &[u8], rest: &[u8]) -> ProxyHeader {
        let mut input = Cursor::new([bytes, rest].concat());
        let header = read_proxy_header(&mut input).unwrap();
        let mut left = Vec::new();
        input.read_to_end(&mut left).unwrap();
        assert_eq!(left, rest, "bytes after the header must stay unread");
        header
    }

    #[test]
    fn v2_tcp4_header_is_read_exactly() {
        let src: SocketAddr = "192.0.2.7:56324".parse().unwrap();
        let dst: SocketAddr = "10.200.1.1:25".parse().unwrap();
        let bytes = v2_header(src, dst, &[]);
        assert_eq!(bytes.len(), 16 + 12);
        assert_eq!(&bytes[12..16], &[0x21, 0x11, 0x00, 0x0c]);
        let header = parse_leaving_rest(&bytes, b"EHLO x\r\n");
        assert_eq!(
            header,
            ProxyHeader {
                raw: bytes,
                version: 2,
                command_local: false,
                source: Some(src),
                destination: Some(dst),
            }
        );
    }

    #[test]
    fn v2_tcp6_header_with_tlvs_is_read_exactly() {
        let src: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let dst: SocketAddr = "[fd00:200:1::1]:993".parse().unwrap();
        // A NOOP TLV (type 0x04, length 3): part of the header, not of the payload.
        let bytes = v2_header(src, dst, &[0x04, 0x00, 0x03, 1, 2, 3]);
        assert_eq!(&bytes[12..16], &[0x21, 0x21, 0x00, 36 + 6]);
        let header = parse_leaving_rest(&bytes, &[0x16, 0x03, 0x01]);
        assert_eq!(header.raw, bytes);
        assert_eq!(header.version, 2);
        assert!(!header.command_local);
        assert_eq!(header.source, Some(src));
        assert_eq!(header.destination, Some(dst));
    }

    #[test]
    fn v2_local_header_has_no_addresses() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        let header = parse_leaving_rest(&bytes, b"");
        assert!(header.command_local);
        assert_eq!((header.source, header.destination), (None, None));
    }

    #[test]
    fn v1_lines_are_read_up_to_the_crlf() {
        let line = b"PROXY TCP4 192.0.2.7 10.200.1.1 56324 25\r\n";
        let header = parse_leaving_rest(line, b"EHLO x\r\n");
        assert_eq!(header.raw, line);
        assert_eq!(header.version, 1);
        assert!(!header.command_local);
        assert_eq!(header.source, Some("192.0.2.7:56324".parse().unwrap()));
        assert_eq!(header.destination, Some("10.200.1.1:25".parse().unwrap()));

        let line = b"PROXY TCP6 2001:db8::7 fd00:200:1::1 40000 993\r\n";
        let header = parse_leaving_rest(line, b"\x16\x03");
        assert_eq!(header.source, Some("[2001:db8::7]:40000".parse().unwrap()));
        assert_eq!(
            header.destination,
            Some("[fd00:200:1::1]:993".parse().unwrap())
        );

        let header = parse_leaving_rest(b"PROXY UNKNOWN\r\n", b"x");
        assert_eq!((header.version, header.source), (1, None));
    }

    #[test]
    fn garbage_and_truncated_headers_are_errors() {
        let kind = |bytes: &[u8]| {
            read_proxy_header(&mut Cursor::new(bytes.to_vec()))
                .unwrap_err()
                .kind()
        };
        assert_eq!(kind(b"EHLO example.org\r\n"), io::ErrorKind::InvalidData);
        assert_eq!(kind(&[b'x'; 200]), io::ErrorKind::InvalidData);
        let mut long_v1 = b"PROXY TCP4 ".to_vec();
        long_v1.extend_from_slice(&[b'1'; 200]);
        assert_eq!(kind(&long_v1), io::ErrorKind::InvalidData);
        let v2 = v2_header(
            "192.0.2.7:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
            &[],
        );
        assert_eq!(kind(&v2[..20]), io::ErrorKind::UnexpectedEof);
        assert_eq!(kind(b"PROXY TCP4 1.2.3.4"), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn headers_are_read_from_a_real_tcp_stream_leaving_the_payload() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let server = TcpServer::start(
            lab.backend(0),
            SocketAddr::new(lab.backend(0).v6().into(), 0),
            move |mut s| {
                s.set_read_timeout(Some(TIMEOUT)).unwrap();
                let header = read_proxy_header(&mut s);
                let mut payload = Vec::new();
                let rest = s.read_to_end(&mut payload).map(|_| payload);
                tx.lock()
                    .unwrap()
                    .send((header.unwrap(), rest.unwrap()))
                    .unwrap();
            },
        );
        let addr = server.local_addr();
        let src = SocketAddr::new(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).into(), 40000);
        let header = v2_header(src, addr, &[]);
        let sent = header.clone();
        // Header and payload in one write: one segment, so a reader that reads ahead loses.
        lab.gateway().run(move || {
            let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
            s.write_all(&[&sent[..], b"payload"].concat()).unwrap();
        });
        let (got, payload) = rx.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(got.raw, header);
        assert_eq!(got.source, Some(src));
        assert_eq!(payload, b"payload");
    }

    #[test]
    fn mail_backend_greets_with_the_client_address_from_the_header() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let listen = SocketAddr::new(lab.backend(0).v4().into(), 2525);
        let backend = MailBackend::start(lab.backend(0), listen, "mx0");
        let client: SocketAddr = (Ipv4Addr::new(192, 0, 2, 9), 51000).into();
        let header = v2_header(client, listen, &[]);
        let sent = header.clone();
        let transcript = lab.gateway().run(move || {
            let stream = TcpStream::connect_timeout(&listen, TIMEOUT).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut transcript = String::new();
            let mut expect_line = |transcript: &mut String| {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                transcript.push_str(&line);
            };
            writer.write_all(&sent).unwrap();
            expect_line(&mut transcript);
            for command in ["EHLO client.example\r\n", "MAIL FROM:<a@b>\r\n", "DATA\r\n"] {
                writer.write_all(command.as_bytes()).unwrap();
                expect_line(&mut transcript);
            }
            writer
                .write_all(b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
                .unwrap();
            expect_line(&mut transcript);
            expect_line(&mut transcript);
            let mut rest = String::new();
            reader.read_to_string(&mut rest).unwrap();
            transcript + &rest
        });
        assert_eq!(
            transcript,
            "220 mx0 ESMTP kgate-lab\r\n\
             250 mx0 hello 192.0.2.9\r\n\
             250 ok\r\n\
             354 end data with <CR><LF>.<CR><LF>\r\n\
             250 ok queued\r\n\
             221 bye\r\n"
        );
        let seen = backend.headers();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].raw, header);
        assert_eq!(seen[0].source, Some(client));
        assert_eq!(backend.accepted(), 1);
        backend.stop();
    }

    #[test]
    fn stopping_a_server_ends_sessions_that_are_blocked_in_a_read() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let listen = SocketAddr::new(lab.backend(0).v4().into(), 2526);
        let backend = MailBackend::start(lab.backend(0), listen, "mx0");
        // A client that connects and never sends its header: the session blocks.
        let idle = lab
            .gateway()
            .run(move || TcpStream::connect_timeout(&listen, TIMEOUT).unwrap());
        assert!(backend.server.wait_accepted(1, TIMEOUT));
        let started = Instant::now();
        backend.stop();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "stop took {:?}",
            started.elapsed()
        );
        drop(idle);
    }
}
