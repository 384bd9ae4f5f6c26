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
    pool::{AvailabilityChange, Pool, ServerRuntime},
    slots::{MapSlots, SlotsFull},
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
        slots: &mut MapSlots,
    ) -> Result<Gateway, SlotsFull> {
        let old_backend = |name: &str| {
            let p = previous?;
            let b = p.config.backends.iter().position(|o| o.name == name)?;
            Some((&p.config.backends[b], &p.pools[b]))
        };
        let kept_loads: Vec<Option<Arc<FrontendLoad>>> = config
            .frontends
            .iter()
            .map(|f| previous.and_then(|p| p.frontend(&f.name).map(|i| p.loads[i].clone())))
            .collect();
        let kept_servers: Vec<Vec<Option<Arc<ServerRuntime>>>> = config
            .backends
            .iter()
            .map(|backend| {
                let old = old_backend(&backend.name);
                backend
                    .servers
                    .iter()
                    .map(|server| {
                        let (b, pool) = old?;
                        let s = b.servers.iter().position(|o| o.name == server.name)?;
                        (b.servers[s].address == server.address).then(|| pool.servers[s].clone())
                    })
                    .collect()
            })
            .collect();
        // All or nothing: a reload refused for want of slots takes none.
        slots
            .frontends
            .check_room(kept_loads.iter().filter(|l| l.is_none()).count())?;
        slots.servers.check_room(
            kept_servers
                .iter()
                .flatten()
                .filter(|s| s.is_none())
                .count(),
        )?;

        let mut loads = Vec::with_capacity(kept_loads.len());
        for kept in kept_loads {
            loads.push(match kept {
                Some(load) => load,
                None => Arc::new(FrontendLoad::new(slots.frontends.take()?)),
            });
        }
        let mut kept = Vec::new();
        let mut pools = Vec::with_capacity(config.backends.len());
        for (backend, kept_servers) in config.backends.iter().zip(kept_servers) {
            let counters = old_backend(&backend.name)
                .map(|(_, pool)| pool.counters.clone())
                .unwrap_or_default();
            let mut servers = Vec::with_capacity(kept_servers.len());
            for same in kept_servers {
                let runtime = match same {
                    Some(runtime) => runtime,
                    None => Arc::new(ServerRuntime::new(slots.servers.take()?)),
                };
                kept.push(runtime.slot);
                servers.push(runtime);
            }
            pools.push(Pool::new(servers, counters));
        }
        // Servers and frontends of the previous gateway that are gone give their slot
        // back once their last connection ends.
        if let Some(previous) = previous {
            for pool in &previous.pools {
                for runtime in &pool.servers {
                    if !kept.contains(&runtime.slot) {
                        slots.servers.retire(runtime.slot, runtime.clone());
                    }
                }
            }
            for load in &previous.loads {
                if !loads.iter().any(|kept| Arc::ptr_eq(kept, load)) {
                    slots.frontends.retire(load.slot, load.clone());
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proxy_common::{MAX_FRONTENDS, MAX_SERVERS};

    use super::*;

    /// Frontends `f<i>` for each `i` in `frontends`, and servers `s<i>` of backend `b`.
    fn config(frontends: &[u16], servers: &[u16]) -> Config {
        let mut text = String::new();
        for i in frontends {
            text.push_str(&format!(
                "[[frontends]]\nname = \"f{i}\"\nlisten = [\"127.0.0.1:{}\"]\nbackend = \"b\"\n",
                10_000 + i
            ));
        }
        text.push_str("[[backends]]\nname = \"b\"\n");
        for i in servers {
            text.push_str(&format!(
                "[[backends.servers]]\nname = \"s{i}\"\naddress = \"127.0.0.1:{}\"\n",
                20_000 + i
            ));
        }
        Config::parse(&text, Path::new("kgate.toml")).unwrap()
    }

    #[test]
    fn a_reload_keeps_the_slots_and_counts_of_what_stays_and_retires_the_rest() {
        let mut slots = MapSlots::default();
        let first = Gateway::build(config(&[0, 1], &[0, 1]), None, &mut slots).unwrap();
        first.loads[0].copied_in.store(7, Ordering::Relaxed);
        let second = Gateway::build(config(&[0, 2], &[1, 2]), Some(&first), &mut slots).unwrap();
        assert!(Arc::ptr_eq(&first.loads[0], &second.loads[0]), "f0 kept");
        assert_eq!(second.loads[0].copied_in.load(Ordering::Relaxed), 7);
        assert_eq!(
            second.loads[1].slot, 2,
            "f2 takes a new slot: f1's is retiring"
        );
        assert_eq!(second.pools[0].servers[0].slot, 1, "s1 kept");
        assert_eq!(second.pools[0].servers[1].slot, 2);
        // `first` still holds f1 and s0, as a connection's gateway would.
        assert_eq!(slots.collect(), crate::slots::Freed::default());
        drop(first);
        let freed = slots.collect();
        assert_eq!((freed.frontends, freed.servers), (vec![1], vec![0]));
    }

    #[test]
    fn a_reload_refused_for_want_of_slots_takes_none() {
        let mut slots = MapSlots::default();
        let all: Vec<u16> = (0..MAX_SERVERS as u16).collect();
        let full = Gateway::build(config(&[0], &all), None, &mut slots).unwrap();
        // Every server renamed while the old ones still hold their slots: refused, and
        // the slot the new frontend would have taken (frontends come first) stays free.
        let renamed: Vec<u16> = (2000..2000 + MAX_SERVERS as u16).collect();
        let error = Gateway::build(config(&[0, 1], &renamed), Some(&full), &mut slots)
            .err()
            .expect("no room");
        assert!(
            error.to_string().contains("more than 1024 servers"),
            "{error}"
        );
        assert!(slots.frontends.check_room(MAX_FRONTENDS - 1).is_ok());
    }
}
