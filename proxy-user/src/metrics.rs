//! Prometheus metrics, served on `metrics_listen` at `/metrics` (text format 0.0.4) by
//! `web`.
//!
//! Nothing is counted twice: at each scrape the collector reads the counters the
//! daemon keeps anyway (frontends, pools, the eBPF maps) from the current gateway.
//! Counters of servers and frontends that a reload kept go on counting.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

use proxy_common::xdp::{ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE};

use crate::{daemon::Daemon, dataplane::Dataplane};

/// The registry whose collector reads `daemon` at each scrape.
pub fn registry(daemon: Arc<Daemon>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Gauges(daemon)));
    registry
}

/// The metrics now, in the text format.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    let mut body = String::new();
    prometheus_client::encoding::text::encode(&mut body, registry)?;
    Ok(body)
}

/// Reads the daemon's counters at each scrape.
struct Gauges(Arc<Daemon>);

impl fmt::Debug for Gauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("kgate metrics")
    }
}

/// One metric's descriptor and its series.
fn family<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in series {
        let mut sample: MetricEncoder = metric.encode_family(&labels)?;
        match kind {
            MetricType::Counter => sample.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
            _ => sample.encode_gauge(&(value as i64))?,
        }
    }
    Ok(())
}

type Labels = Vec<(&'static str, String)>;

impl Collector for Gauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let daemon = &self.0;
        let gateway = daemon.gateway();
        let config = &gateway.config;
        let frontends: Vec<(Labels, &crate::admission::FrontendLoad)> = config
            .frontends
            .iter()
            .zip(&gateway.loads)
            .map(|(f, load)| (vec![("frontend", f.name.clone())], load.as_ref()))
            .collect();
        let per_frontend = |value: fn(&crate::admission::FrontendLoad) -> u64| {
            frontends
                .iter()
                .map(move |(labels, load)| (labels.clone(), value(load)))
        };
        use MetricType::{Counter, Gauge};
        family(
            &mut encoder,
            "kgate_frontend_connections",
            "Clients admitted",
            Counter,
            per_frontend(|l| l.admitted.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_frontend_active_connections",
            "Clients connected now",
            Gauge,
            per_frontend(|l| l.active().into()),
        )?;
        family(
            &mut encoder,
            "kgate_frontend_refused",
            "Clients closed at once over max_connections or max_connections_per_source",
            Counter,
            per_frontend(|l| l.refused.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_frontend_bytes_in",
            "Bytes from clients, counted when their connection ends",
            Counter,
            per_frontend(|l| l.bytes_in.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_frontend_bytes_out",
            "Bytes to clients, counted when their connection ends",
            Counter,
            per_frontend(|l| l.bytes_out.load(Ordering::Relaxed)),
        )?;

        family(
            &mut encoder,
            "kgate_frontend_proxy_header_refused",
            "Clients of an accept_proxy frontend closed before their PROXY header was taken, \
             by reason: untrusted source, timeout, missing, truncated, oversized, malformed",
            Counter,
            config
                .frontends
                .iter()
                .zip(&gateway.loads)
                .filter(|(f, _)| f.accept_proxy.is_some())
                .flat_map(|(f, load)| {
                    load.proxy_rejections.by_kind().map(|(kind, n)| {
                        (
                            vec![("frontend", f.name.clone()), ("reason", kind.to_owned())],
                            n,
                        )
                    })
                }),
        )?;
        family(
            &mut encoder,
            "kgate_backend_no_server",
            "Clients closed at once because no server could take them",
            Counter,
            config.backends.iter().zip(&gateway.pools).map(|(b, p)| {
                (
                    vec![("backend", b.name.clone())],
                    p.counters.no_server.load(Ordering::Relaxed),
                )
            }),
        )?;

        let servers: Vec<(Labels, &crate::pool::ServerRuntime)> = config
            .backends
            .iter()
            .zip(&gateway.pools)
            .flat_map(|(b, p)| {
                b.servers.iter().zip(&p.servers).map(move |(s, r)| {
                    (
                        vec![("backend", b.name.clone()), ("server", s.name.clone())],
                        r.as_ref(),
                    )
                })
            })
            .collect();
        let spliced = |slot: u32| {
            daemon
                .server_maps
                .as_ref()
                .and_then(|m| m.spliced_bytes(slot).ok())
                .unwrap_or_default()
        };
        let per_server = |value: &dyn Fn(&crate::pool::ServerRuntime) -> u64| {
            servers
                .iter()
                .map(|(labels, runtime)| (labels.clone(), value(runtime)))
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "kgate_server_connections",
            "Connections made to the server",
            Counter,
            per_server(&|r| r.total.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_active_connections",
            "Connections open to the server now",
            Gauge,
            per_server(&|r| r.active.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_bytes_in",
            "Bytes from clients to the server (spliced ones counted by the eBPF program)",
            Counter,
            per_server(&|r| spliced(r.slot).bytes_in + r.copied_in.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_bytes_out",
            "Bytes from the server to clients",
            Counter,
            per_server(&|r| spliced(r.slot).bytes_out + r.copied_out.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_checks_passed",
            "Health checks that passed",
            Counter,
            per_server(&|r| r.checks_passed.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_checks_failed",
            "Health checks that failed",
            Counter,
            per_server(&|r| r.checks_failed.load(Ordering::Relaxed)),
        )?;
        family(
            &mut encoder,
            "kgate_server_up",
            "1 when the server takes new connections (ready and not down)",
            Gauge,
            per_server(&|r| u64::from(r.takes_connections(None))),
        )?;
        family(
            &mut encoder,
            "kgate_server_state",
            "The server's state, as kgate status shows it, in the `state` label",
            Gauge,
            servers.iter().map(|(labels, runtime)| {
                let mut labels = labels.clone();
                labels.push(("state", runtime.state()));
                (labels, 1)
            }),
        )?;

        if let Dataplane::Sockmap(sockmap) = &daemon.dataplane {
            family(
                &mut encoder,
                "kgate_parked_connections",
                "Spliced connections with nothing to do, watched without a task of their own",
                Gauge,
                [(Labels::new(), sockmap.parking.parked() as u64)],
            )?;
        }
        if let Dataplane::Sockmap(sockmap) = &daemon.dataplane
            && let Ok(stats) = sockmap.maps.stats()
        {
            family(
                &mut encoder,
                "kgate_splice_redirected_bytes",
                "Bytes the eBPF program spliced",
                Counter,
                [(Labels::new(), stats.redirected_bytes)],
            )?;
            family(
                &mut encoder,
                "kgate_splice_passed_bytes",
                "Bytes passed to kgate because a direction was over its queue_limit",
                Counter,
                [(Labels::new(), stats.passed_bytes)],
            )?;
            family(
                &mut encoder,
                "kgate_splice_trimmed_bytes",
                "Bytes cut off segments: retransmitted ones the eBPF program had forwarded \
                 already, or read by kgate before the connection joined the splice",
                Counter,
                [(Labels::new(), stats.trimmed_bytes)],
            )?;
            family(
                &mut encoder,
                "kgate_splice_trim_failures",
                "Segments whose repeated bytes could not be cut off (their connection is reset)",
                Counter,
                [(Labels::new(), stats.trim_failures)],
            )?;
        }
        if let Dataplane::Packet(packet) = &daemon.dataplane {
            family(
                &mut encoder,
                "kgate_packet_forwarded_connections",
                "Connections the packet data plane's TC programs forward now",
                Gauge,
                [(Labels::new(), packet.forwarded() as u64)],
            )?;
            family(
                &mut encoder,
                "kgate_packet_handoffs",
                "Connections handed off to the TC programs",
                Counter,
                [(Labels::new(), packet.handed_off())],
            )?;
            family(
                &mut encoder,
                "kgate_packet_fallbacks",
                "Connections that stayed copied instead of forwarded, by reason",
                Counter,
                packet
                    .fallbacks()
                    .map(|(reason, n)| (vec![("reason", reason.as_str().to_owned())], n)),
            )?;
            if let Ok(stats) = packet.stats() {
                family(
                    &mut encoder,
                    "kgate_packet_segments",
                    "Segments the TC programs handled, by what they did",
                    Counter,
                    [
                        ("forwarded", stats.forwarded_segments),
                        ("dropped_frozen", stats.frozen_drops),
                        ("dropped_held", stats.held_drops),
                        ("silenced", stats.silenced),
                        ("no_route", stats.no_route),
                        ("malformed", stats.malformed),
                    ]
                    .map(|(what, n)| (vec![("action", what.to_owned())], n)),
                )?;
            }
        }
        if let Some(early_drop) = &daemon.early_drop
            && let Ok(stats) = early_drop.stats()
        {
            family(
                &mut encoder,
                "kgate_xdp_packets",
                "Packets the XDP program saw, by verdict",
                Counter,
                [
                    (vec![("verdict", "passed".to_owned())], stats.passed),
                    (
                        vec![("verdict", "dropped_blocklist".to_owned())],
                        stats.dropped_blocklist,
                    ),
                    (
                        vec![("verdict", "dropped_syn_rate".to_owned())],
                        stats.dropped_syn_rate,
                    ),
                ],
            )?;
            family(
                &mut encoder,
                "kgate_xdp_blocklist_drops",
                "Packets the XDP program dropped by blocklist, by the origin of the entry",
                Counter,
                [
                    ("file", ORIGIN_FILE),
                    ("command", ORIGIN_COMMAND),
                    ("crowdsec", ORIGIN_CROWDSEC),
                ]
                .map(|(name, origin)| {
                    (vec![("origin", name.to_owned())], stats.dropped_by(origin))
                }),
            )?;
        }
        if let Some(early_drop) = &daemon.early_drop {
            let counts = early_drop.blocklist_counts();
            family(
                &mut encoder,
                "kgate_blocklist_entries",
                "Blocklist prefixes that apply, by origin (counted every 10 s and after \
                 kgate's own changes)",
                Gauge,
                [
                    ("file", counts.file),
                    ("command", counts.command),
                    ("crowdsec", counts.crowdsec),
                ]
                .map(|(origin, n)| (vec![("origin", origin.to_owned())], n as u64)),
            )?;
        }
        if let Some(bouncer) = daemon.early_drop.as_ref().and_then(|e| e.crowdsec_status()) {
            use crate::xdp::crowdsec::LapiState;
            family(
                &mut encoder,
                "kgate_crowdsec_lapi_up",
                "1 when the last pull of CrowdSec decisions worked",
                Gauge,
                [(
                    Labels::new(),
                    u64::from(bouncer.state == LapiState::Connected),
                )],
            )?;
            family(
                &mut encoder,
                "kgate_crowdsec_bans",
                "Prefixes banned by the CrowdSec decisions kgate holds",
                Gauge,
                [(Labels::new(), bouncer.bans as u64)],
            )?;
            family(
                &mut encoder,
                "kgate_crowdsec_pulls",
                "Pulls of the CrowdSec decision stream, by result",
                Counter,
                [
                    (vec![("result", "ok".to_owned())], bouncer.pulls),
                    (vec![("result", "failed".to_owned())], bouncer.failed_pulls),
                ],
            )?;
        }
        Ok(())
    }
}
