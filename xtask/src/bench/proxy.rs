//! The five paths a benchmark connection can take from the lab's client to its
//! backend, and the proxy process (if any) that each needs in the gateway.

use std::{
    fs::{self, File},
    net::{IpAddr, SocketAddr},
    path::{Path as FsPath, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use ::tests::{
    kgate::{Kgate, global_section, pin_path_for},
    lab::Lab,
    packet::rules_len,
    sockmap::sock_hash_len,
};
use anyhow::{Context as _, bail};

use super::{Settings, sys};

/// The backend's port (every workload's server listens there in turn).
pub const BACKEND_PORT: u16 = 5001;
/// The proxies' frontend port on the gateway's client-side address.
const FRONTEND_PORT: u16 = 2525;
/// How long HAProxy gets to open its listener, and to exit after SIGTERM.
const HAPROXY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pipes HAProxy may use for splicing at once (2 files each): enough for the bulk
/// test's 8 streams both ways; the default (maxconn / 4) would cost open files that
/// the scale test needs.
const HAPROXY_MAXPIPES: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Path {
    /// Client to backend, routed by the gateway's kernel: the lab's physical limit.
    Direct,
    /// kgate with the eBPF sockmap data plane.
    Sockmap,
    /// kgate with the packet data plane: segments forwarded at TC after the handoff.
    Packet,
    /// kgate copying in userspace.
    Userspace,
    /// HAProxy in TCP mode, `send-proxy-v2`, `option splice-auto`.
    Haproxy,
}

impl Path {
    pub const ALL: [Path; 5] = [
        Path::Direct,
        Path::Sockmap,
        Path::Packet,
        Path::Userspace,
        Path::Haproxy,
    ];

    /// Stable name in the JSON.
    pub fn key(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Sockmap => "kgate_sockmap",
            Path::Packet => "kgate_packet",
            Path::Userspace => "kgate_userspace",
            Path::Haproxy => "haproxy",
        }
    }

    /// Name in tables and the chart.
    pub fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Sockmap => "kgate sockmap",
            Path::Packet => "kgate packet",
            Path::Userspace => "kgate userspace",
            Path::Haproxy => "HAProxy",
        }
    }
}

/// A pinned map of kgate's that holds two entries per connection carried in the
/// kernel: the splice's sockets (sockmap), the TC programs' rules (packet).
pub struct HeldEntries {
    pub map: PathBuf,
    /// What its entries are, for messages.
    pub what: &'static str,
    pub len: fn(&FsPath) -> anyhow::Result<usize>,
}

/// A per-CPU counter of kgate's, in a pinned map.
#[derive(Clone)]
pub struct KernelBytes {
    map: PathBuf,
    field: &'static str,
    /// Its name in a run's details.
    pub key: &'static str,
}

impl KernelBytes {
    pub fn read(&self) -> anyhow::Result<u64> {
        self.read_field(self.field)
    }

    /// Another field of the same map.
    pub fn read_field(&self, field: &str) -> anyhow::Result<u64> {
        Ok(sys::sum_bpftool_field(
            &sys::bpftool_dump(&self.map)?,
            field,
        ))
    }
}

/// A path ready to carry connections: where the client connects, whether the backend
/// gets a PROXY header, and the proxy process, stopped on drop.
pub struct Running {
    pub path: Path,
    /// Where the client connects.
    pub target: SocketAddr,
    /// The backend's listen address.
    pub backend: SocketAddr,
    /// The client address the PROXY header must carry; `None` on the direct path.
    pub header_source: Option<IpAddr>,
    proxy: Proxy,
}

enum Proxy {
    None,
    Kgate(Box<Kgate>),
    Haproxy(Haproxy),
}

impl Running {
    /// `haproxy_maxconn`: HAProxy's `maxconn`, above the scale test's connections.
    pub fn start(
        path: Path,
        lab: &Lab,
        kgate_bin: &FsPath,
        settings: &Settings,
        haproxy_maxconn: usize,
    ) -> anyhow::Result<Running> {
        let backend = SocketAddr::new(lab.backend(0).v4().into(), BACKEND_PORT);
        let frontend = SocketAddr::new(lab.gateway().v4().into(), FRONTEND_PORT);
        let client: IpAddr = lab.client().v4().into();
        let (target, header_source, proxy) = match path {
            Path::Direct => (backend, None, Proxy::None),
            Path::Sockmap | Path::Packet | Path::Userspace => {
                let dataplane = match path {
                    Path::Sockmap => "sockmap",
                    Path::Packet => "packet",
                    _ => "userspace",
                };
                let kgate = Kgate::start_with(
                    lab,
                    kgate_bin,
                    &kgate_config(
                        lab,
                        dataplane,
                        frontend,
                        backend,
                        settings.queue_limit.as_deref(),
                    ),
                );
                // The packet plane serves without its programs too, copying: not the
                // path to measure.
                if !kgate.log().contains(&format!("dataplane=\"{dataplane}\""))
                    || kgate.log().contains("programs cannot load")
                {
                    bail!(
                        "kgate did not start the {dataplane} data plane; its log:\n{}",
                        kgate.log()
                    );
                }
                (frontend, Some(client), Proxy::Kgate(Box::new(kgate)))
            }
            Path::Haproxy => (
                frontend,
                Some(client),
                Proxy::Haproxy(Haproxy::start(lab, frontend, backend, haproxy_maxconn)?),
            ),
        };
        Ok(Running {
            path,
            target,
            backend,
            header_source,
            proxy,
        })
    }

    /// The proxy's process id.
    pub fn pid(&self) -> Option<u32> {
        match &self.proxy {
            Proxy::None => None,
            Proxy::Kgate(k) => Some(k.pid()),
            Proxy::Haproxy(h) => Some(h.pid),
        }
    }

    /// Where kgate's connections carried in the kernel can be counted.
    pub fn held_entries(&self, lab: &Lab) -> Option<HeldEntries> {
        let pins = pin_path_for(lab);
        match self.path {
            Path::Sockmap => Some(HeldEntries {
                map: pins.join("peers"),
                what: "sockets in kgate's peers map",
                len: sock_hash_len,
            }),
            Path::Packet => Some(HeldEntries {
                map: pins.join("packet_rules"),
                what: "rules in kgate's packet_rules map",
                len: rules_len,
            }),
            _ => None,
        }
    }

    /// Where the kernel counts the bytes it moves for kgate: the splice's redirected
    /// bytes (sockmap), the TC programs' forwarded ones (packet).
    pub fn kernel_bytes(&self, lab: &Lab) -> Option<KernelBytes> {
        let pins = pin_path_for(lab);
        match self.path {
            Path::Sockmap => Some(KernelBytes {
                map: pins.join("splice_stats"),
                field: "redirected_bytes",
                key: "spliced_bytes",
            }),
            Path::Packet => Some(KernelBytes {
                map: pins.join("packet_stats"),
                field: "forwarded_bytes",
                key: "forwarded_bytes",
            }),
            _ => None,
        }
    }

    /// Stops the proxy; an error if it did not exit cleanly.
    pub fn stop(self) -> anyhow::Result<()> {
        match self.proxy {
            Proxy::None => Ok(()),
            Proxy::Kgate(mut kgate) => {
                kgate.stop();
                match kgate.exit_status() {
                    Some(status) if status.success() => Ok(()),
                    other => bail!(
                        "kgate exited with {other:?} when stopped; its log:\n{}",
                        kgate.log()
                    ),
                }
            }
            Proxy::Haproxy(haproxy) => {
                drop(haproxy);
                Ok(())
            }
        }
    }
}

/// kgate in front of the lab's one backend: no health checks (the server is always
/// up, as HAProxy's without `check`), defaults for everything else but `queue_limit`
/// when given.
fn kgate_config(
    lab: &Lab,
    dataplane: &str,
    frontend: SocketAddr,
    backend: SocketAddr,
    queue_limit: Option<&str>,
) -> String {
    let queue_limit = queue_limit.map_or_else(String::new, |q| format!("queue_limit = {q:?}\n"));
    // A connection still open at the end of a run is a failure already reported;
    // kgate need not wait the default 30 s for it at SIGTERM.
    format!(
        "{global}shutdown_timeout = \"2s\"\n\n[[frontends]]\nname = \"bench\"\nlisten = [\"{frontend}\"]\nbackend = \"bench\"\n\
         \n[[backends]]\nname = \"bench\"\nproxy_protocol = \"v2\"\n{queue_limit}\
         \n[[backends.servers]]\nname = \"node0\"\naddress = \"{backend}\"\n",
        global = global_section(lab, dataplane),
    )
}

/// HAProxy as a mail gateway would run it in TCP mode: PROXY v2 to the server,
/// kernel splicing where it pays (`splice-auto`), no logging (kgate's per-connection
/// log lines are off during the benchmark too), enough connections for the scale test.
fn haproxy_config(frontend: SocketAddr, backend: SocketAddr, maxconn: usize) -> String {
    format!(
        "global\n    maxconn {maxconn}\n    maxpipes {HAPROXY_MAXPIPES}\n\n\
         defaults\n    mode tcp\n    option splice-auto\n    timeout connect 5s\n    \
         timeout client 2m\n    timeout server 2m\n\n\
         frontend bench\n    bind {frontend}\n    maxconn {maxconn}\n    \
         default_backend bench\n\n\
         backend bench\n    server node0 {backend} send-proxy-v2\n"
    )
}

/// HAProxy in the gateway namespace, in the foreground (`-db`); killed by its pid.
struct Haproxy {
    child: Child,
    pid: u32,
    log_path: PathBuf,
}

impl Haproxy {
    fn start(
        lab: &Lab,
        frontend: SocketAddr,
        backend: SocketAddr,
        maxconn: usize,
    ) -> anyhow::Result<Haproxy> {
        let config_path = lab.temp_dir().join("haproxy.cfg");
        fs::write(&config_path, haproxy_config(frontend, backend, maxconn))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log_path = lab.temp_dir().join("haproxy.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = lab
            .gateway()
            .command("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy: is the haproxy package installed?")?;
        let pid = child.id();
        let mut haproxy = Haproxy {
            child,
            pid,
            log_path,
        };
        let deadline = Instant::now() + HAPROXY_TIMEOUT;
        while !sys::listens_on(pid, frontend) {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                bail!(
                    "haproxy exited ({status}) before it listened on {frontend}; its output:\n{}",
                    haproxy.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "haproxy did not listen on {frontend} within {HAPROXY_TIMEOUT:?}; its output:\n{}",
                    haproxy.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(haproxy)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own unreaped child: its pid cannot be reused.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + HAPROXY_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Ok(None) => {
                    eprintln!("bench: haproxy (pid {}) ignored SIGTERM: SIGKILL", self.pid);
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return;
                }
                _ => return,
            }
        }
    }
}
