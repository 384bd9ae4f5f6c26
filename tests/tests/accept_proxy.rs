//! `accept_proxy` on a frontend: kgate behind another proxy that sends PROXY headers.
//! Raw clients in the client namespace play that proxy, with good (v1 and v2), cut
//! short, oversized and lying headers, from trusted and untrusted addresses; the
//! backend records every byte it receives.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, V2_SIGNATURE, read_proxy_header},
    on_every_dataplane,
    rig::{Rig, connect, set_timeouts},
};

on_every_dataplane!(
    a_trusted_proxys_header_is_replaced_by_kgates_naming_the_same_client,
    bad_headers_and_untrusted_sources_are_closed_counted_and_logged,
);

/// The payload every client sends after its header.
const PAYLOAD: &[u8] = b"EHLO client.example\r\nQUIT\r\n";

/// The client namespace's IPv4 address (lab.rs): the proxy in front of kgate.
const PROXY_V4: &str = "10.200.1.2";

/// The keys that make the rig's frontend accept headers from the client namespace's
/// IPv4 address only (its IPv6 address is then an untrusted source).
fn accepting(timeout: &str) -> String {
    format!(
        "accept_proxy = true\ntrusted_sources = [\"{PROXY_V4}/32\"]\naccept_proxy_timeout = \"{timeout}\""
    )
}

/// A backend that answers `done` once it has [`PAYLOAD`] (so the client's FIN comes
/// after the splice began), then records everything the connection sent it, to the end.
fn recording_server(rig: &Rig, i: usize) -> (TcpServer, Arc<Mutex<Vec<Vec<u8>>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let record = received.clone();
    let server = TcpServer::start(rig.lab.backend(i), rig.backend_addr(i), move |mut s| {
        set_timeouts(&s);
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while !all.ends_with(PAYLOAD) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
        if s.write_all(b"done").is_ok() && s.read_to_end(&mut all).is_ok() {
            record.lock().unwrap().push(all);
        }
    });
    (server, received)
}

/// The v2 header kgate must write for `source` connecting to `destination`, built by
/// hand from the protocol's text.
fn v2_proxy(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let mut header = V2_SIGNATURE.to_vec();
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            header.extend([0x21, 0x11, 0, 12]);
            header.extend(s.ip().octets());
            header.extend(d.ip().octets());
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            header.extend([0x21, 0x21, 0, 36]);
            header.extend(s.ip().octets());
            header.extend(d.ip().octets());
        }
        _ => panic!("one family"),
    }
    header.extend(source.port().to_be_bytes());
    header.extend(destination.port().to_be_bytes());
    header
}

/// Connects to `frontend`, sends `bytes`, waits for the backend's `done`, then closes
/// its side and reads to the end. Returns its own address and what it read.
fn send_then_read(frontend: SocketAddr, bytes: Vec<u8>) -> (SocketAddr, Vec<u8>) {
    let mut c = connect(frontend);
    let me = c.local_addr().unwrap();
    c.write_all(&bytes).unwrap();
    let mut answer = [0u8; 4];
    c.read_exact(&mut answer).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    (me, [&answer[..], &rest].concat())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn a_trusted_proxys_header_is_replaced_by_kgates_naming_the_same_client(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 1, &accepting("5s"), "");
    let (_server, received) = recording_server(&rig, 0);
    let frontend = rig.frontend_v4();

    let client4 = addr("192.0.2.7:40000");
    let dest4 = addr("198.51.100.1:25");
    let client6 = addr("[2001:db8::7]:40001");
    let dest6 = addr("[2001:db8:1::1]:993");
    let v1_line = |s: SocketAddr, d: SocketAddr| {
        let family = if s.is_ipv4() { "TCP4" } else { "TCP6" };
        format!(
            "PROXY {family} {} {} {} {}\r\n",
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        )
        .into_bytes()
    };
    let cases = [
        ("v2 IPv4", v2_proxy(client4, dest4), client4, dest4),
        ("v2 IPv6", v2_proxy(client6, dest6), client6, dest6),
        ("v1 TCP4", v1_line(client4, dest4), client4, dest4),
        ("v1 TCP6", v1_line(client6, dest6), client6, dest6),
    ];
    for (what, header, source, destination) in &cases {
        let sent = [header.as_slice(), PAYLOAD].concat();
        let (_, answer) = rig.lab.client().run(move || send_then_read(frontend, sent));
        assert_eq!(answer, b"done", "{what}");
        let got = received
            .lock()
            .unwrap()
            .pop()
            .expect("the backend got a connection");
        assert_eq!(
            got,
            [v2_proxy(*source, *destination).as_slice(), PAYLOAD].concat(),
            "{what}: the backend must get kgate's header naming the client, then the \
             payload, and nothing of the proxy's header"
        );
    }

    // A LOCAL header (the proxy's own health check) keeps the connection's addresses.
    let mut local = V2_SIGNATURE.to_vec();
    local.extend([0x20, 0x00, 0, 0]);
    let sent = [local.as_slice(), PAYLOAD].concat();
    let (me, answer) = rig.lab.client().run(move || send_then_read(frontend, sent));
    assert_eq!(answer, b"done");
    let got = received.lock().unwrap().pop().unwrap();
    assert_eq!(got, [v2_proxy(me, frontend).as_slice(), PAYLOAD].concat());

    let lines = rig.connection_lines(5);
    for (i, (what, _, source, _)) in cases.iter().enumerate() {
        assert!(
            lines[i].contains(&format!("{source} smtp mail/node0 ")),
            "{what}: the log names the header's client: {}",
            lines[i]
        );
    }
    assert!(
        lines[4].contains(&format!("{me} smtp mail/node0 ")),
        "{}",
        lines[4]
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

/// Waits for kgate to close `c`: EOF or a reset, and nothing else.
fn closed_by_kgate(mut c: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected kgate to close the connection, got {other:?}"),
    }
    started.elapsed()
}

fn bad_headers_and_untrusted_sources_are_closed_counted_and_logged(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 1, &accepting("1s"), "");
    let (server, _) = recording_server(&rig, 0);
    let good = v2_proxy(addr("192.0.2.7:40000"), addr("198.51.100.1:25"));
    // The length field says 4 bytes follow: too few for two IPv4 addresses and ports.
    let mut lying_short = good.clone();
    lying_short[14..16].copy_from_slice(&4u16.to_be_bytes());
    // The length field says 300: the 12 address bytes, the payload, then silence.
    let mut lying_long = good.clone();
    lying_long[14..16].copy_from_slice(&300u16.to_be_bytes());
    let mut oversized = V2_SIGNATURE.to_vec();
    oversized.extend([0x21, 0x11, 0xff, 0xff]);
    oversized.extend([0u8; 64]);
    let mut long_line = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25".to_vec();
    long_line.resize(120, b' ');
    long_line.extend(b"\r\n");

    // (what, bytes sent, close after them, the reason's label, the log's words)
    let cases: Vec<(&str, Vec<u8>, bool, &str, &str)> = vec![
        (
            "v1 with garbage",
            b"PROXY TCP4 garbage 198.51.100.1 40000 25\r\n".to_vec(),
            false,
            "malformed",
            "PROXY header malformed: Header contains invalid IP address for the source (in 'PROXY TCP4 garbage",
        ),
        (
            "v2 whose length is too short for its addresses",
            [lying_short.as_slice(), PAYLOAD].concat(),
            false,
            "malformed",
            "PROXY header malformed: Header length of 4 bytes cannot store the 12 bytes",
        ),
        (
            "v2 whose length runs past what is sent",
            [lying_long.as_slice(), PAYLOAD].concat(),
            false,
            "timeout",
            "PROXY header timed out: 55 bytes received in 1s, the header unfinished",
        ),
        (
            "v2 cut short",
            good[..20].to_vec(),
            true,
            "truncated",
            "PROXY header truncated: closed after 20 bytes of it",
        ),
        (
            "v2 longer than kgate takes",
            oversized,
            false,
            "oversized",
            "PROXY header oversized: 65551 bytes, over the 16384 taken",
        ),
        (
            "v1 longer than 107 bytes",
            long_line,
            false,
            "oversized",
            "PROXY header oversized: 107 bytes, over the 107 taken",
        ),
        (
            "no header",
            PAYLOAD.to_vec(),
            false,
            "missing",
            "PROXY header missing: the connection began with 'EHLO",
        ),
        (
            "nothing at all",
            vec![],
            false,
            "timeout",
            "PROXY header timed out: nothing received in 1s",
        ),
    ];
    let frontend = rig.frontend_v4();
    for (what, bytes, close, _, _) in &cases {
        let (bytes, close) = (bytes.clone(), *close);
        let took = rig.lab.client().run(move || {
            let mut c = connect(frontend);
            c.write_all(&bytes).unwrap();
            if close {
                c.shutdown(Shutdown::Write).unwrap();
            }
            closed_by_kgate(c)
        });
        assert!(
            took < Duration::from_secs(5),
            "{what}: closed after {took:?}"
        );
    }
    // A good header from the client's IPv6 address, which is not trusted.
    let frontend6 = rig.frontend_v6();
    let untrusted = [good.as_slice(), PAYLOAD].concat();
    let peer6 = rig.lab.client().run(move || {
        let mut c = connect(frontend6);
        let me = c.local_addr().unwrap();
        let _ = c.write_all(&untrusted);
        closed_by_kgate(c);
        me
    });

    let lines = rig.connection_lines(cases.len() + 1);
    for (i, (what, _, _, _, words)) in cases.iter().enumerate() {
        assert!(
            lines[i].contains(&format!("{PROXY_V4}:"))
                && lines[i].contains(" smtp mail/- - bytes_in=0 bytes_out=0 ")
                && lines[i].contains(&format!("end=\"{words}")),
            "{what}: {}",
            lines[i]
        );
    }
    assert!(
        lines[cases.len()].contains(&format!(
            "end=\"PROXY header refused: {} is not in trusted_sources\"",
            peer6.ip()
        )),
        "{}",
        lines[cases.len()]
    );
    for reason in [
        "malformed",
        "timeout",
        "truncated",
        "oversized",
        "missing",
        "untrusted",
    ] {
        // The IPv6 client is the one untrusted source.
        let expected =
            cases.iter().filter(|c| c.3 == reason).count() + usize::from(reason == "untrusted");
        assert_eq!(
            rig.metric_with(
                "kgate_frontend_proxy_header_refused_total",
                &[("frontend", "smtp"), ("reason", reason)]
            ),
            expected as f64,
            "{reason}"
        );
    }
    assert_eq!(
        server.accepted(),
        0,
        "no refused connection reached the backend"
    );
    assert_eq!(
        rig.metric_with("kgate_frontend_connections_total", &[]),
        0.0
    );
    rig.assert_clean();
}

/// Per-source limits and `source` balancing go by the header's client, not by the
/// proxy's address (which all these connections share).
#[test]
fn per_source_limits_and_source_balancing_use_the_headers_client() {
    if tests::lab::skip_without_root() {
        return;
    }
    let rig = Rig::start_with(
        "sockmap",
        2,
        &format!("{}\nmax_connections_per_source = 1", accepting("5s")),
        "balance = \"source\"",
    );
    let seen: Arc<Mutex<Vec<(usize, SocketAddr)>>> = Arc::default();
    let servers: Vec<TcpServer> = (0..2)
        .map(|i| {
            let seen = seen.clone();
            TcpServer::start(rig.lab.backend(i), rig.backend_addr(i), move |mut s| {
                set_timeouts(&s);
                let Ok(header) = read_proxy_header(&mut s) else {
                    return;
                };
                seen.lock().unwrap().push((i, header.source.unwrap()));
                let _ = s.write_all(b"hi");
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            })
        })
        .collect();
    let frontend = rig.frontend_v4();
    let header = |client: &str| v2_proxy(addr(client), addr("198.51.100.1:25"));

    let (first, second, other) = (
        header("192.0.2.1:1000"),
        header("192.0.2.1:1001"),
        header("192.0.2.2:1000"),
    );
    rig.lab.client().run(move || {
        let greeted = |bytes: &[u8]| {
            let mut c = connect(frontend);
            c.write_all(bytes).unwrap();
            let mut hi = [0u8; 2];
            c.read_exact(&mut hi).unwrap();
            c
        };
        let _held = greeted(&first);
        // The same client through the same proxy: over its limit of one.
        let mut c = connect(frontend);
        c.write_all(&second).unwrap();
        closed_by_kgate(c);
        // Another client through the same proxy: its own limit.
        let _other = greeted(&other);
    });
    let lines = rig.connection_lines(3);
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("end=\"over limit: max_connections_per_source 1\""))
        .collect();
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert!(
        refused[0].contains("192.0.2.1:1001 smtp mail/- "),
        "{}",
        refused[0]
    );

    // Twenty clients, twice each, all through the proxy's one address.
    seen.lock().unwrap().clear();
    let clients: Vec<String> = (10..30).map(|i| format!("192.0.2.{i}:2000")).collect();
    let headers: Vec<Vec<u8>> = clients.iter().chain(&clients).map(|c| header(c)).collect();
    rig.lab.client().run(move || {
        for bytes in headers {
            let mut c = connect(frontend);
            c.write_all(&bytes).unwrap();
            let mut hi = [0u8; 2];
            c.read_exact(&mut hi).unwrap();
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().len() < 40 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40, "{seen:?}");
    for (first, again) in seen[..20].iter().zip(&seen[20..]) {
        assert_eq!(first.1, again.1);
        assert_eq!(first.0, again.0, "a client keeps its server: {seen:?}");
    }
    let on_first = seen[..20].iter().filter(|(server, _)| *server == 0).count();
    assert!(
        (1..20).contains(&on_first),
        "source balancing by the proxy's one address would send all twenty clients to one \
         server; by the header's client both get some ({on_first} of 20 on node0)"
    );
    drop(servers);
    rig.assert_clean();
}
