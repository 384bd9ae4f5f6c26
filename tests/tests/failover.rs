//! A pair of gateways that fails over: kgate on both, listening on the virtual address
//! with `freebind`, Debian's keepalived (VRRP) moving that address. The backup's kgate
//! runs all along, bound to an address it does not have; when the master goes (its
//! keepalived stopped, or its kgate killed, which a `track_script` notices), new
//! connections go through the backup within a bounded time, and the backend still
//! gets the client's own address in the PROXY header.

use std::{
    io::Read,
    net::{IpAddr, SocketAddr, TcpStream},
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    keepalived::Keepalived,
    kgate::{Kgate, kgate_bin},
    lab::{Lab, skip_without_root},
    pair::{LAN_IF, PREFIX, PairLab, VIP},
    rig::set_timeouts,
};

const PORT: u16 = 2525;
/// A failover slower than this fails the test: VRRP's own timers (1 s adverts, the
/// master declared dead after about 3.6 s) and the 1 s script interval fit many times.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);
const PRIORITY: [u8; 2] = [150, 100];

fn pin_path(lab: &PairLab, i: usize) -> std::path::PathBuf {
    format!("/sys/fs/bpf/kgate-test-{}-gw{i}", lab.unique_name()).into()
}

fn control_socket(lab: &PairLab, i: usize) -> std::path::PathBuf {
    format!("/run/kgate-test-{}-gw{i}.sock", lab.unique_name()).into()
}

/// Gateway `i`'s kgate: the VIP as its frontend, the lab's backend with a tcp check,
/// XDP on the client LAN.
fn kgate_config(lab: &PairLab, i: usize, freebind: bool) -> String {
    format!(
        r#"[global]
bpf_pin_path = {pin:?}
control_socket = {control:?}
dataplane = "sockmap"
freebind = {freebind}

[[frontends]]
name = "smtp"
listen = ["{VIP}:{PORT}"]
backend = "mail"

[[backends]]
name = "mail"

[backends.health]
check = "tcp"
interval = "1s"

[[backends.servers]]
name = "node0"
address = "{backend}:{PORT}"

[xdp]
interfaces = ["{LAN_IF}"]
"#,
        pin = pin_path(lab, i).display().to_string(),
        control = control_socket(lab, i).display().to_string(),
        backend = lab.backend().v4(),
    )
}

/// Gateway `i`'s keepalived: one VRRP instance holding the VIP on the client LAN,
/// given up when this gateway's kgate no longer listens on it.
fn keepalived_config(lab: &PairLab, i: usize) -> String {
    format!(
        r#"global_defs {{
    router_id kgate-{unique}-gw{i}
    enable_script_security
    script_user root
}}

vrrp_script kgate_listens {{
    script "/usr/bin/sh -c '/usr/bin/ss -Hltn src {VIP}:{PORT} | /usr/bin/grep -q .'"
    interval 1
    fall 1
    rise 1
}}

vrrp_instance mail {{
    state BACKUP
    interface {LAN_IF}
    virtual_router_id 51
    priority {priority}
    advert_int 1
    virtual_ipaddress {{
        {VIP}/{PREFIX} dev {LAN_IF}
    }}
    track_script {{
        kgate_listens
    }}
}}
"#,
        unique = lab.unique_name(),
        priority = PRIORITY[i],
    )
}

/// One connection to the VIP: the backend answers with the address it saw the
/// connection come from, which tells the gateway that carried it.
fn through_vip() -> Result<IpAddr, String> {
    let vip = SocketAddr::new(VIP.into(), PORT);
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_millis(500))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| format!("read: {e}"))?;
    reply.trim().parse().map_err(|_| format!("reply {reply:?}"))
}

/// Waits until gateway `i` alone holds the VIP and carries a connection.
fn wait_until_serving(lab: &PairLab, i: usize, keepalived: &[Keepalived]) {
    let via = IpAddr::V4(lab.gateway_toward_backend(i));
    let deadline = Instant::now() + FAILOVER_BOUND;
    loop {
        if lab.vip_holders() == [i] && lab.client().run(through_vip) == Ok(via) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway {i} did not become the master; VIP on {:?}; keepalived logs:\n{}",
            lab.vip_holders(),
            keepalived
                .iter()
                .map(Keepalived::log)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `master_goes`, then connects to the VIP every 20 ms until a connection goes
/// through gateway 1; returns how long that took, and how many attempts failed.
fn fail_over(lab: &PairLab, master_goes: impl FnOnce()) -> (Duration, usize) {
    let backup = IpAddr::V4(lab.gateway_toward_backend(1));
    let started = Instant::now();
    master_goes();
    lab.client().run(move || {
        let mut failed = 0;
        loop {
            match through_vip() {
                Ok(via) if via == backup => {
                    let took = started.elapsed();
                    // And it stays so: the next ones all go through the backup.
                    for n in 0..20 {
                        assert_eq!(through_vip(), Ok(backup), "connection {n} after failover");
                    }
                    return (took, failed);
                }
                Ok(_) => {}
                Err(_) => failed += 1,
            }
            assert!(
                started.elapsed() < FAILOVER_BOUND,
                "no connection through the backup within {FAILOVER_BOUND:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    })
}

#[test]
fn a_keepalived_pair_fails_over_to_the_backup_kgate_bound_to_the_vip() {
    if skip_without_root() {
        return;
    }
    let lab = PairLab::new();
    let client = IpAddr::V4(lab.client().v4());
    // The backend names the gateway each client came through, and checks that the
    // PROXY header carries the client's own address (checks send LOCAL headers).
    let proxied = Arc::new(AtomicUsize::new(0));
    let wrong_source = Arc::new(Mutex::new(Vec::new()));
    let _backend = {
        let (proxied, wrong_source) = (proxied.clone(), wrong_source.clone());
        TcpServer::start(
            lab.backend(),
            SocketAddr::new(lab.backend().v4().into(), PORT),
            move |mut stream| {
                set_timeouts(&stream);
                let peer = stream.peer_addr().unwrap().ip();
                let Ok(header) = read_proxy_header(&mut stream) else {
                    return;
                };
                if header.command_local {
                    return;
                }
                if header.source.map(|s| s.ip()) != Some(client) {
                    wrong_source.lock().unwrap().push(header.source);
                }
                proxied.fetch_add(1, Ordering::SeqCst);
                let _ = std::io::Write::write_all(&mut stream, format!("{peer}\n").as_bytes());
            },
        )
    };

    // Without freebind the backup cannot listen on the address it does not hold.
    let refused = lab.temp_dir().join("no-freebind.toml");
    std::fs::write(&refused, kgate_config(&lab, 1, false)).unwrap();
    let mut run = lab
        .gateway(1)
        .command(kgate_bin())
        .arg("run")
        .arg("-c")
        .arg(&refused)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("kgate without freebind ran on an address its host does not have");
        }
        thread::sleep(Duration::from_millis(50));
    }
    let mut stderr = String::new();
    run.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!run.wait().unwrap().success());
    assert!(
        stderr.contains(&format!("cannot listen on {VIP}:{PORT}"))
            && stderr.contains("set `freebind = true`"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(pin_path(&lab, 1));

    // Both kgates start before either gateway has the VIP.
    assert_eq!(lab.vip_holders(), Vec::<usize>::new());
    let mut kgates = [0, 1].map(|i| {
        Kgate::start_in(
            lab.gateway(i),
            lab.temp_dir(),
            (pin_path(&lab, i), control_socket(&lab, i)),
            &kgate_config(&lab, i, true),
        )
    });
    let start_keepalived = |i: usize| {
        Keepalived::start(
            lab.gateway(i),
            lab.temp_dir(),
            &format!("keepalived-gw{i}"),
            &keepalived_config(&lab, i),
        )
    };
    let mut keepalived = [start_keepalived(0), start_keepalived(1)];
    wait_until_serving(&lab, 0, &keepalived);
    // The backup checks the backend from its own address, VIP or not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while kgates[1].status()["servers"][0]["state"] != "up" {
        assert!(Instant::now() < deadline, "{}", kgates[1].status());
        thread::sleep(Duration::from_millis(100));
    }

    // 1. The master's keepalived stops (SIGTERM: it gives the VIP up with a priority-0
    //    advert).
    let (stopped_keepalived, failed_1) = fail_over(&lab, || keepalived[0].terminate());
    keepalived[0].stop();
    // The master comes back (its priority is higher), then:
    keepalived[0] = start_keepalived(0);
    wait_until_serving(&lab, 0, &keepalived);

    // 2. The master's kgate dies; its keepalived's track_script sees no listener on the
    //    VIP any more and gives the VIP up (FAULT state).
    let (killed_kgate, failed_2) = fail_over(&lab, || kgates[0].signal(libc::SIGKILL));
    let log = keepalived[0].log();
    assert!(
        log.contains("VRRP_Script(kgate_listens) failed") && log.contains("Entering FAULT STATE"),
        "{log}"
    );

    assert_eq!(
        *wrong_source.lock().unwrap(),
        Vec::new(),
        "PROXY header sources"
    );
    assert!(proxied.load(Ordering::SeqCst) > 40);
    println!(
        "failover to the backup kgate: {stopped_keepalived:?} after the master's keepalived \
         was stopped ({failed_1} connection attempts failed meanwhile), {killed_kgate:?} after \
         the master's kgate was killed ({failed_2} failed)"
    );
}

/// `kgate check` on a gateway: a listen address the host lacks gets a note (the file
/// may be checked elsewhere, so it stays valid), unless its frontend has `freebind`.
#[test]
fn kgate_check_notes_listen_addresses_the_host_lacks_unless_freebind() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(0);
    let check = |freebind: &str| {
        let config = lab.temp_dir().join("check.toml");
        std::fs::write(
            &config,
            format!(
                "[[frontends]]\nname = \"here\"\nlisten = [\"{}:25\", \"0.0.0.0:587\"]\nbackend = \"b\"\n\
                 any_address = true\n\
                 [[frontends]]\nname = \"vip\"\nlisten = [\"192.0.2.1:25\"]\nbackend = \"b\"\n{freebind}\n\
                 [[backends]]\nname = \"b\"\n[[backends.servers]]\nname = \"s\"\naddress = \"192.0.2.9:25\"\n",
                lab.gateway().v4()
            ),
        )
        .unwrap();
        let out = lab
            .gateway()
            .command(kgate_bin())
            .arg("check")
            .arg("-c")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid (2 frontends"));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let notes = check("");
    assert_eq!(
        notes.lines().collect::<Vec<_>>(),
        [
            "note: frontend `vip` listens on 192.0.2.1:25, which is not an address of this host: \
          `kgate run` here cannot bind it until it is; on the backup of a VRRP pair, set \
          `freebind = true`"
        ],
        "{notes}"
    );
    assert_eq!(check("freebind = true"), "");
}
