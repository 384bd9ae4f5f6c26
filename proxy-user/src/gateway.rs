//! One configuration at run time: its frontends, and each backend's pool of servers.
//! A reload builds a new gateway, carrying over the run-time state of what did not
//! change; connections keep the gateway they started with.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use tracing::{info, warn};

use crate::{
    admission::FrontendLoad,
    config::Config,
    pool::{AvailabilityChange, Pool, ServerRuntime, Slots, SlotsFull},
};

pub struct Gateway {
    pub config: Config,
    /// One per backend, in the order of `config.backends`.
    pub pools: Vec<Pool>,
    /// One per frontend, in the order of `config.frontends`.
    pub loads: Vec<Arc<FrontendLoad>>,
    /// The frontend listening on each address.
    by_address: HashMap<SocketAddr, usize>,
}

impl Gateway {
    /// The gateway for `config`. What `previous` had under the same names keeps its
    /// run-time state: frontends their connection counts, backends their counters,
    /// servers (same address too) their state, counters and map slot.
    pub fn build(
        config: Config,
        previous: Option<&Gateway>,
        slots: &mut Slots,
    ) -> Result<Gateway, SlotsFull> {
        let loads = config
            .frontends
            .iter()
            .map(|f| {
                previous
                    .and_then(|p| p.frontend(&f.name))
                    .map(|i| previous.unwrap().loads[i].clone())
                    .unwrap_or_default()
            })
            .collect();
        let mut kept = Vec::new();
        let mut pools = Vec::with_capacity(config.backends.len());
        for backend in &config.backends {
            let old = previous.and_then(|p| {
                let b = p
                    .config
                    .backends
                    .iter()
                    .position(|o| o.name == backend.name)?;
                Some((&p.config.backends[b], &p.pools[b]))
            });
            let counters = old
                .map(|(_, pool)| pool.counters.clone())
                .unwrap_or_default();
            let mut servers = Vec::with_capacity(backend.servers.len());
            for server in &backend.servers {
                let same = old.and_then(|(b, pool)| {
                    let s = b.servers.iter().position(|o| o.name == server.name)?;
                    (b.servers[s].address == server.address).then(|| pool.servers[s].clone())
                });
                let runtime = match same {
                    Some(runtime) => runtime,
                    None => Arc::new(ServerRuntime::new(slots.take()?)),
                };
                kept.push(runtime.slot);
                servers.push(runtime);
            }
            pools.push(Pool::new(servers, counters));
        }
        // Servers of the previous gateway that are gone give their slot back once
        // their last connection ends.
        if let Some(previous) = previous {
            for pool in &previous.pools {
                for runtime in &pool.servers {
                    if !kept.contains(&runtime.slot) {
                        slots.retire(runtime.clone());
                    }
                }
            }
        }
        let by_address = config
            .frontends
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.listen.iter().map(move |&a| (a, i)))
            .collect();
        Ok(Gateway {
            config,
            pools,
            loads,
            by_address,
        })
    }

    pub fn frontend(&self, name: &str) -> Option<usize> {
        self.config.frontends.iter().position(|f| f.name == name)
    }

    /// The frontend that listens on `address`.
    pub fn frontend_at(&self, address: SocketAddr) -> Option<usize> {
        self.by_address.get(&address).copied()
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

    /// Logs each backend that has just lost its last available server (a warning, as
    /// HAProxy's "backend X has no server available!"), or got one back. Called after
    /// every change of a server's state: one line for the change, where every client
    /// refused meanwhile gets only its connection line.
    pub fn log_availability(&self) {
        for (backend, pool) in self.config.backends.iter().zip(&self.pools) {
            match pool.availability_change() {
                Some(AvailabilityChange::NoneLeft) => {
                    let states: Vec<String> = backend
                        .servers
                        .iter()
                        .zip(&pool.servers)
                        .map(|(server, runtime)| {
                            let view = runtime.state_view();
                            format!("{} {}: {}", server.name, view.state, view.reason)
                        })
                        .collect();
                    warn!(
                        { journal.backend = %backend.name },
                        "backend {} has no server available: its clients are refused until one \
                         is ({})",
                        backend.name,
                        states.join("; ")
                    );
                }
                Some(AvailabilityChange::Back) => {
                    let available: Vec<&str> = backend
                        .servers
                        .iter()
                        .zip(&pool.servers)
                        .filter(|(_, runtime)| runtime.is_available())
                        .map(|(server, _)| server.name.as_str())
                        .collect();
                    info!(
                        { journal.backend = %backend.name },
                        "backend {} has a server available again: {}",
                        backend.name,
                        available.join(", ")
                    );
                }
                None => {}
            }
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
        for (backend, pool) in self.config.backends.iter().zip(&self.pools) {
            info!(
                backend = %backend.name,
                no_server = pool.counters.no_server.load(Ordering::Relaxed),
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
