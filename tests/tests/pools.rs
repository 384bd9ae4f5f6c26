//! Backend pools: balancing, health checks, operator states, and what `kgate status`
//! and bpftool show of them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    bpftool, on_every_dataplane,
    rig::{Rig, connect, set_timeouts},
};

on_every_dataplane!(
    round_robin_follows_the_weights,
    leastconn_evens_out_held_connections,
    source_keeps_a_client_on_one_server,
    clients_reach_another_server_when_one_dies,
);

/// A backend server that greets with its name and waits for the client to close.
fn named_server(rig: &Rig, i: usize) -> TcpServer {
    let name = format!("node{i}");
    TcpServer::start(rig.lab.backend(i), rig.backend_addr(i), move |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_err() {
            return;
        }
        let _ = s.write_all(format!("220 {name}\r\n").as_bytes());
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    })
}

/// Connects and returns the greeting server's index and the open connection.
fn greeted_by(frontend: SocketAddr) -> (usize, TcpStream) {
    let mut c = connect(frontend);
    let mut line = [0u8; 11];
    c.read_exact(&mut line).expect("a greeting");
    let text = String::from_utf8_lossy(&line);
    let index = text
        .strip_prefix("220 node")
        .and_then(|rest| rest.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("unexpected greeting {text:?}"));
    (index, c)
}

/// Counts which server greets each of `n` connections made one after the other.
fn spread(rig: &Rig, frontend: SocketAddr, n: usize) -> Vec<usize> {
    let servers = rig.lab.backends().len();
    rig.lab.client().run(move || {
        let mut counts = vec![0; servers];
        for _ in 0..n {
            counts[greeted_by(frontend).0] += 1;
        }
        counts
    })
}

fn round_robin_follows_the_weights(dataplane: &'static str) {
    let rig = Rig::start_with_servers(
        dataplane,
        3,
        "",
        "balance = \"roundrobin\"",
        &["weight = 1", "weight = 2", "weight = 5"],
    );
    let _servers: Vec<_> = (0..3).map(|i| named_server(&rig, i)).collect();
    let counts = spread(&rig, rig.frontend_v4(), 1000);
    // Smooth weighted round robin is exact over whole cycles of 8: allow 1% of 1000.
    for (got, want) in counts.iter().zip([125, 250, 625]) {
        assert!(got.abs_diff(want) <= 10, "{counts:?}, expected 125/250/625");
    }
    rig.connection_lines(1000);
    rig.assert_clean();
}

fn leastconn_evens_out_held_connections(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 3, "", "balance = \"leastconn\"");
    let _servers: Vec<_> = (0..3).map(|i| named_server(&rig, i)).collect();
    let frontend = rig.frontend_v4();
    let counts = rig.lab.client().run(move || {
        let held: Vec<(usize, TcpStream)> = (0..30).map(|_| greeted_by(frontend)).collect();
        let mut counts = [0; 3];
        for (i, _) in &held {
            counts[*i] += 1;
        }
        counts
    });
    assert_eq!(counts, [10, 10, 10]);
    rig.connection_lines(30);
    rig.assert_clean();
}

fn source_keeps_a_client_on_one_server(dataplane: &'static str) {
    let rig = Rig::start_with(dataplane, 3, "", "balance = \"source\"");
    let _servers: Vec<_> = (0..3).map(|i| named_server(&rig, i)).collect();
    for frontend in [rig.frontend_v4(), rig.frontend_v6()] {
        let counts = spread(&rig, frontend, 50);
        assert_eq!(
            counts.iter().filter(|&&n| n > 0).count(),
            1,
            "one client address, one server: {counts:?}"
        );
    }
    rig.connection_lines(100);
    rig.assert_clean();
}

fn clients_reach_another_server_when_one_dies(dataplane: &'static str) {
    // No health checks: only the failed connect tells kgate.
    let rig = Rig::start_with(dataplane, 2, "", "connect_timeout = \"1s\"");
    let dying = named_server(&rig, 0);
    let _alive = named_server(&rig, 1);
    let frontend = rig.frontend_v4();
    // Clients keep connecting while node0 dies.
    let clients = rig.lab.client().spawn(move || {
        (0..200)
            .map(|_| {
                let mut c = connect(frontend);
                let mut line = [0u8; 11];
                c.read_exact(&mut line)
                    .map(|()| String::from_utf8_lossy(&line).into_owned())
            })
            .collect::<Vec<_>>()
    });
    assert!(dying.wait_accepted(30, Duration::from_secs(10)));
    drop(dying);
    let results = clients.join().unwrap();
    let failed = results.iter().filter(|r| r.is_err()).count();
    // Only a session node0 had already accepted when it died can fail.
    assert!(failed <= 1, "{failed} clients failed: {results:?}");
    let last: Vec<_> = results[150..].iter().map(|r| r.as_deref().ok()).collect();
    assert!(
        last.iter().all(|g| *g == Some("220 node1\r\n")),
        "after node0 died every client reached node1: {last:?}"
    );
    assert!(rig.kgate.log().contains("connect failed"));
    rig.connection_lines(200);
    rig.assert_clean();
}

const CHECKS: &str = "[backends.health]\ncheck = \"tcp\"\ninterval = \"300ms\"\nrise = 2\nfall = 2\ntimeout = \"300ms\"";

/// The servers as `kgate status --json` lists them: (name, state, ok, fail, total).
fn status(rig: &Rig) -> Vec<(String, String, u64, u64, u64)> {
    rig.kgate.status()["servers"]
        .as_array()
        .expect("a server list")
        .iter()
        .map(|s| {
            (
                s["server"].as_str().unwrap().to_owned(),
                s["state"].as_str().unwrap().to_owned(),
                s["consecutive_ok"].as_u64().unwrap(),
                s["consecutive_fail"].as_u64().unwrap(),
                s["total_connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn state_of(rig: &Rig, server: &str) -> String {
    status(rig)
        .into_iter()
        .find(|s| s.0 == server)
        .map(|s| s.1)
        .unwrap_or_default()
}

/// Waits until `server` shows `state`; returns how long that took.
fn wait_state(rig: &Rig, server: &str, state: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while state_of(rig, server) != state {
        assert!(
            started.elapsed() < limit,
            "{server} not {state} after {limit:?}: {:?}",
            status(rig)
        );
        thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

#[test]
fn a_stopped_server_is_marked_down_and_avoided_then_comes_back_up() {
    if tests::lab::skip_without_root() {
        return;
    }
    let rig = Rig::start_with("sockmap", 2, "", CHECKS);
    let first = named_server(&rig, 0);
    let _second = named_server(&rig, 1);
    wait_state(&rig, "node0", "up", Duration::from_secs(3));
    wait_state(&rig, "node1", "up", Duration::from_secs(3));

    drop(first);
    // fall x interval + timeout, plus the 10% spread and the 1 s publishing period.
    let took = wait_state(&rig, "node0", "down", Duration::from_secs(3));
    eprintln!("node0 marked down {took:?} after it stopped");
    assert_eq!(spread(&rig, rig.frontend_v4(), 20), [0, 20]);

    let _first_again = named_server(&rig, 0);
    let took = wait_state(&rig, "node0", "up", Duration::from_secs(3));
    eprintln!("node0 up again {took:?} after it restarted");
    let counts = spread(&rig, rig.frontend_v4(), 20);
    assert!(counts[0] >= 9, "node0 takes its share again: {counts:?}");
    let down = rig.kgate.log();
    assert!(
        down.contains("server=mail/node0") && down.contains("connection refused"),
        "the state change is logged with its reason: {down}"
    );
}

#[test]
fn with_no_server_up_a_client_is_closed_at_once_and_counted() {
    if tests::lab::skip_without_root() {
        return;
    }
    let mut rig = Rig::start_with("sockmap", 1, "", CHECKS);
    let server = named_server(&rig, 0);
    wait_state(&rig, "node0", "up", Duration::from_secs(3));
    drop(server);
    wait_state(&rig, "node0", "down", Duration::from_secs(3));
    let frontend = rig.frontend_v4();
    let took = rig.lab.client().run(move || {
        let started = Instant::now();
        let mut c = connect(frontend);
        let mut buf = [0u8; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 0, "closed without a byte");
        started.elapsed()
    });
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    let lines = rig.connection_lines(1);
    assert!(lines[0].contains("end=\"no server\""), "{}", lines[0]);
    rig.kgate.stop();
    assert!(
        rig.kgate.log().contains("no_server=1"),
        "{}",
        rig.kgate.log()
    );
}

#[test]
fn drain_and_maint_do_what_they_say_and_status_agrees_with_bpftool() {
    if tests::lab::skip_without_root() {
        return;
    }
    let rig = Rig::start_with("sockmap", 2, "", CHECKS);
    let _servers: Vec<_> = (0..2).map(|i| named_server(&rig, i)).collect();
    wait_state(&rig, "node0", "up", Duration::from_secs(3));
    wait_state(&rig, "node1", "up", Duration::from_secs(3));
    let frontend = rig.frontend_v4();

    // A session on node0 before it drains.
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let held = rig.lab.client().spawn(move || {
        let (mut i, mut c) = greeted_by(frontend);
        while i != 0 {
            (i, c) = greeted_by(frontend);
        }
        first_tx.send(()).unwrap();
        held_rx.recv().unwrap();
        // Still carried after the drain: the server sees the client close.
        c.write_all(b"QUIT\r\n").unwrap();
    });
    first_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    let out = rig.kgate.server_set("mail/node0", "drain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_state(&rig, "node0", "drain", Duration::from_secs(2));
    assert_eq!(
        spread(&rig, frontend, 10),
        [0, 10],
        "no new connection to a draining server"
    );
    let checked_before = status(&rig)[0].2;
    thread::sleep(Duration::from_millis(1500));
    assert!(
        status(&rig)[0].2 > checked_before,
        "checks go on while draining"
    );
    held_tx.send(()).unwrap();
    held.join().unwrap();

    let out = rig.kgate.server_set("mail/node0", "maint");
    assert!(out.status.success());
    wait_state(&rig, "node0", "maint", Duration::from_secs(2));
    // The checks stop within a poll of the operator's state (200 ms).
    thread::sleep(Duration::from_millis(500));
    let frozen = status(&rig)[0].clone();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(status(&rig)[0], frozen, "no checks in maint");
    assert_eq!(spread(&rig, frontend, 10), [0, 10], "no traffic in maint");

    let out = rig.kgate.server_set("mail/node0", "ready");
    assert!(out.status.success());
    wait_state(&rig, "node0", "up", Duration::from_secs(3));
    assert!(
        spread(&rig, frontend, 10)[0] >= 4,
        "node0 takes connections again"
    );

    let bad = rig.kgate.server_set("mail/node9", "drain");
    assert!(!bad.status.success());
    let complaint = String::from_utf8_lossy(&bad.stderr);
    assert!(
        complaint.contains("no server `mail/node9`")
            && complaint.contains("one of: mail/node0, mail/node1"),
        "{complaint}"
    );

    // What kgate status says is what the pinned map holds, once kgate has published it
    // (every second, from the same entries).
    // bpftool prints the text fields as strings (the map's BTF says `char`).
    let text = |v: &serde_json::Value| -> String {
        v.as_str()
            .unwrap_or_else(|| panic!("not a string: {v}"))
            .to_owned()
    };
    let differences = || -> Vec<String> {
        let ours = status(&rig);
        let dump = bpftool::dump_json(&rig.kgate.pin_path().join("servers"));
        let mut differences = Vec::new();
        // A hash of the live servers: one entry each, in no particular order.
        let entries = dump.as_array().unwrap();
        assert_eq!(entries.len(), ours.len(), "{dump}");
        for (name, state, ok, fail, total) in &ours {
            let Some(entry) = entries
                .iter()
                .map(|e| &e["formatted"]["value"])
                .find(|e| e["server"] == name.as_str())
            else {
                differences.push(format!("{name} is not in the map: {dump}"));
                continue;
            };
            let published = (
                text(&entry["server"]),
                text(&entry["backend"]),
                text(&entry["state"]),
                entry["total_connections"].as_u64().unwrap(),
            );
            if published != (name.clone(), "mail".to_owned(), state.clone(), *total) {
                differences.push(format!("{published:?} against {name} {state} {total}"));
            }
            // Checks run on: the counters may move between the two reads, by one at most.
            if entry["consecutive_ok"].as_u64().unwrap().abs_diff(*ok) > 1
                || entry["consecutive_fail"].as_u64().unwrap().abs_diff(*fail) > 1
            {
                differences.push(format!("{name}: {entry} against ok {ok}, fail {fail}"));
            }
        }
        differences
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let differences = differences();
        if differences.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{differences:#?}");
        thread::sleep(Duration::from_millis(100));
    }
    // Every connection is counted once, on its server (published within a second).
    let lines = || rig.kgate.log().matches("kgate::conn").count() as u64;
    let deadline = Instant::now() + Duration::from_secs(3);
    while status(&rig).iter().map(|s| s.4).sum::<u64>() != lines() {
        assert!(
            Instant::now() < deadline,
            "{:?} against {} connections",
            status(&rig),
            lines()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Each connection got an 11-byte greeting; the held one sent "QUIT\r\n". Spliced
    // bytes are counted by the eBPF program, copied ones by kgate.
    for server in rig.kgate.status()["servers"].as_array().unwrap() {
        let total = server["total_connections"].as_u64().unwrap();
        assert_eq!(
            server["bytes_out"].as_u64().unwrap(),
            11 * total,
            "{server}"
        );
    }
    let bytes_in: u64 = rig.kgate.status()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["bytes_in"].as_u64().unwrap())
        .sum();
    assert_eq!(bytes_in, 6);
}
