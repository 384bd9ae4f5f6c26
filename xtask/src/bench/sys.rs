//! What the benchmark reads from the kernel: busy CPU time, free memory, TCP buffer
//! pages, a process's resident memory and open files; and the few knobs it turns
//! (its own file limit, the lab namespaces' port range).
//!
//! Everything is read from /proc as text: no dependency, and the same numbers an
//! operator would look at.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use ::tests::lab::NetNs;
use anyhow::{Context as _, anyhow, bail};

/// Busy and total CPU time of the whole machine, in clock ticks, from the first line
/// of /proc/stat.
#[derive(Clone, Copy, Debug)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq: kernel and softirq work count, so the
    /// packets' path through the stack and the sockmap redirects are in it.
    busy: u64,
}

impl CpuTimes {
    pub fn now() -> anyhow::Result<CpuTimes> {
        let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        parse_cpu_line(&stat)
    }

    /// Busy CPU seconds (all CPUs together) since `earlier`.
    pub fn busy_seconds_since(&self, earlier: &CpuTimes) -> f64 {
        self.busy.saturating_sub(earlier.busy) as f64 / clock_ticks_per_second()
    }
}

fn parse_cpu_line(stat: &str) -> anyhow::Result<CpuTimes> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow!("no `cpu` line in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    if fields.len() < 7 {
        bail!("the `cpu` line of /proc/stat has {} fields", fields.len());
    }
    // user nice system idle iowait irq softirq steal ...
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
    Ok(CpuTimes { busy })
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A `Key: value kB` line of a /proc file, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// The whole machine's memory as the kernel accounts it, for before/after deltas.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// MemAvailable, bytes.
    pub available: u64,
    /// Slab (socket structures live there), bytes.
    pub slab: u64,
    /// Pages TCP has allocated for socket buffers, all namespaces (sockstat `mem`),
    /// in bytes.
    pub tcp_buffers: u64,
}

impl Memory {
    pub fn now() -> anyhow::Result<Memory> {
        let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let field =
            |key| kib_field(&meminfo, key).ok_or_else(|| anyhow!("no {key} in /proc/meminfo"));
        let sockstat =
            fs::read_to_string("/proc/net/sockstat").context("reading /proc/net/sockstat")?;
        Ok(Memory {
            available: field("MemAvailable")?,
            slab: field("Slab")?,
            tcp_buffers: tcp_mem_pages(&sockstat)? * page_size(),
        })
    }
}

/// `TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 2`: the `mem` count (pages).
fn tcp_mem_pages(sockstat: &str) -> anyhow::Result<u64> {
    let line = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .ok_or_else(|| anyhow!("no TCP line in /proc/net/sockstat"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "mem")
        .and_then(|w| w[1].parse().ok())
        .ok_or_else(|| anyhow!("no `mem` in {line:?}"))
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// VmRSS of a process, in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    kib_field(&status, "VmRSS").ok_or_else(|| anyhow!("no VmRSS in {path}"))
}

/// Open file descriptors of a process (0 once it is gone).
pub fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Whether process `pid` has a TCP socket listening on `addr` (IPv4), from its own
/// network namespace's /proc/PID/net/tcp.
pub fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(addr) = addr else {
        return false;
    };
    let Ok(table) = fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    // The address is the kernel's u32 printed in hex: the octets in host (little
    // endian) order; the port in plain hex. State 0A is LISTEN.
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(addr.ip().octets()),
        addr.port()
    );
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.get(1) == Some(&want.as_str()) && cols.get(3) == Some(&"0A")
    })
}

/// Raises this process's open-file limit to `want` (soft and hard), or where raising
/// the hard limit is not allowed (no CAP_SYS_RESOURCE, as in some containers), the
/// soft limit to the hard one. Children started afterwards (kgate, HAProxy) inherit
/// it. Returns the limit now in force.
pub fn raise_open_files(want: u64) -> anyhow::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        bail!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_cur >= want {
        return Ok(limit.rlim_cur);
    }
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let wanted = want.min(nr_open);
    let tries = [
        libc::rlimit {
            rlim_cur: wanted,
            rlim_max: limit.rlim_max.max(wanted),
        },
        libc::rlimit {
            rlim_cur: limit.rlim_max.min(wanted),
            rlim_max: limit.rlim_max,
        },
    ];
    for raised in tries {
        // SAFETY: setrlimit reads one rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(raised.rlim_cur);
        }
    }
    bail!(
        "cannot raise the open-file limit from {}: {}",
        limit.rlim_cur,
        std::io::Error::last_os_error()
    )
}

/// Writes sysctls of the namespace `ns` (paths under /proc/sys/net, which show the
/// namespace of the thread that opens them).
pub fn set_sysctls(ns: &NetNs, knobs: &[(&str, &str)]) -> anyhow::Result<()> {
    let knobs: Vec<(String, String)> = knobs
        .iter()
        .map(|(path, value)| (path.to_string(), value.to_string()))
        .collect();
    let name = ns.name().to_owned();
    ns.run(move || -> anyhow::Result<()> {
        for (path, value) in knobs {
            fs::write(&path, &value)
                .with_context(|| format!("writing {value} to {path} in {name}"))?;
        }
        Ok(())
    })
}

/// The machine the numbers come from.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: f64,
    pub haproxy: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map_or_else(|| "unknown CPU".to_owned(), |(_, v)| v.trim().to_owned());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
        let memory_gib = fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| kib_field(&m, "MemTotal"))
            .map_or(0.0, |b| b as f64 / (1u64 << 30) as f64);
        Machine {
            cpu,
            cores,
            kernel,
            memory_gib,
            haproxy: haproxy_version().unwrap_or_else(|| "unknown".into()),
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{}, {} cores, {:.0} GiB, Linux {}",
            self.cpu, self.cores, self.memory_gib, self.kernel
        )
    }
}

/// `2.6.12-1+deb12u4` from `haproxy -v`'s first line.
fn haproxy_version() -> Option<String> {
    let out = Command::new("haproxy").arg("-v").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next()?;
    let version = first
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?;
    Some(version.to_owned())
}

/// The load average line, for the record: other work on the machine skews the numbers.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `2025-01-31 12:34 UTC`, from date(1).
pub fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown date".into())
}

/// Sums every number stored under `field` anywhere in bpftool's dump of a per-CPU
/// map (with BTF, `bpftool map dump` prints each CPU's value with named fields).
pub fn sum_bpftool_field(dump: &serde_json::Value, field: &str) -> u64 {
    match dump {
        serde_json::Value::Object(map) => map
            .iter()
            .map(|(k, v)| {
                if k == field {
                    v.as_u64().unwrap_or(0)
                } else {
                    sum_bpftool_field(v, field)
                }
            })
            .sum(),
        serde_json::Value::Array(items) => items.iter().map(|v| sum_bpftool_field(v, field)).sum(),
        _ => 0,
    }
}

/// `bpftool map dump pinned PATH`, parsed.
pub fn bpftool_dump(path: &Path) -> anyhow::Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(path)
        .output()
        .context("running bpftool: is the bpftool package installed?")?;
    if !out.status.success() {
        bail!(
            "`bpftool map dump pinned {}` failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool's dump of {} is not JSON", path.display()))
}

/// The workspace-relative form of `path` for messages, when it is inside `root`.
pub fn relative(path: &Path, root: &Path) -> PathBuf {
    path.strip_prefix(root)
        .map_or_else(|_| path.to_owned(), Path::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_counts_user_nice_system_irq_softirq() {
        let stat = "cpu  10 2 30 400 5 6 7 8 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(parse_cpu_line(stat).unwrap().busy, 10 + 2 + 30 + 6 + 7);
    }

    #[test]
    fn sockstat_mem_is_read_from_the_tcp_line() {
        let sockstat =
            "sockets: used 120\nTCP: inuse 5 orphan 0 tw 3 alloc 7 mem 42\nUDP: inuse 0 mem 9\n";
        assert_eq!(tcp_mem_pages(sockstat).unwrap(), 42);
    }

    #[test]
    fn kib_fields_become_bytes() {
        let status = "Name:\tkgate\nVmRSS:\t    2048 kB\n";
        assert_eq!(kib_field(status, "VmRSS"), Some(2048 * 1024));
        assert_eq!(kib_field(status, "VmHWM"), None);
    }

    #[test]
    fn bpftool_fields_are_summed_over_cpus() {
        let dump: serde_json::Value = serde_json::from_str(
            r#"[{"key":0,"values":[{"cpu":0,"value":{"redirected_bytes":100,"passed_bytes":1}},
                                   {"cpu":1,"value":{"redirected_bytes":23,"passed_bytes":0}}]}]"#,
        )
        .unwrap();
        assert_eq!(sum_bpftool_field(&dump, "redirected_bytes"), 123);
        assert_eq!(sum_bpftool_field(&dump, "passed_bytes"), 1);
    }
}
