//! One direction of a connection, from a source socket to a target socket: copied by
//! kgate, or spliced by the kernel with kgate watching.
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
//! for more, and kgate extends the bound to `queue_limit` bytes beyond those still on
//! their way out through the target (`Splice::extend`).
//!
//! Whatever is on its way out through the target of a connection that has a splice,
//! redirected or copied, stays within `queue_limit` (sockmap.rs says why): kgate's
//! copies too write only what keeps the target's unacknowledged bytes within it, and
//! a direction held at that bound looks again on the drain timer (the target's send
//! buffer is larger than the bound, so epoll would call it writable throughout).
//!
//! A copied direction reads into its own buffer and writes from it in userspace; it
//! reads again only once the buffer is written out, so a slow reader holds back its
//! own direction (TCP flow control does the rest) and never the other one. It passes
//! the FIN on as soon as it has written the last byte.

use std::{
    io,
    net::Shutdown,
    os::fd::AsFd,
    sync::atomic::{AtomicU64, Ordering},
};

use proxy_common::FlowCounters;
use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tracing::warn;

use super::{
    Mode,
    sockmap::{Splice, kick},
};
use crate::{maps::MapError, sockopt};

/// Bytes a copying direction holds at most: what it read and could not write yet.
/// Measured side by side (`cargo xtask bench`, 2 GiB each way): 256 KiB moved 8
/// streams at 15.7 Gbit/s where 64 KiB moved 13.6, at 13 % less CPU per GiB; 1 MiB
/// did no better.
const COPY_BUFFER: usize = 256 * 1024;
/// Reads a copying direction makes before letting the other direction run.
const COPY_BURST: usize = 16;

/// TCP_INFO's `bytes_received` counts the FIN as a byte.
const FIN_SEQUENCE: u64 = 1;

/// A failure on one socket of a direction.
pub enum Fault {
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
    /// Bytes read from `from` before the relay began and not forwarded (an accepted
    /// PROXY header): TCP_INFO's `bytes_received` counts them, the relay must not.
    skipped: u64,
}

impl FlowState {
    pub fn new(mode: Mode) -> Self {
        FlowState {
            mode,
            pressure: Pressure::Splicing,
            eof: false,
            done: false,
            consumed: 0,
            copied: 0,
            received: 0,
            before_splice: 0,
            skipped: 0,
        }
    }

    /// The direction, whose source had `skipped` bytes read off it before the relay.
    pub fn after_reading(self, skipped: u64) -> Self {
        FlowState { skipped, ..self }
    }

    /// The direction, copied so far with nothing pending, is spliced from now on: its
    /// counts start again, as the program's and the target's do.
    pub fn spliced_from_here(&mut self, mode: Mode) {
        *self = FlowState {
            before_splice: self.copied,
            skipped: self.skipped,
            ..FlowState::new(mode)
        };
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// `from` has sent its FIN.
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// The FIN has been passed on.
    pub fn done(&self) -> bool {
        self.done
    }

    /// Bytes from `from` that kgate knows of without asking the kernel: those it
    /// read, and those it copied before the splice.
    pub fn known_bytes(&self) -> u64 {
        self.consumed + self.before_splice
    }

    /// Bytes kgate moved itself rather than the kernel.
    pub fn copied_bytes(&self) -> u64 {
        self.copied + self.before_splice
    }
}

/// One direction of a connection.
pub struct Flow<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    /// The connection's splice, if it has one: the program's counters, the grants, and
    /// the bound on what is on its way out through `to`.
    splice: Option<&'a Splice>,
    pub state: FlowState,
    /// Bytes read and not written yet: `buf[pending]`. Empty (no allocation) while the
    /// direction waits for bytes.
    buf: Vec<u8>,
    pending: std::ops::Range<usize>,
    /// Pending bytes wait because `to` has `queue_limit` bytes unacknowledged.
    held_at_bound: bool,
    /// `from` is not read for now: the connection is to be spliced, and kgate must
    /// first write out what it holds (see the relay's `ReadPause`).
    reads_paused: bool,
    /// Where the bytes kgate copies are counted as they go (the server's and the
    /// frontend's counters of this direction), for `kgate status` and the metrics.
    tallies: Tallies<'a>,
}

/// A direction's byte counters: its server's and its frontend's.
pub type Tallies<'a> = [Option<&'a AtomicU64>; 2];

impl<'a> Flow<'a> {
    pub fn new(
        from: &'a TcpStream,
        to: &'a TcpStream,
        splice: Option<&'a Splice>,
        state: FlowState,
        tallies: Tallies<'a>,
    ) -> Self {
        Flow {
            from,
            to,
            splice,
            state,
            buf: Vec::new(),
            pending: 0..0,
            held_at_bound: false,
            reads_paused: false,
            tallies,
        }
    }

    /// Whether the direction may be spliced now: copied so far, all of it written out,
    /// and no FIN yet (a socket past its FIN cannot join a sock hash).
    pub fn may_join(&self) -> bool {
        self.state.mode == Mode::Copied && !self.state.eof && self.pending.is_empty()
    }

    /// Whether the direction only waits while the kernel moves its bytes: nothing for
    /// kgate to read, write, drain or pass on.
    pub fn parkable(&self) -> bool {
        matches!(self.state.mode, Mode::Spliced { .. })
            && self.state.pressure == Pressure::Splicing
            && !self.state.eof
            && self.pending.is_empty()
    }

    /// Whether kgate itself moves this direction's bytes right now.
    fn copying(&self) -> bool {
        matches!(self.state.mode, Mode::Copied) || self.state.pressure == Pressure::Forwarding
    }

    /// Stops reading `from` (or starts again): what was read is still written out.
    pub fn pause_reads(&mut self, paused: bool) {
        self.reads_paused = paused;
    }

    /// Whether to wait for `from` to be readable.
    pub fn wants_to_read(&self) -> bool {
        !self.state.eof
            && !self.reads_paused
            && self.pending.is_empty()
            && !matches!(self.state.pressure, Pressure::Draining | Pressure::Kicked)
    }

    /// Whether to wait for `to` to be writable: copied bytes are waiting, and not
    /// for the target to fall below the bound.
    pub fn wants_to_write(&self) -> bool {
        !self.pending.is_empty() && !self.held_at_bound
    }

    /// Whether the drain timer must run for this direction.
    pub fn wants_drain_poll(&self) -> bool {
        self.held_at_bound
            || matches!(self.state.pressure, Pressure::Draining | Pressure::Kicked)
            || self.waiting_for_fin_drain()
    }

    /// `from` is readable: data to copy, its FIN, or an error.
    pub fn on_readable(&mut self) -> Result<(), Fault> {
        if self.copying() {
            self.copy()?;
            self.try_resume_splicing()
        } else {
            self.check_spliced_source()
        }
    }

    fn copy(&mut self) -> Result<(), Fault> {
        let copied = self.copy_burst();
        if self.pending.is_empty() {
            // A direction that waits for bytes holds no buffer: one for each would
            // dwarf all else a held connection costs.
            self.buf = Vec::new();
        }
        copied
    }

    fn copy_burst(&mut self) -> Result<(), Fault> {
        for _ in 0..COPY_BURST {
            // Read into spare capacity: no page is touched before bytes land in it.
            self.buf.clear();
            self.buf.reserve_exact(COPY_BUFFER);
            match self.from.try_read_buf(&mut self.buf) {
                Ok(0) if self.passed_bytes_to_come()? => {
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
                    if !self.pending.is_empty() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(Fault::Source(e)),
            }
        }
        Ok(())
    }

    /// Writes what `to` takes of the pending bytes, within the bound.
    fn flush(&mut self) -> Result<(), Fault> {
        self.held_at_bound = false;
        while !self.pending.is_empty() {
            let room = self.room_in_target()?;
            if room == 0 {
                self.held_at_bound = true;
                return Ok(());
            }
            let end = self
                .pending
                .end
                .min(self.pending.start.saturating_add(room));
            match self.to.try_write(&self.buf[self.pending.start..end]) {
                Ok(n) => {
                    self.pending.start += n;
                    self.state.copied += n as u64;
                    for tally in self.tallies.into_iter().flatten() {
                        tally.fetch_add(n as u64, Ordering::Relaxed);
                    }
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

    /// How many bytes kgate may write to `to` now: any number without a splice (the
    /// send buffer is the bound); with one, what keeps `to`'s unacknowledged bytes
    /// within `queue_limit`. kgate copies into a spliced direction's target only once
    /// nothing redirected is on its way there (`Draining` waits for that).
    fn room_in_target(&self) -> Result<usize, Fault> {
        let Some(splice) = self.splice else {
            return Ok(usize::MAX);
        };
        let unacked = sockopt::send_queue(self.to.as_fd())
            .map_err(Fault::Target)?
            .unacked;
        let room = splice.queue_limit().saturating_sub(unacked);
        Ok(usize::try_from(room).unwrap_or(usize::MAX))
    }

    /// After `to` took more bytes (or the drain timer fired while held at the bound):
    /// flush, and maybe hand the direction back.
    pub fn on_writable(&mut self) -> Result<(), Fault> {
        self.flush()?;
        self.try_resume_splicing()
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

    fn check_spliced_source(&mut self) -> Result<(), Fault> {
        let from = self.from;
        let peeked = from.try_io(Interest::READABLE, || {
            let mut byte = [std::mem::MaybeUninit::uninit()];
            SockRef::from(from).peek(&mut byte)
        });
        match peeked {
            // Nothing readable and the FIN in; but passed bytes may still be on their
            // way from the kernel's backlog to the socket's queue: then not yet EOF.
            Ok(0) if self.passed_bytes_to_come()? => {
                self.state.pressure = Pressure::Draining;
                self.check_drained()
            }
            Ok(0) => {
                self.state.eof = true;
                self.note_received()?;
                self.try_finish()
            }
            // Bytes the program passed: the direction is over its bound.
            Ok(_) if self.passed_bytes_to_come()? => {
                self.state.pressure = Pressure::Draining;
                self.check_drained()
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

    /// For a spliced direction: the splice, its source socket's cookie, and what the
    /// program has done with the socket's bytes so far.
    fn program_counters(&self) -> Result<Option<(&'a Splice, u64, FlowCounters)>, Fault> {
        let (Mode::Spliced { cookie, .. }, Some(splice)) = (self.state.mode, self.splice) else {
            return Ok(None);
        };
        let counters = splice.counters(cookie).map_err(map_fault)?;
        Ok(Some((splice, cookie, counters)))
    }

    /// The splice, cookie and counters of a spliced direction once kgate has read
    /// every byte the program passed: only then may the program redirect again, as no
    /// redirected byte can overtake a passed one.
    fn caught_up(&self) -> Result<Option<(&'a Splice, u64, FlowCounters)>, Fault> {
        Ok(self
            .program_counters()?
            .filter(|(_, _, counters)| counters.passed == self.state.consumed))
    }

    /// Whether the program passed bytes that kgate has not read yet.
    fn passed_bytes_to_come(&self) -> Result<bool, Fault> {
        Ok(self
            .program_counters()?
            .is_some_and(|(_, _, counters)| counters.passed > self.state.consumed))
    }

    fn note_received(&mut self) -> Result<(), Fault> {
        self.state.received = sockopt::tcp_counters(self.from.as_fd())
            .map_err(Fault::Source)?
            .bytes_received
            .saturating_sub(FIN_SEQUENCE + self.state.before_splice + self.state.skipped);
        Ok(())
    }

    /// Bytes that reached `to`'s send queue since the splice began, from kgate and
    /// from the kernel together, and `to`'s unacknowledged bytes.
    fn target_progress(&self) -> Result<(u64, u64), Fault> {
        let Mode::Spliced { written_base, .. } = self.state.mode else {
            return Ok((self.state.copied, 0));
        };
        let sending = sockopt::send_queue(self.to.as_fd()).map_err(Fault::Target)?;
        Ok((
            sending.written.saturating_sub(written_base),
            sending.unacked,
        ))
    }

    /// Draining: moves on to forwarding once every redirected byte is in `to`.
    fn check_drained(&mut self) -> Result<(), Fault> {
        let Some((_, _, counters)) = self.program_counters()? else {
            return Ok(());
        };
        if self.target_progress()?.0 >= counters.redirected + self.state.copied {
            self.state.pressure = Pressure::Forwarding;
        }
        Ok(())
    }

    /// The program asked for a larger grant: give one as large as the target's progress
    /// allows, while nothing passed waits to be read (those must go first).
    pub fn on_grant_request(&mut self) -> Result<(), Fault> {
        if self.state.pressure != Pressure::Splicing || self.state.eof {
            return Ok(());
        }
        let Some((splice, cookie, counters)) = self.caught_up()? else {
            return Ok(());
        };
        let (written, unacked) = self.target_progress()?;
        let backlog = (counters.redirected + self.state.copied).saturating_sub(written);
        splice
            .extend(cookie, counters, backlog + unacked)
            .map_err(map_fault)
    }

    /// Forwarding: once every passed byte has been read and written, the kernel may
    /// redirect again.
    fn try_resume_splicing(&mut self) -> Result<(), Fault> {
        if self.state.pressure != Pressure::Forwarding || self.state.eof || !self.pending.is_empty()
        {
            return Ok(());
        }
        // Passed bytes the program counted but kgate has not read yet are still on
        // their way to the queue: keep forwarding.
        let Some((splice, cookie, counters)) = self.caught_up()? else {
            return Ok(());
        };
        // Nothing redirected is on its way (Draining saw to that): only what `to` has
        // not had acknowledged counts against the new grant.
        let (_, unacked) = self.target_progress()?;
        splice.grant(cookie, counters, unacked).map_err(map_fault)?;
        self.state.pressure = Pressure::Splicing;
        Ok(())
    }

    /// The drain timer fired.
    pub fn on_drain_poll(&mut self) -> Result<(), Fault> {
        if self.held_at_bound {
            return self.on_writable();
        }
        if self.state.pressure == Pressure::Kicked {
            self.state.pressure = Pressure::Splicing;
            return self.check_spliced_source();
        }
        if self.state.pressure == Pressure::Draining {
            self.check_drained()?;
            if self.state.pressure == Pressure::Forwarding {
                // Bytes are waiting in `from`: take them now rather than at the next wakeup.
                return self.on_readable();
            }
            return Ok(());
        }
        if self.waiting_for_fin_drain() {
            self.check_for_hole()?;
        }
        self.try_finish()
    }

    /// Bytes the program dropped (a repeated head it could not cut off, see
    /// `FlowCounters::overlap`) never reach `to`, so the FIN would wait for them
    /// forever: the stream is broken, and the connection is reset instead.
    fn check_for_hole(&self) -> Result<(), Fault> {
        let lost = self
            .program_counters()?
            .map_or(0, |(_, _, counters)| counters.lost);
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
        if self.pending.is_empty() && self.target_progress()?.0 >= self.state.received {
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
    pub fn bytes(&self) -> u64 {
        match self.state.mode {
            Mode::Copied => self.state.copied,
            Mode::Spliced { .. } if self.state.eof => {
                self.state.received + self.state.before_splice
            }
            Mode::Spliced { .. } => sockopt::tcp_counters(self.from.as_fd())
                .map_or(0, |c| c.bytes_received.saturating_sub(self.state.skipped)),
        }
    }
}

/// What to wait for on one socket: bytes for the direction `reading` from it, room for
/// the direction `writing` to it, and always an error: a reset must end the connection
/// at once, even while neither direction can move (a peer that does not read holds
/// both of them).
pub fn interest(reading: &Flow, writing: &Flow) -> Interest {
    let mut interest = Interest::ERROR;
    if reading.wants_to_read() {
        interest |= Interest::READABLE;
    }
    if writing.wants_to_write() {
        interest |= Interest::WRITABLE;
    }
    interest
}

/// A map operation of the splice failed: the direction's source is no longer known
/// to the program, so it is treated as failed.
fn map_fault(error: MapError) -> Fault {
    Fault::Source(io::Error::other(error))
}
