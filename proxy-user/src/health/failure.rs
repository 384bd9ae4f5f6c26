//! How a check fails: the step it was at and what went wrong, worded for the log
//! line of a state change, with the server's reply quoted.

use std::{fmt, io};

/// How many characters of a reply a failure quotes.
const QUOTE_CHARS: usize = 100;

/// Where in a check something went wrong. Displays as what the check was doing:
/// "connecting", "waiting for the reply to EHLO".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Connecting,
    SendingHeader,
    TlsHandshake,
    Greeting,
    /// Writing a command (`"EHLO"`, `"QUIT"`, `"LOGOUT"`).
    Sending(&'static str),
    /// Reading the reply to a command.
    Reply(&'static str),
}

impl Step {
    /// What a reply read in this step is called: "greeting", "reply to EHLO".
    fn reply_name(self) -> String {
        match self {
            Step::Greeting => "greeting".to_owned(),
            Step::Reply(command) => format!("reply to {command}"),
            // Replies are only read in the two steps above; name the others plainly.
            other => format!("reply while {other}"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Connecting => f.write_str("connecting"),
            Step::SendingHeader => f.write_str("sending the PROXY header"),
            Step::TlsHandshake => f.write_str("doing the TLS handshake"),
            Step::Greeting => f.write_str("waiting for the greeting"),
            Step::Sending(command) => write!(f, "sending {command}"),
            Step::Reply(command) => write!(f, "waiting for the reply to {command}"),
        }
    }
}

/// Why a check failed, worded for the log line of a state change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    #[error("connection refused")]
    Refused,
    /// The check's timeout passed during this step.
    #[error("timed out {0}")]
    TimedOut(Step),
    /// The server closed the connection where the check expected more.
    #[error("connection closed by the server while {0}")]
    Closed(Step),
    /// The server answered, but not as expected. `got` is the reply line, truncated.
    #[error("bad {}: expected {expected}, got {got:?}", step.reply_name())]
    BadReply {
        step: Step,
        expected: &'static str,
        got: String,
    },
    /// The TLS handshake failed: not TLS, a certificate refused, an alert.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// Any other socket error (reset, unreachable, ...).
    #[error("{error} while {step}")]
    Io { step: Step, error: String },
}

impl CheckFailure {
    pub(super) fn io(step: Step, error: &io::Error) -> CheckFailure {
        CheckFailure::Io {
            step,
            error: error.to_string(),
        }
    }

    pub(super) fn bad(step: Step, expected: &'static str, line: &str) -> CheckFailure {
        CheckFailure::BadReply {
            step,
            expected,
            got: quote(line.as_bytes()),
        }
    }
}

/// A reply line as a failure quotes it: lossy UTF-8, line ending trimmed, at most
/// [`QUOTE_CHARS`] characters (then `…`).
pub fn quote(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let mut chars = text.chars();
    let mut quoted: String = chars.by_ref().take(QUOTE_CHARS).collect();
    if chars.next().is_some() {
        quoted.push('…');
    }
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_trimmed_and_truncated() {
        assert_eq!(quote(b"554 5.7.1 no\r\n"), "554 5.7.1 no");
        assert_eq!(quote(b"\xff 220"), "\u{fffd} 220");
        let long = "x".repeat(150);
        let quoted = quote(long.as_bytes());
        assert_eq!(quoted.chars().count(), QUOTE_CHARS + 1);
        assert!(quoted.ends_with('…'));
        assert_eq!(quote(&[b'y'; QUOTE_CHARS]), "y".repeat(QUOTE_CHARS));
    }
}
