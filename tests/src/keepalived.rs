//! A private keepalived (Debian's package) in a lab namespace: its own configuration,
//! pid files and log in the lab's temp directory, VRRP only, started by the test and
//! stopped by the pid of the process the test started. The system's keepalived
//! service (if any) is not touched.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use crate::lab::NetNs;
use crate::proc;

/// How long keepalived gets to leave after SIGTERM (it sends its priority-0 advert and
/// removes the VIP first) before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running keepalived; dropping it stops it.
pub struct Keepalived {
    child: Option<Child>,
    name: String,
    dir: PathBuf,
}

impl Keepalived {
    /// Writes `config` to `<dir>/<name>.conf` and starts `keepalived --vrrp` in `ns`,
    /// in the foreground, logging to `<dir>/<name>.log`.
    pub fn start(ns: &NetNs, dir: &Path, name: &str, config: &str) -> Keepalived {
        let file = |ext: &str| dir.join(format!("{name}.{ext}"));
        let conf = file("conf");
        fs::write(&conf, config).unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        let log = File::create(file("log")).expect("creating keepalived's log");
        let child = ns
            .command("keepalived")
            .args([
                "--vrrp",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
            ])
            .arg("--use-file")
            .arg(&conf)
            .arg("--pid")
            .arg(file("pid"))
            .arg("--vrrp_pid")
            .arg(file("vrrp.pid"))
            .arg("--checkers_pid")
            .arg(file("checkers.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting keepalived: {e} (apt-get install keepalived; cargo xtask test does)"
                )
            });
        Keepalived {
            child: Some(child),
            name: name.to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// What keepalived logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join(format!("{}.log", self.name))).unwrap_or_default()
    }

    /// SIGTERM to the process the test started, without waiting: keepalived gives its
    /// addresses up and exits ([`Keepalived::stop`] waits for it).
    pub fn terminate(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(None) = child.try_wait()
        {
            // SAFETY: kill(2) on our unreaped child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// SIGTERM to the process the test started, then SIGKILL after [`STOP_TIMEOUT`];
    /// the VRRP child it forked is killed by its pid file if it is still there.
    /// Idempotent.
    pub fn stop(&mut self) {
        self.terminate();
        let Some(mut child) = self.child.take() else {
            return;
        };
        if proc::wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let vrrp_pid = fs::read_to_string(self.dir.join(format!("{}.vrrp.pid", self.name)));
        if let Some(pid) = vrrp_pid
            .ok()
            .and_then(|p| p.trim().parse::<libc::pid_t>().ok())
            && proc::pid_exists(pid as u32)
            && fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "keepalived")
        {
            // SAFETY: kill(2) on the VRRP child our keepalived wrote in its pid file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.stop();
    }
}
