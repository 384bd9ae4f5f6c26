use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{Config, DataplaneMode, Global},
    dataplane::Dataplane,
    frontend,
    gateway::Gateway,
    maps::{Bpf, MapsError},
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
    let (bpf, dataplane) = choose_dataplane(&config.global)?;

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

    let gateway = Arc::new(Gateway::new(config, dataplane));
    for (index, listener) in listeners {
        tokio::spawn(frontend::serve(gateway.clone(), index, listener));
    }
    info!(dataplane = gateway.dataplane.name(), "kgate ready");

    let mut terminate = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    tokio::select! {
        _ = terminate.recv() => info!("SIGTERM: stopping"),
        _ = interrupt.recv() => info!("SIGINT: stopping"),
    }
    gateway.log_totals();
    gateway.dataplane.log_totals();
    // Connection tasks still hold the gateway: unpin now rather than when they end.
    if let Some(bpf) = &bpf {
        bpf.unpin();
    }
    Ok(())
}

/// The data plane, and the eBPF object behind it when it is sockmap.
fn choose_dataplane(global: &Global) -> anyhow::Result<(Option<Bpf>, Dataplane)> {
    let load = || -> Result<(Option<Bpf>, Dataplane), MapsError> {
        let mut bpf = Bpf::load(&global.bpf_pin_path)?;
        let maps = bpf.splice()?;
        Ok((Some(bpf), Dataplane::Sockmap(Box::new(maps))))
    };
    match global.dataplane {
        DataplaneMode::Userspace => Ok((None, Dataplane::Userspace)),
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
                 every byte through kgate",
                with_causes(&e)
            );
            (None, Dataplane::Userspace)
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
