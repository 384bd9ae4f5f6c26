//! What an operator installs: the example configuration (packaging/kgate.toml), the
//! systemd unit (packaging/kgate.service) and the Debian package that carries them.
//!
//! The package test runs cargo-deb on the kgate binary the other tests use
//! ([`kgate_bin`], a debug build under `cargo xtask test`) with the release package's
//! metadata and `--fast` compression: the files, control fields and maintainer scripts
//! are those `cargo xtask deb` ships around a release build, in about two seconds
//! instead of a release build's minute or more. It needs cargo-deb (`cargo xtask test`
//! installs it), dpkg-deb, and systemd-analyze (Debian's `systemd`), not root and not
//! a running systemd.

use std::{
    env, fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use tests::kgate::kgate_bin;

/// Exposure score (tenths, as `systemd-analyze security --threshold` counts) the unit
/// must stay at or under: 3.0 and below is "OK" (2.5 when written).
const MAX_EXPOSURE: &str = "30";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_owned()
}

/// Runs `cmd`, panics with its output unless it succeeds, returns its stdout.
fn run_ok(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}: is it installed?"))
}

/// A directory under the system's temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = env::temp_dir().join(format!("kgate-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_example_configuration_passes_kgate_check() {
    let example = workspace().join("packaging/kgate.toml");
    let stdout = run_ok(
        Command::new(kgate_bin())
            .arg("check")
            .arg("-c")
            .arg(&example),
    );
    assert_eq!(
        stdout,
        format!(
            "{}: valid (4 frontends, 4 backends, 16 servers)\n",
            example.display()
        )
    );
}

/// Builds the package into `scratch/out` and returns its path.
fn build_package(scratch: &Path) -> PathBuf {
    build_package_version(scratch, None)
}

/// Builds the package, as Debian version `version` if given, into `scratch/out`.
fn build_package_version(scratch: &Path, version: Option<&str>) -> PathBuf {
    // cargo-deb takes the binary from `<target>/release/kgate`: a target dir of our own
    // whose release/kgate is the binary under test. The manual pages go beside it, as
    // `cargo xtask deb` writes them.
    let target = scratch.join("target");
    let release = target.join("release");
    if !release.join("kgate").exists() {
        fs::create_dir_all(&release).unwrap();
        symlink(kgate_bin(), release.join("kgate")).unwrap();
        run_ok(
            Command::new(kgate_bin())
                .arg("man")
                .arg(release.join("man")),
        );
        let pages: Vec<PathBuf> = fs::read_dir(release.join("man"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        run_ok(Command::new("gzip").arg("-9nf").args(&pages));
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cargo_deb = Command::new(cargo);
    cargo_deb
        .current_dir(workspace())
        .args(["deb", "--package", "proxy-user", "--no-build", "--fast"])
        .arg("--output")
        .arg(scratch.join("out/"))
        .env("CARGO_TARGET_DIR", &target);
    if let Some(version) = version {
        cargo_deb.args(["--deb-version", version]);
    }
    let out = output(&mut cargo_deb);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cargo deb failed ({}): {stderr}\n(cargo-deb missing? `cargo xtask test` installs it, \
         or `cargo install cargo-deb --locked --version 3.8.0`)",
        out.status
    );
    assert!(
        !stderr.to_lowercase().contains("warn"),
        "cargo deb warned: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let package = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(
        package.is_file(),
        "cargo deb printed no package path: {stdout}"
    );
    package
}

/// The `Field: value` lines of `dpkg-deb --info`'s control file, one field a line.
fn control_field(control: &str, field: &str) -> Option<String> {
    let prefix = format!("{field}: ");
    control
        .lines()
        .find_map(|line| line.trim().strip_prefix(&prefix).map(str::to_owned))
}

#[test]
fn the_debian_package_installs_binary_unit_and_example_and_systemd_accepts_the_unit() {
    let scratch = Scratch::new("packaging");
    let package = build_package(&scratch.0);
    let workspace = workspace();

    // Control data: name, version, architecture, dependencies.
    let control = run_ok(Command::new("dpkg-deb").arg("--field").arg(&package));
    let arch = run_ok(Command::new("dpkg").arg("--print-architecture"));
    assert_eq!(control_field(&control, "Package").as_deref(), Some("kgate"));
    assert_eq!(
        control_field(&control, "Version"),
        Some(format!("{}-1", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(
        control_field(&control, "Architecture"),
        Some(arch.trim().into())
    );
    assert_eq!(control_field(&control, "Section").as_deref(), Some("net"));
    let depends = control_field(&control, "Depends").unwrap_or_default();
    assert!(
        depends.starts_with("libc6 (>= "),
        "Depends should name the C library kgate links: {control}"
    );
    assert_eq!(
        control_field(&control, "Recommends").as_deref(),
        Some("bpftool")
    );

    // One conffile in /etc, which listens on loopback only until edited; the example
    // with the mail gateway's addresses stays under /usr/share/doc.
    let conffiles = run_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&package)
            .arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/kgate/kgate.toml");

    // Maintainer scripts: the unit is registered, never enabled or started on install;
    // on upgrade a running kgate hands over to the new binary (restarted only if that
    // fails), and is neither stopped nor restarted by debhelper; stopped on removal.
    let postinst = run_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&package)
            .arg("postinst"),
    );
    assert!(postinst.contains("deb-systemd-helper update-state kgate.service"));
    let debhelper = postinst
        .find("deb-systemd-helper")
        .expect("debhelper's snippet");
    let upgrade = postinst
        .find("/usr/bin/kgate upgrade -c /etc/kgate/kgate.toml")
        .unwrap_or_else(|| panic!("postinst must hand over with `kgate upgrade`:\n{postinst}"));
    let reload = postinst.find("daemon-reload").expect("a daemon-reload");
    assert!(
        debhelper < reload && reload < upgrade,
        "the unit must be reloaded before the hand-over:\n{postinst}"
    );
    assert!(postinst.contains("deb-systemd-invoke try-restart kgate.service"));
    assert!(
        !postinst.contains("invoke start") && !postinst.contains("invoke restart"),
        "postinst must not start kgate:\n{postinst}"
    );
    let prerm = run_ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&package)
            .arg("prerm"),
    );
    assert!(prerm.contains("deb-systemd-invoke stop kgate.service"));
    assert!(
        prerm.contains(r#""$1" = remove"#),
        "prerm must stop kgate on removal only, not on upgrade:\n{prerm}"
    );

    // Unpacked into a scratch root: each file in place, as in the source tree.
    let root = scratch.0.join("root");
    run_ok(Command::new("dpkg").arg("-x").arg(&package).arg(&root));
    let unit = root.join("usr/lib/systemd/system/kgate.service");
    let example = root.join("usr/share/doc/kgate/examples/kgate.toml");
    let binary = root.join("usr/bin/kgate");
    let conffile = root.join("etc/kgate/kgate.toml");
    for (installed, source) in [
        (&conffile, "packaging/kgate.conf.toml"),
        (&unit, "packaging/kgate.service"),
        (&example, "packaging/kgate.toml"),
        (
            &root.join("usr/share/doc/kgate/examples/keepalived.conf"),
            "packaging/keepalived.conf",
        ),
        (&root.join("usr/share/doc/kgate/README.md"), "README.md"),
    ] {
        assert_eq!(
            fs::read_to_string(installed)
                .unwrap_or_else(|e| panic!("{}: {e}", installed.display())),
            fs::read_to_string(workspace.join(source)).unwrap(),
            "{} differs from {source}",
            installed.display()
        );
    }
    let mode = fs::metadata(&binary).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{}", binary.display());

    // The installed binary runs, and accepts the installed example.
    let version = run_ok(Command::new(&binary).arg("--version"));
    assert_eq!(version, format!("kgate {}\n", env!("CARGO_PKG_VERSION")));
    let check = run_ok(Command::new(&binary).arg("check").arg("-c").arg(&example));
    assert!(check.contains("valid (4 frontends"), "{check}");
    let check = run_ok(Command::new(&binary).arg("check").arg("-c").arg(&conffile));
    assert!(check.contains("valid (1 frontend, "), "{check}");
    let conf = fs::read_to_string(&conffile).unwrap();
    for line in conf
        .lines()
        .filter(|l| l.trim_start().starts_with("listen"))
    {
        assert!(line.contains("\"127.0.0.1:"), "not loopback only: {line}");
    }
    // A manual page for kgate and each subcommand, gzipped.
    let man = root.join("usr/share/man/man1");
    for page in ["kgate.1.gz", "kgate-run.1.gz", "kgate-server-set.1.gz"] {
        assert!(man.join(page).is_file(), "no {page}");
    }

    // systemd-analyze, offline, in the scratch root: ExecStart= and the other commands
    // must exist there, and the targets the unit names come from this machine's systemd.
    let units = root.join("usr/lib/systemd/system");
    for entry in
        fs::read_dir("/usr/lib/systemd/system").expect("systemd's units (apt-get install systemd)")
    {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "target") {
            fs::copy(&path, units.join(path.file_name().unwrap())).unwrap();
        }
    }
    let verify = output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(&unit),
    );
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success(),
        "systemd-analyze verify rejected the unit ({}):\n{complaints}",
        verify.status
    );
    // Unknown keys and bad values are only warnings (exit 0): none allowed.
    let about_unit: Vec<&str> = complaints
        .lines()
        .filter(|line| line.contains("kgate.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify warned about the unit:\n{}",
        about_unit.join("\n")
    );

    // Its hardening stays where it is ("OK", 2.5 when written).
    let security = output(
        Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(format!("--threshold={MAX_EXPOSURE}"))
            .arg(format!("--root={}", root.display()))
            .arg(&unit),
    );
    let report = String::from_utf8_lossy(&security.stdout);
    assert!(
        security.status.success(),
        "the unit's exposure is over {MAX_EXPOSURE}/100 ({}):\n{report}{}",
        security.status,
        String::from_utf8_lossy(&security.stderr)
    );
}

#[test]
fn lintian_finds_nothing_to_say_about_the_package() {
    let scratch = Scratch::new("lintian");
    let package = build_package(&scratch.0);
    // Errors, warnings and informational tags alike; an override ships with its reason
    // (packaging/lintian-overrides).
    let out = output(Command::new("lintian").arg("--info").arg(&package));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "lintian ({}):\n{report}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs, upgrades and purges the package on this machine, with dpkg: the test needs
/// root, and skips (saying so) where a kgate package is installed already.
#[test]
fn install_upgrade_and_purge_leave_nothing_behind() {
    if tests::lab::skip_without_root() {
        return;
    }
    if output(Command::new("dpkg").args(["-s", "kgate"]))
        .status
        .success()
    {
        eprintln!("skipped: a kgate package is installed on this machine; dpkg would replace it");
        return;
    }
    let scratch = Scratch::new("install");
    let first = build_package_version(&scratch.0, Some("0.1.0-1"));
    let second_dir = scratch.0.join("second");
    fs::create_dir_all(&second_dir).unwrap();
    fs::rename(&first, second_dir.join("first.deb")).unwrap();
    let first = second_dir.join("first.deb");
    let second = build_package_version(&scratch.0, Some("0.1.0-2"));
    // Purged whatever happens below.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = Command::new("dpkg").args(["--purge", "kgate"]).output();
        }
    }
    let _purge = Purge;

    run_ok(Command::new("dpkg").arg("--install").arg(&first));
    let conffile = Path::new("/etc/kgate/kgate.toml");
    let check = run_ok(
        Command::new("/usr/bin/kgate")
            .arg("check")
            .arg("-c")
            .arg(conffile),
    );
    assert!(check.contains("valid"), "{check}");
    let files = run_ok(Command::new("dpkg").args(["-L", "kgate"]));
    // The operator's edit survives an upgrade.
    let edited = format!(
        "{}# edited by the operator\n",
        fs::read_to_string(conffile).unwrap()
    );
    fs::write(conffile, &edited).unwrap();
    run_ok(
        Command::new("dpkg")
            .args(["--force-confold", "--install"])
            .arg(&second),
    );
    let version = run_ok(Command::new("dpkg-query").args(["-W", "-f", "${Version}", "kgate"]));
    assert_eq!(version, "0.1.0-2");
    assert_eq!(fs::read_to_string(conffile).unwrap(), edited);

    run_ok(Command::new("dpkg").args(["--purge", "kgate"]));
    let left: Vec<&str> = files
        .lines()
        .filter(|path| {
            let path = Path::new(path);
            // Directories other packages share (/usr, /usr/share/man/man1...) stay.
            path.exists() && !path.is_dir() || path.starts_with("/etc/kgate") && path.exists()
        })
        .collect();
    assert!(left.is_empty(), "left behind after purge: {left:?}");
    assert!(!Path::new("/etc/kgate").exists(), "/etc/kgate is left");
    assert!(!Path::new("/usr/share/doc/kgate").exists());
    assert!(
        !output(Command::new("dpkg").args(["-s", "kgate"]))
            .status
            .success()
    );
}
