//! The life of a connection after the header: both directions flow until each side
//! has sent its FIN and that FIN has been passed on, until one side resets, or until
//! the connection has been idle too long.
//!
//! A spliced direction is invisible to userspace while bytes flow: `recv` on its
//! socket says EAGAIN, epoll wakes it only for the FIN (EOF), a reset (error), or
//! bytes the verdict program passed instead of redirecting. At the FIN, the bytes
//! before it may still sit in the kernel's redirect backlog, so the FIN is passed on
//! (`shutdown(SHUT_WR)` on the target) only once the target's send queue has taken
//! as many bytes as the source received: TCP_INFO's `bytes_received` on the source
//! against `bytes_acked` + SIOCOUTQ on the target. Passing it on any earlier cuts off
//! the tail of the data.
//!
//! Backpressure of a spliced direction (the grant handshake, see `FlowGrant`):
//! 1. `Splicing`: the program redirects until the direction's grant is used up, then
//!    passes skbs to the source's own queue; TCP flow control now holds the sender.
//! 2. `Draining`: the passed bytes must not overtake redirected ones, so kgate waits
//!    until every redirected byte is in the target's send queue.
//! 3. `Forwarding`: kgate reads the passed bytes and writes them to the target, as a
//!    copied direction does, at the pace the target takes them.
//! 4. Once kgate has read every byte the program passed (its count equals the
//!    program's `passed`), it grants a new bound with `resume_at_passed` = that count:
//!    the program redirects again, and a byte passed meanwhile keeps it passing.
//!
//! A peer that keeps up never gets there: halfway through each grant the program asks
//! for more, and kgate extends the bound to `queue_limit` bytes beyond those still
//! queued for the target (`Splice::extend`).
//!
//! On the sockmap plane a connection starts copied, and is spliced once it has lived
//! `splice_after` or copied [`SPLICE_AFTER_BYTES`], at a moment when kgate has written
//! out everything it read: the splice carries on from exactly there (sockmap.rs), and
//! each direction's counts start again from zero (`FlowState::spliced_from_here`).
//!
//! A copied direction reads into its own buffer and writes from it in userspace; it
//! reads again only once the buffer is written out, so a slow reader holds back its
//! own direction (TCP flow control does the rest) and never the other one. It passes
//! the FIN on as soon as it has written the last byte.

use std::{fmt, io, net::Shutdown, os::fd::AsFd, sync::Arc, time::Duration};

use proxy_common::FlowCounters;
use socket2::SockRef;
use tokio::{
    io::{Interest, Ready},
    net::TcpStream,
    time::{Instant, sleep_until},
};
use tracing::{debug, warn};

use super::{
    Mode, Path, SPLICE_AFTER_BYTES, SpliceTerms, Timeouts,
    parking::PARK_AFTER,
    sockmap::{Sockmap, Splice, kick},
};
use crate::{conn::Ending, maps::MapError, sockopt};

/// Bytes a copying direction holds at most: what it read and could not write yet.
/// Measured side by side (`cargo xtask bench`, 2 GiB each way): 256 KiB moved 8
/// streams at 15.7 Gbit/s where 64 KiB moved 13.6, at 13 % less CPU per GiB; 1 MiB
/// did no better.
const COPY_BUFFER: usize = 256 * 1024;
/// Reads a copying direction makes before letting the other direction run.
const COPY_BURST: usize = 16;
/// How often a spliced direction checks whether its redirect backlog has drained:
/// from the first value, doubling up to the second.
const DRAIN_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// TCP_INFO's `bytes_received` counts the FIN as a byte.
const FIN_SEQUENCE: u64 = 1;

/// What a connection moved and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub from_client: u64,
    pub from_server: u64,
    /// Of those, the bytes kgate moved itself rather than the kernel.
    pub copied_from_client: u64,
    pub copied_from_server: u64,
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
    /// Nothing moved for `idle_timeout`; both sides were reset.
    IdleTimeout,
    /// Half-closed and nothing moved for `half_closed_timeout`; both sides were reset.
    HalfClosedTimeout,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::ClientClosed => "client closed",
            End::ServerClosed => "server closed",
            End::ClientReset => "client reset",
            End::ServerReset => "server reset",
            End::IdleTimeout => "idle timeout",
            End::HalfClosedTimeout => "half-closed timeout",
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

/// Where a spliced direction is in the grant handshake (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pressure {
    Splicing,
    /// Bytes the program has not seen yet sit in the socket: the verdict was run
    /// again over them; look once more at the next drain poll.
    Kicked,
    Draining,
    Forwarding,
}

/// Where one direction of a connection is: all of it but the sockets and the copy
/// buffer, so it can wait while the connection is parked.
#[derive(Clone, Copy, Debug)]
pub struct FlowState {
    mode: Mode,
    pressure: Pressure,
    /// `from` has sent its FIN.
    eof: bool,
    /// The FIN has been passed on to `to`.
    done: bool,
    /// Bytes kgate read from `from`.
    consumed: u64,
    /// Bytes kgate wrote to `to`.
    copied: u64,
    /// Bytes `from` received before its FIN (spliced mode, once `eof`), since the
    /// splice began.
    received: u64,
    /// Bytes kgate copied before the direction was spliced.
    before_splice: u64,
}

impl FlowState {
    fn new(mode: Mode) -> Self {
        FlowState {
            mode,
            pressure: Pressure::Splicing,
            eof: false,
            done: false,
            consumed: 0,
            copied: 0,
            received: 0,
            before_splice: 0,
        }
    }

    /// The direction, copied so far with nothing pending, is spliced from now on: its
    /// counts start again, as the program's and the target's do.
    fn spliced_from_here(&mut self, mode: Mode) {
        *self = FlowState {
            before_splice: self.copied,
            ..FlowState::new(mode)
        };
    }
}

/// One direction of a connection.
struct Flow<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    state: FlowState,
    /// Bytes read and not written yet: `buf[pending]`. Empty (no allocation) while the
    /// direction waits for bytes.
    buf: Vec<u8>,
    pending: std::ops::Range<usize>,
}

impl<'a> Flow<'a> {
    fn new(from: &'a TcpStream, to: &'a TcpStream, state: FlowState) -> Self {
        Flow {
            from,
            to,
            state,
            buf: Vec::new(),
            pending: 0..0,
        }
    }

    /// Whether the direction may be spliced now: copied so far, all of it written out,
    /// and no FIN yet (a socket past its FIN cannot join a sock hash).
    fn may_join(&self) -> bool {
        self.state.mode == Mode::Copied && !self.state.eof && self.pending.is_empty()
    }

    /// Whether the direction only waits while the kernel moves its bytes: nothing for
    /// kgate to read, write, drain or pass on.
    fn parkable(&self) -> bool {
        matches!(self.state.mode, Mode::Spliced { .. })
            && self.state.pressure == Pressure::Splicing
            && !self.state.eof
            && self.pending.is_empty()
    }

    /// Whether kgate itself moves this direction's bytes right now.
    fn copying(&self) -> bool {
        matches!(self.state.mode, Mode::Copied) || self.state.pressure == Pressure::Forwarding
    }

    /// Whether to wait for `from` to be readable.
    fn wants_to_read(&self) -> bool {
        !self.state.eof
            && self.pending.is_empty()
            && !matches!(self.state.pressure, Pressure::Draining | Pressure::Kicked)
    }

    /// Whether to wait for `to` to be writable: copied bytes are waiting.
    fn wants_to_write(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether the drain timer must run for this direction.
    fn wants_drain_poll(&self) -> bool {
        matches!(self.state.pressure, Pressure::Draining | Pressure::Kicked)
            || self.waiting_for_fin_drain()
    }

    /// `from` is readable: data to copy, its FIN, or an error.
    fn on_readable(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        if self.copying() {
            self.copy(splice)?;
            self.try_resume_splicing(splice)
        } else {
            self.check_spliced_source(splice)
        }
    }

    fn copy(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        let copied = self.copy_burst(splice);
        if self.pending.is_empty() {
            // A direction that waits for bytes holds no buffer: one for each would
            // dwarf all else a held connection costs.
            self.buf = Vec::new();
        }
        copied
    }

    fn copy_burst(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        for _ in 0..COPY_BURST {
            // Read into spare capacity: no page is touched before bytes land in it.
            self.buf.clear();
            self.buf.reserve_exact(COPY_BUFFER);
            match self.from.try_read_buf(&mut self.buf) {
                Ok(0) if self.passed_bytes_to_come(splice)? => {
                    // The FIN is in, but bytes the program passed before it still wait
                    // in the kernel's backlog: poll for them.
                    self.state.pressure = Pressure::Draining;
                    return Ok(());
                }
                Ok(0) => {
                    self.state.eof = true;
                    return self.on_copied_eof();
                }
                Ok(n) => {
                    self.state.consumed += n as u64;
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

    /// Writes what `to` takes of the pending bytes.
    fn flush(&mut self) -> Result<(), Fault> {
        while !self.pending.is_empty() {
            match self.to.try_write(&self.buf[self.pending.clone()]) {
                Ok(n) => {
                    self.pending.start += n;
                    self.state.copied += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Fault::Target(e)),
            }
        }
        if self.state.eof && !self.state.done {
            self.on_copied_eof()?;
        }
        Ok(())
    }

    /// After `to` took more bytes: flush, and maybe hand the direction back.
    fn on_writable(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        self.flush()?;
        self.try_resume_splicing(splice)
    }

    fn on_copied_eof(&mut self) -> Result<(), Fault> {
        if !self.pending.is_empty() {
            return Ok(());
        }
        match self.state.mode {
            Mode::Copied => self.pass_fin_on(),
            // Spliced bytes may still be on their way: wait for the counters.
            Mode::Spliced { .. } => {
                self.note_received()?;
                self.try_finish()
            }
        }
    }

    fn check_spliced_source(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        let from = self.from;
        let peeked = from.try_io(Interest::READABLE, || {
            let mut byte = [std::mem::MaybeUninit::uninit()];
            SockRef::from(from).peek(&mut byte)
        });
        match peeked {
            // Nothing readable and the FIN in; but passed bytes may still be on their
            // way from the kernel's backlog to the socket's queue: then not yet EOF.
            Ok(0) if self.passed_bytes_to_come(splice)? => {
                self.state.pressure = Pressure::Draining;
                self.check_drained(splice)
            }
            Ok(0) => {
                self.state.eof = true;
                self.note_received()?;
                self.try_finish()
            }
            // Bytes the program passed: the direction is over its bound.
            Ok(_) if self.passed_bytes_to_come(splice)? => {
                self.state.pressure = Pressure::Draining;
                self.check_drained(splice)
            }
            // Bytes the program has not seen (they came in while the socket was being
            // read): reading them would put them ahead of bytes already redirected, so
            // run the verdict over them instead.
            Ok(_) => {
                kick(from);
                self.state.pressure = Pressure::Kicked;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Fault::Source(e)),
        }
    }

    /// For a spliced direction: its source socket's cookie, and what the program has
    /// done with the socket's bytes so far.
    fn program_counters(
        &self,
        splice: Option<&Splice>,
    ) -> Result<Option<(u64, FlowCounters)>, Fault> {
        let (Mode::Spliced { cookie, .. }, Some(splice)) = (self.state.mode, splice) else {
            return Ok(None);
        };
        let counters = splice.counters(cookie).map_err(map_fault)?;
        Ok(Some((cookie, counters)))
    }

    /// The splice, cookie and counters of a spliced direction once kgate has read
    /// every byte the program passed: only then may the program redirect again, as no
    /// redirected byte can overtake a passed one.
    fn caught_up<'s>(
        &self,
        splice: Option<&'s Splice>,
    ) -> Result<Option<(&'s Splice, u64, FlowCounters)>, Fault> {
        let (Some(splice), Some((cookie, counters))) = (splice, self.program_counters(splice)?)
        else {
            return Ok(None);
        };
        Ok((counters.passed == self.state.consumed).then_some((splice, cookie, counters)))
    }

    /// Whether the program passed bytes that kgate has not read yet.
    fn passed_bytes_to_come(&self, splice: Option<&Splice>) -> Result<bool, Fault> {
        Ok(self
            .program_counters(splice)?
            .is_some_and(|(_, counters)| counters.passed > self.state.consumed))
    }

    fn note_received(&mut self) -> Result<(), Fault> {
        self.state.received = sockopt::tcp_counters(self.from.as_fd())
            .map_err(Fault::Source)?
            .bytes_received
            .saturating_sub(FIN_SEQUENCE + self.state.before_splice);
        Ok(())
    }

    /// Bytes that reached `to`'s send queue since the splice began, from kgate and
    /// from the kernel together.
    fn written_to_target(&self) -> Result<u64, Fault> {
        let Mode::Spliced { written_base, .. } = self.state.mode else {
            return Ok(self.state.copied);
        };
        let written = sockopt::bytes_written(self.to.as_fd()).map_err(Fault::Target)?;
        Ok(written.saturating_sub(written_base))
    }

    /// Draining: moves on to forwarding once every redirected byte is in `to`.
    fn check_drained(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        let Some((_, counters)) = self.program_counters(splice)? else {
            return Ok(());
        };
        if self.written_to_target()? >= counters.redirected + self.state.copied {
            self.state.pressure = Pressure::Forwarding;
        }
        Ok(())
    }

    /// The program asked for a larger grant: give one as large as the target's progress
    /// allows, while nothing passed waits to be read (those must go first).
    fn on_grant_request(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        if self.state.pressure != Pressure::Splicing || self.state.eof {
            return Ok(());
        }
        let Some((splice, cookie, counters)) = self.caught_up(splice)? else {
            return Ok(());
        };
        let queued =
            (counters.redirected + self.state.copied).saturating_sub(self.written_to_target()?);
        splice.extend(cookie, counters, queued).map_err(map_fault)
    }

    /// Forwarding: once every passed byte has been read and written, the kernel may
    /// redirect again.
    fn try_resume_splicing(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        if self.state.pressure != Pressure::Forwarding || self.state.eof || !self.pending.is_empty()
        {
            return Ok(());
        }
        // Passed bytes the program counted but kgate has not read yet are still on
        // their way to the queue: keep forwarding.
        let Some((splice, cookie, counters)) = self.caught_up(splice)? else {
            return Ok(());
        };
        splice.grant(cookie, counters).map_err(map_fault)?;
        self.state.pressure = Pressure::Splicing;
        Ok(())
    }

    /// The drain timer fired.
    fn on_drain_poll(&mut self, splice: Option<&Splice>) -> Result<(), Fault> {
        if self.state.pressure == Pressure::Kicked {
            self.state.pressure = Pressure::Splicing;
            return self.check_spliced_source(splice);
        }
        if self.state.pressure == Pressure::Draining {
            self.check_drained(splice)?;
            if self.state.pressure == Pressure::Forwarding {
                // Bytes are waiting in `from`: take them now rather than at the next wakeup.
                return self.on_readable(splice);
            }
            return Ok(());
        }
        if self.waiting_for_fin_drain() {
            self.check_for_hole(splice)?;
        }
        self.try_finish()
    }

    /// Bytes the program dropped (a repeated head it could not cut off, see
    /// `FlowCounters::overlap`) never reach `to`, so the FIN would wait for them
    /// forever: the stream is broken, and the connection is reset instead.
    fn check_for_hole(&self, splice: Option<&Splice>) -> Result<(), Fault> {
        let lost = self
            .program_counters(splice)?
            .map_or(0, |(_, counters)| counters.lost);
        if lost > 0 {
            warn!("the splice dropped {lost} bytes it could not deduplicate: resetting");
            return Err(Fault::Source(io::Error::other("bytes lost in the splice")));
        }
        Ok(())
    }

    /// After a spliced `from`'s FIN: passes it on once every byte before it is in
    /// `to`'s send queue.
    fn try_finish(&mut self) -> Result<(), Fault> {
        if !self.waiting_for_fin_drain() {
            return Ok(());
        }
        if let Some(e) = self.to.take_error().map_err(Fault::Target)? {
            return Err(Fault::Target(e));
        }
        if self.pending.is_empty() && self.written_to_target()? >= self.state.received {
            self.pass_fin_on()?;
        }
        Ok(())
    }

    fn pass_fin_on(&mut self) -> Result<(), Fault> {
        match SockRef::from(self.to).shutdown(Shutdown::Write) {
            Ok(()) => {
                self.state.done = true;
                Ok(())
            }
            // The target already closed its receiving side: nothing to tell it.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                self.state.done = true;
                Ok(())
            }
            Err(e) => Err(Fault::Target(e)),
        }
    }

    /// A spliced direction past its FIN whose backlog is still draining.
    fn waiting_for_fin_drain(&self) -> bool {
        matches!(self.state.mode, Mode::Spliced { .. }) && self.state.eof && !self.state.done
    }

    /// Bytes that came from `from`, whatever happened to them afterwards.
    fn bytes(&self) -> u64 {
        match self.state.mode {
            Mode::Copied => self.state.copied,
            Mode::Spliced { .. } if self.state.eof => {
                self.state.received + self.state.before_splice
            }
            Mode::Spliced { .. } => {
                sockopt::tcp_counters(self.from.as_fd()).map_or(0, |c| c.bytes_received)
            }
        }
    }
}

/// A connection being relayed: its sockets, where each direction is, and the record
/// that logs it at the end.
pub struct Relay {
    // Fields drop in this order: the splice leaves the maps before the sockets close.
    splice: Option<Splice>,
    client: TcpStream,
    server: TcpStream,
    progress: Progress,
    /// A splice still to come: the connection is copied until then.
    deferred: Option<Deferred>,
}

/// A connection's splice, put off while it may still be a short session.
struct Deferred {
    sockmap: Arc<Sockmap>,
    terms: SpliceTerms,
    at: Instant,
}

/// What a connection's relay knows besides its sockets and splice: kept as it is
/// while the connection is parked.
struct Progress {
    /// (client -> server, server -> client).
    flows: [FlowState; 2],
    timeouts: Timeouts,
    /// When to look next whether the connection has been idle too long.
    idle_check: Instant,
    ending: Ending,
}

/// Why [`Relay::relay`] returned.
enum Stop {
    Over(Transfer),
    /// Spliced both ways with nothing to do: hand the connection to the parking.
    Park,
    /// Time to splice the copied connection.
    Splice,
}

impl Relay {
    /// A relay that copies the connection, and splices it through `sockmap` (when
    /// there is one) on `terms`.
    pub fn new(
        client: TcpStream,
        server: TcpStream,
        sockmap: Option<Arc<Sockmap>>,
        terms: SpliceTerms,
        timeouts: Timeouts,
        ending: Ending,
    ) -> Relay {
        let now = Instant::now();
        let mut relay = Relay {
            splice: None,
            client,
            server,
            progress: Progress {
                flows: [FlowState::new(Mode::Copied); 2],
                timeouts,
                idle_check: now + timeouts.idle,
                ending,
            },
            deferred: sockmap.map(|sockmap| Deferred {
                at: now + terms.after,
                sockmap,
                terms,
            }),
        };
        // Without the reading position the program cannot join a stream midway.
        let at_once = |d: &Deferred| d.terms.after.is_zero() || !d.sockmap.maps.joins_mid_stream;
        if relay.deferred.as_ref().is_some_and(at_once) {
            relay.join_splice();
        }
        relay
    }

    /// Relays until the connection is over, then logs it; or until it parks.
    pub async fn run(mut self) {
        loop {
            match self.relay().await {
                Stop::Over(transfer) => return self.end(transfer),
                Stop::Park => return self.park(),
                Stop::Splice => self.join_splice(),
            }
        }
    }

    /// Splices what the kernel takes of the connection; the rest stays copied.
    fn join_splice(&mut self) {
        let Some(Deferred { sockmap, terms, .. }) = self.deferred.take() else {
            return;
        };
        let splice = Splice::start(sockmap, &self.client, &self.server, terms);
        for (flow, mode) in self.progress.flows.iter_mut().zip(splice.flows()) {
            if mode != Mode::Copied {
                flow.spliced_from_here(mode);
            }
        }
        self.splice = Some(splice);
    }

    /// The relay's splice, (client, server) sockets and progress; a splice still to
    /// come is forgotten.
    fn into_parts(self) -> (Option<Splice>, TcpStream, TcpStream, Progress) {
        (self.splice, self.client, self.server, self.progress)
    }

    fn end(self, transfer: Transfer) {
        let (splice, client, server, progress) = self.into_parts();
        // Out of the maps before the sockets close, and closed before the log line.
        drop(splice);
        drop((client, server));
        progress.ending.relayed(transfer);
    }

    fn park(self) {
        let (splice, client, server, progress) = self.into_parts();
        let Some(splice) = splice else {
            unreachable!("only a spliced connection parks");
        };
        // Leaving tokio cannot fail for a registered socket; if it did, the socket
        // would be closed, so the connection ends as reset on that side.
        let (client, server) = match both_moved(client.into_std(), server.into_std()) {
            Ok(sockets) => sockets,
            Err((side, [client, server])) => {
                warn!("parking the connection failed: {side} socket lost");
                return end_broken(splice, client, server, progress, side);
            }
        };
        let parked = Parked {
            splice,
            client,
            server,
            progress,
        };
        let parking = parked.splice.sockmap().clone();
        if let Some(parked) = parking.parking.park(parked) {
            tokio::spawn(parked.resume());
        }
    }

    async fn relay(&mut self) -> Stop {
        let (client, server, splice) = (&self.client, &self.server, self.splice.as_ref());
        let timeouts = self.progress.timeouts;
        let mut up = Flow::new(client, server, self.progress.flows[0]);
        let mut down = Flow::new(server, client, self.progress.flows[1]);
        let modes = [up.state.mode, down.state.mode];
        let mut first_fin = None;
        let mut drain_poll = DRAIN_POLL.0;
        let mut idle_check = self.progress.idle_check;
        let mut quiet_since = Instant::now();

        let fault = loop {
            if up.state.done && down.state.done {
                break None;
            }
            if first_fin.is_none() {
                first_fin = match (up.state.eof, down.state.eof) {
                    (true, _) => Some(End::ClientClosed),
                    (_, true) => Some(End::ServerClosed),
                    _ => None,
                };
                if first_fin.is_some() {
                    idle_check = idle_check.min(Instant::now() + timeouts.half_closed);
                }
            }
            let draining = up.wants_drain_poll() || down.wants_drain_poll();
            if !draining {
                drain_poll = DRAIN_POLL.0;
            }
            let park_at = (splice.is_some() && up.parkable() && down.parkable())
                .then_some(quiet_since + PARK_AFTER);
            let splice_at = self
                .deferred
                .as_ref()
                .filter(|_| up.may_join() && down.may_join())
                .map(|deferred| deferred.at);
            if let Some(at) = splice_at
                && (Instant::now() >= at
                    || up.state.copied + down.state.copied >= SPLICE_AFTER_BYTES)
            {
                self.progress.flows = [up.state, down.state];
                self.progress.idle_check = idle_check;
                return Stop::Splice;
            }
            // One readiness future per socket and one timer: each is part of every
            // connection's task, so every one of them costs memory per connection.
            let client_interest = interest(&up, &down);
            let server_interest = interest(&down, &up);
            let drain_at = draining.then(|| Instant::now() + drain_poll);
            let wake_at = [drain_at, park_at, splice_at]
                .into_iter()
                .flatten()
                .fold(idle_check, Instant::min);
            let result = tokio::select! {
                r = client.ready(client_interest.unwrap_or(Interest::READABLE)),
                    if client_interest.is_some() =>
                {
                    quiet_since = Instant::now();
                    on_socket_ready(client, r, Side::Client, &mut up, &mut down, splice)
                }
                r = server.ready(server_interest.unwrap_or(Interest::READABLE)),
                    if server_interest.is_some() =>
                {
                    quiet_since = Instant::now();
                    on_socket_ready(server, r, Side::Server, &mut down, &mut up, splice)
                }
                () = grant_requested(splice) => {
                    quiet_since = Instant::now();
                    up.on_grant_request(splice)
                        .map_err(|f| (f, Side::Client))
                        .and_then(|()| down.on_grant_request(splice).map_err(|f| (f, Side::Server)))
                }
                () = sleep_until(wake_at) => {
                    let now = Instant::now();
                    let drained = match drain_at {
                        Some(at) if now >= at => {
                            drain_poll = (drain_poll * 2).min(DRAIN_POLL.1);
                            up.on_drain_poll(splice)
                                .map_err(|f| (f, Side::Client))
                                .and_then(|()| down.on_drain_poll(splice).map_err(|f| (f, Side::Server)))
                        }
                        _ => Ok(()),
                    };
                    if drained.is_ok() && now >= idle_check {
                        let limit = if first_fin.is_some() { timeouts.half_closed } else { timeouts.idle };
                        match idle_for(client, server) {
                            Some(idle) if idle < limit => {
                                idle_check = now + (limit - idle);
                            }
                            _ => {
                                for socket in [client, server] {
                                    let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
                                }
                                let end = if first_fin.is_some() { End::HalfClosedTimeout } else { End::IdleTimeout };
                                return Stop::Over(transfer(&up, &down, end, modes));
                            }
                        }
                    }
                    if drained.is_ok() && park_at.is_some_and(|at| now >= at) {
                        self.progress.flows = [up.state, down.state];
                        self.progress.idle_check = idle_check;
                        return Stop::Park;
                    }
                    drained
                },
            };
            if let Err(fault) = result {
                break Some(fault);
            }
        };

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
        Stop::Over(transfer(&up, &down, end, modes))
    }
}

fn transfer(up: &Flow, down: &Flow, end: End, modes: [Mode; 2]) -> Transfer {
    Transfer {
        from_client: up.bytes(),
        from_server: down.bytes(),
        copied_from_client: up.state.copied + up.state.before_splice,
        copied_from_server: down.state.copied + down.state.before_splice,
        end,
        path: Path::of(modes),
    }
}

/// A parked connection: a [`Relay`] whose sockets have left tokio.
pub struct Parked {
    splice: Splice,
    client: std::net::TcpStream,
    server: std::net::TcpStream,
    progress: Progress,
}

impl Parked {
    pub fn splice(&self) -> &Splice {
        &self.splice
    }

    pub fn splice_mut(&mut self) -> &mut Splice {
        &mut self.splice
    }

    /// The (client, server) sockets.
    pub fn sockets(&self) -> [&std::net::TcpStream; 2] {
        [&self.client, &self.server]
    }

    /// When the relay must look whether the connection has been idle too long.
    pub fn idle_check(&self) -> Instant {
        self.progress.idle_check
    }

    /// Carries on relaying, in the task this runs in.
    pub async fn resume(self) {
        let Parked {
            splice,
            client,
            server,
            progress,
        } = self;
        // Joining tokio fails only when epoll does (out of memory, or over
        // max_user_watches); the socket is closed then.
        let (client, server) =
            match both_moved(TcpStream::from_std(client), TcpStream::from_std(server)) {
                Ok(sockets) => sockets,
                Err((side, sockets)) => {
                    warn!("resuming a parked connection failed: {side} socket lost");
                    let [client, server] = sockets.map(|s| s.and_then(|s| s.into_std().ok()));
                    return end_broken(splice, client, server, progress, side);
                }
            };
        Relay {
            splice: Some(splice),
            client,
            server,
            progress,
            deferred: None,
        }
        .run()
        .await;
    }
}

/// Both sockets of a connection, moved into or out of tokio; or the side whose socket
/// was lost (closed by the failed move), with what is left of (client, server).
type Moved<T> = Result<(T, T), (Side, [Option<T>; 2])>;

fn both_moved<T>(client: io::Result<T>, server: io::Result<T>) -> Moved<T> {
    match (client, server) {
        (Ok(client), Ok(server)) => Ok((client, server)),
        (client, server) => {
            let lost = if client.is_err() {
                Side::Client
            } else {
                Side::Server
            };
            Err((lost, [client.ok(), server.ok()]))
        }
    }
}

/// Ends a connection that lost its `lost` socket while parking or resuming: the
/// other one is reset.
fn end_broken(
    splice: Splice,
    client: Option<std::net::TcpStream>,
    server: Option<std::net::TcpStream>,
    progress: Progress,
    lost: Side,
) {
    let Progress { flows, ending, .. } = progress;
    drop(splice);
    for socket in [&client, &server].into_iter().flatten() {
        let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
    }
    drop((client, server));
    let modes = flows.map(|f| f.mode);
    ending.relayed(Transfer {
        from_client: flows[0].consumed + flows[0].before_splice,
        from_server: flows[1].consumed + flows[1].before_splice,
        copied_from_client: flows[0].copied + flows[0].before_splice,
        copied_from_server: flows[1].copied + flows[1].before_splice,
        end: match lost {
            Side::Client => End::ClientReset,
            Side::Server => End::ServerReset,
        },
        path: Path::of(modes),
    });
}

/// A map operation of the splice failed: the direction's source is no longer known
/// to the program, so it is treated as failed.
fn map_fault(error: MapError) -> Fault {
    Fault::Source(io::Error::other(error))
}

/// What to wait for on one socket: bytes for the direction `reading` from it (past
/// that direction's FIN only an error, as a reset still shows as one), and room for
/// the direction `writing` to it. None when nothing.
fn interest(reading: &Flow, writing: &Flow) -> Option<Interest> {
    [
        (reading.wants_to_read(), Interest::READABLE),
        (reading.state.eof, Interest::ERROR),
        (writing.wants_to_write(), Interest::WRITABLE),
    ]
    .into_iter()
    .filter(|&(wanted, _)| wanted)
    .map(|(_, interest)| interest)
    .reduce(|all, interest| all | interest)
}

/// `socket` is ready for some of what [`interest`] asked: the direction reading from
/// it and the one writing to it each take their part. `side` is the socket's side.
fn on_socket_ready(
    socket: &TcpStream,
    ready: io::Result<Ready>,
    side: Side,
    reading: &mut Flow,
    writing: &mut Flow,
    splice: Option<&Splice>,
) -> Result<(), (Fault, Side)> {
    let ready = ready.map_err(|e| (Fault::Source(e), side))?;
    if reading.state.eof && ready.is_error() {
        return socket_error(socket, side);
    }
    if reading.wants_to_read() && (ready.is_readable() || ready.is_read_closed()) {
        reading.on_readable(splice).map_err(|f| (f, side))?;
    }
    if writing.wants_to_write() && (ready.is_writable() || ready.is_write_closed()) {
        writing.on_writable(splice).map_err(|f| (f, side.other()))?;
    }
    Ok(())
}

/// Completes when the program asks for a larger grant; never without a splice.
async fn grant_requested(splice: Option<&Splice>) {
    match splice {
        Some(splice) => splice.grant_requested().await,
        None => std::future::pending().await,
    }
}

/// How long since either socket last received data (TCP_INFO), whichever is sooner:
/// a spliced connection's bytes never pass through kgate, but the kernel keeps time.
fn idle_for(client: &TcpStream, server: &TcpStream) -> Option<Duration> {
    let since = |s: &TcpStream| {
        sockopt::tcp_counters(s.as_fd())
            .ok()
            .map(|c| c.since_data_received)
    };
    Some(since(client)?.min(since(server)?))
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

/// A socket past its FIN reported an error: the one it holds, or a reset.
fn socket_error(socket: &TcpStream, side: Side) -> Result<(), (Fault, Side)> {
    let error = match socket.take_error() {
        Ok(Some(e)) | Err(e) => e,
        Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
    };
    Err((Fault::Source(error), side))
}
