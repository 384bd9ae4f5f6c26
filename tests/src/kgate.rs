//! Runs the `kgate` binary in the lab's gateway namespace and watches its log.
//!
//! kgate is started with [`NetNs::command`](crate::lab::NetNs::command) (network
//! namespace only), so it sees the same /sys/fs/bpf as the tests that read its pinned
//! maps. Its stdout and stderr go to a buffer that tests can search, and are echoed to
//! the test's stderr with a `kgate| ` prefix (shown by `cargo test` when a test fails).

use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::lab::{Lab, NetNs};
use crate::proc;

/// The line kgate logs once its listeners are open and its data plane is set up.
pub const READY_LINE: &str = "kgate ready";

/// How long [`Kgate::start`] waits for [`READY_LINE`].
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Kgate::stop`] gives kgate to exit after SIGTERM before it sends SIGKILL.
pub const TERM_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for the log readers once the process is gone.
const READER_TIMEOUT: Duration = Duration::from_secs(2);

static CONFIG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The kgate binary: `$KGATE_BIN` if set, else `<target>/debug/kgate` of this workspace
/// (`$CARGO_TARGET_DIR` if set, else `<workspace>/target`).
///
/// Panics, saying how to build it, when it does not exist.
pub fn kgate_bin() -> PathBuf {
    if let Some(bin) = env::var_os("KGATE_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "KGATE_BIN={} is not a file", bin.display());
        return bin;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace");
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(|dir| workspace.join(dir)) // a relative CARGO_TARGET_DIR is the workspace's
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("debug").join("kgate");
    assert!(
        bin.is_file(),
        "the kgate binary is missing at {}: build it with `cargo xtask test` (which builds \
         the eBPF programs and kgate before running the tests), or set KGATE_BIN",
        bin.display()
    );
    bin
}

/// The uid and gid of `nobody` on Debian.
const NOBODY: u32 = 65534;

/// The pin directory for a lab's kgate: `/sys/fs/bpf/kgate-test-<lab.unique_name()>`.
pub fn pin_path_for(lab: &Lab) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/kgate-test-{}", lab.unique_name()))
}

/// The control socket for a lab's kgate: `/run/kgate-test-<lab.unique_name()>.sock`.
pub fn control_socket_for(lab: &Lab) -> PathBuf {
    PathBuf::from(format!("/run/kgate-test-{}.sock", lab.unique_name()))
}

/// A `[global]` section for a test config: this lab's pin path and control socket, and
/// the given data plane (`"sockmap"`, `"userspace"` or `"auto"`).
pub fn global_section(lab: &Lab, dataplane: &str) -> String {
    format!(
        "[global]\nbpf_pin_path = {:?}\ncontrol_socket = {:?}\ndataplane = {dataplane:?}\n",
        pin_path_for(lab).display().to_string(),
        control_socket_for(lab).display().to_string(),
    )
}

/// Scrapes kgate's `/metrics` at `address` (its `metrics_listen`, in the gateway
/// namespace).
pub fn scrape_metrics(lab: &Lab, address: &str) -> prometheus_parse::Scrape {
    let address = address.to_owned();
    let text = lab.gateway().run(move || {
        let mut c = std::net::TcpStream::connect(&address).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: kgate\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        c.read_to_string(&mut response).unwrap();
        response
    });
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("the Prometheus text format")
}

/// The value of the one sample of `name` with `labels` (among others) in `scrape`.
pub fn metric_value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<_> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(matching.len(), 1, "{name} {labels:?}: {matching:?}");
    match matching[0].value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

/// Where a kgate runs and what of it lives outside the lab's temp directory.
struct Place<'a> {
    ns: &'a NetNs,
    temp_dir: &'a Path,
    pin_path: PathBuf,
    control_socket: PathBuf,
}

/// A running kgate. Dropping it stops kgate and removes its pin directory and control
/// socket.
pub struct Kgate {
    child: Option<Child>,
    pid: u32,
    exit_status: Option<ExitStatus>,
    log: Arc<Log>,
    readers: Vec<JoinHandle<()>>,
    config_path: PathBuf,
    pin_path: PathBuf,
    control_socket: PathBuf,
}

impl Kgate {
    /// Writes `config_toml` to a file in the lab's temp directory, starts
    /// `kgate run -c FILE` in the gateway namespace and waits (up to 30 s) for a line
    /// containing "kgate ready". Panics with the captured log if kgate exits or times out
    /// first. `RUST_LOG` is passed on; when unset, it is `info` (the ready line's level).
    pub fn start(lab: &Lab, config_toml: &str) -> Kgate {
        Kgate::start_with(lab, &kgate_bin(), config_toml)
    }

    /// Like [`Kgate::start`] with another binary (a release build for benchmarks, say).
    pub fn start_with(lab: &Lab, bin: &Path, config_toml: &str) -> Kgate {
        Kgate::spawn(lab, bin, config_toml, None, &[])
    }

    /// Like [`Kgate::start_with`], with variables added to kgate's environment
    /// (`NOTIFY_SOCKET`, say).
    pub fn start_with_env(
        lab: &Lab,
        bin: &Path,
        config_toml: &str,
        env: &[(&str, &Path)],
    ) -> Kgate {
        Kgate::spawn(lab, bin, config_toml, None, env)
    }

    /// Like [`Kgate::start`], as user and group `nobody`: no privilege to load eBPF.
    pub fn start_unprivileged(lab: &Lab, config_toml: &str) -> Kgate {
        // The checkout may sit under a directory only root can enter (mktemp -d makes
        // 0700 ones): `nobody` runs a copy from the lab's directory (made 0755 below).
        let bin = lab.temp_dir().join("kgate");
        fs::copy(kgate_bin(), &bin)
            .unwrap_or_else(|e| panic!("copying kgate to {}: {e}", bin.display()));
        Kgate::spawn(lab, &bin, config_toml, Some(NOBODY), &[])
    }

    /// Starts kgate in namespace `ns` (a gateway of a [`crate::pair::PairLab`], say),
    /// its config file written in `temp_dir`, as [`Kgate::start`] does in a lab's
    /// gateway. `pin_path` and `control_socket` must be those of the config: they are
    /// removed on drop.
    pub fn start_in(
        ns: &NetNs,
        temp_dir: &Path,
        (pin_path, control_socket): (PathBuf, PathBuf),
        config_toml: &str,
    ) -> Kgate {
        let place = Place {
            ns,
            temp_dir,
            pin_path,
            control_socket,
        };
        Kgate::spawn_at(place, &kgate_bin(), config_toml, None, &[])
    }

    fn spawn(
        lab: &Lab,
        bin: &Path,
        config_toml: &str,
        user: Option<u32>,
        env: &[(&str, &Path)],
    ) -> Kgate {
        let place = Place {
            ns: lab.gateway(),
            temp_dir: lab.temp_dir(),
            pin_path: pin_path_for(lab),
            control_socket: control_socket_for(lab),
        };
        Kgate::spawn_at(place, bin, config_toml, user, env)
    }

    fn spawn_at(
        place: Place<'_>,
        bin: &Path,
        config_toml: &str,
        user: Option<u32>,
        env: &[(&str, &Path)],
    ) -> Kgate {
        let n = CONFIG_COUNTER.fetch_add(1, Ordering::Relaxed);
        let config_path = place.temp_dir.join(format!("kgate-{n}.toml"));
        fs::write(&config_path, config_toml)
            .unwrap_or_else(|e| panic!("writing {}: {e}", config_path.display()));

        let mut cmd = place.ns.command(bin);
        if let Some(id) = user {
            // The config must be readable by that user, and its directory searchable.
            use std::os::unix::{fs::PermissionsExt, process::CommandExt};
            for (path, mode) in [(place.temp_dir, 0o755), (config_path.as_path(), 0o644)] {
                fs::set_permissions(path, fs::Permissions::from_mode(mode))
                    .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
            }
            // Not `Command::uid`: std drops privileges before the pre_exec hooks
            // run, and entering the namespace needs them. This hook runs after that one.
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(id) != 0
                        || libc::setuid(id) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("run")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let pid = child.id();
        let log = Arc::new(Log::default());
        let readers = [
            child.stdout.take().map(|p| log_reader(p, log.clone())),
            child.stderr.take().map(|p| log_reader(p, log.clone())),
        ]
        .into_iter()
        .flatten()
        .collect();

        // From here on, a panic drops `kgate`, which stops the process.
        let mut kgate = Kgate {
            child: Some(child),
            pid,
            exit_status: None,
            log,
            readers,
            config_path,
            pin_path: place.pin_path,
            control_socket: place.control_socket,
        };
        kgate.wait_ready();
        kgate
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.log.lock().text.contains(READY_LINE) {
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.exit_status = Some(status);
                // Collect the last lines it wrote before it died.
                self.log
                    .wait_until(READER_TIMEOUT, |state| state.open_pipes == 0);
                panic!(
                    "kgate exited ({status}) before it logged {READY_LINE:?}; its config was {}; its log:\n{}",
                    self.config_path.display(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                self.stop();
                panic!(
                    "kgate did not log {READY_LINE:?} within {READY_TIMEOUT:?}; its config was {}; its log:\n{}",
                    self.config_path.display(),
                    self.log()
                );
            }
            self.log.wait_until(Duration::from_millis(50), |_| false);
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The config file it was started with (for `kgate status -c`, `reload` and so on).
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The number of entries in /proc/PID/fd: for leak checks. 0 once it has exited.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|entries| entries.count())
            .unwrap_or(0)
    }

    /// Everything kgate wrote to stdout and stderr so far, one line per line.
    pub fn log(&self) -> String {
        self.log.lock().text.clone()
    }

    /// A field of the "splice totals" line kgate logs when it stops (sockmap plane):
    /// `redirected_bytes`, `passed_bytes`, `trimmed_bytes`, ... Panics when missing.
    pub fn splice_total(&self, field: &str) -> u64 {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("splice totals"))
            .unwrap_or_else(|| panic!("no splice totals in the log:\n{log}"));
        let prefix = format!("{field}=");
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(&prefix))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in: {line}"))
    }

    /// Waits until the log contains `needle`. False on timeout, or at once when kgate
    /// has closed its output (exited) without writing it.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.log.wait_until(timeout, |state| {
            state.text.contains(needle) || state.open_pipes == 0
        });
        self.log.lock().text.contains(needle)
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to kgate, if it is still running.
    pub fn signal(&mut self, signal: i32) {
        if let Some(child) = &mut self.child
            && let Ok(None) = child.try_wait()
        {
            // SAFETY: kill(2); the pid is our unreaped child, so it cannot be reused.
            unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        }
    }

    /// Whether kgate is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let status = match child.try_wait() {
            Ok(Some(status)) => Some(status),
            _ => {
                // SAFETY: kill(2) on our unreaped child.
                unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
                proc::wait_timeout(&mut child, TERM_TIMEOUT).or_else(|| {
                    eprintln!("kgate| (still running {TERM_TIMEOUT:?} after SIGTERM: SIGKILL)");
                    let _ = child.kill();
                    child.wait().ok()
                })
            }
        };
        self.exit_status = self.exit_status.or(status);
        proc::join_bounded(std::mem::take(&mut self.readers), READER_TIMEOUT);
    }

    /// How kgate exited, once [`Kgate::stop`] ran (or it died during start).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit_status
    }

    /// `kgate status --json` of this kgate (through its control socket), parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(kgate_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.control_socket)
            .output()
            .expect("running kgate status");
        assert!(
            out.status.success(),
            "kgate status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("kgate status --json prints JSON")
    }

    /// `kgate reload` through this kgate's control socket.
    pub fn reload(&self) -> std::process::Output {
        Command::new(kgate_bin())
            .args(["reload", "--socket"])
            .arg(&self.control_socket)
            .output()
            .expect("running kgate reload")
    }

    /// `kgate server set SERVER STATE` through this kgate's control socket.
    pub fn server_set(&self, server: &str, state: &str) -> std::process::Output {
        Command::new(kgate_bin())
            .args(["server", "set", server, state, "--socket"])
            .arg(&self.control_socket)
            .output()
            .expect("running kgate server set")
    }

    /// The control socket of this kgate (`control_socket_for(lab)`).
    pub fn control_socket(&self) -> PathBuf {
        self.control_socket.clone()
    }

    /// The pin directory of this kgate (`pin_path_for(lab)`).
    pub fn pin_path(&self) -> PathBuf {
        self.pin_path.clone()
    }
}

impl std::fmt::Debug for Kgate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kgate")
            .field("pid", &self.pid)
            .field("config_path", &self.config_path)
            .field("exit_status", &self.exit_status)
            .finish_non_exhaustive()
    }
}

impl Drop for Kgate {
    fn drop(&mut self) {
        self.stop();
        // Both live outside the lab's namespaces and temp directory: remove them here.
        if self.pin_path.exists() {
            let _ = fs::remove_dir_all(&self.pin_path);
        }
        let _ = fs::remove_file(&self.control_socket);
    }
}

/// kgate's output, shared between the reader threads and the tests.
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    changed: Condvar,
}

struct LogState {
    text: String,
    /// Pipes not yet at end of file (stdout, stderr).
    open_pipes: usize,
}

impl Default for LogState {
    fn default() -> Self {
        LogState {
            text: String::new(),
            open_pipes: 2,
        }
    }
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `done` holds or `timeout` passes.
    fn wait_until(&self, timeout: Duration, done: impl Fn(&LogState) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = match self.changed.wait_timeout(state, left) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Copies lines from one of kgate's pipes into the log and to our stderr.
fn log_reader(pipe: impl Read + Send + 'static, log: Arc<Log>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']);
                    eprintln!("kgate| {text}");
                    let mut state = log.lock();
                    state.text.push_str(text);
                    state.text.push('\n');
                    drop(state);
                    log.changed.notify_all();
                }
            }
        }
        log.lock().open_pipes -= 1;
        log.changed.notify_all();
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::skip_without_root;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for kgate: a shell script, so the runner is tested without the daemon.
    fn fake_kgate(lab: &Lab, name: &str, script: &str) -> PathBuf {
        let path = lab.temp_dir().join(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn start_waits_for_ready_and_stop_terminates() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(0);
        // It prints its arguments and its config, so the test can check both.
        let bin = fake_kgate(
            &lab,
            "kgate-ok",
            r#"echo "args: $*"; cat "$3"; sleep 0.2; echo "INFO kgate ready" >&2; exec sleep 60"#,
        );
        let config = global_section(&lab, "userspace");
        let mut kgate = Kgate::start_with(&lab, &bin, &config);
        let log = kgate.log();
        assert!(
            log.contains(&format!("args: run -c {}", kgate.config_path().display())),
            "{log}"
        );
        assert!(log.contains(&format!(
            "bpf_pin_path = \"/sys/fs/bpf/kgate-test-{}\"",
            lab.unique_name()
        )));
        assert!(kgate.wait_for_log("kgate ready", Duration::from_secs(1)));
        assert!(!kgate.wait_for_log("never written", Duration::from_millis(100)));
        assert!(kgate.open_fds() >= 3);
        assert!(kgate.is_running());
        assert_eq!(kgate.pin_path(), pin_path_for(&lab));

        let pid = kgate.pid();
        let started = Instant::now();
        kgate.stop();
        assert!(
            started.elapsed() < TERM_TIMEOUT,
            "sleep dies of SIGTERM at once"
        );
        assert!(!proc::pid_exists(pid));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            kgate.exit_status().and_then(|s| s.signal()),
            Some(libc::SIGTERM)
        );
        kgate.stop();
        // Output closed: no waiting for a line that cannot come.
        let started = Instant::now();
        assert!(!kgate.wait_for_log("never written", Duration::from_secs(5)));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn start_panics_with_the_log_when_kgate_exits_early() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(0);
        let bin = fake_kgate(
            &lab,
            "kgate-bad",
            "echo 'error: bad config: unknown key `lisen`' >&2; exit 2",
        );
        let panic = std::panic::catch_unwind(|| Kgate::start_with(&lab, &bin, "")).unwrap_err();
        let message = panic.downcast_ref::<String>().unwrap();
        assert!(message.contains("exited (exit status: 2)"), "{message}");
        assert!(message.contains("unknown key `lisen`"), "{message}");
    }

    #[test]
    fn drop_kills_a_kgate_that_ignores_sigterm_and_removes_its_pin_dir() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(0);
        let bin = fake_kgate(
            &lab,
            "kgate-stubborn",
            "trap '' TERM; echo 'kgate ready'; while :; do sleep 1; done",
        );
        let kgate = Kgate::start_with(&lab, &bin, "");
        // A stand-in for the pins kgate would make. Only possible when a bpffs is mounted
        // at /sys/fs/bpf (kgate mounts it; on plain sysfs mkdir fails).
        let pin_path = kgate.pin_path();
        let made_pin_dir = fs::create_dir_all(pin_path.join("sub")).is_ok();
        let pid = kgate.pid();
        let started = Instant::now();
        drop(kgate);
        assert!(started.elapsed() >= TERM_TIMEOUT);
        assert!(!proc::pid_exists(pid));
        if made_pin_dir {
            assert!(!pin_path.exists());
        }
    }
}
