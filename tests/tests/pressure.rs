//! Backpressure: a peer that stops reading must hold the sender back through TCP flow
//! control, so that kernel memory per connection stays bounded, and every byte must
//! still arrive, in order, once it reads again. On both data planes.
//!
//! Memory is the machine's MemAvailable, so these tests run one at a time (a lock)
//! and cargo runs this file's tests apart from the other files'.
//!
//! These tests set the bound explicitly (4 MiB, also the default) and move bytes one
//! way at a time; the last one checks that a reader that keeps up is never held back.

use std::{
    hash::Hasher,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex, MutexGuard, mpsc},
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    on_both_dataplanes,
    rig::{IO_TIMEOUT, Rig, Rng, connect, receive_all, set_timeouts},
};

/// How long the writer writes while nobody reads.
const HOLD: Duration = Duration::from_secs(10);
/// Kernel memory one held connection may take, all its sockets together. TCP's own
/// autotuned buffers along the stalled direction reach 15.5 MiB here (the receive
/// maximum, `net.ipv4.tcp_rmem`, is 32 MiB); an unbounded redirect queue takes over
/// 1 GiB in the same hold.
const BOUND: u64 = 24 << 20;
/// How far MemAvailable may move with the rest of this shared machine during a hold
/// (seen once: 41 MiB while one held connection's sockets took under 16 MiB). An
/// unbounded queue takes over a GiB in the same time.
const MACHINE_NOISE: u64 = 64 << 20;
const QUEUE_LIMIT: &str = "queue_limit = \"4MiB\"";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

on_both_dataplanes!(
    a_backend_that_never_reads_holds_the_client_back,
    a_client_that_never_reads_holds_the_backend_back,
    two_hundred_held_connections_stay_within_their_bounds,
);

#[test]
fn a_reader_that_keeps_up_is_spliced_throughout() {
    if !tests::lab::skip_without_root() {
        reader_that_keeps_up_is_spliced_throughout(false);
    }
}

/// The same once the connection has waited long enough to be parked: the first grant
/// request must bring it back in time.
#[test]
fn a_parked_connection_that_starts_streaming_is_spliced_throughout() {
    if !tests::lab::skip_without_root() {
        reader_that_keeps_up_is_spliced_throughout(true);
    }
}

/// 16 times the default bound, at about 100 MB/s.
const PACED_BYTES: usize = 64 << 20;
const PACED_CHUNK: usize = 256 << 10;
const PACED_PAUSE: Duration = Duration::from_millis(2);

/// A backend that reads as fast as bytes come: the direction must never fall back to
/// copying, however many times its bytes add up to the bound. Halfway through each
/// grant the program asks for more, and kgate extends it by what the backend took;
/// without that, the program would pass bytes to kgate every `queue_limit` bytes.
fn reader_that_keeps_up_is_spliced_throughout(parked_first: bool) {
    let _serial = one_at_a_time();
    let mut rig = Rig::start("sockmap", 1);
    let _server = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let (n, _) = receive_all(&mut s).expect("reading the paced bytes");
        s.write_all(format!("{n}\r\n").as_bytes()).unwrap();
    });
    let frontend = rig.frontend_v4();
    let c = rig.lab.client().run(move || connect(frontend));
    if parked_first {
        let parked = rig.wait_for_metric("kgate_parked_connections", 1.0);
        assert_eq!(parked, 1.0, "the waiting connection was not parked");
    }
    let reply = rig.lab.client().run(move || {
        let mut c = c;
        let mut rng = Rng(11);
        let mut chunk = vec![0u8; PACED_CHUNK];
        for _ in 0..PACED_BYTES / PACED_CHUNK {
            rng.fill(&mut chunk);
            c.write_all(&chunk).unwrap();
            thread::sleep(PACED_PAUSE);
        }
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        reply
    });
    assert_eq!(reply, format!("{PACED_BYTES}\r\n"), "the backend's count");
    let lines = rig.connection_lines(1);
    assert!(lines[0].contains(" spliced "), "{}", lines[0]);
    rig.kgate.stop();
    assert_eq!(
        rig.kgate.splice_total("passed_bytes"),
        0,
        "bytes went through kgate instead of the splice"
    );
}

fn mem_available() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("MemAvailable in /proc/meminfo");
    kib << 10
}

/// TCP's memory in the whole kernel (/proc/net/sockstat, pages), in bytes.
fn tcp_memory() -> u64 {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").unwrap();
    let pages: u64 = sockstat
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| l.split_whitespace().skip_while(|w| *w != "mem").nth(1))
        .and_then(|v| v.parse().ok())
        .expect("TCP mem in /proc/net/sockstat");
    pages * 4096
}

/// How far memory grows while connections are held. MemAvailable moves in steps
/// (per-CPU counters fold in lazily) and other processes add noise, so the baseline
/// and the final level are medians of several samples, and the growth compares the
/// two: held connections plateau, while an unbounded queue keeps growing to the end.
struct MemoryWatch {
    baseline: u64,
    tcp_at_start: u64,
    samples: Vec<u64>,
    max_tcp_growth: u64,
}

fn median(values: &mut [u64]) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

impl MemoryWatch {
    fn start() -> MemoryWatch {
        let mut baseline: Vec<u64> = (0..5)
            .map(|_| {
                thread::sleep(Duration::from_millis(50));
                mem_available()
            })
            .collect();
        MemoryWatch {
            baseline: median(&mut baseline),
            tcp_at_start: tcp_memory(),
            samples: Vec::new(),
            max_tcp_growth: 0,
        }
    }

    fn sample(&mut self) {
        self.samples.push(mem_available());
        let tcp = tcp_memory().saturating_sub(self.tcp_at_start);
        self.max_tcp_growth = self.max_tcp_growth.max(tcp);
    }

    /// Growth of kernel memory at the end of the hold.
    fn growth(&self) -> u64 {
        let mut last: Vec<u64> = self.samples.iter().rev().take(5).copied().collect();
        self.baseline.saturating_sub(median(&mut last))
    }
}

/// Writes a random stream from `seed` for `HOLD` without blocking, sampling memory,
/// until the peer stops taking bytes for good. Returns (bytes written, checksum).
fn write_while_held(stream: &mut TcpStream, seed: u64, watch: &mut MemoryWatch) -> (u64, u64) {
    stream.set_nonblocking(true).unwrap();
    let mut rng = Rng(seed);
    let mut hasher = std::hash::DefaultHasher::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut unsent = 0..0;
    let mut written = 0u64;
    let started = Instant::now();
    let mut next_sample = started;
    while started.elapsed() < HOLD {
        if unsent.is_empty() {
            rng.fill(&mut chunk);
            unsent = 0..chunk.len();
        }
        match stream.write(&chunk[unsent.clone()]) {
            Ok(n) => {
                hasher.write(&chunk[unsent.start..unsent.start + n]);
                unsent.start += n;
                written += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("writing while held: {e}"),
        }
        if Instant::now() >= next_sample {
            watch.sample();
            next_sample += Duration::from_millis(100);
        }
    }
    watch.sample();
    stream.set_nonblocking(false).unwrap();
    (written, hasher.finish())
}

fn assert_bounded(watch: &MemoryWatch, connections: u64, written: u64) {
    eprintln!(
        "{connections} held connection(s): {} bytes written, MemAvailable fell by {} KiB, \
         TCP memory grew by up to {} KiB",
        written,
        watch.growth() >> 10,
        watch.max_tcp_growth >> 10
    );
    assert!(
        watch.growth() < connections * BOUND + MACHINE_NOISE,
        "kernel memory grew by {} MiB for {connections} connection(s) (bound {} MiB each, \
         and {} MiB for the rest of the machine); the writer got {written} bytes out",
        watch.growth() >> 20,
        BOUND >> 20,
        MACHINE_NOISE >> 20
    );
    // Socket buffers, counted exactly by TCP (redirect queues are not in this figure).
    assert!(
        watch.max_tcp_growth < connections * BOUND,
        "TCP memory grew by {} MiB for {connections} connection(s)",
        watch.max_tcp_growth >> 20
    );
}

fn a_backend_that_never_reads_holds_the_client_back(dataplane: &'static str) {
    let _serial = one_at_a_time();
    let rig = Rig::start_with(dataplane, 1, "", QUEUE_LIMIT);
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    let received = Arc::new(Mutex::new(None));
    let _server = {
        let received = received.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            // Nobody reads until the client has written for HOLD.
            let _ = released.lock().unwrap().recv_timeout(HOLD * 3);
            let got = receive_all(&mut s).expect("reading the held bytes");
            *received.lock().unwrap() = Some(got);
            s.write_all(b"done\r\n").unwrap();
        })
    };
    let frontend = rig.frontend_v4();
    let (written, sum, watch, reply) = rig.lab.client().run(move || {
        let mut c = connect(frontend);
        thread::sleep(Duration::from_millis(200));
        let mut watch = MemoryWatch::start();
        let (written, sum) = write_while_held(&mut c, 7, &mut watch);
        release.send(()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        (written, sum, watch, reply)
    });
    assert_bounded(&watch, 1, written);
    assert_eq!(reply, "done\r\n");
    assert_eq!(
        *received.lock().unwrap(),
        Some((written as usize, sum)),
        "the backend got every byte, in order"
    );
    let lines = rig.connection_lines(1);
    assert!(
        lines[0].contains(&format!("bytes_in={written} ")),
        "{}",
        lines[0]
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

fn a_client_that_never_reads_holds_the_backend_back(dataplane: &'static str) {
    let _serial = one_at_a_time();
    let rig = Rig::start_with(dataplane, 1, "", QUEUE_LIMIT);
    let (start, started) = mpsc::channel::<()>();
    let started = Mutex::new(started);
    let sent = Arc::new(Mutex::new(None));
    let _server = {
        let sent = sent.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            let _ = started.lock().unwrap().recv_timeout(IO_TIMEOUT);
            let mut watch = MemoryWatch::start();
            let (written, sum) = write_while_held(&mut s, 11, &mut watch);
            *sent.lock().unwrap() = Some((written, sum, watch));
            s.shutdown(Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
        })
    };
    let frontend = rig.frontend_v4();
    let received = rig.lab.client().run(move || {
        let mut c = connect(frontend);
        thread::sleep(Duration::from_millis(200));
        start.send(()).unwrap();
        // Nobody reads while the backend writes for HOLD.
        thread::sleep(HOLD + Duration::from_millis(500));
        let got = receive_all(&mut c).expect("reading the held bytes");
        c.shutdown(Shutdown::Write).unwrap();
        got
    });
    let (written, sum, watch) = sent.lock().unwrap().take().expect("the backend wrote");
    assert_bounded(&watch, 1, written);
    assert_eq!(
        received,
        (written as usize, sum),
        "the client got every byte, in order"
    );
    let lines = rig.connection_lines(1);
    assert!(
        lines[0].contains(&format!("bytes_out={written} ")),
        "{}",
        lines[0]
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

const HELD_CONNECTIONS: usize = 200;

fn two_hundred_held_connections_stay_within_their_bounds(dataplane: &'static str) {
    let _serial = one_at_a_time();
    let rig = Rig::start_with(dataplane, 1, "", QUEUE_LIMIT);
    let release = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let received = Arc::new(Mutex::new(Vec::new()));
    let _server = {
        let (release, received) = (release.clone(), received.clone());
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            let (lock, released) = &*release;
            let guard = lock.lock().unwrap();
            drop(
                released
                    .wait_timeout_while(guard, HOLD * 3, |r| !*r)
                    .unwrap(),
            );
            let got = receive_all(&mut s).expect("reading the held bytes");
            received.lock().unwrap().push(got);
            s.write_all(b"done\r\n").unwrap();
        })
    };
    let frontend = rig.frontend_v4();
    let results = {
        let release = release.clone();
        rig.lab.client().run(move || hold_many(frontend, &release))
    };
    let (watch, sent) = results;
    let total: u64 = sent.iter().map(|(n, _)| n).sum();
    assert_bounded(&watch, HELD_CONNECTIONS as u64, total);
    let mut received = received.lock().unwrap().clone();
    let mut sent: Vec<(usize, u64)> = sent.into_iter().map(|(n, s)| (n as usize, s)).collect();
    received.sort_unstable();
    sent.sort_unstable();
    assert_eq!(received, sent, "every connection's bytes arrived, in order");
    let lines = rig.connection_lines(HELD_CONNECTIONS);
    rig.assert_paths(&lines);
    rig.assert_clean();
}

/// Opens `HELD_CONNECTIONS` connections and writes on all of them (one thread)
/// while the backend reads none; then releases the backend and finishes each.
#[allow(clippy::type_complexity)]
fn hold_many(
    frontend: SocketAddr,
    release: &(Mutex<bool>, std::sync::Condvar),
) -> (MemoryWatch, Vec<(u64, u64)>) {
    let mut conns: Vec<(TcpStream, Rng, std::hash::DefaultHasher, u64)> = (0..HELD_CONNECTIONS)
        .map(|i| {
            let c = connect(frontend);
            c.set_nonblocking(true).unwrap();
            (c, Rng(1000 + i as u64), std::hash::DefaultHasher::new(), 0)
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let mut watch = MemoryWatch::start();
    // Fixed-size writes so a partial write never has to be remembered: the chunk is
    // regenerated only after it went out whole.
    let mut chunk = vec![0u8; 16 * 1024];
    let mut pending: Vec<Option<Vec<u8>>> = vec![None; HELD_CONNECTIONS];
    let started = Instant::now();
    while started.elapsed() < HOLD / 2 {
        let mut progress = false;
        for (i, (c, rng, hasher, written)) in conns.iter_mut().enumerate() {
            let data = pending[i].take().unwrap_or_else(|| {
                rng.fill(&mut chunk);
                chunk.clone()
            });
            match c.write(&data) {
                Ok(n) => {
                    hasher.write(&data[..n]);
                    *written += n as u64;
                    progress = true;
                    if n < data.len() {
                        pending[i] = Some(data[n..].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pending[i] = Some(data),
                Err(e) => panic!("connection {i}: {e}"),
            }
        }
        watch.sample();
        if !progress {
            thread::sleep(Duration::from_millis(20));
        }
    }
    watch.sample();
    {
        let (lock, released) = release;
        *lock.lock().unwrap() = true;
        released.notify_all();
    }
    let sent = conns
        .into_iter()
        .map(|(mut c, _, hasher, written)| {
            c.set_nonblocking(false).unwrap();
            set_timeouts(&c);
            c.shutdown(Shutdown::Write).unwrap();
            let mut reply = String::new();
            c.read_to_string(&mut reply).unwrap();
            assert_eq!(reply, "done\r\n");
            (written, hasher.finish())
        })
        .collect();
    (watch, sent)
}
