//! Request/response: one persistent connection, 64-byte messages echoed by the
//! server one at a time; the time of each round trip goes into an HDR histogram.
//! Every echo is compared with what was sent.
//!
//! The figures are a persistent connection's steady state: the warm-up lasts at
//! least [`WARMUP_AT_LEAST`] on every path, past the first second in which kgate
//! copies a connection (`splice_after`'s default) before it splices it. On the
//! sockmap path the run reports how many of the measured bytes the kernel spliced.
//!
//! The client's thread is pinned to the first CPU and the server's to the last: on a
//! small virtual machine a round trip costs 5 µs when the scheduler happens to put
//! both ends on one CPU and 70 µs when it does not (measured here on 2 vCPUs, the
//! same path from one run to the next), which would drown what a proxy adds. Pinned,
//! every path pays the same two cross-CPU wakeups per round trip, and the proxy runs
//! where its scheduler puts it.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    time::{Duration, Instant},
};

use ::tests::lab::Lab;
use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use super::{
    Figure, Outcome,
    proxy::{KernelBytes, Running},
    server::{self, Server},
};

const MESSAGE: usize = 64;
/// The least time the warm-up takes, whatever its number of round trips: past
/// kgate's default `splice_after` of 1 s.
pub const WARMUP_AT_LEAST: Duration = Duration::from_millis(1500);
/// The histogram's range: 1 µs to 60 s, in nanoseconds, 3 significant digits.
const LOWEST_NS: u64 = 1_000;
const HIGHEST_NS: u64 = 60_000_000_000;

/// The message of round `round`: its number, then bytes that depend on it.
fn message(round: u64) -> [u8; MESSAGE] {
    let mut m = [0u8; MESSAGE];
    m[..8].copy_from_slice(&round.to_le_bytes());
    for (i, b) in m[8..].iter_mut().enumerate() {
        *b = (round as u8).wrapping_mul(31).wrapping_add(i as u8);
    }
    m
}

/// Echoes 64-byte messages until the client closes.
fn echo(mut conn: TcpStream) -> anyhow::Result<()> {
    pin_to_cpu(last_cpu());
    conn.set_nodelay(true)?;
    let mut buf = [0u8; MESSAGE];
    // Bounded by the client's rounds: it closes after the last one.
    loop {
        let n = conn.read(&mut buf).context("reading a request")?;
        if n == 0 {
            return Ok(());
        }
        conn.read_exact(&mut buf[n..])
            .context("reading the rest of a request")?;
        conn.write_all(&buf).context("writing a reply")?;
    }
}

/// What the client measured, and (on the sockmap and packet paths) the bytes the
/// kernel had moved for kgate when measuring began.
struct Measured {
    histogram: Histogram<u64>,
    warmup_rounds: u64,
    kernel_before: Option<u64>,
}

pub fn run(lab: &Lab, running: &Running, warmup: u64, rounds: u64) -> anyhow::Result<Outcome> {
    let server = Server::start(
        lab.backend(0),
        running.backend,
        1,
        running.header_source,
        Arc::new(echo),
    )?;
    let target = running.target;
    let kernel = running.kernel_bytes(lab);
    let kernel_at_start = kernel.clone();
    let Measured {
        histogram,
        warmup_rounds,
        kernel_before,
    } = lab.client().run(move || -> anyhow::Result<Measured> {
        let mut histogram = Histogram::<u64>::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3)
            .context("creating the histogram")?;
        pin_to_cpu(0);
        let mut conn = server::connect(target)?;
        conn.set_nodelay(true)?;
        let mut reply = [0u8; MESSAGE];
        let mut round_trip = |round: u64| -> anyhow::Result<Duration> {
            let request = message(round);
            let sent = Instant::now();
            conn.write_all(&request)
                .with_context(|| format!("writing request {round}"))?;
            conn.read_exact(&mut reply)
                .with_context(|| format!("reading reply {round}"))?;
            let took = sent.elapsed();
            if reply != request {
                bail!("reply {round} is not the request echoed");
            }
            Ok(took)
        };
        let warmup_started = Instant::now();
        let mut round = 0;
        // Bounded: the warm-up's time is fixed, and a round trip that stalls
        // fails the run on the connection's timeout.
        while round < warmup || warmup_started.elapsed() < WARMUP_AT_LEAST {
            round_trip(round)?;
            round += 1;
        }
        let warmup_rounds = round;
        let kernel_before = kernel_at_start
            .as_ref()
            .map(KernelBytes::read)
            .transpose()?;
        for round in warmup_rounds..warmup_rounds + rounds {
            let ns = u64::try_from(round_trip(round)?.as_nanos()).unwrap_or(u64::MAX);
            histogram.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
        }
        Ok(Measured {
            histogram,
            warmup_rounds,
            kernel_before,
        })
    })?;
    server.expect_served(1, Duration::from_secs(10))?;
    let mut details = json!({
        "round_trips": histogram.len(),
        "warmup_round_trips": warmup_rounds,
        "mean_us": histogram.mean() / 1000.0,
        "max_us": histogram.max() as f64 / 1000.0,
        // Both directions of the measured round trips.
        "bytes_total": 2 * MESSAGE as u64 * rounds,
    });
    if let (Some(kernel), Some(before)) = (&kernel, kernel_before) {
        details[kernel.key] = json!(kernel.read()? - before);
    }
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let (p50, p99, p999) = (us(0.5), us(0.99), us(0.999));
    Ok(Outcome {
        figures: vec![
            (Figure::RrP50, p50),
            (Figure::RrP99, p99),
            (Figure::RrP999, p999),
        ],
        details,
    })
}

/// The highest-numbered CPU this process may run on.
fn last_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get() - 1)
}

/// Pins the calling thread to `cpu`; a failure only costs steadiness, so it is printed
/// and the run goes on.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET and sched_setaffinity only read and
    // write the set, for the calling thread (pid 0).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        eprintln!(
            "bench: cannot pin a latency thread to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
}
