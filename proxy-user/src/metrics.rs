//! Prometheus metrics on `metrics_listen` (`GET /metrics`, text format 0.0.4).
//!
//! Nothing is counted twice: at each scrape the collector reads the counters the
//! daemon keeps anyway (frontends, pools, the eBPF maps) from the current gateway.
//! Counters of servers and frontends that a reload kept go on counting.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};
use tracing::{debug, warn};

use proxy_common::xdp::{ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE};

use crate::{daemon::Daemon, dataplane::Dataplane};

/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once: more wait in the kernel's listen queue, holding no file
/// descriptor of kgate's (as control connections do, see control.rs).
const MAX_CONNECTIONS: usize = 16;

pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Gauges(daemon)));
    let registry = Arc::new(registry);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let registry = registry.clone();
                tokio::spawn(async move {
                    let answered = timeout(REQUEST_TIMEOUT * 2, answer(stream, &registry)).await;
                    drop(slot);
                    // A scraper's failures are its own; logged per request, they would be
                    // a way to fill the log.
                    match answered {
                        Ok(Err(e)) => debug!("metrics request: {e}"),
                        Err(_) => debug!("metrics request: the reply was not taken in time"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            Err(e) => {
                warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, body) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        let mut body = String::new();
        prometheus_client::encoding::text::encode(&mut body, registry)
            .map_err(std::io::Error::other)?;
        ("200 OK", body)
    } else {
        ("404 Not Found", "kgate serves /metrics\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
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
