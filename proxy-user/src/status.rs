//! The status document: what an operator sees of a running kgate, built in this one
//! place from the daemon's own state. `kgate status` asks for it over the control
//! socket, the stats page fetches it from `metrics_listen` (`/status.json`), and the
//! pinned `servers` map that bpftool reads is written from its server entries: all
//! show the same numbers.
//!
//! Times are Unix seconds (`now` is the daemon's clock when the document was built, so
//! a reader computes "since" and "ago" without trusting its own clock), durations are
//! milliseconds, rates are per second over the last second (see `rate`).

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering,
    time::{Duration, SystemTime},
};

use proxy_common::xdp::{ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE};
use serde::{Deserialize, Serialize};

use crate::{
    config::{Balance, CheckType, ProxyProtocol},
    daemon::Daemon,
    dataplane::Dataplane,
    gateway::Gateway,
    maps::StatusMaps,
    xdp::crowdsec::BouncerStatus,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub kgate: About,
    pub frontends: Vec<FrontendStatus>,
    pub backends: Vec<BackendStatus>,
    /// Every server of every backend, in configuration order.
    pub servers: Vec<ServerStatus>,
    /// `None` without an `[xdp]` section.
    pub xdp: Option<XdpStatus>,
    /// The CrowdSec bouncer; `None` without a `[crowdsec]` section.
    #[serde(default)]
    pub crowdsec: Option<BouncerStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct About {
    pub version: String,
    pub host: String,
    pub pid: u32,
    pub now: u64,
    pub started: u64,
    /// `sockmap`, `packet` or `userspace`.
    pub dataplane: String,
    pub open_connections: usize,
    /// Spliced connections waiting without a task (sockmap only).
    pub parked_connections: Option<usize>,
    /// The packet data plane: what it forwards, and why connections stayed copied.
    #[serde(default)]
    pub packet: Option<PacketStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PacketStatus {
    /// Connections its TC programs forward now.
    pub forwarded_connections: usize,
    /// Connections handed off since start.
    pub handoffs: u64,
    /// Connections that stayed copied, by reason.
    pub fallbacks: BTreeMap<String, u64>,
    /// Why the TC programs could not load or attach: every connection is copied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendStatus {
    pub name: String,
    pub listen: Vec<String>,
    pub backend: String,
    pub active_connections: u64,
    pub max_connections: Option<u32>,
    /// Clients admitted since start.
    pub total_connections: u64,
    /// Clients closed at once over a limit.
    pub refused: u64,
    pub rate: f64,
    pub rate_max: f64,
    /// From clients and back to them, open connections' included.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// With `accept_proxy`: connections closed before their header was taken, by
    /// reason (untrusted, timeout, missing, truncated, oversized, malformed).
    pub proxy_refused: Option<BTreeMap<String, u64>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub name: String,
    pub balance: String,
    pub proxy_protocol: String,
    /// tcp, smtp, imap, smtps, imaps or none.
    pub check: String,
    /// Clients closed because no server could take them.
    pub no_server: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub backend: String,
    pub server: String,
    pub address: String,
    pub weight: u32,
    /// up, down, unchecked, drain or maint.
    pub state: String,
    /// Why it is in that state.
    pub reason: String,
    /// Since when.
    pub since: u64,
    /// ok, refused, timeout, bad reply, tls, error; "" before the first check.
    pub last_check: String,
    /// What went wrong, when the last check failed.
    pub last_check_detail: Option<String>,
    pub last_check_at: Option<u64>,
    /// Microseconds: a check of a server next door takes well under a millisecond.
    pub last_check_us: Option<u64>,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub active_connections: u64,
    pub total_connections: u64,
    pub rate: f64,
    /// The open connections by how their bytes move now.
    pub spliced_connections: u64,
    pub half_spliced_connections: u64,
    #[serde(default)]
    pub forwarded_connections: u64,
    pub copied_connections: u64,
    /// From clients to the server and back, open connections' included.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct XdpStatus {
    pub passed: u64,
    pub dropped_blocklist: u64,
    pub dropped_syn_rate: u64,
    pub malformed: u64,
    /// Blocklist entries that apply now (IPv4 and IPv6).
    pub blocklist_entries: u64,
    /// Of `blocklist_entries`, by where they came from.
    #[serde(default)]
    pub blocklist_by_origin: ByOrigin,
    /// Of `dropped_blocklist`, by the origin of the entry that matched.
    #[serde(default)]
    pub dropped_by_origin: ByOrigin,
}

/// Blocklist entries, or packets they dropped, by origin: the blocklist file, `kgate
/// block add`, CrowdSec's decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByOrigin {
    pub file: u64,
    pub command: u64,
    pub crowdsec: u64,
}

/// The document for `daemon`, now.
pub fn build(daemon: &Daemon) -> Status {
    let gateway = daemon.gateway();
    let parked = match &daemon.dataplane {
        Dataplane::Sockmap(sockmap) => Some(sockmap.parking.parked()),
        Dataplane::Packet(_) | Dataplane::Userspace => None,
    };
    let packet = match &daemon.dataplane {
        Dataplane::Packet(packet) => Some(PacketStatus {
            forwarded_connections: packet.forwarded(),
            handoffs: packet.handed_off(),
            fallbacks: packet
                .fallbacks()
                .map(|(reason, n)| (reason.as_str().to_owned(), n))
                .collect(),
            unavailable: packet.unavailable_reason().map(str::to_owned),
        }),
        _ => None,
    };
    Status {
        kgate: About {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_default(),
            pid: std::process::id(),
            now: unix(SystemTime::now()),
            started: unix(daemon.started),
            dataplane: daemon.dataplane.name().to_owned(),
            open_connections: daemon.open_connections(),
            parked_connections: parked,
            packet,
        },
        frontends: frontends(&gateway, daemon.status_maps.as_ref()),
        backends: backends(&gateway),
        servers: servers(&gateway, daemon.status_maps.as_ref())
            .into_iter()
            .map(|(_, server)| server)
            .collect(),
        xdp: daemon.early_drop.as_ref().map(|early_drop| {
            let stats = early_drop.stats().unwrap_or_default();
            let entries = early_drop.blocklist_by_origin().unwrap_or_default();
            XdpStatus {
                passed: stats.passed,
                dropped_blocklist: stats.dropped_blocklist,
                dropped_syn_rate: stats.dropped_syn_rate,
                malformed: stats.malformed,
                blocklist_entries: entries.total() as u64,
                blocklist_by_origin: ByOrigin {
                    file: entries.file as u64,
                    command: entries.command as u64,
                    crowdsec: entries.crowdsec as u64,
                },
                dropped_by_origin: ByOrigin {
                    file: stats.dropped_by(ORIGIN_FILE),
                    command: stats.dropped_by(ORIGIN_COMMAND),
                    crowdsec: stats.dropped_by(ORIGIN_CROWDSEC),
                },
            }
        }),
        crowdsec: daemon
            .early_drop
            .as_ref()
            .and_then(|early_drop| early_drop.crowdsec_status()),
    }
}

/// Every frontend of `gateway`. The bytes the eBPF programs moved come from their
/// counters in `maps` (none without them); open connections' bytes count too.
fn frontends(gateway: &Gateway, maps: Option<&StatusMaps>) -> Vec<FrontendStatus> {
    let config = &gateway.config;
    let mut all = Vec::with_capacity(config.frontends.len());
    for (frontend, load) in config.frontends.iter().zip(&gateway.loads) {
        let moved = maps
            .and_then(|m| m.frontend_bytes(load.slot).ok())
            .unwrap_or_default();
        all.push(FrontendStatus {
            name: frontend.name.clone(),
            listen: frontend.listen.iter().map(ToString::to_string).collect(),
            backend: config.backends[frontend.backend].name.clone(),
            active_connections: load.active().into(),
            max_connections: frontend.max_connections,
            total_connections: load.admitted.load(Ordering::Relaxed),
            refused: load.refused.load(Ordering::Relaxed),
            rate: rounded(load.rate.per_second()),
            rate_max: rounded(load.rate.max()),
            bytes_in: moved.bytes_in + load.copied_in.load(Ordering::Relaxed),
            bytes_out: moved.bytes_out + load.copied_out.load(Ordering::Relaxed),
            proxy_refused: frontend.accept_proxy.as_ref().map(|_| {
                load.proxy_rejections
                    .by_kind()
                    .iter()
                    .map(|&(kind, n)| (kind.to_owned(), n))
                    .collect()
            }),
        });
    }
    all
}

fn backends(gateway: &Gateway) -> Vec<BackendStatus> {
    gateway
        .config
        .backends
        .iter()
        .zip(&gateway.pools)
        .map(|(backend, pool)| BackendStatus {
            name: backend.name.clone(),
            balance: match backend.balance {
                Balance::RoundRobin => "roundrobin",
                Balance::LeastConn => "leastconn",
                Balance::Source => "source",
            }
            .to_owned(),
            proxy_protocol: match backend.proxy_protocol {
                ProxyProtocol::V2 => "v2",
                ProxyProtocol::V1 => "v1",
                ProxyProtocol::None => "none",
            }
            .to_owned(),
            check: match backend.health.check {
                CheckType::None => "none",
                CheckType::Tcp => "tcp",
                CheckType::Smtp => "smtp",
                CheckType::Imap => "imap",
                CheckType::Smtps => "smtps",
                CheckType::Imaps => "imaps",
            }
            .to_owned(),
            no_server: pool.counters.no_server.load(Ordering::Relaxed),
        })
        .collect()
}

/// Every server of `gateway` with its slot in the pinned `servers` map. The bytes the
/// eBPF programs moved come from their counters in `maps` (none without them).
pub fn servers(gateway: &Gateway, maps: Option<&StatusMaps>) -> Vec<(u32, ServerStatus)> {
    let mut all = Vec::new();
    for (backend, pool) in gateway.config.backends.iter().zip(&gateway.pools) {
        for (server, runtime) in backend.servers.iter().zip(&pool.servers) {
            let moved = maps
                .and_then(|m| m.server_bytes(runtime.slot).ok())
                .unwrap_or_default();
            let health = runtime.health();
            let state = runtime.state_view();
            let active = runtime.active.load(Ordering::Relaxed);
            let fully = runtime.spliced.load(Ordering::Relaxed);
            let half = runtime.half_spliced.load(Ordering::Relaxed);
            let forwarded = runtime.forwarded.load(Ordering::Relaxed);
            all.push((
                runtime.slot,
                ServerStatus {
                    backend: backend.name.clone(),
                    server: server.name.clone(),
                    address: server.address.to_string(),
                    weight: server.weight,
                    state: state.state,
                    reason: state.reason,
                    since: unix(state.since),
                    last_check: health.last_check.to_owned(),
                    last_check_detail: health.last_failure,
                    last_check_at: health.last_check_at.map(unix),
                    last_check_us: health.last_check_took.map(micros),
                    consecutive_ok: health.consecutive_ok,
                    consecutive_fail: health.consecutive_fail,
                    active_connections: active,
                    total_connections: runtime.total.load(Ordering::Relaxed),
                    rate: rounded(runtime.rate.per_second()),
                    spliced_connections: fully,
                    half_spliced_connections: half,
                    forwarded_connections: forwarded,
                    copied_connections: active.saturating_sub(fully + half + forwarded),
                    bytes_in: moved.bytes_in + runtime.copied_in.load(Ordering::Relaxed),
                    bytes_out: moved.bytes_out + runtime.copied_out.load(Ordering::Relaxed),
                },
            ));
        }
    }
    all
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// To a tenth: the rate is an estimate, and a tenth is what a reader can use.
fn rounded(rate: f64) -> f64 {
    (rate * 10.0).round() / 10.0
}
