//! Backpressure: a peer that stops reading must hold the sender back through TCP flow
//! control, so that kernel memory per connection stays bounded, and every byte must
//! still arrive, in order, once it reads again. On both data planes.
//!
//! Memory is the machine's MemAvailable, so these tests run one at a time (a lock)
//! and cargo runs this file's tests apart from the other files'.
//!
//! These tests set the bound explicitly (4 MiB, also the default). Most move bytes one
//! way at a time; the hostile ones press both ways at once (an echo backend and
//! clients that never read), and one checks that a reader that keeps up is never
//! held back.

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
    lab::NetNs,
    on_every_dataplane,
    rig::{IO_TIMEOUT, Rig, Rng, connect, receive_all, set_timeouts},
};

/// How long the writer writes while nobody reads.
const HOLD: Duration = Duration::from_secs(10);
/// How far MemAvailable may move with the rest of this shared machine during a hold
/// (seen once: 41 MiB while one held connection's sockets took under 16 MiB). An
/// unbounded queue takes over a GiB in the same time.
const MACHINE_NOISE: u64 = 64 << 20;
const QUEUE_LIMIT: &str = "queue_limit = \"4MiB\"";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

on_every_dataplane!(
    a_backend_that_never_reads_holds_the_client_back,
    a_client_that_never_reads_holds_the_backend_back,
    two_hundred_held_connections_stay_within_their_bounds,
    an_echo_backend_and_clients_that_never_read_stay_within_their_bounds,
    sigterm_ends_connections_pressed_both_ways_within_the_shutdown_timeout,
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

    /// Growth of kernel memory at the last sample.
    fn growth_now(&self) -> u64 {
        self.baseline
            .saturating_sub(self.samples.last().copied().unwrap_or(self.baseline))
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

/// Checks the memory of `connections` connections, each held in one direction, against
/// [`held_one_way_bound`] each.
fn assert_bounded(watch: &MemoryWatch, connections: u64, written: u64) {
    let bound = held_one_way_bound();
    eprintln!(
        "{connections} held connection(s): {} bytes written, MemAvailable fell by {} KiB, \
         TCP memory grew by up to {} KiB",
        written,
        watch.growth() >> 10,
        watch.max_tcp_growth >> 10
    );
    assert!(
        watch.growth() < connections * bound + MACHINE_NOISE,
        "kernel memory grew by {} MiB for {connections} connection(s) (bound {} MiB each, \
         and {} MiB for the rest of the machine); the writer got {written} bytes out",
        watch.growth() >> 20,
        bound >> 20,
        MACHINE_NOISE >> 20
    );
    // Socket buffers, counted exactly by TCP (redirect queues are not in this figure).
    assert!(
        watch.max_tcp_growth < connections * bound,
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

/// The largest value of a `net.ipv4` buffer sysctl (`tcp_rmem`, `tcp_wmem`): what
/// TCP lets a socket's buffer grow to by itself.
fn buffer_max(sysctl: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{sysctl}")).unwrap();
    text.split_whitespace()
        .last()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{sysctl}: {text}"))
}

/// Kernel memory one connection held in one direction may take, the four sockets on
/// its path together (the client's, kgate's two, the backend's), as the README states
/// it: the stalled receiver's and kgate's receive buffers grow to at most `tcp_rmem`'s
/// maximum, the sender's send buffer to `tcp_wmem`'s, and what kgate sends on is
/// bounded by `queue_limit` (sockmap) or by its send buffer (userspace), plus kgate's
/// copy buffer. TCP usually grows them to some 15 MiB in all here, but once to 28 MiB
/// on a loaded machine; an unbounded redirect queue takes over 1 GiB in the same hold.
fn held_one_way_bound() -> u64 {
    let (rmem, wmem) = (buffer_max("tcp_rmem"), buffer_max("tcp_wmem"));
    let queue_limit = 4 << 20;
    2 * rmem + wmem + queue_limit.max(wmem) + (256 << 10)
}

/// Kernel memory one connection pressed both ways may take: each direction's bound.
fn pressed_both_ways_bound() -> u64 {
    2 * held_one_way_bound()
}

/// Echoes everything back after the PROXY header until the client's FIN, then closes.
fn echo(ns: &NetNs, listen: SocketAddr) -> TcpServer {
    TcpServer::start(ns, listen, |mut s| {
        set_timeouts(&s);
        read_proxy_header(&mut s).expect("a PROXY header");
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// A client that uploads a random stream and reads nothing back.
struct Presser {
    stream: TcpStream,
    rng: Rng,
    sent: std::hash::DefaultHasher,
    written: u64,
    /// The chunk being sent, from its first unsent byte.
    unsent: Vec<u8>,
}

impl Presser {
    fn connect(frontend: SocketAddr, seed: u64) -> Presser {
        let stream = connect(frontend);
        stream.set_nonblocking(true).unwrap();
        Presser {
            stream,
            rng: Rng(seed),
            sent: std::hash::DefaultHasher::new(),
            written: 0,
            unsent: Vec::new(),
        }
    }

    /// Writes what the connection takes now of the next chunk; whether it took any.
    fn upload(&mut self) -> bool {
        if self.unsent.is_empty() {
            self.unsent = vec![0u8; 64 * 1024];
            self.rng.fill(&mut self.unsent);
        }
        match self.stream.write(&self.unsent) {
            Ok(n) => {
                self.sent.write(&self.unsent[..n]);
                self.unsent.drain(..n);
                self.written += n as u64;
                n > 0
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("uploading: {e}"),
        }
    }

    /// Sends its FIN (the rest of its chunk stays unsent: writing it could wait for
    /// the echo nobody reads yet), then reads the echo to the end: ((bytes, checksum)
    /// echoed, (bytes, checksum) sent).
    fn finish(mut self) -> ((u64, u64), (u64, u64)) {
        self.stream.set_nonblocking(false).unwrap();
        set_timeouts(&self.stream);
        self.stream.shutdown(Shutdown::Write).unwrap();
        let (n, sum) = receive_all(&mut self.stream).expect("reading the echo");
        ((n as u64, sum), (self.written, self.sent.finish()))
    }
}

/// Uploads on every one of `pressers` for `hold` without reading, sampling memory
/// into `watch`; stops early with an error once memory has grown past `give_up_at`,
/// so a broken bound cannot take the machine down.
fn press(
    pressers: &mut [Presser],
    hold: Duration,
    watch: &mut MemoryWatch,
    give_up_at: u64,
) -> Result<(), String> {
    let started = Instant::now();
    let mut next_sample = started;
    while started.elapsed() < hold {
        let mut progress = false;
        for p in pressers.iter_mut() {
            progress |= p.upload();
        }
        if Instant::now() >= next_sample {
            watch.sample();
            next_sample += Duration::from_millis(100);
            if watch.growth_now() > give_up_at {
                return Err(format!(
                    "memory grew by {} MiB: the upload stopped early",
                    watch.growth_now() >> 20
                ));
            }
        }
        if !progress {
            thread::sleep(Duration::from_millis(5));
        }
    }
    watch.sample();
    Ok(())
}

fn pressers(frontend: SocketAddr) -> Vec<Presser> {
    (0..PRESSED)
        .map(|i| Presser::connect(frontend, 500 + i as u64))
        .collect()
}

/// CPU time (user and system) process `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses: utime and stime are the
    // 12th and 13th of them, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

const PRESSED: usize = 4;

/// The hostile pass that found the sockmap plane unbounded: an echo backend and
/// clients that upload as fast as they can and never read their replies. Whatever
/// both ends do, kernel memory stays within the stated bound, all of it charged to
/// TCP (an unbounded redirect queue took 3 GiB a second), kgate idles while the
/// connections are held, a new session still gets through, and every byte comes back
/// intact once the clients read.
fn an_echo_backend_and_clients_that_never_read_stay_within_their_bounds(dataplane: &'static str) {
    let _serial = one_at_a_time();
    let rig = Rig::start_with(dataplane, 1, "", QUEUE_LIMIT);
    let _server = echo(rig.lab.backend(0), rig.backend_addr(0));
    let frontend = rig.frontend_v4();
    let bound = PRESSED as u64 * pressed_both_ways_bound();
    let kgate = rig.kgate.pid();
    let (watch, pressers, cpu_while_held, session) = rig.lab.client().run(move || {
        let session = thread::spawn(move || {
            // Halfway through the hold, once everything is full.
            thread::sleep(HOLD / 2);
            let mut c = connect(frontend);
            c.write_all(b"ping\r\n").unwrap();
            let mut reply = [0u8; 6];
            c.read_exact(&mut reply).map(|()| reply)
        });
        let mut watch = MemoryWatch::start();
        let mut pressers = pressers(frontend);
        // The first half fills every buffer; the second is the held state.
        let filled = press(&mut pressers, HOLD / 2, &mut watch, bound);
        let cpu_before = cpu_time(kgate);
        let held_since = Instant::now();
        let held = filled.and_then(|()| press(&mut pressers, HOLD / 2, &mut watch, bound));
        let cpu_while_held =
            (cpu_time(kgate) - cpu_before).as_secs_f64() / held_since.elapsed().as_secs_f64();
        if let Err(e) = held {
            panic!("{e}");
        }
        (watch, pressers, cpu_while_held, session.join().unwrap())
    });
    let written: u64 = pressers.iter().map(|p| p.written).sum();
    eprintln!(
        "{PRESSED} connections pressed both ways: {written} bytes uploaded, MemAvailable fell \
         by {} KiB, TCP memory grew by up to {} KiB (bound {} KiB); kgate used {:.1} % of a \
         CPU while they were held",
        watch.growth() >> 10,
        watch.max_tcp_growth >> 10,
        bound >> 10,
        cpu_while_held * 100.0
    );
    assert!(
        watch.growth() < bound + MACHINE_NOISE && watch.max_tcp_growth < bound,
        "kernel memory grew by {} MiB (TCP's own: {} MiB) for {PRESSED} connections pressed \
         both ways; the bound is {} MiB",
        watch.growth() >> 20,
        watch.max_tcp_growth >> 20,
        bound >> 20
    );
    assert!(
        watch.growth() < watch.max_tcp_growth * 2 + MACHINE_NOISE,
        "{} MiB of kernel memory outside TCP's accounting (TCP's own: {} MiB): a queue \
         no socket is charged for",
        watch.growth().saturating_sub(watch.max_tcp_growth) >> 20,
        watch.max_tcp_growth >> 20
    );
    assert!(
        cpu_while_held < 0.5,
        "kgate used {:.0} % of a CPU while its connections were held",
        cpu_while_held * 100.0
    );
    assert_eq!(
        session.as_ref().ok(),
        Some(b"ping\r\n"),
        "a new session during the hold: {session:?}"
    );

    let echoed = rig.lab.client().run(move || {
        pressers
            .into_iter()
            .map(Presser::finish)
            .collect::<Vec<_>>()
    });
    for (got, sent) in echoed {
        assert_eq!(got, sent, "every byte came back, in order");
    }
    let lines = rig.connection_lines(PRESSED + 1);
    assert!(
        lines.iter().all(|l| l.contains("end=\"client closed\"")),
        "{lines:#?}"
    );
    rig.assert_paths(&lines);
    rig.assert_clean();
}

/// SIGTERM while connections are pressed both ways: kgate closes what is still open
/// once `shutdown_timeout` has passed and exits by itself (the hostile pass saw it
/// ignore SIGTERM for over a minute).
fn sigterm_ends_connections_pressed_both_ways_within_the_shutdown_timeout(dataplane: &'static str) {
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    /// Room for a loaded machine; kgate itself needs far less.
    const MARGIN: Duration = Duration::from_secs(20);
    let _serial = one_at_a_time();
    let mut rig = Rig::start_with_global(dataplane, 1, "shutdown_timeout = \"2s\"", QUEUE_LIMIT);
    let _server = echo(rig.lab.backend(0), rig.backend_addr(0));
    let frontend = rig.frontend_v4();
    let bound = PRESSED as u64 * pressed_both_ways_bound();
    let pressers = rig.lab.client().run(move || {
        let mut watch = MemoryWatch::start();
        let mut pressers = pressers(frontend);
        if let Err(e) = press(&mut pressers, HOLD / 2, &mut watch, bound) {
            panic!("{e}");
        }
        pressers
    });
    let sent = Instant::now();
    rig.kgate.signal(libc::SIGTERM);
    while rig.kgate.is_running() && sent.elapsed() < SHUTDOWN_TIMEOUT + MARGIN {
        thread::sleep(Duration::from_millis(20));
    }
    let took = sent.elapsed();
    rig.kgate.stop();
    assert!(
        took < SHUTDOWN_TIMEOUT + MARGIN,
        "kgate still ran {took:?} after SIGTERM"
    );
    let status = rig.kgate.exit_status().expect("kgate exited");
    assert!(status.success(), "kgate exited with {status}");
    assert!(
        rig.kgate
            .log()
            .contains(&format!("closing {PRESSED} connections still open")),
        "{}",
        rig.kgate.log()
    );
    eprintln!("kgate exited {took:?} after SIGTERM");
    drop(pressers);
}
