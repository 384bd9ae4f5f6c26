//! The benchmark's backend: a fixed pool of threads that accept on one listener in
//! the backend namespace and serve one connection at a time each. No thread is
//! started per connection, so the server costs the same small amount on every path,
//! and a thousand short sessions do not become a thousand thread starts.
//!
//! On the proxied paths every connection must open with a PROXY header naming the
//! lab's client; it is read (exactly, with the tests crate's reader) and checked
//! before the workload's handler sees the stream.

use std::{
    io,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ::tests::{backend::read_proxy_header, lab::NetNs};
use anyhow::{Context as _, anyhow, bail};

/// Every connect, read and write of the benchmark's sockets gives up after this (30 s,
/// or what [`set_io_timeout`] chose): a stalled path fails its run instead of hanging
/// the benchmark.
static IO_TIMEOUT: OnceLock<Duration> = OnceLock::new();
const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets the I/O timeout once, before any connection (the quick run's sizes move in
/// well under a second, so it gives up sooner).
pub fn set_io_timeout(timeout: Duration) {
    let _ = IO_TIMEOUT.set(timeout);
}

fn io_timeout() -> Duration {
    *IO_TIMEOUT.get_or_init(|| DEFAULT_IO_TIMEOUT)
}
/// How long `Drop` waits for the workers.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The listen backlog (the scale test connects thousands in a burst).
const BACKLOG: i32 = 4096;
/// Error messages kept for the report; the rest are only counted.
const KEEP_ERRORS: usize = 5;

pub type Handler = dyn Fn(TcpStream) -> anyhow::Result<()> + Send + Sync;

/// What the server's connections came to.
#[derive(Default)]
pub struct Tally {
    served: AtomicUsize,
    failed: AtomicUsize,
    errors: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, result: anyhow::Result<()>) {
        match result {
            Ok(()) => {
                self.served.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
                if errors.len() < KEEP_ERRORS {
                    errors.push(format!("{e:#}"));
                }
            }
        }
    }
}

pub struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Listens on `addr` in `ns` and starts `workers` threads that each accept a
    /// connection, check its PROXY header when `header_source` is set (the header must
    /// carry that client address), and run `handler` on it.
    pub fn start(
        ns: &NetNs,
        addr: SocketAddr,
        workers: usize,
        header_source: Option<IpAddr>,
        handler: Arc<Handler>,
    ) -> anyhow::Result<Server> {
        let listener = Arc::new(listen(ns, addr)?);
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let workers = (0..workers)
            .map(|_| {
                let (listener, stop, tally, handler) = (
                    listener.clone(),
                    stop.clone(),
                    tally.clone(),
                    handler.clone(),
                );
                // Accepting needs no namespace: the listener already belongs to one.
                thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        match listener.accept() {
                            Ok((stream, _)) => {
                                tally.record(serve(stream, header_source, &*handler))
                            }
                            // After `stop` shuts the listener down, accept fails at once.
                            Err(_) if stop.load(Ordering::SeqCst) => break,
                            Err(e) => {
                                tally.record(Err(anyhow!("accept: {e}")));
                                thread::sleep(Duration::from_millis(10));
                            }
                        }
                    }
                })
            })
            .collect();
        Ok(Server {
            listener,
            stop,
            tally,
            workers,
        })
    }

    /// Waits (up to `timeout`) until `n` connections have ended, well or not; then
    /// fails unless all `n` were served without error.
    pub fn expect_served(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let ended =
            || self.tally.served.load(Ordering::SeqCst) + self.tally.failed.load(Ordering::SeqCst);
        while ended() < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        let served = self.tally.served.load(Ordering::SeqCst);
        let failed = self.tally.failed.load(Ordering::SeqCst);
        if served == n && failed == 0 {
            return Ok(());
        }
        let errors = self.tally.errors.lock().unwrap_or_else(|p| p.into_inner());
        bail!(
            "the backend served {served} of {n} connections correctly ({failed} failed){}{}",
            if errors.is_empty() { "" } else { ": " },
            errors.join("; ")
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting a listening socket down wakes every thread blocked in
        // accept on it (they get EINVAL).
        // SAFETY: shutdown(2) on a socket this value owns.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        for worker in self.workers.drain(..) {
            while !worker.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if worker.is_finished() {
                let _ = worker.join();
            }
        }
    }
}

/// A listener on `addr` inside `ns`, with a backlog for bursts of connections.
pub fn listen(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = ns
        .run(move || TcpListener::bind(addr))
        .with_context(|| format!("binding {addr} in {}", ns.name()))?;
    // std listens with a small backlog; listen(2) again raises it.
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        bail!("listen({addr}): {}", io::Error::last_os_error());
    }
    Ok(listener)
}

/// Timeouts on, then the PROXY header (when one is expected), then the handler.
fn serve(
    mut stream: TcpStream,
    header_source: Option<IpAddr>,
    handler: &Handler,
) -> anyhow::Result<()> {
    set_timeouts(&stream)?;
    if let Some(client) = header_source {
        expect_header(&mut stream, client)?;
    }
    handler(stream)
}

/// Reads the PROXY header and checks that it names `client`.
pub fn expect_header(stream: &mut TcpStream, client: IpAddr) -> anyhow::Result<()> {
    let header = read_proxy_header(stream).context("reading the PROXY header")?;
    match header.source {
        Some(source) if source.ip() == client && !header.command_local => Ok(()),
        other => bail!("the PROXY header names {other:?}, not the client {client}"),
    }
}

pub fn set_timeouts(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(Some(io_timeout()))?;
    stream.set_write_timeout(Some(io_timeout()))
}

/// Connects to `to` (from the calling thread's namespace) with the I/O timeouts set.
pub fn connect(to: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, io_timeout())
        .with_context(|| format!("connecting to {to}"))?;
    set_timeouts(&stream)?;
    Ok(stream)
}
