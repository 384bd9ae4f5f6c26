//! `kgate status`: the running kgate's status document (proxy-user/src/status.rs), asked
//! for over the control socket, as tables or as JSON. The stats page shows the same
//! document.

use std::time::Duration;

use anyhow::{Context as _, bail};

use super::ControlSocket;
use crate::{
    control,
    status::{ServerStatus, Status},
    xdp::crowdsec::{BouncerStatus, LapiState},
};

pub fn status(socket: &ControlSocket, json: bool) -> anyhow::Result<()> {
    let reply = socket.request("status", control::REQUEST_TIMEOUT)?;
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
        "kgate {} on {}, pid {}, up {}, {} data plane; {} connection{} open{}\n\n",
        about.version,
        about.host,
        about.pid,
        ago(about.started, about.now),
        about.dataplane,
        about.open_connections,
        if about.open_connections == 1 { "" } else { "s" },
        about
            .parked_connections
            .map(|n| format!(" ({n} parked)"))
            .or_else(|| about.packet.as_ref().map(|p| {
                let fallbacks: Vec<String> = p
                    .fallbacks
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(reason, n)| format!("{reason} {n}"))
                    .collect();
                format!(
                    " ({} forwarded; {} handed off{})",
                    p.forwarded_connections,
                    p.handoffs,
                    if fallbacks.is_empty() {
                        String::new()
                    } else {
                        format!(", stayed copied: {}", fallbacks.join(", "))
                    }
                )
            }))
            .unwrap_or_default()
    );
    if let Some(reason) = about.packet.as_ref().and_then(|p| p.unavailable.as_ref()) {
        out.insert_str(
            out.len() - 1,
            &format!("the packet data plane's programs are not loaded ({reason}): every connection is copied\n"),
        );
    }
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
            "spliced/half/fwd/copied",
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
        let (d, e) = (&x.dropped_by_origin, &x.blocklist_by_origin);
        out.push_str(&format!(
            "\nxdp: passed {}, dropped by blocklist {} (file {}, command {}, crowdsec {}), \
             dropped by SYN rate {}, malformed (passed) {}; {} blocklist entries (file {}, \
             command {}, crowdsec {})\n",
            x.passed,
            x.dropped_blocklist,
            d.file,
            d.command,
            d.crowdsec,
            x.dropped_syn_rate,
            x.malformed,
            x.blocklist_entries,
            e.file,
            e.command,
            e.crowdsec
        ));
    }
    if let Some(bouncer) = &status.crowdsec {
        out.push_str(&crowdsec_line(bouncer, status.kgate.now));
        out.push('\n');
    }
    out
}

/// The CrowdSec bouncer in one line: `crowdsec: connected to URL, 3 bans, pulled 2s
/// ago (every 10s)`, or since when and why not.
fn crowdsec_line(bouncer: &BouncerStatus, now: u64) -> String {
    let last = bouncer
        .last_pull
        .map_or("never".to_owned(), |t| format!("{} ago", ago(t, now)));
    match bouncer.state {
        LapiState::Connected => format!(
            "crowdsec: connected to {}, {} bans, pulled {last} (every {}s)",
            bouncer.url, bouncer.bans, bouncer.interval_seconds
        ),
        LapiState::Unreachable => format!(
            "crowdsec: UNREACHABLE at {} for {}: {}; the blocklist keeps its CrowdSec \
             entries (last pull that worked: {last}), retrying",
            bouncer.url,
            ago(bouncer.since, now),
            bouncer.error.as_deref().unwrap_or("?")
        ),
        LapiState::Starting => format!(
            "crowdsec: starting, first pull from {} not answered yet",
            bouncer.url
        ),
    }
}

fn server_row(s: &ServerStatus, now: u64) -> Vec<String> {
    let check = match (s.last_check.as_str(), s.last_check_us) {
        ("", _) => "-".to_owned(),
        (result, Some(us)) => format!("{result} {:.1}ms", us as f64 / 1000.0),
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
            "{}/{}/{}/{}",
            s.spliced_connections,
            s.half_spliced_connections,
            s.forwarded_connections,
            s.copied_connections
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
    use crate::status::{About, BackendStatus, ByOrigin, FrontendStatus, XdpStatus};

    fn sample() -> Status {
        let server = ServerStatus {
            backend: "mail".into(),
            server: "node1".into(),
            address: "192.0.2.11:25".into(),
            weight: 1,
            state: "down".into(),
            reason: "connection refused (3 failed checks in a row)".into(),
            since: 1_000,
            last_check: "refused".into(),
            last_check_detail: Some("connection refused".into()),
            last_check_at: Some(1_118),
            last_check_us: Some(3_200),
            consecutive_ok: 0,
            consecutive_fail: 5,
            active_connections: 3,
            total_connections: 40,
            rate: 1.5,
            spliced_connections: 2,
            half_spliced_connections: 0,
            forwarded_connections: 0,
            copied_connections: 1,
            bytes_in: 100,
            bytes_out: 2000,
        };
        Status {
            kgate: About {
                version: "0.1.0".into(),
                host: "gw1".into(),
                pid: 7,
                now: 1_120,
                started: 1_000,
                dataplane: "sockmap".into(),
                open_connections: 3,
                parked_connections: Some(2),
                packet: None,
            },
            frontends: vec![FrontendStatus {
                name: "smtp".into(),
                listen: vec!["192.0.2.1:25".into()],
                backend: "mail".into(),
                active_connections: 3,
                max_connections: Some(100),
                total_connections: 40,
                refused: 2,
                rate: 1.5,
                rate_max: 9.0,
                bytes_in: 90,
                bytes_out: 1900,
                proxy_refused: Some([("untrusted".to_owned(), 4)].into()),
            }],
            backends: vec![BackendStatus {
                name: "mail".into(),
                balance: "roundrobin".into(),
                proxy_protocol: "v2".into(),
                check: "smtp".into(),
                no_server: 0,
            }],
            servers: vec![server],
            xdp: Some(XdpStatus {
                passed: 10,
                dropped_blocklist: 2,
                dropped_syn_rate: 1,
                malformed: 0,
                blocklist_entries: 5,
                blocklist_by_origin: ByOrigin {
                    file: 1,
                    command: 2,
                    crowdsec: 2,
                },
                dropped_by_origin: ByOrigin {
                    file: 0,
                    command: 0,
                    crowdsec: 2,
                },
            }),
            crowdsec: Some(BouncerStatus {
                url: "http://127.0.0.1:8080/".into(),
                interval_seconds: 10,
                state: LapiState::Connected,
                since: 1000,
                last_pull: Some(1117),
                error: None,
                bans: 2,
                pulls: 12,
                failed_pulls: 0,
            }),
        }
    }

    #[test]
    fn the_text_shows_every_part_of_the_document() {
        let out = text(&sample());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "kgate 0.1.0 on gw1, pid 7, up 2m, sockmap data plane; 3 connections open (2 parked)"
        );
        assert!(lines[2].starts_with("frontend  listen"), "{out}");
        let frontend: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            frontend,
            [
                "smtp",
                "192.0.2.1:25",
                "mail",
                "3/100",
                "40",
                "2",
                "1.5/9",
                "90/1900"
            ]
        );
        assert_eq!(lines[4], "smtp: PROXY headers refused: untrusted 4");
        let server: Vec<&str> = lines[7].split_whitespace().collect();
        assert_eq!(
            server[..14],
            [
                "mail",
                "node1",
                "192.0.2.11:25",
                "down",
                "2m",
                "refused",
                "3.2ms",
                "0",
                "5",
                "3",
                "40",
                "1.5",
                "2/0/0/1",
                "100/2000"
            ]
        );
        assert!(
            lines[7].ends_with("connection refused (3 failed checks in a row)"),
            "the failure is in the reason already: {}",
            lines[7]
        );
        assert_eq!(
            lines[9],
            "xdp: passed 10, dropped by blocklist 2 (file 0, command 0, crowdsec 2), dropped by \
             SYN rate 1, malformed (passed) 0; 5 blocklist entries (file 1, command 2, crowdsec 2)"
        );
        assert_eq!(
            lines[10],
            "crowdsec: connected to http://127.0.0.1:8080/, 2 bans, pulled 3s ago (every 10s)"
        );
    }

    #[test]
    fn an_unreachable_lapi_says_since_when_why_and_that_the_bans_stay() {
        let bouncer = BouncerStatus {
            url: "http://127.0.0.1:8080/".into(),
            interval_seconds: 10,
            state: LapiState::Unreachable,
            since: 1000,
            last_pull: None,
            error: Some("cannot connect: Connection refused".into()),
            bans: 0,
            pulls: 0,
            failed_pulls: 4,
        };
        assert_eq!(
            crowdsec_line(&bouncer, 1045),
            "crowdsec: UNREACHABLE at http://127.0.0.1:8080/ for 45s: cannot connect: Connection \
             refused; the blocklist keeps its CrowdSec entries (last pull that worked: never), \
             retrying"
        );
    }

    #[test]
    fn the_document_survives_its_trip_through_json() {
        let status = sample();
        let json = serde_json::to_string(&status).unwrap();
        assert!(
            !json.contains('\n'),
            "one line, as the control socket's reply is"
        );
        assert_eq!(serde_json::from_str::<Status>(&json).unwrap(), status);
    }

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
