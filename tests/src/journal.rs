//! kgate as systemd runs it, logging to a private systemd-journald, read back with the
//! real `journalctl`.
//!
//! PID 1 here is not systemd and no journald runs, so each [`JournaledKgate`] starts
//! its own: `unshare --mount` gives journald and kgate a mount namespace where a tmpfs
//! hides /run/systemd (journald makes its sockets there: only this kgate reaches
//! them) and the lab's temp directory is bound over /run/log, where journald writes
//! its runtime journal, so `journalctl --directory` reads it from outside. Then kgate
//! starts as systemd would start a unit's process: `systemd-cat` connects its stdout
//! and stderr to journald's stream, and `JOURNAL_STREAM` names that stream's device
//! and inode (systemd.exec(5)), which is what kgate looks for.
//!
//! The pinned maps stay visible to the tests: the private mount namespace is a copy,
//! and /sys/fs/bpf in it is the same bpffs.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, ChildStderr, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    kgate::{READY_LINE, READY_TIMEOUT, TERM_TIMEOUT, kgate_bin},
    lab::Lab,
    proc,
};

/// Where Debian's systemd package puts journald.
pub const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// How long a query waits for an entry kgate is about to write.
const ENTRY_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets up the mount namespace, starts journald, then kgate (`$2 run -c $3`) on its
/// stream; `$1` is the directory bound over /run/log. With `$4` = `stream-only`, the
/// native protocol's socket is removed first (journald still has it open, unreachable).
const SCRIPT: &str = r#"
set -eu
dir=$1
mount -t tmpfs -o mode=0755 tmpfs /run/systemd
mkdir -p /run/log
mount --bind "$dir/run-log" /run/log
# journald writes to /var/log/journal only once asked to flush; hide it all the same.
if [ -d /var/log/journal ]; then mount -t tmpfs tmpfs /var/log/journal; fi
# Its own messages to its stderr, not to the kernel's log.
SYSTEMD_LOG_TARGET=console /lib/systemd/systemd-journald </dev/null >"$dir/journald.log" 2>&1 &
echo $! >"$dir/journald.pid"
tries=0
until [ -S /run/systemd/journal/stdout ] && [ -S /run/systemd/journal/socket ]; do
    tries=$((tries + 1))
    if [ "$tries" -gt 100 ]; then echo "journald made no sockets in 10 s" >&2; exit 1; fi
    sleep 0.1
done
if [ "$4" = stream-only ]; then rm /run/systemd/journal/socket; fi
exec systemd-cat --identifier=kgate -- sh -c \
    'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) RUST_LOG=info exec "$0" run -c "$1"' \
    "$2" "$3"
"#;

/// What of journald kgate can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// Its stream on stdout and stderr, and its socket for the native protocol: a
    /// systemd service.
    StreamAndSocket,
    /// The stream only (the socket is gone).
    StreamOnly,
}

/// A kgate whose log goes to a private journald. Dropping it stops both.
pub struct JournaledKgate {
    child: Option<Child>,
    journald: Option<i32>,
    dir: PathBuf,
    pin_path: PathBuf,
    control_socket: PathBuf,
}

impl JournaledKgate {
    /// Writes `config_toml`, starts journald and kgate in the lab's gateway namespace,
    /// and waits (up to 30 s) until the journal has kgate's ready line. `pin_path` and
    /// `control_socket` are the config's: they are removed on drop.
    pub fn start(
        lab: &Lab,
        config_toml: &str,
        paths: (PathBuf, PathBuf),
        reach: Reach,
    ) -> JournaledKgate {
        let (mut kgate, mut script_output) = JournaledKgate::spawn(lab, config_toml, paths, reach);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            kgate.find_journald();
            if kgate.journald.is_some()
                && kgate
                    .entries(&[])
                    .iter()
                    .any(|e| text(e, "MESSAGE").contains(READY_LINE))
            {
                return kgate;
            }
            let exited = kgate.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let mut said = String::new();
                let _ = script_output.read_to_string(&mut said);
                panic!(
                    "kgate under journald: {} before its ready line; the script said: {said}; \
                     journald said: {}; the journal has: {:#?}",
                    match exited {
                        Some(status) => format!("exited ({status})"),
                        None => format!("not ready within {READY_TIMEOUT:?}"),
                    },
                    fs::read_to_string(kgate.dir.join("journald.log")).unwrap_or_default(),
                    kgate.entries(&[]),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Like [`JournaledKgate::start`], for a kgate expected to stop by itself: waits
    /// (up to 30 s) for it to exit and returns how, with journald still running for
    /// [`JournaledKgate::entries`].
    pub fn run_to_exit(
        lab: &Lab,
        config_toml: &str,
        paths: (PathBuf, PathBuf),
    ) -> (ExitStatus, JournaledKgate) {
        let (mut kgate, _) = JournaledKgate::spawn(lab, config_toml, paths, Reach::StreamAndSocket);
        let child = kgate.child.as_mut().unwrap();
        let status = proc::wait_timeout(child, READY_TIMEOUT)
            .unwrap_or_else(|| panic!("kgate still runs {READY_TIMEOUT:?} after its start"));
        kgate.child = None;
        kgate.find_journald();
        (status, kgate)
    }

    fn find_journald(&mut self) {
        if self.journald.is_none() {
            self.journald = fs::read_to_string(self.dir.join("journald.pid"))
                .ok()
                .and_then(|pid| pid.trim().parse().ok());
        }
    }

    /// Starts the script; returns the kgate and what the script writes on stderr
    /// before kgate takes it.
    fn spawn(
        lab: &Lab,
        config_toml: &str,
        (pin_path, control_socket): (PathBuf, PathBuf),
        reach: Reach,
    ) -> (JournaledKgate, ChildStderr) {
        let dir = lab.temp_dir().join("journal");
        fs::create_dir_all(dir.join("run-log")).unwrap();
        let config = dir.join("kgate.toml");
        fs::write(&config, config_toml).unwrap();
        let mut child = lab
            .gateway()
            .command("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                SCRIPT,
                "sh",
            ])
            .arg(&dir)
            .arg(kgate_bin())
            .arg(&config)
            .arg(match reach {
                Reach::StreamAndSocket => "native",
                Reach::StreamOnly => "stream-only",
            })
            .stdin(Stdio::null())
            // Until systemd-cat takes them over: what the script says if it fails.
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting unshare (util-linux)");
        let script_output = child.stderr.take().unwrap();
        let kgate = JournaledKgate {
            child: Some(child),
            journald: None,
            dir,
            pin_path,
            control_socket,
        };
        (kgate, script_output)
    }

    /// The journal's entries from kgate (`SYSLOG_IDENTIFIER=kgate`) that match every
    /// one of `args` (journalctl's own: `-p warning`, `FRONTEND=smtp`), read with
    /// `journalctl --directory`, as JSON objects.
    pub fn entries(&self, args: &[&str]) -> Vec<Value> {
        let out = proc::run_with_timeout(
            Command::new("journalctl")
                .arg("--directory")
                .arg(self.dir.join("run-log/journal"))
                .args(["--no-pager", "--output=json", "SYSLOG_IDENTIFIER=kgate"])
                .args(args),
            Duration::from_secs(20),
        )
        .expect("running journalctl");
        // Before journald has written its first file, journalctl finds no journal.
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.starts_with('{'))
            .map(|line| serde_json::from_str(line).expect("journalctl's JSON"))
            .collect()
    }

    /// Waits until `args` match at least `n` entries; returns them. Panics, with the
    /// whole journal, after 30 s.
    pub fn wait_for(&self, args: &[&str], n: usize) -> Vec<Value> {
        let deadline = Instant::now() + ENTRY_TIMEOUT;
        loop {
            let entries = self.entries(args);
            if entries.len() >= n {
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "{n} entries matching {args:?} expected, {} found; the journal: {:#?}",
                entries.len(),
                self.entries(&[])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until an entry that `args` match has `needle` in its message; returns it.
    /// Panics, with the whole journal, after 30 s.
    pub fn wait_for_message(&self, args: &[&str], needle: &str) -> Value {
        let deadline = Instant::now() + ENTRY_TIMEOUT;
        loop {
            if let Some(entry) = self
                .entries(args)
                .into_iter()
                .find(|e| text(e, "MESSAGE").contains(needle))
            {
                return entry;
            }
            assert!(
                Instant::now() < deadline,
                "no entry matching {args:?} says {needle:?}; the journal: {:#?}",
                self.entries(&[])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM to kgate, then SIGKILL after 5 s; then journald. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if proc::wait_timeout(&mut child, TERM_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(pid) = self.journald.take() {
            // SAFETY: kill(2); journald was started by our script and is reaped by init
            // or by us above, so at worst the signal finds no process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = fs::remove_dir_all(&self.pin_path);
        let _ = fs::remove_file(&self.control_socket);
    }

    /// Where the journal files are, for a test's messages.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for JournaledKgate {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Field `name` of a journal entry, as text ("" when absent). journalctl gives a
/// field that is not valid UTF-8 (or has control characters) as an array of bytes.
pub fn text(entry: &Value, name: &str) -> String {
    match &entry[name] {
        Value::String(s) => s.clone(),
        Value::Array(bytes) => bytes
            .iter()
            .filter_map(|b| b.as_u64().map(|b| b as u8 as char))
            .collect(),
        _ => String::new(),
    }
}
