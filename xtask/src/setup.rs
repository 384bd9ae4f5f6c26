//! What the other commands need from the machine, checked and installed on demand.
//!
//! Each check prints one line (`setup: ...`), each action it takes prints what it runs.
//! - [`toolchain`]: the nightly toolchain, its `rust-src`, and `bpf-linker` (built
//!   against the nightly's own LLVM). Needed by anything that builds `kgate`, because
//!   proxy-user's build script compiles the eBPF object.
//! - [`debian_packages`]: the programs the tests and the demo run ([`DEBIAN_PACKAGES`]).
//! - [`cargo_deb`]: cargo-deb, for the Debian package (`cargo xtask deb`, and its test).
//!
//! It also owns the workspace paths and the `Command`s for cargo, so that every child
//! process sees the same PATH (with cargo's bin dir, where `bpf-linker` is installed).

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};

/// The toolchain that builds the eBPF object (`-Z build-std`, the BPF target).
const NIGHTLY: &str = "nightly";

/// A Debian package the tests or the demo need.
pub struct DebianPackage {
    pub name: &'static str,
    /// Why it is needed; printed when it gets installed.
    pub why: &'static str,
    /// debconf answers (`owner question type value`) so that installing it asks nothing.
    pub debconf: &'static [&'static str],
    /// Files written before it is installed, where missing (path, text): how some
    /// packages are told, the way their README.Debian says, to skip a step.
    pub files: &'static [(&'static str, &'static str)],
}

impl DebianPackage {
    const fn new(name: &'static str, why: &'static str) -> Self {
        Self {
            name,
            why,
            debconf: &[],
            files: &[],
        }
    }

    const fn debconf(self, debconf: &'static [&'static str]) -> Self {
        Self { debconf, ..self }
    }

    const fn files(self, files: &'static [(&'static str, &'static str)]) -> Self {
        Self { files, ..self }
    }
}

/// Debian packages the tests and the demo need: one line each, installed when missing.
///
/// A package that asks questions on install gets its answers with `.debconf(...)`, e.g.
/// `DebianPackage::new("postfix", "...").debconf(&["postfix postfix/main_mailer_type select No configuration"]),`
pub const DEBIAN_PACKAGES: &[DebianPackage] = &[
    DebianPackage::new(
        "iproute2",
        "`ip netns`/`ip link`/`ip addr`: the lab's namespaces and veth pairs",
    ),
    DebianPackage::new(
        "bpftool",
        "reads kgate's pinned maps under /sys/fs/bpf/kgate",
    ),
    DebianPackage::new("socat", "plain TCP clients and servers in the lab"),
    DebianPackage::new(
        "nftables",
        "`nft` keeps the client namespace's kernel from resetting the hand-made TCP \
         connection of tests/src/rawtcp.rs",
    ),
    DebianPackage::new(
        "haproxy",
        "`cargo xtask bench` measures kgate against HAProxy in TCP mode (`send-proxy-v2`, \
         `option splice-auto`), run in the lab's gateway; the system service is not used",
    ),
    DebianPackage::new(
        "procps",
        "`sysctl` (forwarding in the lab gateway), `ps`/`pkill` for lab processes",
    ),
    DebianPackage::new(
        "postfix",
        "real Postfix with postscreen behind PROXY v2 in the lab's backends: health checks \
         must leave its log clean (tests/src/postfix.rs); the system instance stays unconfigured",
    )
    .debconf(&["postfix postfix/main_mailer_type select No configuration"]),
    DebianPackage::new(
        "swaks",
        "SMTP sessions from the lab's client namespace, through kgate to Postfix",
    ),
    DebianPackage::new(
        "keepalived",
        "VRRP between the two gateways of tests/tests/failover.rs, run as private instances \
         in the lab's namespaces (own config and pid files); the system service is not used",
    ),
    DebianPackage::new(
        "systemd",
        "`systemd-analyze verify` and `security --offline` check kgate's unit in the packaging \
         test; a private systemd-journald, `systemd-cat` and `journalctl` take and read \
         kgate's log as under systemd (tests/src/journal.rs). No systemd runs as init, and \
         installing the package starts nothing in a container",
    ),
    DebianPackage::new(
        "chromium",
        "a real browser, headless in the lab's gateway, loads kgate's stats page and the \
         test reads the page it rendered (tests/tests/stats_page.rs)",
    ),
    DebianPackage::new(
        "prometheus",
        "`promtool check metrics` lints kgate's /metrics, and a real Prometheus scrapes it \
         in the lab (tests/tests/metrics_prometheus.rs); the system service is not used",
    ),
    DebianPackage::new(
        "lintian",
        "checks the Debian package `cargo xtask deb` builds (tests/tests/packaging.rs)",
    ),
    DebianPackage::new(
        "dpkg-dev",
        "`dpkg-shlibdeps`: cargo-deb computes the Debian package's Depends with it",
    ),
    DebianPackage::new(
        "crowdsec",
        "a real CrowdSec local API whose ban decisions kgate applies to its XDP blocklist \
         (tests/src/crowdsec.rs runs a private one per test); the system's is not used",
    )
    // The package registers with CrowdSec's online API at install unless this file
    // exists and is not empty (its README.Debian): offline here, that would fail.
    .files(&[(
        "/etc/crowdsec/online_api_credentials.yaml",
        "# No Central API registration: kgate's tests run CrowdSec offline.\n",
    )]),
    DebianPackage::new(
        "dovecot-imapd",
        "real Dovecot behind PROXY v2 (`haproxy = yes`) in the lab's backends: imap checks \
         must leave its log clean (tests/src/dovecot.rs); the system instance is not used",
    ),
    DebianPackage::new(
        "openssl",
        "self-signed certificates for the lab's TLS listeners (465, 993) and `s_client` as \
         the IMAPS client",
    ),
    DebianPackage::new(
        "libio-socket-ssl-perl",
        "swaks's TLS (`--tls-on-connect`, the submissions port 465)",
    ),
];

/// Where things are in the workspace, and the PATH every child process gets.
pub struct Env {
    /// The workspace root: every cargo command runs here.
    pub root: PathBuf,
    /// cargo's target directory (`target/` unless configured otherwise).
    pub target_dir: PathBuf,
    /// The caller's PATH, with cargo's bin dir (where `cargo install` puts bpf-linker)
    /// in front when it was not on it.
    path: OsString,
}

impl Env {
    /// Finds the workspace and the cargo bin dir; checks and installs nothing.
    pub fn new() -> anyhow::Result<Self> {
        let metadata = cargo_metadata::MetadataCommand::new()
            .no_deps()
            .exec()
            .context("`cargo metadata` failed: run cargo xtask from inside the kgate workspace")?;
        let path = env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
        let cargo_bin = cargo_home()?.join("bin");
        if !dirs.contains(&cargo_bin) {
            dirs.insert(0, cargo_bin);
        }
        let path = env::join_paths(dirs).context("PATH has a directory with a ':' in its name")?;
        Ok(Self {
            root: metadata.workspace_root.into_std_path_buf(),
            target_dir: metadata.target_directory.into_std_path_buf(),
            path,
        })
    }

    /// A command run in the workspace root, with this PATH.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.root).env("PATH", &self.path);
        cmd
    }

    /// The cargo that runs xtask (stable, unless the caller picked another toolchain).
    pub fn cargo(&self) -> Command {
        self.command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
    }

    /// `rustup run nightly <program>`, without the caller's compiler settings.
    pub fn nightly(&self, program: &str) -> Command {
        let mut cmd = self.command("rustup");
        cmd.args(["run", NIGHTLY, program]);
        for var in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }

    /// `program` if it is on this PATH.
    fn find(&self, program: &str) -> Option<PathBuf> {
        env::split_paths(&self.path)
            .map(|dir| dir.join(program))
            .find(|path| is_executable(path))
    }
}

/// Makes sure the toolchain that builds the eBPF object is here: nightly, its
/// `rust-src`, `bpf-linker`. Installs the last two when missing.
pub fn toolchain() -> anyhow::Result<Env> {
    let env = Env::new()?;
    check_nightly(&env)?;
    ensure_rust_src(&env)?;
    ensure_bpf_linker(&env)?;
    Ok(env)
}

fn check_nightly(env: &Env) -> anyhow::Result<()> {
    let list = output(env.command("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to build kgate's eBPF object: install it from https://rustup.rs",
    )?;
    let Some(nightly) = list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .find(|name| *name == NIGHTLY || name.starts_with(&format!("{NIGHTLY}-")))
    else {
        bail!(
            "the nightly toolchain is not installed (it builds the eBPF object): run \
             `rustup toolchain install nightly --component rust-src`"
        );
    };
    println!("setup: nightly toolchain: {nightly}");
    Ok(())
}

fn ensure_rust_src(env: &Env) -> anyhow::Result<()> {
    let installed = output(env.command("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if installed.lines().any(|line| line.trim() == "rust-src") {
        println!("setup: rust-src for nightly: installed");
        return Ok(());
    }
    println!("setup: rust-src for nightly: missing (`-Z build-std=core` needs it), installing");
    run(env
        .command("rustup")
        .args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
    .context("installing rust-src failed: try `rustup component add rust-src --toolchain nightly`")
}

fn ensure_bpf_linker(env: &Env) -> anyhow::Result<()> {
    if let Some(path) = env.find("bpf-linker") {
        // It loads the nightly's own libLLVM by its versioned name: a nightly update
        // leaves a bpf-linker that no longer starts, so try it before trusting it.
        if output(env.nightly("bpf-linker").arg("--version")).is_ok() {
            println!("setup: bpf-linker: {}", path.display());
            return Ok(());
        }
        println!(
            "setup: bpf-linker: {} does not start with this nightly's LLVM, reinstalling",
            path.display()
        );
    } else {
        println!("setup: bpf-linker: missing (it links the eBPF object), installing");
    }
    let started = Instant::now();
    install_bpf_linker(env)?;
    let path = installed(env, "bpf-linker")?;
    // bpf-linker loads the nightly's libLLVM, which `rustup run nightly` puts on the
    // library path (rustc runs it the same way).
    let version = output(env.nightly("bpf-linker").arg("--version")).with_context(|| {
        format!(
            "{} was installed but does not start: try `rustup run nightly bpf-linker --version`",
            path.display()
        )
    })?;
    println!(
        "setup: bpf-linker: installed {} at {} in {:.0?}",
        version.trim(),
        path.display(),
        started.elapsed()
    );
    Ok(())
}

/// Builds bpf-linker against the LLVM that ships with the nightly toolchain, so that
/// it emits the same LLVM bitcode version rustc does (no separate LLVM to install).
fn install_bpf_linker(env: &Env) -> anyhow::Result<()> {
    let sysroot = output(env.nightly("rustc").args(["--print", "sysroot"]))
        .context("cannot find the nightly sysroot: try `rustc +nightly --print sysroot`")?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let (llvm_lib, major) = find_nightly_llvm(&lib_dir)?;
    println!(
        "setup: bpf-linker: building against LLVM {major} from {}",
        llvm_lib.display()
    );

    // LLVM_PREFIX must hold lib/libLLVM.so; the nightly names it after its version.
    let prefix = env.target_dir.join("llvm-prefix");
    let link = prefix.join("lib/libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("cannot create {}", prefix.join("lib").display()))?;
    if link.symlink_metadata().is_ok() {
        fs::remove_file(&link).with_context(|| format!("cannot remove {}", link.display()))?;
    }
    std::os::unix::fs::symlink(&llvm_lib, &link)
        .with_context(|| format!("cannot link {} to {}", link.display(), llvm_lib.display()))?;
    println!(
        "setup: bpf-linker: {} -> {}",
        link.display(),
        llvm_lib.display()
    );

    let feature = format!("llvm-{major}");
    run(env
        .cargo()
        .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features"])
        .args(["--features", &feature])
        .env("LLVM_PREFIX", &prefix))
    .with_context(|| {
        format!(
            "installing bpf-linker failed (see cargo's output above). It needs a C compiler \
             (`apt-get install build-essential`) and the nightly's {}; to retry by hand: \
             `LLVM_PREFIX={} cargo install bpf-linker --locked --no-default-features --features {feature}`",
            llvm_lib.display(),
            prefix.display(),
        )
    })
}

/// `lib/libLLVM.so.<MAJOR>.<minor>-rust-<version>-nightly` in the nightly sysroot, and MAJOR.
fn find_nightly_llvm(lib_dir: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?;
    let mut found: Vec<(PathBuf, u32)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name.strip_prefix("libLLVM.so.")?;
            if !version.contains("-rust-") {
                return None;
            }
            let major = version.split(['.', '-']).next()?.parse().ok()?;
            Some((entry.path(), major))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow!(
            "no libLLVM.so.<MAJOR>.<minor>-rust-* in {}: the nightly toolchain looks incomplete, \
             try `rustup toolchain install nightly --force`",
            lib_dir.display()
        )
    })
}

/// The cargo-deb release `cargo xtask deb` and the packaging test use (pinned, like
/// the eBPF crates: a newer one may need a newer rustc).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Makes sure `cargo deb` works: installs cargo-deb with `cargo install` when missing
/// (about a minute). Only `cargo xtask deb` and `cargo xtask test` (for
/// tests/tests/packaging.rs) need it.
pub fn cargo_deb(env: &Env) -> anyhow::Result<()> {
    if let Some(path) = env.find("cargo-deb") {
        let version = output(env.cargo().args(["deb", "--version"])).with_context(|| {
            format!(
                "{} does not start: reinstall it with `cargo install cargo-deb --locked \
                 --force --version {CARGO_DEB_VERSION}`",
                path.display()
            )
        })?;
        println!("setup: cargo-deb: {} ({})", path.display(), version.trim());
        return Ok(());
    }
    println!("setup: cargo-deb: missing (it builds the Debian package), installing");
    let started = Instant::now();
    run(env.cargo().args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .with_context(|| {
        format!(
            "installing cargo-deb failed (see cargo's output above): try `cargo install \
             cargo-deb --locked --version {CARGO_DEB_VERSION}`"
        )
    })?;
    let path = installed(env, "cargo-deb")?;
    println!(
        "setup: cargo-deb: installed {CARGO_DEB_VERSION} at {} in {:.0?}",
        path.display(),
        started.elapsed()
    );
    Ok(())
}

/// rustfmt and clippy for the toolchain that runs xtask (CI checks format and lints).
pub fn lint_components(env: &Env) -> anyhow::Result<()> {
    let installed = output(
        env.command("rustup")
            .args(["component", "list", "--installed"]),
    )?;
    for component in ["rustfmt", "clippy"] {
        if installed.lines().any(|line| line.starts_with(component)) {
            println!("setup: {component}: installed");
            continue;
        }
        println!("setup: {component}: missing (CI runs it), installing");
        run(env.command("rustup").args(["component", "add", component])).with_context(|| {
            format!("installing {component} failed: try `rustup component add {component}`")
        })?;
    }
    Ok(())
}

/// What to do when packages are missing and we are not root.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NotRoot {
    /// Stop with an error (the command cannot work without them).
    Stop,
    /// Print why and carry on (tests that need them skip with their own reason).
    Skip,
}

/// Installs the missing [`DEBIAN_PACKAGES`] with apt-get.
pub fn debian_packages(not_root: NotRoot) -> anyhow::Result<()> {
    let names: Vec<&str> = DEBIAN_PACKAGES.iter().map(|p| p.name).collect();
    let missing: Vec<&DebianPackage> = match missing_packages() {
        Ok(missing) => missing,
        Err(e) if not_root == NotRoot::Skip => {
            println!("setup: Debian packages: skipped, {e:#}");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if missing.is_empty() {
        println!("setup: Debian packages: all present ({})", names.join(" "));
        return Ok(());
    }
    let missing_names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    if !is_root()? {
        let message = format!(
            "not root, so cannot install the missing Debian packages {}: run as root, or \
             `sudo apt-get install -y --no-install-recommends {}`",
            missing_names.join(" "),
            missing_names.join(" ")
        );
        match not_root {
            NotRoot::Stop => bail!(message),
            NotRoot::Skip => {
                println!("setup: Debian packages: skipped, {message}; tests that need them skip");
                return Ok(());
            }
        }
    }

    for package in &missing {
        println!(
            "setup: Debian package {}: missing ({}), installing",
            package.name, package.why
        );
    }
    let answers: Vec<&str> = missing
        .iter()
        .flat_map(|p| p.debconf.iter().copied())
        .collect();
    if !answers.is_empty() {
        println!("setup: preseeding debconf: {}", answers.join("; "));
        let mut child = Command::new("debconf-set-selections")
            .stdin(Stdio::piped())
            .spawn()
            .context("cannot run debconf-set-selections: try `apt-get install debconf`")?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(format!("{}\n", answers.join("\n")).as_bytes())
            .context("writing to debconf-set-selections")?;
        drop(stdin);
        let status = child.wait().context("waiting for debconf-set-selections")?;
        if !status.success() {
            bail!(
                "debconf-set-selections failed ({status}) on: {}",
                answers.join("; ")
            );
        }
    }
    for (path, text) in missing.iter().flat_map(|p| p.files.iter()) {
        let path = Path::new(path);
        if path.exists() {
            continue;
        }
        println!("setup: writing {} before the install", path.display());
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let _no_starts = NoServiceStarts::during_install()?;
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("NEEDRESTART_MODE", "a");
        cmd
    };
    run(&mut apt(&["update"])).context(
        "`apt-get update` failed: check the network and /etc/apt/sources.list, then rerun",
    )?;
    run(apt(&["install", "-y", "--no-install-recommends"]).args(&missing_names)).with_context(
        || {
            format!(
                "installing {} failed: try `apt-get install -y --no-install-recommends {}`",
                missing_names.join(" "),
                missing_names.join(" ")
            )
        },
    )?;
    let still = missing_packages()?;
    if !still.is_empty() {
        let still: Vec<&str> = still.iter().map(|p| p.name).collect();
        bail!(
            "apt-get reported success but {} are still not installed: try `apt-get install {}`",
            still.join(" "),
            still.join(" ")
        );
    }
    println!(
        "setup: Debian packages: installed {}",
        missing_names.join(" ")
    );
    Ok(())
}

/// Keeps the packages being installed from starting their services (`invoke-rc.d`
/// asks `/usr/sbin/policy-rc.d`; 101 means "no"): the tests run private instances in
/// their namespaces, and on a machine without systemd an init script (Dovecot's, say)
/// would otherwise start a system-wide one. Only where no such policy exists; removed
/// when dropped.
struct NoServiceStarts(Option<PathBuf>);

impl NoServiceStarts {
    const POLICY: &str = "/usr/sbin/policy-rc.d";

    fn during_install() -> anyhow::Result<NoServiceStarts> {
        let path = PathBuf::from(Self::POLICY);
        if path.exists() {
            return Ok(NoServiceStarts(None));
        }
        println!(
            "setup: services of the packages installed now are not started ({} for the install)",
            path.display()
        );
        fs::write(
            &path,
            "#!/bin/sh\n# kgate's cargo xtask: no service starts during its install\nexit 101\n",
        )
        .with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {} executable", path.display()))?;
        Ok(NoServiceStarts(Some(path)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0
            && let Err(e) = fs::remove_file(path)
        {
            eprintln!("setup: could not remove {}: {e}", path.display());
        }
    }
}

fn missing_packages() -> anyhow::Result<Vec<&'static DebianPackage>> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        // Prints e.g. "install ok installed"; fails for a package dpkg never heard of.
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package.name])
            .stderr(Stdio::null())
            .output()
            .context(
                "dpkg-query not found: this is not a Debian system, install the packages by hand",
            )?;
        let status = String::from_utf8_lossy(&out.stdout);
        if !(out.status.success() && status.split_whitespace().nth(2) == Some("installed")) {
            missing.push(package);
        }
    }
    Ok(missing)
}

/// Whether the effective user is root (from /proc, to stay free of `unsafe`).
fn is_root() -> anyhow::Result<bool> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    Ok(euid == "0")
}

/// Whether the CI environment variable says we run in CI.
pub fn is_ci() -> bool {
    env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// `$CARGO_HOME`, or `~/.cargo`.
fn cargo_home() -> anyhow::Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(home.into());
    }
    let home = env::var_os("HOME").ok_or_else(|| anyhow!("neither CARGO_HOME nor HOME is set"))?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Prints the command, runs it with inherited output, fails unless it succeeds.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Prints the command, runs it with inherited output, returns how it ended.
pub fn status(cmd: &mut Command) -> anyhow::Result<std::process::ExitStatus> {
    println!("$ {}", display(cmd));
    cmd.status()
        .with_context(|| format!("cannot start `{}`: is it installed?", display(cmd)))
}

/// Runs the command quietly and returns its stdout; fails with its stderr.
fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{}`: is it installed?", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// The command as a shell line, with the variables it sets (PATH left out).
fn display(cmd: &Command) -> String {
    let quote = |s: &OsStr| {
        let s = s.display().to_string();
        if s.is_empty() || s.contains([' ', '"', '\x1f']) {
            format!("{s:?}")
        } else {
            s
        }
    };
    let vars = cmd.get_envs().filter_map(|(k, v)| {
        let v = v?;
        (k != "PATH").then(|| format!("{}={}", k.display(), quote(v)))
    });
    let program = Path::new(cmd.get_program());
    // The full path of cargo (from $CARGO) is noise: show its name.
    let program = match program.file_name() {
        Some(name) if name == "cargo" => name.display().to_string(),
        _ => program.display().to_string(),
    };
    vars.chain([program])
        .chain(cmd.get_args().map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where `cargo install` put `tool`, or an error saying to put cargo's bin dir on PATH.
fn installed(env: &Env, tool: &str) -> anyhow::Result<PathBuf> {
    env.find(tool).ok_or_else(|| {
        anyhow!(
            "`cargo install {tool}` succeeded but {tool} is not in {}: put cargo's bin dir \
             on PATH",
            cargo_home()
                .map(|h| h.join("bin"))
                .unwrap_or_default()
                .display()
        )
    })
}
