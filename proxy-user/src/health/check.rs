//! One health check of one server: what it sends, what it expects, and how it fails.
//!
//! Every check connects, writes a PROXY v2 LOCAL header first when asked to, does its
//! protocol's exchange, and closes with a FIN after draining what the server sent
//! (see the module documentation of [`super`] for why). It never sends a byte before it
//! has read the whole reply it waits for.
//!
//! - `tcp`: connect, header, close. Passes once the header is written.
//! - `smtp`: header, the whole greeting (`220-` lines up to the final `220 `, however
//!   slow: postscreen pauses in the middle), `EHLO <helo_name>` -> 250 (multi-line),
//!   `QUIT` -> 221, close.
//! - `imap`: header, `* OK` greeting (or `* PREAUTH`), `a1 LOGOUT` -> `* BYE` and
//!   `a1 OK`, close.
//! - `smtps`, `imaps`: header, TLS handshake ([`super::tls`]), then the `smtp` or
//!   `imap` dialogue inside TLS, close (`close_notify`, then FIN).

use std::{fmt, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use super::{
    failure::{CheckFailure, Step},
    session::{CLOSE_GRACE, MAX_REPLY_LINES, Session},
    tls::TlsClient,
};
use crate::{config::CheckTls, proxy_header};

/// What to check and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    /// Where to connect (the server's address, or its check address/port).
    pub address: SocketAddr,
    /// Start with a PROXY protocol v2 header with the LOCAL command (the server then
    /// uses the connection's own addresses). For servers that expect a PROXY header.
    pub proxy_local: bool,
    /// For the whole check, connect to close.
    pub timeout: Duration,
    /// The name the `smtp` check gives in `EHLO`.
    pub helo_name: String,
    /// How `smtps` and `imaps` checks do TLS (shared by the servers of a backend); when
    /// `None`, they verify nothing, as by default.
    pub tls: Option<Arc<TlsClient>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp,
    Smtp,
    Imap,
    Smtps,
    Imaps,
}

impl CheckKind {
    /// TLS from the first byte.
    pub fn tls(self) -> bool {
        matches!(self, CheckKind::Smtps | CheckKind::Imaps)
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckKind::Tcp => "tcp",
            CheckKind::Smtp => "smtp",
            CheckKind::Imap => "imap",
            CheckKind::Smtps => "smtps",
            CheckKind::Imaps => "imaps",
        })
    }
}

/// The tag of the IMAP check's LOGOUT command.
const IMAP_TAG: &str = "a1";

/// Runs one check. `Ok(())` means the server is healthy.
pub async fn run_check(spec: &CheckSpec) -> Result<(), CheckFailure> {
    let deadline = Instant::now() + spec.timeout;
    let mut session = Session::connect(spec.address, deadline).await?;
    if spec.proxy_local
        && let Err(failure) = session
            .send(Step::SendingHeader, &proxy_header::local_v2())
            .await
    {
        session.close().await;
        return Err(failure);
    }
    if !spec.kind.tls() {
        return converse(spec, session).await;
    }
    let default;
    let tls = match &spec.tls {
        Some(tls) => tls,
        None => {
            default = Arc::new(TlsClient::new(&CheckTls::default()));
            &default
        }
    };
    match session.start_tls(tls, spec.address).await {
        Ok(session) => converse(spec, session).await,
        Err((failure, plain)) => {
            if let Some(plain) = plain {
                plain.close().await;
            }
            Err(failure)
        }
    }
}

/// The protocol's dialogue, then the close.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    spec: &CheckSpec,
    mut session: Session<S>,
) -> Result<(), CheckFailure> {
    let smtp_kind = matches!(spec.kind, CheckKind::Smtp | CheckKind::Smtps);
    let result = match spec.kind {
        CheckKind::Tcp => Ok(()),
        CheckKind::Smtp | CheckKind::Smtps => smtp(&mut session, &spec.helo_name).await,
        CheckKind::Imap | CheckKind::Imaps => imap(&mut session).await,
    };
    if smtp_kind && matches!(result, Err(CheckFailure::BadReply { .. })) {
        // The server speaks SMTP but said no: say goodbye properly, so its log shows a
        // QUIT and not a lost connection (briefly: the check has failed).
        session.limit_deadline(CLOSE_GRACE);
        if session
            .send(Step::Sending("QUIT"), b"QUIT\r\n")
            .await
            .is_ok()
        {
            let _ = smtp_reply(&mut session, Step::Reply("QUIT"), "221").await;
        }
    }
    session.close().await;
    result
}

async fn smtp<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<S>,
    helo_name: &str,
) -> Result<(), CheckFailure> {
    smtp_reply(session, Step::Greeting, "220").await?;
    session
        .send(
            Step::Sending("EHLO"),
            format!("EHLO {helo_name}\r\n").as_bytes(),
        )
        .await?;
    smtp_reply(session, Step::Reply("EHLO"), "250").await?;
    session.send(Step::Sending("QUIT"), b"QUIT\r\n").await?;
    smtp_reply(session, Step::Reply("QUIT"), "221").await
}

/// Reads a whole SMTP reply (`250-...` lines, then `250 ...` or `250`) and checks its
/// code. Returns only after the last line, so the caller never talks too early.
async fn smtp_reply<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<S>,
    step: Step,
    expected: &'static str,
) -> Result<(), CheckFailure> {
    for _ in 0..MAX_REPLY_LINES {
        let line = session.read_line(step).await?;
        let Some((code, last)) = smtp_line(&line) else {
            return Err(CheckFailure::bad(step, expected, &line));
        };
        if code != expected {
            return Err(CheckFailure::bad(step, expected, &line));
        }
        if last {
            return Ok(());
        }
    }
    Err(CheckFailure::BadReply {
        step,
        expected,
        got: format!("more than {MAX_REPLY_LINES} lines"),
    })
}

/// The code of an SMTP reply line and whether it is the reply's last line
/// (RFC 5321 4.2: `code SP text`, `code` alone, or `code "-" text` before more lines).
fn smtp_line(line: &str) -> Option<(&str, bool)> {
    let code = line.get(..3)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match line.as_bytes().get(3) {
        None | Some(b' ') => Some((code, true)),
        Some(b'-') => Some((code, false)),
        Some(_) => None,
    }
}

async fn imap<S: AsyncRead + AsyncWrite + Unpin>(
    session: &mut Session<S>,
) -> Result<(), CheckFailure> {
    let greeting = session.read_line(Step::Greeting).await?;
    let mut words = greeting.split_ascii_whitespace();
    let ok = words.next() == Some("*")
        && words
            .next()
            .is_some_and(|w| w.eq_ignore_ascii_case("OK") || w.eq_ignore_ascii_case("PREAUTH"));
    if !ok {
        return Err(CheckFailure::bad(Step::Greeting, "* OK", &greeting));
    }
    let step = Step::Reply("LOGOUT");
    session
        .send(
            Step::Sending("LOGOUT"),
            format!("{IMAP_TAG} LOGOUT\r\n").as_bytes(),
        )
        .await?;
    let mut bye = false;
    for _ in 0..MAX_REPLY_LINES {
        let line = session.read_line(step).await?;
        let mut words = line.split_ascii_whitespace();
        let (tag, status) = (words.next(), words.next());
        match tag {
            Some("*") => bye |= status.is_some_and(|s| s.eq_ignore_ascii_case("BYE")),
            Some(IMAP_TAG) if status.is_some_and(|s| s.eq_ignore_ascii_case("OK")) => {
                return if bye {
                    Ok(())
                } else {
                    Err(CheckFailure::bad(step, "* BYE before a1 OK", &line))
                };
            }
            _ => return Err(CheckFailure::bad(step, "* BYE and a1 OK", &line)),
        }
    }
    Err(CheckFailure::BadReply {
        step,
        expected: "a1 OK",
        got: format!("more than {MAX_REPLY_LINES} lines"),
    })
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::health::test_server::{Act, End, LOCAL, LONG, scripted};
    use tokio::net::TcpListener;

    fn spec(kind: CheckKind, address: SocketAddr) -> CheckSpec {
        CheckSpec {
            kind,
            address,
            proxy_local: true,
            timeout: LONG,
            helo_name: "kgate.test".to_owned(),
            tls: None,
        }
    }

    /// A port with nothing listening on it.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    // ---- tcp ----

    #[tokio::test]
    async fn tcp_sends_the_local_header_and_closes_with_a_fin() {
        let (addr, server) = scripted(vec![Act::Expect(LOCAL)]).await;
        assert_eq!(run_check(&spec(CheckKind::Tcp, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn tcp_closes_with_a_fin_even_when_the_server_greets_first() {
        // The greeting is in the client's receive queue when it closes: without the
        // drain, close() would send a reset (postscreen's getpeername warning).
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220-mx.example ESMTP\r\n"),
        ])
        .await;
        assert_eq!(run_check(&spec(CheckKind::Tcp, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn tcp_without_proxy_local_sends_nothing() {
        let (addr, server) = scripted(vec![]).await;
        let spec = CheckSpec {
            proxy_local: false,
            ..spec(CheckKind::Tcp, addr)
        };
        assert_eq!(run_check(&spec).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn tcp_passes_against_a_server_that_never_closes_within_the_grace() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        assert_eq!(run_check(&spec(CheckKind::Tcp, addr)).await, Ok(()));
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[tokio::test]
    async fn refused_is_reported_as_such() {
        let addr = closed_port().await;
        for kind in [CheckKind::Tcp, CheckKind::Smtp, CheckKind::Imap] {
            let failure = run_check(&spec(kind, addr)).await.unwrap_err();
            assert_eq!(failure, CheckFailure::Refused);
            assert_eq!(failure.to_string(), "connection refused");
        }
    }

    // ---- smtp ----

    fn smtp_dialogue(greeting: &'static str) -> Vec<Act> {
        vec![
            Act::Expect(LOCAL),
            Act::Send(greeting),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n"),
            Act::Expect(b"QUIT\r\n"),
            Act::Send("221 2.0.0 Bye\r\n"),
        ]
    }

    #[tokio::test]
    async fn smtp_does_the_whole_dialogue_and_closes_with_a_fin() {
        let (addr, server) = scripted(smtp_dialogue("220 mx.example ESMTP\r\n")).await;
        assert_eq!(run_check(&spec(CheckKind::Smtp, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn smtp_waits_for_the_last_line_of_a_slow_postscreen_greeting() {
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220-mx.example ESMTP\r\n"),
            // postscreen's pregreet test: anything sent now would be a PREGREET.
            Act::Silence(Duration::from_millis(700)),
            Act::Send("220-more\r\n"),
            Act::Silence(Duration::from_millis(300)),
            Act::Send("220 mx.example ESMTP\r\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("250 mx.example\r\n"),
            Act::Expect(b"QUIT\r\n"),
            Act::Send("221 2.0.0 Bye\r\n"),
        ])
        .await;
        assert_eq!(run_check(&spec(CheckKind::Smtp, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn smtp_accepts_bare_codes_and_lf_line_endings() {
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("250-a\n250\r\n"),
            Act::Expect(b"QUIT\r\n"),
            Act::Send("221\r\n"),
        ])
        .await;
        assert_eq!(run_check(&spec(CheckKind::Smtp, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap().1, End::Fin);
    }

    #[tokio::test]
    async fn smtp_times_out_waiting_for_a_greeting_that_never_comes() {
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220-mx.example ESMTP\r\n"),
            Act::Silence(Duration::from_millis(600)),
        ])
        .await;
        let spec = CheckSpec {
            timeout: Duration::from_millis(300),
            ..spec(CheckKind::Smtp, addr)
        };
        let started = Instant::now();
        let failure = run_check(&spec).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(600));
        assert_eq!(failure, CheckFailure::TimedOut(Step::Greeting));
        assert_eq!(failure.to_string(), "timed out waiting for the greeting");
        let (rest, end) = server.await.unwrap();
        assert_eq!((rest, end), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn smtp_times_out_waiting_for_the_ehlo_reply() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220 mx.example ESMTP\r\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Silence(Duration::from_secs(1)),
        ])
        .await;
        let spec = CheckSpec {
            timeout: Duration::from_millis(300),
            ..spec(CheckKind::Smtp, addr)
        };
        let failure = run_check(&spec).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            "timed out waiting for the reply to EHLO"
        );
    }

    #[tokio::test]
    async fn smtp_rejection_of_ehlo_is_a_bad_reply_and_the_check_still_quits() {
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220 mx.example ESMTP\r\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("554 5.7.1 no\r\n"),
            Act::Expect(b"QUIT\r\n"),
            Act::Send("221 2.0.0 Bye\r\n"),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad reply to EHLO: expected 250, got "554 5.7.1 no""#
        );
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn smtp_busy_greeting_is_a_bad_greeting() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220-mx.example ESMTP\r\n"),
            Act::Send("421 4.3.2 All server ports are busy\r\n"),
            Act::Expect(b"QUIT\r\n"),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad greeting: expected 220, got "421 4.3.2 All server ports are busy""#
        );
    }

    #[tokio::test]
    async fn smtp_garbage_is_a_bad_reply_quoted_and_truncated() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("HTTP/1.1 400 Bad Request \"quoted\" "),
            Act::Send(concat!(
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"
            )),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        let CheckFailure::BadReply {
            step,
            expected,
            got,
        } = &failure
        else {
            panic!("{failure:?}");
        };
        assert_eq!((*step, *expected), (Step::Greeting, "220"));
        assert!(got.starts_with("HTTP/1.1 400 Bad Request \"quoted\" xxx"));
        assert!(got.ends_with('…'), "{got}");
        assert!(
            failure.to_string().starts_with(
                r#"bad greeting: expected 220, got "HTTP/1.1 400 Bad Request \"quoted\""#
            ),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn smtp_overlong_lines_are_refused_without_reading_them_whole() {
        let line: &'static str =
            Box::leak(format!("220-{}\r\n", "x".repeat(5000)).into_boxed_str());
        let (addr, _server) = scripted(vec![Act::Expect(LOCAL), Act::Send(line)]).await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert!(
            matches!(
                &failure,
                CheckFailure::BadReply { step: Step::Greeting, expected, got }
                    if expected.contains("2048") && got.ends_with('…')
            ),
            "{failure:?}"
        );
    }

    #[tokio::test]
    async fn smtp_mixed_codes_in_one_reply_are_a_bad_reply() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220 mx.example ESMTP\r\n"),
            Act::Expect(b"EHLO kgate.test\r\n"),
            Act::Send("250-mx.example\r\n251 odd\r\n"),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad reply to EHLO: expected 250, got "251 odd""#
        );
    }

    #[tokio::test]
    async fn smtp_server_hanging_up_is_reported_with_the_step() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("220-mx.example\r\n"),
            Act::Hangup,
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert_eq!(failure, CheckFailure::Closed(Step::Greeting));
        assert_eq!(
            failure.to_string(),
            "connection closed by the server while waiting for the greeting"
        );
    }

    #[tokio::test]
    async fn smtp_bad_quit_reply_fails() {
        let mut script = smtp_dialogue("220 mx.example ESMTP\r\n");
        script.pop();
        script.push(Act::Send("500 what\r\n"));
        script.push(Act::Expect(b"QUIT\r\n"));
        let (addr, _server) = scripted(script).await;
        let failure = run_check(&spec(CheckKind::Smtp, addr)).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad reply to QUIT: expected 221, got "500 what""#
        );
    }

    #[tokio::test]
    async fn smtp_without_proxy_local_starts_with_the_greeting() {
        let mut script = smtp_dialogue("220 mx.example ESMTP\r\n");
        script.remove(0);
        let (addr, server) = scripted(script).await;
        let spec = CheckSpec {
            proxy_local: false,
            ..spec(CheckKind::Smtp, addr)
        };
        assert_eq!(run_check(&spec).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[test]
    fn smtp_lines_are_parsed_per_rfc_5321() {
        assert_eq!(smtp_line("250-PIPELINING"), Some(("250", false)));
        assert_eq!(smtp_line("250 ok"), Some(("250", true)));
        assert_eq!(smtp_line("250"), Some(("250", true)));
        assert_eq!(smtp_line("25"), None);
        assert_eq!(smtp_line("2x0 ok"), None);
        assert_eq!(smtp_line("250_ok"), None);
        assert_eq!(smtp_line("ééé"), None);
    }

    // ---- imap ----

    #[tokio::test]
    async fn imap_greeting_logout_bye_ok() {
        let (addr, server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n"),
            Act::Expect(b"a1 LOGOUT\r\n"),
            Act::Send("* BYE Logging out\r\na1 OK Logout completed.\r\n"),
        ])
        .await;
        assert_eq!(run_check(&spec(CheckKind::Imap, addr)).await, Ok(()));
        assert_eq!(server.await.unwrap(), (Vec::new(), End::Fin));
    }

    #[tokio::test]
    async fn imap_bye_greeting_is_a_bad_greeting() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Send("* BYE too many connections\r\n"),
        ])
        .await;
        let failure = run_check(&spec(CheckKind::Imap, addr)).await.unwrap_err();
        assert_eq!(
            failure.to_string(),
            r#"bad greeting: expected * OK, got "* BYE too many connections""#
        );
    }

    #[tokio::test]
    async fn imap_logout_without_bye_or_with_no_is_a_bad_reply() {
        for (reply, message) in [
            (
                "a1 OK done\r\n",
                r#"bad reply to LOGOUT: expected * BYE before a1 OK, got "a1 OK done""#,
            ),
            (
                "* BYE\r\na1 NO nope\r\n",
                r#"bad reply to LOGOUT: expected * BYE and a1 OK, got "a1 NO nope""#,
            ),
        ] {
            let (addr, _server) = scripted(vec![
                Act::Expect(LOCAL),
                Act::Send("* OK ready\r\n"),
                Act::Expect(b"a1 LOGOUT\r\n"),
                Act::Send(reply),
            ])
            .await;
            let failure = run_check(&spec(CheckKind::Imap, addr)).await.unwrap_err();
            assert_eq!(failure.to_string(), message);
        }
    }

    #[tokio::test]
    async fn imap_times_out_on_a_silent_server() {
        let (addr, _server) = scripted(vec![
            Act::Expect(LOCAL),
            Act::Silence(Duration::from_secs(1)),
        ])
        .await;
        let spec = CheckSpec {
            timeout: Duration::from_millis(200),
            ..spec(CheckKind::Imap, addr)
        };
        assert_eq!(
            run_check(&spec).await,
            Err(CheckFailure::TimedOut(Step::Greeting))
        );
    }

    #[test]
    fn io_failures_name_the_step() {
        let failure = CheckFailure::io(
            Step::Reply("EHLO"),
            &io::Error::from(io::ErrorKind::ConnectionReset),
        );
        assert_eq!(
            failure.to_string(),
            "connection reset while waiting for the reply to EHLO"
        );
        assert_eq!(
            CheckFailure::TimedOut(Step::Connecting).to_string(),
            "timed out connecting"
        );
        assert_eq!(
            CheckFailure::TimedOut(Step::Sending("QUIT")).to_string(),
            "timed out sending QUIT"
        );
    }

    /// Against a real Postfix postscreen with `postscreen_upstream_proxy_protocol =
    /// haproxy`, reachable from where the test runs (tests/src/postfix.rs starts one in
    /// a lab namespace; the tests/tests/health_postfix.rs test checks it end to end).
    #[tokio::test]
    async fn checks_pass_against_a_real_postfix_from_kgate_postfix_addr() {
        let Some(addr) = std::env::var_os("KGATE_POSTFIX_ADDR") else {
            println!(
                "skipping: set KGATE_POSTFIX_ADDR=IP:PORT of a Postfix postscreen that expects \
                 a PROXY header (postscreen_upstream_proxy_protocol = haproxy) to run this"
            );
            return;
        };
        let addr: SocketAddr = addr
            .to_str()
            .and_then(|a| a.parse().ok())
            .expect("KGATE_POSTFIX_ADDR must be IP:PORT");
        let mut log = Vec::new();
        for kind in [CheckKind::Tcp, CheckKind::Smtp, CheckKind::Smtp] {
            let spec = CheckSpec {
                // postscreen's greet wait (6 s) the first time it sees this address.
                timeout: Duration::from_secs(10),
                ..spec(kind, addr)
            };
            let started = Instant::now();
            let result = run_check(&spec).await;
            log.push(format!("{kind}: {result:?} in {:?}", started.elapsed()));
            assert_eq!(result, Ok(()), "{kind} check against {addr}");
        }
        println!("{}", log.join("\n"));
    }
}
