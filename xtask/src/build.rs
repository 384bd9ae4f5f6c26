//! `cargo xtask build`: the `kgate` binary, with its eBPF object inside.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};

use crate::setup;

/// Build kgate (the default workspace members), installing the eBPF toolchain first.
///
/// Example: cargo xtask build --release
#[derive(clap::Args)]
pub struct Options {
    /// Build with the release profile (target/release/kgate)
    #[arg(long)]
    release: bool,
}

pub fn run(options: Options) -> anyhow::Result<ExitCode> {
    let env = setup::toolchain()?;
    let kgate = kgate(&env, options.release)?;
    println!("build: {}", kgate.display());
    Ok(ExitCode::SUCCESS)
}

/// Builds the default workspace members (so `kgate`, with its eBPF object inside) and
/// returns the path of the binary. The toolchain must be in place ([`setup::toolchain`]).
pub fn kgate(env: &setup::Env, release: bool) -> anyhow::Result<PathBuf> {
    let mut cargo = env.cargo();
    cargo.arg("build");
    if release {
        cargo.arg("--release");
    }
    setup::run(&mut cargo).context("building kgate failed; see the compiler output above")?;

    let profile = if release { "release" } else { "debug" };
    let kgate = env.target_dir.join(profile).join("kgate");
    if !kgate.is_file() {
        bail!(
            "cargo succeeded but {} is missing: is proxy-user still a default member?",
            kgate.display()
        );
    }
    Ok(kgate)
}
