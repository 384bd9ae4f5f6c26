//! kgate: a TCP proxy for a Linux gateway that writes a PROXY protocol header with the
//! real client address and then splices the connection in the kernel (eBPF sockmap).
//!
//! A connection flows through the modules in this order: `config` -> `frontend`
//! (listen) -> `daemon` (accept) -> `admission` (limits) -> `balance` (pick a server of
//! the `pool`) -> `upstream` (connect) -> `proxy_header` -> `dataplane` (splice or
//! copy) -> `conn` (lifecycle and log line).
//!
//! Beside it: `health` (checks), `gateway` (one configuration at run time, replaced by
//! a reload), `control` (the control socket), `publish` (server state into the pinned
//! map), `metrics`, `xdp` (early drop; `xdp::crowdsec`, the CrowdSec bouncer that
//! feeds its blocklist), `privileges`, `cli/`. `maps` is the only
//! module that talks to aya.

mod admission;
mod balance;
mod cli;
mod config;
mod conn;
mod control;
mod daemon;
mod dataplane;
mod frontend;
mod gateway;
mod health;
mod maps;
mod metrics;
mod pool;
mod privileges;
mod proxy_header;
mod publish;
mod sockopt;
mod upstream;
mod xdp;

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
