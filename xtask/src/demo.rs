//! `cargo xtask demo`: not written yet.

use std::process::ExitCode;

/// Run the demo lab: a client's address arriving at a backend through the splice.
///
/// Example: cargo xtask demo
#[derive(clap::Args)]
pub struct Options {}

pub fn run(_options: Options) -> anyhow::Result<ExitCode> {
    eprintln!("demo: not written yet");
    Ok(ExitCode::FAILURE)
}
