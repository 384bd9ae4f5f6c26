//! Operating kgate: reloads that change everything but drop nothing, a reload with a
//! broken file, a graceful SIGTERM, and the Prometheus metrics.

use std::{
    fs,
    hash::Hasher,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    bpftool,
    kgate::{Kgate, global_section, metric_value, scrape_metrics},
    lab::{Lab, skip_without_root},
    rig::{IO_TIMEOUT, Rng, connect, set_timeouts},
};

/// A config with frontends `(name, port)` on the gateway, all to backend `mail`
/// with the lab's backends `servers` (indexes).
fn config(lab: &Lab, extra_global: &str, frontends: &[(&str, u16)], servers: &[usize]) -> String {
    let mut text = global_section(lab, "sockmap");
    text.push_str(extra_global);
    for (name, port) in frontends {
        text.push_str(&format!(
            "\n[[frontends]]\nname = \"{name}\"\nlisten = [\"{}:{port}\"]\nbackend = \"mail\"\n",
            lab.gateway().v4()
        ));
    }
    text.push_str("\n[[backends]]\nname = \"mail\"\nconnect_timeout = \"1s\"\n");
    for &i in servers {
        text.push_str(&format!(
            "[[backends.servers]]\nname = \"node{i}\"\naddress = \"{}:2525\"\n",
            lab.backend(i).v4()
        ));
    }
    text
}

fn at(lab: &Lab, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(lab.gateway().v4()), port)
}

/// Echoes everything back after the PROXY header, until the client closes.
fn echo(lab: &Lab, i: usize) -> TcpServer {
    TcpServer::start(
        lab.backend(i),
        SocketAddr::new(lab.backend(i).v4().into(), 2525),
        |mut s| {
            set_timeouts(&s);
            if read_proxy_header(&mut s).is_err() {
                return;
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

/// Whether a client can open a session on `frontend` and have a byte echoed.
fn answers(frontend: SocketAddr) -> bool {
    let Ok(mut c) = TcpStream::connect_timeout(&frontend, Duration::from_secs(2)) else {
        return false;
    };
    set_timeouts(&c);
    let mut byte = [0u8];
    c.write_all(b"?").is_ok() && c.read_exact(&mut byte).is_ok() && byte == *b"?"
}

/// Frontends (name, port) and the lab backends in the pool.
type Layout = (&'static [(&'static str, u16)], &'static [usize]);

#[test]
fn a_busy_connection_survives_ten_reloads_that_add_and_remove_servers_and_frontends() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(3);
    let _servers: Vec<_> = (0..3).map(|i| echo(&lab, i)).collect();
    let layouts: [Layout; 2] = [
        (&[("smtp", 2525)], &[0, 1]),
        // node0, which carries the busy connection, leaves the configuration here.
        (&[("smtp", 2525), ("submission", 2587)], &[1, 2]),
    ];
    let mut kgate = Kgate::start(&lab, &config(&lab, "", layouts[0].0, layouts[0].1));
    let (smtp, submission) = (at(&lab, 2525), at(&lab, 2587));

    // One connection moves data both ways for the whole test.
    let busy = lab.client().spawn(move || {
        let mut c = connect(smtp);
        let mut reader = c.try_clone().unwrap();
        let started = Instant::now();
        let receiver = thread::spawn(move || {
            let mut hasher = std::hash::DefaultHasher::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    return (total, hasher.finish());
                }
                hasher.write(&buf[..n]);
                total += n as u64;
            }
        });
        let mut rng = Rng(99);
        let mut hasher = std::hash::DefaultHasher::new();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(30) {
            rng.fill(&mut chunk);
            c.write_all(&chunk).unwrap();
            hasher.write(&chunk);
            sent += chunk.len() as u64;
            thread::sleep(Duration::from_millis(5));
        }
        c.shutdown(Shutdown::Write).unwrap();
        let received = receiver.join().unwrap();
        ((sent, hasher.finish()), received)
    });

    for reload in 1..=10 {
        thread::sleep(Duration::from_millis(2500));
        let (frontends, servers) = layouts[reload % 2];
        fs::write(kgate.config_path(), config(&lab, "", frontends, servers)).unwrap();
        let out = kgate.reload();
        assert!(
            out.status.success(),
            "reload {reload}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let with_submission = frontends.len() == 2;
        let (smtp_answers, submission_answers) = lab
            .client()
            .run(move || (answers(smtp), answers(submission)));
        assert!(smtp_answers, "reload {reload}: smtp stopped answering");
        assert_eq!(
            submission_answers, with_submission,
            "reload {reload}: a new frontend accepts, a removed one refuses"
        );
    }
    let (sent, received) = busy.join().expect("the busy connection failed");
    assert!(
        sent.0 > 10 << 20,
        "the connection moved only {} bytes",
        sent.0
    );
    assert_eq!(
        sent, received,
        "every byte came back, in order, across the reloads"
    );
    assert_eq!(kgate.log().matches("reloaded:").count(), 10);
    kgate.stop();
    assert!(kgate.exit_status().unwrap().success());
}

#[test]
fn a_reload_with_a_broken_file_keeps_the_old_configuration_and_says_why() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let _server = echo(&lab, 0);
    let good = config(&lab, "", &[("smtp", 2525)], &[0]);
    let mut kgate = Kgate::start(&lab, &good);
    let smtp = at(&lab, 2525);

    // A typo, and a frontend on a port another program holds: neither may change anything.
    let typo = good.replace("connect_timeout", "connect_timout");
    fs::write(kgate.config_path(), &typo).unwrap();
    let out = kgate.reload();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(said.contains("unknown field `connect_timout`"), "{said}");
    assert!(
        said.contains(&format!("{}:", kgate.config_path().display())),
        "{said}"
    );
    assert!(
        lab.client().run(move || answers(smtp)),
        "the old configuration serves"
    );

    let squatter = lab
        .gateway()
        .run(|| std::net::TcpListener::bind("127.0.0.1:2999").unwrap());
    let busy_port = good.replace(
        "[[backends]]",
        "[[frontends]]\nname = \"squatted\"\nlisten = [\"127.0.0.1:2999\"]\nbackend = \"mail\"\n\n[[backends]]",
    );
    fs::write(kgate.config_path(), &busy_port).unwrap();
    let out = kgate.reload();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot listen on 127.0.0.1:2999"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(squatter);

    // SIGHUP reads the file too, and logs why it could not apply it.
    fs::write(kgate.config_path(), &typo).unwrap();
    kgate.signal(libc::SIGHUP);
    assert!(kgate.wait_for_log("reload failed", Duration::from_secs(5)));
    assert!(lab.client().run(move || answers(smtp)));
    assert!(!kgate.log().contains("reloaded:"));
}

#[test]
fn sigterm_lets_open_connections_finish_then_exits_0_and_leaves_no_pins() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    // The server answers each request a second after it comes, then closes.
    let _server = TcpServer::start(
        lab.backend(0),
        SocketAddr::new(lab.backend(0).v4().into(), 2525),
        |mut s| {
            set_timeouts(&s);
            read_proxy_header(&mut s).unwrap();
            let mut request = [0u8; 5];
            s.read_exact(&mut request).unwrap();
            thread::sleep(Duration::from_secs(1));
            s.write_all(b"250 done\r\n").unwrap();
        },
    );
    let mut kgate = Kgate::start(
        &lab,
        &config(
            &lab,
            "shutdown_timeout = \"10s\"\n",
            &[("smtp", 2525)],
            &[0],
        ),
    );
    let smtp = at(&lab, 2525);
    let pins = kgate.pin_path();
    assert!(pins.join("peers").exists());

    let session = lab.client().spawn(move || {
        let mut c = connect(smtp);
        c.write_all(b"DATA\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        reply
    });
    thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    kgate.signal(libc::SIGTERM);
    assert!(kgate.wait_for_log("SIGTERM", Duration::from_secs(2)));
    let refused = lab
        .client()
        .run(move || TcpStream::connect_timeout(&smtp, Duration::from_secs(2)).map(|_| ()));
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionRefused),
        "no new connection after SIGTERM"
    );
    assert_eq!(
        session.join().unwrap(),
        "250 done\r\n",
        "the open session finished"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while kgate.is_running() {
        assert!(
            Instant::now() < deadline,
            "kgate still runs after its last connection"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let took = stopping.elapsed();
    kgate.stop();
    assert!(
        kgate.exit_status().unwrap().success(),
        "{:?}",
        kgate.exit_status()
    );
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM"
    );
    let left: Vec<_> = fs::read_dir(&pins)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    // Only the blocklists stay pinned (kept across restarts), and only with [xdp].
    assert!(left.is_empty(), "pins left behind: {left:?}");
}

/// A script that opens control or metrics connections and forgets them must not take
/// the file descriptors client connections need: kgate serves a few such connections
/// at a time, each for a few seconds, and leaves the rest in the kernel's queue.
#[test]
fn forgotten_control_and_metrics_connections_hold_few_descriptors_and_clients_still_connect() {
    if skip_without_root() {
        return;
    }
    const FORGOTTEN: usize = 500;
    let lab = Lab::new(1);
    let _server = echo(&lab, 0);
    let metrics = "127.0.0.1:9464";
    let kgate = Kgate::start(
        &lab,
        &config(
            &lab,
            &format!("metrics_listen = \"{metrics}\"\n"),
            &[("smtp", 2525)],
            &[0],
        ),
    );
    let fds_at_start = kgate.open_fds();
    let control = tests::kgate::control_socket_for(&lab);
    let idle_control: Vec<_> = (0..FORGOTTEN)
        .map(|_| std::os::unix::net::UnixStream::connect(&control).unwrap())
        .collect();
    let idle_metrics = lab.gateway().run(move || {
        (0..FORGOTTEN)
            .map(|_| TcpStream::connect(metrics).unwrap())
            .collect::<Vec<_>>()
    });
    thread::sleep(Duration::from_secs(1));
    let fds = kgate.open_fds();
    assert!(
        fds <= fds_at_start + 2 * 16 + 4,
        "kgate holds {fds} descriptors with {FORGOTTEN} forgotten control and metrics \
         connections each (it started with {fds_at_start})"
    );
    let smtp = at(&lab, 2525);
    assert!(
        lab.client().run(move || answers(smtp)),
        "a client session while they wait"
    );
    drop((idle_control, idle_metrics));
    // Forgotten connections closed: each left in the queue is answered at once.
    let deadline = Instant::now() + IO_TIMEOUT;
    let reload = loop {
        let out = kgate.reload();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
}

#[test]
fn metrics_parse_and_count_the_traffic() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(2);
    let _servers: Vec<_> = (0..2).map(|i| echo(&lab, i)).collect();
    let kgate = Kgate::start(
        &lab,
        &config(
            &lab,
            "metrics_listen = \"127.0.0.1:9464\"\n",
            &[("smtp", 2525)],
            &[0, 1],
        ),
    );
    let smtp = at(&lab, 2525);
    // Six sessions, each sending 1000 bytes and getting them back.
    lab.client().run(move || {
        for _ in 0..6 {
            let mut c = connect(smtp);
            c.write_all(&[b'x'; 1000]).unwrap();
            let mut back = vec![0u8; 1000];
            c.read_exact(&mut back).unwrap();
        }
    });
    let deadline = Instant::now() + IO_TIMEOUT;
    let scrape = loop {
        let scrape = scrape_metrics(&lab, "127.0.0.1:9464");
        // A byte is counted just after kgate or the kernel passed it on, and a
        // connection counted open until kgate has seen both ends close: the client may
        // be done before either.
        let settled = metric_value(&scrape, "kgate_frontend_bytes_in_total", &[]) == 6000.0
            && metric_value(&scrape, "kgate_frontend_active_connections", &[]) == 0.0;
        if settled || Instant::now() > deadline {
            break scrape;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let smtp_frontend = [("frontend", "smtp")];
    assert_eq!(
        metric_value(&scrape, "kgate_frontend_connections_total", &smtp_frontend),
        6.0
    );
    assert_eq!(
        metric_value(&scrape, "kgate_frontend_bytes_in_total", &smtp_frontend),
        6000.0
    );
    assert_eq!(
        metric_value(&scrape, "kgate_frontend_bytes_out_total", &smtp_frontend),
        6000.0
    );
    assert_eq!(
        metric_value(&scrape, "kgate_frontend_refused_total", &smtp_frontend),
        0.0
    );
    assert_eq!(
        metric_value(&scrape, "kgate_frontend_active_connections", &smtp_frontend),
        0.0
    );
    let per_server: Vec<f64> = ["node0", "node1"]
        .iter()
        .map(|s| metric_value(&scrape, "kgate_server_connections_total", &[("server", s)]))
        .collect();
    assert_eq!(per_server, [3.0, 3.0], "round robin");
    let bytes_in: f64 = ["node0", "node1"]
        .iter()
        .map(|s| metric_value(&scrape, "kgate_server_bytes_in_total", &[("server", s)]))
        .sum();
    assert_eq!(
        bytes_in, 6000.0,
        "spliced bytes counted per server in-kernel"
    );
    assert_eq!(
        metric_value(&scrape, "kgate_server_up", &[("server", "node0")]),
        1.0
    );
    assert_eq!(
        metric_value(
            &scrape,
            "kgate_server_state",
            &[("server", "node1"), ("state", "unchecked")]
        ),
        1.0
    );
    assert_eq!(
        metric_value(&scrape, "kgate_backend_no_server_total", &[]),
        0.0
    );
    drop(kgate);
}

/// Bytes (in, out) the eBPF programs counted for every frontend slot together, from
/// the pinned `frontend_bytes` map as bpftool prints it.
fn kernel_frontend_bytes(kgate: &Kgate) -> (u64, u64) {
    let dump = bpftool::dump_json(&kgate.pin_path().join("frontend_bytes"));
    let mut total = (0, 0);
    for slot in dump.as_array().expect("a list of slots") {
        for cpu in slot["formatted"]["values"]
            .as_array()
            .expect("per-CPU values")
        {
            total.0 += cpu["value"]["bytes_in"].as_u64().expect("bytes_in");
            total.1 += cpu["value"]["bytes_out"].as_u64().expect("bytes_out");
        }
    }
    total
}

/// A reload keeps a frontend's byte counts. A frontend it removes gives its slot in
/// the kernel's counters back zeroed, once its connections are over: the frontend a
/// later reload adds starts at zero, whatever slot it gets.
#[test]
fn frontend_byte_counts_go_on_across_reloads_and_a_removed_ones_are_not_inherited() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let _server = echo(&lab, 0);
    let metrics = "127.0.0.1:9464";
    let layout = |frontends: &[(&str, u16)]| {
        config(
            &lab,
            &format!("metrics_listen = \"{metrics}\"\n"),
            frontends,
            &[0],
        )
        .replace(
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"1s\"\nsplice_after = \"0s\"\n",
        )
    };
    let kgate = Kgate::start(&lab, &layout(&[("smtp", 2525), ("submission", 2587)]));
    // Echoed sessions of `first` then `then` bytes: the second part goes through the
    // splice, counted by the program.
    let session = |port: u16, first: usize, then: usize| {
        let to = at(&lab, port);
        lab.client().run(move || {
            let mut c = connect(to);
            for len in [first, then] {
                c.write_all(&vec![b'x'; len]).unwrap();
                let mut back = vec![0u8; len];
                c.read_exact(&mut back).unwrap();
            }
        })
    };
    let bytes_of = |frontend: &str| -> (f64, f64) {
        let scrape = scrape_metrics(&lab, metrics);
        let labels = [("frontend", frontend)];
        (
            metric_value(&scrape, "kgate_frontend_bytes_in_total", &labels),
            metric_value(&scrape, "kgate_frontend_bytes_out_total", &labels),
        )
    };
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    };
    const SUBMITTED: usize = 1000 + 200_000;
    session(2525, 1000, 2000);
    session(2587, 1000, 200_000);
    wait_for(&|| bytes_of("smtp") == (3000.0, 3000.0));
    wait_for(&|| bytes_of("submission") == (SUBMITTED as f64, SUBMITTED as f64));
    assert_eq!(bytes_of("smtp"), (3000.0, 3000.0));
    assert_eq!(bytes_of("submission"), (SUBMITTED as f64, SUBMITTED as f64));
    let in_kernel = kernel_frontend_bytes(&kgate);
    assert!(
        in_kernel.0 >= 200_000 && in_kernel.1 >= 200_000,
        "the spliced bytes are in the kernel's counters: {in_kernel:?}\n{}",
        kgate.log()
    );

    fs::write(kgate.config_path(), layout(&[("smtp", 2525)])).unwrap();
    let reload = kgate.reload();
    assert!(reload.status.success(), "{reload:?}");
    wait_for(&|| kernel_frontend_bytes(&kgate).0 <= 3000);
    let in_kernel = kernel_frontend_bytes(&kgate);
    assert!(
        in_kernel.0 <= 3000 && in_kernel.1 <= 3000,
        "only smtp's bytes are left in the kernel's counters: {in_kernel:?}"
    );
    assert_eq!(bytes_of("smtp"), (3000.0, 3000.0), "kept by the reload");

    fs::write(
        kgate.config_path(),
        layout(&[("smtp", 2525), ("imap", 2143)]),
    )
    .unwrap();
    let reload = kgate.reload();
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(
        bytes_of("imap"),
        (0.0, 0.0),
        "a new frontend starts at zero"
    );
    session(2143, 1000, 4000);
    wait_for(&|| bytes_of("imap") == (5000.0, 5000.0));
    assert_eq!(bytes_of("imap"), (5000.0, 5000.0));
    assert_eq!(bytes_of("smtp"), (3000.0, 3000.0));
    let spliced = kgate.log().matches(" spliced ").count();
    assert_eq!(spliced, 3, "every session was spliced:\n{}", kgate.log());
}

/// The value of the sample of `name` whose labels include `labels`; panics unless
/// exactly one matches.

#[test]
fn after_start_kgate_keeps_only_the_capabilities_it_needs_and_hides_its_state() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let _server = echo(&lab, 0);
    let kgate = Kgate::start(&lab, &config(&lab, "", &[("smtp", 2525)], &[0]));
    let smtp = at(&lab, 2525);
    // Traffic wakes every runtime thread, which then drops its own capabilities.
    lab.client().run(move || {
        for _ in 0..20 {
            assert!(answers(smtp));
        }
    });
    // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_NET_RAW (13, for the packet
    // plane's resets), CAP_PERFMON (38, for the programs of the binary an upgrade
    // starts), CAP_BPF (39).
    let kept: u64 = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let threads: Vec<(String, u64)> = fs::read_dir(format!("/proc/{}/task", kgate.pid()))
            .unwrap()
            .flatten()
            .filter_map(|task| {
                let status = fs::read_to_string(task.path().join("status")).ok()?;
                let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
                Some((
                    task.file_name().to_string_lossy().into_owned(),
                    u64::from_str_radix(eff.trim(), 16).ok()?,
                ))
            })
            .collect();
        if threads.iter().all(|(_, eff)| *eff == kept) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads with other capabilities than {kept:x}: {threads:x?}"
        );
        lab.client().run(move || answers(smtp));
        thread::sleep(Duration::from_millis(100));
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&kgate.pin_path()), 0o700, "pin directory");
    let control = std::path::PathBuf::from(format!("/run/kgate-test-{}.sock", lab.unique_name()));
    assert_eq!(mode(&control), 0o600, "control socket");
}

/// A reload applies what it can and says, with a non-zero exit, what waits for a
/// restart: a changed `metrics_listen` and an added `[xdp]` section.
#[test]
fn reload_lists_what_only_a_restart_applies_and_exits_non_zero() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let _server = echo(&lab, 0);
    let kgate = Kgate::start(&lab, &config(&lab, "", &[("smtp", 2525)], &[0]));
    let mut changed = config(
        &lab,
        "metrics_listen = \"127.0.0.1:9464\"\n",
        &[("smtp", 2525), ("submission", 2587)],
        &[0],
    );
    changed.push_str(&format!(
        "\n[xdp]\ninterfaces = [\"{}\"]\n",
        lab.gateway_ifname_toward_backend(0)
    ));
    fs::write(kgate.config_path(), changed).unwrap();
    let reload = kgate.reload();
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success(), "reload exited 0: {stderr}");
    assert!(
        stderr.contains("`metrics_listen`: none -> 127.0.0.1:9464")
            && stderr.contains("[xdp] added")
            && stderr.contains("systemctl restart kgate"),
        "{stderr}"
    );
    // The rest is applied: the new frontend answers.
    let submission = at(&lab, 2587);
    assert!(lab.client().run(move || answers(submission)), "{stderr}");
}
