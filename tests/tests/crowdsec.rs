//! kgate as a CrowdSec bouncer against the real thing: Debian's CrowdSec LAPI runs on
//! the gateway namespace's loopback (tests/src/crowdsec.rs), kgate pulls its decisions
//! every second (`[crowdsec]`) into the XDP blocklist on the gateway's client-side
//! veth. The client namespace has three source addresses: its IPv4 and IPv6 ones and a
//! second IPv4 one, so that one source can be banned while the others still connect.
//! Decisions are made and deleted with `cscli`, as an operator (or CrowdSec's own
//! scenarios) would.

use std::{
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Socket, Type};
use tests::{
    backend::{TcpServer, read_proxy_header},
    crowdsec::Crowdsec,
    kgate::{Kgate, metric_value, scrape_metrics},
    lab::skip_without_root,
    rig::{METRICS, Rig, set_timeouts},
    xdp::{kgate_block_ok, xdp_counters},
};

/// How long a connect waits for the SYN-ACK before the test counts it as dropped:
/// under the kernel's first SYN retransmission (1 s).
const SYN_WAIT: Duration = Duration::from_millis(700);

/// How long a decision may take to reach the blocklist or leave it before the test
/// fails: the pull interval is 1 s; this only turns a hang into a failure.
const APPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// The client namespace's second IPv4 address: a source no decision names until late.
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 3);

/// Whether a handshake from `source` to `to` completes within [`SYN_WAIT`].
fn handshake_from(source: IpAddr, to: SocketAddr) -> bool {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("binding {source}: {e}"));
    socket.connect_timeout(&to.into(), SYN_WAIT).is_ok()
}

/// Whether a whole session from `source` through kgate gets the backend's greeting.
fn greeted_from(source: IpAddr, to: SocketAddr) -> bool {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .unwrap_or_else(|e| panic!("binding {source}: {e}"));
    if socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .is_err()
    {
        return false;
    }
    let mut stream: TcpStream = socket.into();
    set_timeouts(&stream);
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).is_ok() && &banner == b"220 hi\r\n"
}

/// The sources of the client namespace and what a test asks of each.
#[derive(Clone, Copy)]
struct Sources {
    v4: IpAddr,
    v6: IpAddr,
    other: IpAddr,
    frontend_v4: SocketAddr,
    frontend_v6: SocketAddr,
}

impl Sources {
    fn of(rig: &Rig) -> Sources {
        Sources {
            v4: rig.lab.client().v4().into(),
            v6: rig.lab.client().v6().into(),
            other: OTHER_V4.into(),
            frontend_v4: rig.frontend_v4(),
            frontend_v6: rig.frontend_v6(),
        }
    }

    fn frontend_for(&self, source: IpAddr) -> SocketAddr {
        if source.is_ipv4() {
            self.frontend_v4
        } else {
            self.frontend_v6
        }
    }

    /// (client v4, client v6, other v4) completing a handshake with kgate.
    fn reachable(&self, rig: &Rig) -> (bool, bool, bool) {
        let s = *self;
        rig.lab.client().run(move || {
            (
                handshake_from(s.v4, s.frontend_v4),
                handshake_from(s.v6, s.frontend_v6),
                handshake_from(s.other, s.frontend_v4),
            )
        })
    }

    /// Waits until `source`'s handshakes are dropped (`banned`) or complete again;
    /// returns when the first attempt that showed it began, from now: the change was
    /// in place by then. Panics after [`APPLY_TIMEOUT`].
    fn wait_until(&self, rig: &Rig, source: IpAddr, banned: bool) -> Duration {
        let to = self.frontend_for(source);
        rig.lab.client().run(move || {
            let start = Instant::now();
            loop {
                let attempt = start.elapsed();
                if handshake_from(source, to) != banned {
                    return attempt;
                }
                assert!(
                    start.elapsed() < APPLY_TIMEOUT,
                    "{source} still {} after {APPLY_TIMEOUT:?}",
                    if banned { "connects" } else { "dropped" }
                );
                thread::sleep(Duration::from_millis(20));
            }
        })
    }
}

/// The `kgate block list` row of `prefix`, its columns joined by single spaces.
fn listed(pin: &std::path::Path, prefix: &str) -> Option<String> {
    kgate_block_ok(pin, &["list"])
        .lines()
        .find(|l| l.split_whitespace().next() == Some(prefix))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Waits until `kgate block list` lists `prefix`; returns its row.
fn wait_listed(pin: &std::path::Path, prefix: &str) -> String {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        if let Some(row) = listed(pin, prefix) {
            return row;
        }
        assert!(Instant::now() < deadline, "{prefix} never listed");
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `kgate status` says the bouncer's LAPI is in `state`.
fn wait_for_state(kgate: &Kgate, state: &str) -> serde_json::Value {
    let deadline = Instant::now() + APPLY_TIMEOUT;
    loop {
        let status = kgate.status();
        if status["crowdsec"]["state"] == state {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the bouncer is not {state}: {status}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn crowdsec_decisions_drop_their_sources_in_xdp_until_deleted_across_restarts_and_outages() {
    if skip_without_root() {
        return;
    }
    let mut lapi = None;
    let mut rig = Rig::start_with_sections("sockmap", 1, "", "", &[], |lab| {
        let crowdsec = Crowdsec::start(lab, lab.gateway());
        let key_file = lab.temp_dir().join("crowdsec-key");
        fs::write(&key_file, format!("{}\n", crowdsec.add_bouncer("kgate"))).unwrap();
        let blocklist = lab.temp_dir().join("blocklist");
        fs::write(&blocklist, "192.0.2.0/24\n").unwrap();
        let section = format!(
            "\n[xdp]\ninterfaces = [\"{}\"]\nblocklist_file = \"{}\"\n\n\
             [crowdsec]\nurl = \"{}\"\napi_key_file = \"{}\"\ninterval = \"1s\"\n",
            lab.gateway().ifname(),
            blocklist.display(),
            crowdsec.url(),
            key_file.display()
        );
        lapi = Some(crowdsec);
        section
    });
    let mut lapi = lapi.unwrap();
    let _backend = TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_ok() {
            let _ = s.write_all(b"220 hi\r\n");
        }
    });
    assert!(
        rig.kgate
            .wait_for_log("CrowdSec LAPI connected", APPLY_TIMEOUT),
        "{}",
        rig.kgate.log()
    );
    rig.lab.client().add_v4(OTHER_V4);
    let sources = Sources::of(&rig);
    let pin = rig.kgate.pin_path();
    // The operator's own block, on a prefix CrowdSec will ban too.
    kgate_block_ok(&pin, &["add", "198.51.100.0/24"]);
    // A whole session from each source first: the first IPv6 SYN of a fresh lab can
    // wait for neighbour discovery longer than a handshake is given below.
    let first = rig.lab.client().run(move || {
        [sources.v4, sources.v6, sources.other]
            .map(|source| greeted_from(source, sources.frontend_for(source)))
    });
    assert_eq!(first, [true; 3]);
    assert_eq!(sources.reachable(&rig), (true, true, true));

    // 1. A decision on the client's IPv4 address: dropped within a pull or so.
    let client_v4 = sources.v4.to_string();
    lapi.decisions(&["add", "--ip", &client_v4, "--duration", "1h"]);
    let delay = sources.wait_until(&rig, sources.v4, true);
    println!(
        "ban applied {} ms after `cscli decisions add` returned (pull interval 1 s)",
        delay.as_millis()
    );
    let (v6, other) = rig.lab.client().run(move || {
        (
            greeted_from(sources.v6, sources.frontend_v6),
            greeted_from(sources.other, sources.frontend_v4),
        )
    });
    assert!(v6 && other, "the other sources still get through kgate");

    // 2. Ranges: the client's IPv6 /64, and the operator's prefix; and, from no
    // source of the lab, an IPv4 range and an IPv6 address.
    lapi.decisions(&["add", "--range", "fd00:200:1::/64", "--duration", "2h"]);
    lapi.decisions(&["add", "--range", "198.51.100.0/24"]);
    lapi.decisions(&["add", "--range", "203.0.113.0/24", "--duration", "3h"]);
    lapi.decisions(&["add", "--ip", "2001:db8::7", "--duration", "10m"]);
    sources.wait_until(&rig, sources.v6, true);
    assert_eq!(sources.reachable(&rig), (false, false, true));
    let row = listed(&pin, &format!("{client_v4}/32")).unwrap();
    assert!(
        row.starts_with(&format!("{client_v4}/32 in 59m")) && row.ends_with(" crowdsec"),
        "{row}"
    );
    let row = listed(&pin, "fd00:200:1::/64").unwrap();
    assert!(
        row.starts_with("fd00:200:1::/64 in 1h 59m") && row.ends_with(" crowdsec"),
        "{row}"
    );
    let row = wait_listed(&pin, "203.0.113.0/24");
    assert!(
        row.starts_with("203.0.113.0/24 in 2h 59m") && row.ends_with(" crowdsec"),
        "{row}"
    );
    let row = wait_listed(&pin, "2001:db8::7/128");
    assert!(
        row.starts_with("2001:db8::7/128 in 9m") && row.ends_with(" crowdsec"),
        "{row}"
    );
    assert_eq!(
        listed(&pin, "198.51.100.0/24").unwrap(),
        "198.51.100.0/24 never command",
        "the operator's entry stays the operator's"
    );
    assert_eq!(
        listed(&pin, "192.0.2.0/24").unwrap(),
        "192.0.2.0/24 never file"
    );
    let status = rig.kgate.status();
    assert_eq!(status["crowdsec"]["state"], "connected", "{status}");
    assert_eq!(status["crowdsec"]["bans"], 5, "{status}");
    assert_eq!(
        status["xdp"]["blocklist_by_origin"],
        serde_json::json!({"file": 1, "command": 1, "crowdsec": 4}),
        "{status}"
    );
    let counters = xdp_counters(&pin).unwrap();
    assert!(
        counters.dropped_by_origin[3] >= 3
            && counters.dropped_by_origin[3] == counters.dropped_blocklist,
        "every drop so far was CrowdSec's: {counters:?}"
    );
    assert_eq!(
        status["xdp"]["dropped_by_origin"]["crowdsec"], counters.dropped_by_origin[3],
        "{status}"
    );
    let metrics = scrape_metrics(&rig.lab, METRICS);
    assert_eq!(metric_value(&metrics, "kgate_crowdsec_lapi_up", &[]), 1.0);
    assert_eq!(metric_value(&metrics, "kgate_crowdsec_bans", &[]), 5.0);
    let entries = |origin| {
        metric_value(
            &scrape_metrics(&rig.lab, METRICS),
            "kgate_blocklist_entries",
            &[("origin", origin)],
        )
    };
    assert_eq!(entries("crowdsec"), 4.0);
    assert_eq!(entries("file"), 1.0);
    assert!(
        metric_value(
            &metrics,
            "kgate_xdp_blocklist_drops_total",
            &[("origin", "crowdsec")]
        ) >= 3.0
    );

    // The bouncer's families are as clean as the others for Prometheus.
    let text = tests::prometheus::scrape(rig.lab.gateway(), METRICS, None);
    let checked = tests::prometheus::promtool_check(&text.body);
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n--- the body ---\n{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr),
        text.body
    );

    // 3. The LAPI goes away: the bans stay, one warning, status and metrics say so.
    lapi.stop();
    let status = wait_for_state(&rig.kgate, "unreachable");
    assert!(
        status["crowdsec"]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("cannot connect: Connection refused")),
        "{status}"
    );
    // A few failed pulls later (1 s, 2 s apart), still one warning.
    thread::sleep(Duration::from_secs(4));
    assert!(rig.kgate.status()["crowdsec"]["failed_pulls"].as_u64() >= Some(2));
    assert_eq!(sources.reachable(&rig), (false, false, true));
    assert_eq!(
        rig.kgate.log().matches("CrowdSec LAPI unreachable").count(),
        1,
        "{}",
        rig.kgate.log()
    );
    let text = std::process::Command::new(tests::kgate::kgate_bin())
        .args(["status", "-c"])
        .arg(rig.kgate.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("crowdsec: UNREACHABLE at http://127.0.0.1:8080/ for ")
            && text.contains("the blocklist keeps its CrowdSec entries"),
        "{text}"
    );
    assert!(
        text.contains("6 blocklist entries (file 1, command 1, crowdsec 4)"),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &scrape_metrics(&rig.lab, METRICS),
            "kgate_crowdsec_lapi_up",
            &[]
        ),
        0.0
    );
    lapi.start_again();
    wait_for_state(&rig.kgate, "connected");
    assert!(
        rig.kgate
            .wait_for_log("CrowdSec LAPI reachable again", APPLY_TIMEOUT),
        "{}",
        rig.kgate.log()
    );

    // 4. kgate stops; meanwhile the IPv6 range is deleted and the other source banned.
    // The next kgate finds the pinned entries and corrects them at its first pull.
    let config = fs::read_to_string(rig.kgate.config_path()).unwrap();
    rig.kgate.stop();
    lapi.decisions(&["delete", "--range", "fd00:200:1::/64"]);
    lapi.decisions(&["add", "--ip", &OTHER_V4.to_string(), "--duration", "30m"]);
    let second = Kgate::start(&rig.lab, &config);
    assert!(
        !sources.reachable(&rig).0,
        "the pinned ban holds from the start"
    );
    sources.wait_until(&rig, sources.v6, false);
    sources.wait_until(&rig, sources.other, true);
    assert_eq!(sources.reachable(&rig), (false, true, false));
    assert_eq!(
        listed(&pin, "198.51.100.0/24").unwrap(),
        "198.51.100.0/24 never command"
    );

    // 5. Deleting the decisions lets the client's IPv4 address back in; the
    // operator's entry, the file's and the other ban stay.
    lapi.decisions(&["delete", "--ip", &client_v4]);
    lapi.decisions(&["delete", "--range", "198.51.100.0/24"]);
    let delay = sources.wait_until(&rig, sources.v4, false);
    println!(
        "ban lifted {} ms after `cscli decisions delete` returned",
        delay.as_millis()
    );
    assert!(
        rig.lab
            .client()
            .run(move || greeted_from(sources.v4, sources.frontend_v4)),
        "a whole session again"
    );
    assert_eq!(sources.reachable(&rig), (true, true, false));
    assert_eq!(
        listed(&pin, "198.51.100.0/24").unwrap(),
        "198.51.100.0/24 never command"
    );
    assert_eq!(
        listed(&pin, "192.0.2.0/24").unwrap(),
        "192.0.2.0/24 never file"
    );

    // 6. [crowdsec] removed by a reload: its entries leave, the others stay.
    let without: String = config.split("\n[crowdsec]").next().unwrap().to_owned();
    fs::write(second.config_path(), &without).unwrap();
    let reload = second.reload();
    assert!(reload.status.success(), "{reload:?}");
    assert!(
        second.wait_for_log(
            "the CrowdSec entries of the blocklist were removed",
            APPLY_TIMEOUT
        ),
        "{}",
        second.log()
    );
    assert_eq!(sources.reachable(&rig), (true, true, true));
    let list = kgate_block_ok(&pin, &["list"]);
    assert!(!list.contains("crowdsec"), "{list}");
    assert!(
        list.contains("192.0.2.0/24") && list.contains("198.51.100.0/24"),
        "{list}"
    );
    let log = lapi.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("level=error") || l.contains("level=fatal"))
        .collect();
    assert!(warnings.is_empty(), "the LAPI logged errors: {warnings:#?}");
    drop(second);
}

#[test]
fn kgate_check_reads_the_bouncer_key_and_locates_bad_crowdsec_settings() {
    let dir = std::env::temp_dir().join(format!("kgate-crowdsec-check-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let key = dir.join("crowdsec-key");
    let config = dir.join("kgate.toml");
    let write_config = |crowdsec_keys: &str| {
        fs::write(
            &config,
            format!(
                "[[frontends]]\nname = \"smtp\"\nlisten = [\"192.0.2.1:25\"]\nbackend = \"mail\"\n\
                 [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"n1\"\n\
                 address = \"192.0.2.101:25\"\n[xdp]\ninterfaces = [\"eth0\"]\n\
                 [crowdsec]\n{crowdsec_keys}\n"
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = std::process::Command::new(tests::kgate::kgate_bin())
            .arg("check")
            .arg("-c")
            .arg(&config)
            .env_remove("KGATE_TEST_CROWDSEC_KEY")
            .output()
            .unwrap();
        // Without the note that 192.0.2.1 is not on this host (about freebind).
        let stderr = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|line| !line.starts_with("note: "))
            .map(|line| format!("{line}\n"))
            .collect::<String>();
        (out.status.code(), stderr)
    };

    write_config(&format!(
        "url = \"http://127.0.0.1:8080/\"\napi_key_file = {:?}",
        key.display().to_string()
    ));
    let (code, stderr) = check();
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "kgate: [crowdsec] api_key_file {}: No such file",
            key.display()
        )) && stderr.contains("cscli bouncers add kgate"),
        "{stderr}"
    );
    fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    assert_eq!(check(), (Some(0), String::new()));

    write_config("url = \"http://127.0.0.1:8080/\"\napi_key_env = \"KGATE_TEST_CROWDSEC_KEY\"");
    let (code, stderr) = check();
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("the environment variable KGATE_TEST_CROWDSEC_KEY is not set"),
        "{stderr}"
    );

    write_config("url = \"https://127.0.0.1:8080/\"\napi_key_env = \"K\"");
    let (code, stderr) = check();
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "kgate: {}:13:7: `https://127.0.0.1:8080/`: kgate talks plain HTTP",
            config.display()
        )),
        "{stderr}"
    );
    let _ = fs::remove_dir_all(&dir);
}
