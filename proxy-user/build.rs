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
