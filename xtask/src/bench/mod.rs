//! `cargo xtask bench`: kgate against HAProxy and against no proxy at all, side by
//! side, in one run, in one namespace lab.
//!
//! One lab (client — gateway — backend, veth pairs, the gateway forwarding) carries
//! every path in turn:
//! - direct: the client connects to the backend's address, routed by the gateway's
//!   kernel (the physical limit of this lab);
//! - kgate with the sockmap data plane, and with the userspace one;
//! - HAProxy in TCP mode, `send-proxy-v2`, `option splice-auto`.
//!
//! Each repetition runs every path once (the starting path rotates from one repetition
//! to the next), and on each path every workload once: scale (connections held open),
//! bulk with 1 and with 8 streams, request/response latency, short SMTP-like sessions.
//! The proxy is started afresh for each repetition of each path.
//!
//! Every run checks what it moved (byte counts and contents, PROXY headers, echoes),
//! and the command exits non-zero if any check failed; never because of speed. The
//! results (medians with min and max, ratios, targets met or missed) go to
//! `results.md`, `results.json` and `results.svg` in the output directory, and a full
//! run into the README's Benchmarks section.

mod bulk;
mod chart;
mod latency;
mod proxy;
mod report;
mod scale;
mod server;
mod sessions;
mod sys;

use std::{
    env, fs,
    panic::{self, AssertUnwindSafe},
    path::{Path as FsPath, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context as _, anyhow, bail};
// `::tests` is the lab crate; a bare `tests` would be the unit test module below.
use ::tests::lab::{self, Lab};

use crate::{
    build,
    setup::{self, NotRoot},
};
use proxy::{Path, Running};

/// Measure kgate against HAProxy and the direct path, in a namespace lab.
///
/// Needs root. Builds kgate (release), installs HAProxy if missing, and runs every
/// workload over every path, interleaved, 5 times. Writes results.md, results.json
/// and results.svg to bench/ and the table into README.md's Benchmarks section.
/// Exits non-zero when a path did not move the bytes it should, never for speed.
///
/// Example: cargo xtask bench
///
/// Example: cargo xtask bench --quick    (the CI smoke test: small sizes, one repetition)
#[derive(clap::Args)]
pub struct Options {
    /// Small sizes and one repetition: checks that every path works, in well under a
    /// minute; results go to target/bench-quick/ unless --out says otherwise
    #[arg(long)]
    quick: bool,
    /// Repetitions of every path (default: 5, or 1 with --quick)
    #[arg(long, value_name = "N")]
    reps: Option<usize>,
    /// Where to write results.{md,json,svg} (default: bench/, or target/bench-quick/
    /// with --quick); README.md is updated only for a full run into bench/
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// kgate's `queue_limit` (e.g. "64MiB"): bytes one direction of a spliced
    /// connection may queue in the kernel before kgate takes over (default: kgate's)
    #[arg(long, value_name = "SIZE")]
    queue_limit: Option<String>,
    /// The gateway namespace's net.ipv4.tcp_wmem, "MIN DEFAULT MAX" in bytes: the send
    /// buffers of the proxies' sockets (e.g. "4096 8388608 16777216")
    #[arg(long, value_name = "WMEM")]
    gateway_tcp_wmem: Option<String>,
    /// Only these paths (repeatable): direct, kgate_sockmap, kgate_packet, kgate_userspace, haproxy
    #[arg(long = "path", value_name = "PATH", value_parser = parse_path)]
    paths: Vec<Path>,
    /// Only these workloads (repeatable): scale, bulk_1_stream, bulk_8_streams,
    /// request_response, short_sessions
    #[arg(long = "workload", value_name = "WORKLOAD", value_parser = parse_workload)]
    workloads: Vec<Workload>,
}

fn parse_path(name: &str) -> Result<Path, String> {
    Path::ALL
        .into_iter()
        .find(|p| p.key() == name)
        .ok_or_else(|| {
            format!("no path {name:?}: one of direct, kgate_sockmap, kgate_packet, kgate_userspace, haproxy")
        })
}

fn parse_workload(name: &str) -> Result<Workload, String> {
    Workload::ALL
        .into_iter()
        .find(|w| w.key() == name)
        .ok_or_else(|| {
            format!(
                "no workload {name:?}: one of scale, bulk_1_stream, bulk_8_streams, \
             request_response, short_sessions"
            )
        })
}

/// The open-file limit asked for this process and so for the proxies it starts.
const OPEN_FILES: u64 = 1 << 16;
/// A quick run's sockets give up on a stalled read or write after this.
const QUICK_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Open files a proxy (or this process) needs besides the scale test's sockets:
/// listeners, maps, pipes, HAProxy's splice pipes (`maxpipes`).
const FD_RESERVE: u64 = 1_000;

/// The most connections the scale test can hold under an open-file limit of `limit`:
/// a proxy holds two sockets per connection, and this process one for the client and
/// one for the backend. Rounded down to 500.
fn scale_fit(limit: u64) -> usize {
    let fit = limit.saturating_sub(FD_RESERVE) / 2;
    usize::try_from(fit / 500 * 500).unwrap_or(usize::MAX)
}

/// How much each workload does.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    /// kgate's `queue_limit`, when not its default.
    pub queue_limit: Option<String>,
    /// The gateway's net.ipv4.tcp_wmem, when not the kernel's default.
    pub gateway_tcp_wmem: Option<String>,
    pub paths: Vec<Path>,
    pub workloads: Vec<Workload>,
    pub reps: usize,
    /// Bytes each way in one bulk run, shared by its streams.
    pub bulk_bytes: u64,
    pub rr_warmup: u64,
    pub rr_rounds: u64,
    pub sessions: usize,
    pub session_threads: usize,
    pub scale_connections: usize,
    /// What the scale test was asked to hold, when the open-file limit allowed fewer.
    pub scale_asked: Option<usize>,
}

impl Settings {
    fn new(options: &Options) -> Settings {
        let (quick, reps) = (options.quick, options.reps);
        let paths = if options.paths.is_empty() {
            Path::ALL.to_vec()
        } else {
            Path::ALL
                .into_iter()
                .filter(|p| options.paths.contains(p))
                .collect()
        };
        let workloads = if options.workloads.is_empty() {
            Workload::ALL.to_vec()
        } else {
            Workload::ALL
                .into_iter()
                .filter(|w| options.workloads.contains(w))
                .collect()
        };
        if quick {
            Settings {
                quick,
                queue_limit: options.queue_limit.clone(),
                gateway_tcp_wmem: options.gateway_tcp_wmem.clone(),
                paths,
                workloads,
                reps: reps.unwrap_or(1),
                bulk_bytes: 64 << 20,
                rr_warmup: 100,
                rr_rounds: 1_000,
                sessions: 200,
                session_threads: 4,
                scale_connections: 500,
                scale_asked: None,
            }
        } else {
            Settings {
                quick,
                queue_limit: options.queue_limit.clone(),
                gateway_tcp_wmem: options.gateway_tcp_wmem.clone(),
                paths,
                workloads,
                reps: reps.unwrap_or(5),
                bulk_bytes: 2 << 30,
                rr_warmup: 1_000,
                rr_rounds: 20_000,
                sessions: 5_000,
                session_threads: 4,
                scale_connections: 10_000,
                scale_asked: None,
            }
        }
    }
}

/// The workloads, in the order each path runs them. Scale comes first, so that the
/// proxy's memory is measured from a fresh start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Scale,
    Bulk1,
    Bulk8,
    Latency,
    Sessions,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Scale,
        Workload::Bulk1,
        Workload::Bulk8,
        Workload::Latency,
        Workload::Sessions,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Workload::Scale => "scale",
            Workload::Bulk1 => "bulk_1_stream",
            Workload::Bulk8 => "bulk_8_streams",
            Workload::Latency => "request_response",
            Workload::Sessions => "short_sessions",
        }
    }

    pub fn title(self, settings: &Settings) -> String {
        match self {
            Workload::Scale => match settings.scale_asked {
                None => format!(
                    "Scale: {} connections held open",
                    thousands(settings.scale_connections as u64)
                ),
                Some(asked) => format!(
                    "Scale: {} connections held open ({} asked: the open-file limit here \
                     cannot be raised, and a proxy holds two sockets per connection)",
                    thousands(settings.scale_connections as u64),
                    thousands(asked as u64)
                ),
            },
            Workload::Bulk1 => format!(
                "Bulk, 1 stream, {} each way at once",
                bytes(settings.bulk_bytes)
            ),
            Workload::Bulk8 => format!(
                "Bulk, 8 streams, {} each way at once in all",
                bytes(settings.bulk_bytes)
            ),
            Workload::Latency => format!(
                "Request/response: 64-byte ping-pong, {} round trips on one connection",
                thousands(settings.rr_rounds)
            ),
            Workload::Sessions => format!(
                "Short sessions (banner, QUIT, 221, close): {} sessions from {} client threads",
                thousands(settings.sessions as u64),
                settings.session_threads
            ),
        }
    }
}

/// One number a run produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Figure {
    Bulk1Gbps,
    Bulk1Cpu,
    Bulk8Gbps,
    Bulk8Cpu,
    RrP50,
    RrP99,
    RrP999,
    SessRate,
    SessP99,
    ScaleProxyRss,
    ScaleKernel,
    ScaleMemAvailable,
    ScaleTcpMem,
}

impl Figure {
    pub const ALL: [Figure; 13] = [
        Figure::Bulk1Gbps,
        Figure::Bulk1Cpu,
        Figure::Bulk8Gbps,
        Figure::Bulk8Cpu,
        Figure::RrP50,
        Figure::RrP99,
        Figure::RrP999,
        Figure::SessRate,
        Figure::SessP99,
        Figure::ScaleProxyRss,
        Figure::ScaleKernel,
        Figure::ScaleMemAvailable,
        Figure::ScaleTcpMem,
    ];

    /// Name in the JSON (the unit is part of it).
    pub fn key(self) -> &'static str {
        match self {
            Figure::Bulk1Gbps => "bulk_1_stream_gbit_per_s",
            Figure::Bulk1Cpu => "bulk_1_stream_cpu_s_per_gib",
            Figure::Bulk8Gbps => "bulk_8_streams_gbit_per_s",
            Figure::Bulk8Cpu => "bulk_8_streams_cpu_s_per_gib",
            Figure::RrP50 => "rr_p50_us",
            Figure::RrP99 => "rr_p99_us",
            Figure::RrP999 => "rr_p99_9_us",
            Figure::SessRate => "sessions_per_s",
            Figure::SessP99 => "session_p99_ms",
            Figure::ScaleProxyRss => "proxy_rss_bytes_per_connection",
            Figure::ScaleKernel => "kernel_slab_kib_per_connection",
            Figure::ScaleMemAvailable => "mem_available_drop_kib_per_connection",
            Figure::ScaleTcpMem => "tcp_buffer_bytes_per_connection",
        }
    }

    /// Column heading in the tables.
    pub fn label(self) -> &'static str {
        match self {
            Figure::Bulk1Gbps | Figure::Bulk8Gbps => "Gbit/s",
            Figure::Bulk1Cpu | Figure::Bulk8Cpu => "CPU s/GiB",
            Figure::RrP50 => "p50 µs",
            Figure::RrP99 => "p99 µs",
            Figure::RrP999 => "p99.9 µs",
            Figure::SessRate => "sessions/s",
            Figure::SessP99 => "p99 ms/session",
            Figure::ScaleProxyRss => "proxy RSS B/conn",
            Figure::ScaleKernel => "kernel slab KiB/conn",
            Figure::ScaleMemAvailable => "MemAvailable drop KiB/conn",
            Figure::ScaleTcpMem => "TCP buffers B/conn",
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Figure::Bulk1Gbps | Figure::Bulk8Gbps | Figure::SessRate
        )
    }

    pub fn workload(self) -> Workload {
        match self {
            Figure::Bulk1Gbps | Figure::Bulk1Cpu => Workload::Bulk1,
            Figure::Bulk8Gbps | Figure::Bulk8Cpu => Workload::Bulk8,
            Figure::RrP50 | Figure::RrP99 | Figure::RrP999 => Workload::Latency,
            Figure::SessRate | Figure::SessP99 => Workload::Sessions,
            Figure::ScaleProxyRss
            | Figure::ScaleKernel
            | Figure::ScaleMemAvailable
            | Figure::ScaleTcpMem => Workload::Scale,
        }
    }
}

/// What one workload run measured.
pub struct Outcome {
    pub figures: Vec<(Figure, f64)>,
    /// Raw numbers behind the figures, for the JSON.
    pub details: serde_json::Value,
}

/// One workload on one path in one repetition.
pub struct Record {
    pub rep: usize,
    pub path: Path,
    pub workload: Workload,
    pub seconds: f64,
    pub outcome: Result<Outcome, String>,
}

/// Ports and TIME_WAIT: the scale test opens 10,000 connections per run and the
/// session test thousands, all to one address. A wide port range and reuse of
/// TIME_WAIT ports for new outgoing connections (client and gateway, which connects
/// to the backend) keep repetitions from running out of ports; a long accept backlog
/// takes the bursts. All of it is per namespace: the lab's own, nothing else's.
fn tune_lab(lab: &Lab, settings: &Settings) -> anyhow::Result<()> {
    let outgoing = [
        ("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000"),
        ("/proc/sys/net/ipv4/tcp_tw_reuse", "1"),
        ("/proc/sys/net/core/somaxconn", "8192"),
    ];
    sys::set_sysctls(lab.client(), &outgoing)?;
    sys::set_sysctls(lab.gateway(), &outgoing)?;
    sys::set_sysctls(lab.backend(0), &[("/proc/sys/net/core/somaxconn", "8192")])?;
    if let Some(wmem) = &settings.gateway_tcp_wmem {
        sys::set_sysctls(lab.gateway(), &[("/proc/sys/net/ipv4/tcp_wmem", wmem)])?;
    }
    Ok(())
}

pub fn run(options: Options) -> anyhow::Result<ExitCode> {
    if !lab::is_root() {
        bail!(
            "the benchmark creates network namespaces and loads eBPF programs, which needs \
             root: run `cargo xtask bench` as root"
        );
    }
    // kgate logs a line per connection at info; HAProxy here logs nothing. Both stay
    // quiet per connection, so that neither pays for logging the other does not do.
    if env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread of this process runs yet (nothing has started one).
        unsafe { env::set_var("RUST_LOG", "info,kgate::conn=warn") };
    }
    let started = Instant::now();
    let mut settings = Settings::new(&options);
    if settings.reps == 0 {
        bail!("--reps must be at least 1");
    }

    let env = setup::toolchain()?;
    setup::debian_packages(NotRoot::Stop)?;
    let bin = build::kgate(&env, true)?;
    let default_out = if settings.quick {
        env.target_dir.join("bench-quick")
    } else {
        env.root.join("bench")
    };
    let out = options.out.clone().unwrap_or_else(|| default_out.clone());
    let open_files = sys::raise_open_files(OPEN_FILES)?;
    let fit = scale_fit(open_files);
    if fit < settings.scale_connections {
        println!(
            "bench: the open-file limit is {open_files} and cannot be raised here (raising \
             the hard limit needs CAP_SYS_RESOURCE): the scale test holds {} connections, \
             not {}",
            thousands(fit as u64),
            thousands(settings.scale_connections as u64)
        );
        settings.scale_asked = Some(settings.scale_connections);
        settings.scale_connections = fit;
    }
    let machine = sys::Machine::read();
    let date = sys::utc_now();
    let load_before = sys::loadavg();
    println!(
        "bench: {} on {}; HAProxy {}; open-file limit {open_files}; load average {load_before}",
        if settings.quick {
            "quick run"
        } else {
            "full run"
        },
        machine.summary(),
        machine.haproxy
    );

    if settings.quick {
        server::set_io_timeout(QUICK_IO_TIMEOUT);
    }
    let mut records = Vec::new();
    let mut failures = Vec::new();
    let previous_hook = panic::take_hook();
    panic::set_hook(Box::new(|info| eprintln!("bench: {info}")));
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        bench(&bin, &settings, &mut records, &mut failures)
    }));
    panic::set_hook(previous_hook);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failures.push(format!("{e:#}")),
        Err(_) => failures.push("the benchmark stopped on the panic above".into()),
    }
    for record in &records {
        if let Err(e) = &record.outcome {
            failures.push(format!(
                "rep {} {} {}: {e}",
                record.rep + 1,
                record.path.label(),
                record.workload.key()
            ));
        }
    }

    let context = report::Context {
        date,
        machine,
        settings: settings.clone(),
        load_before,
        load_after: sys::loadavg(),
        duration_s: started.elapsed().as_secs_f64(),
        failures: failures.clone(),
    };
    let summary = report::Summary::new(&records);
    let targets = report::targets(&summary, &settings.paths);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let markdown = report::markdown(&context, &summary, &targets, "results.svg");
    write(&out.join("results.md"), &markdown)?;
    write(
        &out.join("results.json"),
        &serde_json::to_string_pretty(&report::json(
            &context, &records, &summary, &targets, &failures,
        ))?,
    )?;
    chart::draw(&out.join("results.svg"), &context, &summary)?;
    println!("\n{markdown}");
    let shown = |p: &FsPath| sys::relative(p, &env.root).display().to_string();
    println!(
        "bench: wrote {}, results.json and results.svg in {:.0} s",
        shown(&out.join("results.md")),
        context.duration_s
    );
    let everything = settings.paths.len() == Path::ALL.len()
        && settings.workloads.len() == Workload::ALL.len()
        && settings.queue_limit.is_none()
        && settings.gateway_tcp_wmem.is_none();
    if !settings.quick && everything && out == default_out {
        let readme = env.root.join("README.md");
        report::update_readme(&readme, &report::readme_block(&context, &summary, &targets))?;
        println!(
            "bench: updated the Benchmarks section of {}",
            shown(&readme)
        );
    }

    if failures.is_empty() {
        println!(
            "bench: ok: every path moved exactly the bytes it should ({} runs)",
            records.len()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nbench: FAILED:");
        for failure in &failures {
            println!("  - {failure}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn write(path: &FsPath, text: &str) -> anyhow::Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The lab and the runs. Errors are for a lab that could not run at all; a run that
/// failed its checks is a record with an error.
fn bench(
    bin: &FsPath,
    settings: &Settings,
    records: &mut Vec<Record>,
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let lab = Lab::new(1);
    tune_lab(&lab, settings)?;
    let pattern = Arc::new(bulk::Pattern::new());
    for rep in 0..settings.reps {
        let paths = &settings.paths;
        for k in 0..paths.len() {
            let path = paths[(rep + k) % paths.len()];
            let haproxy_maxconn = settings.scale_connections + 100;
            let running = match Running::start(path, &lab, bin, settings, haproxy_maxconn) {
                Ok(running) => running,
                Err(e) => {
                    failures.push(format!("rep {} {}: {e:#}", rep + 1, path.label()));
                    continue;
                }
            };
            for &workload in &settings.workloads {
                let started = Instant::now();
                let outcome = run_workload(workload, &lab, &running, &pattern, settings)
                    .map_err(|e| format!("{e:#}"));
                let record = Record {
                    rep,
                    path,
                    workload,
                    seconds: started.elapsed().as_secs_f64(),
                    outcome,
                };
                println!("{}", report::progress_line(&record, settings));
                records.push(record);
            }
            if let Err(e) = running.stop() {
                failures.push(format!("rep {} {}: {e:#}", rep + 1, path.label()));
            }
        }
    }
    drop(lab);
    if records.is_empty() {
        return Err(anyhow!("no run completed"));
    }
    Ok(())
}

fn run_workload(
    workload: Workload,
    lab: &Lab,
    running: &Running,
    pattern: &Arc<bulk::Pattern>,
    settings: &Settings,
) -> anyhow::Result<Outcome> {
    match workload {
        Workload::Scale => scale::run(lab, running, settings.scale_connections),
        Workload::Bulk1 => bulk::run(lab, running, pattern, 1, settings.bulk_bytes),
        Workload::Bulk8 => bulk::run(lab, running, pattern, 8, settings.bulk_bytes),
        Workload::Latency => latency::run(lab, running, settings.rr_warmup, settings.rr_rounds),
        Workload::Sessions => {
            sessions::run(lab, running, settings.sessions, settings.session_threads)
        }
    }
}

/// `10,000`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `2 GiB`, `64 MiB`.
pub fn bytes(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{} GiB", n >> 30)
    } else {
        format!("{} MiB", n >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_like_the_issue_writes_them() {
        assert_eq!(thousands(10_000), "10,000");
        assert_eq!(thousands(200), "200");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(bytes(2 << 30), "2 GiB");
        assert_eq!(bytes(64 << 20), "64 MiB");
    }

    #[test]
    fn the_scale_test_fits_the_open_file_limit() {
        assert_eq!(scale_fit(20_000), 9_500);
        assert_eq!(scale_fit(1 << 16), 32_000);
        assert_eq!(scale_fit(500), 0);
    }

    #[test]
    fn every_figure_belongs_to_a_workload_and_has_a_unique_key() {
        let mut keys: Vec<&str> = Figure::ALL.iter().map(|f| f.key()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), Figure::ALL.len());
        for workload in Workload::ALL {
            assert!(Figure::ALL.iter().any(|f| f.workload() == workload));
        }
    }
}
