//! What every connection shares while kgate runs: the configuration, the data plane,
//! each backend's pool of servers, and the counters.

use std::sync::atomic::Ordering;

use tracing::info;

use crate::{admission::FrontendLoad, config::Config, dataplane::Dataplane, pool::Pool};

pub struct Gateway {
    pub config: Config,
    pub dataplane: Dataplane,
    /// One per backend, in the order of `config.backends`.
    pub pools: Vec<Pool>,
    /// One per frontend, in the order of `config.frontends`.
    pub loads: Vec<FrontendLoad>,
    /// Signalled when a server's state changes, so it is published at once.
    pub changed: tokio::sync::Notify,
}

impl Gateway {
    pub fn new(config: Config, dataplane: Dataplane) -> Gateway {
        let mut next_slot = 0;
        let pools = config
            .backends
            .iter()
            .map(|backend| {
                let pool = Pool::new(backend, next_slot);
                next_slot += backend.servers.len() as u32;
                pool
            })
            .collect();
        let loads = config
            .frontends
            .iter()
            .map(|_| FrontendLoad::default())
            .collect();
        Gateway {
            config,
            dataplane,
            pools,
            loads,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Finds `BACKEND/SERVER`.
    pub fn server(&self, name: &str) -> Option<(usize, usize)> {
        let (backend, server) = name.split_once('/')?;
        let b = self
            .config
            .backends
            .iter()
            .position(|b| b.name == backend)?;
        let s = self.config.backends[b]
            .servers
            .iter()
            .position(|s| s.name == server)?;
        Some((b, s))
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
        for (backend, pool) in self.config.backends.iter().zip(&self.pools) {
            info!(
                backend = %backend.name,
                no_server = pool.no_server.load(Ordering::Relaxed),
                "backend totals"
            );
            for (server, runtime) in backend.servers.iter().zip(&pool.servers) {
                info!(
                    server = %format!("{}/{}", backend.name, server.name),
                    connections = runtime.total.load(Ordering::Relaxed),
                    state = runtime.state(),
                    "server totals"
                );
            }
        }
    }
}
