//! `kgate upgrade`: the running kgate hands its listening sockets to a new binary and
//! drains. Not one connection refused, not one byte lost, the old connections (spliced
//! on the sockmap plane) finish in the old process, and the new one owns the pins and
//! the XDP attachment.

use std::{
    fs,
    hash::{DefaultHasher, Hasher},
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    bpftool,
    kgate::{Kgate, control_socket_for, global_section, kgate_bin, pin_path_for},
    lab::Lab,
    on_every_dataplane,
    rig::{Rng, connect, receive_all, set_timeouts},
    xdp::{kgate_block_ok, xdp_counters},
};

on_every_dataplane!(
    an_upgrade_refuses_no_connection_and_lets_the_old_ones_finish,
    an_upgrade_to_a_kgate_that_cannot_start_changes_nothing,
);

const PORT: u16 = 2525;
/// Long transfers running through the upgrade, each at least this many bytes each way,
/// and on until the upgrade has returned, however long it takes (at most a minute).
const LONG_TRANSFERS: usize = 4;
const LONG_BYTES: usize = 24 << 20;
/// A long transfer writes this much, then pauses, so that it outlasts the handover.
const CHUNK: usize = 128 << 10;
const PAUSE: Duration = Duration::from_millis(12);

/// Echoes everything after the PROXY header; counts headers whose source is not the
/// client's own address.
fn echo_backend(lab: &Lab, client: IpAddr, wrong_source: Arc<AtomicUsize>) -> TcpServer {
    TcpServer::start(
        lab.backend(0),
        SocketAddr::new(lab.backend(0).v4().into(), PORT),
        move |mut s| {
            set_timeouts(&s);
            match read_proxy_header(&mut s) {
                Ok(header) if header.source.map(|a| a.ip()) == Some(client) => {}
                _ => {
                    wrong_source.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        },
    )
}

/// A kgate that another one started: stopped by pid (SIGTERM, then SIGKILL) on drop.
struct Started(u32);

impl Started {
    fn is_running(&self) -> bool {
        // An exited child of the old kgate is a zombie until reaped: not running.
        fs::read_to_string(format!("/proc/{}/stat", self.0))
            .is_ok_and(|stat| !stat.contains(") Z "))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let pid = self.0 as libc::pid_t;
        for signal in [libc::SIGTERM, libc::SIGKILL] {
            // SAFETY: kill(2) on the pid the upgrade reported, ours to stop.
            unsafe { libc::kill(pid, signal) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.is_running() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if !self.is_running() {
                return;
            }
        }
    }
}

/// One short connection: a line out, the same line back, closed. The error says how
/// it failed.
fn ping(frontend: SocketAddr, n: usize) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&frontend, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    set_timeouts(&stream);
    let line = format!("ping {n}\n");
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut back = String::new();
    stream
        .read_to_string(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if back == line {
        Ok(())
    } else {
        Err(format!("sent {line:?}, got {back:?}"))
    }
}

/// What the connect loop saw: when each connection succeeded, and every failure.
#[derive(Default)]
struct Loop {
    succeeded: Vec<Instant>,
    failed: Vec<String>,
}

/// Puts a copy of `binary` at `path` as dpkg does: a new file renamed over the old.
/// `cp` writes it, not this process: a test thread forking meanwhile would carry the
/// open file into its child, and executing the copy would fail with ETXTBSY.
fn install(binary: &Path, path: &Path) {
    let staged = path.with_extension("new");
    let cp = Command::new("cp")
        .arg(binary)
        .arg(&staged)
        .status()
        .unwrap();
    assert!(cp.success(), "cp {} {}", binary.display(), staged.display());
    fs::rename(&staged, path).unwrap();
}

/// The map id behind a pin, from bpftool (which must be able to read it).
fn pinned_map_id(pin: &Path) -> u64 {
    bpftool::show_json(pin)["id"].as_u64().expect("a map id")
}

/// The server names in the pinned `servers` map, as bpftool decodes it (the names are
/// NUL-padded byte arrays there).
fn bpftool_server_names(pin: &Path) -> Vec<String> {
    let dump = bpftool::dump_json(pin);
    // The map holds live servers only, names as text; a hash, so sorted here.
    let mut names: Vec<String> = dump
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            entry["formatted"]["value"]["server"]
                .as_str()
                .unwrap_or_else(|| panic!("a server name as text: {entry}"))
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// The id of the XDP program on the gateway's client interface, if one is attached.
fn xdp_program(lab: &Lab) -> Option<u64> {
    let out = Command::new("ip")
        .args([
            "-j",
            "-n",
            lab.gateway().name(),
            "link",
            "show",
            "dev",
            lab.gateway().ifname(),
        ])
        .output()
        .expect("running ip link show");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["xdp"]["prog"]["id"].as_u64()
}

/// Every notification that arrived on the fake systemd socket: the sender's pid (from
/// its credentials, as systemd reads them to apply `NotifyAccess=main`) and the text.
fn notifications(socket: &UnixDatagram) -> Vec<(u32, String)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut got = Vec::new();
    loop {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!(nix::sys::socket::UnixCredentials);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let Ok(message) = recvmsg::<()>(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        ) else {
            return got;
        };
        let pid = message
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid() as u32),
                _ => None,
            })
            .expect("credentials (SO_PASSCRED)");
        let len = message.bytes;
        got.push((pid, String::from_utf8_lossy(&buf[..len]).into_owned()));
    }
}

fn an_upgrade_refuses_no_connection_and_lets_the_old_ones_finish(dataplane: &'static str) {
    let lab = Lab::new(1);
    let client: IpAddr = lab.client().v4().into();
    let wrong_source = Arc::new(AtomicUsize::new(0));
    let _backend = echo_backend(&lab, client, wrong_source.clone());

    // The installed binary, replaced below the way dpkg replaces it (a new file renamed
    // over the old one) while the old kgate runs from it.
    let installed = lab.temp_dir().join("kgate");
    install(&kgate_bin(), &installed);
    // systemd's side of sd_notify, to see who tells it what.
    let notify_path = lab.temp_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    nix::sys::socket::setsockopt(&notify, nix::sys::socket::sockopt::PassCred, &true).unwrap();

    let frontend = SocketAddr::new(lab.gateway().v4().into(), PORT);
    let config = format!(
        "{}shutdown_timeout = \"60s\"\nmetrics_listen = \"127.0.0.1:9464\"\n\n\
         [[frontends]]\nname = \"smtp\"\nlisten = [\"{frontend}\"]\nbackend = \"mail\"\n\n\
         [[backends]]\nname = \"mail\"\nsplice_after = \"0s\"\n\
         [[backends.servers]]\nname = \"node0\"\naddress = \"{backend}:{PORT}\"\n\
         [[backends.servers]]\nname = \"node1\"\naddress = \"{backend}:{}\"\n\n\
         [xdp]\ninterfaces = [\"{}\"]\n",
        global_section(&lab, dataplane),
        PORT + 1,
        lab.gateway().ifname(),
        backend = lab.backend(0).v4(),
    );
    let mut old = Kgate::start_with_env(
        &lab,
        &installed,
        &config,
        &[("NOTIFY_SOCKET", &notify_path)],
    );
    assert_eq!(
        notifications(&notify),
        [(old.pid(), "READY=1\n".to_owned())]
    );
    // The operator's state of a server outlives the process, as it outlives a reload.
    assert!(old.server_set("mail/node1", "maint").status.success());
    let pin_path = pin_path_for(&lab);
    let old_servers_map = pinned_map_id(&pin_path.join("servers"));
    let old_xdp_program = xdp_program(&lab).expect("XDP attached");

    // Long transfers, started before the upgrade and paced, on until it has returned.
    let upgrade_returned = Arc::new(AtomicBool::new(false));
    let long: Vec<_> = (0..LONG_TRANSFERS)
        .map(|i| {
            let ns = lab.client().clone();
            let upgrade_returned = upgrade_returned.clone();
            ns.clone().spawn(move || {
                let stream = connect(frontend);
                let mut reader = stream.try_clone().unwrap();
                let received = thread::spawn(move || receive_all(&mut reader));
                let mut writer = stream;
                let mut rng = Rng(0x5eed + i as u64);
                let mut hasher = DefaultHasher::new();
                let mut chunk = vec![0u8; CHUNK];
                let mut sent = 0;
                let deadline = Instant::now() + Duration::from_secs(60);
                while sent < LONG_BYTES
                    || (!upgrade_returned.load(Ordering::SeqCst) && Instant::now() < deadline)
                {
                    rng.fill(&mut chunk);
                    hasher.write(&chunk);
                    writer.write_all(&chunk).unwrap();
                    sent += CHUNK;
                    thread::sleep(PAUSE);
                }
                writer.shutdown(Shutdown::Write).unwrap();
                let echoed = received.join().unwrap().expect("reading the echo");
                ((sent, hasher.finish()), echoed, Instant::now())
            })
        })
        .collect();

    // The connect loop, from before the upgrade to after the old kgate has gone.
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Loop::default()));
    let connect_loop = {
        let (stop, seen) = (stop.clone(), seen.clone());
        lab.client().spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 100_000 {
                let result = ping(frontend, n);
                let mut seen = seen.lock().unwrap();
                match result {
                    Ok(()) => seen.succeeded.push(Instant::now()),
                    Err(e) => seen.failed.push(format!("connection {n}: {e}")),
                }
                drop(seen);
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
        })
    };

    thread::sleep(Duration::from_millis(700));
    // The package upgrade: a new file in place of the one the old kgate runs.
    install(&kgate_bin(), &installed);

    let upgrade_started = Instant::now();
    let out = Command::new(&installed)
        .args(["upgrade", "--socket"])
        .arg(control_socket_for(&lab))
        .output()
        .expect("running kgate upgrade");
    let upgraded = Instant::now();
    upgrade_returned.store(true, Ordering::SeqCst);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kgate upgrade failed: {stdout}{}\nkgate's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        old.log()
    );
    let new_pid: u32 = stdout
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no new pid in {stdout:?}"));
    let new = Started(new_pid);
    assert_ne!(new_pid, old.pid());
    // The new process runs the new file; the old one, the file that was replaced.
    let exe = |pid: u32| fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe(new_pid), installed);
    assert!(
        exe(old.pid()).display().to_string().ends_with(" (deleted)"),
        "{:?}",
        exe(old.pid())
    );
    // The old kgate, the main process until then, names the new one: systemd takes
    // that with the unit's default NotifyAccess=main.
    assert_eq!(
        notifications(&notify),
        [(old.pid(), format!("MAINPID={new_pid}\nREADY=1\n"))],
    );

    // The old kgate drains: it exits once the long transfers are done, well before
    // its shutdown_timeout, and removes nothing that is now the new one's.
    let long: Vec<_> = long.into_iter().map(|t| t.join().unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while old.is_running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !old.is_running(),
        "the old kgate did not exit after draining"
    );
    let old_gone = Instant::now();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    connect_loop.join().unwrap();
    old.stop();
    assert!(
        old.exit_status().unwrap().success(),
        "{:?}",
        old.exit_status()
    );
    let log = old.log();
    assert!(
        log.contains("every connection has finished; exiting"),
        "the old kgate closed connections instead of letting them finish:\n{log}"
    );
    assert!(new.is_running(), "the new kgate is gone:\n{log}");

    // Not one refused or broken connection; some were made during the handover.
    let seen = seen.lock().unwrap();
    assert!(
        seen.failed.is_empty(),
        "{} connections failed, the first: {:?}",
        seen.failed.len(),
        seen.failed.first()
    );
    let during = seen
        .succeeded
        .iter()
        .filter(|t| **t >= upgrade_started && **t <= old_gone)
        .count();
    assert!(during > 0, "no connection was made during the handover");
    // Not one byte lost, and every long transfer outlived the handover.
    for (i, (sent, echoed, finished)) in long.iter().enumerate() {
        assert_eq!(echoed, sent, "long transfer {i}: (bytes, checksum) echoed");
        assert!(
            *finished > upgraded,
            "long transfer {i} ended before the upgrade did"
        );
    }
    assert_eq!(
        wrong_source.load(Ordering::SeqCst),
        0,
        "PROXY header sources"
    );
    if dataplane == "sockmap" {
        // The old kgate's lines for the long transfers: they spliced.
        let long_bytes: Vec<String> = long
            .iter()
            .map(|((sent, _), _, _)| format!("bytes_in={sent} "))
            .collect();
        let old_lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("kgate::conn") && long_bytes.iter().any(|b| l.contains(b)))
            .collect();
        assert_eq!(old_lines.len(), LONG_TRANSFERS, "{log}");
        assert!(
            old_lines.iter().all(|l| l.contains(" spliced ")),
            "{old_lines:?}"
        );
    }

    // The new kgate owns the pins (its own maps, readable by bpftool) and the control
    // socket, where kgate status finds it.
    let servers_pin = pin_path.join("servers");
    assert_ne!(pinned_map_id(&servers_pin), old_servers_map);
    assert_eq!(bpftool_server_names(&servers_pin), ["node0", "node1"]);
    if dataplane == "sockmap" {
        for pin in ["peers", "spliced", "splice_stats"] {
            pinned_map_id(&pin_path.join(pin));
        }
    }
    assert!(
        fs::read_dir(&pin_path)
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("takeover-")),
        "a staging directory was left behind"
    );
    // The interface kept an XDP program all along, now the new kgate's: it counts the
    // traffic and applies a block made after the upgrade.
    let new_xdp_program = xdp_program(&lab).expect("XDP still attached");
    assert_ne!(new_xdp_program, old_xdp_program);
    assert!(xdp_counters(&pin_path).unwrap().passed > 0);
    let client_prefix = format!("{client}/32");
    kgate_block_ok(&pin_path, &["add", &client_prefix]);
    assert!(
        lab.client().run(move || ping(frontend, 0)).is_err(),
        "a blocked client got through"
    );
    kgate_block_ok(&pin_path, &["del", &client_prefix]);
    assert_eq!(lab.client().run(move || ping(frontend, 0)), Ok(()));

    let status = Command::new(kgate_bin())
        .args(["status", "--json", "--socket"])
        .arg(control_socket_for(&lab))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let total = status["servers"][0]["total_connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("{status}"));
    assert!(total > 0, "the new kgate counted no connection: {status}");
    assert_eq!(status["servers"][1]["state"], "maint", "{status}");
    // And it serves the control socket.
    let reload = Command::new(kgate_bin())
        .args(["reload", "--socket"])
        .arg(control_socket_for(&lab))
        .output()
        .unwrap();
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );

    println!(
        "upgrade ({dataplane}): {} connections during the handover ({} in all), 0 refused; \
         {LONG_TRANSFERS} long transfers, {} MiB in all each way, checked; the upgrade command took \
         {:?}, the old kgate drained in {:?} after it",
        during,
        seen.succeeded.len(),
        long.iter().map(|((sent, _), _, _)| sent).sum::<usize>() >> 20,
        upgraded - upgrade_started,
        old_gone - upgraded
    );
    drop(new);
}

fn an_upgrade_to_a_kgate_that_cannot_start_changes_nothing(dataplane: &'static str) {
    let lab = Lab::new(1);
    let client: IpAddr = lab.client().v4().into();
    let wrong_source = Arc::new(AtomicUsize::new(0));
    let _backend = echo_backend(&lab, client, wrong_source.clone());
    let frontend = SocketAddr::new(lab.gateway().v4().into(), PORT);
    let config = |extra_frontend: &str| {
        format!(
            "{}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"{frontend}\"]\nbackend = \"mail\"\n\
             {extra_frontend}\n[[backends]]\nname = \"mail\"\n\
             [[backends.servers]]\nname = \"node0\"\naddress = \"{}:{PORT}\"\n\n\
             [xdp]\ninterfaces = [\"{}\"]\n",
            global_section(&lab, dataplane),
            lab.backend(0).v4(),
            lab.gateway().ifname(),
        )
    };
    let mut old = Kgate::start(&lab, &config(""));
    let pin_path = pin_path_for(&lab);
    let servers_map = pinned_map_id(&pin_path.join("servers"));
    let xdp = xdp_program(&lab).expect("XDP attached");

    // The new kgate gets as far as taking the XDP attachment over, then cannot bind
    // an address its host does not have (TEST-NET-1, no freebind): it must give
    // everything back.
    fs::write(
        old.config_path(),
        config("\n[[frontends]]\nname = \"other\"\nlisten = [\"192.0.2.1:2526\"]\nbackend = \"mail\"\n"),
    )
    .unwrap();
    let out = Command::new(kgate_bin())
        .args(["upgrade", "--socket"])
        .arg(control_socket_for(&lab))
        .output()
        .expect("running kgate upgrade");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the upgrade succeeded: {stderr}");
    assert!(
        stderr.contains("did not take over")
            && stderr.contains("cannot listen on 192.0.2.1:2526")
            && stderr.contains("this kgate goes on serving"),
        "{stderr}"
    );

    // The old kgate serves as before, with its pins and its XDP program.
    assert!(old.is_running());
    for n in 0..20 {
        assert_eq!(lab.client().run(move || ping(frontend, n)), Ok(()));
    }
    assert_eq!(pinned_map_id(&pin_path.join("servers")), servers_map);
    assert_eq!(xdp_program(&lab), Some(xdp), "the XDP attachment went back");
    assert!(
        fs::read_dir(&pin_path).unwrap().flatten().all(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with("takeover-") && !name.starts_with("xdp_link_")
        }),
        "the failed upgrade left files in {}",
        pin_path.display()
    );
    assert_eq!(old.status()["servers"][0]["server"], "node0");
    assert_eq!(wrong_source.load(Ordering::SeqCst), 0);
    old.stop();
    assert!(old.exit_status().unwrap().success());
}
