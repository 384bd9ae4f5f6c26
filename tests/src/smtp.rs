//! A small blocking SMTP client for the lab: whole mail sessions, and the exact byte
//! sequences of kgate's health checks (PROXY v2 LOCAL header, the whole greeting read
//! before anything is said, EHLO, QUIT, a close with FIN after draining), each step
//! visible to the test.
//!
//! Use it from a thread inside a namespace ([`crate::lab::NetNs::run`]).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// The PROXY protocol v2 header with the LOCAL command and no addresses (16 bytes): what
/// kgate's health checks send first.
pub const LOCAL_V2: [u8; 16] = *b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00";

/// The longest reply line read (SMTP allows 512).
const MAX_LINE: u64 = 4096;

/// The most lines one reply may have.
const MAX_REPLY_LINES: usize = 200;

/// A PROXY protocol v2 header (command PROXY, TCP) saying that `source` connected to
/// `destination`; both must be of one family.
pub fn proxy_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (source, destination),
    )
    .build()
    .expect("a v2 header with addresses and no TLVs")
}

/// One whole SMTP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Every line, without line endings.
    pub lines: Vec<String>,
}

impl Reply {
    /// The last line (`250 CHUNKING`, `221 2.0.0 Bye`).
    pub fn last_line(&self) -> &str {
        self.lines.last().map_or("", String::as_str)
    }
}

/// A client connection. Every step is recorded in [`SmtpClient::transcript`]
/// (`C: ` what was sent, `S: ` what was read).
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    transcript: String,
}

impl SmtpClient {
    /// Connects; reads and writes time out after `timeout` each.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<SmtpClient> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(SmtpClient {
            writer: stream.try_clone()?,
            reader: BufReader::new(stream),
            transcript: String::new(),
        })
    }

    /// Writes `bytes` as they are (a PROXY header, say).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.transcript
            .push_str(&format!("C: {:?}\n", String::from_utf8_lossy(bytes)));
        self.writer.write_all(bytes)
    }

    /// Reads one whole reply: `NNN-` lines up to the `NNN ` (or bare `NNN`) line.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        let mut lines = Vec::new();
        let mut code = None;
        while lines.len() < MAX_REPLY_LINES {
            let mut raw = Vec::new();
            let n = self
                .reader
                .by_ref()
                .take(MAX_LINE)
                .read_until(b'\n', &mut raw)?;
            if n == 0 || !raw.ends_with(b"\n") {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the server closed in the middle of a reply; so far:\n{}",
                        self.transcript
                    ),
                ));
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            self.transcript.push_str(&format!("S: {line}\n"));
            let this: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| bad_reply(&line, &self.transcript))?;
            if *code.get_or_insert(this) != this {
                return Err(bad_reply(&line, &self.transcript));
            }
            let last = match line.as_bytes().get(3) {
                None | Some(b' ') => true,
                Some(b'-') => false,
                Some(_) => return Err(bad_reply(&line, &self.transcript)),
            };
            lines.push(line);
            if last {
                return Ok(Reply { code: this, lines });
            }
        }
        Err(bad_reply("(too many lines)", &self.transcript))
    }

    /// Sends `command` and a CRLF, and reads the reply.
    pub fn command(&mut self, command: &str) -> io::Result<Reply> {
        self.transcript.push_str(&format!("C: {command}\n"));
        self.writer.write_all(format!("{command}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// Sends `command`, reads the reply and fails unless its code is `code`.
    pub fn expect(&mut self, command: &str, code: u16) -> io::Result<Reply> {
        let reply = self.command(command)?;
        if reply.code != code {
            return Err(io::Error::other(format!(
                "expected {code} to {command:?}, got {:?}; transcript:\n{}",
                reply.last_line(),
                self.transcript
            )));
        }
        Ok(reply)
    }

    /// Whether the server sent anything not read yet, without waiting.
    pub fn has_unread_data(&mut self) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut byte = [0; 1];
        let _ = self.writer.set_nonblocking(true);
        let peeked = self.writer.peek(&mut byte);
        let _ = self.writer.set_nonblocking(false);
        matches!(peeked, Ok(n) if n > 0)
    }

    /// What was sent and read so far.
    pub fn transcript(&self) -> &str {
        &self.transcript
    }

    /// kgate's close: half-close (FIN), read and discard until the server closes, then
    /// close. Nothing unread is left in the socket, so the kernel sends no reset.
    pub fn close_with_fin(mut self) -> io::Result<()> {
        self.writer.shutdown(Shutdown::Write)?;
        let mut sink = Vec::new();
        self.reader.read_to_end(&mut sink)?;
        Ok(())
    }

    /// HAProxy's close of a health check: `SO_LINGER` 0, so `close` sends a reset.
    pub fn close_with_reset(self) {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
        unsafe {
            libc::setsockopt(
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// A plain `close` (a reset if unread data is left, a FIN otherwise).
    pub fn close(self) {}
}

fn bad_reply(line: &str, transcript: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("not an SMTP reply line: {line:?}; transcript:\n{transcript}"),
    )
}

/// One mail, start to end: optional PROXY header, greeting, EHLO, MAIL, RCPT, DATA,
/// QUIT, close with FIN. Returns the transcript; fails on any unexpected reply.
pub fn send_mail(
    addr: SocketAddr,
    header: Option<&[u8]>,
    helo: &str,
    from: &str,
    to: &str,
    body: &str,
    timeout: Duration,
) -> io::Result<String> {
    let mut client = SmtpClient::connect(addr, timeout)?;
    if let Some(header) = header {
        client.send_raw(header)?;
    }
    let greeting = client.read_reply()?;
    if greeting.code != 220 {
        return Err(io::Error::other(format!(
            "greeting {:?}; transcript:\n{}",
            greeting.last_line(),
            client.transcript()
        )));
    }
    client.expect(&format!("EHLO {helo}"), 250)?;
    client.expect(&format!("MAIL FROM:<{from}>"), 250)?;
    client.expect(&format!("RCPT TO:<{to}>"), 250)?;
    client.expect("DATA", 354)?;
    let mut message = String::new();
    for line in body.lines() {
        // Dot-stuffing (RFC 5321 4.5.2).
        if line.starts_with('.') {
            message.push('.');
        }
        message.push_str(line);
        message.push_str("\r\n");
    }
    message.push('.');
    client.expect(&message, 250)?;
    client.expect("QUIT", 221)?;
    let transcript = client.transcript().to_owned();
    client.close_with_fin()?;
    Ok(transcript)
}

/// The wire behaviour of kgate's `tcp` health check (proxy-user/src/health/check.rs),
/// until kgate itself runs the checks in these tests: LOCAL header, then a close with
/// FIN after draining whatever the server sent.
pub fn health_check_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let mut client = SmtpClient::connect(addr, timeout)?;
    client.send_raw(&LOCAL_V2)?;
    client.close_with_fin()
}

/// The wire behaviour of kgate's `smtp` health check: LOCAL header, the whole greeting
/// (nothing is sent before its last line, however long postscreen pauses), `EHLO`,
/// `QUIT`, close with FIN. Fails on any reply but 220, 250, 221.
pub fn health_check_smtp(addr: SocketAddr, helo: &str, timeout: Duration) -> io::Result<()> {
    let mut client = SmtpClient::connect(addr, timeout)?;
    client.send_raw(&LOCAL_V2)?;
    let greeting = client.read_reply()?;
    if greeting.code != 220 {
        return Err(io::Error::other(format!(
            "greeting {:?}; transcript:\n{}",
            greeting.last_line(),
            client.transcript()
        )));
    }
    client.expect(&format!("EHLO {helo}"), 250)?;
    client.expect("QUIT", 221)?;
    client.close_with_fin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_header_is_the_one_ppp_builds() {
        let built = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(built, LOCAL_V2);
    }

    #[test]
    fn proxy_header_carries_the_addresses() {
        let source: SocketAddr = "10.200.1.2:40001".parse().unwrap();
        let destination: SocketAddr = "10.200.10.2:2525".parse().unwrap();
        let header = proxy_v2(source, destination);
        assert_eq!(&header[12..16], &[0x21, 0x11, 0x00, 12]);
        assert_eq!(&header[16..20], &[10, 200, 1, 2]);
        assert_eq!(&header[24..26], &40001u16.to_be_bytes());
    }
}
