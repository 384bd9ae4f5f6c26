//! Bulk transfer: `streams` connections at once, each moving its share of the run's
//! bytes both ways at the same time (client to server and server to client). The
//! figures are the throughput of both directions together and the busy CPU time of
//! the whole machine per GiB moved.
//!
//! Every byte is checked: each direction of each stream is a window onto one long
//! pseudo-random pattern, at an offset of its own, and the receiver compares what it
//! gets with what it should get, and counts it. A byte lost, repeated, reordered or
//! carried to the wrong connection fails the run. The client's first 8 bytes name
//! the stream, so the server knows which window to expect and which to send.

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use ::tests::lab::Lab;
use anyhow::{Context as _, anyhow, bail};
use serde_json::json;

use super::{
    Figure, Outcome,
    proxy::{KernelBytes, Path, Running},
    server::{self, Server},
    sys::CpuTimes,
};

/// Length of the pattern that every stream is a window onto: odd and not a power of
/// two, so that no shift by a common buffer size lines it up with itself.
const PATTERN_LEN: usize = (1 << 20) + 7;
/// Largest read or write; at most `PATTERN_LEN`, so that a window is contiguous in the
/// doubled pattern.
const CHUNK: usize = 256 * 1024;
/// The stream number the client sends first.
const ID_LEN: usize = 8;
/// How long the server may finish after the client has (it reads the client's last
/// bytes after the client has read the server's).
const SERVER_GRACE: Duration = Duration::from_secs(30);

/// The pattern twice over, so that any window of up to `PATTERN_LEN` bytes is one slice.
pub struct Pattern(Vec<u8>);

impl Pattern {
    pub fn new() -> Pattern {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut bytes = Vec::with_capacity(2 * PATTERN_LEN);
        while bytes.len() < PATTERN_LEN {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            bytes.extend_from_slice(&state.to_le_bytes());
        }
        bytes.truncate(PATTERN_LEN);
        bytes.extend_from_within(..);
        Pattern(bytes)
    }

    /// `len` bytes of the stream that starts at `start`, from byte `at` of it on.
    fn window(&self, start: usize, at: u64, len: usize) -> &[u8] {
        debug_assert!(len <= PATTERN_LEN);
        let offset = (start as u64 + at) % PATTERN_LEN as u64;
        let offset = offset as usize;
        &self.0[offset..offset + len]
    }

    /// What `wrong` (received where byte `at` of the window at `start` belonged) is:
    /// bytes of the pattern from elsewhere (a repeat, a gap, another stream's bytes)
    /// or nothing sent at all.
    fn explain(&self, wrong: &[u8], start: usize, at: u64) -> String {
        const PROBE: usize = 32;
        if wrong.len() < PROBE {
            return "too few bytes left in the read to tell where they come from".into();
        }
        let probe = &wrong[..PROBE];
        let Some(found) = self.0[..PATTERN_LEN + PROBE]
            .windows(PROBE)
            .position(|w| w == probe)
        else {
            return "they are nowhere in the pattern".into();
        };
        let expected = (start as u64 + at) % PATTERN_LEN as u64;
        let shift = (found as i64 - expected as i64).rem_euclid(PATTERN_LEN as i64);
        let shift = if shift > PATTERN_LEN as i64 / 2 {
            shift - PATTERN_LEN as i64
        } else {
            shift
        };
        let streams: Vec<String> = (0..8u64)
            .flat_map(|i| [(i, true), (i, false)])
            .filter(|&(i, upload)| start_of(i, upload) == start)
            .map(|(i, upload)| format!("stream {i} {}", if upload { "up" } else { "down" }))
            .collect();
        format!(
            "the pattern at offset {found}, {shift:+} bytes from where this direction ({}) \
             was; a positive shift skips bytes, a negative one repeats them",
            streams.join(", ")
        )
    }
}

/// Where the window of `stream` starts, for one direction (distinct for every pair).
fn start_of(stream: u64, upload: bool) -> usize {
    let n = stream * 2 + u64::from(upload);
    ((n * 104_729 + 17) % PATTERN_LEN as u64) as usize
}

/// Writes `len` bytes of the window at `start`, then ends the direction with a FIN.
fn send(stream: &mut TcpStream, pattern: &Pattern, start: usize, len: u64) -> anyhow::Result<()> {
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(CHUNK as u64) as usize;
        stream
            .write_all(pattern.window(start, sent, n))
            .with_context(|| format!("writing after {sent} of {len} bytes"))?;
        sent += n as u64;
    }
    stream
        .shutdown(Shutdown::Write)
        .context("shutdown(SHUT_WR)")?;
    Ok(())
}

/// Reads to the end of the direction and checks that it was exactly `len` bytes of the
/// window at `start`.
fn receive(
    stream: &mut TcpStream,
    pattern: &Pattern,
    start: usize,
    len: u64,
) -> anyhow::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = stream
            .read(&mut buf)
            .with_context(|| format!("reading after {got} of {len} bytes"))?;
        if n == 0 {
            break;
        }
        if got + n as u64 > len {
            bail!("received more than the {len} bytes sent");
        }
        if buf[..n] != *pattern.window(start, got, n) {
            let bad = buf[..n]
                .iter()
                .zip(pattern.window(start, got, n))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let at = got + bad as u64;
            bail!(
                "byte {at} of {len} differs from what was sent ({})",
                pattern.explain(&buf[bad..n], start, at)
            );
        }
        got += n as u64;
    }
    if got != len {
        bail!("the stream ended after {got} of {len} bytes");
    }
    Ok(())
}

/// One bulk run over `running` with `streams` connections sharing `bytes_each_way`.
pub fn run(
    lab: &Lab,
    running: &Running,
    pattern: &Arc<Pattern>,
    streams: usize,
    bytes_each_way: u64,
) -> anyhow::Result<Outcome> {
    let per_stream = bytes_each_way / streams as u64;
    let streams_u64 = streams as u64;
    let done: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let handler = {
        let (pattern, done) = (pattern.clone(), done.clone());
        Arc::new(move |mut conn: TcpStream| -> anyhow::Result<()> {
            let mut id = [0u8; ID_LEN];
            conn.read_exact(&mut id)
                .context("reading the stream number")?;
            let i = u64::from_le_bytes(id);
            if i >= streams_u64 {
                bail!("stream number {i} out of range (garbled first bytes?)");
            }
            let mut writer = conn.try_clone()?;
            let p = pattern.clone();
            thread::scope(|scope| {
                let sending = scope.spawn(|| send(&mut writer, &p, start_of(i, false), per_stream));
                let received = receive(&mut conn, &pattern, start_of(i, true), per_stream - 8)
                    .context("server receiving");
                let sent = sending
                    .join()
                    .map_err(|_| anyhow!("the sending thread panicked"))?
                    .context("server sending");
                received.and(sent)
            })?;
            done.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
            Ok(())
        })
    };
    let server = Server::start(
        lab.backend(0),
        running.backend,
        streams,
        running.header_source,
        handler,
    )?;
    let kernel = running.kernel_bytes(lab);
    let kernel_before = kernel.as_ref().map(KernelBytes::read).transpose()?;
    let passed_before = match running.path {
        Path::Sockmap => kernel
            .as_ref()
            .map(|k| k.read_field("passed_bytes"))
            .transpose()?,
        _ => None,
    };

    let cpu_before = CpuTimes::now()?;
    let started = Instant::now();
    let target = running.target;
    let pattern_c = pattern.clone();
    let client_result = lab.client().run(move || -> anyhow::Result<()> {
        let pattern = pattern_c;
        thread::scope(|scope| {
            let clients: Vec<_> = (0..streams_u64)
                .map(|i| {
                    let pattern = &pattern;
                    scope.spawn(move || -> anyhow::Result<()> {
                        let mut conn = server::connect(target)?;
                        let mut writer = conn.try_clone()?;
                        thread::scope(|inner| {
                            let sending = inner.spawn(|| -> anyhow::Result<()> {
                                writer.write_all(&i.to_le_bytes())?;
                                send(&mut writer, pattern, start_of(i, true), per_stream - 8)
                            });
                            let received =
                                receive(&mut conn, pattern, start_of(i, false), per_stream)
                                    .context("client receiving");
                            let sent = sending
                                .join()
                                .map_err(|_| anyhow!("the sending thread panicked"))?
                                .context("client sending");
                            received.and(sent)
                        })
                        .with_context(|| format!("stream {i}"))
                    })
                })
                .collect();
            clients
                .into_iter()
                .map(|c| c.join().map_err(|_| anyhow!("a client thread panicked"))?)
                .collect::<anyhow::Result<Vec<()>>>()
                .map(drop)
        })
    });
    let client_done = Instant::now();
    let served = server.expect_served(streams, SERVER_GRACE);
    let cpu_after = CpuTimes::now()?;
    // Both sides' errors: the first to fail is often the backend, the client only
    // sees the reset that follows.
    match (client_result, served) {
        (Ok(()), Ok(())) => {}
        (Err(client), Ok(())) => return Err(client),
        (Ok(()), Err(server)) => return Err(server),
        (Err(client), Err(server)) => bail!("{client:#}; and {server:#}"),
    }
    let finished = done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .fold(client_done, Instant::max);
    let seconds = finished.duration_since(started).as_secs_f64();
    let total = 2 * per_stream * streams_u64;
    let gbps = total as f64 * 8.0 / seconds / 1e9;
    let cpu_per_gib =
        cpu_after.busy_seconds_since(&cpu_before) / (total as f64 / (1u64 << 30) as f64);

    let mut details = json!({
        "streams": streams,
        "bytes_each_way_per_stream": per_stream,
        "bytes_total": total,
        "seconds": seconds,
        "cpu_busy_seconds": cpu_after.busy_seconds_since(&cpu_before),
    });
    if let (Some(kernel), Some(before)) = (&kernel, kernel_before) {
        let moved = kernel.read()? - before;
        if moved == 0 {
            bail!(
                "kgate on the {} path moved no byte in the kernel ({} stayed 0)",
                running.path.label(),
                kernel.key
            );
        }
        details[kernel.key] = json!(moved);
        if let Some(before) = passed_before {
            details["passed_to_userspace_bytes"] =
                json!(kernel.read_field("passed_bytes")? - before);
        }
    }
    let (gbps_figure, cpu_figure) = if streams == 1 {
        (Figure::Bulk1Gbps, Figure::Bulk1Cpu)
    } else {
        (Figure::Bulk8Gbps, Figure::Bulk8Cpu)
    };
    Ok(Outcome {
        figures: vec![(gbps_figure, gbps), (cpu_figure, cpu_per_gib)],
        details,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_byte_is_explained_as_a_repeat_or_a_skip() {
        let pattern = Pattern::new();
        let start = start_of(0, true);
        let repeated = pattern.window(start, 900, 64);
        let said = pattern.explain(repeated, start, 1000);
        assert!(
            said.contains("-100 bytes") && said.contains("stream 0 up"),
            "{said}"
        );
        let skipped = pattern.window(start, 1100, 64);
        assert!(pattern.explain(skipped, start, 1000).contains("+100 bytes"));
        assert!(pattern.explain(&[0xAA; 64], start, 0).contains("nowhere"));
    }

    #[test]
    fn windows_are_contiguous_and_wrap_around_the_pattern() {
        let pattern = Pattern::new();
        let start = PATTERN_LEN - 3;
        let head = pattern.window(start, 0, 10).to_vec();
        assert_eq!(&head[3..], pattern.window(0, 0, 7));
        assert_eq!(pattern.window(start, 3, 7), &head[3..]);
    }

    #[test]
    fn every_stream_direction_starts_elsewhere() {
        let mut starts: Vec<usize> = (0..64)
            .flat_map(|i| [start_of(i, true), start_of(i, false)])
            .collect();
        starts.sort_unstable();
        starts.dedup();
        assert_eq!(starts.len(), 128);
    }
}
