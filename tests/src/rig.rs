//! A ready-made lab for the integration tests: kgate in front of plain TCP backends,
//! with the checks every test ends with (log lines, data plane, no leaked fd or map
//! entry), and helpers to move and verify bytes.

use std::{
    hash::Hasher,
    io::{self, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{
    backend::{TcpServer, read_proxy_header},
    kgate::{Kgate, global_section, metric_value, scrape_metrics},
    lab::Lab,
    packet::rules_len,
    sockmap::sock_hash_len,
};

pub const FRONTEND_PORT: u16 = 2525;
pub const BACKEND_PORT: u16 = 2525;
/// Where the rig's kgate serves its metrics, in the gateway namespace.
pub const METRICS: &str = "127.0.0.1:9464";
/// No test socket waits longer than this for a byte: a hang becomes a failure.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A lab with kgate running in front of `backends` servers.
pub struct Rig {
    // Dropped first: kgate stops by SIGTERM (and logs its totals) before the lab goes.
    pub kgate: Kgate,
    pub lab: Lab,
    pub dataplane: &'static str,
    fds_at_start: usize,
}

impl Rig {
    /// kgate with one frontend `smtp` (gateway port 2525, v4 and v6) in front of
    /// backend `mail`, whose servers `node<i>` are the lab's backends on port 2525.
    pub fn start(dataplane: &'static str, backends: usize) -> Rig {
        Rig::start_with(dataplane, backends, "", "")
    }

    /// Like [`Rig::start`], with extra keys for the frontend and the backend sections.
    pub fn start_with(
        dataplane: &'static str,
        backends: usize,
        frontend_keys: &str,
        backend_keys: &str,
    ) -> Rig {
        Rig::start_with_servers(dataplane, backends, frontend_keys, backend_keys, &[])
    }

    /// Like [`Rig::start_with`], with extra keys for server `i` in `server_keys[i]`
    /// (`weight = 2`, say). The backend keys may end with a `[backends.health]` table.
    pub fn start_with_servers(
        dataplane: &'static str,
        backends: usize,
        frontend_keys: &str,
        backend_keys: &str,
        server_keys: &[&str],
    ) -> Rig {
        Rig::start_with_sections(
            dataplane,
            backends,
            frontend_keys,
            backend_keys,
            server_keys,
            |_| String::new(),
        )
    }

    /// Like [`Rig::start_with_servers`], with top-level tables (`[xdp]`, say) at the end
    /// of the config: `sections` makes them once the lab exists, so they can name its
    /// interfaces and files in its temp directory.
    pub fn start_with_sections(
        dataplane: &'static str,
        backends: usize,
        frontend_keys: &str,
        backend_keys: &str,
        server_keys: &[&str],
        sections: impl FnOnce(&Lab) -> String,
    ) -> Rig {
        Rig::launch(
            dataplane,
            backends,
            "",
            frontend_keys,
            backend_keys,
            server_keys,
            sections,
        )
    }

    /// Like [`Rig::start_with`], with extra keys for `[global]` (`shutdown_timeout`, say)
    /// and for the backend section.
    pub fn start_with_global(
        dataplane: &'static str,
        backends: usize,
        global_keys: &str,
        backend_keys: &str,
    ) -> Rig {
        Rig::launch(
            dataplane,
            backends,
            global_keys,
            "",
            backend_keys,
            &[],
            |_| String::new(),
        )
    }

    fn launch(
        dataplane: &'static str,
        backends: usize,
        global_keys: &str,
        frontend_keys: &str,
        backend_keys: &str,
        server_keys: &[&str],
        sections: impl FnOnce(&Lab) -> String,
    ) -> Rig {
        let lab = Lab::new(backends);
        let mut config = global_section(&lab, dataplane);
        config.push_str(&format!("metrics_listen = \"{METRICS}\"\n{global_keys}\n"));
        config.push_str(&format!(
            r#"
[[frontends]]
name = "smtp"
listen = ["{gw4}:{FRONTEND_PORT}", "[{gw6}]:{FRONTEND_PORT}"]
backend = "mail"
{frontend_keys}

[[backends]]
name = "mail"
{v2}{splice_at_once}{backend_keys}
"#,
            gw4 = lab.gateway().v4(),
            gw6 = lab.gateway().v6(),
            // PROXY v2 unless the test says otherwise.
            v2 = if backend_keys.contains("proxy_protocol") {
                ""
            } else {
                "proxy_protocol = \"v2\"\n"
            },
            // Spliced from the first byte, so that the shortest session tests the
            // splice; a test of the delay sets its own.
            splice_at_once = if backend_keys.contains("splice_after") {
                ""
            } else {
                "splice_after = \"0s\"\n"
            },
        ));
        for (i, backend) in lab.backends().iter().enumerate() {
            config.push_str(&format!(
                "\n[[backends.servers]]\nname = \"node{i}\"\naddress = \"{}:{BACKEND_PORT}\"\n{}\n",
                backend.v4(),
                server_keys.get(i).unwrap_or(&"")
            ));
        }
        config.push_str(&sections(&lab));
        let kgate = Kgate::start(&lab, &config);
        assert!(
            kgate.log().contains(&format!("dataplane=\"{dataplane}\"")),
            "kgate did not start the {dataplane} data plane:\n{}",
            kgate.log()
        );
        let fds_at_start = kgate.open_fds();
        Rig {
            lab,
            kgate,
            dataplane,
            fds_at_start,
        }
    }

    /// A rig around a kgate started with a configuration of the test's own (one
    /// without `metrics_listen` has no metrics to read): the checks every case ends
    /// with apply to it.
    pub fn from_parts(lab: Lab, kgate: Kgate, dataplane: &'static str) -> Rig {
        let fds_at_start = kgate.open_fds();
        Rig {
            kgate,
            lab,
            dataplane,
            fds_at_start,
        }
    }

    /// The value of metric `name` (with no labels of its own) right now.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&scrape_metrics(&self.lab, METRICS), name, &[])
    }

    /// The value of the sample of metric `name` with `labels` (among others) right now.
    pub fn metric_with(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&scrape_metrics(&self.lab, METRICS), name, labels)
    }

    /// Where the stats page and the metrics are served, in the gateway namespace.
    pub fn metrics_listen(&self) -> &'static str {
        METRICS
    }

    /// Waits (up to 10 s) for metric `name` to reach `value`; returns its last value.
    pub fn wait_for_metric(&self, name: &str, value: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.metric(name);
            if now == value || Instant::now() > deadline {
                return now;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn frontend_v4(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.gateway().v4()), FRONTEND_PORT)
    }

    pub fn frontend_v6(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.lab.gateway().v6()), FRONTEND_PORT)
    }

    pub fn backend_addr(&self, i: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.lab.backend(i).v4()), BACKEND_PORT)
    }

    /// Waits for kgate to log `n` finished connections; returns their log lines.
    pub fn connection_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let lines: Vec<String> = self
                .kgate
                .log()
                .lines()
                .filter(|l| l.contains("kgate::conn"))
                .map(str::to_owned)
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                assert_eq!(
                    lines.len(),
                    n,
                    "connection log lines:\n{}",
                    lines.join("\n")
                );
                return lines;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every connection was carried by this rig's data plane: spliced for sockmap,
    /// forwarded or copied (a session over before its first quiet moment) for packet.
    pub fn assert_paths(&self, lines: &[String]) {
        let expected: &[&str] = match self.dataplane {
            "sockmap" => &[" spliced "],
            "packet" => &[" forwarded ", " copied "],
            _ => &[" copied "],
        };
        for line in lines {
            assert!(
                expected.iter().any(|path| line.contains(path)),
                "expected one of {expected:?} in: {line}"
            );
        }
    }

    /// How many of `lines` the packet data plane forwarded.
    pub fn forwarded(lines: &[String]) -> usize {
        lines.iter().filter(|l| l.contains(" forwarded ")).count()
    }

    /// Waits (up to 10 s) until `sockets` sockets have joined the splice; at once on the
    /// userspace data plane.
    pub fn wait_spliced(&self, sockets: usize) {
        if self.dataplane != "sockmap" {
            return;
        }
        let spliced = self.kgate.pin_path().join("spliced");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let joined = sock_hash_len(&spliced).expect("reading the pinned spliced map");
            if joined >= sockets {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{joined} sockets in the splice, not {sockets}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// No fd and no map entry outlives the connections.
    pub fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fds = self.kgate.open_fds();
            let pin = self.kgate.pin_path();
            let maps = match self.dataplane {
                "sockmap" => (
                    sock_hash_len(&pin.join("peers")).expect("reading the pinned peers map"),
                    sock_hash_len(&pin.join("spliced")).expect("reading the pinned spliced map"),
                ),
                "packet" => (
                    rules_len(&pin.join("packet_rules")).expect("reading the pinned rules"),
                    0,
                ),
                _ => (0, 0),
            };
            if fds == self.fds_at_start && maps == (0, 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after the test kgate has {fds} fds (started with {}) and (peers, spliced) \
                 entries or (rules, 0) {maps:?}",
                self.fds_at_start
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Generates `mod sockmap`, `mod packet` and `mod userspace`, each with one test per
/// case.
#[macro_export]
macro_rules! on_every_dataplane {
    ($($case:ident),* $(,)?) => {
        mod sockmap {
            $(#[test] fn $case() { if !$crate::lab::skip_without_root() { super::$case("sockmap") } })*
        }
        mod packet {
            $(#[test] fn $case() { if !$crate::lab::skip_without_root() { super::$case("packet") } })*
        }
        mod userspace {
            $(#[test] fn $case() { if !$crate::lab::skip_without_root() { super::$case("userspace") } })*
        }
    };
}

/// `streams` connections through `rig`'s kgate, each moving `bytes` random bytes both
/// ways at once (the client first sends an 8-byte seed naming its stream); asserts
/// that every byte arrived, in order, on the right connection, and that the log lines
/// count them. Returns the connections' log lines.
pub fn move_bulk_both_ways(rig: &Rig, streams: usize, bytes: usize) -> Vec<String> {
    // (bytes, checksum) each server received, and the checksum of what it sent, by seed.
    type Seen = Arc<Mutex<Vec<(u64, usize, u64, u64)>>>;
    let seen: Seen = Arc::default();
    let _server = {
        let seen = seen.clone();
        TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), move |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).expect("a PROXY header");
            let mut seed = [0u8; 8];
            s.read_exact(&mut seed).unwrap();
            let seed = u64::from_le_bytes(seed);
            let mut writer = s.try_clone().unwrap();
            let sender = thread::spawn(move || {
                let sum = send_random(&mut writer, !seed, bytes);
                writer.shutdown(Shutdown::Write).unwrap();
                sum
            });
            let (received, received_sum) = receive_all(&mut s).unwrap();
            let sent_sum = sender.join().unwrap();
            seen.lock()
                .unwrap()
                .push((seed, received, received_sum, sent_sum));
        })
    };
    let frontend = rig.frontend_v4();
    let client_results = rig.lab.client().run(move || {
        thread::scope(|scope| {
            let handles: Vec<_> = (0..streams as u64)
                .map(|seed| {
                    scope.spawn(move || {
                        let mut c = connect(frontend);
                        c.write_all(&(seed + 1).to_le_bytes()).unwrap();
                        let mut writer = c.try_clone().unwrap();
                        let sender = thread::spawn(move || {
                            let sum = send_random(&mut writer, seed + 1, bytes);
                            writer.shutdown(Shutdown::Write).unwrap();
                            sum
                        });
                        let received = receive_all(&mut c).unwrap();
                        (seed + 1, sender.join().unwrap(), received)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    });
    let lines = rig.connection_lines(streams);
    // A server thread records its stream after its client has already read the end.
    let deadline = Instant::now() + IO_TIMEOUT;
    while seen.lock().unwrap().len() < streams && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), streams);
    for (seed, client_sent_sum, (client_received, client_received_sum)) in client_results {
        let &(_, server_received, server_received_sum, server_sent_sum) = seen
            .iter()
            .find(|s| s.0 == seed)
            .expect("the server saw this stream");
        assert_eq!(server_received, bytes, "stream {seed} upstream length");
        assert_eq!(
            server_received_sum, client_sent_sum,
            "stream {seed} upstream bytes"
        );
        assert_eq!(client_received, bytes, "stream {seed} downstream length");
        assert_eq!(
            client_received_sum, server_sent_sum,
            "stream {seed} downstream bytes"
        );
    }
    rig.assert_paths(&lines);
    for line in &lines {
        let expect_in = format!("bytes_in={}", bytes + 8);
        let expect_out = format!("bytes_out={bytes}");
        assert!(
            line.contains(&expect_in) && line.contains(&expect_out),
            "{line}"
        );
    }
    lines
}

/// Connects with [`IO_TIMEOUT`] on every read and write.
pub fn connect(to: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

pub fn set_timeouts(stream: &TcpStream) {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
}

/// xorshift64*: fast, seedable, good enough to make every byte matter.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Writes `len` random bytes from `seed`; returns their checksum.
pub fn send_random(stream: &mut TcpStream, seed: u64, len: usize) -> u64 {
    let mut rng = Rng(seed);
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        hasher.write(&buf[..n]);
        stream.write_all(&buf[..n]).unwrap();
        left -= n;
    }
    hasher.finish()
}

/// Reads to EOF; returns the byte count and checksum.
pub fn receive_all(stream: &mut TcpStream) -> io::Result<(usize, u64)> {
    let mut hasher = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok((total, hasher.finish())),
            n => {
                hasher.write(&buf[..n]);
                total += n;
            }
        }
    }
}

/// Closes with SO_LINGER 0, which sends a RST instead of a FIN.
pub fn socket_reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: SO_LINGER reads one `linger` struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
}
