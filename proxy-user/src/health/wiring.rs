//! Runs a [`Monitor`] for every checked server of the current gateway and feeds its
//! results to the server's run-time state (balancing, `kgate status`).
//!
//! A server in maint is not checked: its monitor is stopped while it is in maint and
//! started afresh (unchecked, so usable) when it leaves maint.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    check::{CheckKind, CheckSpec},
    failure::CheckFailure,
    monitor::{HealthSettings, Monitor, ServerHealthSnapshot},
    tls::TlsClient,
};
use crate::{
    config::{CheckType, HealthConfig, Server},
    gateway::Gateway,
    pool::{AdminState, HealthView, ServerRuntime},
};

/// What the checks tell the rest of kgate (the daemon).
pub trait ServerEvents: Send + Sync + 'static {
    /// A server's state changed: publish it at once.
    fn state_changed(&self);
    /// Whether servers are available may have changed: say what did.
    fn availability_changed(&self);
}

/// How often a server's watcher looks at the operator's state (maint or not).
const ADMIN_POLL: Duration = Duration::from_millis(200);

/// The checks of one server: stopped when dropped.
pub struct Watcher {
    runtime: Arc<ServerRuntime>,
    /// What the checks are: a reload that changes it restarts them.
    fingerprint: String,
    stop: watch::Sender<bool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Makes the running checks those of `gateway`: starts them for new servers and for
/// servers whose check changed, stops them for servers that are gone, and leaves the
/// others running.
pub fn update<E: ServerEvents>(
    events: &Arc<E>,
    gateway: &Gateway,
    watchers: &mut HashMap<(String, String), Watcher>,
) {
    let mut wanted = HashMap::new();
    for (backend, pool) in gateway.config.backends.iter().zip(&gateway.pools) {
        let Some(kind) = check_kind(backend.health.check) else {
            continue;
        };
        // Made once for the backend's servers (it may read the system's CAs).
        let tls = kind
            .tls()
            .then(|| Arc::new(TlsClient::new(&backend.health.tls)));
        for (server, runtime) in backend.servers.iter().zip(&pool.servers) {
            let spec = spec(kind, &backend.health, server, tls.clone());
            let settings = settings(&backend.health);
            let fingerprint = format!("{spec:?} {settings:?}");
            let key = (backend.name.clone(), server.name.clone());
            let unchanged = watchers
                .get(&key)
                .is_some_and(|w| Arc::ptr_eq(&w.runtime, runtime) && w.fingerprint == fingerprint);
            let watcher = match watchers.remove(&key) {
                Some(watcher) if unchanged => watcher,
                _ => {
                    let (stop, stopped) = watch::channel(false);
                    let name = format!("{}/{}", backend.name, server.name);
                    tokio::spawn(watch_server(
                        events.clone(),
                        runtime.clone(),
                        name,
                        spec,
                        settings,
                        stopped,
                    ));
                    Watcher {
                        runtime: runtime.clone(),
                        fingerprint,
                        stop,
                    }
                }
            };
            wanted.insert(key, watcher);
        }
    }
    // The rest are dropped, which stops them.
    *watchers = wanted;
}

/// Stops every check (at shutdown).
pub fn stop_all(watchers: &mut HashMap<(String, String), Watcher>) {
    watchers.clear();
}

fn check_kind(check: CheckType) -> Option<CheckKind> {
    match check {
        CheckType::None => None,
        CheckType::Tcp => Some(CheckKind::Tcp),
        CheckType::Smtp => Some(CheckKind::Smtp),
        CheckType::Imap => Some(CheckKind::Imap),
        CheckType::Smtps => Some(CheckKind::Smtps),
        CheckType::Imaps => Some(CheckKind::Imaps),
    }
}

fn spec(
    kind: CheckKind,
    health: &HealthConfig,
    server: &Server,
    tls: Option<Arc<TlsClient>>,
) -> CheckSpec {
    CheckSpec {
        kind,
        address: SocketAddr::new(
            health.address.unwrap_or(server.address.ip()),
            health.port.unwrap_or(server.address.port()),
        ),
        proxy_local: health.send_proxy,
        timeout: health.timeout,
        helo_name: health.helo.clone(),
        tls,
    }
}

fn settings(health: &HealthConfig) -> HealthSettings {
    HealthSettings {
        inter: health.interval,
        fastinter: health.fastinter,
        downinter: health.downinter,
        rise: health.rise,
        fall: health.fall,
        timeout: health.timeout,
    }
}

/// Keeps one server's monitor running outside maint and copies its snapshots into the
/// server's state.
async fn watch_server<E: ServerEvents>(
    events: Arc<E>,
    runtime: Arc<ServerRuntime>,
    name: String,
    spec: CheckSpec,
    settings: HealthSettings,
    mut stopped: watch::Receiver<bool>,
) {
    let mut running: Option<(Monitor, watch::Receiver<ServerHealthSnapshot>)> = None;
    loop {
        let in_maint = runtime.admin() == AdminState::Maint;
        match (&mut running, in_maint) {
            (None, false) => {
                let changed = events.clone();
                let monitor = Monitor::spawn(
                    name.clone(),
                    spec.clone(),
                    settings.clone(),
                    move |_| changed.state_changed(),
                    stopped.clone(),
                );
                let snapshots = monitor.subscribe();
                runtime.set_health(view(&snapshots.borrow()));
                events.availability_changed();
                running = Some((monitor, snapshots));
            }
            (Some(_), true) => {
                running = None;
                runtime.set_health(HealthView::unchecked("not checked in maint"));
                events.state_changed();
            }
            _ => {}
        }
        let snapshot_changed = async {
            match &mut running {
                Some((_, snapshots)) => snapshots.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = snapshot_changed => {
                if changed && let Some((_, snapshots)) = &running {
                    let snapshot = snapshots.borrow().clone();
                    // A new snapshot follows each finished check.
                    let counter = match snapshot.health.last() {
                        Some(Ok(())) => &runtime.checks_passed,
                        _ => &runtime.checks_failed,
                    };
                    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    runtime.set_health(view(&snapshot));
                    events.availability_changed();
                }
            }
            _ = tokio::time::sleep(ADMIN_POLL) => {}
            _ = stopped.changed() => return,
        }
    }
}

fn view(snapshot: &ServerHealthSnapshot) -> HealthView {
    let health = &snapshot.health;
    let (reason, since) = match &snapshot.last_change {
        Some((transition, at)) => (transition.to_string(), *at),
        None => (
            "waiting for the first check".to_owned(),
            snapshot.started_at,
        ),
    };
    HealthView {
        state: health.state(),
        reason,
        since,
        last_failure: match health.last() {
            Some(Err(failure)) => Some(failure.to_string()),
            _ => None,
        },
        last_check_at: snapshot.last_check_at,
        last_check_took: snapshot.last_check_took,
        last_check: match health.last() {
            None => "",
            Some(Ok(())) => "ok",
            Some(Err(CheckFailure::Refused)) => "refused",
            Some(Err(CheckFailure::TimedOut(_))) => "timeout",
            Some(Err(CheckFailure::BadReply { .. })) => "bad reply",
            Some(Err(CheckFailure::Tls(_))) => "tls",
            Some(Err(CheckFailure::Closed(_) | CheckFailure::Io { .. })) => "error",
        },
        consecutive_ok: health.consecutive_ok(),
        consecutive_fail: health.consecutive_fail(),
    }
}
