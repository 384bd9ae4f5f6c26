use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{Config, DataplaneMode, Global},
    control,
    dataplane::Dataplane,
    frontend,
    gateway::Gateway,
    health,
    maps::{Bpf, MapsError, ServerMaps},
    publish,
};

pub fn run(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let kernel = load_kernel_side(&config.global)?;

    // Bind everything before accepting anything: a gateway that serves half of its
    // frontends is worse than one that refuses to start.
    let mut listeners = Vec::new();
    for (index, frontend) in config.frontends.iter().enumerate() {
        for &address in &frontend.listen {
            let listener = frontend::bind(address).with_context(|| {
                format!(
                    "frontend `{}` cannot listen on {address}: is the address configured on \
                     this host, and is no other program listening on it?",
                    frontend.name
                )
            })?;
            listeners.push((index, listener));
        }
    }
    let control_listener = control::bind(&config.global.control_socket).with_context(|| {
        format!(
            "cannot create the control socket {}: set control_socket to a path kgate may create",
            config.global.control_socket.display()
        )
    })?;
    let control_path = config.global.control_socket.clone();

    let gateway = Arc::new(Gateway::new(config, kernel.dataplane));
    for (index, listener) in listeners {
        tokio::spawn(frontend::serve(gateway.clone(), index, listener));
    }
    tokio::spawn(control::serve(gateway.clone(), control_listener));
    let (stop_checks, checks_stopped) = tokio::sync::watch::channel(false);
    health::wiring::start(&gateway, &checks_stopped);
    if let Some(servers) = kernel.servers {
        tokio::spawn(publish::run(gateway.clone(), Arc::new(servers)));
    }
    info!(dataplane = gateway.dataplane.name(), "kgate ready");

    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
    }
    let _ = stop_checks.send(true);
    gateway.log_totals();
    gateway.dataplane.log_totals();
    // Connection tasks still hold the gateway: unpin now rather than when they end.
    if let Some(bpf) = &kernel.bpf {
        bpf.unpin();
    }
    let _ = std::fs::remove_file(&control_path);
    Ok(())
}

/// What kgate has of the kernel: the eBPF object (when it loads), the data plane, and
/// the maps where server state is published.
struct KernelSide {
    bpf: Option<Bpf>,
    dataplane: Dataplane,
    servers: Option<ServerMaps>,
}

fn load_kernel_side(global: &Global) -> anyhow::Result<KernelSide> {
    let splice = global.dataplane != DataplaneMode::Userspace;
    let load = || -> Result<KernelSide, MapsError> {
        let mut bpf = Bpf::load(&global.bpf_pin_path)?;
        let dataplane = if splice {
            Dataplane::Sockmap(Box::new(bpf.splice()?))
        } else {
            Dataplane::Userspace
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
    match global.dataplane {
        DataplaneMode::Sockmap => load().map_err(|e| {
            anyhow::anyhow!(
                "the sockmap data plane cannot start: {}. kgate needs root (or CAP_BPF and \
                 CAP_NET_ADMIN) and a kernel with BPF sockmap; set dataplane = \"auto\" to \
                 fall back to the userspace data plane",
                with_causes(&e)
            )
        }),
        DataplaneMode::Auto => Ok(load().unwrap_or_else(|e| {
            warn!(
                "eBPF cannot load here ({}); using the userspace data plane, which copies \
                 every byte through kgate, and `kgate status` will find no pinned maps",
                with_causes(&e)
            );
            without_ebpf()
        })),
        DataplaneMode::Userspace => Ok(load().unwrap_or_else(|e| {
            warn!(
                "eBPF cannot load here ({}): `kgate status` will find no pinned maps",
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
