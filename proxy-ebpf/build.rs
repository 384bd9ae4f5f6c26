//! Rebuild when the bpf-linker binary changes: cargo cannot see that dependency.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not on PATH: run `cargo xtask build-ebpf`, which installs it"
        ),
    }
}
