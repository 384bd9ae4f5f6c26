//! Health checks against a real Postfix postscreen behind PROXY v2 (Debian's Postfix
//! 3.7, `postscreen_upstream_proxy_protocol = haproxy`), from the gateway namespace as
//! kgate checks its servers.
//!
//! The checks here are the byte sequences of kgate's `tcp` and `smtp` checks
//! (proxy-user/src/health/check.rs), sent by the lab's own client
//! ([`tests::smtp::health_check_tcp`], [`tests::smtp::health_check_smtp`]) until kgate
//! runs its checks in these tests itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use tests::kgate::{Kgate, global_section};
use tests::lab::{Lab, NetNs, skip_without_root};
use tests::postfix::{GREET_WAIT, Postfix, trouble};
use tests::smtp::{LOCAL_V2, SmtpClient, health_check_smtp, health_check_tcp};

/// For one check: postscreen's greet wait, then EHLO and QUIT.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for Postfix to log the end of a connection.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until the log written since `mark` shows a connection's end (postscreen's
/// `DISCONNECT`, smtpd's `disconnect from`, or a warning), plus a moment for lines
/// logged right after it; returns those lines.
fn settle(postfix: &Postfix, mark: usize) -> String {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while Instant::now() < deadline {
        let log = postfix.log_since(mark);
        if ["DISCONNECT [", "disconnect from", "warning:"]
            .iter()
            .any(|end| log.contains(end))
        {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    thread::sleep(Duration::from_millis(300));
    postfix.log_since(mark)
}

/// The log lines without their date, host and pid: `postscreen: HANGUP after 0 ...`.
fn brief(log: &str) -> Vec<String> {
    log.lines()
        .map(|line| {
            let program = line
                .split_whitespace()
                .nth(4)
                .and_then(|p| p.strip_prefix("postfix/"))
                .and_then(|p| p.split('[').next())
                .unwrap_or("?");
            let text = line.split_once("]: ").map_or(line, |(_, t)| t);
            format!("{program}: {text}")
        })
        .filter(|line| !line.contains("cache btree:"))
        .collect()
}

/// How often each kind of line occurs: [`brief`] lines with digits and addresses
/// taken out.
fn histogram(log: &str) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for line in brief(log) {
        let kind: String = line.chars().filter(|c| !c.is_ascii_digit()).collect();
        let kind = kind.replace("[...]:", "[ip]:port").replace("[...]", "[ip]");
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

/// Runs `client` in the gateway and returns what Postfix logged for it.
fn measure(
    postfix: &Postfix,
    gateway: &NetNs,
    style: &str,
    client: impl FnOnce() + Send + 'static,
) -> String {
    let mark = postfix.log_mark();
    gateway.run(client);
    let log = settle(postfix, mark);
    println!("--- {style}:");
    for line in brief(&log) {
        println!("    {line}");
    }
    log
}

#[test]
fn postscreen_log_for_each_style_of_health_check() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let listen = SocketAddr::new(lab.backend(0).v4().into(), 2525);
    let postfix = Postfix::start(&lab, lab.backend(0), listen);
    let gw = lab.gateway();
    let connect = move || SmtpClient::connect(listen, CHECK_TIMEOUT).unwrap();

    // Negative control: without a header postscreen warns, which shows that warnings
    // are seen here at all.
    let log = measure(&postfix, gw, "connect, close, no header", move || {
        connect().close_with_fin().unwrap();
    });
    assert!(
        log.contains("warning: haproxy read: EOF"),
        "a connection without a PROXY header should make postscreen warn:\n{log}"
    );

    // HAProxy's `check` with `send-proxy-v2`: LOCAL header, then close with a reset
    // (SO_LINGER 0). Expected: `warning: getpeername: Transport endpoint is not
    // connected`, as on the production gateway; depends on timing, so not asserted.
    measure(
        &postfix,
        gw,
        "LOCAL header, close with RST (HAProxy check)",
        move || {
            let mut client = connect();
            client.send_raw(&LOCAL_V2).unwrap();
            client.close_with_reset();
        },
    );

    let log = measure(
        &postfix,
        gw,
        "LOCAL header, close with FIN after draining (kgate tcp)",
        move || health_check_tcp(listen, CHECK_TIMEOUT).unwrap(),
    );
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
    assert!(log.contains("HANGUP after"), "{log}");

    // Negative control for PREGREET: a client that talks before the greeting's end.
    let log = measure(
        &postfix,
        gw,
        "LOCAL header and EHLO before the greeting ends (talking early)",
        move || {
            let mut client = connect();
            client
                .send_raw(&[&LOCAL_V2[..], b"EHLO early\r\n"].concat())
                .unwrap();
            let _ = client.read_reply();
            let _ = client.read_reply();
            let _ = client.expect("QUIT", 221);
            let _ = client.close_with_fin();
        },
    );
    assert!(log.contains("PREGREET"), "{log}");

    let started = Instant::now();
    let log = measure(
        &postfix,
        gw,
        "LOCAL header, whole greeting, QUIT",
        move || {
            let mut client = connect();
            client.send_raw(&LOCAL_V2).unwrap();
            let greeting = client.read_reply().unwrap();
            assert_eq!(greeting.code, 220, "{}", client.transcript());
            // The first time: `220-`, postscreen's greet wait, then `220 `.
            assert!(greeting.lines.len() >= 2, "{}", client.transcript());
            client.expect("QUIT", 221).unwrap();
            client.close_with_fin().unwrap();
        },
    );
    let waited = started.elapsed();
    assert!(waited >= GREET_WAIT, "greeted after {waited:?}");
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
    assert!(log.contains("PASS NEW"), "{log}");

    let log = measure(
        &postfix,
        gw,
        "LOCAL header, greeting, EHLO, QUIT (kgate smtp)",
        move || health_check_smtp(listen, "kgate.test", CHECK_TIMEOUT).unwrap(),
    );
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
    assert!(log.contains("PASS OLD"), "{log}");
    assert!(log.contains("ehlo=1 quit=1 commands=2"), "{log}");

    let log = measure(
        &postfix,
        gw,
        "kgate tcp once postscreen knows the gateway (smtpd answers)",
        move || health_check_tcp(listen, CHECK_TIMEOUT).unwrap(),
    );
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
}

/// kgate itself checks two Postfix servers for 30 s, once a second with `smtp` (one
/// backend) and once a second with `tcp` (another backend, same servers), then carries
/// a real client session (swaks) to one of them.
#[test]
fn kgate_checks_every_second_for_30_s_leave_postfix_clean_and_servers_up() {
    if skip_without_root() {
        return;
    }
    const DURATION: Duration = Duration::from_secs(30);
    let lab = Lab::new(2);
    let pool: Vec<Postfix> = (0..2)
        .map(|i| {
            let listen = SocketAddr::new(lab.backend(i).v4().into(), 2525);
            Postfix::start(&lab, lab.backend(i), listen)
        })
        .collect();
    let marks: Vec<usize> = pool.iter().map(Postfix::log_mark).collect();

    let gateway = lab.gateway().v4();
    let mut config = global_section(&lab, "sockmap");
    for (name, port, check) in [("smtp-checked", 25, "smtp"), ("tcp-checked", 26, "tcp")] {
        config.push_str(&format!(
            "\n[[frontends]]\nname = \"{name}\"\nlisten = [\"{gateway}:{port}\"]\nbackend = \"{name}\"\n\n\
             [[backends]]\nname = \"{name}\"\nproxy_protocol = \"v2\"\n\
             [backends.health]\ncheck = \"{check}\"\ninterval = \"1s\"\ntimeout = \"10s\"\n"
        ));
        for postfix in &pool {
            config.push_str(&format!(
                "[[backends.servers]]\nname = \"mx{}\"\naddress = \"{}\"\n",
                postfix
                    .listen()
                    .ip()
                    .to_string()
                    .rsplit('.')
                    .nth(1)
                    .unwrap(),
                postfix.listen()
            ));
        }
    }
    let kgate = Kgate::start(&lab, &config);
    thread::sleep(DURATION);

    let status = kgate.status();
    let servers = status["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 4);
    for server in servers {
        assert_eq!(server["state"], "up", "{server}");
        assert_eq!(server["consecutive_fail"], 0, "{server}");
        // About one check a second, after the first one's greet wait.
        let passed = server["consecutive_ok"].as_u64().unwrap();
        assert!(passed >= 15, "{server}");
    }

    // A real client session through kgate's smtp frontend.
    let out = lab
        .client()
        .command("swaks")
        .args(["--server", &format!("{gateway}:25"), "--timeout", "30"])
        .args([
            "--from",
            "alice@client.test",
            "--to",
            "postmaster@kgate.test",
        ])
        .args(["--helo", "client.test", "--quit-after", "RCPT"])
        .output()
        .expect("running swaks (installed by cargo xtask test)");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "swaks failed:\n{transcript}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = lab.client().v4();
    assert!(
        pool.iter()
            .any(|p| p.wait_for_log(&format!("CONNECT from [{client}]"), Duration::from_secs(5))),
        "Postfix logged the client namespace's address"
    );

    for (postfix, mark) in pool.iter().zip(marks) {
        let log = settle(postfix, mark);
        println!("Postfix {} logged, by kind of line:", postfix.listen());
        for (kind, n) in histogram(&log) {
            println!("  {n:4}  {kind}");
        }
        assert_eq!(
            trouble(&log),
            Vec::<String>::new(),
            "Postfix {} logged trouble",
            postfix.listen()
        );
        assert!(!log.contains("PREGREET"), "{log}");
    }
    assert!(
        !kgate.log().contains("server down"),
        "no server went down: {}",
        kgate.log()
    );
}
