//! kgate: a TCP proxy for a Linux gateway that writes a PROXY protocol header with the
//! real client address and then splices the connection in the kernel (eBPF sockmap).
//!
//! A connection flows through the modules in this order: `config` -> `frontend`
//! (listen) -> `daemon` (accept) -> `accept_proxy` (the PROXY header of a trusted
//! proxy in front, on frontends that take one) -> `admission` (limits) -> `balance`
//! (pick a server of the `pool`) -> `upstream` (connect) -> `proxy_header` ->
//! `dataplane` (splice, copy, or forward packets) -> `conn` (lifecycle and log line).
//!
//! Beside it: `health` (checks), `gateway` (one configuration at run time, replaced by
//! a reload), `control` (the control socket), `handover` (an upgrade: the running
//! kgate hands its sockets to the new binary), `status` (the status document that
//! `kgate status`, the stats page and `publish` show), `publish` (server state into
//! the pinned map), `web` (the stats page, `/status.json` and `/metrics` on
//! `metrics_listen`), `metrics`, `rate` (events a second), `xdp` (early drop;
//! `xdp::crowdsec`, the CrowdSec bouncer that feeds its blocklist), `interfaces` (this
//! host's interfaces, addresses and routes), `privileges`, `logging` (stderr or the
//! journal), `cli/`. `maps` is the only module that talks to aya.

mod accept_proxy;
mod admission;
mod balance;
mod cli;
mod config;
mod conn;
mod control;
mod daemon;
mod dataplane;
mod ending;
mod frontend;
mod gateway;
mod handover;
mod health;
mod interfaces;
mod logging;
mod maps;
mod metrics;
mod pool;
mod privileges;
mod proxy_header;
mod publish;
mod rate;
mod restart_only;
mod slots;
mod sockopt;
mod status;
mod upstream;
mod web;
mod xdp;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    logging::init();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::failure(&format!("kgate: {e:#}"));
            ExitCode::FAILURE
        }
    }
}
