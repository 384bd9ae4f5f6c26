//! Health checks: is a backend's server worth sending clients to?
//!
//! - [`check`]: one check of one server ([`check::run_check`]): `tcp`, `smtp` or
//!   `imap`, and `smtps` or `imaps` (the same inside TLS, [`tls`]), each optionally
//!   opened with a PROXY v2 LOCAL header, everything under one timeout, and a
//!   [`failure::CheckFailure`] that reads well in a log line.
//! - [`state`]: the rise/fall state machine of one server and the interval to the next
//!   check (pure logic, no I/O).
//! - [`monitor`]: a task that checks one server forever, logs its state changes and
//!   publishes a [`monitor::ServerHealthSnapshot`].
//!
//! # What a check does on the wire, and why (measured against Postfix 3.7 postscreen
//! with `postscreen_upstream_proxy_protocol = haproxy`)
//!
//! | client behaviour | postscreen logs |
//! |---|---|
//! | connect, close (FIN or RST), no header | `warning: haproxy read: EOF` |
//! | LOCAL header, close with RST (HAProxy's `check` + `send-proxy-v2`: `SO_LINGER` 0) | `warning: getpeername: Transport endpoint is not connected -- dropping this connection` |
//! | LOCAL header, close with FIN | `CONNECT from [gw]`, `HANGUP after 0 from [gw] in tests before SMTP handshake`, `DISCONNECT [gw]` (info only) |
//! | LOCAL header, wait for the final `220 `, QUIT | first time `PASS NEW` after the greet wait (6 s), then `PASS OLD`; smtpd `connect from`, `disconnect from ... quit=1 commands=1` |
//! | LOCAL, greeting, EHLO, QUIT (the `smtp` check) | as above, smtpd `disconnect from ... ehlo=1 quit=1 commands=2` |
//! | the `tcp` check once postscreen has passed the gateway | `PASS OLD`; smtpd `connect from`, `lost connection after CONNECT`, `disconnect from ... commands=0/0` (info only) |
//! | LOCAL and EHLO before the final `220 ` (talking early) | `PREGREET 12 after 0 from [gw]: EHLO ...` |
//!
//! So every check closes with a FIN and never with a reset: it half-closes its side,
//! then reads (and discards) until the server closes, so no unread byte is left in the
//! socket when it is closed (closing with unread data makes the kernel send a reset).
//! A LOCAL header makes the server use the connection's own addresses, so the checks
//! show up in the server's log as coming from the gateway.
//!
//! (tests/tests/health_postfix.rs measures this table against a real Postfix.) A `tcp`
//! check cannot say QUIT, so against an SMTP port it always leaves an info line about a
//! client that left early; the `smtp` check leaves only a normal session. Use `smtp` for
//! Postfix.
//!
//! postscreen greets a client it does not know with `220-`, waits
//! `postscreen_greet_wait` (6 s by default) for clients that talk too early, then sends
//! the final `220 ` line; a client that passed is remembered for a day
//! (`postscreen_greet_ttl`) and greeted at once. The `smtp` check reads the whole
//! greeting before it says anything, and its timeout must allow for that wait (see
//! [`monitor::HealthSettings::timeout_warning`]).

pub mod check;
mod failure;
pub mod monitor;
pub mod state;
pub mod wiring;

mod session;
#[cfg(test)]
mod test_server;
mod tls;
