//! What every connection shares while kgate runs: the configuration, the data plane,
//! the balancing state of each backend, and the counters.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::info;

use crate::{admission::FrontendLoad, balance::RoundRobin, config::Config, dataplane::Dataplane};

pub struct Gateway {
    pub config: Config,
    pub dataplane: Dataplane,
    /// One per backend, in the order of `config.backends`.
    pub balancers: Vec<RoundRobin>,
    /// One per frontend, in the order of `config.frontends`.
    pub loads: Vec<FrontendLoad>,
    /// Per backend, one per server, in config order.
    pub servers: Vec<Vec<ServerStats>>,
}

/// Traffic of one server, counted when its connections end.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    /// Bytes from clients to the server, and back.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Gateway {
    pub fn new(config: Config, dataplane: Dataplane) -> Gateway {
        let balancers = config
            .backends
            .iter()
            .map(|_| RoundRobin::default())
            .collect();
        let loads = config
            .frontends
            .iter()
            .map(|_| FrontendLoad::default())
            .collect();
        let servers = config
            .backends
            .iter()
            .map(|b| b.servers.iter().map(|_| ServerStats::default()).collect())
            .collect();
        Gateway {
            config,
            dataplane,
            balancers,
            loads,
            servers,
        }
    }

    /// Logs the counters, once, at shutdown.
    pub fn log_totals(&self) {
        for (frontend, load) in self.config.frontends.iter().zip(&self.loads) {
            info!(
                frontend = %frontend.name,
                active = load.active(),
                refused = load.refused.load(Ordering::Relaxed),
                "frontend totals"
            );
        }
        for (backend, servers) in self.config.backends.iter().zip(&self.servers) {
            for (server, stats) in backend.servers.iter().zip(servers) {
                info!(
                    server = %format!("{}/{}", backend.name, server.name),
                    connections = stats.connections.load(Ordering::Relaxed),
                    bytes_in = stats.bytes_in.load(Ordering::Relaxed),
                    bytes_out = stats.bytes_out.load(Ordering::Relaxed),
                    "server totals"
                );
            }
        }
    }
}
