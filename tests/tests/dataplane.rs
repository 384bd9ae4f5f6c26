//! The spliced PROXY v2 data path, end to end: a client namespace, kgate in the
//! gateway namespace, backend servers in their own namespaces. Every case runs once
//! per data plane (`sockmap::...` and `userspace::...`) and ends by checking that
//! kgate holds no more file descriptors than when it started and, for sockmap, that
//! both sock hashes are empty.
//!
//! Needs root (network namespaces, eBPF); without it each test prints why it skips.

use std::{
    hash::Hasher,
    io::{self, ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tests::{
    backend::{TcpServer, read_proxy_header},
    on_every_dataplane,
    rawtcp::RawTcp,
    rig::{
        IO_TIMEOUT, Rig, Rng, connect, move_bulk_both_ways, receive_all, send_random, set_timeouts,
        socket_reset,
    },
};

on_every_dataplane!(
    header_carries_the_client_address_byte_exact,
    server_speaks_first_on_a_thousand_connections,
    client_speaks_first_on_a_thousand_connections,
    sixteen_parallel_connections_move_64_mib_each_way_intact,
    a_partly_repeated_segment_reaches_the_backend_once,
    half_close_delivers_every_byte_before_the_fin_to_a_slow_reader,
    a_reset_from_either_side_resets_the_other,
    a_reset_reaches_the_other_side_while_it_holds_its_reads,
    status_counts_the_bytes_of_open_connections,
    a_server_that_answers_and_closes_at_once_is_carried_intact,
    a_copied_connection_that_waits_holds_no_copy_buffer,
);

/// The PROXY v2 header for a TCP connection from `source` to `destination`, built
/// from the specification (section 2.2), independently of kgate's builder.
fn expected_v2_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.push(0x21); // version 2, PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.push(0x11); // TCP over IPv4
            header.extend(12u16.to_be_bytes());
            header.extend(s.octets());
            header.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            header.push(0x21); // TCP over IPv6
            header.extend(36u16.to_be_bytes());
            header.extend(s.octets());
            header.extend(d.octets());
        }
        _ => panic!("mixed address families"),
    }
    header.extend(source.port().to_be_bytes());
    header.extend(destination.port().to_be_bytes());
    header
}

fn header_carries_the_client_address_byte_exact(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let seen = seen.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            let header = read_proxy_header(&mut s).expect("a PROXY header");
            seen.lock().unwrap().push(header.raw);
            s.write_all(b"220 ok\r\n").unwrap();
            // Closing only after the client does keeps the connection spliceable: a
            // socket that already has its FIN cannot join a sock hash (it is copied).
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        })
    };

    for frontend in [rig.frontend_v4(), rig.frontend_v6()] {
        let client_addr = rig.lab.client().run(move || {
            let mut c = connect(frontend);
            let mut banner = [0u8; 8];
            c.read_exact(&mut banner).unwrap();
            assert_eq!(&banner, b"220 ok\r\n");
            c.local_addr().unwrap()
        });
        assert_eq!(
            client_addr.ip(),
            match frontend.ip() {
                IpAddr::V4(_) => IpAddr::V4(rig.lab.client().v4()),
                IpAddr::V6(_) => IpAddr::V6(rig.lab.client().v6()),
            }
        );
        let raw = seen
            .lock()
            .unwrap()
            .pop()
            .expect("the backend got a connection");
        assert_eq!(
            raw,
            expected_v2_header(client_addr, frontend),
            "for {frontend}"
        );
    }
    assert_eq!(server.accepted(), 2);
    let lines = rig.connection_lines(2);
    rig.assert_paths(&lines);
    rig.assert_clean();
}

const CONNECTIONS: usize = 1000;
const CLIENT_THREADS: usize = 8;

/// Runs `CONNECTIONS` client sessions from the client namespace, `CLIENT_THREADS` at a time.
fn run_sessions(rig: &Rig, session: fn(SocketAddr, usize)) {
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        thread::scope(|scope| {
            for t in 0..CLIENT_THREADS {
                scope.spawn(move || {
                    for id in (t..CONNECTIONS).step_by(CLIENT_THREADS) {
                        session(frontend, id);
                    }
                });
            }
        });
    });
}

/// The bytes a session sends: unique per connection and direction.
fn session_payload(id: usize, direction: &str, len: usize) -> Vec<u8> {
    let mut data = format!("{direction} of session {id}: ").into_bytes();
    let mut rng = Rng(id as u64 + 1);
    while data.len() < len {
        data.extend(rng.next_u64().to_le_bytes());
    }
    data.truncate(len);
    data
}

fn session_id(first_bytes: &[u8]) -> usize {
    let text = String::from_utf8_lossy(first_bytes);
    let after = text.split("session ").nth(1).expect("a session id");
    after
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric session id")
}

/// Reads exactly `expected`, closes the client's side, and expects the server to
/// close with nothing more.
fn expect_reply_then_eof(c: &mut std::net::TcpStream, expected: &[u8], id: usize) {
    let mut reply = vec![0u8; expected.len()];
    c.read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("session {id}: no reply: {e}"));
    assert_eq!(reply, expected, "session {id}");
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "session {id}: bytes after the reply");
}

const BANNER_LEN: usize = 300;
const REQUEST_LEN: usize = 700;

fn server_speaks_first_on_a_thousand_connections(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    // The server sends its banner the instant the header is in, then waits for the
    // client's answer, as an SMTP server does; the client reads the banner first.
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let port = s.peer_addr().unwrap().port();
        // The banner names the gateway's source port; the client answers with it.
        let mut banner = format!("220 {port:05} ").into_bytes();
        banner.resize(BANNER_LEN, b'.');
        s.write_all(&banner).unwrap();
        let mut answer = vec![0u8; REQUEST_LEN];
        s.read_exact(&mut answer).expect("the client's answer");
        let id = session_id(&answer);
        assert_eq!(answer, session_payload(id, "client", REQUEST_LEN));
        s.write_all(&session_payload(id, "server", REQUEST_LEN))
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the answer: {rest:?}");
    });
    run_sessions(&rig, |frontend, id| {
        let mut c = connect(frontend);
        let mut banner = vec![0u8; BANNER_LEN];
        c.read_exact(&mut banner)
            .unwrap_or_else(|e| panic!("session {id}: no banner: {e}"));
        assert!(banner.starts_with(b"220 "), "session {id}: {banner:?}");
        c.write_all(&session_payload(id, "client", REQUEST_LEN))
            .unwrap();
        expect_reply_then_eof(&mut c, &session_payload(id, "server", REQUEST_LEN), id);
    });
    let lines = rig.connection_lines(CONNECTIONS);
    rig.assert_paths(&lines);
    rig.assert_clean();
}

fn client_speaks_first_on_a_thousand_connections(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    // The client sends before kgate has even accepted, as a TLS ClientHello is; the
    // server says nothing until it has the whole request.
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let mut request = vec![0u8; REQUEST_LEN];
        s.read_exact(&mut request).expect("the client's request");
        let id = session_id(&request);
        assert_eq!(request, session_payload(id, "client", REQUEST_LEN));
        s.write_all(&session_payload(id, "server", BANNER_LEN))
            .unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "bytes after the request: {rest:?}");
    });
    run_sessions(&rig, |frontend, id| {
        let mut c = connect(frontend);
        c.write_all(&session_payload(id, "client", REQUEST_LEN))
            .unwrap();
        expect_reply_then_eof(&mut c, &session_payload(id, "server", BANNER_LEN), id);
    });
    let lines = rig.connection_lines(CONNECTIONS);
    rig.assert_paths(&lines);
    rig.assert_clean();
}

const BULK_STREAMS: usize = 16;
const BULK_BYTES: usize = 64 << 20;

fn sixteen_parallel_connections_move_64_mib_each_way_intact(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    move_bulk_both_ways(&rig, BULK_STREAMS, BULK_BYTES);
    rig.assert_clean();
}

/// Stream bytes in the first segment, then where the second one starts (inside the
/// first) and ends: 300 bytes arrive twice, as after a retransmission that overlaps.
const FIRST_SEGMENT_END: usize = 600;
const REPEAT_FROM: usize = 300;
const SECOND_SEGMENT_END: usize = 1200;

/// TCP queues a segment that partly repeats bytes it already has without cutting the
/// repeat off (real networks make such segments after loss and reordering); reading
/// skips it, but the kernel hands a stream verdict program whole skbs. The backend
/// must still get every byte once: on the sockmap plane the eBPF program cuts the
/// repeat off, and kgate's log says so.
fn a_partly_repeated_segment_reaches_the_backend_once(dataplane: &'static str) {
    let mut rig = Rig::start(dataplane, 1);
    let (header_read, header_was_read) = mpsc::channel();
    let (received, backend_got) = mpsc::channel();
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let _ = header_read.send(());
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .expect("reading to the client's FIN");
        let _ = received.send(got);
    });
    let (joined, client_may_send) = mpsc::channel();
    let data = session_payload(7, "client", SECOND_SEGMENT_END);
    let local = SocketAddrV4::new(rig.lab.client().v4(), RAW_CLIENT_PORT);
    let remote = SocketAddrV4::new(rig.lab.gateway().v4(), rig.frontend_v4().port());
    let sent = data.clone();
    thread::scope(|scope| {
        scope.spawn(|| {
            rig.wait_spliced(2);
            let _ = joined.send(());
        });
        rig.lab.client().run(move || -> anyhow::Result<()> {
            let mut tcp = RawTcp::connect(local, remote)?;
            header_was_read.recv_timeout(IO_TIMEOUT)?;
            // Both sockets are spliced before the first byte: the segments must reach
            // the verdict program, and a client done before kgate joins it would be
            // refused the splice (its socket has the FIN).
            client_may_send.recv_timeout(IO_TIMEOUT)?;
            tcp.send_at(0, &sent[..FIRST_SEGMENT_END])?;
            tcp.wait_acked(FIRST_SEGMENT_END as u32)?;
            tcp.send_at(REPEAT_FROM as u32, &sent[REPEAT_FROM..SECOND_SEGMENT_END])?;
            tcp.wait_acked(SECOND_SEGMENT_END as u32)?;
            tcp.close_after(SECOND_SEGMENT_END as u32)
        })
    })
    .expect("the hand-made client's session");
    let got = backend_got
        .recv_timeout(IO_TIMEOUT)
        .expect("the backend's bytes");
    assert_eq!(
        got.len(),
        SECOND_SEGMENT_END,
        "the backend got {} bytes for {SECOND_SEGMENT_END} sent",
        got.len()
    );
    assert!(got == data, "the backend got other bytes than were sent");
    let lines = rig.connection_lines(1);
    rig.assert_paths(&lines);
    assert!(
        lines[0].contains(&format!("bytes_in={SECOND_SEGMENT_END} ")),
        "{}",
        lines[0]
    );
    rig.assert_clean();
    if dataplane == "sockmap" {
        rig.kgate.stop();
        assert_eq!(
            rig.kgate.splice_total("trimmed_bytes"),
            (FIRST_SEGMENT_END - REPEAT_FROM) as u64
        );
    }
}

/// The raw client's port (the namespace is the test's own).
const RAW_CLIENT_PORT: u16 = 40_123;

const HALF_CLOSE_BYTES: usize = 50_000_000;

fn half_close_delivers_every_byte_before_the_fin_to_a_slow_reader(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        // Let the client finish sending and close its side while nobody reads.
        thread::sleep(Duration::from_millis(300));
        let mut hasher = std::hash::DefaultHasher::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut total = 0usize;
        let mut reads = 0u32;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            hasher.write(&buf[..n]);
            total += n;
            reads += 1;
            // A slow reader: a pause every 64 reads.
            if reads.is_multiple_of(64) {
                thread::sleep(Duration::from_millis(2));
            }
        }
        let answer = format!("got {total} bytes, checksum {:016x}\r\n", hasher.finish());
        s.write_all(answer.as_bytes()).unwrap();
    });
    let frontend = rig.frontend_v4();
    let (sent_sum, answer, elapsed) = rig.lab.client().run(move || {
        let started = Instant::now();
        let mut c = connect(frontend);
        let sum = send_random(&mut c, 42, HALF_CLOSE_BYTES);
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        (sum, answer, started.elapsed())
    });
    assert_eq!(
        answer,
        format!("got {HALF_CLOSE_BYTES} bytes, checksum {sent_sum:016x}\r\n"),
        "after {elapsed:?}"
    );
    let lines = rig.connection_lines(1);
    rig.assert_paths(&lines);
    assert!(lines[0].contains("end=\"client closed\""), "{}", lines[0]);
    rig.assert_clean();
}

fn a_reset_from_either_side_resets_the_other(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    // The server records how each connection ended on its side, and resets those
    // whose client asked for it.
    let server_saw: Arc<Mutex<Vec<io::ErrorKind>>> = Arc::default();
    let resets_by_server = Arc::new(AtomicU64::new(0));
    let _server = {
        let server_saw = server_saw.clone();
        let resets_by_server = resets_by_server.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            s.write_all(b"220 ready\r\n").unwrap();
            let mut command = [0u8; 6];
            if s.read_exact(&mut command).is_err() {
                return;
            }
            if &command == b"RESET\n" {
                resets_by_server.fetch_add(1, Ordering::SeqCst);
                socket_reset(s);
                return;
            }
            // "WAIT\r\n": the client will reset; what does this side see?
            let mut buf = [0u8; 16];
            let ended = match s.read(&mut buf) {
                Ok(0) => ErrorKind::UnexpectedEof,
                Ok(_) => ErrorKind::InvalidData,
                Err(e) => e.kind(),
            };
            server_saw.lock().unwrap().push(ended);
        })
    };
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        // The client resets: the server must see a reset, not a clean EOF.
        let mut c = connect(frontend);
        let mut banner = [0u8; 11];
        c.read_exact(&mut banner).unwrap();
        c.write_all(b"WAIT\r\n").unwrap();
        thread::sleep(Duration::from_millis(100));
        socket_reset(c);

        // The server resets: the client must see a reset.
        let mut c = connect(frontend);
        c.read_exact(&mut banner).unwrap();
        c.write_all(b"RESET\n").unwrap();
        let mut buf = [0u8; 16];
        let ended = c.read(&mut buf);
        assert!(
            matches!(&ended, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "client saw {ended:?} after the server's reset"
        );
    });
    let deadline = Instant::now() + IO_TIMEOUT;
    while server_saw.lock().unwrap().is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(*server_saw.lock().unwrap(), [ErrorKind::ConnectionReset]);
    assert_eq!(resets_by_server.load(Ordering::SeqCst), 1);
    let lines = rig.connection_lines(2);
    assert!(
        lines.iter().any(|l| l.contains("end=\"client reset\"")),
        "{lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.contains("end=\"server reset\"")),
        "{lines:#?}"
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

/// Writes without blocking until the peer has stopped taking bytes for a while (its
/// buffers and the proxy's are full); returns how many went out.
fn write_until_held(stream: &mut std::net::TcpStream) -> usize {
    stream.set_nonblocking(true).unwrap();
    let chunk = vec![0x5a_u8; 64 * 1024];
    let (mut written, mut since_progress) = (0, Instant::now());
    while since_progress.elapsed() < Duration::from_secs(1) {
        match stream.write(&chunk) {
            Ok(n) => {
                written += n;
                since_progress = Instant::now();
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("writing until held: {e}"),
        }
    }
    stream.set_nonblocking(false).unwrap();
    written
}

/// Reads until the stream ends; how it ended (`UnexpectedEof` for a FIN).
fn read_until_the_end(stream: &mut std::net::TcpStream) -> ErrorKind {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return ErrorKind::UnexpectedEof,
            Ok(_) => {}
            Err(e) => return e.kind(),
        }
    }
}

/// A peer that resets while the other side does not read: the other side must be
/// reset at once, not when the idle timeout (10 minutes here) runs out. Both ways:
/// clients that upload to a backend that holds its reads and then reset, and a
/// backend that fills a client that holds its reads and then resets.
fn a_reset_reaches_the_other_side_while_it_holds_its_reads(dataplane: &'static str) {
    const UPLOADERS: usize = 4;
    let rig = Rig::start(dataplane, 1);
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let server_saw: Arc<Mutex<Vec<ErrorKind>>> = Arc::default();
    let _server = {
        let server_saw = server_saw.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            let mut what = [0u8; 1];
            s.read_exact(&mut what).unwrap();
            if &what == b"D" {
                write_until_held(&mut s);
                socket_reset(s);
                return;
            }
            // "U": hold every read until the test has seen the clients' resets through.
            let _ = released.lock().unwrap().recv_timeout(IO_TIMEOUT);
            let ended = read_until_the_end(&mut s);
            server_saw.lock().unwrap().push(ended);
        })
    };
    let frontend = rig.frontend_v4();
    let uploaded: Vec<usize> = rig.lab.client().run(move || {
        let uploaders: Vec<_> = (0..UPLOADERS)
            .map(|_| {
                thread::spawn(move || {
                    let mut c = connect(frontend);
                    c.write_all(b"U").unwrap();
                    let written = write_until_held(&mut c);
                    socket_reset(c);
                    written
                })
            })
            .collect();
        uploaders.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(uploaded.iter().all(|&n| n > 0), "{uploaded:?}");
    // Within the lines' wait (30 s), far sooner than the idle timeout.
    let lines = rig.connection_lines(UPLOADERS);
    assert!(
        lines.iter().all(|l| l.contains("end=\"client reset\"")),
        "{lines:#?}"
    );
    for _ in 0..UPLOADERS {
        release.send(()).unwrap();
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    while server_saw.lock().unwrap().len() < UPLOADERS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        *server_saw.lock().unwrap(),
        [ErrorKind::ConnectionReset; UPLOADERS],
        "the backend must see each client's reset"
    );

    let client_saw = rig.lab.client().run(move || {
        let mut c = connect(frontend);
        c.write_all(b"D").unwrap();
        // Nobody reads until the backend has filled everything and reset.
        thread::sleep(Duration::from_secs(3));
        read_until_the_end(&mut c)
    });
    assert_eq!(
        client_saw,
        ErrorKind::ConnectionReset,
        "after the backend's reset"
    );
    let lines = rig.connection_lines(UPLOADERS + 1);
    assert!(
        lines.iter().any(|l| l.contains("end=\"server reset\"")),
        "{lines:#?}"
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

/// `kgate status` shows the bytes of connections while they are open, not only once
/// they have ended, for the server and for the frontend: bytes kgate copied (the first
/// second on sockmap and packet, all of them on userspace) and bytes the kernel spliced
/// or forwarded after that. Once the connections end, the counts stay as they were:
/// no byte is counted twice.
fn status_counts_the_bytes_of_open_connections(dataplane: &'static str) {
    const CONNECTIONS: usize = 20;
    const COPIED: usize = 40 << 10;
    const LATER: usize = 100 << 10;
    const GREETING: usize = 1000;
    let rig = Rig::start_with(dataplane, 1, "", "splice_after = \"1s\"");
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        s.write_all(&[b'g'; GREETING]).unwrap();
        let _ = receive_all(&mut s);
    });
    let frontend = rig.frontend_v4();
    // (server bytes_in, server bytes_out, frontend bytes_in, frontend bytes_out)
    let bytes = || -> [u64; 4] {
        let status = rig.kgate.status();
        let count = |of: &str, field: &str| status[of][0][field].as_u64().expect("a byte count");
        [
            count("servers", "bytes_in"),
            count("servers", "bytes_out"),
            count("frontends", "bytes_in"),
            count("frontends", "bytes_out"),
        ]
    };
    let (done, finish) = mpsc::channel::<()>();
    let finish = Arc::new(Mutex::new(finish));
    let clients = rig.lab.client().spawn(move || {
        let mut conns: Vec<_> = (0..CONNECTIONS).map(|_| connect(frontend)).collect();
        for c in &mut conns {
            let mut greeting = [0u8; GREETING];
            c.read_exact(&mut greeting).unwrap();
            send_random(c, 1, COPIED);
        }
        // Past splice_after: on sockmap, the rest goes through the splice.
        thread::sleep(Duration::from_millis(1500));
        for c in &mut conns {
            send_random(c, 2, LATER);
        }
        let _ = finish.lock().unwrap().recv_timeout(IO_TIMEOUT);
    });
    let expected_in = (CONNECTIONS * (COPIED + LATER)) as u64;
    let expected_out = (CONNECTIONS * GREETING) as u64;
    let expected = [expected_in, expected_out, expected_in, expected_out];
    let deadline = Instant::now() + Duration::from_secs(10);
    while bytes() != expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let status = rig.kgate.status();
    assert_eq!(
        status["servers"][0]["active_connections"], CONNECTIONS,
        "the connections are still open: {status}"
    );
    assert_eq!(
        status["frontends"][0]["active_connections"], CONNECTIONS,
        "{status}"
    );
    assert_eq!(
        bytes(),
        expected,
        "server in, out, frontend in, out: {status}"
    );
    done.send(()).unwrap();
    clients.join().unwrap();
    let lines = rig.connection_lines(CONNECTIONS);
    // The later bytes took the plane's own path, so its counters were the ones read.
    rig.assert_paths(&lines);
    if dataplane == "packet" {
        assert_eq!(Rig::forwarded(&lines), CONNECTIONS, "{lines:#?}");
    }
    assert_eq!(bytes(), expected, "after the end, as while open");
    rig.assert_clean();
}

fn a_server_that_answers_and_closes_at_once_is_carried_intact(dataplane: &'static str) {
    let rig = Rig::start(dataplane, 1);
    // The server's FIN can reach kgate before the splice: the kernel refuses such a
    // socket in a sock hash, and kgate copies that direction instead.
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let id = s.peer_addr().unwrap().port() as usize;
        let _ = s.write_all(&session_payload(id, "server", BANNER_LEN));
    });
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        for _ in 0..200 {
            let mut c = connect(frontend);
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            let id = session_id(&got);
            assert_eq!(got, session_payload(id, "server", BANNER_LEN));
        }
    });
    let lines = rig.connection_lines(200);
    assert!(
        lines.iter().all(|l| l.contains("end=\"server closed\"")),
        "{lines:#?}"
    );
    rig.assert_clean();
}

/// The backend of the splice tests: takes the PROXY header, greets with `220`, then
/// echoes until the client's FIN or an error; returns how the connection ended
/// (`UnexpectedEof` for the FIN).
fn greet_then_echo(mut s: std::net::TcpStream) -> ErrorKind {
    set_timeouts(&s);
    read_proxy_header(&mut s).expect("a PROXY header");
    s.write_all(b"220 ready\r\n").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return ErrorKind::UnexpectedEof,
            Ok(n) => {
                if let Err(e) = s.write_all(&buf[..n]) {
                    return e.kind();
                }
            }
            Err(e) => return e.kind(),
        }
    }
}

/// Spliced connections that wait (an SMTP client between commands, an IMAP IDLE)
/// leave their tasks for the parking, where one watcher looks after all of them. Each
/// must come back for whatever its relay has to do: bytes beyond the bound, a FIN, a
/// reset; and must go on moving bytes in the kernel meanwhile.
#[test]
fn sockmap_held_connections_park_and_wake_for_bulk_fins_and_resets() {
    if tests::lab::skip_without_root() {
        return;
    }
    const HELD: usize = 20;
    const BULK: usize = 16 << 20;
    let rig = Rig::start("sockmap", 1);
    // Echoes until the client's FIN, then closes; records how each connection ended.
    let server_saw: Arc<Mutex<Vec<ErrorKind>>> = Arc::default();
    let _server = {
        let server_saw = server_saw.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |s| {
            let ended = greet_then_echo(s);
            server_saw.lock().unwrap().push(ended);
        })
    };
    let frontend = rig.frontend_v4();
    let clients: Vec<std::net::TcpStream> = rig.lab.client().run(move || {
        (0..HELD)
            .map(|_| {
                let mut c = connect(frontend);
                let mut banner = [0u8; 11];
                c.read_exact(&mut banner).unwrap();
                c
            })
            .collect()
    });
    let parked = "kgate_parked_connections";
    assert_eq!(rig.wait_for_metric(parked, HELD as f64), HELD as f64);

    // A line each way on every parked connection.
    let clients = rig.lab.client().run(move || {
        for (i, mut c) in clients.iter().enumerate() {
            let line = format!("NOOP {i}\r\n");
            c.write_all(line.as_bytes()).unwrap();
            let mut echo = vec![0u8; line.len()];
            c.read_exact(&mut echo).unwrap();
            assert_eq!(echo, line.as_bytes(), "connection {i}");
        }
        clients
    });
    assert_eq!(rig.wait_for_metric(parked, HELD as f64), HELD as f64);

    // Four bounds each way through a parked connection: the program's grant requests,
    // or the bytes it passes at the bound, wake it.
    let clients = rig.lab.client().run(move || {
        let mut writer = clients[0].try_clone().unwrap();
        let sending = thread::spawn(move || send_random(&mut writer, 5, BULK));
        let mut reader = clients[0].try_clone().unwrap();
        let mut rng = Rng(5);
        let (mut expected, mut got) = (vec![0u8; 256 * 1024], vec![0u8; 256 * 1024]);
        for at in (0..BULK).step_by(expected.len()) {
            rng.fill(&mut expected);
            reader.read_exact(&mut got).unwrap();
            assert!(got == expected, "the echo differs within bytes {at}..");
        }
        sending.join().unwrap();
        clients
    });
    assert_eq!(rig.wait_for_metric(parked, HELD as f64), HELD as f64);

    // Half the clients end with a FIN, half with a reset, all while parked.
    rig.lab.client().run(move || {
        for (i, c) in clients.into_iter().enumerate() {
            if i % 2 == 0 {
                c.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                (&c).read_to_end(&mut rest).unwrap();
                assert!(rest.is_empty(), "connection {i} got {rest:?} after its FIN");
            } else {
                socket_reset(c);
            }
        }
    });
    let lines = rig.connection_lines(HELD);
    rig.assert_paths(&lines);
    let closed = lines.iter().filter(|l| l.contains("end=\"client closed\""));
    let reset = lines.iter().filter(|l| l.contains("end=\"client reset\""));
    assert_eq!(
        (closed.count(), reset.count()),
        (HELD / 2, HELD / 2),
        "{lines:#?}"
    );
    let deadline = Instant::now() + IO_TIMEOUT;
    while server_saw.lock().unwrap().len() < HELD && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let mut saw = server_saw.lock().unwrap().clone();
    saw.sort_by_key(|kind| format!("{kind:?}"));
    let expected: Vec<_> = [ErrorKind::ConnectionReset; HELD / 2]
        .into_iter()
        .chain([ErrorKind::UnexpectedEof; HELD / 2])
        .collect();
    assert_eq!(saw, expected, "how the server saw the connections end");
    assert_eq!(rig.metric(parked), 0.0);
    rig.assert_clean();
}

/// With a delay before the splice (`splice_after`, 1 s by default, 3 s here), a
/// short session stays copied from start to end, and a connection that outlives it
/// is spliced from where it is. The delay is long because a short session took
/// 0.7 s on a busy CI machine, with the other tests running beside it.
#[test]
fn sockmap_a_connection_is_spliced_once_it_outlives_a_short_session() {
    if tests::lab::skip_without_root() {
        return;
    }
    const SPLICE_AFTER: Duration = Duration::from_secs(3);
    let rig = Rig::start_with(
        "sockmap",
        1,
        "",
        &format!("splice_after = \"{}s\"", SPLICE_AFTER.as_secs()),
    );
    // Greets, then echoes until the client's FIN.
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |s| {
        greet_then_echo(s);
    });
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        let greeted = || {
            let mut c = connect(frontend);
            let mut banner = [0u8; 11];
            c.read_exact(&mut banner).unwrap();
            c
        };
        let echoed = |c: &mut std::net::TcpStream, line: &[u8]| {
            c.write_all(line).unwrap();
            let mut echo = vec![0u8; line.len()];
            c.read_exact(&mut echo).unwrap();
            assert_eq!(echo, line);
        };
        let close = |c: std::net::TcpStream| {
            c.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            (&c).read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{rest:?} after the echo");
        };
        // A short session: over well within the delay.
        let mut c = greeted();
        echoed(&mut c, b"QUIT\r\n");
        close(c);
        // A session that waits past the delay, then talks.
        let mut c = greeted();
        thread::sleep(SPLICE_AFTER + Duration::from_millis(500));
        echoed(&mut c, b"NOOP\r\n");
        echoed(&mut c, b"QUIT\r\n");
        close(c);
    });
    let lines = rig.connection_lines(2);
    let line = |bytes: &str| {
        lines
            .iter()
            .find(|l| l.contains(bytes))
            .unwrap_or_else(|| panic!("no connection with {bytes}: {lines:#?}"))
    };
    assert!(
        line("bytes_in=6 bytes_out=17 ").contains(" copied "),
        "{lines:#?}"
    );
    assert!(
        line("bytes_in=12 bytes_out=23 ").contains(" spliced "),
        "{lines:#?}"
    );
    rig.assert_clean();
}

/// Connections that move bulk both ways from their first byte are copied until
/// kgate has copied 64 KiB, then join the splice while bytes flow both ways: kgate
/// has read the head skb of either queue in part, and the program must start each
/// socket's stream exactly where kgate stopped reading. Every byte must arrive once
/// and in order, and most of them through the splice.
#[test]
fn sockmap_connections_join_the_splice_midway_through_bulk_intact() {
    if tests::lab::skip_without_root() {
        return;
    }
    const STREAMS: usize = 8;
    const BYTES: usize = 16 << 20;
    // Only the bytes can bring the splice on.
    let mut rig = Rig::start_with("sockmap", 1, "", "splice_after = \"1h\"");
    move_bulk_both_ways(&rig, STREAMS, BYTES);
    rig.assert_clean();
    rig.kgate.stop();
    let redirected = rig.kgate.splice_total("redirected_bytes");
    let passed = rig.kgate.splice_total("passed_bytes");
    let trimmed = rig.kgate.splice_total("trimmed_bytes");
    eprintln!("redirected {redirected} passed {passed} trimmed {trimmed} bytes");
    assert_eq!(rig.kgate.splice_total("unpositioned_sockets"), 0);
    assert!(
        redirected + passed > (STREAMS * BYTES) as u64,
        "the splice handled {redirected} + {passed} of {} bytes",
        2 * STREAMS * BYTES
    );
}

/// A connection whose peers both send flat out and read slowly is never quiet by
/// itself: once both targets' buffers are full, kgate almost always holds bytes for
/// one direction or the other, and the splice may start only when both are written
/// out. Here both peers first send without reading, so that kgate holds bytes both
/// ways by the time its splice is due (the client's small receive buffer keeps the
/// bytes copied to it few); then they read, slowly. The connection must still be
/// spliced, not left copied to its end (as a lone bulk connection in a benchmark run
/// was, one run in three), and every byte must arrive.
#[test]
fn sockmap_a_connection_busy_both_ways_is_still_spliced() {
    if tests::lab::skip_without_root() {
        return;
    }
    const ROUNDS: usize = 3;
    const BYTES: usize = 24 << 20;
    const SMALL_BUFFER: usize = 4 * 1024;
    let connect_small = |to: SocketAddr| {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
        socket.connect_timeout(&to.into(), IO_TIMEOUT).unwrap();
        let stream = TcpStream::from(socket);
        set_timeouts(&stream);
        stream
    };
    for round in 0..ROUNDS {
        // A rig each: one connection's line each, and kgate afresh.
        let rig = Rig::start_with("sockmap", 1, "", "splice_after = \"1h\"");
        let (served, server_saw) = mpsc::channel();
        let served = Mutex::new(served);
        let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            let seen = send_and_read_slowly(s, 2, BYTES);
            served.lock().unwrap().send(seen).unwrap();
        });
        let frontend = rig.frontend_v4();
        let (client_received, client_sent) = rig
            .lab
            .client()
            .run(move || send_and_read_slowly(connect_small(frontend), 1, BYTES));
        let (server_received, server_sent) = server_saw.recv_timeout(IO_TIMEOUT).unwrap();
        assert_eq!(server_received, (BYTES, client_sent), "upstream");
        assert_eq!(client_received, (BYTES, server_sent), "downstream");
        let lines = rig.connection_lines(1);
        assert!(
            lines[0].contains(" spliced "),
            "round {round}: {}",
            lines[0]
        );
        rig.assert_clean();
    }
}

/// Sends `bytes` random bytes from `seed` flat out; reads nothing for a while (the
/// buffers on the way fill up), then what comes back in small bites with a pause
/// between them, until the peer's FIN: a peer that reads, but slower than it is sent
/// to. Returns (bytes read, their checksum) and the sent checksum.
fn send_and_read_slowly(mut stream: TcpStream, seed: u64, bytes: usize) -> ((usize, u64), u64) {
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        let sum = send_random(&mut writer, seed, bytes);
        writer.shutdown(Shutdown::Write).unwrap();
        sum
    });
    thread::sleep(Duration::from_millis(300));
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf).unwrap() {
            0 => break,
            n => {
                hasher.write(&buf[..n]);
                total += n;
            }
        }
        thread::sleep(Duration::from_micros(200));
    }
    ((total, hasher.finish()), sender.join().unwrap())
}

/// kgate's resident memory, from /proc.
fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// A copied connection reads into a 256 KiB buffer; one that then waits (an SMTP
/// client between commands, on the userspace plane or before the splice) must give
/// it back, or 500 waiting connections hold up to 256 MiB. Both directions have moved bytes
/// here (a banner and its echo), so both buffers were in use once. On the packet plane
/// a waiting connection is quiet, so it is handed off: no task, no buffer at all.
fn a_copied_connection_that_waits_holds_no_copy_buffer(dataplane: &'static str) {
    const WAITING: usize = 500;
    /// Twice the 4 KB a waiting connection costs; a kept buffer, even one whose
    /// untouched pages are not resident, takes it to 12 KB (a zeroed one to 76 KB).
    const BOUND: u64 = 8 * 1024;
    let rig = Rig::start_with(dataplane, 1, "", "splice_after = \"1h\"");
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        s.write_all(b"220 ready\r\n").unwrap();
        let mut line = [0u8; 6];
        s.read_exact(&mut line).unwrap();
        s.write_all(&line).unwrap();
        // Waits for the client's FIN.
        let _ = s.read(&mut line);
    });
    let frontend = rig.frontend_v4();
    let pid = rig.kgate.pid();
    let before = vm_rss(pid);
    let grown = rig.lab.client().run(move || {
        let conns: Vec<_> = (0..WAITING)
            .map(|_| {
                let mut c = connect(frontend);
                let mut banner = [0u8; 11];
                c.read_exact(&mut banner).unwrap();
                c.write_all(b"NOOP\r\n").unwrap();
                let mut echo = [0u8; 6];
                c.read_exact(&mut echo).unwrap();
                assert_eq!(&echo, b"NOOP\r\n");
                c
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        let grown = vm_rss(pid).saturating_sub(before);
        for c in conns {
            c.shutdown(Shutdown::Write).unwrap();
        }
        grown
    });
    let per_connection = grown / WAITING as u64;
    eprintln!("{dataplane}: {per_connection} B of kgate's memory per waiting connection");
    assert!(
        per_connection < BOUND,
        "{per_connection} B per waiting copied connection"
    );
    let lines = rig.connection_lines(WAITING);
    let path = if dataplane == "packet" {
        " forwarded "
    } else {
        " copied "
    };
    assert!(lines.iter().all(|l| l.contains(path)), "{lines:#?}");
    rig.assert_clean();
}
