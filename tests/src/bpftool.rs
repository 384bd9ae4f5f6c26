//! What `bpftool` prints of a pinned map, as an operator runs it.

use std::{path::Path, process::Command};

/// `bpftool map dump pinned <pin>`: the entries, fields by name (BTF).
pub fn dump(pin: &Path) -> String {
    String::from_utf8(run(&["map", "dump", "pinned"], pin)).expect("bpftool prints text")
}

/// `bpftool -j map dump pinned <pin>`, parsed.
pub fn dump_json(pin: &Path) -> serde_json::Value {
    serde_json::from_slice(&run(&["-j", "map", "dump", "pinned"], pin))
        .expect("bpftool -j prints JSON")
}

/// `bpftool -j map show pinned <pin>`, parsed.
pub fn show_json(pin: &Path) -> serde_json::Value {
    serde_json::from_slice(&run(&["-j", "map", "show", "pinned"], pin))
        .expect("bpftool -j prints JSON")
}

fn run(args: &[&str], pin: &Path) -> Vec<u8> {
    let out = Command::new("bpftool")
        .args(args)
        .arg(pin)
        .output()
        .expect("running bpftool (installed by cargo xtask test)");
    assert!(
        out.status.success(),
        "bpftool {} {}: {}",
        args.join(" "),
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
