//! A backend's servers at run time: what the operator set (ready, drain, maint), what
//! the health checks found, and the counters that `kgate status` shows.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
};

use crate::{config::Backend, health::state::Health};

/// What the operator set with `kgate server set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminState {
    /// Takes new connections when healthy.
    Ready,
    /// No new connections; health checks go on.
    Drain,
    /// No new connections and no health checks.
    Maint,
}

impl FromStr for AdminState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(AdminState::Ready),
            "drain" => Ok(AdminState::Drain),
            "maint" => Ok(AdminState::Maint),
            other => Err(format!(
                "`{other}` is not a server state: use ready, drain or maint"
            )),
        }
    }
}

impl fmt::Display for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        })
    }
}

/// The latest health check results of a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthView {
    pub state: Health,
    /// "ok", "refused", "timeout", "bad reply", "error", or "" before the first check.
    pub last_check: &'static str,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
}

impl HealthView {
    /// Before the first check: usable.
    pub fn unchecked() -> HealthView {
        HealthView {
            state: Health::Unchecked,
            last_check: "",
            consecutive_ok: 0,
            consecutive_fail: 0,
        }
    }
}

/// One server of a pool.
#[derive(Debug)]
pub struct ServerRuntime {
    /// The server's slot in the pinned `servers` map.
    pub slot: u32,
    admin: AtomicU8,
    healthy: AtomicBool,
    health: Mutex<HealthView>,
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// Bytes kgate moved itself (userspace data plane, or passed bytes of a spliced
    /// connection); the eBPF program counts the spliced ones.
    pub copied_in: AtomicU64,
    pub copied_out: AtomicU64,
}

impl ServerRuntime {
    fn new(slot: u32) -> ServerRuntime {
        ServerRuntime {
            slot,
            admin: AtomicU8::new(AdminState::Ready as u8),
            healthy: AtomicBool::new(true),
            health: Mutex::new(HealthView::unchecked()),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            copied_in: AtomicU64::new(0),
            copied_out: AtomicU64::new(0),
        }
    }

    pub fn admin(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            x if x == AdminState::Drain as u8 => AdminState::Drain,
            x if x == AdminState::Maint as u8 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Ordering::Relaxed);
    }

    pub fn health(&self) -> HealthView {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_health(&self, view: HealthView) {
        self.healthy
            .store(view.state.is_usable(), Ordering::Relaxed);
        *self.health.lock().unwrap_or_else(|p| p.into_inner()) = view;
    }

    /// The state `kgate status` shows: the operator's, else the checks'.
    pub fn state(&self) -> String {
        match self.admin() {
            AdminState::Drain => "drain".to_owned(),
            AdminState::Maint => "maint".to_owned(),
            AdminState::Ready => self.health().state.to_string(),
        }
    }

    /// Whether a new connection may go to this server.
    pub fn takes_connections(&self, max_connections: Option<u32>) -> bool {
        self.admin() == AdminState::Ready
            && self.healthy.load(Ordering::Relaxed)
            && max_connections.is_none_or(|max| self.active.load(Ordering::Relaxed) < max.into())
    }
}

/// A backend's servers, in configuration order.
#[derive(Debug)]
pub struct Pool {
    pub servers: Vec<ServerRuntime>,
    /// Smooth weighted round robin: each server's current weight.
    pub(crate) round_robin: Mutex<Vec<i64>>,
    /// Clients closed at once because no server could take them.
    pub no_server: AtomicU64,
}

impl Pool {
    /// `first_slot` is the `servers` map slot of the backend's first server.
    pub fn new(backend: &Backend, first_slot: u32) -> Pool {
        Pool {
            servers: (0..backend.servers.len())
                .map(|i| ServerRuntime::new(first_slot + i as u32))
                .collect(),
            round_robin: Mutex::new(vec![0; backend.servers.len()]),
            no_server: AtomicU64::new(0),
        }
    }
}
