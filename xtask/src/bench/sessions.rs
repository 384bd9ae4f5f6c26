//! Short sessions as SMTP has them: connect, (the proxy's PROXY header), the server's
//! `220` banner, the client's `QUIT`, the server's `221`, the server closes. A few
//! client threads run the sessions back to back; the figures are sessions per second
//! and the 99th percentile of one session's time, connect to end of stream.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ::tests::lab::Lab;
use anyhow::{Context as _, anyhow, bail};
use hdrhistogram::Histogram;
use serde_json::json;

use super::{
    Figure, Outcome,
    proxy::Running,
    server::{self, Server},
};

const BANNER: &[u8] = b"220 ready\r\n";
const QUIT: &[u8] = b"QUIT\r\n";
const BYE: &[u8] = b"221 bye\r\n";
/// Backend threads: more than the client threads, so no session waits for one.
const SERVER_WORKERS: usize = 8;
const LOWEST_NS: u64 = 1_000;
const HIGHEST_NS: u64 = 60_000_000_000;

fn serve(mut conn: TcpStream) -> anyhow::Result<()> {
    conn.set_nodelay(true)?;
    conn.write_all(BANNER).context("writing the banner")?;
    let mut quit = [0u8; QUIT.len()];
    conn.read_exact(&mut quit).context("reading QUIT")?;
    if quit != QUIT {
        bail!("expected QUIT, got {:?}", String::from_utf8_lossy(&quit));
    }
    conn.write_all(BYE).context("writing 221")?;
    Ok(())
}

/// One session from the client's side.
fn session(target: std::net::SocketAddr) -> anyhow::Result<()> {
    let mut conn = server::connect(target)?;
    conn.set_nodelay(true)?;
    let mut banner = [0u8; BANNER.len()];
    conn.read_exact(&mut banner).context("reading the banner")?;
    if banner != BANNER {
        bail!("bad banner {:?}", String::from_utf8_lossy(&banner));
    }
    conn.write_all(QUIT).context("writing QUIT")?;
    let mut bye = [0u8; BYE.len()];
    conn.read_exact(&mut bye).context("reading 221")?;
    if bye != BYE {
        bail!("bad reply to QUIT {:?}", String::from_utf8_lossy(&bye));
    }
    let mut rest = [0u8; 16];
    match conn
        .read(&mut rest)
        .context("waiting for the server to close")?
    {
        0 => Ok(()),
        n => bail!(
            "{n} bytes after 221 ({:?})",
            String::from_utf8_lossy(&rest[..n])
        ),
    }
}

pub fn run(
    lab: &Lab,
    running: &Running,
    sessions: usize,
    threads: usize,
) -> anyhow::Result<Outcome> {
    let server = Server::start(
        lab.backend(0),
        running.backend,
        SERVER_WORKERS,
        running.header_source,
        Arc::new(serve),
    )?;
    let target = running.target;
    let (histogram, seconds) =
        lab.client()
            .run(move || -> anyhow::Result<(Histogram<u64>, f64)> {
                let started = Instant::now();
                let per_thread: Vec<usize> = (0..threads)
                    .map(|t| sessions / threads + usize::from(t < sessions % threads))
                    .collect();
                let histograms = thread::scope(|scope| {
                    let workers: Vec<_> = per_thread
                        .iter()
                        .map(|&count| {
                            scope.spawn(move || -> anyhow::Result<Histogram<u64>> {
                                let mut h =
                                    Histogram::<u64>::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3)?;
                                for n in 0..count {
                                    let begun = Instant::now();
                                    session(target).with_context(|| format!("session {n}"))?;
                                    let ns = u64::try_from(begun.elapsed().as_nanos())
                                        .unwrap_or(u64::MAX);
                                    h.saturating_record(ns.clamp(LOWEST_NS, HIGHEST_NS));
                                }
                                Ok(h)
                            })
                        })
                        .collect();
                    workers
                        .into_iter()
                        .map(|w| w.join().map_err(|_| anyhow!("a client thread panicked"))?)
                        .collect::<anyhow::Result<Vec<_>>>()
                })?;
                let seconds = started.elapsed().as_secs_f64();
                let mut all = Histogram::<u64>::new_with_bounds(LOWEST_NS, HIGHEST_NS, 3)?;
                for h in &histograms {
                    all.add(h).context("merging histograms")?;
                }
                Ok((all, seconds))
            })?;
    server.expect_served(sessions, Duration::from_secs(10))?;
    let rate = sessions as f64 / seconds;
    let p99_ms = histogram.value_at_quantile(0.99) as f64 / 1e6;
    Ok(Outcome {
        figures: vec![(Figure::SessRate, rate), (Figure::SessP99, p99_ms)],
        details: json!({
            "sessions": sessions,
            "client_threads": threads,
            "seconds": seconds,
            "p50_ms": histogram.value_at_quantile(0.5) as f64 / 1e6,
            "max_ms": histogram.max() as f64 / 1e6,
        }),
    })
}
