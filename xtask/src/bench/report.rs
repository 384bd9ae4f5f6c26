//! From runs to what a person reads: medians with min and max per figure and path,
//! ratios to direct and to HAProxy, the targets met or missed, as Markdown (results.md
//! and the README's Benchmarks section) and as JSON (every run's raw numbers).

use std::{collections::HashMap, fmt::Write as _, fs, path::Path as FsPath};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Figure, Record, Settings, Workload, proxy::Path, sys::Machine};

/// Where the README's generated section starts and ends.
const README_START: &str = "<!-- bench:start (written by `cargo xtask bench`) -->";
const README_END: &str = "<!-- bench:end -->";

/// What the report says about the run as a whole.
pub struct Context {
    pub date: String,
    pub machine: Machine,
    pub settings: Settings,
    pub load_before: String,
    pub load_after: String,
    pub duration_s: f64,
    /// Runs and proxies that failed their checks.
    pub failures: Vec<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stat {
    fn of(values: &mut [f64]) -> Option<Stat> {
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: values[0],
            max: values[n - 1],
            runs: n,
        })
    }
}

/// Every figure's statistics per path, over the runs that passed their checks.
pub struct Summary {
    stats: HashMap<(Figure, Path), Stat>,
    /// Per workload and kgate path, the share of the measured bytes that the kernel
    /// moved (spliced on sockmap, forwarded at TC on packet; kgate copied the rest),
    /// in percent.
    kernel_share: HashMap<(Workload, Path), Stat>,
}

/// The details key of the bytes the kernel moved for kgate on `path`, if it does.
fn kernel_bytes_key(path: Path) -> Option<&'static str> {
    match path {
        Path::Sockmap => Some("spliced_bytes"),
        Path::Packet => Some("forwarded_bytes"),
        _ => None,
    }
}

impl Summary {
    pub fn new(records: &[Record]) -> Summary {
        let mut values: HashMap<(Figure, Path), Vec<f64>> = HashMap::new();
        for record in records {
            if let Ok(outcome) = &record.outcome {
                for &(figure, value) in &outcome.figures {
                    values.entry((figure, record.path)).or_default().push(value);
                }
            }
        }
        let stats = values
            .into_iter()
            .filter_map(|(key, mut v)| Stat::of(&mut v).map(|s| (key, s)))
            .collect();
        let mut shares: HashMap<(Workload, Path), Vec<f64>> = HashMap::new();
        for record in records {
            let (Ok(outcome), Some(key)) = (&record.outcome, kernel_bytes_key(record.path)) else {
                continue;
            };
            let bytes = |key: &str| outcome.details.get(key).and_then(|v| v.as_f64());
            if let (Some(moved), Some(total)) = (bytes(key), bytes("bytes_total"))
                && total > 0.0
            {
                shares
                    .entry((record.workload, record.path))
                    .or_default()
                    .push(100.0 * moved / total);
            }
        }
        let kernel_share = shares
            .into_iter()
            .filter_map(|(key, mut v)| Stat::of(&mut v).map(|s| (key, s)))
            .collect();
        Summary {
            stats,
            kernel_share,
        }
    }

    pub fn get(&self, figure: Figure, path: Path) -> Option<Stat> {
        self.stats.get(&(figure, path)).copied()
    }

    fn median(&self, figure: Figure, path: Path) -> Option<f64> {
        self.get(figure, path).map(|s| s.median)
    }

    /// `path`'s median over `reference`'s.
    fn ratio(&self, figure: Figure, path: Path, reference: Path) -> Option<f64> {
        let (a, b) = (self.median(figure, path)?, self.median(figure, reference)?);
        (b != 0.0).then(|| a / b)
    }
}

/// One of the targets, as measured.
pub struct Target {
    pub goal: String,
    /// None when a figure it needs is missing (its workload or path was left out, or
    /// a run failed).
    pub met: Option<bool>,
    pub detail: String,
}

/// The targets, for each kgate path that carries connections in the kernel.
pub type Targets = Vec<(Path, Vec<Target>)>;

/// The issues' targets for each of kgate's kernel paths among `paths`.
pub fn targets(summary: &Summary, paths: &[Path]) -> Targets {
    [Path::Sockmap, Path::Packet]
        .into_iter()
        .filter(|path| paths.contains(path))
        .map(|path| (path, targets_of(summary, path)))
        .collect()
}

fn targets_of(summary: &Summary, path: Path) -> Vec<Target> {
    let name = path.label().trim_start_matches("kgate ");
    let mut out = Vec::new();
    for (gbps, streams) in [
        (Figure::Bulk1Gbps, "1 stream"),
        (Figure::Bulk8Gbps, "8 streams"),
    ] {
        out.push(ratio_target(
            summary,
            path,
            format!("{name} throughput ≥ 1.5× HAProxy's ({streams})"),
            gbps,
            Path::Haproxy,
            |r| r >= 1.5,
        ));
        out.push(ratio_target(
            summary,
            path,
            format!("{name} throughput ≥ 0.8× direct ({streams})"),
            gbps,
            Path::Direct,
            |r| r >= 0.8,
        ));
    }
    for (cpu, streams) in [
        (Figure::Bulk1Cpu, "1 stream"),
        (Figure::Bulk8Cpu, "8 streams"),
    ] {
        out.push(ratio_target(
            summary,
            path,
            format!("{name} CPU per GiB ≤ 0.6× HAProxy's ({streams})"),
            cpu,
            Path::Haproxy,
            |r| r <= 0.6,
        ));
    }
    let p99 = |p| summary.median(Figure::RrP99, p);
    out.push(match (p99(path), p99(Path::Haproxy), p99(Path::Direct)) {
        (Some(k), Some(h), Some(d)) => {
            let (added_k, added_h) = (k - d, h - d);
            Target {
                goal: "added p99 latency over direct ≤ half of HAProxy's".into(),
                met: Some(added_k <= 0.5 * added_h),
                detail: format!(
                    "{name} adds {} µs, HAProxy {} µs to direct's p99 of {} µs",
                    num(added_k),
                    num(added_h),
                    num(d)
                ),
            }
        }
        _ => missing("added p99 latency over direct ≤ half of HAProxy's"),
    });
    out.push(ratio_target(
        summary,
        path,
        "short sessions per second ≥ 1.2× HAProxy's".into(),
        Figure::SessRate,
        Path::Haproxy,
        |r| r >= 1.2,
    ));
    out.push(match summary.median(Figure::ScaleProxyRss, path) {
        Some(bytes) => Target {
            goal: "kgate's memory per held connection < 1 KiB".into(),
            met: Some(bytes < 1024.0),
            detail: format!(
                "{} B per connection (VmRSS growth over the held connections)",
                num(bytes)
            ),
        },
        None => missing("kgate's memory per held connection < 1 KiB"),
    });
    out
}

fn ratio_target(
    summary: &Summary,
    path: Path,
    goal: String,
    figure: Figure,
    reference: Path,
    holds: impl Fn(f64) -> bool,
) -> Target {
    match (
        summary.median(figure, path),
        summary.median(figure, reference),
        summary.ratio(figure, path, reference),
    ) {
        (Some(a), Some(b), Some(r)) => Target {
            goal,
            met: Some(holds(r)),
            detail: format!(
                "{} against {} {}: {}×",
                num(a),
                num(b),
                figure.label(),
                ratio(r)
            ),
        },
        _ => missing(&goal),
    }
}

fn missing(goal: &str) -> Target {
    Target {
        goal: goal.into(),
        met: None,
        detail: "not measured (left out by --path or --workload, or a run failed)".into(),
    }
}

/// A figure with 3 significant digits or so.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(r: f64) -> String {
    format!("{r:.2}")
}

/// The line printed after each run.
pub fn progress_line(record: &Record, settings: &Settings) -> String {
    let head = format!(
        "[rep {}/{}] {:<15} {:<16}",
        record.rep + 1,
        settings.reps,
        record.path.label(),
        record.workload.key()
    );
    match &record.outcome {
        Ok(outcome) => {
            let figures: Vec<String> = outcome
                .figures
                .iter()
                .map(|(f, v)| format!("{} {}", num(*v), f.label()))
                .collect();
            format!("{head} {}  ({:.1} s)", figures.join(", "), record.seconds)
        }
        Err(e) => format!("{head} FAILED: {e}"),
    }
}

/// The tables, the targets and the notes, as Markdown; `image` is the chart's path
/// relative to where the text will live.
fn body(context: &Context, summary: &Summary, targets: &Targets, image: &str) -> String {
    let s = &context.settings;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured {} on {}; HAProxy {}. `cargo xtask bench{}`: {} repetition{} of every \
         path, interleaved; medians, with the smallest and largest run in brackets. \
         Load average {} before, {} after; {:.0} s in all.\n",
        context.date,
        context.machine.summary(),
        context.machine.haproxy,
        if s.quick { " --quick" } else { "" },
        s.reps,
        if s.reps == 1 { "" } else { "s" },
        context.load_before,
        context.load_after,
        context.duration_s,
    );
    let _ = writeln!(
        md,
        "![kgate, HAProxy and the direct path: throughput, CPU per GiB, latency, \
         sessions per second, memory per connection]({image})\n"
    );
    for (path, targets) in targets {
        let _ = writeln!(
            md,
            "| target ({}) | result | measured |\n|---|---|---|",
            path.label()
        );
        for t in targets {
            let result = match t.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(md, "| {} | {result} | {} |", t.goal, t.detail);
        }
        md.push('\n');
    }

    for &workload in &s.workloads {
        let figures: Vec<Figure> = Figure::ALL
            .iter()
            .copied()
            .filter(|f| f.workload() == workload)
            .collect();
        let _ = writeln!(md, "**{}**\n", workload.title(s));
        md.push_str("| path |");
        for f in &figures {
            let _ = write!(md, " {} | ÷ direct | ÷ HAProxy |", f.label());
        }
        md.push_str("\n|---|");
        for _ in &figures {
            md.push_str("---:|---:|---:|");
        }
        md.push('\n');
        for &path in &s.paths {
            let _ = write!(md, "| {} |", path.label());
            for &f in &figures {
                match summary.get(f, path) {
                    Some(stat) => {
                        let _ = write!(
                            md,
                            " {} ({}–{}){} |",
                            num(stat.median),
                            num(stat.min),
                            num(stat.max),
                            if stat.runs < s.reps {
                                format!(", {} of {} runs", stat.runs, s.reps)
                            } else {
                                String::new()
                            }
                        );
                    }
                    None => md.push_str(" – |"),
                }
                for reference in [Path::Direct, Path::Haproxy] {
                    match summary.ratio(f, path, reference) {
                        Some(r) if path != reference => {
                            let _ = write!(md, " {}× |", ratio(r));
                        }
                        _ => md.push_str(" |"),
                    }
                }
            }
            md.push('\n');
        }
        if let Some(share) = summary.kernel_share.get(&(workload, Path::Sockmap)) {
            let why_copied = match workload {
                Workload::Bulk1 | Workload::Bulk8 => ", passed to it at the queue bound",
                _ => "",
            };
            let _ = writeln!(
                md,
                "\nkgate sockmap spliced {} % of these bytes in the kernel ({}–{} %); kgate \
                 copied the rest{why_copied}.",
                num(share.median),
                num(share.min),
                num(share.max)
            );
        }
        if let Some(share) = summary.kernel_share.get(&(workload, Path::Packet)) {
            let _ = writeln!(
                md,
                "\nkgate packet forwarded {} % of these bytes at TC ({}–{} %; \
                 retransmissions count again); kgate copied the rest, before the handoff.",
                num(share.median),
                num(share.min),
                num(share.max)
            );
        }
        md.push('\n');
    }

    let _ = writeln!(
        md,
        "How it is measured: one lab of network namespaces (client — veth — gateway — \
         veth — backend); \"direct\" is the client connecting to the backend's address, \
         routed by the gateway's kernel with no proxy, the physical limit of this lab. \
         kgate (release build, default settings, `queue_limit` {}) and HAProxy (`mode \
         tcp`, `send-proxy-v2`, `option splice-auto`, `maxconn` above the scale test's \
         connections, defaults otherwise) run in the \
         gateway (whose `net.ipv4.tcp_wmem` is {}), each started afresh for each repetition, neither logging per connection; \
         the backend reads and checks the PROXY header on their paths. CPU s/GiB is the \
         whole machine's busy time (user, nice, system, irq, softirq from /proc/stat) per \
         GiB moved, both directions counted, and includes the benchmark's own client and \
         server, the same on every path. Bulk runs move both directions at once, and every \
         byte is checked. Latency is per round trip (HDR histogram), a persistent \
         connection's steady state: the first {} round trips and at least {} s are left \
         out on every path, past the first second in which kgate copies a connection \
         (`splice_after`'s default) before splicing it. Memory: proxy RSS is the growth \
         of the proxy's VmRSS over the held connections; the kernel's memory covers all of a connection's sockets (2 on the \
         direct path, 4 through a proxy): the growth of the slab, steady from run to run, \
         and the drop of MemAvailable less the growth of the processes' own memory, which \
         takes in everything but moves by megabytes with the rest of the machine; TCP \
         buffers is sockstat's `mem`.",
        s.queue_limit.as_deref().unwrap_or("4 MiB, the default"),
        s.gateway_tcp_wmem.as_deref().map_or_else(
            || "the kernel's default".to_owned(),
            |w| format!("`{w}`, set for this run")
        ),
        super::thousands(s.rr_warmup),
        super::latency::WARMUP_AT_LEAST.as_secs_f64(),
    );
    if !context.failures.is_empty() {
        md.push_str(
            "\n**Failed checks.** These runs are left out of the medians (a cell says so \
             when fewer than all runs count):\n\n",
        );
        for failure in &context.failures {
            let first = failure.lines().next().unwrap_or_default();
            let short: String = first.chars().take(300).collect();
            let _ = writeln!(md, "- {short}");
        }
    }
    md
}

/// results.md.
pub fn markdown(context: &Context, summary: &Summary, targets: &Targets, image: &str) -> String {
    format!(
        "# kgate benchmarks\n\n{}",
        body(context, summary, targets, image)
    )
}

/// What goes between the README's markers.
pub fn readme_block(context: &Context, summary: &Summary, targets: &Targets) -> String {
    format!(
        "{README_START}\n{}\nRaw numbers of every run: [bench/results.json](bench/results.json).\n{README_END}",
        body(context, summary, targets, "bench/results.svg")
    )
}

/// Replaces the text between the README's markers with `block` (markers included).
pub fn update_readme(readme: &FsPath, block: &str) -> anyhow::Result<()> {
    let text =
        fs::read_to_string(readme).with_context(|| format!("reading {}", readme.display()))?;
    let (Some(start), Some(end)) = (text.find(README_START), text.find(README_END)) else {
        bail!(
            "{} has no `{README_START}` ... `{README_END}` markers: add them where the \
             benchmark table belongs (the results are in bench/results.md meanwhile)",
            readme.display()
        );
    };
    if end < start {
        bail!(
            "{}: the benchmark markers are out of order",
            readme.display()
        );
    }
    let updated = format!(
        "{}{block}{}",
        &text[..start],
        &text[end + README_END.len()..]
    );
    fs::write(readme, updated).with_context(|| format!("writing {}", readme.display()))
}

/// Everything, for results.json.
pub fn json(
    context: &Context,
    records: &[Record],
    summary: &Summary,
    targets: &Targets,
    failures: &[String],
) -> Value {
    let s = &context.settings;
    let runs: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut run = json!({
                "rep": r.rep + 1,
                "path": r.path.key(),
                "workload": r.workload.key(),
                "seconds": r.seconds,
            });
            match &r.outcome {
                Ok(outcome) => {
                    let figures: serde_json::Map<String, Value> = outcome
                        .figures
                        .iter()
                        .map(|(f, v)| (f.key().to_owned(), json!(v)))
                        .collect();
                    run["figures"] = Value::Object(figures);
                    run["details"] = outcome.details.clone();
                }
                Err(e) => run["error"] = json!(e),
            }
            run
        })
        .collect();
    let mut stats = serde_json::Map::new();
    for figure in Figure::ALL {
        let mut per_path = serde_json::Map::new();
        per_path.insert("label".into(), json!(figure.label()));
        per_path.insert("higher_is_better".into(), json!(figure.higher_is_better()));
        for path in Path::ALL {
            if let Some(stat) = summary.get(figure, path) {
                per_path.insert(
                    path.key().to_owned(),
                    json!({
                        "median": stat.median, "min": stat.min, "max": stat.max, "runs": stat.runs,
                        "ratio_to_direct": summary.ratio(figure, path, Path::Direct),
                        "ratio_to_haproxy": summary.ratio(figure, path, Path::Haproxy),
                    }),
                );
            }
        }
        stats.insert(figure.key().to_owned(), Value::Object(per_path));
    }
    json!({
        "date": context.date,
        "machine": {
            "cpu": context.machine.cpu,
            "cores": context.machine.cores,
            "kernel": context.machine.kernel,
            "memory_gib": context.machine.memory_gib,
            "haproxy": context.machine.haproxy,
        },
        "mode": if s.quick { "quick" } else { "full" },
        "settings": {
            "repetitions": s.reps,
            "kgate_queue_limit": s.queue_limit,
            "gateway_tcp_wmem": s.gateway_tcp_wmem,
            "paths": s.paths.iter().map(|p| p.key()).collect::<Vec<_>>(),
            "workloads": s.workloads.iter().map(|w| w.key()).collect::<Vec<_>>(),
            "scale_connections_asked": s.scale_asked,
            "bulk_bytes_each_way": s.bulk_bytes,
            "bulk_streams": [1, 8],
            "rr_message_bytes": 64,
            "rr_warmup_round_trips": s.rr_warmup,
            "rr_round_trips": s.rr_rounds,
            "sessions": s.sessions,
            "session_client_threads": s.session_threads,
            "scale_connections": s.scale_connections,
        },
        "load_average_before": context.load_before,
        "load_average_after": context.load_after,
        "duration_s": context.duration_s,
        "summary": stats,
        "targets": targets
            .iter()
            .map(|(path, targets)| {
                let targets: Vec<Value> = targets
                    .iter()
                    .map(|t| json!({ "goal": t.goal, "met": t.met, "detail": t.detail }))
                    .collect();
                (path.key().to_owned(), Value::Array(targets))
            })
            .collect::<serde_json::Map<_, _>>(),
        "failures": failures,
        "runs": runs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_share_comes_from_the_runs_of_each_path_that_report_it() {
        let run = |path, moved: u64, total: u64| Record {
            rep: 0,
            path,
            workload: Workload::Bulk1,
            seconds: 1.0,
            outcome: Ok(super::super::Outcome {
                figures: vec![],
                details: match path {
                    Path::Packet => json!({ "forwarded_bytes": moved, "bytes_total": total }),
                    _ => json!({ "spliced_bytes": moved, "bytes_total": total }),
                },
            }),
        };
        let summary = Summary::new(&[
            run(Path::Sockmap, 25, 100),
            run(Path::Sockmap, 100, 100),
            run(Path::Sockmap, 50, 100),
            Record {
                outcome: Err("failed".into()),
                ..run(Path::Sockmap, 0, 1)
            },
            run(Path::Packet, 99, 100),
            // Direct reports no kernel bytes of kgate's, whatever its details say.
            run(Path::Direct, 100, 100),
        ]);
        let share = summary.kernel_share[&(Workload::Bulk1, Path::Sockmap)];
        assert_eq!((share.median, share.min, share.max), (50.0, 25.0, 100.0));
        assert_eq!(
            summary.kernel_share[&(Workload::Bulk1, Path::Packet)].median,
            99.0
        );
        assert!(
            !summary
                .kernel_share
                .contains_key(&(Workload::Bulk1, Path::Direct))
        );
        assert!(
            !summary
                .kernel_share
                .contains_key(&(Workload::Bulk8, Path::Sockmap))
        );
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        let s = Stat::of(&mut [3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.runs), (2.0, 1.0, 3.0, 3));
        let s = Stat::of(&mut [4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Stat::of(&mut []).is_none());
    }

    #[test]
    fn the_readme_block_replaces_only_what_is_between_the_markers() {
        let dir = std::env::temp_dir().join(format!("kgate-bench-readme-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let readme = dir.join("README.md");
        fs::write(
            &readme,
            format!("# x\n\n## Benchmarks\n\n{README_START}\nold\n{README_END}\n\n## Next\n"),
        )
        .unwrap();
        update_readme(&readme, &format!("{README_START}\nnew\n{README_END}")).unwrap();
        let text = fs::read_to_string(&readme).unwrap();
        assert_eq!(
            text,
            format!("# x\n\n## Benchmarks\n\n{README_START}\nnew\n{README_END}\n\n## Next\n")
        );
        fs::write(&readme, "# no markers\n").unwrap();
        assert!(update_readme(&readme, "x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
