//! A lab of network namespaces on this machine:
//!
//! ```text
//!  client ns                gateway ns                      backend ns i
//!  kg-gw ------------------ kg-client
//!  10.200.1.2/24            10.200.1.1/24
//!  fd00:200:1::2/64         fd00:200:1::1/64
//!                           kg-b<i> ---------------------- kg-gw
//!                           10.200.(10+i).1/24              10.200.(10+i).2/24
//!                           fd00:200:(10+i)::1/64           fd00:200:(10+i)::2/64
//! ```
//!
//! The client and the backends route everything through the gateway, which forwards, so
//! a "direct" path (no proxy) exists beside the one through kgate.
//!
//! Why things are done the way they are:
//! - Namespaces are entered with `setns(CLONE_NEWNET)` only, never with `ip netns exec`:
//!   that also makes a new mount namespace and remounts /sys, which would hide the bpffs
//!   at /sys/fs/bpf where kgate pins its maps and where the tests read them.
//! - A network namespace belongs to a thread, so in-process peers run on a thread that
//!   entered the namespace first ([`NetNs::run`], [`NetNs::spawn`]).
//! - Names are unique per lab (`kg<pid>n<counter>`), because tests run in parallel
//!   threads and in several processes. The veth ends are created directly inside their
//!   namespaces, so their names never meet in the root namespace and can repeat.
//! - Dropping the lab kills what still runs in its namespaces, deletes them and its temp
//!   directory, also when the test panicked. Labs of a process that died without
//!   cleaning up are swept by the next lab created on this machine.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::proc;

/// What a test prints when it cannot run without root. The only allowed skip.
pub const SKIP_MESSAGE: &str = "skipping: needs root for network namespaces";

/// Where `ip netns add` binds namespaces; the names below are files here.
const NETNS_DIR: &str = "/run/netns";

/// Deadline for one `ip` invocation. They take milliseconds; this only stops a hang.
const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long `Drop` waits for killed processes to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Interface names inside the namespaces (the same in every lab: they never share a
/// namespace with another lab's interfaces).
const IF_TOWARD_GATEWAY: &str = "kg-gw";
const IF_TOWARD_CLIENT: &str = "kg-client";

/// The link of backend `i` uses the third octet `BACKEND_NET_BASE + i`.
const BACKEND_NET_BASE: usize = 10;

/// Backends fit in 10.200.10.0/24 ..= 10.200.255.0/24.
pub const MAX_BACKENDS: usize = 256 - BACKEND_NET_BASE;

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP_STALE: Once = Once::new();

/// A new lab's unique name (`kg<pid>n<counter>`) and its temp directory, created; the
/// first call also sweeps what labs of dead processes left. For the labs of this
/// module and of [`crate::pair`].
pub(crate) fn new_lab_name() -> (String, PathBuf) {
    check_prerequisites();
    SWEEP_STALE.call_once(sweep_stale_labs);
    let pid = std::process::id();
    let unique = format!("kg{pid}n{}", LAB_COUNTER.fetch_add(1, Ordering::Relaxed));
    let temp_dir = std::env::temp_dir().join(format!("kgate-lab-{unique}"));
    fs::create_dir_all(&temp_dir)
        .unwrap_or_else(|e| panic!("creating {}: {e}", temp_dir.display()));
    (unique, temp_dir)
}

/// True when this process may create network namespaces (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests: prints [`SKIP_MESSAGE`] and returns true when not root.
///
/// ```no_run
/// if tests::lab::skip_without_root() {
///     return;
/// }
/// ```
pub fn skip_without_root() -> bool {
    if is_root() {
        false
    } else {
        println!("{SKIP_MESSAGE}");
        true
    }
}

/// One network namespace of the lab, with its address on the link toward the gateway.
#[derive(Clone, Debug)]
pub struct NetNs {
    name: String,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    ifname: String,
}

impl NetNs {
    pub(crate) fn new(name: String, v4: Ipv4Addr, v6: Ipv6Addr, ifname: &str) -> NetNs {
        NetNs {
            name,
            v4,
            v6,
            ifname: ifname.into(),
        }
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This namespace's IPv4 address on its link toward the gateway (for the gateway:
    /// its address on the client link).
    pub fn v4(&self) -> Ipv4Addr {
        self.v4
    }

    /// Like [`NetNs::v4`], for IPv6.
    pub fn v6(&self) -> Ipv6Addr {
        self.v6
    }

    /// The interface that [`NetNs::v4`] is on (for attaching XDP programs, say).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The namespace file that `setns` opens: `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Opens the namespace file. Done before a thread or child starts, so that an error
    /// (the lab is gone) is reported to the caller and not inside the child.
    pub(crate) fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| {
            panic!(
                "cannot open network namespace {}: {e} (was its Lab dropped already?)",
                self.path().display()
            )
        })
    }

    /// Runs `f` in a new thread inside this namespace and waits for it. A panic in `f`
    /// is passed on to the caller.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        match self.spawn(f).join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Runs `f` in a new thread inside this namespace, without waiting.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        spawn_in(self.open(), self.name.clone(), f)
    }

    /// Adds `addr` (in this namespace's /24 toward the gateway) to [`NetNs::ifname`]: a
    /// second source address, for tests that need one blocked and one not.
    pub fn add_v4(&self, addr: Ipv4Addr) {
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &self.ifname,
        ]);
    }

    /// Waits (up to `timeout`) until a TCP socket of this namespace listens on `port`,
    /// by looking at its socket table (a test connection would show in a server's log).
    pub fn wait_listening(&self, port: u16, timeout: Duration) -> bool {
        self.run(move || {
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if is_listening(port) {
                    return true;
                }
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    }

    /// A `Command` whose child enters this namespace (network only, with `setns`) just
    /// before `exec`. Its mount namespace stays ours, so it sees the same /sys/fs/bpf.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let ns = self.open();
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes the setns syscall (async-signal-safe) on an fd
        // opened before the fork; the fd is close-on-exec, so the program never sees it.
        unsafe {
            cmd.pre_exec(move || enter(&ns));
        }
        cmd
    }
}

/// Spawns a thread that enters the namespace `ns` and runs `f`. Used by servers that
/// start a thread per connection and must keep working even if they outlive the file
/// under /run/netns.
pub(crate) fn spawn_in<T: Send + 'static>(
    ns: File,
    ns_name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    std::thread::Builder::new()
        .name(format!("ns {ns_name}"))
        .spawn(move || {
            enter(&ns).unwrap_or_else(|e| panic!("setns into network namespace {ns_name}: {e}"));
            drop(ns);
            f()
        })
        .expect("spawning a thread")
}

/// Whether a TCP socket of this thread's network namespace listens on `port`.
fn is_listening(port: u16) -> bool {
    let port = format!(":{port:04X}");
    // thread-self: /proc/net would show the namespace of the process's main thread.
    ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"]
        .iter()
        .filter_map(|table| fs::read_to_string(table).ok())
        .any(|table| {
            table.lines().skip(1).any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // local_address is fields[1] (HEXADDR:PORT); st is fields[3], 0A = LISTEN.
                fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "0A"
            })
        })
}

/// Moves the calling thread (or the child, in `pre_exec`) into the network namespace.
fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns on an fd we hold open.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// client ns — veth — gateway ns — one veth per backend — backend ns i.
///
/// See the module documentation for the addresses. Dropping it removes everything.
pub struct Lab {
    unique: String,
    client: NetNs,
    gateway: NetNs,
    backends: Vec<NetNs>,
    temp_dir: PathBuf,
    /// Declared last: dropped after everything above, and also owns the cleanup when
    /// `Lab::new` itself panics half-way.
    _cleanup: Cleanup,
}

impl Lab {
    /// Builds the lab. Panics with a clear message when not root or when `ip` is missing.
    pub fn new(backends: usize) -> Lab {
        assert!(
            backends <= MAX_BACKENDS,
            "a lab has at most {MAX_BACKENDS} backends"
        );
        let (unique, temp_dir) = new_lab_name();
        let mut cleanup = Cleanup {
            namespaces: Vec::new(),
            temp_dir: temp_dir.clone(),
        };

        let client = NetNs {
            name: format!("{unique}-client"),
            v4: Ipv4Addr::new(10, 200, 1, 2),
            v6: v6_on_link(1, 2),
            ifname: IF_TOWARD_GATEWAY.into(),
        };
        let gateway = NetNs {
            name: format!("{unique}-gw"),
            v4: Ipv4Addr::new(10, 200, 1, 1),
            v6: v6_on_link(1, 1),
            ifname: IF_TOWARD_CLIENT.into(),
        };
        let backends: Vec<NetNs> = (0..backends)
            .map(|i| NetNs {
                name: format!("{unique}-b{i}"),
                v4: Ipv4Addr::new(10, 200, backend_octet(i), 2),
                v6: v6_on_link(backend_octet(i).into(), 2),
                ifname: IF_TOWARD_GATEWAY.into(),
            })
            .collect();

        for ns in [&client, &gateway].into_iter().chain(&backends) {
            ip(&["netns", "add", &ns.name]);
            cleanup.namespaces.push(ns.name.clone());
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }

        // The client link.
        connect(
            &client,
            &gateway,
            IF_TOWARD_CLIENT,
            (gateway.v4, gateway.v6),
            24,
        );
        // One link per backend.
        for (i, backend) in backends.iter().enumerate() {
            let toward_backend = gateway_ifname_toward_backend(i);
            let octet = backend_octet(i);
            let gw_addrs = (
                Ipv4Addr::new(10, 200, octet, 1),
                v6_on_link(octet.into(), 1),
            );
            connect(backend, &gateway, &toward_backend, gw_addrs, 24);
        }

        gateway.run(|| {
            for knob in [
                "/proc/sys/net/ipv4/ip_forward",
                "/proc/sys/net/ipv6/conf/all/forwarding",
            ] {
                // /proc/sys/net shows the namespace of the thread that opens it.
                fs::write(knob, "1").unwrap_or_else(|e| panic!("writing {knob}: {e}"));
            }
        });

        Lab {
            unique,
            client,
            gateway,
            backends,
            temp_dir,
            _cleanup: cleanup,
        }
    }

    pub fn client(&self) -> &NetNs {
        &self.client
    }

    pub fn gateway(&self) -> &NetNs {
        &self.gateway
    }

    /// Backend `i` (0-based). Panics if there is no such backend.
    pub fn backend(&self, i: usize) -> &NetNs {
        self.backends.get(i).unwrap_or_else(|| {
            panic!(
                "this lab has {} backends, not {}",
                self.backends.len(),
                i + 1
            )
        })
    }

    pub fn backends(&self) -> &[NetNs] {
        &self.backends
    }

    /// A name unique to this lab across threads and processes, e.g. `kg12345n3`, for
    /// pin directories, control sockets and temp files.
    pub fn unique_name(&self) -> &str {
        &self.unique
    }

    /// A directory for this lab's files (configs, scripts); removed when the lab drops.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// The gateway's IPv4 address on the link toward backend `i` (10.200.(10+i).1).
    pub fn gateway_v4_toward_backend(&self, i: usize) -> Ipv4Addr {
        self.backend(i);
        Ipv4Addr::new(10, 200, backend_octet(i), 1)
    }

    /// The gateway's IPv6 address on the link toward backend `i` (fd00:200:(10+i)::1).
    pub fn gateway_v6_toward_backend(&self, i: usize) -> Ipv6Addr {
        self.backend(i);
        v6_on_link(backend_octet(i).into(), 1)
    }

    /// The gateway's interface toward backend `i`.
    pub fn gateway_ifname_toward_backend(&self, i: usize) -> String {
        self.backend(i);
        gateway_ifname_toward_backend(i)
    }
}

fn backend_octet(i: usize) -> u8 {
    u8::try_from(BACKEND_NET_BASE + i).expect("backend index checked against MAX_BACKENDS")
}

fn gateway_ifname_toward_backend(i: usize) -> String {
    format!("kg-b{i}")
}

/// `fd00:200:<link>::<host>`. The link number is written as hex digits that read like
/// the decimal octet of the IPv4 network (link 10 is `fd00:200:10::`), as the
/// addressing plan spells it.
fn v6_on_link(link: u16, host: u16) -> Ipv6Addr {
    let link = u16::from_str_radix(&link.to_string(), 16).expect("decimal digits are hex digits");
    Ipv6Addr::new(0xfd00, 0x200, link, 0, 0, 0, 0, host)
}

/// Makes a veth between `leaf` (client or backend) and the gateway, addresses both ends
/// and routes the leaf's default through the gateway.
fn connect(
    leaf: &NetNs,
    gateway: &NetNs,
    gateway_ifname: &str,
    (gw_v4, gw_v6): (Ipv4Addr, Ipv6Addr),
    prefix_v4: u8,
) {
    // Both ends are born inside their namespaces: no name ever exists in the root one.
    ip(&[
        "link",
        "add",
        &leaf.ifname,
        "netns",
        &leaf.name,
        "type",
        "veth",
        "peer",
        "name",
        gateway_ifname,
        "netns",
        &gateway.name,
    ]);
    for (ns, ifname, v4, v6) in [
        (&leaf.name, leaf.ifname.as_str(), leaf.v4, leaf.v6),
        (&gateway.name, gateway_ifname, gw_v4, gw_v6),
    ] {
        // `nodad`: the address is usable at once, not "tentative" for a second or two.
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{v4}/{prefix_v4}"),
            "dev",
            ifname,
        ]);
        ip(&[
            "-n",
            ns,
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            ifname,
            "nodad",
        ]);
        ip(&["-n", ns, "link", "set", ifname, "up"]);
    }
    ip(&[
        "-n",
        &leaf.name,
        "route",
        "add",
        "default",
        "via",
        &gw_v4.to_string(),
    ]);
    ip(&[
        "-n",
        &leaf.name,
        "-6",
        "route",
        "add",
        "default",
        "via",
        &gw_v6.to_string(),
    ]);
}

/// Runs `ip ARGS`, panicking with its stderr when it fails (lab setup cannot go on).
pub(crate) fn ip(args: &[&str]) {
    let output = proc::run_with_timeout(Command::new("ip").args(args), IP_TIMEOUT)
        .unwrap_or_else(|e| panic!("lab setup: running `ip {}`: {e}", args.join(" ")));
    if !output.status.success() {
        panic!(
            "lab setup: `ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
}

fn check_prerequisites() {
    if !is_root() {
        panic!(
            "the kgate lab needs root to create network namespaces: run the tests as root \
             (`cargo xtask test` does), or make the test call `tests::lab::skip_without_root()` first"
        );
    }
    let ip_works = proc::run_with_timeout(Command::new("ip").arg("-V"), IP_TIMEOUT)
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ip_works {
        panic!("the kgate lab needs `ip` from iproute2 in PATH: apt-get install iproute2");
    }
}

/// Removes the lab's namespaces and temp directory; also used half-way through setup.
pub(crate) struct Cleanup {
    pub(crate) namespaces: Vec<String>,
    pub(crate) temp_dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.namespaces {
            remove_namespace(name);
        }
        let _ = fs::remove_dir_all(&self.temp_dir);
    }
}

/// Kills the processes inside namespace `name`, then deletes it. Never panics.
fn remove_namespace(name: &str) {
    let path = Path::new(NETNS_DIR).join(name);
    // Processes first: a namespace lives (with its veths and addresses) as long as a
    // process is inside, even after `ip netns del`.
    proc::kill_processes_in_netns(&path, KILL_TIMEOUT);
    match proc::run_with_timeout(Command::new("ip").args(["netns", "del", name]), IP_TIMEOUT) {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "kgate lab: `ip netns del {name}` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(e) => eprintln!("kgate lab: `ip netns del {name}`: {e}"),
    }
}

/// Deletes what labs of dead processes left behind (a test binary killed with SIGKILL
/// never runs `Drop`): namespaces, temp directories and kgate pin directories whose
/// name carries the pid of a process that no longer exists.
fn sweep_stale_labs() {
    let stale = |name: &str| -> bool {
        lab_pid(name).is_some_and(|pid| pid != std::process::id() && !proc::pid_exists(pid))
    };
    if let Ok(entries) = fs::read_dir(NETNS_DIR) {
        for entry in entries.flatten() {
            if let Some(name) = entry.file_name().to_str()
                && stale(name)
            {
                remove_namespace(name);
            }
        }
    }
    let leftovers = [
        (std::env::temp_dir(), "kgate-lab-"),
        (PathBuf::from("/sys/fs/bpf"), "kgate-test-"),
    ];
    for (dir, prefix) in leftovers {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Some(rest) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(prefix))
                && stale(rest)
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// The pid in a lab name `kg<pid>n<counter>...`, if `name` is one.
fn lab_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("kg")?;
    let (pid, rest) = rest.split_once('n')?;
    let counter_len = rest.bytes().take_while(u8::is_ascii_digit).count();
    if counter_len == 0 {
        return None;
    }
    pid.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::TcpServer;
    use std::io::{Read, Write};
    use std::net::{IpAddr, SocketAddr, TcpStream};
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Arc, Mutex};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A server that writes one line naming itself and the peer it saw, then closes.
    fn hello_server(ns: &NetNs, listen: SocketAddr, peers: Arc<Mutex<Vec<IpAddr>>>) -> TcpServer {
        TcpServer::start(ns, listen, move |mut stream| {
            let peer = stream.peer_addr().unwrap().ip();
            peers.lock().unwrap().push(peer);
            let _ = stream.write_all(b"hello\n");
        })
    }

    fn fetch(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    fn namespace_exists(name: &str) -> bool {
        let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        listed
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name))
            || Path::new(NETNS_DIR).join(name).exists()
    }

    #[test]
    fn client_reaches_gateway_over_v4_and_v6_and_backend_through_forwarding() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(2);
        let names: Vec<String> = [lab.client(), lab.gateway()]
            .into_iter()
            .chain(lab.backends())
            .map(|ns| ns.name().to_owned())
            .collect();
        assert_eq!(names.len(), 4);
        assert!(names.iter().all(|n| namespace_exists(n)), "{names:?}");
        assert_eq!(lab.backend(1).v4(), Ipv4Addr::new(10, 200, 11, 2));
        assert_eq!(
            lab.backend(1).v6(),
            "fd00:200:11::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            lab.gateway_v4_toward_backend(1),
            Ipv4Addr::new(10, 200, 11, 1)
        );

        let peers = Arc::new(Mutex::new(Vec::new()));
        let gw_v4 = SocketAddr::new(lab.gateway().v4().into(), 7000);
        let gw_v6 = SocketAddr::new(lab.gateway().v6().into(), 7000);
        let b1_v4 = SocketAddr::new(lab.backend(1).v4().into(), 7001);
        let b1_v6 = SocketAddr::new(lab.backend(1).v6().into(), 7001);
        let servers = [
            hello_server(lab.gateway(), gw_v4, peers.clone()),
            hello_server(lab.gateway(), gw_v6, peers.clone()),
            hello_server(lab.backend(1), b1_v4, peers.clone()),
            hello_server(lab.backend(1), b1_v6, peers.clone()),
        ];

        let replies = lab
            .client()
            .run(move || [gw_v4, gw_v6, b1_v4, b1_v6].map(fetch));
        assert_eq!(replies, ["hello\n"; 4].map(String::from));
        for server in &servers {
            assert!(server.wait_accepted(1, TIMEOUT), "one connection each");
        }
        // Routed, not translated: every server saw the client's own address.
        let client_v4: IpAddr = lab.client().v4().into();
        let client_v6: IpAddr = lab.client().v6().into();
        let mut seen = peers.lock().unwrap().clone();
        seen.sort();
        assert_eq!(seen, [client_v4, client_v4, client_v6, client_v6]);

        // The forwarding knobs are set in the gateway only.
        let forwarding =
            |ns: &NetNs| ns.run(|| fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap());
        assert_eq!(forwarding(lab.gateway()).trim(), "1");
        assert_eq!(forwarding(lab.client()).trim(), "0");

        drop(servers);
        drop(lab);
        for name in &names {
            assert!(!namespace_exists(name), "namespace {name} survived the lab");
        }
    }

    #[test]
    fn commands_enter_the_network_namespace_only_and_die_with_the_lab() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(1);
        let mut child = lab.backend(0).command("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        let ns_of = |path: String| {
            let m = fs::metadata(path).unwrap();
            (m.dev(), m.ino())
        };
        // setns happens between fork and exec; wait until the exec'd program runs.
        let deadline = std::time::Instant::now() + TIMEOUT;
        while fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
            assert!(std::time::Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(proc::POLL);
        }
        assert_eq!(
            ns_of(format!("/proc/{pid}/ns/net")),
            ns_of(lab.backend(0).path().display().to_string())
        );
        // Same mount namespace as ours: the same /sys/fs/bpf.
        assert_eq!(
            ns_of(format!("/proc/{pid}/ns/mnt")),
            ns_of("/proc/self/ns/mnt".into())
        );
        let temp_dir = lab.temp_dir().to_owned();
        assert!(temp_dir.is_dir());

        drop(lab);
        let status = proc::wait_timeout(&mut child, TIMEOUT).expect("child killed by the lab");
        assert!(!status.success());
        assert!(!temp_dir.exists());
    }

    #[test]
    fn parallel_labs_have_distinct_names_and_both_work() {
        if skip_without_root() {
            return;
        }
        let (a, b) = (Lab::new(0), Lab::new(0));
        assert_ne!(a.unique_name(), b.unique_name());
        assert_eq!(lab_pid(a.unique_name()), Some(std::process::id()));
        let port = 7002;
        let servers: Vec<TcpServer> = [&a, &b]
            .map(|lab| {
                TcpServer::start(
                    lab.gateway(),
                    SocketAddr::new(lab.gateway().v6().into(), port),
                    |mut s| {
                        let _ = s.write_all(b"hello\n");
                    },
                )
            })
            .into();
        for lab in [&a, &b] {
            let addr = SocketAddr::new(lab.gateway().v6().into(), port);
            assert_eq!(lab.client().run(move || fetch(addr)), "hello\n");
        }
        assert!(servers.iter().all(|s| s.wait_accepted(1, TIMEOUT)));
    }

    #[test]
    fn a_panic_in_run_reaches_the_caller() {
        if skip_without_root() {
            return;
        }
        let lab = Lab::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            lab.client().run(|| panic!("boom in the namespace"))
        }));
        let message = result.unwrap_err();
        assert_eq!(
            message.downcast_ref::<&str>(),
            Some(&"boom in the namespace")
        );
    }

    #[test]
    fn lab_names_carry_the_pid() {
        assert_eq!(lab_pid("kg123n4"), Some(123));
        assert_eq!(lab_pid("kg123n4-client"), Some(123));
        assert_eq!(lab_pid("kgx"), None);
        assert_eq!(lab_pid("kg123n-client"), None);
        assert_eq!(lab_pid("other"), None);
        assert_eq!(
            v6_on_link(10, 2),
            "fd00:200:10::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            v6_on_link(1, 1),
            "fd00:200:1::1".parse::<Ipv6Addr>().unwrap()
        );
    }
}
