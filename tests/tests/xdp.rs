//! XDP early drop in the lab: kgate attaches its XDP program to the gateway's
//! client-side veth (`[xdp] interfaces`), and the client, with an IPv4 and an IPv6
//! address, is two sources: one blocked or flooding, the other not. `kgate block`
//! runs as an operator runs it, from another shell, on the pinned maps.

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use tests::{
    backend::{TcpServer, read_proxy_header},
    bpftool,
    kgate::{Kgate, kgate_bin},
    lab::{Lab, skip_without_root},
    on_every_dataplane,
    rig::{Rig, set_timeouts},
    xdp::{kgate_block, kgate_block_ok, xdp_counters},
};

on_every_dataplane!(
    a_blocked_source_cannot_connect_while_another_can_and_unblocking_works_at_once,
    a_source_over_the_syn_rate_loses_syns_and_one_under_it_loses_none,
    the_blocklist_file_applies_from_the_start_and_blocks_survive_a_restart,
);

/// How long a connect waits for the SYN-ACK before the test counts it as dropped:
/// under the kernel's first SYN retransmission (1 s), so each failed attempt is
/// exactly one dropped SYN.
const SYN_WAIT: Duration = Duration::from_millis(700);

/// `[xdp]` on the gateway's interface toward the client, with `extra` keys.
fn xdp_section(extra: &'static str) -> impl FnOnce(&Lab) -> String {
    move |lab| {
        format!(
            "\n[xdp]\ninterfaces = [\"{}\"]\n{extra}\n",
            lab.gateway().ifname()
        )
    }
}

/// A backend that greets every client after its PROXY header.
fn greeting_server(rig: &Rig) -> TcpServer {
    TcpServer::start(rig.lab.backend(0), rig.backend_addr(0), |mut s| {
        set_timeouts(&s);
        if read_proxy_header(&mut s).is_ok() {
            let _ = s.write_all(b"220 hi\r\n");
        }
    })
}

/// Whether a connection to `to` gets the backend's greeting.
fn greeted(to: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
        return false;
    };
    set_timeouts(&stream);
    let mut banner = [0u8; 8];
    stream.read_exact(&mut banner).is_ok() && &banner == b"220 hi\r\n"
}

/// Whether the handshake with `to` completes within [`SYN_WAIT`].
fn handshake(to: SocketAddr) -> bool {
    TcpStream::connect_timeout(&to, SYN_WAIT).is_ok()
}

fn a_blocked_source_cannot_connect_while_another_can_and_unblocking_works_at_once(
    dataplane: &'static str,
) {
    let mut rig = Rig::start_with_sections(dataplane, 1, "", "", &[], xdp_section(""));
    let _server = greeting_server(&rig);
    let log = rig.kgate.log();
    assert!(
        log.contains("XDP attached") && log.contains("interface=kg-client mode=native"),
        "veth has native XDP:\n{log}"
    );
    let pin = rig.kgate.pin_path();
    let client_v4 = rig.lab.client().v4();

    let out = kgate_block_ok(&pin, &["add", &client_v4.to_string()]);
    assert_eq!(
        out,
        format!("blocked {client_v4}/32 until `kgate block del {client_v4}/32`\n")
    );
    let list = kgate_block_ok(&pin, &["list"]);
    assert!(
        list.lines().any(|l| l.split_whitespace().eq([
            &format!("{client_v4}/32"),
            "never",
            "command"
        ])),
        "{list}"
    );

    let (v4, v6, backend) = (rig.frontend_v4(), rig.frontend_v6(), rig.backend_addr(0));
    let (failed, other_source, routed) = rig.lab.client().run(move || {
        let failed = (0..3).filter(|_| !handshake(v4)).count();
        // The direct path to the backend, routed by the gateway, is not kgate's.
        (failed, greeted(v6), handshake(backend))
    });
    assert_eq!(failed, 3, "every SYN from the blocked address is dropped");
    assert!(other_source, "the client's IPv6 address is not blocked");
    assert!(routed, "traffic through the gateway is not touched");
    let counters = xdp_counters(&pin).unwrap();
    assert_eq!(
        (counters.dropped_blocklist, counters.dropped_syn_rate),
        (3, 0),
        "{counters:?}"
    );
    assert_eq!(
        counters.dropped_by_origin,
        [0, 0, 3, 0],
        "dropped by a command entry: {counters:?}"
    );
    // kgate status shows the same counters.
    let status = rig.kgate.status();
    assert_eq!(status["xdp"]["dropped_blocklist"], 3, "{status}");
    assert_eq!(status["xdp"]["dropped_syn_rate"], 0, "{status}");
    // bpftool shows the counters by name (BTF).
    let dump = bpftool::dump(&pin.join("xdp_stats"));
    for field in [
        "passed",
        "dropped_blocklist",
        "dropped_syn_rate",
        "malformed",
    ] {
        assert!(dump.contains(&format!("\"{field}\"")), "{field}:\n{dump}");
    }

    assert_eq!(
        kgate_block_ok(&pin, &["del", &format!("{client_v4}/32")]),
        format!("unblocked {client_v4}/32\n")
    );
    assert!(
        rig.lab.client().run(move || greeted(v4)),
        "unblocked at once"
    );
    assert_eq!(xdp_counters(&pin).unwrap().dropped_blocklist, 3);
    let again = kgate_block(&pin, &["del", &format!("{client_v4}/32")]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("is not in the blocklist"),
        "{again:?}"
    );
    assert_eq!(kgate_block_ok(&pin, &["list"]), "no blocked prefixes\n");

    rig.kgate.stop();
    let log = rig.kgate.log();
    let totals = log
        .lines()
        .find(|l| l.contains("XDP totals"))
        .unwrap_or_else(|| panic!("no XDP totals at shutdown:\n{log}"));
    assert!(
        totals.contains("dropped_blocklist=3 dropped_syn_rate=0"),
        "{totals}"
    );
}

fn a_source_over_the_syn_rate_loses_syns_and_one_under_it_loses_none(dataplane: &'static str) {
    let rig = Rig::start_with_sections(
        dataplane,
        1,
        "",
        "",
        &[],
        xdp_section("syn_rate = 5\nsyn_burst = 5"),
    );
    let _server = greeting_server(&rig);
    let pin = rig.kgate.pin_path();
    let (v4, v6) = (rig.frontend_v4(), rig.frontend_v6());

    // 20 connections at once from the IPv4 address: 5 fit the burst, a few more the
    // refill while they go out; the other SYNs are dropped.
    let connected = rig.lab.client().run(move || {
        let attempts: Vec<_> = (0..20)
            .map(|_| thread::spawn(move || handshake(v4)))
            .collect();
        attempts
            .into_iter()
            .map(|a| a.join().unwrap())
            .filter(|&ok| ok)
            .count()
    });
    assert!(
        (5..=8).contains(&connected),
        "{connected} of 20 connected at 5 SYNs a second with bursts of 5"
    );
    let counters = xdp_counters(&pin).unwrap();
    assert_eq!(
        counters.dropped_syn_rate,
        20 - connected as u64,
        "one dropped SYN per failed connection: {counters:?}"
    );

    // The IPv6 address, one connection every 300 ms: under 5 a second, never dropped.
    let slow = rig.lab.client().run(move || {
        (0..5)
            .filter(|_| {
                thread::sleep(Duration::from_millis(300));
                greeted(v6)
            })
            .count()
    });
    assert_eq!(slow, 5);
    let after = xdp_counters(&pin).unwrap();
    assert_eq!(after.dropped_syn_rate, counters.dropped_syn_rate);
    assert_eq!(after.dropped_blocklist, 0);
}

fn the_blocklist_file_applies_from_the_start_and_blocks_survive_a_restart(dataplane: &'static str) {
    let mut rig = Rig::start_with_sections(dataplane, 1, "", "", &[], |lab| {
        let file = lab.temp_dir().join("blocklist");
        fs::write(&file, "# the client's IPv6 network\nfd00:200:1::/64\n").unwrap();
        format!(
            "\n[xdp]\ninterfaces = [\"{}\"]\nblocklist_file = \"{}\"\n",
            lab.gateway().ifname(),
            file.display()
        )
    });
    let _server = greeting_server(&rig);
    assert!(
        rig.kgate.log().contains("blocklist file loaded") && rig.kgate.log().contains("prefixes=1"),
        "{}",
        rig.kgate.log()
    );
    let pin = rig.kgate.pin_path();
    let (v4, v6) = (rig.frontend_v4(), rig.frontend_v6());
    let reachable = |rig: &Rig| rig.lab.client().run(move || (handshake(v4), handshake(v6)));
    assert_eq!(reachable(&rig), (true, false), "the file blocks IPv6 only");

    kgate_block_ok(&pin, &["add", "10.200.1.0/24", "--expires", "1h"]);
    assert_eq!(reachable(&rig), (false, false));
    let list = kgate_block_ok(&pin, &["list"]);
    let row = |prefix: &str| {
        list.lines()
            .find(|l| l.starts_with(prefix))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{prefix} not listed:\n{list}"))
    };
    assert!(
        ["10.200.1.0/24 in 59m", "10.200.1.0/24 in 1h"]
            .iter()
            .any(|p| row("10.200.1.0/24").starts_with(p)),
        "{list}"
    );
    assert!(row("10.200.1.0/24").ends_with(" command"), "{list}");
    assert_eq!(row("fd00:200:1::/64"), "fd00:200:1::/64 never file");

    // A restart keeps the blocklists (and only them) pinned, and the next kgate uses them.
    let config = fs::read_to_string(rig.kgate.config_path()).unwrap();
    rig.kgate.stop();
    assert!(pin.join("blocklist_v4").exists() && pin.join("blocklist_v6").exists());
    assert!(!pin.join("xdp_stats").exists() && !pin.join("syn_rate").exists());
    // `kgate block` works while kgate is stopped, and finds the maps from the config.
    let listed = Command::new(kgate_bin())
        .args(["block", "list", "-c"])
        .arg(rig.kgate.config_path())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("10.200.1.0/24"),
        "{listed:?}"
    );
    let second = Kgate::start(&rig.lab, &config);
    assert!(
        !second.log().contains("replacing the pinned blocklist"),
        "{}",
        second.log()
    );
    assert_eq!(reachable(&rig), (false, false), "both blocks survived");

    // An expiry ends the block without anyone removing it.
    kgate_block_ok(&pin, &["add", "10.200.1.0/24", "--expires", "2s"]);
    assert_eq!(reachable(&rig), (false, false));
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(reachable(&rig), (true, false), "expired");
    assert!(!kgate_block_ok(&pin, &["list"]).contains("10.200.1.0/24"));
    drop(second);
}

#[test]
fn an_interface_without_native_xdp_gets_generic_mode_and_a_missing_one_stops_kgate() {
    if skip_without_root() {
        return;
    }
    let mut rig = Rig::start_with_sections("sockmap", 1, "", "", &[], |lab| {
        format!(
            "\n[xdp]\ninterfaces = [\"{}\", \"lo\"]\n",
            lab.gateway().ifname()
        )
    });
    let log = rig.kgate.log();
    assert!(
        log.contains("interface=kg-client mode=native"),
        "veth has native XDP:\n{log}"
    );
    assert!(
        log.contains("XDP attached in generic mode: the driver of lo has no native XDP"),
        "{log}"
    );

    let config = fs::read_to_string(rig.kgate.config_path())
        .unwrap()
        .replace("\"lo\"", "\"kg-nope\"");
    rig.kgate.stop();
    let lab = &rig.lab;
    let panic =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Kgate::start(lab, &config)))
            .expect_err("kgate must not start with a missing interface");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        message.contains("[xdp] interfaces: there is no interface `kg-nope` here"),
        "{message}"
    );
}

#[test]
fn kgate_block_refuses_a_bad_prefix_and_says_where_the_maps_are_missing() {
    let run = |args: &[&str]| {
        Command::new(kgate_bin())
            .args(args)
            .output()
            .expect("running kgate")
    };
    let out = run(&["block", "add", "10.0.0.1/8", "--pin-path", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value '10.0.0.1/8'")
            && stderr.contains("did you mean 10.0.0.0/8?"),
        "{stderr}"
    );
    let out = run(&[
        "block",
        "add",
        "192.0.2.0/24",
        "--expires",
        "soon",
        "--pin-path",
        "/x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`soon` is not a duration"));

    let out = run(&["block", "list", "--pin-path", "/nonexistent-kgate-pins"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("kgate: no blocklist under /nonexistent-kgate-pins"),
        "{stderr}"
    );
}

#[test]
fn kgate_check_reads_the_blocklist_file_and_locates_bad_lines() {
    let dir = std::env::temp_dir().join(format!("kgate-xdp-check-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let blocklist = dir.join("blocklist");
    let config = dir.join("kgate.toml");
    let write_config = |xdp_keys: &str| {
        fs::write(
            &config,
            format!(
                "[[frontends]]\nname = \"smtp\"\nlisten = [\"192.0.2.1:25\"]\nbackend = \"mail\"\n\
                 [[backends]]\nname = \"mail\"\n[[backends.servers]]\nname = \"n1\"\n\
                 address = \"192.0.2.101:25\"\n[xdp]\ninterfaces = [\"eth0\"]\n{xdp_keys}\n"
            ),
        )
        .unwrap();
    };
    let check = || {
        let out = Command::new(kgate_bin())
            .arg("check")
            .arg("-c")
            .arg(&config)
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
        "blocklist_file = {:?}",
        blocklist.display().to_string()
    ));
    fs::write(&blocklist, "192.0.2.0/24\n2001:db8::/32 # a comment\n").unwrap();
    assert_eq!(check(), (Some(0), String::new()));

    fs::write(&blocklist, "192.0.2.0/24\n10.0.0.1/8\n").unwrap();
    let (code, stderr) = check();
    assert_eq!(code, Some(1));
    assert_eq!(
        stderr,
        format!(
            "kgate: {}:2: `10.0.0.1/8` has bits set past its /8: did you mean 10.0.0.0/8?; \
             fix or remove that line\n",
            blocklist.display()
        )
    );

    write_config("syn_rate = 0");
    let (code, stderr) = check();
    assert_eq!(code, Some(1));
    assert!(
        stderr.starts_with(&format!(
            "kgate: {}:12:12: syn_rate = 0 would drop every SYN",
            config.display()
        )),
        "{stderr}"
    );
    let _ = fs::remove_dir_all(&dir);
}
