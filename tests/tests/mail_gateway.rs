//! The mail gateway of the runbook, end to end: the packaged example configuration
//! (packaging/kgate.toml: 25, 465, 587 and 993 on the gateway, each to its NodePort on
//! four nodes, PROXY v2 everywhere) run in the lab, with the lab's addresses put in
//! for 10.0.20.x. Each of the four backend namespaces is a node running what the mail
//! pod runs behind its NodePorts: Postfix (postscreen on 30125, smtpd with TLS from the
//! first byte on 30465, smtpd on 30587, each reading the PROXY header) and Dovecot
//! (IMAPS on 30993, `haproxy = yes`). A client session on each port must reach a node
//! that logs the client's own address.

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use tests::dovecot::{Dovecot, Listeners, PASSWORD, USER};
use tests::kgate::{Kgate, control_socket_for, pin_path_for};
use tests::lab::{Lab, skip_without_root};
use tests::postfix::{MAIL_DOMAIN, Postfix, trouble};
use tests::tls::{self_signed, tls_session};

/// The example, as shipped.
const EXAMPLE: &str = include_str!("../../packaging/kgate.toml");

const NODES: usize = 4;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One node's servers.
struct Node {
    postfix: Postfix,
    dovecot: Dovecot,
}

/// The example with the lab's addresses: the gateway's for 10.0.20.1, node `i`'s for
/// 10.0.20.10`i`, and this lab's pin directory and control socket.
fn example_in(lab: &Lab) -> String {
    let mut config = EXAMPLE.to_owned();
    for i in 1..=NODES {
        config = config.replace(
            &format!("\"10.0.20.10{i}:"),
            &format!("\"{}:", lab.backend(i - 1).v4()),
        );
    }
    config = config.replace("\"10.0.20.1:", &format!("\"{}:", lab.gateway().v4()));
    assert!(
        !config
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("10.0.20.")),
        "an address of the example was not replaced:\n{config}"
    );
    config.replacen(
        "[global]\n",
        &format!(
            "[global]\nbpf_pin_path = {:?}\ncontrol_socket = {:?}\n",
            pin_path_for(lab).display().to_string(),
            control_socket_for(lab).display().to_string()
        ),
        1,
    )
}

/// Starts node `i`'s Postfix and Dovecot on the example's NodePorts.
fn start_node(lab: &Lab, i: usize) -> Node {
    let ns = lab.backend(i);
    let ip = ns.v4();
    let (cert, key) = self_signed(lab.temp_dir(), "mx.kgate.test");
    let tls = [
        format!("smtpd_tls_cert_file = {}", cert.display()),
        format!("smtpd_tls_key_file = {}", key.display()),
        "smtpd_tls_security_level = may".to_owned(),
        // Logs "TLS connection established from ...".
        "smtpd_tls_loglevel = 1".to_owned(),
        // The first session of a client waits this long in postscreen (6 s by default).
        "postscreen_greet_wait = 1s".to_owned(),
    ];
    let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
    let services = [
        // The submissions port: TLS from the first byte, after the PROXY header.
        format!(
            "{ip}:30465 inet n - n - - smtpd -o syslog_name=postfix/submissions \
             -o smtpd_tls_wrappermode=yes -o smtpd_upstream_proxy_protocol=haproxy"
        ),
        format!(
            "{ip}:30587 inet n - n - - smtpd -o syslog_name=postfix/submission \
             -o smtpd_upstream_proxy_protocol=haproxy"
        ),
    ];
    let postfix =
        Postfix::start_with_services(lab, ns, SocketAddr::new(ip.into(), 30125), &tls, &services);
    let dovecot = Dovecot::start(
        lab,
        ns,
        Listeners {
            imap: None,
            imaps: Some(SocketAddr::new(ip.into(), 30993)),
            trusted: lab.gateway_v4_toward_backend(i).into(),
        },
    );
    Node { postfix, dovecot }
}

/// The node kgate logged for the client's last connection to `frontend`.
fn node_used(kgate: &Kgate, frontend: &str, client: IpAddr) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let log = kgate.log();
        // "10.200.1.2:40312 smtp mail-smtp/node3 spliced ... "
        let found = log.lines().rev().find_map(|line| {
            let mut words = line
                .split_whitespace()
                .skip_while(|w| !w.starts_with(&format!("{client}:")));
            words.next()?;
            if words.next()? != frontend {
                return None;
            }
            let node = words.next()?.rsplit_once("/node")?.1;
            node.parse::<usize>().ok()
        });
        if let Some(node) = found {
            return node - 1;
        }
        assert!(
            Instant::now() < deadline,
            "kgate logged no connection of {client} to {frontend}:\n{log}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// swaks from the client to the gateway's `port`, up to RCPT (nothing is sent).
fn swaks(lab: &Lab, port: u16, tls_on_connect: bool) {
    let mut swaks = lab.client().command("swaks");
    swaks
        .args(["--server", &format!("{}:{port}", lab.gateway().v4())])
        .args(["--from", "alice@client.test", "--to"])
        .arg(format!("postmaster@{MAIL_DOMAIN}"))
        .args([
            "--helo",
            "client.test",
            "--quit-after",
            "RCPT",
            "--timeout",
            "30",
        ]);
    if tls_on_connect {
        swaks.arg("--tls-on-connect");
    }
    let out = swaks.output().expect("running swaks");
    assert!(
        out.status.success(),
        "swaks to port {port} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_packaged_example_carries_25_465_587_and_993_to_four_nodes_with_the_client_address() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(NODES);
    let nodes: Vec<Node> = (0..NODES).map(|i| start_node(&lab, i)).collect();
    let kgate = Kgate::start(&lab, &example_in(&lab));
    let client: IpAddr = lab.client().v4().into();
    let gateway = lab.gateway().v4();

    // Every server of every backend checked once, and up.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = kgate.status();
        let servers = status["servers"].as_array().unwrap().clone();
        assert_eq!(servers.len(), 4 * NODES, "{status}");
        if servers.iter().all(|s| s["last_check"] == "ok") {
            assert!(servers.iter().all(|s| s["state"] == "up"), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all servers checked ok: {status}"
        );
        thread::sleep(Duration::from_millis(200));
    }

    // 25: postscreen, then smtpd.
    swaks(&lab, 25, false);
    let node = &nodes[node_used(&kgate, "smtp", client)];
    let line = format!("CONNECT from [{client}]:");
    assert!(
        node.postfix.wait_for_log(&line, TIMEOUT)
            && node.postfix.log().contains(&format!("to [{gateway}]:25")),
        "{line:?} not in:\n{}",
        node.postfix.log()
    );

    // 465: TLS from the first byte.
    swaks(&lab, 465, true);
    let node = &nodes[node_used(&kgate, "submissions", client)];
    let line = "postfix/submissions/smtpd";
    assert!(
        node.postfix
            .wait_for_log(&format!("connect from unknown[{client}]"), TIMEOUT)
            && node.postfix.log().lines().any(
                |l| l.contains(line) && l.contains(&format!("connect from unknown[{client}]"))
            ),
        "no submissions connect from {client}:\n{}",
        node.postfix.log()
    );
    assert!(
        node.postfix.log().contains(&format!(
            "TLS connection established from unknown[{client}]"
        )),
        "{}",
        node.postfix.log()
    );

    // 587: plain SMTP (STARTTLS offered, not used by this client).
    swaks(&lab, 587, false);
    let node = &nodes[node_used(&kgate, "submission", client)];
    assert!(
        node.postfix
            .wait_for_log("postfix/submission/smtpd", TIMEOUT)
            && node
                .postfix
                .log()
                .lines()
                .any(|l| l.contains("postfix/submission/smtpd")
                    && l.contains(&format!("connect from unknown[{client}]"))),
        "no submission connect from {client}:\n{}",
        node.postfix.log()
    );

    // 993: IMAPS to Dovecot.
    let to = SocketAddr::new(gateway.into(), 993);
    let said = tls_session(
        lab.client(),
        to,
        &[&format!("a1 LOGIN {USER} {PASSWORD}"), "a2 LOGOUT"],
    );
    assert!(said.contains("a1 OK") && said.contains("a2 OK"), "{said}");
    let node = &nodes[node_used(&kgate, "imaps", client)];
    let login = format!("Login: user=<{USER}>, method=PLAIN, rip={client}, lip={gateway}");
    assert!(
        node.dovecot.wait_for_log(&login, TIMEOUT),
        "{login:?} not in:\n{}",
        node.dovecot.log()
    );
    let line = node
        .dovecot
        .log()
        .lines()
        .find(|l| l.contains(&login))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(line.contains(", TLS"), "{line}");

    // The checks (smtp on 25 and 587, smtps and imaps on the TLS ports) and the
    // sessions left no warning or error on any node, nor a TLS connection cut short (a
    // tcp check on the TLS ports left one per check).
    for (i, node) in nodes.iter().enumerate() {
        let (postfix, dovecot) = (node.postfix.log(), node.dovecot.log());
        assert!(
            !postfix.contains("SSL_accept error"),
            "node{}:\n{postfix}",
            i + 1
        );
        assert!(
            !dovecot.contains("TLS handshaking"),
            "node{}:\n{dovecot}",
            i + 1
        );
        assert_eq!(
            trouble(&postfix),
            Vec::<String>::new(),
            "node{}:\n{postfix}",
            i + 1
        );
        assert_eq!(
            tests::dovecot::trouble(&dovecot),
            Vec::<String>::new(),
            "node{}:\n{dovecot}",
            i + 1
        );
    }
    assert!(!kgate.log().contains("server down"), "{}", kgate.log());
}
