//! The pinned `servers` map as an operator reads it: `bpftool map dump pinned
//! .../servers` prints the live servers only, with their names as text.

use std::{thread, time::Duration};

use tests::{bpftool, lab::skip_without_root, rig::Rig};

#[test]
fn bpftool_prints_two_servers_in_a_few_lines_with_their_names_as_text() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start("sockmap", 2);
    // Published at start and every second.
    thread::sleep(Duration::from_millis(1500));
    let servers = rig.kgate.pin_path().join("servers");
    let text = bpftool::dump(&servers);
    let lines = text.lines().count();
    assert!(lines < 80, "{lines} lines for two servers:\n{text}");
    for expected in [
        "\"backend\": \"mail\"",
        "\"server\": \"node0\"",
        "\"server\": \"node1\"",
        &format!("\"address\": \"{}\"", rig.backend_addr(1)),
        "\"state\": \"unchecked\"",
    ] {
        assert!(text.contains(expected), "no {expected} in:\n{text}");
    }
    let json = bpftool::dump_json(&servers);
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{json:#}");
    let mut slots: Vec<u64> = entries
        .iter()
        .map(|e| e["formatted"]["key"].as_u64().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, [0, 1], "keyed by slot: {json:#}");
}
