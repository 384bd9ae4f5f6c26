//! kgate's log as an operator reads it: in the journal under systemd (priorities for
//! `journalctl -p`, the connection line's parts as fields for `journalctl FIELD=value`,
//! one warning for a backend left without servers), and the switch for the
//! per-connection lines.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde_json::Value;
use tests::{
    backend::{TcpServer, read_proxy_header},
    journal::{JournaledKgate, Reach, text},
    kgate::{control_socket_for, global_section, pin_path_for},
    lab::Lab,
    on_every_dataplane,
    rig::{Rig, connect, set_timeouts},
};

on_every_dataplane!(
    under_systemd_the_journal_gets_priorities_fields_and_one_warning_for_a_backend_left_without_servers,
);

const BANNER: &[u8] = b"220 node0 ready\r\n";

/// A server that takes the PROXY header (or a check's LOCAL one), greets, and waits
/// for the client to close.
fn greeter(lab: &Lab, address: SocketAddr) -> TcpServer {
    TcpServer::start(lab.backend(0), address, |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_ok() {
            let _ = s.write_all(BANNER);
            let _ = s.read_to_end(&mut Vec::new());
        }
    })
}

/// Connects from the client namespace, takes the greeting and closes; returns what it
/// got (nothing when kgate closed the connection at once).
fn session(lab: &Lab, frontend: SocketAddr) -> Vec<u8> {
    lab.client().run(move || {
        let c = connect(frontend);
        let mut got = Vec::new();
        let _ = c.take(BANNER.len() as u64).read_to_end(&mut got);
        got
    })
}

fn messages(entries: &[Value]) -> Vec<String> {
    entries.iter().map(|e| text(e, "MESSAGE")).collect()
}

fn under_systemd_the_journal_gets_priorities_fields_and_one_warning_for_a_backend_left_without_servers(
    dataplane: &'static str,
) {
    let lab = Lab::new(1);
    let backend = SocketAddr::new(IpAddr::V4(lab.backend(0).v4()), 2525);
    let frontend = SocketAddr::new(IpAddr::V4(lab.gateway().v4()), 2525);
    let server = greeter(&lab, backend);
    let config = format!(
        "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{frontend}\"]\nbackend = \"mail\"\n\
         [[backends]]\nname = \"mail\"\nsplice_after = \"0s\"\n\
         [backends.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\nrise = 1\nfall = 1\n\
         [[backends.servers]]\nname = \"node0\"\naddress = \"{backend}\"\n",
        global_section(&lab, dataplane)
    );
    let kgate = JournaledKgate::start(
        &lab,
        &config,
        (pin_path_for(&lab), control_socket_for(&lab)),
        Reach::StreamAndSocket,
    );

    // The native protocol, not the stream: nothing came as lines on stderr.
    let ready: Vec<_> = kgate
        .entries(&[])
        .into_iter()
        .filter(|e| text(e, "MESSAGE").starts_with("kgate ready"))
        .collect();
    assert_eq!(ready.len(), 1, "{ready:#?}");
    let ready = &ready[0];
    assert_eq!(text(ready, "_TRANSPORT"), "journal", "{ready:#?}");
    assert_eq!(text(ready, "PRIORITY"), "6", "info: {ready:#?}");
    assert_eq!(text(ready, "DATAPLANE"), dataplane, "{ready:#?}");
    // No second time stamp, no level word: journald has both.
    assert!(
        text(ready, "MESSAGE").starts_with("kgate ready dataplane="),
        "{ready:#?}"
    );
    assert!(
        kgate.entries(&["_TRANSPORT=stdout"]).is_empty(),
        "kgate wrote lines to its stream: {:#?}",
        kgate.entries(&["_TRANSPORT=stdout"])
    );

    // A connection: its line's parts are fields journalctl filters on.
    assert_eq!(session(&lab, frontend), BANNER);
    let lines = kgate.wait_for(&["FRONTEND=smtp", "SERVER=mail/node0"], 1);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = &lines[0];
    let client = lab.client().v4().to_string();
    assert!(
        text(line, "CLIENT").starts_with(&format!("{client}:")),
        "{line:#?}"
    );
    assert_eq!(text(line, "BACKEND"), "mail", "{line:#?}");
    assert_eq!(text(line, "DATAPLANE"), dataplane, "{line:#?}");
    let moved: &[&str] = match dataplane {
        "sockmap" => &["spliced"],
        "packet" => &["forwarded", "copied"],
        _ => &["copied"],
    };
    assert!(moved.contains(&text(line, "MOVED").as_str()), "{line:#?}");
    assert_eq!(
        text(line, "BYTES_OUT"),
        BANNER.len().to_string(),
        "{line:#?}"
    );
    assert_eq!(text(line, "BYTES_IN"), "0", "{line:#?}");
    assert_eq!(text(line, "END"), "client closed", "{line:#?}");
    assert!(text(line, "CONNECT_MS").parse::<u64>().is_ok(), "{line:#?}");
    assert!(
        text(line, "DURATION_MS").parse::<u64>().is_ok(),
        "{line:#?}"
    );
    assert_eq!(text(line, "TARGET"), "kgate::conn", "{line:#?}");
    assert_eq!(text(line, "PRIORITY"), "6", "{line:#?}");
    // The text is the stderr line's, for `journalctl -u kgate`.
    let message = text(line, "MESSAGE");
    assert!(
        message.starts_with(&format!("{} smtp mail/node0 ", text(line, "CLIENT")))
            && message.contains(&format!("bytes_out={} end=\"client closed\"", BANNER.len()))
            && message.contains(" connect=")
            && !message.contains("journal."),
        "{message}"
    );

    // The only server goes: one warning for it, one for its backend, however many
    // clients are refused; the refused clients' lines stay at info.
    server.stop();
    let warnings = kgate.wait_for(
        &[
            "--priority=warning",
            "BACKEND=mail",
            "TARGET=kgate::gateway",
        ],
        1,
    );
    assert!(
        text(&warnings[0], "MESSAGE")
            .starts_with("backend mail has no server available: its clients are refused"),
        "{warnings:#?}"
    );
    for _ in 0..5 {
        assert_eq!(session(&lab, frontend), b"");
    }
    let refused = kgate.wait_for(&["END=no server"], 5);
    assert_eq!(refused.len(), 5, "{refused:#?}");
    assert!(
        refused.iter().all(|e| text(e, "PRIORITY") == "6"),
        "{refused:#?}"
    );
    let warnings = messages(&kgate.entries(&["--priority=warning"]));
    assert_eq!(
        warnings
            .iter()
            .filter(|m| m.starts_with("server down:"))
            .count(),
        1,
        "{warnings:#?}"
    );
    assert_eq!(
        warnings
            .iter()
            .filter(|m| m.contains("has no server available"))
            .count(),
        1,
        "{warnings:#?}"
    );
    let down = kgate.entries(&["--priority=warning", "SERVER=mail/node0"]);
    assert_eq!(down.len(), 1, "{down:#?}");
    assert_eq!(text(&down[0], "PRIORITY"), "4", "{down:#?}");

    // It comes back: one line at info, for the backend.
    let _server = greeter(&lab, backend);
    let back = kgate.wait_for(&["BACKEND=mail", "TARGET=kgate::gateway", "PRIORITY=6"], 1);
    assert_eq!(
        messages(&back),
        ["backend mail has a server available again: node0"]
    );
    assert_eq!(text(&back[0], "PRIORITY"), "6", "{back:#?}");
    assert_eq!(session(&lab, frontend), BANNER);
    kgate.wait_for(&["FRONTEND=smtp", "END=client closed"], 2);
    println!("journal files: {}", kgate.dir().display());
}

/// Where journald's socket cannot be reached, kgate writes its lines to the journal's
/// stream, each with its priority, and says once why its fields are missing.
#[test]
fn without_the_journals_socket_lines_go_to_its_stream_with_their_priority() {
    if tests::lab::skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let backend = SocketAddr::new(IpAddr::V4(lab.backend(0).v4()), 2525);
    let frontend = SocketAddr::new(IpAddr::V4(lab.gateway().v4()), 2525);
    let _server = greeter(&lab, backend);
    let config = format!(
        "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{frontend}\"]\nbackend = \"mail\"\n\
         [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"node0\"\n\
         address = \"{backend}\"\n",
        global_section(&lab, "userspace")
    );
    let kgate = JournaledKgate::start(
        &lab,
        &config,
        (pin_path_for(&lab), control_socket_for(&lab)),
        Reach::StreamOnly,
    );
    assert!(kgate.entries(&["_TRANSPORT=journal"]).is_empty());
    let warning = kgate.wait_for(&["--priority=warning"], 1);
    assert_eq!(warning.len(), 1, "{warning:#?}");
    assert!(
        text(&warning[0], "MESSAGE").starts_with(
            "kgate::logging: cannot write to the journal's socket (No such file or directory"
        ),
        "{warning:#?}"
    );
    assert_eq!(text(&warning[0], "PRIORITY"), "4", "{warning:#?}");
    assert_eq!(text(&warning[0], "_TRANSPORT"), "stdout", "{warning:#?}");
    let ready = kgate.wait_for_message(&["PRIORITY=6"], "kgate ready");
    // No time stamp and no level word: the journal has both.
    assert!(
        text(&ready, "MESSAGE").starts_with("kgate::cli::run: kgate ready dataplane="),
        "{ready:#?}"
    );
    assert_eq!(session(&lab, frontend), BANNER);
    let line = kgate.wait_for_message(&[], "end=\"client closed\"");
    assert_eq!(text(&line, "PRIORITY"), "6", "{line:#?}");
}

/// A kgate that cannot start says why at priority err, where `journalctl -p err` finds
/// it, as a plain line on the stream would not be (that is info).
#[test]
fn why_kgate_stops_is_an_error_in_the_journal() {
    if tests::lab::skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    // Not an address of the gateway, and no freebind: kgate cannot listen there.
    let config = format!(
        "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"192.0.2.1:2525\"]\nbackend = \"mail\"\n\
         [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"node0\"\n\
         address = \"{}:2525\"\n",
        global_section(&lab, "userspace"),
        lab.backend(0).v4()
    );
    let (status, kgate) = JournaledKgate::run_to_exit(
        &lab,
        &config,
        (pin_path_for(&lab), control_socket_for(&lab)),
    );
    assert_eq!(status.code(), Some(1));
    let errors = kgate.wait_for(&["--priority=err"], 1);
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(text(&errors[0], "PRIORITY"), "3", "{errors:#?}");
    assert!(
        text(&errors[0], "MESSAGE")
            .starts_with("kgate: frontend `smtp` cannot listen on 192.0.2.1:2525"),
        "{errors:#?}"
    );
}

/// `log_connections = false` on a frontend: its connections make no line; another
/// frontend's still do, and the counters count them all.
#[test]
fn log_connections_off_silences_a_frontends_connection_lines() {
    if tests::lab::skip_without_root() {
        return;
    }
    let rig = Rig::start_with("userspace", 1, "log_connections = false", "");
    let _server = greeter(&rig.lab, rig.backend_addr(0));
    for _ in 0..3 {
        assert_eq!(session(&rig.lab, rig.frontend_v4()), BANNER);
    }
    // A connection's line is written before it stops counting as active.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = rig.kgate.status();
        let frontend = &status["frontends"][0];
        if frontend["total_connections"] == 3 && frontend["active_connections"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{frontend}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = rig.kgate.log();
    assert_eq!(log.matches("kgate::conn").count(), 0, "{log}");
}
