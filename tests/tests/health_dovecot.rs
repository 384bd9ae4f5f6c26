//! kgate's `imap` health check against a real Dovecot behind PROXY v2 (Debian's
//! Dovecot 2.3, an `inet_listener` with `haproxy = yes` trusting the gateway), and a
//! real IMAP login through kgate, on every data plane.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use tests::dovecot::{Dovecot, Listeners, USER, imap_login, is_check_line, trouble};
use tests::kgate::{Kgate, global_section};
use tests::lab::Lab;
use tests::on_every_dataplane;

/// How long kgate checks Dovecot before the verdict.
const CHECKING: Duration = Duration::from_secs(30);
const TIMEOUT: Duration = Duration::from_secs(20);

on_every_dataplane!(
    kgate_imap_checks_every_second_for_30_s_leave_dovecot_clean_and_logins_show_the_client
);

fn kgate_imap_checks_every_second_for_30_s_leave_dovecot_clean_and_logins_show_the_client(
    dataplane: &'static str,
) {
    let lab = Lab::new(1);
    let imap = SocketAddr::new(lab.backend(0).v4().into(), 143);
    let gateway_toward_backend = lab.gateway_v4_toward_backend(0);
    let dovecot = Dovecot::start(
        &lab,
        lab.backend(0),
        Listeners {
            imap: Some(imap),
            imaps: None,
            trusted: gateway_toward_backend.into(),
        },
    );
    let mark = dovecot.log_mark();

    let frontend = SocketAddr::new(lab.gateway().v4().into(), 143);
    let mut config = global_section(&lab, dataplane);
    config.push_str(&format!(
        "\n[[frontends]]\nname = \"imap\"\nlisten = [\"{frontend}\"]\nbackend = \"mail-imap\"\n\n\
         [[backends]]\nname = \"mail-imap\"\nproxy_protocol = \"v2\"\n\
         [backends.health]\ncheck = \"imap\"\ninterval = \"1s\"\n\n\
         [[backends.servers]]\nname = \"node1\"\naddress = \"{imap}\"\n"
    ));
    let kgate = Kgate::start(&lab, &config);
    thread::sleep(CHECKING);

    let status = kgate.status();
    let server = &status["servers"][0];
    assert_eq!(server["state"], "up", "{status}");
    assert_eq!(server["last_check"], "ok", "{status}");
    assert_eq!(server["consecutive_fail"], 0, "{status}");
    // About one check a second (at least half of them in a row, on a busy machine).
    let passed = server["consecutive_ok"].as_u64().unwrap();
    assert!(
        passed >= 15,
        "{passed} checks passed in {CHECKING:?}: {status}"
    );

    // A real login through kgate, from the client namespace.
    let transcript = lab
        .client()
        .run(move || imap_login(frontend, TIMEOUT))
        .unwrap_or_else(|e| panic!("IMAP login through kgate: {e}"));
    assert!(transcript.contains("a1 OK"), "{transcript}");
    let login = format!(
        "imap-login: Info: Login: user=<{USER}>, method=PLAIN, rip={}, lip={}",
        lab.client().v4(),
        lab.gateway().v4()
    );
    assert!(
        dovecot.wait_for_log(&login, TIMEOUT),
        "{login:?} not in Dovecot's log:\n{}",
        dovecot.log()
    );

    kgate_stops_and_dovecot_settles(kgate);
    let log = dovecot.log_since(mark);
    // Each check: a LOCAL header (Dovecot keeps the gateway's own address), the
    // greeting, LOGOUT, a FIN.
    let checks = log
        .lines()
        .filter(|l| is_check_line(l, gateway_toward_backend.into(), imap.ip()))
        .count();
    println!("{dataplane}: Dovecot logged {checks} checks, and the login as {login:?}");
    assert!(checks as u64 >= passed, "{checks} check lines:\n{log}");
    assert_eq!(trouble(&log), Vec::<String>::new(), "{log}");
}

/// Stops kgate (its last check may be on its way) and gives Dovecot a moment to log
/// the end of that connection.
fn kgate_stops_and_dovecot_settles(mut kgate: Kgate) {
    kgate.stop();
    assert!(
        !kgate.log().contains("server down"),
        "the server never went down:\n{}",
        kgate.log()
    );
    thread::sleep(Duration::from_millis(500));
}
