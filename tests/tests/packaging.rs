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
    // cargo-deb takes the binary from `<target>/release/kgate`: a target dir of our own
    // whose release/kgate is the binary under test.
    let target = scratch.join("target");
    fs::create_dir_all(target.join("release")).unwrap();
    symlink(kgate_bin(), target.join("release/kgate")).unwrap();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = output(
        Command::new(cargo)
            .current_dir(workspace())
            .args(["deb", "--package", "proxy-user", "--no-build", "--fast"])
            .arg("--output")
            .arg(scratch.join("out/"))
            .env("CARGO_TARGET_DIR", &target),
    );
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

    // Nothing in /etc: no conffile that would start probing the example's addresses.
    let contents = run_ok(Command::new("dpkg-deb").arg("--contents").arg(&package));
    assert!(
        !contents.contains(" ./etc/"),
        "the package must not install under /etc:\n{contents}"
    );

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
    for (installed, source) in [
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
