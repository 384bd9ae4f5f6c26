//! One check's connection: connect, start TLS if asked, write, read bounded lines,
//! close politely, all before one deadline. Every error is turned into a
//! [`CheckFailure`] naming the step.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tokio_rustls::client::TlsStream;

use super::{
    failure::{CheckFailure, Step, quote},
    tls::{self, Recording, TlsClient},
};

/// The longest line a check reads. SMTP reply lines are at most 512 bytes (RFC 5321
/// 4.5.3.1.5); an IMAP greeting with its capabilities is a few hundred.
pub const MAX_LINE: usize = 2048;

/// The most lines one reply may have (an EHLO reply has a dozen or two).
pub const MAX_REPLY_LINES: usize = 100;

/// How long a check waits for the server to close after the check closed its side.
/// The check has passed or failed by then; this only keeps the close clean (FIN, not
/// RST) for servers that take a moment to hang up.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How much a polite close reads and discards before it gives up waiting.
const MAX_DRAIN: usize = 64 * 1024;

/// A check's connection over `S`: TCP, or TLS over TCP ([`TlsSession`]).
pub struct Session<S = TcpStream> {
    stream: BufReader<S>,
    deadline: Instant,
    line: Vec<u8>,
}

pub type TlsSession = Session<TlsStream<Recording>>;

impl Session<TcpStream> {
    /// Connects to `address` before `deadline`.
    pub async fn connect(address: SocketAddr, deadline: Instant) -> Result<Session, CheckFailure> {
        let step = Step::Connecting;
        let stream = match timeout_at(deadline, TcpStream::connect(address)).await {
            Err(_) => return Err(CheckFailure::TimedOut(step)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(CheckFailure::Refused);
            }
            Ok(Err(e)) => return Err(CheckFailure::io(step, &e)),
            Ok(Ok(stream)) => stream,
        };
        // Each write is one whole command: send it now.
        let _ = stream.set_nodelay(true);
        Ok(Session {
            stream: BufReader::new(stream),
            deadline,
            line: Vec::with_capacity(256),
        })
    }

    /// Does the TLS handshake (the check's first read, so nothing is buffered yet). On
    /// failure, gives the plain session back for a polite close, unless the deadline
    /// passed in the middle of the handshake.
    pub async fn start_tls(
        self,
        client: &TlsClient,
        address: SocketAddr,
    ) -> Result<TlsSession, (CheckFailure, Option<Session>)> {
        let connector = match client.connector() {
            Ok(connector) => connector,
            Err(failure) => return Err((failure, Some(self))),
        };
        let Session {
            stream,
            deadline,
            line,
        } = self;
        debug_assert!(stream.buffer().is_empty());
        let handshake = connector
            .connect(
                client.server_name(address.ip()),
                Recording::new(stream.into_inner()),
            )
            .into_fallible();
        match timeout_at(deadline, handshake).await {
            Err(_) => Err((CheckFailure::TimedOut(Step::TlsHandshake), None)),
            Ok(Ok(stream)) => Ok(Session {
                stream: BufReader::new(stream),
                deadline,
                line,
            }),
            Ok(Err((error, recording))) => {
                let failure = tls::handshake_failure(&error, recording.first_bytes());
                let plain = Session {
                    stream: BufReader::new(recording.into_inner()),
                    deadline,
                    line,
                };
                Err((failure, Some(plain)))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Brings the deadline forward to at most `grace` from now (for goodbyes after
    /// the check has already failed).
    pub fn limit_deadline(&mut self, grace: Duration) {
        self.deadline = self.deadline.min(Instant::now() + grace);
    }

    /// Writes all of `bytes`, and sends them (TLS holds them until flushed).
    pub async fn send(&mut self, step: Step, bytes: &[u8]) -> Result<(), CheckFailure> {
        let stream = self.stream.get_mut();
        let write = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match timeout_at(self.deadline, write).await {
            Err(_) => Err(CheckFailure::TimedOut(step)),
            Ok(Err(e)) => Err(CheckFailure::io(step, &e)),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Reads one line of at most [`MAX_LINE`] bytes and returns it without its line
    /// ending (CRLF, or a bare LF). Not UTF-8 is replaced, not refused: the caller
    /// decides whether the line is what it expected.
    pub async fn read_line(&mut self, step: Step) -> Result<String, CheckFailure> {
        self.line.clear();
        let limit = (MAX_LINE + 1) as u64;
        let mut limited = (&mut self.stream).take(limit);
        match timeout_at(self.deadline, limited.read_until(b'\n', &mut self.line)).await {
            Err(_) => return Err(CheckFailure::TimedOut(step)),
            Ok(Err(e)) => return Err(CheckFailure::io(step, &e)),
            Ok(Ok(_)) => {}
        }
        if !self.line.ends_with(b"\n") {
            if self.line.len() > MAX_LINE {
                return Err(CheckFailure::BadReply {
                    step,
                    expected: "a line of at most 2048 bytes",
                    got: quote(&self.line),
                });
            }
            // End of stream, at a line start or inside a line.
            return Err(CheckFailure::Closed(step));
        }
        let mut end = self.line.len() - 1;
        if end > 0 && self.line[end - 1] == b'\r' {
            end -= 1;
        }
        Ok(String::from_utf8_lossy(&self.line[..end]).into_owned())
    }

    /// Ends the connection cleanly, never failing: half-closes (FIN; over TLS a
    /// `close_notify` alert first), then reads and discards until the server closes too, for at most [`CLOSE_GRACE`] and not past
    /// the deadline. Closing a socket with unread bytes makes the kernel send a reset,
    /// which servers log (postscreen: `getpeername: Transport endpoint is not
    /// connected`); draining first avoids it.
    pub async fn close(mut self) {
        let deadline = self.deadline.min(Instant::now() + CLOSE_GRACE);
        let drain = async {
            self.stream.get_mut().shutdown().await?;
            let mut buf = [0u8; 4096];
            let mut drained = 0;
            while drained < MAX_DRAIN {
                let n = self.stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                drained += n;
            }
            io::Result::Ok(())
        };
        // The server's own close ends it; anything else (a timeout, a reset) changes
        // nothing about the check's result.
        let _ = timeout_at(deadline, drain).await;
    }
}
