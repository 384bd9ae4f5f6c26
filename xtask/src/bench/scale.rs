//! Scale: `n` connections opened through the path and held open, idle. The figures
//! are what each held connection costs: the proxy's resident memory (VmRSS), and the
//! kernel's memory on the whole machine, which covers every socket of the connection:
//! the client's, the backend's, and the proxy's two. The kernel's is read two ways:
//! the growth of the slab (where sockets, their inodes, epoll entries and sockmap
//! state live), steady to a few percent from run to run; and the drop of MemAvailable
//! less the growth of the processes' own resident memory, which takes in everything
//! but moves by megabytes with whatever else the machine does. The TCP buffer pages
//! (sockstat `mem`) are recorded too.
//!
//! Before the connections close, each carries an 8-byte message there and back (all
//! `n`, on the sockmap path through the splice), and the client checks that every
//! connection got its own message back. They then close with a reset, so that no
//! TIME_WAIT is left to the next run.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use ::tests::lab::Lab;
use anyhow::{Context as _, anyhow, bail};
use serde_json::json;

use super::{
    Figure, Outcome,
    proxy::{HeldEntries, Running},
    server,
    sys::{self, Memory},
};

/// Client threads that open the connections.
const CONNECT_THREADS: usize = 4;
/// How long all connections may take to arrive at the backend (and be spliced).
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause before the second memory reading, for deferred kernel work to settle.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the proxy may take to let go of the connections after the resets.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);
const PING: usize = 8;

/// Holds the connections the backend accepted.
struct Holder {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    error: Arc<Mutex<Option<String>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Holder {
    fn start(lab: &Lab, running: &Running, n: usize) -> anyhow::Result<Holder> {
        let listener = Arc::new(server::listen(lab.backend(0), running.backend)?);
        let stop = Arc::new(AtomicBool::new(false));
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let error: Arc<Mutex<Option<String>>> = Arc::default();
        let header_source = running.header_source;
        let acceptor =
            {
                let (listener, stop, held, error) =
                    (listener.clone(), stop.clone(), held.clone(), error.clone());
                thread::spawn(move || {
                    let mut accepted = 0;
                    while accepted < n && !stop.load(Ordering::SeqCst) {
                        let result = listener.accept().map_err(anyhow::Error::from).and_then(
                            |(mut conn, _)| {
                                server::set_timeouts(&conn)?;
                                if let Some(client) = header_source {
                                    server::expect_header(&mut conn, client)?;
                                }
                                Ok(conn)
                            },
                        );
                        match result {
                            Ok(conn) => {
                                accepted += 1;
                                held.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
                            }
                            Err(_) if stop.load(Ordering::SeqCst) => break,
                            Err(e) => {
                                *error.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("backend: {e:#}"));
                                break;
                            }
                        }
                    }
                })
            };
        Ok(Holder {
            listener,
            stop,
            held,
            error,
            acceptor: Some(acceptor),
        })
    }

    fn count(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn take(&self) -> Vec<TcpStream> {
        std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a socket this value owns; wakes a blocked accept.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !acceptor.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(2));
            }
            if acceptor.is_finished() {
                let _ = acceptor.join();
            }
        }
    }
}

/// What the memory readings are taken from.
struct Reading {
    memory: Memory,
    proxy_rss: u64,
    own_rss: u64,
}

impl Reading {
    fn now(proxy: Option<u32>) -> anyhow::Result<Reading> {
        Ok(Reading {
            memory: Memory::now()?,
            proxy_rss: proxy.map(sys::rss).transpose()?.unwrap_or(0),
            own_rss: sys::rss(std::process::id())?,
        })
    }
}

pub fn run(lab: &Lab, running: &Running, n: usize) -> anyhow::Result<Outcome> {
    let holder = Holder::start(lab, running, n)?;
    let proxy = running.pid();
    let held_entries = running.held_entries(lab);
    let proxy_fds = proxy.map(sys::open_fds);
    let before = Reading::now(proxy)?;

    let target = running.target;
    let started = Instant::now();
    let clients = lab.client().run(move || -> anyhow::Result<Vec<TcpStream>> {
        thread::scope(|scope| {
            let openers: Vec<_> = (0..CONNECT_THREADS)
                .map(|t| {
                    let count = n / CONNECT_THREADS + usize::from(t < n % CONNECT_THREADS);
                    scope.spawn(move || -> anyhow::Result<Vec<TcpStream>> {
                        (0..count).map(|_| server::connect(target)).collect()
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(n);
            for opener in openers {
                all.extend(
                    opener
                        .join()
                        .map_err(|_| anyhow!("a client thread panicked"))??,
                );
            }
            Ok(all)
        })
    });
    // Closed with a reset whatever happens next, so no TIME_WAIT outlives the run.
    let clients = Resetting(clients?);
    let connect_seconds = started.elapsed().as_secs_f64();

    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    while holder.count() < n && holder.error().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if let Some(e) = holder.error() {
        bail!("{e}");
    }
    if holder.count() < n {
        bail!(
            "only {} of {n} connections reached the backend within {ARRIVAL_TIMEOUT:?}",
            holder.count()
        );
    }
    if let Some(entries) = &held_entries {
        let held = wait_map_len(entries, 2 * n, deadline)?;
        if held != 2 * n {
            bail!(
                "{held} {}, not the {} of {n} connections carried in the kernel",
                entries.what,
                2 * n
            );
        }
    }
    thread::sleep(SETTLE);
    let after = Reading::now(proxy)?;

    let held = holder.take();
    echo_each(&clients.0, &held)?;

    let per_conn = |bytes: i128| bytes as f64 / n as f64;
    let proxy_growth = i128::from(after.proxy_rss) - i128::from(before.proxy_rss);
    let own_growth = i128::from(after.own_rss) - i128::from(before.own_rss);
    let available_drop = i128::from(before.memory.available) - i128::from(after.memory.available);
    let kernel = available_drop - proxy_growth - own_growth;
    let slab = i128::from(after.memory.slab) - i128::from(before.memory.slab);
    let tcp_buffers = i128::from(after.memory.tcp_buffers) - i128::from(before.memory.tcp_buffers);

    drop(clients);
    drop(held);
    release(running, proxy_fds, held_entries.as_ref())?;

    let mut figures = vec![
        (Figure::ScaleKernel, per_conn(slab) / 1024.0),
        (Figure::ScaleMemAvailable, per_conn(kernel) / 1024.0),
        (Figure::ScaleTcpMem, per_conn(tcp_buffers)),
    ];
    if proxy.is_some() {
        figures.insert(0, (Figure::ScaleProxyRss, per_conn(proxy_growth)));
    }
    Ok(Outcome {
        figures,
        details: json!({
            "connections": n,
            "connect_seconds": connect_seconds,
            "proxy_rss_before": before.proxy_rss,
            "proxy_rss_after": after.proxy_rss,
            "mem_available_drop_bytes": available_drop as f64,
            "own_rss_growth_bytes": own_growth as f64,
            "slab_growth_bytes": slab as f64,
        }),
    })
}

/// Client sockets that close with a reset (SO_LINGER 0) when dropped.
struct Resetting(Vec<TcpStream>);

impl Drop for Resetting {
    fn drop(&mut self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        for conn in &self.0 {
            // SAFETY: SO_LINGER reads one `linger`; the socket is ours.
            unsafe {
                libc::setsockopt(
                    conn.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const linger).cast(),
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
        }
    }
}

/// Each client sends its index; the backend echoes what each of its connections got;
/// each client must get its own index back.
fn echo_each(clients: &[TcpStream], held: &[TcpStream]) -> anyhow::Result<()> {
    for (i, mut conn) in clients.iter().enumerate() {
        conn.write_all(&(i as u64).to_le_bytes())
            .with_context(|| format!("writing to held connection {i}"))?;
    }
    let mut buf = [0u8; PING];
    for (i, mut conn) in held.iter().enumerate() {
        conn.read_exact(&mut buf)
            .with_context(|| format!("backend reading held connection {i}"))?;
        conn.write_all(&buf)
            .with_context(|| format!("backend writing held connection {i}"))?;
    }
    for (i, mut conn) in clients.iter().enumerate() {
        conn.read_exact(&mut buf)
            .with_context(|| format!("reading the echo on held connection {i}"))?;
        if u64::from_le_bytes(buf) != i as u64 {
            bail!(
                "held connection {i} got connection {}'s message back",
                u64::from_le_bytes(buf)
            );
        }
    }
    Ok(())
}

fn wait_map_len(entries: &HeldEntries, want: usize, deadline: Instant) -> anyhow::Result<usize> {
    loop {
        let len = (entries.len)(&entries.map)?;
        if len == want || Instant::now() >= deadline {
            return Ok(len);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the proxy has closed the connections: its open files back to where
/// they were, and on the sockmap and packet paths its map of them empty.
fn release(
    running: &Running,
    fds_before: Option<usize>,
    held_entries: Option<&HeldEntries>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    if let (Some(pid), Some(before)) = (running.pid(), fds_before) {
        while sys::open_fds(pid) > before && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let now = sys::open_fds(pid);
        if now > before {
            bail!("the proxy still has {now} files open, {before} before the scale test");
        }
    }
    if let Some(entries) = held_entries {
        let left = wait_map_len(entries, 0, deadline)?;
        if left != 0 {
            bail!(
                "{left} {} stayed after the connections closed",
                entries.what
            );
        }
    }
    Ok(())
}
