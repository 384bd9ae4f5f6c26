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
//! connections, then ends; SIGINT ends at once. After an upgrade has handed the
//! listeners over (handover.rs), the old kgate shuts down the same way as on SIGTERM.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd},
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
    ending::Open,
    frontend,
    gateway::Gateway,
    handover::Handed,
    health::wiring::{self, ServerEvents, Watcher},
    maps::{MapError, StatusMaps},
    restart_only,
    slots::{Freed, MapSlots},
    xdp::EarlyDrop,
};

pub struct Daemon {
    /// When this kgate started (for the status page's uptime).
    pub started: SystemTime,
    pub dataplane: Dataplane,
    pub status_maps: Option<StatusMaps>,
    pub early_drop: Option<EarlyDrop>,
    /// Signalled when a server's state changes, so it is published at once.
    pub changed: tokio::sync::Notify,
    current: RwLock<Arc<Gateway>>,
    config_path: PathBuf,
    /// Open client connections, for a graceful shutdown.
    connections: Arc<AtomicUsize>,
    /// Serializes reloads; owns what a reload changes.
    resources: tokio::sync::Mutex<Resources>,
}

#[derive(Default)]
struct Resources {
    listeners: HashMap<SocketAddr, Listening>,
    watchers: HashMap<(String, String), Watcher>,
    slots: MapSlots,
}

/// A listening socket and the task accepting on it.
struct Listening {
    socket: Arc<TcpListener>,
    task: JoinHandle<()>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Daemon {
    /// Builds the first gateway and binds its listeners, or takes those `handed` over
    /// by the kgate this one replaces. Nothing is accepted before [`Daemon::start`].
    pub fn new(
        config: Config,
        config_path: PathBuf,
        dataplane: Dataplane,
        status_maps: Option<StatusMaps>,
        early_drop: Option<EarlyDrop>,
        handed: &mut Handed,
    ) -> anyhow::Result<(Arc<Daemon>, Listeners)> {
        let mut resources = Resources::default();
        // Bind everything before accepting anything: a gateway that serves half of
        // its frontends is worse than one that refuses to start.
        let listeners = bind_new(&config, &HashSet::new(), handed)?;
        let gateway = Gateway::build(config, None, &mut resources.slots)?;
        let daemon = Arc::new(Daemon {
            started: SystemTime::now(),
            dataplane,
            status_maps,
            early_drop,
            changed: tokio::sync::Notify::new(),
            current: RwLock::new(Arc::new(gateway)),
            config_path,
            connections: Arc::default(),
            resources: tokio::sync::Mutex::new(resources),
        });
        Ok((daemon, listeners))
    }

    /// Starts accepting on `listeners` and checking the servers.
    pub async fn start(self: &Arc<Self>, listeners: Listeners) {
        let mut resources = self.resources.lock().await;
        for (address, listener) in listeners {
            resources
                .listeners
                .insert(address, self.listen(address, listener));
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

    /// Re-reads the configuration file and applies what changed. An error says why:
    /// an invalid file changes nothing; changes only a restart applies (see
    /// `restart_only`) leave the rest applied, and are listed.
    pub async fn reload(self: &Arc<Self>) -> Result<String, ReloadError> {
        let refused = |e: String| ReloadError::Refused(e);
        let config = Config::load(&self.config_path).map_err(|e| refused(e.to_string()))?;
        let old = self.gateway();
        let restart_only = restart_only::changes(&old.config, &config, self.early_drop.is_some());
        for change in &restart_only {
            warn!("reload: {change} takes effect when kgate restarts");
        }

        let mut resources = self.resources.lock().await;
        let listening: HashSet<SocketAddr> = resources.listeners.keys().copied().collect();
        let new_listeners = bind_new(&config, &listening, &mut Handed::default())
            .map_err(|e| refused(format!("{e:#}")))?;
        if let Some(early_drop) = &self.early_drop {
            early_drop
                .apply(&config)
                .map_err(|e| refused(format!("{e:#}")))?;
        }
        let gateway = Arc::new(
            Gateway::build(config, Some(&old), &mut resources.slots)
                .map_err(|e| refused(e.to_string()))?,
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = gateway.clone();

        let wanted: HashSet<SocketAddr> = gateway
            .config
            .frontends
            .iter()
            .flat_map(|f| f.listen.iter().copied())
            .collect();
        let mut closed = 0;
        resources.listeners.retain(|address, _| {
            let keep = wanted.contains(address);
            closed += usize::from(!keep);
            keep
        });
        let opened = new_listeners.len();
        for (address, listener) in new_listeners {
            resources
                .listeners
                .insert(address, self.listen(address, listener));
        }
        wiring::update(self, &gateway, &mut resources.watchers);
        self.changed.notify_one();
        // Servers removed or added may leave a backend with none, or give it one.
        gateway.log_availability();
        let summary = format!(
            "reloaded: {}; {opened} listeners opened, {closed} closed",
            gateway.config.summary()
        );
        info!("{summary}");
        if restart_only.is_empty() {
            Ok(summary)
        } else {
            Err(ReloadError::Partly {
                summary,
                restart_only,
            })
        }
    }

    /// Closes this process's listening sockets (after an upgrade, its copies: the
    /// sockets stay open in the kgate that took them over). Nothing is accepted once
    /// this returns.
    pub async fn stop_accepting(&self) {
        let mut resources = self.resources.lock().await;
        for (_, mut listening) in resources.listeners.drain() {
            // An aborted task drops its socket only when the runtime next reaches it.
            listening.task.abort();
            let _ = (&mut listening.task).await;
        }
    }

    /// Stops accepting and the health checks; waits up to `timeout` for the open
    /// connections (none when `timeout` is zero). Returns how many were left.
    pub async fn shut_down(&self, timeout: Duration) -> usize {
        self.stop_accepting().await;
        let mut resources = self.resources.lock().await;
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

    /// Frees the map slots of removed servers and frontends whose last connection has
    /// ended, and zeroes their counters. Under the reload lock: a reload may give a
    /// freed slot out at once, and its new owner must start at zero.
    pub async fn free_slots(&self) -> Result<(), MapError> {
        let mut resources = self.resources.lock().await;
        let Freed { servers, frontends } = resources.slots.collect();
        let Some(maps) = &self.status_maps else {
            return Ok(());
        };
        for slot in servers {
            maps.clear_server(slot)?;
        }
        for slot in frontends {
            maps.clear_frontend(slot)?;
        }
        Ok(())
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Calls `each` with every listening socket, for an upgrade to hand them over.
    /// Reloads wait meanwhile, so the set cannot change under the caller.
    pub async fn with_listeners<T>(
        &self,
        each: impl FnOnce(&mut dyn Iterator<Item = (SocketAddr, BorrowedFd<'_>)>) -> T,
    ) -> T {
        let resources = self.resources.lock().await;
        let mut sockets = resources
            .listeners
            .iter()
            .map(|(address, listening)| (*address, listening.socket.as_fd()));
        each(&mut sockets)
    }

    fn listen(self: &Arc<Self>, address: SocketAddr, listener: TcpListener) -> Listening {
        let socket = Arc::new(listener);
        let task = tokio::spawn(accept(self.clone(), address, socket.clone()));
        Listening { socket, task }
    }
}

/// Why a reload did not apply the whole file.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Nothing changed: the running configuration stays.
    #[error("{0}")]
    Refused(String),
    /// Applied but for what only a restart can change.
    #[error(
        "{summary}; not applied until kgate restarts (systemctl restart kgate): {}",
        restart_only.join("; ")
    )]
    Partly {
        summary: String,
        restart_only: Vec<String>,
    },
}

impl ServerEvents for Daemon {
    fn state_changed(&self) {
        self.changed.notify_one();
    }

    fn availability_changed(&self) {
        self.gateway().log_availability();
    }
}

/// Bound listeners, not accepting yet.
pub type Listeners = Vec<(SocketAddr, TcpListener)>;

/// Binds the listen addresses of `config` that are not in `listening`, taking those
/// `handed` over by the kgate this one replaces instead of binding them again.
fn bind_new(
    config: &Config,
    listening: &HashSet<SocketAddr>,
    handed: &mut Handed,
) -> anyhow::Result<Listeners> {
    let mut bound = Vec::new();
    for frontend in &config.frontends {
        for &address in &frontend.listen {
            if listening.contains(&address) {
                continue;
            }
            if let Some(listener) = handed.take_listener(address) {
                bound.push((address, TcpListener::from_std(listener)?));
                continue;
            }
            let listener = frontend::bind(address, frontend.freebind).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
                    "the address is not on this host: configure it, or set `freebind = true` \
                     if it comes later (the virtual address of a VRRP pair)"
                } else {
                    "is the address configured on this host, and is no other program \
                     listening on it?"
                };
                anyhow::anyhow!(
                    "frontend `{}` cannot listen on {address}: {e}: {hint}",
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
async fn accept(daemon: Arc<Daemon>, address: SocketAddr, listener: Arc<TcpListener>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let gateway = daemon.gateway();
                let Some(frontend) = gateway.frontend_at(address) else {
                    // Removed by a reload that is closing this listener.
                    continue;
                };
                let open = Open::new(&daemon.connections, daemon.dataplane.name());
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Some(connected) =
                        conn::handle(open, gateway, frontend, client, peer).await
                    {
                        daemon.dataplane.relay(connected).await;
                    }
                });
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(%address, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
