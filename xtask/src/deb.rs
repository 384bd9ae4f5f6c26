//! `cargo xtask deb`: the Debian package, around a release build of kgate.

use std::{
    path::PathBuf,
    process::{ExitCode, Stdio},
};

use anyhow::{Context as _, bail};

use crate::setup;

/// Build the Debian package `kgate` (binary, systemd unit, configuration, manual pages) with
/// cargo-deb, installing the eBPF toolchain and cargo-deb first. Prints the path of the
/// package, under target/debian/.
///
/// What goes in is `[package.metadata.deb]` in proxy-user/Cargo.toml; the unit and
/// the example are in packaging/.
///
/// Example: cargo xtask deb
#[derive(clap::Args)]
pub struct Options {}

pub fn run(_options: Options) -> anyhow::Result<ExitCode> {
    let env = setup::toolchain()?;
    setup::cargo_deb(&env)?;

    // Only kgate, in release: proxy-user's build script builds the eBPF object into it.
    setup::run(
        env.cargo()
            .args(["build", "--release", "--package", "proxy-user"]),
    )
    .context("building kgate failed; see the compiler output above")?;

    // The manual pages, from the command line's definitions, gzipped as Debian wants.
    let man_dir = env.target_dir.join("release/man");
    let _ = std::fs::remove_dir_all(&man_dir);
    setup::run(
        std::process::Command::new(env.target_dir.join("release/kgate"))
            .arg("man")
            .arg(&man_dir),
    )
    .context("kgate could not write its manual pages")?;
    let pages: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    setup::run(std::process::Command::new("gzip").arg("-9nf").args(&pages))
        .context("gzip failed on the manual pages")?;

    let out_dir = env.target_dir.join("debian");
    let mut cargo_deb = env.cargo();
    cargo_deb
        .args(["deb", "--package", "proxy-user", "--no-build", "--output"])
        .arg(&out_dir)
        .stderr(Stdio::inherit());
    println!(
        "$ cargo deb --package proxy-user --no-build --output {}",
        out_dir.display()
    );
    let out = cargo_deb
        .output()
        .context("cannot start `cargo deb`: is cargo-deb installed?")?;
    if !out.status.success() {
        bail!("`cargo deb` failed ({}); see its output above", out.status);
    }
    // cargo-deb prints the path of the package it wrote, last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let package = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|line| line.ends_with(".deb"))
        .map(PathBuf::from)
        .filter(|path| path.is_file());
    let Some(package) = package else {
        bail!("`cargo deb` succeeded but printed no package path: {stdout}");
    };
    println!("deb: {}", package.display());
    Ok(ExitCode::SUCCESS)
}
