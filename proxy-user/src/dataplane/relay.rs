//! The life of a connection after the header: both directions flow until each side
//! has sent its FIN and that FIN has been passed on, or until one side resets.
//!
//! A spliced direction is invisible to userspace while bytes flow: `recv` on its
//! socket says EAGAIN, epoll wakes it only for the FIN (EOF) or a reset (error). At
//! the FIN, the bytes before it may still sit in the kernel's redirect backlog, so
//! the FIN is passed on (`shutdown(SHUT_WR)` on the target) only once the target's
//! send queue has taken as many bytes as the source received: TCP_INFO's
//! `bytes_received` on the source against `bytes_acked` + SIOCOUTQ on the target.
//! Passing it on any earlier cuts off the tail of the data.
//!
//! A copied direction reads into its own buffer and writes from it in userspace; it
//! reads again only once the buffer is written out, so a slow reader holds back its
//! own direction (TCP flow control does the rest) and never the other one. It passes
//! the FIN on as soon as it has written the last byte.

use std::{fmt, io, net::Shutdown, os::fd::AsFd, time::Duration};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

use super::{Mode, Path, sockmap::kick};
use crate::sockopt;

/// Bytes a copied direction holds at most: what it read and could not write yet.
const COPY_BUFFER: usize = 64 * 1024;
/// Reads a copied direction makes before letting the other direction run.
const COPY_BURST: usize = 16;
/// How often a finished spliced direction checks whether its backlog has drained:
/// from the first value, doubling up to the second.
const DRAIN_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// TCP_INFO's `bytes_received` counts the FIN as a byte.
const FIN_SEQUENCE: u64 = 1;

/// What a connection moved and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub from_client: u64,
    pub from_server: u64,
    pub end: End,
    pub path: Path,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent its FIN first; both sides then closed.
    ClientClosed,
    /// The server sent its FIN first; both sides then closed.
    ServerClosed,
    ClientReset,
    ServerReset,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::ClientClosed => "client closed",
            End::ServerClosed => "server closed",
            End::ClientReset => "client reset",
            End::ServerReset => "server reset",
        })
    }
}

/// A failure on one socket of a direction.
enum Fault {
    /// On the socket the direction reads from.
    Source(io::Error),
    /// On the socket it writes to.
    Target(io::Error),
}

/// One direction of a connection.
struct Flow<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    mode: Mode,
    /// `from` has sent its FIN.
    eof: bool,
    /// The FIN has been passed on to `to`.
    done: bool,
    /// Bytes kgate copied (copied mode only).
    copied: u64,
    /// Copied mode: bytes read from `from`, and the part of them not yet written.
    buf: Vec<u8>,
    pending: std::ops::Range<usize>,
    /// Bytes `from` received before its FIN (spliced mode, once `eof`).
    received: u64,
}

impl<'a> Flow<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, mode: Mode) -> Self {
        Flow {
            from,
            to,
            mode,
            eof: false,
            done: false,
            copied: 0,
            buf: match mode {
                Mode::Copied => vec![0; COPY_BUFFER],
                Mode::Spliced { .. } => Vec::new(),
            },
            pending: 0..0,
            received: 0,
        }
    }

    /// Whether to wait for `from` to be readable: before its FIN, and (copied) only
    /// with nothing left to write.
    fn wants_to_read(&self) -> bool {
        !self.eof && self.pending.is_empty()
    }

    /// Whether to wait for `to` to be writable: copied bytes are waiting.
    fn wants_to_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// `from` is readable: data to copy, its FIN, or an error.
    async fn on_readable(&mut self) -> Result<(), Fault> {
        match self.mode {
            Mode::Copied => self.copy(),
            Mode::Spliced { .. } => self.check_spliced_source().await,
        }
    }

    fn copy(&mut self) -> Result<(), Fault> {
        for _ in 0..COPY_BURST {
            match self.from.try_read(&mut self.buf) {
                Ok(0) => {
                    self.eof = true;
                    return self.pass_fin_on();
                }
                Ok(n) => {
                    self.pending = 0..n;
                    self.flush()?;
                    if self.wants_to_write() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Fault::Source(e)),
            }
        }
        Ok(())
    }

    /// Writes what `to` takes of the pending bytes; after the FIN, passes it on once
    /// they are all written.
    fn flush(&mut self) -> Result<(), Fault> {
        while !self.pending.is_empty() {
            match self.to.try_write(&self.buf[self.pending.clone()]) {
                Ok(n) => {
                    self.pending.start += n;
                    self.copied += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Fault::Target(e)),
            }
        }
        if self.eof && !self.done {
            self.pass_fin_on()?;
        }
        Ok(())
    }

    async fn check_spliced_source(&mut self) -> Result<(), Fault> {
        let from = self.from;
        let peeked = from.try_io(Interest::READABLE, || {
            let mut byte = [std::mem::MaybeUninit::uninit()];
            SockRef::from(from).peek(&mut byte)
        });
        match peeked {
            Ok(0) => {
                self.eof = true;
                self.received = sockopt::tcp_counters(from.as_fd())
                    .map_err(Fault::Source)?
                    .bytes_received
                    .saturating_sub(FIN_SEQUENCE);
                self.try_finish()
            }
            Ok(_) => {
                // Bytes the verdict program has not taken: run it again rather than
                // read them, which would reorder them against the spliced ones.
                kick(from);
                tokio::time::sleep(DRAIN_POLL.0).await;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Fault::Source(e)),
        }
    }

    /// After a spliced `from`'s FIN: passes it on once every byte before it is in
    /// `to`'s send queue.
    fn try_finish(&mut self) -> Result<(), Fault> {
        let Mode::Spliced { written_base } = self.mode else {
            return Ok(());
        };
        if !self.waiting_for_drain() {
            return Ok(());
        }
        if let Some(e) = self.to.take_error().map_err(Fault::Target)? {
            return Err(Fault::Target(e));
        }
        let written = sockopt::bytes_written(self.to.as_fd()).map_err(Fault::Target)?;
        if written.saturating_sub(written_base) >= self.received {
            self.pass_fin_on()?;
        }
        Ok(())
    }

    fn pass_fin_on(&mut self) -> Result<(), Fault> {
        match SockRef::from(self.to).shutdown(Shutdown::Write) {
            Ok(()) => {
                self.done = true;
                Ok(())
            }
            // The target already closed its receiving side: nothing to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.done = true;
                Ok(())
            }
            Err(e) => Err(Fault::Target(e)),
        }
    }

    /// A spliced direction past its FIN whose backlog is still draining.
    fn waiting_for_drain(&self) -> bool {
        matches!(self.mode, Mode::Spliced { .. }) && self.eof && !self.done
    }

    /// Bytes that came from `from`, whatever happened to them afterwards.
    fn bytes(&self) -> u64 {
        match self.mode {
            Mode::Copied => self.copied,
            Mode::Spliced { .. } if self.eof => self.received,
            Mode::Spliced { .. } => {
                sockopt::tcp_counters(self.from.as_fd()).map_or(0, |c| c.bytes_received)
            }
        }
    }
}

/// Relays until the connection is over. `modes` are for (client -> server,
/// server -> client).
pub async fn run(client: &TcpStream, server: &TcpStream, modes: [Mode; 2]) -> Transfer {
    let mut up = Flow::new(client, server, modes[0]);
    let mut down = Flow::new(server, client, modes[1]);
    let mut first_fin = None;
    let mut drain_poll = DRAIN_POLL.0;

    let fault = loop {
        if up.done && down.done {
            break None;
        }
        if first_fin.is_none() {
            first_fin = match (up.eof, down.eof) {
                (true, _) => Some(End::ClientClosed),
                (_, true) => Some(End::ServerClosed),
                _ => None,
            };
        }
        let draining = up.waiting_for_drain() || down.waiting_for_drain();
        if !draining {
            drain_poll = DRAIN_POLL.0;
        }
        let result = tokio::select! {
            r = client.readable(), if up.wants_to_read() => match r {
                Ok(()) => up.on_readable().await.map_err(|f| (f, Side::Client)),
                Err(e) => Err((Fault::Source(e), Side::Client)),
            },
            r = server.readable(), if down.wants_to_read() => match r {
                Ok(()) => down.on_readable().await.map_err(|f| (f, Side::Server)),
                Err(e) => Err((Fault::Source(e), Side::Server)),
            },
            r = server.writable(), if up.wants_to_write() => match r {
                Ok(()) => up.flush().map_err(|f| (f, Side::Client)),
                Err(e) => Err((Fault::Target(e), Side::Client)),
            },
            r = client.writable(), if down.wants_to_write() => match r {
                Ok(()) => down.flush().map_err(|f| (f, Side::Server)),
                Err(e) => Err((Fault::Target(e), Side::Server)),
            },
            // A socket past its FIN is no longer read; a reset still shows as an error.
            r = client.ready(Interest::ERROR), if up.eof => socket_error(client, r, Side::Client),
            r = server.ready(Interest::ERROR), if down.eof => socket_error(server, r, Side::Server),
            _ = tokio::time::sleep(drain_poll), if draining => {
                drain_poll = (drain_poll * 2).min(DRAIN_POLL.1);
                up.try_finish()
                    .map_err(|f| (f, Side::Client))
                    .and_then(|()| down.try_finish().map_err(|f| (f, Side::Server)))
            },
        };
        if let Err(fault) = result {
            break Some(fault);
        }
    };

    let (from_client, from_server) = (up.bytes(), down.bytes());
    let end = match fault {
        None => first_fin.unwrap_or(End::ClientClosed),
        Some((fault, flow_source)) => {
            // The side that failed; the other one is reset so it learns at once.
            let (failed, error) = match fault {
                Fault::Source(e) => (flow_source, e),
                Fault::Target(e) => (flow_source.other(), e),
            };
            debug!("{failed} side failed: {error}");
            let survivor = match failed {
                Side::Client => server,
                Side::Server => client,
            };
            let _ = SockRef::from(survivor).set_linger(Some(Duration::ZERO));
            match failed {
                Side::Client => End::ClientReset,
                Side::Server => End::ServerReset,
            }
        }
    };
    Transfer {
        from_client,
        from_server,
        end,
        path: Path::of(modes),
    }
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Server,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

fn socket_error(
    socket: &TcpStream,
    ready: io::Result<tokio::io::Ready>,
    side: Side,
) -> Result<(), (Fault, Side)> {
    let error = match ready {
        Err(e) => e,
        Ok(_) => match socket.take_error() {
            Ok(Some(e)) | Err(e) => e,
            Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
        },
    };
    Err((Fault::Source(error), side))
}
