use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use proxy_common::{
    ServerEntry,
    xdp::{ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE},
};

use crate::{
    config::Config,
    control,
    maps::{self, OriginCounts},
    publish::text,
    xdp,
};

pub fn status(config: &Path, pin_path: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    // With --pin-path the file is optional: it only says where the control socket is.
    let (pin_path, loaded) = match pin_path {
        Some(path) => (path, Config::load(config).ok()),
        None => {
            let loaded = Config::load(config)?;
            (loaded.global.bpf_pin_path.clone(), Some(loaded))
        }
    };
    let servers = maps::read_published(&pin_path).with_context(|| {
        format!(
            "no server state under {}: is kgate running with this bpf_pin_path (and are you root)?",
            pin_path.display()
        )
    })?;
    // Pinned only when the configuration has an [xdp] section.
    let xdp = maps::read_xdp_stats(&pin_path).ok();
    let blocklist = xdp.and_then(|_| {
        let entries = maps::Blocklist::open_pinned(&pin_path)
            .ok()?
            .entries()
            .ok()?;
        Some(OriginCounts::of(
            entries.iter().map(|(_, e)| e),
            xdp::boot_seconds(),
        ))
    });
    // Only the daemon knows how its pulls go: asked over the control socket.
    let crowdsec = loaded
        .filter(|c| c.crowdsec.is_some())
        .map(|c| crowdsec_status(&c.global.control_socket));
    if json {
        let mut value = to_json(&servers);
        if let Some(x) = &xdp {
            value["xdp"] = serde_json::json!({
                "passed": x.passed,
                "dropped_blocklist": x.dropped_blocklist,
                "dropped_syn_rate": x.dropped_syn_rate,
                "malformed": x.malformed,
                "dropped_by_origin": {
                    "file": x.dropped_by(ORIGIN_FILE),
                    "command": x.dropped_by(ORIGIN_COMMAND),
                    "crowdsec": x.dropped_by(ORIGIN_CROWDSEC),
                },
            });
        }
        if let Some(b) = &blocklist {
            value["blocklist"] = serde_json::json!({
                "file": b.file,
                "command": b.command,
                "crowdsec": b.crowdsec,
            });
        }
        if let Some(c) = &crowdsec {
            value["crowdsec"] = match c {
                Ok(status) => status.clone(),
                Err(e) => serde_json::json!({ "state": "unknown", "error": e }),
            };
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("JSON of strings and numbers")
        );
    } else {
        print!("{}", table(&servers));
        if let Some(x) = &xdp {
            println!(
                "\nxdp: passed {}, dropped by blocklist {} (file {}, command {}, crowdsec {}), \
                 dropped by SYN rate {}, malformed (passed) {}",
                x.passed,
                x.dropped_blocklist,
                x.dropped_by(ORIGIN_FILE),
                x.dropped_by(ORIGIN_COMMAND),
                x.dropped_by(ORIGIN_CROWDSEC),
                x.dropped_syn_rate,
                x.malformed
            );
        }
        if let Some(b) = &blocklist {
            println!(
                "blocklist: {} prefixes (file {}, command {}, crowdsec {})",
                b.total(),
                b.file,
                b.command,
                b.crowdsec
            );
        }
        if let Some(c) = &crowdsec {
            println!("{}", crowdsec_line(c));
        }
    }
    Ok(())
}

/// The bouncer's state from the running kgate, as JSON; why not, when it cannot say.
fn crowdsec_status(control_socket: &Path) -> Result<serde_json::Value, String> {
    let reply =
        control::request(&control_socket.to_owned(), "crowdsec").map_err(|e| format!("{e:#}"))?;
    let json = reply
        .strip_prefix("ok ")
        .ok_or_else(|| reply.trim_start_matches("error: ").to_owned())?;
    serde_json::from_str(json).map_err(|e| format!("unreadable answer from kgate: {e}"))
}

/// One line for the table view: `crowdsec: connected to URL, 3 bans, pulled 2s ago
/// (every 10s)`, or since when and why not.
fn crowdsec_line(status: &Result<serde_json::Value, String>) -> String {
    let status = match status {
        Ok(status) => status,
        Err(e) => return format!("crowdsec: state unknown ({e})"),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let ago = |key: &str| {
        status[key].as_u64().map(|t| {
            humantime::format_duration(Duration::from_secs(now.saturating_sub(t))).to_string()
        })
    };
    let url = status["url"].as_str().unwrap_or("?");
    let bans = status["bans"].as_u64().unwrap_or(0);
    let every = status["interval_seconds"].as_u64().unwrap_or(0);
    let last = ago("last_pull").map_or("never".to_owned(), |a| format!("{a} ago"));
    match status["state"].as_str() {
        Some("connected") => {
            format!("crowdsec: connected to {url}, {bans} bans, pulled {last} (every {every}s)")
        }
        Some("unreachable") => format!(
            "crowdsec: UNREACHABLE at {url} for {}: {}; the blocklist keeps its CrowdSec \
             entries (last pull that worked: {last}), retrying",
            ago("since").unwrap_or_default(),
            status["error"].as_str().unwrap_or("?")
        ),
        _ => format!("crowdsec: starting, first pull from {url} not answered yet"),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn unix_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn the_crowdsec_line_says_how_pulls_go_and_what_to_do_when_they_fail() {
        let now = unix_now();
        let connected = serde_json::json!({
            "url": "http://127.0.0.1:8080/", "interval_seconds": 10, "state": "connected",
            "since": now - 600, "last_pull": now - 3, "error": null, "bans": 3,
            "pulls": 60, "failed_pulls": 0,
        });
        assert_eq!(
            crowdsec_line(&Ok(connected)),
            "crowdsec: connected to http://127.0.0.1:8080/, 3 bans, pulled 3s ago (every 10s)"
        );
        let down = serde_json::json!({
            "url": "http://127.0.0.1:8080/", "interval_seconds": 10, "state": "unreachable",
            "since": now - 45, "last_pull": null, "error": "cannot connect: Connection refused",
            "bans": 0, "pulls": 0, "failed_pulls": 4,
        });
        assert_eq!(
            crowdsec_line(&Ok(down)),
            "crowdsec: UNREACHABLE at http://127.0.0.1:8080/ for 45s: cannot connect: Connection \
             refused; the blocklist keeps its CrowdSec entries (last pull that worked: never), \
             retrying"
        );
        assert_eq!(
            crowdsec_line(&Err("cannot reach kgate".to_owned())),
            "crowdsec: state unknown (cannot reach kgate)"
        );
    }
}
