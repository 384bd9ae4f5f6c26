//! Timeouts and connection limits, and the log line each connection ends with. On
//! both data planes: a spliced connection's bytes never pass through kgate, yet its
//! idleness must still be seen.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    on_every_dataplane,
    rig::{Rig, connect, set_timeouts},
};

on_every_dataplane!(
    idle_connections_are_closed_after_the_timeout_and_busy_ones_are_not,
    a_half_closed_connection_is_closed_after_its_timeout,
    the_connection_over_max_connections_is_refused_counted_and_logged,
    the_connection_over_the_per_source_limit_is_refused_and_others_are_not,
    a_server_that_does_not_answer_is_skipped_after_the_connect_timeout,
);

/// A backend that greets, then echoes everything until the client closes.
fn echo_server(rig: &Rig) -> TcpServer {
    TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_err() {
            return;
        }
        if s.write_all(b"220 hi\r\n").is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

fn greeted(frontend: SocketAddr) -> TcpStream {
    let mut c = connect(frontend);
    let mut banner = [0u8; 8];
    c.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"220 hi\r\n");
    c
}

/// Waits for kgate to close `c`: EOF or a reset. Returns how long it took.
fn closed_by_kgate(mut c: TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected kgate to close the connection, got {other:?}"),
    }
    started.elapsed()
}

fn idle_connections_are_closed_after_the_timeout_and_busy_ones_are_not(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 1, "idle_timeout = \"1s\"", "");
    let _server = echo_server(&rig);
    let frontend = rig.frontend_v4();
    let (idle_for, busy_ok) = rig.lab.client().run(move || {
        let idle = thread::spawn(move || closed_by_kgate(greeted(frontend)));
        // Busy: a byte every 250 ms for 3 s, each echoed, never idle for a second.
        let mut busy = greeted(frontend);
        for i in 0..12u8 {
            thread::sleep(Duration::from_millis(250));
            busy.write_all(&[b'a' + i]).unwrap();
            let mut echo = [0u8; 1];
            busy.read_exact(&mut echo).unwrap();
            assert_eq!(echo[0], b'a' + i);
        }
        busy.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        busy.read_to_end(&mut rest).unwrap();
        (idle.join().unwrap(), rest.is_empty())
    });
    assert!(busy_ok);
    assert!(
        idle_for >= Duration::from_millis(900) && idle_for < Duration::from_secs(5),
        "the idle connection was closed after {idle_for:?}"
    );
    let lines = rig.connection_lines(2);
    let idle = lines.iter().find(|l| l.contains("end=\"idle timeout\""));
    let busy = lines.iter().find(|l| l.contains("end=\"client closed\""));
    let idle = idle.unwrap_or_else(|| panic!("no idle timeout in {lines:#?}"));
    let busy = busy.unwrap_or_else(|| panic!("the busy connection ended otherwise: {lines:#?}"));
    assert!(idle.contains("bytes_in=0 bytes_out=8 "), "{idle}");
    assert!(busy.contains("bytes_in=12 bytes_out=20 "), "{busy}");
    rig.assert_paths(&lines);
    rig.assert_clean();
}

fn a_half_closed_connection_is_closed_after_its_timeout(dataplane: &'static str) {
    let rig = Rig::start_with(
        dataplane,
        1,
        "idle_timeout = \"60s\"\nhalf_closed_timeout = \"1s\"",
        "",
    );
    // This backend never closes its side, and never answers the client's FIN.
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).unwrap();
        s.write_all(b"220 hi\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        thread::sleep(Duration::from_secs(5));
    });
    let frontend = rig.frontend_v4();
    let took = rig.lab.client().run(move || {
        let c = greeted(frontend);
        c.shutdown(Shutdown::Write).unwrap();
        closed_by_kgate(c)
    });
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    let lines = rig.connection_lines(1);
    assert!(
        lines[0].contains("end=\"half-closed timeout\""),
        "{}",
        lines[0]
    );
    rig.assert_clean();
}

fn the_connection_over_max_connections_is_refused_counted_and_logged(dataplane: &'static str) {
    let mut rig = Rig::start_with(dataplane, 1, "max_connections = 10", "");
    let _server = echo_server(&rig);
    let frontend = rig.frontend_v4();
    rig.lab.client().run(move || {
        let mut open: Vec<TcpStream> = (0..10).map(|_| greeted(frontend)).collect();
        // The eleventh: accepted by the kernel, closed by kgate before any byte.
        let took = closed_by_kgate(connect(frontend));
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
        // A slot frees when a connection ends.
        drop(open.pop());
        thread::sleep(Duration::from_millis(300));
        open.push(greeted(frontend));
    });
    let lines = rig.connection_lines(12);
    let refused: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("end=\"over limit: max_connections 10\""))
        .collect();
    assert_eq!(refused.len(), 1, "{lines:#?}");
    assert!(
        refused[0].contains(" mail/- - bytes_in=0 bytes_out=0 "),
        "{}",
        refused[0]
    );
    rig.kgate.stop();
    assert!(
        rig.kgate.log().contains("refused=1"),
        "the refusal is counted: {}",
        rig.kgate.log()
    );
}

fn the_connection_over_the_per_source_limit_is_refused_and_others_are_not(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 1, "max_connections_per_source = 3", "");
    let _server = echo_server(&rig);
    let (v4, v6) = (rig.frontend_v4(), rig.frontend_v6());
    rig.lab.client().run(move || {
        let _three: Vec<TcpStream> = (0..3).map(|_| greeted(v4)).collect();
        closed_by_kgate(connect(v4));
        // The client's IPv6 address is another source.
        let _other = greeted(v6);
    });
    let lines = rig.connection_lines(5);
    let refused = lines
        .iter()
        .filter(|l| l.contains("end=\"over limit: max_connections_per_source 3\""))
        .count();
    assert_eq!(refused, 1, "{lines:#?}");
    rig.assert_clean();
}

fn a_server_that_does_not_answer_is_skipped_after_the_connect_timeout(dataplane: &'static str) {
    // No host has this address: the SYN goes unanswered. Listed first, round robin
    // tries it first.
    let unanswered = "10.200.10.99:2525";
    let rig = Rig::start_with(
        dataplane,
        1,
        "",
        &format!(
            "connect_timeout = \"500ms\"\n\n[[backends.servers]]\nname = \"silent\"\naddress = \"{unanswered}\"\n"
        ),
    );
    let _server = echo_server(&rig);
    let frontend = rig.frontend_v4();
    let took = rig.lab.client().run(move || {
        let started = Instant::now();
        drop(greeted(frontend));
        started.elapsed()
    });
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "greeted after {took:?}"
    );
    let lines = rig.connection_lines(1);
    assert!(lines[0].contains(" mail/node0 "), "{}", lines[0]);
    assert!(
        rig.kgate.log().contains("server=mail/silent")
            && rig.kgate.log().contains("no answer within 500ms"),
        "{}",
        rig.kgate.log()
    );
    rig.assert_clean();
}
