//! kgate's `smtps` and `imaps` checks against real servers that speak TLS from the first
//! byte, as the mail gateway's 465 and 993 do (tests/tests/mail_gateway.rs): Postfix's
//! smtpd with `smtpd_tls_wrappermode` and Dovecot's IMAPS listener, both reading the
//! PROXY v2 header, in a lab namespace, checked by kgate from the gateway. The checks
//! must leave both logs clean; a plain server on a TLS port, and a certificate that
//! `tls_verify` refuses, must fail with a reason that says so.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::dovecot::{Dovecot, Listeners};
use tests::kgate::{Kgate, global_section, kgate_bin};
use tests::lab::{Lab, skip_without_root};
use tests::postfix::{Postfix, trouble};
use tests::tls::{ca_signed, self_signed};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Checks in a row each server must have passed (or failed) before the logs are read.
const CHECKS: u64 = 3;
/// The name in the CA-signed certificate of Postfix's 465.
const MX_NAME: &str = "mx.kgate.test";

/// A backend named `name` with one server at `address`, checked every second with
/// `check` and the extra `[backends.health]` lines `health`, behind a frontend of the
/// same name on the gateway's `port` (PROXY v2 to the server; LOCAL header first on
/// each check).
fn backend(
    lab: &Lab,
    port: u16,
    name: &str,
    check: &str,
    address: SocketAddr,
    health: &str,
) -> String {
    let gateway = lab.gateway().v4();
    format!(
        "\n[[frontends]]\nname = \"{name}\"\nlisten = [\"{gateway}:{port}\"]\nbackend = \"{name}\"\n\n\
         [[backends]]\nname = \"{name}\"\nproxy_protocol = \"v2\"\n\
         [backends.health]\ncheck = \"{check}\"\ninterval = \"1s\"\n{health}\n\
         [[backends.servers]]\nname = \"node1\"\naddress = \"{address}\"\n"
    )
}

/// An smtpd service of Postfix on `address`, reading the PROXY header, logging as
/// `postfix/<name>/smtpd`, with the extra `-o` settings `options`.
fn smtpd(address: SocketAddr, name: &str, options: &str) -> String {
    format!(
        "{address} inet n - n - - smtpd -o syslog_name=postfix/{name} \
         -o smtpd_upstream_proxy_protocol=haproxy {options}"
    )
}

/// Waits until `done` holds for kgate's servers (by backend name); returns the status.
fn wait_for_servers(kgate: &Kgate, what: &str, done: impl Fn(&str, &Value) -> bool) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = kgate.status();
        let servers = status["servers"].as_array().expect("a server list").clone();
        if servers
            .iter()
            .all(|s| done(s["backend"].as_str().unwrap_or_default(), s))
        {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {TIMEOUT:?}: {status:#}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

fn passed(server: &Value) -> u64 {
    server["consecutive_ok"].as_u64().unwrap_or_default()
}

fn server<'a>(status: &'a Value, backend: &str) -> &'a Value {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["backend"] == backend)
        .unwrap_or_else(|| panic!("no server of {backend}: {status:#}"))
}

/// Waits until `count(log)` reaches `at_least`; returns the log then.
fn wait_for_lines(log: impl Fn() -> String, count: impl Fn(&str) -> u64, at_least: u64) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = log();
        if count(&text) >= at_least || Instant::now() >= deadline {
            return text;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn smtps_and_imaps_checks_keep_postfix_on_465_and_dovecot_on_993_up_and_their_logs_clean() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let ns = lab.backend(0);
    let ip = ns.v4();
    let gateway: Ipv4Addr = lab.gateway_v4_toward_backend(0);

    // Postfix's 465 with a certificate signed by a lab CA, for the check that verifies.
    let (ca, cert, key) = ca_signed(lab.temp_dir(), MX_NAME);
    let main_cf = [
        format!("smtpd_tls_cert_file = {}", cert.display()),
        format!("smtpd_tls_key_file = {}", key.display()),
        "smtpd_tls_security_level = may".to_owned(),
        // Logs "... TLS connection established from ...".
        "smtpd_tls_loglevel = 1".to_owned(),
    ];
    let main_cf: Vec<&str> = main_cf.iter().map(String::as_str).collect();
    let submissions = SocketAddr::new(ip.into(), 30465);
    let postfix = Postfix::start_with_services(
        &lab,
        ns,
        SocketAddr::new(ip.into(), 30125),
        &main_cf,
        &[smtpd(
            submissions,
            "submissions",
            "-o smtpd_tls_wrappermode=yes",
        )],
    );
    // Dovecot's 993, with its self-signed certificate (`openssl req -x509`).
    let imaps = SocketAddr::new(ip.into(), 30993);
    let dovecot = Dovecot::start(
        &lab,
        ns,
        Listeners {
            imap: None,
            imaps: Some(imaps),
            trusted: gateway.into(),
        },
    );
    let dovecot_cert = dovecot.certificate().expect("an IMAPS listener");

    let path = |p: &Path| p.display().to_string();
    let mut config = global_section(&lab, "userspace");
    config.push_str(&backend(&lab, 465, "smtps", "smtps", submissions, ""));
    config.push_str(&backend(
        &lab,
        466,
        "smtps-verified",
        "smtps",
        submissions,
        &format!(
            "tls_verify = true\ntls_ca_file = {:?}\ntls_server_name = \"{MX_NAME}\"",
            path(&ca)
        ),
    ));
    config.push_str(&backend(&lab, 993, "imaps", "imaps", imaps, ""));
    // The self-signed certificate itself as the CA file: trusted as it is.
    config.push_str(&backend(
        &lab,
        994,
        "imaps-verified",
        "imaps",
        imaps,
        &format!("tls_verify = true\ntls_ca_file = {:?}", path(&dovecot_cert)),
    ));
    let kgate = Kgate::start(&lab, &config);

    let status = wait_for_servers(&kgate, "every server passed 3 checks in a row", |_, s| {
        passed(s) >= CHECKS
    });
    for s in status["servers"].as_array().unwrap() {
        assert_eq!(s["state"], "up", "{s}");
        assert_eq!(s["last_check"], "ok", "{s}");
    }
    let smtps_checks = passed(server(&status, "smtps")) + passed(server(&status, "smtps-verified"));
    let imaps_checks = passed(server(&status, "imaps")) + passed(server(&status, "imaps-verified"));

    // Postfix: a whole session per check (LOCAL header, so from the gateway's own
    // address), inside TLS, ended by QUIT; no warning, no lost connection.
    let session_end = format!("disconnect from unknown[{gateway}] ehlo=1 quit=1 commands=2");
    let log = wait_for_lines(
        || postfix.log(),
        |log| {
            log.lines()
                .filter(|l| l.contains("postfix/submissions/smtpd[") && l.contains(&session_end))
                .count() as u64
        },
        smtps_checks,
    );
    let sessions = log.matches(&session_end).count() as u64;
    let tls = log
        .matches(&format!(
            "TLS connection established from unknown[{gateway}]"
        ))
        .count() as u64;
    println!(
        "Postfix logged {sessions} sessions {session_end:?} and {tls} TLS connections for \
         {smtps_checks} smtps checks passed"
    );
    assert!(sessions >= smtps_checks, "{sessions} sessions:\n{log}");
    assert!(tls >= smtps_checks, "{tls} TLS connections:\n{log}");
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
    for alarming in ["lost connection", "SSL_accept error", "TLS library problem"] {
        assert!(!log.contains(alarming), "{alarming:?} in:\n{log}");
    }

    // Dovecot: one clean disconnect line per check, inside TLS, and nothing else about
    // the gateway (a check in progress has logged nothing yet).
    let check_line = |l: &str| {
        tests::dovecot::is_check_line(l, gateway.into(), imaps.ip())
            && l.contains(&format!("lip={}, TLS,", imaps.ip()))
    };
    let count = |log: &str| log.lines().filter(|l| check_line(l)).count() as u64;
    let log = wait_for_lines(|| dovecot.log(), count, imaps_checks);
    let clean = count(&log);
    println!(
        "Dovecot logged {clean} check lines (inside TLS) for {imaps_checks} imaps checks passed"
    );
    assert!(clean >= imaps_checks, "{clean} check lines:\n{log}");
    let about_the_gateway: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("rip={gateway},")))
        .filter(|l| !check_line(l))
        .collect();
    assert_eq!(about_the_gateway, Vec::<&str>::new(), "{log}");
    assert_eq!(tests::dovecot::trouble(&log), Vec::<String>::new(), "{log}");
    assert!(!kgate.log().contains("server down"), "{}", kgate.log());
}

#[test]
fn tls_checks_fail_on_a_plain_port_and_on_a_certificate_tls_verify_refuses_saying_why() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new(1);
    let ns = lab.backend(0);
    let ip = ns.v4();
    let (cert, key) = self_signed(lab.temp_dir(), MX_NAME);
    let plain = SocketAddr::new(ip.into(), 30466);
    let self_signed_tls = SocketAddr::new(ip.into(), 30467);
    let postfix = Postfix::start_with_services(
        &lab,
        ns,
        SocketAddr::new(ip.into(), 30125),
        &[],
        &[
            // Plain SMTP where the check expects TLS.
            smtpd(plain, "plain", ""),
            smtpd(
                self_signed_tls,
                "selfsigned",
                &format!(
                    "-o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=may \
                     -o smtpd_tls_cert_file={} -o smtpd_tls_key_file={}",
                    cert.display(),
                    key.display()
                ),
            ),
        ],
    );

    let mut config = global_section(&lab, "userspace");
    config.push_str(&backend(&lab, 465, "plain-on-465", "smtps", plain, ""));
    config.push_str(&backend(
        &lab,
        466,
        "self-signed-verified",
        "smtps",
        self_signed_tls,
        "tls_verify = true",
    ));
    config.push_str(&backend(
        &lab,
        467,
        "self-signed-from-ca-file",
        "smtps",
        self_signed_tls,
        &format!(
            "tls_verify = true\ntls_ca_file = {:?}",
            cert.display().to_string()
        ),
    ));
    let kgate = Kgate::start(&lab, &config);

    let status = wait_for_servers(&kgate, "each server checked 2 times", |backend, s| {
        let in_a_row = if backend == "self-signed-from-ca-file" {
            passed(s)
        } else {
            s["consecutive_fail"].as_u64().unwrap_or_default()
        };
        in_a_row >= 2
    });
    let detail = |backend: &str| {
        let s = server(&status, backend);
        (
            s["state"].as_str().unwrap_or_default().to_owned(),
            s["last_check"].as_str().unwrap_or_default().to_owned(),
            s["last_check_detail"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };

    let (state, last_check, reason) = detail("plain-on-465");
    println!("plain server on a TLS port: {state}, {last_check}: {reason}");
    assert_eq!((state.as_str(), last_check.as_str()), ("down", "tls"));
    let expected = format!(
        "TLS handshake failed: the server answered in clear text, not TLS: \"220 {MX_NAME} ESMTP"
    );
    assert!(reason.starts_with(&expected), "{reason}");

    let (state, last_check, reason) = detail("self-signed-verified");
    println!("self-signed certificate, tls_verify = true: {state}, {last_check}: {reason}");
    assert_eq!((state.as_str(), last_check.as_str()), ("down", "tls"));
    assert!(
        reason.starts_with(
            "TLS handshake failed: the server's certificate is not trusted (tls_verify = true): "
        ) && reason.contains("tls_ca_file"),
        "{reason}"
    );

    let (state, last_check, reason) = detail("self-signed-from-ca-file");
    assert_eq!(
        (state.as_str(), last_check.as_str(), reason.as_str()),
        ("up", "ok", "")
    );

    // What Postfix made of the failing checks (for the record: they failed, so the
    // server may complain).
    let log = postfix.log();
    for line in log
        .lines()
        .filter(|l| l.contains("postfix/plain/") || l.contains("postfix/selfsigned/"))
        .take(12)
    {
        println!("  {line}");
    }
}

/// `kgate check` reads `tls_ca_file`: one it cannot read, or that holds no
/// certificate, is an error at the key's line that says what to give.
#[test]
fn kgate_check_reads_the_ca_file_and_names_the_line_of_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("kgate-health-tls-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let (ca, _) = self_signed(&dir, "ca.kgate.test");
    let not_pem = dir.join("not-pem.txt");
    fs::write(&not_pem, "a note, not a certificate\n").unwrap();
    let check = |ca_file: &Path| {
        let config = dir.join("kgate.toml");
        fs::write(
            &config,
            format!(
                "[[frontends]]\nname = \"imaps\"\nlisten = [\"192.0.2.1:993\"]\nbackend = \"b\"\n\
                 [[backends]]\nname = \"b\"\n[backends.health]\ncheck = \"imaps\"\n\
                 tls_verify = true\ntls_ca_file = {:?}\n\
                 [[backends.servers]]\nname = \"node1\"\naddress = \"192.0.2.101:30993\"\n",
                ca_file.display().to_string()
            ),
        )
        .unwrap();
        let out = Command::new(kgate_bin())
            .arg("check")
            .arg("-c")
            .arg(&config)
            .output()
            .expect("running kgate check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).replace(&config.display().to_string(), "FILE"),
            String::from_utf8_lossy(&out.stderr).replace(&config.display().to_string(), "FILE"),
        )
    };
    let (code, stdout, stderr) = check(&ca);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("FILE: valid"), "{stdout}");

    let missing = dir.join("missing.pem");
    let (code, _, stderr) = check(&missing);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "kgate: FILE:10:15: cannot read tls_ca_file `{}`: No such file or directory",
            missing.display()
        )),
        "{stderr}"
    );
    let (code, _, stderr) = check(&not_pem);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("kgate: FILE:10:15: tls_ca_file ")
            && stderr.contains("holds no certificate"),
        "{stderr}"
    );
    let _ = fs::remove_dir_all(&dir);
}
