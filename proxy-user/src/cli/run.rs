use std::{
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use sd_notify::NotifyState;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    config::{Config, DataplaneMode, Global},
    control,
    daemon::{Daemon, ReloadError},
    dataplane::{Dataplane, Packet, Sockmap},
    frontend,
    handover::{self, Handed, Predecessor},
    interfaces::{self, Routes},
    maps::{Bpf, MapsError, StatusMaps},
    pool::AdminState,
    privileges, publish, web,
    xdp::EarlyDrop,
};

pub fn run(path: &Path) -> anyhow::Result<()> {
    // First, before any thread exists: started by `kgate upgrade`, this kgate is handed
    // the running one's sockets (handover.rs).
    let (mut handed, mut predecessor) = match handover::receive_handover()? {
        Some((handed, predecessor)) => (handed, Some(predecessor)),
        None => (Handed::default(), None),
    };
    let served = start_and_serve(path, &mut handed, &mut predecessor);
    if let (Err(e), Some(predecessor)) = (&served, predecessor) {
        // It goes on serving, and `kgate upgrade` prints why.
        predecessor.failed(e);
    }
    served
}

fn start_and_serve(
    path: &Path,
    handed: &mut Handed,
    predecessor: &mut Option<Predecessor>,
) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    raise_open_file_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(privileges::on_thread_activity)
        .on_thread_unpark(privileges::on_thread_activity)
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config, path.to_owned(), handed, predecessor))
}

/// How serving ended.
enum Ending {
    /// SIGTERM or SIGINT.
    Stopped,
    /// An upgrade: another kgate serves now, with this one's control socket and pins.
    HandedOver,
}

async fn serve(
    config: Config,
    path: PathBuf,
    handed: &mut Handed,
    predecessor: &mut Option<Predecessor>,
) -> anyhow::Result<()> {
    // A kgate already running with this configuration is found before anything is
    // touched: by its control socket here, by its lock on the pin directory next. At
    // an upgrade the running kgate hands both over instead.
    let control_socket = config.global.control_socket.clone();
    let (control_listener, bound_here) = match handed.take_control(&control_socket) {
        Some(listener) => {
            listener.set_nonblocking(true)?;
            (tokio::net::UnixListener::from_std(listener)?, false)
        }
        None => {
            let listener = control::bind(&control_socket).with_context(|| {
                format!(
                    "cannot create the control socket {}: set control_socket to a path kgate may create",
                    control_socket.display()
                )
            })?;
            (listener, true)
        }
    };
    let served = serve_with(config, path, control_listener, handed, predecessor).await;
    // The control socket stays where another kgate owns it: the one this kgate was
    // taking over from, or the one it handed over to.
    if bound_here && !matches!(served, Ok(Ending::HandedOver)) {
        let _ = std::fs::remove_file(&control_socket);
    }
    served.map(|_| ())
}

async fn serve_with(
    config: Config,
    path: PathBuf,
    control_listener: tokio::net::UnixListener,
    handed: &mut Handed,
    predecessor: &mut Option<Predecessor>,
) -> anyhow::Result<Ending> {
    let handed_lock = handed.take_pin_dir_lock(&config.global.bpf_pin_path);
    let mut kernel = load_kernel_side(&config.global, handed_lock)?;
    // XDP before the listeners: no client gets in ahead of the blocklist.
    let early_drop = EarlyDrop::start(&config, &mut kernel.bpf)?;
    let metrics_listener = match config.global.metrics_listen {
        None => None,
        Some(address) => Some(match handed.take_metrics(address) {
            Some(listener) => tokio::net::TcpListener::from_std(listener)?,
            None => frontend::bind(address, false).with_context(|| {
                format!(
                    "cannot serve metrics on {address}: set metrics_listen to a free local address"
                )
            })?,
        }),
    };
    let global = config.global.clone();
    let (daemon, listeners) = Daemon::new(
        config,
        path.clone(),
        kernel.dataplane,
        kernel.servers,
        early_drop,
        handed,
    )?;
    for (server, state) in std::mem::take(&mut handed.server_states) {
        // As a reload does: the operator's drain or maint outlives the process.
        match daemon.gateway().server(&server) {
            Some((b, s)) => {
                daemon.gateway().pools[b].servers[s].set_admin(state);
                info!(%server, "kept {state} from the old kgate");
            }
            None => info!(%server, "was {state} in the old kgate, and is no longer configured"),
        }
    }
    daemon.start(listeners).await;
    // Copies of the control and metrics sockets, to hand over at an upgrade.
    let control_fd = control_listener.as_fd().try_clone_to_owned()?;
    let metrics_fd = match (&metrics_listener, global.metrics_listen) {
        (Some(listener), Some(address)) => Some((address, listener.as_fd().try_clone_to_owned()?)),
        _ => None,
    };
    let (upgrades, mut upgrade_requests) = mpsc::channel(1);
    let control_task = tokio::spawn(control::serve(daemon.clone(), control_listener, upgrades));
    let publish_task = tokio::spawn(publish::run(daemon.clone()));
    let metrics_task =
        metrics_listener.map(|listener| tokio::spawn(web::serve(daemon.clone(), listener)));
    privileges::drop_now();

    let took_over_from = match predecessor.take() {
        None => None,
        Some(old) => {
            let pins_taken = match &mut kernel.bpf {
                Some(bpf) if bpf.taking_over() => {
                    if let Err(e) = bpf.commit_pins() {
                        *predecessor = Some(old);
                        return Err(e.into());
                    }
                    true
                }
                _ => false,
            };
            let pid = old.pid;
            if let Err(e) = old.ready(pins_taken) {
                warn!(
                    old = pid,
                    "could not tell the old kgate to stop accepting: {e}"
                );
            }
            Some(pid)
        }
    };
    match took_over_from {
        Some(old) => info!(
            dataplane = daemon.dataplane.name(),
            pid = std::process::id(),
            "kgate ready, took over from pid {old}"
        ),
        None => info!(
            dataplane = daemon.dataplane.name(),
            pid = std::process::id(),
            "kgate ready"
        ),
    }
    if took_over_from.is_none() {
        tell_systemd(&[NotifyState::Ready]);
    }

    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut successor = None;
    let grace = loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading the configuration");
                match daemon.reload().await {
                    Ok(_) => {}
                    Err(e @ ReloadError::Refused(_)) => {
                        warn!("reload failed, the running configuration stays: {e}");
                    }
                    // Each change a restart applies was logged already.
                    Err(ReloadError::Partly { .. }) => {}
                }
            }
            _ = terminate.recv() => {
                daemon.stop_accepting().await;
                info!(
                    open = daemon.open_connections(),
                    "SIGTERM: no new connections; waiting up to {:?} for the open ones",
                    global.shutdown_timeout
                );
                break global.shutdown_timeout;
            }
            _ = interrupt.recv() => {
                info!("SIGINT: stopping now");
                break Duration::ZERO;
            }
            Some(request) = upgrade_requests.recv() => {
                let links = match &mut kernel.bpf {
                    Some(bpf) => bpf.offer_xdp_links(),
                    None => Ok(()),
                };
                let offer = match links {
                    Ok(()) => offer(
                        &daemon,
                        (&global.control_socket, &control_fd),
                        metrics_fd.as_ref(),
                        kernel.bpf.as_ref(),
                    )
                    .await
                    .map_err(|e| e.to_string()),
                    Err(e) => Err(with_causes(&e)),
                };
                let outcome = match offer {
                    Ok(offer) => handover::hand_over(&request.binary, &path, offer).await,
                    Err(e) => Err(format!("cannot hand over: {e}")),
                };
                if outcome.is_err()
                    && let Some(bpf) = &mut kernel.bpf
                {
                    bpf.withdraw_xdp_links();
                }
                match outcome {
                    Ok(next) => {
                        let open = daemon.open_connections();
                        info!(
                            new = next.pid,
                            open,
                            "upgrade: the new kgate accepts; this one accepts no more and \
                             waits up to {:?} for its open connections",
                            global.shutdown_timeout
                        );
                        let _ = request.reply.send(Ok(format!(
                            "upgraded: pid {} serves; pid {} finishes its {open} open \
                             connections (up to {:?}) and exits",
                            next.pid,
                            std::process::id(),
                            global.shutdown_timeout
                        )));
                        // Still the main process, this one may name the new one:
                        // systemd follows it from now on (NotifyAccess stays `main`).
                        tell_systemd(&[NotifyState::MainPid(next.pid), NotifyState::Ready]);
                        successor = Some(next);
                        break global.shutdown_timeout;
                    }
                    Err(e) => {
                        warn!("upgrade failed: {e}");
                        let _ = request.reply.send(Err(e));
                    }
                }
            }
        }
    };
    if let Some(next) = &successor {
        // The new kgate serves these now.
        control_task.abort();
        publish_task.abort();
        if let Some(task) = &metrics_task {
            task.abort();
        }
        if let Some(bpf) = &mut kernel.bpf {
            bpf.hand_over_pins(next.pins_taken);
        }
    }
    drop((control_fd, metrics_fd));
    let left = daemon.shut_down(grace).await;
    if left > 0 {
        info!("closing {left} connections still open");
    } else if successor.is_some() {
        info!(
            pid = std::process::id(),
            "every connection has finished; exiting"
        );
    }
    daemon.dataplane.close_all();
    daemon.gateway().log_totals();
    daemon.dataplane.log_totals();
    if let Some(early_drop) = &daemon.early_drop {
        early_drop.log_totals();
    }
    if let Some(bpf) = &mut kernel.bpf {
        if global.keep_pins {
            bpf.keep_pins();
        } else {
            // Connection tasks still hold the maps: unpin now rather than at their end.
            // (After an upgrade that took the pins, there are none left to remove.)
            bpf.unpin();
        }
    }
    Ok(if successor.is_some() {
        Ending::HandedOver
    } else {
        Ending::Stopped
    })
}

/// What this kgate hands over at an upgrade: every listener, the control and metrics
/// sockets, and the pin directory's lock.
async fn offer(
    daemon: &Daemon,
    (control_path, control_fd): (&PathBuf, &OwnedFd),
    metrics: Option<&(SocketAddr, OwnedFd)>,
    bpf: Option<&Bpf>,
) -> std::io::Result<handover::Offer> {
    let mut offer = handover::Offer::default();
    daemon
        .with_listeners(|listeners| {
            for (address, fd) in listeners {
                offer.listener(address, fd)?;
            }
            std::io::Result::Ok(())
        })
        .await?;
    offer.control(control_path, control_fd.as_fd())?;
    let gateway = daemon.gateway();
    for (backend, pool) in gateway.config.backends.iter().zip(&gateway.pools) {
        for (server, runtime) in backend.servers.iter().zip(&pool.servers) {
            if runtime.admin() != AdminState::Ready {
                offer.server_state(format!("{}/{}", backend.name, server.name), runtime.admin());
            }
        }
    }
    if let Some((address, fd)) = metrics {
        offer.metrics(*address, fd.as_fd())?;
    }
    if let Some(lock) = bpf.and_then(|bpf| bpf.pin_dir_lock().map(|lock| (bpf.pin_dir(), lock))) {
        offer.pin_dir_lock(lock.0, lock.1)?;
    }
    Ok(offer)
}

/// Tells systemd (`Type=notify`) that kgate serves, or after an upgrade which process
/// is the service's main one now. Nothing without `NOTIFY_SOCKET`.
fn tell_systemd(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("could not tell systemd that kgate serves: {e}");
    }
}

/// Lets kgate open as many files as its hard limit allows: two sockets per connection
/// and more, where a shell gives 1,024 by default (the unit sets 1,048,576).
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            warn!(
                "open files stay limited to {}: {}",
                limit.rlim_cur,
                std::io::Error::last_os_error()
            );
        }
    }
}

/// What kgate has of the kernel: the eBPF object (when it loads), the data plane, and
/// the maps where server state is published.
struct KernelSide {
    bpf: Option<Bpf>,
    dataplane: Dataplane,
    servers: Option<StatusMaps>,
}

/// `handed_lock`: the pin directory's lock, handed over by the kgate this one replaces.
fn load_kernel_side(
    global: &Global,
    handed_lock: Option<std::fs::File>,
) -> anyhow::Result<KernelSide> {
    let mut handed_lock = handed_lock;
    let mut load_once = || -> Result<KernelSide, MapsError> {
        let mut bpf = Bpf::load(&global.bpf_pin_path, handed_lock.take())?;
        let dataplane = match global.dataplane {
            DataplaneMode::Auto | DataplaneMode::Sockmap => {
                let (maps, requests) = bpf.splice()?;
                let sockmap = Sockmap::start(maps, requests).map_err(|source| MapsError::Poll {
                    name: "parked connections",
                    source,
                })?;
                Dataplane::Sockmap(sockmap)
            }
            DataplaneMode::Packet => Dataplane::Packet(match attach_packet(&mut bpf) {
                Ok(packet) => packet,
                Err(e) => packet_unavailable(&e),
            }),
            DataplaneMode::Userspace => Dataplane::Userspace,
        };
        let servers = bpf.status_maps()?;
        Ok(KernelSide {
            bpf: Some(bpf),
            dataplane,
            servers: Some(servers),
        })
    };
    let without_ebpf = || KernelSide {
        bpf: None,
        dataplane: Dataplane::Userspace,
        servers: None,
    };
    let mut load = || match load_once() {
        // Not a reason to fall back: the pins belong to a kgate that runs.
        Err(e @ MapsError::PinDirInUse { .. }) => Err(anyhow::Error::new(e)),
        other => Ok(other),
    };
    match global.dataplane {
        DataplaneMode::Packet => Ok(load()?.unwrap_or_else(|e| KernelSide {
            dataplane: Dataplane::Packet(packet_unavailable(&e)),
            ..without_ebpf()
        })),
        DataplaneMode::Sockmap => load()?.map_err(|e| {
            anyhow::anyhow!(
                "the sockmap data plane cannot start: {}. kgate needs root (or CAP_BPF and \
                 CAP_NET_ADMIN) and a kernel with BPF sockmap; set dataplane = \"auto\" to \
                 fall back to the userspace data plane",
                with_causes(&e)
            )
        }),
        DataplaneMode::Auto => Ok(load()?.unwrap_or_else(|e| {
            warn!(
                "eBPF cannot load here ({}); using the userspace data plane, which copies \
                 every byte through kgate, and bpftool will find no pinned maps",
                with_causes(&e)
            );
            without_ebpf()
        })),
        DataplaneMode::Userspace => Ok(load()?.unwrap_or_else(|e| {
            warn!(
                "eBPF cannot load here ({}): bpftool will find no pinned maps",
                with_causes(&e)
            );
            without_ebpf()
        })),
    }
}

/// Loads the packet data plane's maps and attaches its programs to every interface a
/// client or a server may come in on: all but loopback, which never carries a
/// forwarded flow (a peer on this host stays copied).
fn attach_packet(bpf: &mut Bpf) -> Result<Arc<Packet>, MapsError> {
    let interfaces = interfaces::non_loopback().map_err(|source| MapsError::Poll {
        name: "interfaces",
        source,
    })?;
    let attached = interfaces
        .iter()
        .map(|name| interfaces::index(name))
        .collect::<std::io::Result<_>>()
        .map_err(|source| MapsError::Poll {
            name: "interfaces",
            source,
        })?;
    let routes = Routes::open().map_err(|source| MapsError::Poll {
        name: "routes",
        source,
    })?;
    let (maps, events) = bpf.packet(&interfaces)?;
    Ok(Packet::start(maps, events, attached, routes))
}

/// The packet data plane without its programs: kgate still serves, copying every
/// connection, and says why once here and in `kgate status`.
fn packet_unavailable(error: &MapsError) -> Arc<Packet> {
    let reason = with_causes(error);
    warn!(
        "the packet data plane's programs cannot load here ({reason}); every connection \
         is copied through kgate. They need root (or CAP_BPF, CAP_NET_ADMIN and \
         CAP_PERFMON) and a kernel with tcx (6.6 or later)"
    );
    Packet::unavailable(reason)
}

/// An error and its sources on one line (aya keeps the OS error as a source), each
/// message once: some of aya's errors repeat their source in their own text.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
