//! Prometheus metrics, served on `metrics_listen` at `/metrics` by `web`.
//!
//! Nothing is counted twice: at each scrape [`families`] reads the counters the daemon
//! keeps anyway (the status document for what it shows, the pools and the eBPF maps
//! for the rest), so `/metrics`, `kgate status` and the stats page agree. Counters of
//! servers and frontends that a reload kept go on counting.
//!
//! Two formats, chosen by the scraper's `Accept` header ([`Format::negotiate`]):
//! Prometheus' text format 0.0.4 by default, which every scraper reads, and
//! OpenMetrics 1.0 when asked for. They differ in ways a parser notices: a counter's
//! family is `x_total` in the text format, `x` (with `x_total` samples and `# EOF` at
//! the end) in OpenMetrics. prometheus-client writes OpenMetrics only, so the text
//! format is written here ([`write_text`]); both come from the same [`Family`] list.

use std::{
    fmt::{self, Write as _},
    sync::atomic::Ordering,
    time::SystemTime,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use crate::{daemon::Daemon, dataplane::Dataplane, status};

/// The format of a scrape's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `text/plain; version=0.0.4`.
    Text,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when `accept` (the request's `Accept` header) lists it with a
    /// quality above zero, as Prometheus does when it prefers it; the text format
    /// otherwise.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let wants_openmetrics = accept.unwrap_or_default().split(',').any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f64>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The metrics of `daemon` now, in `format`.
pub fn render(daemon: &Daemon, format: Format) -> Result<String, fmt::Error> {
    let families = families(daemon);
    let mut body = String::new();
    match format {
        Format::Text => write_text(&mut body, &families)?,
        Format::OpenMetrics => {
            let mut registry = Registry::default();
            registry.register_collector(Box::new(Snapshot(families)));
            prometheus_client::encoding::text::encode(&mut body, &registry)?;
        }
    }
    Ok(body)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(n) => write!(f, "{n}"),
            // Rust writes 5.0 as "5" and never uses an exponent: both formats take it.
            Value::Float(x) => write!(f, "{x}"),
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// One metric: its name (a counter's without `_total`), help, type and series.
#[derive(Debug)]
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub series: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, help: &'static str, kind: Kind) -> Family {
        Family {
            name,
            help,
            kind,
            series: Vec::new(),
        }
    }

    fn with(mut self, labels: Labels, value: Value) -> Family {
        self.series.push((labels, value));
        self
    }

    fn of<T>(
        name: &'static str,
        help: &'static str,
        kind: Kind,
        items: &[T],
        series: impl Fn(&T) -> (Labels, Value),
    ) -> Family {
        Family {
            series: items.iter().map(series).collect(),
            ..Family::new(name, help, kind)
        }
    }
}

/// The text format 0.0.4: `# HELP`, `# TYPE` and the samples of each family, a
/// counter's family named with its `_total`.
pub fn write_text(out: &mut String, families: &[Family]) -> fmt::Result {
    for family in families.iter().filter(|f| !f.series.is_empty()) {
        let (name, kind, suffix) = match family.kind {
            Kind::Counter => (family.name, "counter", "_total"),
            Kind::Gauge => (family.name, "gauge", ""),
        };
        let help = family.help.replace('\\', "\\\\").replace('\n', "\\n");
        writeln!(out, "# HELP {name}{suffix} {help}")?;
        writeln!(out, "# TYPE {name}{suffix} {kind}")?;
        for (labels, value) in &family.series {
            write!(out, "{name}{suffix}")?;
            if !labels.is_empty() {
                out.push('{');
                for (i, (key, value)) in labels.iter().enumerate() {
                    let value = value
                        .replace('\\', "\\\\")
                        .replace('"', "\\\"")
                        .replace('\n', "\\n");
                    let comma = if i == 0 { "" } else { "," };
                    write!(out, "{comma}{key}=\"{value}\"")?;
                }
                out.push('}');
            }
            writeln!(out, " {value}")?;
        }
    }
    Ok(())
}

/// One scrape's families, handed to prometheus-client for OpenMetrics.
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        for family in self.0.iter().filter(|f| !f.series.is_empty()) {
            let kind = match family.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
            };
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            for (labels, value) in &family.series {
                let mut sample = metric.encode_family(labels)?;
                match (family.kind, *value) {
                    (Kind::Counter, Value::Int(n)) => {
                        sample.encode_counter::<NoLabelSet, _, u64>(&n, None)?
                    }
                    (Kind::Counter, Value::Float(x)) => {
                        sample.encode_counter::<NoLabelSet, _, u64>(&x, None)?
                    }
                    (Kind::Gauge, Value::Int(n)) => sample.encode_gauge(&n)?,
                    (Kind::Gauge, Value::Float(x)) => sample.encode_gauge(&x)?,
                }
            }
        }
        Ok(())
    }
}

/// Every state `kgate status` shows: `kgate_server_state` has a series for each, 1 for
/// the server's own and 0 for the others, so no series appears or vanishes.
const SERVER_STATES: [&str; 5] = ["up", "down", "unchecked", "drain", "maint"];

/// Every metric of `daemon`, now.
pub fn families(daemon: &Daemon) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    use Value::{Float, Int};
    let gateway = daemon.gateway();
    let document = status::build(daemon);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut all = process_families(daemon);

    let frontends = &document.frontends;
    let frontend = |name: &str| vec![("frontend", name.to_owned())];
    all.extend([
        Family::of(
            "kgate_frontend_connections",
            "Clients admitted",
            Counter,
            frontends,
            |f| (frontend(&f.name), Int(f.total_connections)),
        ),
        Family::of(
            "kgate_frontend_active_connections",
            "Clients connected now",
            Gauge,
            frontends,
            |f| (frontend(&f.name), Int(f.active_connections)),
        ),
        Family::of(
            "kgate_frontend_refused",
            "Clients closed at once over max_connections or max_connections_per_source",
            Counter,
            frontends,
            |f| (frontend(&f.name), Int(f.refused)),
        ),
        Family::of(
            "kgate_frontend_bytes_in",
            "Bytes from clients, counted as they move: open connections' too",
            Counter,
            frontends,
            |f| (frontend(&f.name), Int(f.bytes_in)),
        ),
        Family::of(
            "kgate_frontend_bytes_out",
            "Bytes to clients, counted as they move: open connections' too",
            Counter,
            frontends,
            |f| (frontend(&f.name), Int(f.bytes_out)),
        ),
        Family {
            series: frontends
                .iter()
                .flat_map(|f| {
                    f.proxy_refused.iter().flatten().map(|(reason, &n)| {
                        let mut labels = frontend(&f.name);
                        labels.push(("reason", reason.clone()));
                        (labels, Int(n))
                    })
                })
                .collect(),
            ..Family::new(
                "kgate_frontend_proxy_header_refused",
                "Clients of an accept_proxy frontend closed before their PROXY header was \
                 taken, by reason: untrusted source, timeout, missing, truncated, oversized, \
                 malformed",
                Counter,
            )
        },
    ]);

    let backend = |name: &str| vec![("backend", name.to_owned())];
    let pools: Vec<_> = gateway.config.backends.iter().zip(&gateway.pools).collect();
    all.extend([
        Family::of(
            "kgate_backend_no_server",
            "Clients closed at once because no server could take them",
            Counter,
            &document.backends,
            |b| (backend(&b.name), Int(b.no_server)),
        ),
        Family::of(
            "kgate_backend_retries",
            "Connects to a further server after one failed (see retries)",
            Counter,
            &pools,
            |(b, p)| {
                (
                    backend(&b.name),
                    Int(p.counters.retries.load(Ordering::Relaxed)),
                )
            },
        ),
    ]);

    // The document's servers, beside the runtime counters it does not show.
    let servers: Vec<_> = status::servers(&gateway, daemon.status_maps.as_ref())
        .into_iter()
        .zip(pools.iter().flat_map(|(_, p)| p.servers.iter()))
        .map(|((_, server), runtime)| (server, runtime.clone()))
        .collect();
    let server = |s: &status::ServerStatus| {
        vec![("backend", s.backend.clone()), ("server", s.server.clone())]
    };
    let runtime_counter = |name, help, counter: fn(&crate::pool::ServerRuntime) -> u64| {
        Family::of(name, help, Counter, &servers, |(s, r)| {
            (server(s), Int(counter(r)))
        })
    };
    all.extend([
        Family::of(
            "kgate_server_connections",
            "Connections made to the server",
            Counter,
            &servers,
            |(s, _)| (server(s), Int(s.total_connections)),
        ),
        Family::of(
            "kgate_server_active_connections",
            "Connections open to the server now",
            Gauge,
            &servers,
            |(s, _)| (server(s), Int(s.active_connections)),
        ),
        runtime_counter(
            "kgate_server_connect_errors",
            "Connects to the server that failed or timed out (the next server was tried)",
            |r| r.connect_errors.load(Ordering::Relaxed),
        ),
        Family::of(
            "kgate_server_bytes_in",
            "Bytes from clients to the server, open connections' included (spliced ones \
             counted by the eBPF program)",
            Counter,
            &servers,
            |(s, _)| (server(s), Int(s.bytes_in)),
        ),
        Family::of(
            "kgate_server_bytes_out",
            "Bytes from the server to clients, open connections' included",
            Counter,
            &servers,
            |(s, _)| (server(s), Int(s.bytes_out)),
        ),
        runtime_counter(
            "kgate_server_checks_passed",
            "Health checks that passed",
            |r| r.checks_passed.load(Ordering::Relaxed),
        ),
        runtime_counter(
            "kgate_server_checks_failed",
            "Health checks that failed",
            |r| r.checks_failed.load(Ordering::Relaxed),
        ),
        Family::of(
            "kgate_server_check_duration_seconds",
            "How long the last health check took (connect to close)",
            Gauge,
            // Before the first check there is no duration: no series yet.
            &servers
                .iter()
                .filter(|(s, _)| s.last_check_us.is_some())
                .collect::<Vec<_>>(),
            |(s, _)| {
                let us = s.last_check_us.unwrap_or_default();
                (server(s), Float(us as f64 / 1e6))
            },
        ),
        Family::of(
            "kgate_server_up",
            "1 when the server takes new connections (ready and not down)",
            Gauge,
            &servers,
            |(s, r)| (server(s), Int(r.takes_connections(None).into())),
        ),
        Family {
            series: servers
                .iter()
                .flat_map(|(s, _)| {
                    SERVER_STATES.iter().map(|state| {
                        let mut labels = server(s);
                        labels.push(("state", (*state).to_owned()));
                        (labels, Int(u64::from(s.state == *state)))
                    })
                })
                .collect(),
            ..Family::new(
                "kgate_server_state",
                "1 for the server's state as kgate status shows it (label state), 0 for the \
                 others",
                Gauge,
            )
        },
        Family::of(
            "kgate_server_state_age_seconds",
            "Seconds since the server came to its state",
            Gauge,
            &servers,
            |(s, _)| (server(s), Float((now - s.since as f64).max(0.0).floor())),
        ),
        Family::of(
            "kgate_server_weight",
            "The server's weight (1 to 256)",
            Gauge,
            &servers,
            |(s, _)| (server(s), Int(s.weight.into())),
        ),
    ]);

    all.extend(dataplane_families(daemon));
    if let Some(xdp) = &document.xdp {
        let verdict = |v: &str| vec![("verdict", v.to_owned())];
        all.push(
            Family::new(
                "kgate_xdp_packets",
                "Packets the XDP program saw, by verdict",
                Counter,
            )
            .with(verdict("passed"), Int(xdp.passed))
            .with(verdict("dropped_blocklist"), Int(xdp.dropped_blocklist))
            .with(verdict("dropped_syn_rate"), Int(xdp.dropped_syn_rate)),
        );
        let by_origin = |family: Family, counts: &status::ByOrigin| {
            let origin = |o: &str| vec![("origin", o.to_owned())];
            family
                .with(origin("file"), Int(counts.file))
                .with(origin("command"), Int(counts.command))
                .with(origin("crowdsec"), Int(counts.crowdsec))
        };
        all.push(by_origin(
            Family::new(
                "kgate_xdp_blocklist_drops",
                "Packets the XDP program dropped by blocklist, by the origin of the entry",
                Counter,
            ),
            &xdp.dropped_by_origin,
        ));
        all.push(by_origin(
            Family::new(
                "kgate_blocklist_entries",
                "Blocklist prefixes that apply, by origin",
                Gauge,
            ),
            &xdp.blocklist_by_origin,
        ));
    }
    if let Some(bouncer) = &document.crowdsec {
        let connected = bouncer.state == crate::xdp::crowdsec::LapiState::Connected;
        all.extend([
            Family::new(
                "kgate_crowdsec_lapi_up",
                "1 when the last pull of CrowdSec decisions worked",
                Gauge,
            )
            .with(vec![], Int(connected.into())),
            Family::new(
                "kgate_crowdsec_bans",
                "Prefixes banned by the CrowdSec decisions kgate holds",
                Gauge,
            )
            .with(vec![], Int(bouncer.bans as u64)),
            Family::new(
                "kgate_crowdsec_pulls",
                "Pulls of the CrowdSec decision stream, by result",
                Counter,
            )
            .with(vec![("result", "ok".to_owned())], Int(bouncer.pulls))
            .with(
                vec![("result", "failed".to_owned())],
                Int(bouncer.failed_pulls),
            ),
        ]);
    }
    all
}

fn dataplane_families(daemon: &Daemon) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    use Value::Int;
    let one = |name, help, kind, value| Family::new(name, help, kind).with(vec![], value);
    match &daemon.dataplane {
        Dataplane::Sockmap(sockmap) => {
            let mut all = vec![one(
                "kgate_parked_connections",
                "Spliced connections with nothing to do, watched without a task of their own",
                Gauge,
                Int(sockmap.parking.parked() as u64),
            )];
            if let Ok(stats) = sockmap.maps.stats() {
                all.extend([
                    one(
                        "kgate_splice_redirected_bytes",
                        "Bytes the eBPF program spliced",
                        Counter,
                        Int(stats.redirected_bytes),
                    ),
                    one(
                        "kgate_splice_passed_bytes",
                        "Bytes passed to kgate because a direction was over its queue_limit",
                        Counter,
                        Int(stats.passed_bytes),
                    ),
                    one(
                        "kgate_splice_trimmed_bytes",
                        "Bytes cut off segments: retransmitted ones the eBPF program had \
                         forwarded already, or read by kgate before the connection joined \
                         the splice",
                        Counter,
                        Int(stats.trimmed_bytes),
                    ),
                    one(
                        "kgate_splice_trim_failures",
                        "Segments whose repeated bytes could not be cut off (their connection \
                         is reset)",
                        Counter,
                        Int(stats.trim_failures),
                    ),
                ]);
            }
            all
        }
        Dataplane::Packet(packet) => {
            let mut all = vec![
                Family::new(
                    "kgate_packet_forwarded_connections",
                    "Connections the packet data plane's TC programs forward now",
                    Gauge,
                )
                .with(vec![], Int(packet.forwarded() as u64)),
                Family::new(
                    "kgate_packet_handoffs",
                    "Connections handed off to the TC programs",
                    Counter,
                )
                .with(vec![], Int(packet.handed_off())),
                Family {
                    series: packet
                        .fallbacks()
                        .map(|(reason, n)| (vec![("reason", reason.as_str().to_owned())], Int(n)))
                        .collect(),
                    ..Family::new(
                        "kgate_packet_fallbacks",
                        "Connections that stayed copied instead of forwarded, by reason",
                        Counter,
                    )
                },
            ];
            if let Some(Ok(stats)) = packet.stats() {
                all.push(Family {
                    series: [
                        ("forwarded", stats.forwarded_segments),
                        ("dropped_frozen", stats.frozen_drops),
                        ("held_window_closed", stats.held_windows),
                        ("silenced", stats.silenced),
                        ("no_route", stats.no_route),
                        ("malformed", stats.malformed),
                    ]
                    .map(|(what, n)| (vec![("action", what.to_owned())], Int(n)))
                    .into(),
                    ..Family::new(
                        "kgate_packet_segments",
                        "Segments the TC programs handled, by what they did",
                        Counter,
                    )
                });
                all.push(
                    Family::new(
                        "kgate_packet_forwarded_bytes",
                        "Payload bytes the TC programs forwarded, retransmissions included",
                        Counter,
                    )
                    .with(vec![], Int(stats.forwarded_bytes)),
                );
            }
            all
        }
        Dataplane::Userspace => Vec::new(),
    }
}

/// The process metrics every Prometheus client library exports, read from /proc.
fn process_families(daemon: &Daemon) -> Vec<Family> {
    use Kind::{Counter, Gauge};
    use Value::{Float, Int};
    let started = daemon
        .started
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    let mut all = vec![
        Family::new(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch, in seconds",
            Gauge,
        )
        .with(vec![], Float(started.floor())),
    ];
    let page = page_size();
    // statm: sizes in pages; the first is the virtual size, the second the resident.
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let pages: Vec<u64> = statm
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
        if let [virtual_pages, resident_pages, ..] = pages[..] {
            all.push(
                Family::new(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    Gauge,
                )
                .with(vec![], Int(resident_pages * page)),
            );
            all.push(
                Family::new(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    Gauge,
                )
                .with(vec![], Int(virtual_pages * page)),
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        all.push(
            Family::new("process_open_fds", "Number of open file descriptors", Gauge)
                // Less the one read_dir holds open.
                .with(vec![], Int(fds.count().saturating_sub(1) as u64)),
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        all.push(
            Family::new(
                "process_max_fds",
                "Maximum number of open file descriptors",
                Gauge,
            )
            .with(vec![], Int(limit.rlim_cur)),
        );
    }
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        all.push(
            Family::new(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                Counter,
            )
            .with(
                vec![],
                Float(seconds(usage.ru_utime) + seconds(usage.ru_stime)),
            ),
        );
    }
    all
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Family> {
        vec![
            Family::new("kgate_x", "Things \\ counted\nhere", Kind::Counter)
                .with(vec![("server", "a\"b\\c".to_owned())], Value::Int(3)),
            Family::new("kgate_y", "A gauge", Kind::Gauge).with(vec![], Value::Float(0.25)),
            Family::new("kgate_empty", "Nothing", Kind::Gauge),
        ]
    }

    #[test]
    fn the_text_format_names_a_counters_family_with_its_total_and_escapes() {
        let mut out = String::new();
        write_text(&mut out, &sample()).unwrap();
        assert_eq!(
            out,
            "# HELP kgate_x_total Things \\\\ counted\\nhere\n\
             # TYPE kgate_x_total counter\n\
             kgate_x_total{server=\"a\\\"b\\\\c\"} 3\n\
             # HELP kgate_y A gauge\n\
             # TYPE kgate_y gauge\n\
             kgate_y 0.25\n"
        );
    }

    #[test]
    fn openmetrics_only_when_the_scraper_asks_for_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,\
                          application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Text);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }
}
