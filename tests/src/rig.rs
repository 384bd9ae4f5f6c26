//! A ready-made lab for the integration tests: kgate in front of plain TCP backends,
//! with the checks every test ends with (log lines, data plane, no leaked fd or map
//! entry), and helpers to move and verify bytes.

use std::{
    hash::Hasher,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use crate::{
    kgate::{Kgate, global_section, metric_value, scrape_metrics},
    lab::Lab,
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
proxy_protocol = "v2"
{splice_at_once}{backend_keys}
"#,
            gw4 = lab.gateway().v4(),
            gw6 = lab.gateway().v6(),
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

    /// The value of metric `name` (with no labels of its own) right now.
    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&scrape_metrics(&self.lab, METRICS), name, &[])
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

    /// Every connection was carried by this rig's data plane: spliced for sockmap.
    pub fn assert_paths(&self, lines: &[String]) {
        let expected = match self.dataplane {
            "sockmap" => " spliced ",
            _ => " copied ",
        };
        for line in lines {
            assert!(line.contains(expected), "expected{expected}in: {line}");
        }
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
            let maps = if self.dataplane == "sockmap" {
                let pin = self.kgate.pin_path();
                (
                    sock_hash_len(&pin.join("peers")).expect("reading the pinned peers map"),
                    sock_hash_len(&pin.join("spliced")).expect("reading the pinned spliced map"),
                )
            } else {
                (0, 0)
            };
            if fds == self.fds_at_start && maps == (0, 0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "after the test kgate has {fds} fds (started with {}) and (peers, spliced) \
                 entries {maps:?}",
                self.fds_at_start
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Generates `mod sockmap` and `mod userspace`, each with one test per case.
#[macro_export]
macro_rules! on_both_dataplanes {
    ($($case:ident),* $(,)?) => {
        mod sockmap {
            $(#[test] fn $case() { if !$crate::lab::skip_without_root() { super::$case("sockmap") } })*
        }
        mod userspace {
            $(#[test] fn $case() { if !$crate::lab::skip_without_root() { super::$case("userspace") } })*
        }
    };
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
