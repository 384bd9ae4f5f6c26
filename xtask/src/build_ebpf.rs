//! `cargo xtask build-ebpf`: the eBPF object on its own, in the normal target dir.
//!
//! `cargo build` does not need this (proxy-user's build script compiles the object and
//! embeds it in `kgate`); it is for working on proxy-ebpf: verifier logs, `bpftool`,
//! `llvm-objdump` on target/bpfel-unknown-none/release/proxy-ebpf.

use std::process::ExitCode;

use anyhow::{Context as _, bail};

use crate::setup;

/// Build the eBPF programs (proxy-ebpf) for bpfel-unknown-none with nightly.
///
/// Installs rust-src and bpf-linker first when they are missing.
///
/// Example: cargo xtask build-ebpf
#[derive(clap::Args)]
pub struct Options {
    /// The default, and the only way: the BPF target needs optimised code
    #[arg(long)]
    release: bool,
    /// Ignored: the eBPF object is always built with --release
    #[arg(long, conflicts_with = "release")]
    debug: bool,
}

pub const TARGET: &str = "bpfel-unknown-none";

pub fn run(options: Options) -> anyhow::Result<ExitCode> {
    let env = setup::toolchain()?;
    if options.debug {
        println!("build-ebpf: --debug ignored, the eBPF object is always built with --release");
    }
    // The same flags aya-build passes: the target arch for aya-ebpf's helpers, and
    // debug info turned into BTF by bpf-linker (so bpftool prints named map fields).
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
    ]
    .join("\x1f");
    setup::run(
        env.nightly("cargo")
            .args(["build", "--package", "proxy-ebpf", "--target", TARGET])
            .args(["-Z", "build-std=core", "--release"])
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags),
    )
    .context("building the eBPF object failed; see the compiler output above")?;

    let object = env.target_dir.join(TARGET).join("release/proxy-ebpf");
    if !object.is_file() {
        bail!(
            "cargo succeeded but {} is missing: try `cargo clean` and rerun",
            object.display()
        );
    }
    println!("build-ebpf: {}", object.display());
    Ok(ExitCode::SUCCESS)
}
