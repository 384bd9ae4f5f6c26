//! The running daemon: what lives as long as the process (the data plane, the pinned
//! maps, the listeners, the health checks) around the current [`Gateway`], which a
//! reload replaces.
//!
//! Reload (SIGHUP or `kgate reload`): the file is read and validated first, and the
//! listeners it adds are bound; if any of that fails nothing changes and the reason is
//! returned. Then a new gateway is built from the new configuration and swapped in:
//! servers that are still there (same backend, name and address) keep their run-time
//! state (operator state, health, counters, map slot), frontends that are still there
//! keep their connection counts, listeners on addresses still in use stay open,
//! removed ones close, and health checks restart only for servers whose check
//! changed. Established connections hold the gateway they started with and are not
//! touched.
//!
//! Shutdown: SIGTERM stops accepting and waits up to `shutdown_timeout` for open
//! connections, then ends; SIGINT ends at once.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    config::Config,
    conn,
    dataplane::Dataplane,
    frontend,
    gateway::Gateway,
    health::wiring::{self, Watcher},
    maps::ServerMaps,
    pool::Slots,
    xdp::EarlyDrop,
};

pub struct Daemon {
    /// When this kgate started (for the status page's uptime).
    pub started: SystemTime,
    pub dataplane: Dataplane,
    pub server_maps: Option<ServerMaps>,
    pub early_drop: Option<EarlyDrop>,
    /// Signalled when a server's state changes, so it is published at once.
    pub changed: tokio::sync::Notify,
    current: RwLock<Arc<Gateway>>,
    config_path: PathBuf,
    /// Open client connections, for a graceful shutdown.
    connections: AtomicUsize,
    /// Serializes reloads; owns what a reload changes.
    resources: tokio::sync::Mutex<Resources>,
}

#[derive(Default)]
struct Resources {
    listeners: HashMap<SocketAddr, JoinHandle<()>>,
    watchers: HashMap<(String, String), Watcher>,
    slots: Slots,
}

impl Daemon {
    /// Builds the first gateway and binds its listeners. Nothing is accepted before
    /// [`Daemon::start`].
    pub fn new(
        config: Config,
        config_path: PathBuf,
        dataplane: Dataplane,
        server_maps: Option<ServerMaps>,
        early_drop: Option<EarlyDrop>,
    ) -> anyhow::Result<(Arc<Daemon>, Listeners)> {
        let mut resources = Resources::default();
        // Bind everything before accepting anything: a gateway that serves half of
        // its frontends is worse than one that refuses to start.
        let listeners = bind_new(&config, &HashSet::new())?;
        let gateway = Gateway::build(config, None, &mut resources.slots)?;
        let daemon = Arc::new(Daemon {
            started: SystemTime::now(),
            dataplane,
            server_maps,
            early_drop,
            changed: tokio::sync::Notify::new(),
            current: RwLock::new(Arc::new(gateway)),
            config_path,
            connections: AtomicUsize::new(0),
            resources: tokio::sync::Mutex::new(resources),
        });
        Ok((daemon, listeners))
    }

    /// Starts accepting on `listeners` and checking the servers.
    pub async fn start(self: &Arc<Self>, listeners: Listeners) {
        let mut resources = self.resources.lock().await;
        for (address, listener) in listeners {
            let task = tokio::spawn(accept(self.clone(), address, listener));
            resources.listeners.insert(address, task);
        }
        let gateway = self.gateway();
        wiring::update(self, &gateway, &mut resources.watchers);
    }

    /// The gateway new connections use.
    pub fn gateway(&self) -> Arc<Gateway> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the configuration file and applies what changed; on any error
    /// nothing changes and the error says why.
    pub async fn reload(self: &Arc<Self>) -> Result<String, String> {
        let config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let old = self.gateway();
        for (what, changed) in [
            (
                "bpf_pin_path",
                config.global.bpf_pin_path != old.config.global.bpf_pin_path,
            ),
            (
                "control_socket",
                config.global.control_socket != old.config.global.control_socket,
            ),
            (
                "dataplane",
                config.global.dataplane != old.config.global.dataplane,
            ),
            (
                "metrics_listen",
                config.global.metrics_listen != old.config.global.metrics_listen,
            ),
        ] {
            if changed {
                warn!("reload: `{what}` changed; it takes effect when kgate restarts");
            }
        }

        let mut resources = self.resources.lock().await;
        let listening: HashSet<SocketAddr> = resources.listeners.keys().copied().collect();
        let new_listeners = bind_new(&config, &listening).map_err(|e| format!("{e:#}"))?;
        if let Some(early_drop) = &self.early_drop {
            early_drop.apply(&config).map_err(|e| format!("{e:#}"))?;
        }
        let gateway = Arc::new(
            Gateway::build(config, Some(&old), &mut resources.slots).map_err(|e| e.to_string())?,
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = gateway.clone();

        let wanted: HashSet<SocketAddr> = gateway
            .config
            .frontends
            .iter()
            .flat_map(|f| f.listen.iter().copied())
            .collect();
        let mut closed = 0;
        resources.listeners.retain(|address, task| {
            let keep = wanted.contains(address);
            if !keep {
                task.abort();
                closed += 1;
            }
            keep
        });
        let opened = new_listeners.len();
        for (address, listener) in new_listeners {
            let task = tokio::spawn(accept(self.clone(), address, listener));
            resources.listeners.insert(address, task);
        }
        wiring::update(self, &gateway, &mut resources.watchers);
        self.changed.notify_one();
        let summary = format!(
            "reloaded: {} frontends, {} backends, {} servers; {opened} listeners opened, {closed} closed",
            gateway.config.frontends.len(),
            gateway.config.backends.len(),
            gateway
                .config
                .backends
                .iter()
                .map(|b| b.servers.len())
                .sum::<usize>()
        );
        info!("{summary}");
        Ok(summary)
    }

    /// Stops accepting and the health checks; waits up to `timeout` for the open
    /// connections (none when `timeout` is zero). Returns how many were left.
    pub async fn shut_down(&self, timeout: Duration) -> usize {
        let mut resources = self.resources.lock().await;
        for (_, task) in resources.listeners.drain() {
            task.abort();
        }
        wiring::stop_all(&mut resources.watchers);
        let deadline = Instant::now() + timeout;
        loop {
            let open = self.connections.load(Ordering::Acquire);
            if open == 0 || Instant::now() >= deadline {
                return open;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Frees the map slots of removed servers whose last connection has ended.
    pub async fn collect_slots(&self) -> Vec<u32> {
        self.resources.lock().await.slots.collect()
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

/// A client connection, counted open (for a graceful shutdown) until dropped.
pub struct Open(Arc<Daemon>);

impl Open {
    pub fn daemon(&self) -> &Arc<Daemon> {
        &self.0
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Bound listeners, not accepting yet.
pub type Listeners = Vec<(SocketAddr, TcpListener)>;

/// Binds the listen addresses of `config` that are not in `listening`.
fn bind_new(config: &Config, listening: &HashSet<SocketAddr>) -> anyhow::Result<Listeners> {
    let mut bound = Vec::new();
    for frontend in &config.frontends {
        for &address in &frontend.listen {
            if listening.contains(&address) {
                continue;
            }
            let listener = frontend::bind(address).map_err(|e| {
                anyhow::anyhow!(
                    "frontend `{}` cannot listen on {address}: {e}: is the address configured \
                     on this host, and is no other program listening on it?",
                    frontend.name
                )
            })?;
            bound.push((address, listener));
        }
    }
    Ok(bound)
}

/// Accepts on one address for as long as some frontend of the current gateway
/// listens there; each client goes to that frontend.
async fn accept(daemon: Arc<Daemon>, address: SocketAddr, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let gateway = daemon.gateway();
                let Some(frontend) = gateway.frontend_at(address) else {
                    // Removed by a reload that is closing this listener.
                    continue;
                };
                daemon.connections.fetch_add(1, Ordering::AcqRel);
                let open = Open(daemon.clone());
                tokio::spawn(conn::handle(open, gateway, frontend, client, peer));
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(%address, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
