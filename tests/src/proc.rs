//! Process helpers shared by the lab and the kgate runner: running a command with a
//! deadline, and killing what is left inside a namespace when a lab goes away.
//!
//! Everything here is bounded in time, because it runs in `Drop` and in test setup,
//! where a hang would stall the whole test binary.

use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How often a polling loop looks again. Short, so that tests stay fast; every loop
/// using it also has a deadline.
pub(crate) const POLL: Duration = Duration::from_millis(5);

/// Runs `cmd` to completion with its output captured, killing it after `timeout`.
pub(crate) fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Read both pipes on their own threads: a child that fills a pipe would otherwise
    // block before it exits.
    let stdout = child.stdout.take().map(read_to_end_thread);
    let stderr = child.stderr.take().map(read_to_end_thread);
    let status = match wait_timeout(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish within {timeout:?}"),
            ));
        }
    };
    let collect =
        |h: Option<JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

fn read_to_end_thread(mut pipe: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Waits for `child` to exit, for at most `timeout`. `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            // An error from try_wait means the child is not ours to wait for any more.
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Joins the threads that finish within `timeout` and leaves the rest running (they are
/// detached when their handles drop). Returns how many were left behind.
pub(crate) fn join_bounded<T>(handles: Vec<JoinHandle<T>>, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut left = 0;
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            left += 1;
        }
    }
    left
}

/// The identity of a namespace file (`/run/netns/X` or `/proc/PID/ns/net`).
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Sends SIGKILL to every process whose network namespace is the one bound at
/// `netns_path`, and waits (up to `timeout`) until they are gone.
///
/// The lab's namespaces have names unique to this process, so anything inside them was
/// started by the lab's users (kgate, haproxy, iperf3, ...). Each process is signalled
/// through a pidfd, after checking its namespace through that same pid: a pid reused in
/// between cannot be hit. Our own process is never touched (its threads may be inside).
pub(crate) fn kill_processes_in_netns(netns_path: &Path, timeout: Duration) {
    let Some(target) = ns_id(netns_path) else {
        return;
    };
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    let mut pidfds = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let ns_path = format!("/proc/{pid}/ns/net");
        if ns_id(Path::new(&ns_path)) != Some(target) {
            continue;
        }
        let Some(pidfd) = pidfd_open(pid) else {
            continue;
        };
        // Checked again after pidfd_open: the pidfd now pins this very process.
        if ns_id(Path::new(&ns_path)) == Some(target) && pidfd_kill(&pidfd) {
            pidfds.push(pidfd);
        }
    }
    let deadline = Instant::now() + timeout;
    for pidfd in pidfds {
        // A pidfd becomes readable when its process has exited.
        let mut pfd = libc::pollfd {
            fd: pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd; the timeout is bounded.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_kill(pidfd: &OwnedFd) -> bool {
    // SAFETY: plain syscall on a pidfd we own; no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0
}

/// True if a process with this pid exists (possibly as a zombie).
pub(crate) fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pids (not ours) whose command line (`/proc/PID/cmdline`, NUL-separated) `matches`.
pub(crate) fn pids_whose_cmdline(matches: impl Fn(&[u8]) -> bool) -> Vec<u32> {
    let own = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| matches(&c)))
        .collect()
}
