use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{Config, DataplaneMode, Global},
    control,
    daemon::Daemon,
    dataplane::{Dataplane, Packet, Sockmap},
    frontend, interfaces,
    maps::{Bpf, MapsError, ServerMaps},
    privileges, publish, web,
    xdp::EarlyDrop,
};

pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    raise_open_file_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(privileges::on_thread_activity)
        .on_thread_unpark(privileges::on_thread_activity)
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config, path.to_owned()))
}

async fn serve(config: Config, path: PathBuf) -> anyhow::Result<()> {
    // A kgate already running with this configuration is found before anything is
    // touched: by its control socket here, by its lock on the pin directory next.
    let control_socket = config.global.control_socket.clone();
    let control_listener = control::bind(&control_socket).with_context(|| {
        format!(
            "cannot create the control socket {}: set control_socket to a path kgate may create",
            control_socket.display()
        )
    })?;
    let served = serve_with(config, path, control_listener).await;
    let _ = std::fs::remove_file(&control_socket);
    served
}

async fn serve_with(
    config: Config,
    path: PathBuf,
    control_listener: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let mut kernel = load_kernel_side(&config.global)?;
    // XDP before the listeners: no client gets in ahead of the blocklist.
    let early_drop = EarlyDrop::start(&config, &mut kernel.bpf)?;
    let metrics_listener = match config.global.metrics_listen {
        None => None,
        Some(address) => Some(frontend::bind(address).with_context(|| {
            format!("cannot serve metrics on {address}: set metrics_listen to a free local address")
        })?),
    };
    let global = config.global.clone();
    let (daemon, listeners) =
        Daemon::new(config, path, kernel.dataplane, kernel.servers, early_drop)?;
    daemon.start(listeners).await;
    tokio::spawn(control::serve(daemon.clone(), control_listener));
    tokio::spawn(publish::run(daemon.clone()));
    if let Some(listener) = metrics_listener {
        tokio::spawn(web::serve(daemon.clone(), listener));
    }
    privileges::drop_now();
    info!(dataplane = daemon.dataplane.name(), "kgate ready");

    let mut hangup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let grace = loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading the configuration");
                if let Err(e) = daemon.reload().await {
                    warn!("reload failed, the running configuration stays: {e}");
                }
            }
            _ = terminate.recv() => {
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
        }
    };
    let left = daemon.shut_down(grace).await;
    if left > 0 {
        info!("closing {left} connections still open");
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
            bpf.unpin();
        }
    }
    Ok(())
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
    servers: Option<ServerMaps>,
}

fn load_kernel_side(global: &Global) -> anyhow::Result<KernelSide> {
    let load = || -> Result<KernelSide, MapsError> {
        let mut bpf = Bpf::load(&global.bpf_pin_path)?;
        let dataplane = match global.dataplane {
            DataplaneMode::Auto | DataplaneMode::Sockmap => {
                let (maps, requests) = bpf.splice()?;
                let sockmap = Sockmap::start(maps, requests).map_err(|source| MapsError::Poll {
                    name: "parked connections",
                    source,
                })?;
                Dataplane::Sockmap(sockmap)
            }
            DataplaneMode::Packet => {
                // Every interface a client or a server may come in on; loopback never
                // carries a forwarded flow (a peer on this host stays copied).
                let interfaces = interfaces::non_loopback().map_err(|source| MapsError::Poll {
                    name: "interfaces",
                    source,
                })?;
                let (maps, events) = bpf.packet(&interfaces)?;
                Dataplane::Packet(Packet::start(maps, events))
            }
            DataplaneMode::Userspace => Dataplane::Userspace,
        };
        let servers = bpf.servers()?;
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
    let load = || match load() {
        // Not a reason to fall back: the pins belong to a kgate that runs.
        Err(e @ MapsError::PinDirInUse { .. }) => Err(anyhow::Error::new(e)),
        other => Ok(other),
    };
    match global.dataplane {
        DataplaneMode::Packet => load()?.map_err(|e| {
            anyhow::anyhow!(
                "the packet data plane cannot start: {}. kgate needs root (or CAP_BPF, \
                 CAP_NET_ADMIN and CAP_PERFMON) and a kernel with tcx (6.6 or later); set \
                 dataplane = \"auto\" for the sockmap data plane",
                with_causes(&e)
            )
        }),
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
