//! Runs a [`Monitor`] for every checked server of the configuration and feeds its
//! results to the server's run-time state (balancing, `kgate status`).
//!
//! A server in maint is not checked: its monitor is stopped while it is in maint and
//! started afresh (unchecked, so usable) when it leaves maint.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{
    check::{CheckFailure, CheckKind, CheckSpec},
    monitor::{HealthSettings, Monitor, ServerHealthSnapshot},
};
use crate::{
    config::{CheckType, HealthConfig, Server},
    gateway::Gateway,
    pool::{AdminState, HealthView},
};

/// How often a server's watcher looks at the operator's state (maint or not).
const ADMIN_POLL: Duration = Duration::from_millis(200);

/// Starts the checks of every server whose backend has them. They stop when
/// `shutdown` turns true.
pub fn start(gateway: &Arc<Gateway>, shutdown: &watch::Receiver<bool>) {
    for (b, backend) in gateway.config.backends.iter().enumerate() {
        let Some(kind) = check_kind(backend.health.check) else {
            continue;
        };
        for (s, server) in backend.servers.iter().enumerate() {
            let spec = spec(kind, &backend.health, server);
            let settings = settings(&backend.health);
            let name = format!("{}/{}", backend.name, server.name);
            tokio::spawn(watch_server(
                gateway.clone(),
                (b, s),
                name,
                spec,
                settings,
                shutdown.clone(),
            ));
        }
    }
}

fn check_kind(check: CheckType) -> Option<CheckKind> {
    match check {
        CheckType::None => None,
        CheckType::Tcp => Some(CheckKind::Tcp),
        CheckType::Smtp => Some(CheckKind::Smtp),
        CheckType::Imap => Some(CheckKind::Imap),
    }
}

fn spec(kind: CheckKind, health: &HealthConfig, server: &Server) -> CheckSpec {
    CheckSpec {
        kind,
        address: SocketAddr::new(
            health.address.unwrap_or(server.address.ip()),
            health.port.unwrap_or(server.address.port()),
        ),
        proxy_local: health.send_proxy,
        timeout: health.timeout,
        helo_name: health.helo.clone(),
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
async fn watch_server(
    gateway: Arc<Gateway>,
    (b, s): (usize, usize),
    name: String,
    spec: CheckSpec,
    settings: HealthSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    let runtime = &gateway.pools[b].servers[s];
    let mut running: Option<(Monitor, watch::Receiver<ServerHealthSnapshot>)> = None;
    loop {
        let in_maint = runtime.admin() == AdminState::Maint;
        match (&mut running, in_maint) {
            (None, false) => {
                let changed = gateway.clone();
                let monitor = Monitor::spawn(
                    name.clone(),
                    spec.clone(),
                    settings.clone(),
                    move |_| changed.changed.notify_one(),
                    shutdown.clone(),
                );
                let snapshots = monitor.subscribe();
                runtime.set_health(view(&snapshots.borrow()));
                running = Some((monitor, snapshots));
            }
            (Some(_), true) => {
                running = None;
                runtime.set_health(HealthView::unchecked());
                gateway.changed.notify_one();
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
                    runtime.set_health(view(&snapshots.borrow()));
                }
            }
            _ = tokio::time::sleep(ADMIN_POLL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn view(snapshot: &ServerHealthSnapshot) -> HealthView {
    let health = &snapshot.health;
    HealthView {
        state: health.state(),
        last_check: match health.last() {
            None => "",
            Some(Ok(())) => "ok",
            Some(Err(CheckFailure::Refused)) => "refused",
            Some(Err(CheckFailure::TimedOut(_))) => "timeout",
            Some(Err(CheckFailure::BadReply { .. })) => "bad reply",
            Some(Err(CheckFailure::Closed(_) | CheckFailure::Io { .. })) => "error",
        },
        consecutive_ok: health.consecutive_ok(),
        consecutive_fail: health.consecutive_fail(),
    }
}
