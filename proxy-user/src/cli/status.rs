//! `kgate status`: the running kgate's status document (proxy-user/src/status.rs), asked
//! for over the control socket, as tables or as JSON. The stats page shows the same
//! document.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{
    config::Config,
    control,
    status::{ServerStatus, Status},
};

pub fn status(config: &Path, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let socket = match socket {
        Some(path) => path,
        None => Config::load(config)?.global.control_socket,
    };
    let reply = control::request(&socket, "status")?;
    let Some(document) = reply.strip_prefix("ok ") else {
        bail!("kgate answered {reply:?}");
    };
    let status: Status =
        serde_json::from_str(document).context("kgate's status document does not parse")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("JSON of strings and numbers")
        );
    } else {
        print!("{}", text(&status));
    }
    Ok(())
}

/// The document as a header line and aligned tables.
fn text(status: &Status) -> String {
    let about = &status.kgate;
    let mut out = format!(
        "kgate {} on {}, pid {}, up {}, {} data plane; {} connections open{}\n\n",
        about.version,
        about.host,
        about.pid,
        ago(about.started, about.now),
        about.dataplane,
        about.open_connections,
        about
            .parked_connections
            .map(|n| format!(" ({n} parked)"))
            .unwrap_or_default()
    );
    let frontends: Vec<Vec<String>> = status
        .frontends
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.listen.join(","),
                f.backend.clone(),
                match f.max_connections {
                    Some(max) => format!("{}/{max}", f.active_connections),
                    None => f.active_connections.to_string(),
                },
                f.total_connections.to_string(),
                f.refused.to_string(),
                format!("{}/{}", f.rate, f.rate_max),
                format!("{}/{}", f.bytes_in, f.bytes_out),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "frontend",
            "listen",
            "backend",
            "active",
            "total",
            "refused",
            "rate/max",
            "bytes in/out",
        ],
        &frontends,
    ));
    for f in &status.frontends {
        if let Some(refused) = &f.proxy_refused {
            let counts: Vec<String> = refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
            out.push_str(&format!(
                "{}: PROXY headers refused: {}\n",
                f.name,
                counts.join(", ")
            ));
        }
    }
    out.push('\n');
    let servers: Vec<Vec<String>> = status
        .servers
        .iter()
        .map(|s| server_row(s, about.now))
        .collect();
    out.push_str(&table(
        &[
            "backend",
            "server",
            "address",
            "state",
            "since",
            "check",
            "ok",
            "fail",
            "active",
            "total",
            "rate",
            "spliced/half/copied",
            "bytes in/out",
            "reason",
        ],
        &servers,
    ));
    for b in &status.backends {
        if b.no_server > 0 {
            out.push_str(&format!(
                "{}: {} clients closed with no server to take them\n",
                b.name, b.no_server
            ));
        }
    }
    if let Some(x) = &status.xdp {
        out.push_str(&format!(
            "\nxdp: passed {}, dropped by blocklist {}, dropped by SYN rate {}, malformed (passed) {}; {} blocklist entries\n",
            x.passed, x.dropped_blocklist, x.dropped_syn_rate, x.malformed, x.blocklist_entries
        ));
    }
    out
}

fn server_row(s: &ServerStatus, now: u64) -> Vec<String> {
    let check = match (s.last_check.as_str(), s.last_check_ms) {
        ("", _) => "-".to_owned(),
        (result, Some(ms)) => format!("{result} {ms}ms"),
        (result, None) => result.to_owned(),
    };
    let reason = match &s.last_check_detail {
        Some(detail) if !s.reason.contains(detail.as_str()) => {
            format!("{} (last check: {detail})", s.reason)
        }
        _ => s.reason.clone(),
    };
    vec![
        s.backend.clone(),
        s.server.clone(),
        s.address.clone(),
        s.state.clone(),
        ago(s.since, now),
        check,
        s.consecutive_ok.to_string(),
        s.consecutive_fail.to_string(),
        s.active_connections.to_string(),
        s.total_connections.to_string(),
        s.rate.to_string(),
        format!(
            "{}/{}/{}",
            s.spliced_connections, s.half_spliced_connections, s.copied_connections
        ),
        format!("{}/{}", s.bytes_in, s.bytes_out),
        reason,
    ]
}

/// How long from `then` to `now`, to the second: "2h 13m 5s".
fn ago(then: u64, now: u64) -> String {
    humantime::format_duration(Duration::from_secs(now.saturating_sub(then))).to_string()
}

/// Columns aligned, the last one left ragged, as HAProxy's `show servers state` reads.
fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..columns.len())
        .map(|c| {
            rows.iter()
                .map(|r| r[c].len())
                .chain([columns[c].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (c, cell) in cells.enumerate() {
            if c + 1 == columns.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut columns.iter().copied());
    for row in rows {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns_and_durations_read_as_time() {
        let t = table(
            &["a", "bb", "c"],
            &[vec!["xxx".into(), "y".into(), "last".into()]],
        );
        assert_eq!(t, "a    bb  c\nxxx  y   last\n");
        assert_eq!(ago(100, 100 + 7_385), "2h 3m 5s");
        assert_eq!(ago(100, 50), "0s");
    }
}
