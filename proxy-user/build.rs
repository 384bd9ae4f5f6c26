//! Builds the eBPF object (proxy-ebpf, for the BPF target, with BTF) so that the
//! `kgate` binary carries it: nothing is read from `target/` at run time.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("the proxy-ebpf package is missing from the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    // The eBPF program compiles proxy-common too.
    println!(
        "cargo:rerun-if-changed={}",
        root_dir.join("../proxy-common")
    );
    // aya-build passes every line the inner cargo writes to stderr on as a build-script
    // warning: its progress ("Compiling core ...", "Finished ...") made some 135
    // `warning: proxy-user@...` lines on a clean build. Quiet, that cargo writes only
    // errors there; the compiler's own warnings and errors still come through aya-build
    // (they are JSON messages on stdout), so only real problems show.
    // SAFETY: the build script has no other thread yet that could read the environment.
    unsafe { std::env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; it needs the nightly toolchain with rust-src and \
         bpf-linker: run `cargo xtask build-ebpf`, which installs what is missing",
    )
}
