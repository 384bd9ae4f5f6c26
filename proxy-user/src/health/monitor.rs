//! Checking one server forever: run a check, record it, log a change of state, publish
//! a snapshot, wait the interval the state asks for, again, until shutdown.
//!
//! A check runs to its end before the next wait starts, so checks of one server never
//! overlap and a slow server is not checked faster than its interval. The first check
//! starts within a tenth of `inter` (at random), so the servers of a pool are not all
//! checked in the same instant after a start.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    time::{Duration, SystemTime},
};

use tokio::{
    sync::watch,
    task::JoinHandle,
    time::{Instant, sleep},
};
use tracing::{debug, info, warn};

use super::{
    check::{CheckKind, CheckSpec, run_check},
    failure::CheckFailure,
    state::{Health, SPREAD, ServerHealth, Transition, spread},
};

/// postscreen's default `postscreen_greet_wait` (not under stress): how long it holds
/// a client it does not know between `220-` and the final `220 `.
pub const POSTSCREEN_GREET_WAIT: Duration = Duration::from_secs(6);

/// An `smtp` check's timeout should exceed the greet wait by this much (EHLO and QUIT
/// after the greeting).
const SMTP_TIMEOUT_MARGIN: Duration = Duration::from_secs(2);

/// How often, how long and how many: HAProxy's `inter`, `fastinter`, `downinter`,
/// `rise`, `fall` and `timeout check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// Between checks of a server that is steadily up (or not checked yet).
    pub inter: Duration,
    /// Between checks of a server on its way up or down (failures while up, successes
    /// while down): shorter, so a change is confirmed sooner.
    pub fastinter: Duration,
    /// Between checks of a server that is steadily down.
    pub downinter: Duration,
    /// Passed checks in a row that bring a down server up.
    pub rise: u32,
    /// Failed checks in a row that take an up server down.
    pub fall: u32,
    /// For one whole check, connect to close. For `smtp` against Postfix postscreen it
    /// must exceed `postscreen_greet_wait` (6 s): see [`HealthSettings::timeout_warning`].
    pub timeout: Duration,
}

impl Default for HealthSettings {
    /// inter 2 s, fastinter 1 s, downinter 4 s, rise 2, fall 3, timeout 2 s.
    fn default() -> Self {
        HealthSettings {
            inter: Duration::from_secs(2),
            fastinter: Duration::from_secs(1),
            downinter: Duration::from_secs(4),
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(2),
        }
    }
}

impl HealthSettings {
    /// A warning for the operator when the timeout looks too short for the kind of
    /// check: an `smtp` check against postscreen waits out `postscreen_greet_wait` the
    /// first time postscreen sees the gateway each day, and a check cut short there
    /// never passes the pregreet test, so it would fail every time.
    pub fn timeout_warning(&self, kind: CheckKind) -> Option<String> {
        let needed = POSTSCREEN_GREET_WAIT + SMTP_TIMEOUT_MARGIN;
        (kind == CheckKind::Smtp && self.timeout < needed).then(|| {
            format!(
                "smtp check timeout {:?} is shorter than {needed:?}: Postfix postscreen holds \
                 back its greeting for postscreen_greet_wait (6 s by default) from clients it \
                 does not know yet, so checks would time out and the server would never come \
                 up; set the health timeout to 10s (or more than postscreen_greet_wait + 2s)",
                self.timeout
            )
        })
    }
}

/// What the monitor knows about its server, published after every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHealthSnapshot {
    /// State, counters, last result.
    pub health: ServerHealth,
    /// When the last check started.
    pub last_check_at: Option<SystemTime>,
    /// How long the last check took.
    pub last_check_took: Option<Duration>,
    /// When the monitor started: the server has been unchecked since then.
    pub started_at: SystemTime,
    /// The last change of state, and when it happened.
    pub last_change: Option<(Transition, SystemTime)>,
}

impl ServerHealthSnapshot {
    fn new(settings: &HealthSettings) -> ServerHealthSnapshot {
        ServerHealthSnapshot {
            health: ServerHealth::new(settings.rise, settings.fall),
            last_check_at: None,
            last_check_took: None,
            started_at: SystemTime::now(),
            last_change: None,
        }
    }
}

/// A running [`monitor`] task. Dropping it stops the checks.
pub struct Monitor {
    snapshot: watch::Receiver<ServerHealthSnapshot>,
    task: Option<JoinHandle<()>>,
}

impl Monitor {
    /// Starts checking the server on the current tokio runtime. `name` (such as
    /// `mail-smtp/node1`) names it in the log; `on_change` is called on every change of
    /// state, after it is logged; the task ends when `shutdown` turns true (or its
    /// sender is dropped).
    pub fn spawn(
        name: impl Into<String>,
        spec: CheckSpec,
        settings: HealthSettings,
        on_change: impl FnMut(&Transition) + Send + 'static,
        shutdown: watch::Receiver<bool>,
    ) -> Monitor {
        let (publish, snapshot) = watch::channel(ServerHealthSnapshot::new(&settings));
        let name = name.into();
        let task = tokio::spawn(async move {
            monitor(name, spec, settings, on_change, shutdown, publish).await;
        });
        Monitor {
            snapshot,
            task: Some(task),
        }
    }

    /// The state after the last check.
    #[cfg(test)]
    pub fn snapshot(&self) -> ServerHealthSnapshot {
        self.snapshot.borrow().clone()
    }

    /// A receiver that sees each new snapshot (for publishing counters to the maps).
    pub fn subscribe(&self) -> watch::Receiver<ServerHealthSnapshot> {
        self.snapshot.clone()
    }

    /// Waits for the task to end (after shutdown).
    #[cfg(test)]
    pub async fn join(mut self) {
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Checks one server until `shutdown` turns true (or its sender is dropped), logging
/// each change of state with its reason (`warn` going down, `info` coming up), calling
/// `on_change` with it, and publishing a snapshot after every check. The check's
/// timeout is `settings.timeout` (it replaces `spec.timeout`). A check in progress at
/// shutdown is abandoned.
pub async fn monitor(
    name: String,
    mut spec: CheckSpec,
    settings: HealthSettings,
    mut on_change: impl FnMut(&Transition) + Send,
    mut shutdown: watch::Receiver<bool>,
    publish: watch::Sender<ServerHealthSnapshot>,
) {
    spec.timeout = settings.timeout;
    if let Some(warning) = settings.timeout_warning(spec.kind) {
        warn!(server = %name, address = %spec.address, "{warning}");
    }
    let mut snapshot = ServerHealthSnapshot::new(&settings);
    let mut wait = settings.inter.mul_f64(SPREAD * unit_random());
    loop {
        tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            () = sleep(wait) => {}
        }
        let started_at = SystemTime::now();
        let started = Instant::now();
        let result = tokio::select! {
            biased;
            () = shutdown_requested(&mut shutdown) => return,
            result = run_check(&spec) => result,
        };
        let took = started.elapsed();
        log_check(&name, &spec, &snapshot.health, &result, took);
        let transition = snapshot.health.record(result);
        snapshot.last_check_at = Some(started_at);
        snapshot.last_check_took = Some(took);
        if let Some(transition) = transition {
            log_transition(&name, &spec, &transition);
            on_change(&transition);
            snapshot.last_change = Some((transition, SystemTime::now()));
        }
        publish.send_replace(snapshot.clone());
        let nominal =
            snapshot
                .health
                .next_interval(settings.inter, settings.fastinter, settings.downinter);
        wait = spread(nominal, random_u64());
    }
}

/// Returns once shutdown is requested: the value is true, or the sender is gone.
async fn shutdown_requested(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// Every check at debug; a failure that does not (yet) change the state at info, so an
/// operator sees a server wobble before it goes down.
fn log_check(
    name: &str,
    spec: &CheckSpec,
    before: &ServerHealth,
    result: &Result<(), CheckFailure>,
    took: Duration,
) {
    match result {
        Ok(()) => {
            debug!(server = %name, address = %spec.address, check = %spec.kind, ?took, "check passed")
        }
        Err(failure) if before.state() == Health::Up => info!(
            server = %name,
            address = %spec.address,
            check = %spec.kind,
            "check failed: {failure} ({} of {} before the server goes down)",
            before.consecutive_fail() + 1,
            before.fall(),
        ),
        Err(failure) => {
            debug!(server = %name, address = %spec.address, check = %spec.kind, ?took, "check failed: {failure}")
        }
    }
}

fn log_transition(name: &str, spec: &CheckSpec, transition: &Transition) {
    match transition.to {
        Health::Down => warn!(
            server = %name,
            address = %spec.address,
            check = %spec.kind,
            "server down: {transition}"
        ),
        Health::Up | Health::Unchecked => info!(
            server = %name,
            address = %spec.address,
            check = %spec.kind,
            "server up: {transition}"
        ),
    }
}

/// A random number, without a crate: each `RandomState` gets fresh SipHash keys.
fn random_u64() -> u64 {
    RandomState::new().build_hasher().finish()
}

/// A random number in [0, 1].
fn unit_random() -> f64 {
    random_u64() as f64 / u64::MAX as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::state::TransitionReason;
    use std::{
        net::SocketAddr,
        sync::{Arc, Mutex},
    };
    use tokio::{net::TcpListener, time::timeout};

    const FAST: Duration = Duration::from_millis(20);
    const LONG: Duration = Duration::from_secs(10);

    fn settings() -> HealthSettings {
        HealthSettings {
            inter: FAST,
            fastinter: FAST,
            downinter: FAST,
            rise: 2,
            fall: 3,
            timeout: Duration::from_secs(2),
        }
    }

    fn tcp_spec(address: SocketAddr) -> CheckSpec {
        CheckSpec {
            kind: CheckKind::Tcp,
            address,
            proxy_local: false,
            timeout: Duration::from_secs(1),
            helo_name: "kgate.test".into(),
            tls: None,
        }
    }

    /// Accepts and closes every connection (a FIN at once) until aborted.
    async fn accepting(listener: TcpListener) -> JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        })
    }

    async fn wait_for(rx: &mut watch::Receiver<ServerHealthSnapshot>, state: Health, checks: u64) {
        timeout(
            LONG,
            rx.wait_for(|s| s.health.state() == state && s.health.checks() >= checks),
        )
        .await
        .unwrap_or_else(|_| panic!("not {state} within {LONG:?}"))
        .unwrap();
    }

    #[tokio::test]
    async fn a_server_goes_up_down_and_up_again_with_its_transitions_reported() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = accepting(listener).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let (stop, shutdown) = watch::channel(false);
        let monitor = Monitor::spawn(
            "b/s1",
            tcp_spec(addr),
            settings(),
            move |t: &Transition| record.lock().unwrap().push(t.clone()),
            shutdown,
        );
        assert_eq!(monitor.snapshot().health.state(), Health::Unchecked);
        let mut rx = monitor.subscribe();
        wait_for(&mut rx, Health::Up, 1).await;
        let snapshot = monitor.snapshot();
        assert!(snapshot.last_check_at.is_some() && snapshot.last_check_took.is_some());
        assert_eq!(snapshot.health.last(), Some(&Ok(())));
        let (change, at) = snapshot
            .last_change
            .clone()
            .expect("the change to up is kept");
        assert_eq!(change.to_string(), "first check passed");
        assert!(at >= snapshot.started_at && at >= snapshot.last_check_at.unwrap());

        // The server stops: refused from now on.
        server.abort();
        let _ = server.await;
        let checks = monitor.snapshot().health.checks();
        wait_for(&mut rx, Health::Down, checks + 3).await;
        let snapshot = monitor.snapshot();
        let (change, _) = snapshot.last_change.expect("the change to down is kept");
        assert_eq!(change.to, Health::Down);
        let down = snapshot.health;
        assert_eq!(down.consecutive_fail(), 3);
        assert_eq!(down.last(), Some(&Err(CheckFailure::Refused)));

        // It comes back on the same port.
        let server = accepting(TcpListener::bind(addr).await.unwrap()).await;
        wait_for(&mut rx, Health::Up, 0).await;
        assert_eq!(monitor.snapshot().health.consecutive_ok(), 2);

        stop.send(true).unwrap();
        timeout(LONG, monitor.join()).await.unwrap();
        server.abort();

        let seen = seen.lock().unwrap();
        let summary: Vec<_> = seen.iter().map(|t| (t.from, t.to, t.to_string())).collect();
        assert_eq!(
            summary,
            [
                (
                    Health::Unchecked,
                    Health::Up,
                    "first check passed".to_owned()
                ),
                (
                    Health::Up,
                    Health::Down,
                    "connection refused (3 failed checks in a row)".to_owned()
                ),
                (
                    Health::Down,
                    Health::Up,
                    "2 checks passed in a row".to_owned()
                ),
            ]
        );
        assert_eq!(
            seen[1].reason,
            TransitionReason::Failed {
                failure: CheckFailure::Refused,
                in_a_row: 3
            }
        );
    }

    #[tokio::test]
    async fn shutdown_ends_the_monitor_even_in_the_middle_of_a_check() {
        // Accepts (backlog) but never answers: an smtp check waits for its timeout.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let spec = CheckSpec {
            kind: CheckKind::Smtp,
            ..tcp_spec(listener.local_addr().unwrap())
        };
        let (stop, shutdown) = watch::channel(false);
        let settings = HealthSettings {
            timeout: Duration::from_secs(60),
            ..settings()
        };
        let monitor = Monitor::spawn("b/s1", spec, settings, |_: &Transition| {}, shutdown);
        sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        stop.send(true).unwrap();
        timeout(Duration::from_secs(2), monitor.join())
            .await
            .expect("the monitor stops at once");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_dropped_shutdown_sender_ends_the_monitor() {
        let (stop, shutdown) = watch::channel(false);
        let monitor = Monitor::spawn(
            "b/s1",
            tcp_spec("127.0.0.1:9".parse().unwrap()),
            settings(),
            |_: &Transition| {},
            shutdown,
        );
        drop(stop);
        timeout(Duration::from_secs(2), monitor.join())
            .await
            .expect("the monitor stops");
    }

    #[test]
    fn smtp_timeouts_shorter_than_postscreens_greet_wait_are_warned_about() {
        // The configuration's default for smtp checks.
        let smtp = HealthSettings {
            timeout: Duration::from_secs(10),
            ..HealthSettings::default()
        };
        assert_eq!(smtp.timeout_warning(CheckKind::Smtp), None);
        let short = HealthSettings::default();
        let warning = short.timeout_warning(CheckKind::Smtp).unwrap();
        assert!(warning.contains("postscreen_greet_wait"), "{warning}");
        assert_eq!(short.timeout_warning(CheckKind::Tcp), None);
        assert_eq!(short.timeout_warning(CheckKind::Imap), None);
    }

    #[test]
    fn random_numbers_differ() {
        let a: Vec<u64> = (0..8).map(|_| random_u64()).collect();
        let mut b = a.clone();
        b.sort_unstable();
        b.dedup();
        assert_eq!(b.len(), a.len(), "{a:?}");
        let u = unit_random();
        assert!((0.0..=1.0).contains(&u));
    }
}
