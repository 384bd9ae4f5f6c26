//! The pinned `servers` map as an operator reads it: `bpftool map dump pinned
//! .../servers` prints the live servers only, with their names as text.

use std::{process::Command, thread, time::Duration};

use tests::{lab::skip_without_root, rig::Rig};

fn dump(rig: &Rig, json: bool) -> String {
    let mut bpftool = Command::new("bpftool");
    if json {
        bpftool.arg("-j");
    }
    let out = bpftool
        .args(["map", "dump", "pinned"])
        .arg(rig.kgate.pin_path().join("servers"))
        .output()
        .expect("running bpftool (installed by cargo xtask test)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bpftool_prints_two_servers_in_a_few_lines_with_their_names_as_text() {
    if skip_without_root() {
        return;
    }
    let rig = Rig::start("sockmap", 2);
    // Published at start and every second.
    thread::sleep(Duration::from_millis(1500));
    let text = dump(&rig, false);
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
    let json: serde_json::Value = serde_json::from_str(&dump(&rig, true)).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{json:#}");
    let mut slots: Vec<u64> = entries
        .iter()
        .map(|e| e["formatted"]["key"].as_u64().unwrap())
        .collect();
    slots.sort();
    assert_eq!(slots, [0, 1], "keyed by slot: {json:#}");
}
