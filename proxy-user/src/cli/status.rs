use std::path::{Path, PathBuf};

use anyhow::Context as _;
use proxy_common::ServerEntry;

use crate::{config::Config, maps, publish::text};

pub fn status(config: &Path, pin_path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let pin_path = match pin_path {
        Some(path) => path,
        None => Config::load(config)?.global.bpf_pin_path,
    };
    let servers = maps::read_published(&pin_path).with_context(|| {
        format!(
            "no server state under {}: is kgate running with this bpf_pin_path (and are you root)?",
            pin_path.display()
        )
    })?;
    // Pinned only when the configuration has an [xdp] section.
    let xdp = maps::read_xdp_stats(&pin_path).ok();
    if json {
        let mut value = to_json(&servers);
        if let Some(x) = &xdp {
            value["xdp"] = serde_json::json!({
                "passed": x.passed,
                "dropped_blocklist": x.dropped_blocklist,
                "dropped_syn_rate": x.dropped_syn_rate,
                "malformed": x.malformed,
            });
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON of strings and numbers")
        );
    } else {
        print!("{}", table(&servers));
        if let Some(x) = &xdp {
            println!(
                "\nxdp: passed {}, dropped by blocklist {}, dropped by SYN rate {}, malformed (passed) {}",
                x.passed, x.dropped_blocklist, x.dropped_syn_rate, x.malformed
            );
        }
    }
    Ok(())
}

const COLUMNS: [&str; 10] = [
    "backend",
    "server",
    "address",
    "state",
    "check",
    "ok",
    "fail",
    "active",
    "total",
    "bytes in/out",
];

fn row(e: &ServerEntry) -> [String; 10] {
    [
        text(&e.backend),
        text(&e.server),
        text(&e.address),
        text(&e.state),
        text(&e.last_check),
        e.consecutive_ok.to_string(),
        e.consecutive_fail.to_string(),
        e.active_connections.to_string(),
        e.total_connections.to_string(),
        format!("{}/{}", e.bytes_in, e.bytes_out),
    ]
}

/// One line per server, columns aligned, as HAProxy's `show servers state` reads.
fn table(servers: &[ServerEntry]) -> String {
    let rows: Vec<[String; 10]> = servers.iter().map(row).collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([COLUMNS[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let mut out = String::new();
        for (c, cell) in cells.iter().enumerate() {
            if c + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&COLUMNS);
    for r in &rows {
        out.push_str(&line(&r.iter().map(String::as_str).collect::<Vec<_>>()));
    }
    out
}

fn to_json(servers: &[ServerEntry]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = servers
        .iter()
        .map(|e| {
            serde_json::json!({
                "backend": text(&e.backend),
                "server": text(&e.server),
                "address": text(&e.address),
                "state": text(&e.state),
                "last_check": text(&e.last_check),
                "consecutive_ok": e.consecutive_ok,
                "consecutive_fail": e.consecutive_fail,
                "active_connections": e.active_connections,
                "total_connections": e.total_connections,
                "bytes_in": e.bytes_in,
                "bytes_out": e.bytes_out,
            })
        })
        .collect();
    serde_json::json!({ "servers": items })
}
