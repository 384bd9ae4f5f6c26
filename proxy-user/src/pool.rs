//! A backend's servers at run time: what the operator set (ready, drain, maint), what
//! the health checks found, and the counters that `kgate status` shows.

use std::{
    fmt,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use crate::{health::state::Health, rate::Rate};

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
    /// Why the server is in `state`: the change that put it there ("connection
    /// refused (3 failed checks in a row)"), or why it is not checked (yet).
    pub reason: String,
    /// When it came to `state`.
    pub since: SystemTime,
    /// "ok", "refused", "timeout", "bad reply", "tls", "error", or "" before the first check.
    pub last_check: &'static str,
    /// What went wrong in the last check, when it failed.
    pub last_failure: Option<String>,
    /// When the last check started, and how long it took.
    pub last_check_at: Option<SystemTime>,
    pub last_check_took: Option<Duration>,
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
}

impl HealthView {
    /// Not checked (yet), `reason` says why: usable.
    pub fn unchecked(reason: &str) -> HealthView {
        HealthView {
            state: Health::Unchecked,
            reason: reason.to_owned(),
            since: SystemTime::now(),
            last_check: "",
            last_failure: None,
            last_check_at: None,
            last_check_took: None,
            consecutive_ok: 0,
            consecutive_fail: 0,
        }
    }
}

/// A server's state as `kgate status` shows it: the operator's, else the checks'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateView {
    /// up, down, unchecked, drain or maint.
    pub state: String,
    pub reason: String,
    pub since: SystemTime,
}

/// How an open connection's bytes move: the server counts its connections by it,
/// and the connection's log line names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Spliced,
    Copied,
    /// One direction spliced, the other copied.
    Mixed,
    /// Handed off to the packet data plane's TC programs.
    Forwarded,
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Path::Spliced => "spliced",
            Path::Copied => "copied",
            Path::Mixed => "half-spliced",
            Path::Forwarded => "forwarded",
        })
    }
}

/// One server of a pool.
#[derive(Debug)]
pub struct ServerRuntime {
    /// The server's slot in the pinned `servers` map.
    pub slot: u32,
    admin: AtomicU8,
    /// When the operator last set the state; `None` before.
    admin_since: Mutex<Option<SystemTime>>,
    healthy: AtomicBool,
    health: Mutex<HealthView>,
    pub active: AtomicU64,
    pub total: AtomicU64,
    /// New connections a second.
    pub rate: Rate,
    /// Open connections spliced both ways, and one way; the others are copied.
    pub spliced: AtomicU64,
    pub half_spliced: AtomicU64,
    /// Open connections the packet data plane forwards.
    pub forwarded: AtomicU64,
    /// Bytes kgate moved itself (userspace data plane, or passed bytes of a spliced
    /// connection); the eBPF program counts the spliced ones.
    pub copied_in: AtomicU64,
    pub copied_out: AtomicU64,
    pub checks_passed: AtomicU64,
    pub checks_failed: AtomicU64,
    /// Connects that failed or timed out.
    pub connect_errors: AtomicU64,
}

impl ServerRuntime {
    pub fn new(slot: u32) -> ServerRuntime {
        ServerRuntime {
            slot,
            admin: AtomicU8::new(AdminState::Ready as u8),
            admin_since: Mutex::new(None),
            healthy: AtomicBool::new(true),
            health: Mutex::new(HealthView::unchecked(NOT_CHECKED)),
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            rate: Rate::default(),
            spliced: AtomicU64::new(0),
            half_spliced: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            copied_in: AtomicU64::new(0),
            copied_out: AtomicU64::new(0),
            checks_passed: AtomicU64::new(0),
            checks_failed: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
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
        *self.admin_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(SystemTime::now());
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
        self.state_view().state
    }

    /// The state with why and since when: the operator's, else the checks' (and the
    /// operator's `ready` when it came after the checks' last change).
    pub fn state_view(&self) -> StateView {
        let health = self.health();
        let admin_since = *self.admin_since.lock().unwrap_or_else(|p| p.into_inner());
        let by_operator = |state: AdminState, what: &str| StateView {
            state: state.to_string(),
            reason: format!("set to {state} by the operator: {what}"),
            since: admin_since.unwrap_or(health.since),
        };
        match self.admin() {
            AdminState::Drain => by_operator(AdminState::Drain, "no new connections, checks go on"),
            AdminState::Maint => by_operator(AdminState::Maint, "no new connections, no checks"),
            AdminState::Ready => match admin_since {
                Some(since) if since > health.since => StateView {
                    state: health.state.to_string(),
                    reason: "set ready by the operator".to_owned(),
                    since,
                },
                _ => StateView {
                    state: health.state.to_string(),
                    reason: health.reason,
                    since: health.since,
                },
            },
        }
    }

    /// Counts an open connection as carried on `path` from now on, instead of `before`.
    pub fn moved(&self, before: Path, path: Path) {
        let counter = |path| match path {
            Path::Spliced => Some(&self.spliced),
            Path::Mixed => Some(&self.half_spliced),
            Path::Forwarded => Some(&self.forwarded),
            Path::Copied => None,
        };
        if let Some(counter) = counter(before) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(counter) = counter(path) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the server may take new connections at all: ready and not down (a full
    /// one still counts: it takes more once some end).
    pub fn is_available(&self) -> bool {
        self.admin() == AdminState::Ready && self.healthy.load(Ordering::Relaxed)
    }

    /// Whether a new connection may go to this server.
    pub fn takes_connections(&self, max_connections: Option<u32>) -> bool {
        self.admin() == AdminState::Ready
            && self.healthy.load(Ordering::Relaxed)
            && max_connections.is_none_or(|max| self.active.load(Ordering::Relaxed) < max.into())
    }
}

/// Why a server of a backend without `[backends.health]` is not checked.
const NOT_CHECKED: &str = "no health checks configured: always taken as up";

/// A backend's servers, in configuration order.
#[derive(Debug)]
pub struct Pool {
    pub servers: Vec<Arc<ServerRuntime>>,
    /// Smooth weighted round robin: each server's current weight.
    pub(crate) round_robin: Mutex<Vec<i64>>,
    pub counters: Arc<BackendCounters>,
}

/// A backend's counters, kept across reloads.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Clients closed at once because no server could take them.
    pub no_server: AtomicU64,
    /// Connects to a further server after one failed.
    pub retries: AtomicU64,
    /// Whether the backend was last found with no server available, for
    /// [`Pool::availability_change`].
    none_available: Mutex<bool>,
}

/// A backend lost its last available server, or got one back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AvailabilityChange {
    NoneLeft,
    Back,
}

impl Pool {
    pub fn new(servers: Vec<Arc<ServerRuntime>>, counters: Arc<BackendCounters>) -> Pool {
        Pool {
            round_robin: Mutex::new(vec![0; servers.len()]),
            servers,
            counters,
        }
    }

    /// Whether the backend has just lost its last available server, or got one back,
    /// since the last call: each change is told once, however many clients it
    /// refuses meanwhile.
    pub fn availability_change(&self) -> Option<AvailabilityChange> {
        let mut none_available = self
            .counters
            .none_available
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let none_now = !self.servers.iter().any(|s| s.is_available());
        if none_now == *none_available {
            return None;
        }
        *none_available = none_now;
        Some(if none_now {
            AvailabilityChange::NoneLeft
        } else {
            AvailabilityChange::Back
        })
    }

    /// A pool of new servers in slots `first_slot..`, for tests.
    #[cfg(test)]
    pub fn fresh(servers: usize, first_slot: u32) -> Pool {
        Pool::new(
            (0..servers as u32)
                .map(|i| Arc::new(ServerRuntime::new(first_slot + i)))
                .collect(),
            Arc::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down_since(at: SystemTime) -> HealthView {
        HealthView {
            state: Health::Down,
            reason: "connection refused (3 failed checks in a row)".to_owned(),
            since: at,
            ..HealthView::unchecked("")
        }
    }

    #[test]
    fn the_state_shown_is_the_operators_then_the_checks_with_why_and_since_when() {
        let server = ServerRuntime::new(0);
        let view = server.state_view();
        assert_eq!(view.state, "unchecked");
        assert_eq!(view.reason, NOT_CHECKED);

        let went_down = SystemTime::now() - Duration::from_secs(60);
        server.set_health(down_since(went_down));
        let view = server.state_view();
        assert_eq!(
            (view.state.as_str(), view.reason.as_str(), view.since),
            (
                "down",
                "connection refused (3 failed checks in a row)",
                went_down
            )
        );

        server.set_admin(AdminState::Drain);
        let view = server.state_view();
        assert_eq!(view.state, "drain");
        assert_eq!(
            view.reason,
            "set to drain by the operator: no new connections, checks go on"
        );
        assert!(view.since > went_down);
        let drained = view.since;

        // Ready again: the checks' state, but changed last by the operator.
        server.set_admin(AdminState::Ready);
        let view = server.state_view();
        assert_eq!(view.state, "down");
        assert_eq!(view.reason, "set ready by the operator");
        assert!(view.since >= drained);

        // The checks change the state after that: theirs is the reason again.
        let came_up = SystemTime::now() + Duration::from_secs(1);
        server.set_health(HealthView {
            state: Health::Up,
            reason: "2 checks passed in a row".to_owned(),
            since: came_up,
            ..HealthView::unchecked("")
        });
        let view = server.state_view();
        assert_eq!(
            (view.state.as_str(), view.reason.as_str(), view.since),
            ("up", "2 checks passed in a row", came_up)
        );
    }

    fn with_health(state: Health) -> HealthView {
        HealthView {
            state,
            ..HealthView::unchecked("")
        }
    }

    #[test]
    fn losing_the_last_server_and_getting_one_back_are_each_told_once() {
        let pool = Pool::fresh(2, 0);
        assert_eq!(
            pool.availability_change(),
            None,
            "unchecked servers are available"
        );
        pool.servers[0].set_health(with_health(Health::Down));
        assert_eq!(pool.availability_change(), None, "node1 is still there");
        pool.servers[1].set_admin(AdminState::Drain);
        assert_eq!(
            pool.availability_change(),
            Some(AvailabilityChange::NoneLeft)
        );
        assert_eq!(pool.availability_change(), None, "told once");
        pool.servers[1].set_health(with_health(Health::Down));
        assert_eq!(pool.availability_change(), None, "still none");
        pool.servers[0].set_health(with_health(Health::Up));
        assert_eq!(pool.availability_change(), Some(AvailabilityChange::Back));
        assert_eq!(pool.availability_change(), None, "told once");
        pool.servers[0].set_admin(AdminState::Maint);
        assert_eq!(
            pool.availability_change(),
            Some(AvailabilityChange::NoneLeft)
        );

        // A reload keeps the backend's counters, and with them what was told.
        let reloaded = Pool::new(pool.servers.clone(), pool.counters.clone());
        assert_eq!(reloaded.availability_change(), None);
    }

    #[test]
    fn open_connections_are_counted_by_how_their_bytes_move() {
        let server = ServerRuntime::new(0);
        server.moved(Path::Copied, Path::Spliced);
        server.moved(Path::Copied, Path::Mixed);
        server.moved(Path::Copied, Path::Spliced);
        assert_eq!(server.spliced.load(Ordering::Relaxed), 2);
        assert_eq!(server.half_spliced.load(Ordering::Relaxed), 1);
        // Two end.
        server.moved(Path::Spliced, Path::Copied);
        server.moved(Path::Mixed, Path::Copied);
        assert_eq!(server.spliced.load(Ordering::Relaxed), 1);
        assert_eq!(server.half_spliced.load(Ordering::Relaxed), 0);
    }
}
