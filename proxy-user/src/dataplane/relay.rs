//! The life of a connection after the header: both directions (direction.rs) flow
//! until each side has sent its FIN and that FIN has been passed on, until one side
//! resets, or until the connection has been idle too long.
//!
//! On the sockmap plane a connection starts copied, and is spliced once it has lived
//! `splice_after` or copied [`SPLICE_AFTER_BYTES`], at a moment when kgate has written
//! out everything it read (a busy connection's reads pause for it, see [`ReadPause`]):
//! the splice carries on from exactly there (sockmap.rs), and each direction's counts
//! start again from zero (`FlowState::spliced_from_here`).
//!
//! The relay's task waits for one of these, whichever comes first:
//! - either socket ready for what its directions want (bytes, room, always an error);
//! - a grant request from the eBPF program for either socket;
//! - the next timer: the drain poll (a direction waits for the kernel's backlog or
//!   for its target to fall below the bound), parking, what comes later on the
//!   connection's data plane (its splice, or its handoff to the packet plane), or the
//!   idle check.

use std::{fmt, io, os::fd::AsFd, sync::Arc, time::Duration};

use socket2::SockRef;
use tokio::{
    io::Ready,
    net::TcpStream,
    time::{Instant, sleep_until},
};
use tracing::{debug, warn};

use super::{
    CounterSlots, Mode, SPLICE_AFTER_BYTES, SpliceTerms, Timeouts,
    direction::{Fault, Flow, FlowState, interest},
    packet::{HandOff, Held, Packet, Ticket},
    parking::PARK_AFTER,
    sockmap::{Sockmap, Splice},
};
use crate::{
    ending::{End, Ending, Transfer},
    sockopt,
};

/// How often a direction waiting on the kernel (its redirect backlog, its FIN, its
/// target at the bound) looks again: from the first value, doubling up to the second.
const DRAIN_POLL: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(50));

/// A connection being relayed: its sockets, where each direction is, and the record
/// that logs it at the end.
pub struct Relay {
    // Fields drop in this order: the splice leaves the maps before the sockets close.
    splice: Option<Splice>,
    client: TcpStream,
    server: TcpStream,
    progress: Progress,
    /// What the connection's data plane does with it later: it is copied until then.
    later: Option<Later>,
}

/// What the relay does beyond copying, on the connection's data plane.
pub enum Plan {
    Copy,
    Splice(Arc<Sockmap>),
    HandOff(Arc<Packet>),
}

/// What is still to come for a copied connection.
enum Later {
    /// Its splice, put off while it may still be a short session: at `at`, or once
    /// it has copied [`SPLICE_AFTER_BYTES`].
    Splice {
        sockmap: Arc<Sockmap>,
        terms: SpliceTerms,
        at: Instant,
        pause: ReadPause,
    },
    /// Its handoff to the packet plane, at the first quiet moment; the next look is at
    /// `at`, then `backoff` later. A connection that keeps moving bulk is never quiet
    /// by itself: it is held (see [`Packet::hold`]) until it is, for [`HOLD_LIMIT`] at
    /// most, then let go for `pause` (doubling) before it is held again.
    HandOff {
        packet: Arc<Packet>,
        counters: CounterSlots,
        at: Instant,
        backoff: Duration,
        /// Bytes copied when the relay last looked.
        copied: u64,
        held: Option<(Held, Instant)>,
        /// The earliest a hold may begin: at once, or after a pause.
        hold_from: Instant,
        pause: Duration,
    },
}

/// How a busy connection comes to its splice. The splice may start only once kgate
/// has written out everything it read, and a connection that moves bulk both ways at
/// full speed almost never has nothing pending in both directions at once: left to
/// chance, it would stay copied to its end. So once its splice is due, kgate stops
/// reading either socket until what it holds is written out. A peer that does not
/// read can keep bytes pending for ever, and the other direction must not wait on it
/// for long: a pause lasts [`READ_PAUSE_LIMIT`] at most, then reads go on for a while
/// (doubling) before the next one.
struct ReadPause {
    since: Option<Instant>,
    next_from: Instant,
    backoff: Duration,
}

/// The longest a read pause lasts. Writing out kgate's buffer to a peer that reads
/// takes a round trip or so (a slow link's peer, a few hundred milliseconds); what
/// takes longer waits for a peer that does not read.
const READ_PAUSE_LIMIT: Duration = Duration::from_millis(500);
/// How long reads go on after a pause that did not bring the splice: the first
/// time, and the longest.
const READ_PAUSE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(64));

impl ReadPause {
    fn new(now: Instant) -> Self {
        ReadPause {
            since: None,
            next_from: now,
            backoff: READ_PAUSE_BACKOFF.0,
        }
    }

    /// Whether reads are paused now, given whether the connection `waits` for its
    /// splice with bytes pending; if they are, when the pause ends.
    fn update(&mut self, waits: bool, now: Instant) -> Option<Instant> {
        if !waits {
            self.since = None;
            return None;
        }
        let since = match self.since {
            Some(since) => since,
            None if now >= self.next_from => *self.since.insert(now),
            None => return None,
        };
        let ends = since + READ_PAUSE_LIMIT;
        if now < ends {
            return Some(ends);
        }
        debug!(
            "what kgate held was not written out for the splice: reading on for {:?}",
            self.backoff
        );
        self.since = None;
        self.next_from = now + self.backoff;
        self.backoff = (self.backoff * 2).min(READ_PAUSE_BACKOFF.1);
        None
    }
}

/// The first wait before a handoff is tried again, and the longest.
const HANDOFF_RETRY: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(64));
/// How long a connection must have been quiet before a handoff is tried: a segment
/// that comes while the handoff reads the sockets is dropped, and when it is the
/// last one its sender has in flight (a banner, a command, a reply), it is sent
/// again only after some 200 ms. Right after a copy the answer to it is on its
/// way; after a quiet millisecond, a peer more than a LAN away, or one that thinks
/// before it speaks (postscreen's greeting pause), is unlikely to speak in the few
/// microseconds the handoff takes. Sessions shorter than this stay copied.
const HANDOFF_QUIET: Duration = Duration::from_millis(1);
/// A connection that has copied this much and still moves is held for its handoff:
/// short sessions never are (what the hold drops, their peers send again, late).
const HOLD_AFTER_BYTES: u64 = 64 * 1024;
/// How long a hold may wait for the connection to get quiet (a peer that does not
/// read never lets it), and the first pause after one that did not.
const HOLD_LIMIT: Duration = Duration::from_secs(2);
const HOLD_PAUSE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(64));

impl Later {
    /// When to act, for a connection quiet since `quiet_since` that has copied
    /// `copied` bytes.
    fn due(&self, quiet_since: Instant, copied: u64) -> Instant {
        if let Some(at) = self.hold_due(copied) {
            return at;
        }
        match self {
            Later::Splice { at, .. } => *at,
            // A held one is looked at on its own schedule.
            Later::HandOff { at, .. } if copied >= HOLD_AFTER_BYTES => *at,
            Later::HandOff { at, .. } => (*at).max(quiet_since + HANDOFF_QUIET),
        }
    }

    /// Whether it is time for the splice: the connection has lived `splice_after`, or
    /// has copied `copied` bytes, enough to call it bulk. Never for a handoff.
    fn splice_due(&self, copied: u64, now: Instant) -> bool {
        match self {
            Later::Splice { at, .. } => now >= *at || copied >= SPLICE_AFTER_BYTES,
            Later::HandOff { .. } => false,
        }
    }

    /// When to hold a connection that has moved bulk since the relay last looked and
    /// is not held yet: as soon as it may be, whatever kgate still has to write (the
    /// hold only stops the peers from sending more), since a bulk transfer may be over
    /// before a backed-off look comes.
    fn hold_due(&self, copied: u64) -> Option<Instant> {
        match self {
            Later::HandOff {
                held: None,
                copied: looked,
                hold_from,
                ..
            } if copied >= HOLD_AFTER_BYTES && copied > *looked => Some(*hold_from),
            _ => None,
        }
    }

    /// Holds a connection that moves bulk for its handoff: its peers stop sending
    /// while kgate writes out what it has.
    fn hold_busy(&mut self, client: &TcpStream, server: &TcpStream, now: Instant) {
        let Later::HandOff {
            packet,
            at,
            backoff,
            held: held @ None,
            hold_from,
            ..
        } = self
        else {
            return;
        };
        match packet.hold(client, server) {
            Ok(hold) => *held = Some((hold, now)),
            Err(e) => {
                debug!("holding a busy connection for its handoff: {e}");
                *hold_from = now + HOLD_PAUSE.0;
            }
        }
        *backoff = HANDOFF_RETRY.0;
        *at = now + *backoff;
    }

    /// Lets a hold go once it has lasted [`HOLD_LIMIT`] (the connection is handed off
    /// later, if ever); else returns when that will be. Checked whether or not a
    /// handoff may be tried meanwhile: a hold must never outlast its limit.
    fn release_overdue_hold(&mut self, now: Instant) -> Option<Instant> {
        let Later::HandOff {
            held: held @ Some(_),
            at,
            backoff,
            hold_from,
            pause,
            ..
        } = self
        else {
            return None;
        };
        let ends = held.as_ref().map(|(_, since)| *since + HOLD_LIMIT)?;
        if now < ends {
            return Some(ends);
        }
        debug!("the connection did not get quiet in its hold: let go for {pause:?}");
        *held = None;
        *at = now + *pause;
        *hold_from = *at;
        *pause = (*pause * 2).min(HOLD_PAUSE.1);
        *backoff = HANDOFF_RETRY.0;
        None
    }
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
    /// Time for what comes later on the data plane.
    Later,
}

impl Relay {
    /// A relay that copies the connection, and splices it through `sockmap` (when
    /// there is one) on `terms`.
    pub fn new(
        client: TcpStream,
        server: TcpStream,
        plan: Plan,
        terms: SpliceTerms,
        timeouts: Timeouts,
        ending: Ending,
    ) -> Relay {
        let now = Instant::now();
        let later = match plan {
            Plan::Copy => None,
            Plan::Splice(sockmap) => Some(Later::Splice {
                at: now + terms.after,
                sockmap,
                terms,
                pause: ReadPause::new(now),
            }),
            Plan::HandOff(packet) => Some(Later::HandOff {
                packet,
                counters: terms.counters,
                at: now,
                backoff: HANDOFF_RETRY.0,
                copied: 0,
                held: None,
                hold_from: now,
                pause: HOLD_PAUSE.0,
            }),
        };
        let mut relay = Relay {
            splice: None,
            client,
            server,
            progress: Progress {
                flows: [
                    FlowState::new(Mode::Copied).after_reading(terms.client_bytes_read),
                    FlowState::new(Mode::Copied),
                ],
                timeouts,
                idle_check: now + timeouts.idle,
                ending,
            },
            later,
        };
        // Without the reading position the program cannot join a stream midway: it
        // splices from the first byte, or, when kgate has read from the client already
        // (an accepted PROXY header), not at all (the program would forward the
        // header's segment whole).
        if let Some(Later::Splice { sockmap, .. }) = &relay.later
            && terms.client_bytes_read > 0
            && !sockmap.maps.joins_mid_stream
        {
            relay.later = None;
        }
        let splice_at_once = |later: &Later| match later {
            Later::Splice { terms, sockmap, .. } => {
                terms.after.is_zero() || !sockmap.maps.joins_mid_stream
            }
            Later::HandOff { .. } => false,
        };
        if relay.later.as_ref().is_some_and(splice_at_once) {
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
                Stop::Later => match self.later {
                    Some(Later::Splice { .. }) => self.join_splice(),
                    Some(Later::HandOff { .. }) => {
                        if let Some(ticket) = self.try_hand_off() {
                            return self.hand_over(ticket);
                        }
                    }
                    None => {}
                },
            }
        }
    }

    /// Hands the quiet connection off to the packet plane; or holds it, plans the next
    /// try, or gives up for good (it stays copied).
    fn try_hand_off(&mut self) -> Option<Ticket> {
        let copied_now: u64 = self.progress.flows.iter().map(|f| f.copied_bytes()).sum();
        let Some(Later::HandOff {
            packet,
            counters,
            at,
            backoff,
            copied,
            held,
            hold_from,
            ..
        }) = &mut self.later
        else {
            return None;
        };
        let hold = held.as_mut().map(|(held, _)| held);
        let outcome = packet.try_hand_off(&self.client, &self.server, *counters, hold);
        let now = Instant::now();
        let moving = copied_now > *copied;
        *copied = copied_now;
        match outcome {
            HandOff::Done(ticket) => {
                debug!(
                    held = ?held.as_ref().map(|(_, since)| now.duration_since(*since)),
                    copied = copied_now,
                    "handed off"
                );
                return Some(ticket);
            }
            HandOff::Refused(reason) => {
                debug!("the connection stays copied: {}", reason.as_str());
                // Dropping the hold lets the connection's segments through again.
                self.later = None;
                return None;
            }
            HandOff::NotQuiet => {}
        }
        match held {
            Some(_) => {
                let later = self.later.as_mut()?;
                if later.release_overdue_hold(now).is_some()
                    && let Later::HandOff { at, backoff, .. } = later
                {
                    *at = now + *backoff;
                    *backoff = (*backoff * 2).min(HANDOFF_RETRY.1);
                }
            }
            None if moving && copied_now >= HOLD_AFTER_BYTES && now >= *hold_from => {
                let later = self.later.as_mut()?;
                later.hold_busy(&self.client, &self.server, now);
            }
            _ => {
                *at = now + *backoff;
                *backoff = (*backoff * 2).min(HANDOFF_RETRY.1);
            }
        }
        None
    }

    /// The connection is forwarded by the packet plane from now on: it takes the
    /// sockets (silent, in repair mode) and the record that logs the connection.
    fn hand_over(self, ticket: Ticket) {
        let Some(Later::HandOff { packet, .. }) = &self.later else {
            unreachable!("only a connection planned for a handoff is handed off");
        };
        let packet = packet.clone();
        let (_, client, server, progress) = self.into_parts();
        let Progress {
            flows,
            timeouts,
            ending,
            ..
        } = progress;
        // Leaving tokio cannot fail for a registered socket.
        match (client.into_std(), server.into_std()) {
            (Ok(client), Ok(server)) => packet.adopt(
                ticket,
                [client, server],
                ending,
                flows.map(|f| f.copied_bytes()),
                timeouts,
            ),
            _ => warn!("handing a connection over failed: a socket was lost"),
        }
    }

    /// Splices what the kernel takes of the connection; the rest stays copied.
    fn join_splice(&mut self) {
        let Some(Later::Splice { sockmap, terms, .. }) = self.later.take() else {
            return;
        };
        let splice = Splice::start(sockmap, &self.client, &self.server, terms);
        for (flow, mode) in self.progress.flows.iter_mut().zip(splice.flows()) {
            if mode != Mode::Copied {
                flow.spliced_from_here(mode);
            }
        }
        self.progress
            .ending
            .carried_on(super::path_of(splice.flows()));
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
        let server_runtime = self.progress.ending.server_runtime();
        let server_runtime = server_runtime.as_deref();
        let frontend_load = self.progress.ending.frontend_load();
        let mut up = Flow::new(
            client,
            server,
            splice,
            self.progress.flows[0],
            [
                server_runtime.map(|r| &r.copied_in),
                Some(&frontend_load.copied_in),
            ],
        );
        let mut down = Flow::new(
            server,
            client,
            splice,
            self.progress.flows[1],
            [
                server_runtime.map(|r| &r.copied_out),
                Some(&frontend_load.copied_out),
            ],
        );
        let modes = [up.state.mode(), down.state.mode()];
        let mut first_fin = None;
        let mut drain_poll = DRAIN_POLL.0;
        let mut idle_check = self.progress.idle_check;
        let mut quiet_since = Instant::now();

        let fault = loop {
            if up.state.done() && down.state.done() {
                break None;
            }
            if first_fin.is_none() {
                first_fin = match (up.state.eof(), down.state.eof()) {
                    (true, _) => Some(End::ClientClosed),
                    (_, true) => Some(End::ServerClosed),
                    _ => None,
                };
                if first_fin.is_some() {
                    idle_check = idle_check.min(Instant::now() + timeouts.half_closed);
                    // Past a FIN a connection is never quiet (its sockets are no longer
                    // established): no handoff, and a hold would only stop the other
                    // direction until its limit.
                    if matches!(self.later, Some(Later::HandOff { .. })) {
                        self.later = None;
                    }
                }
            }
            let draining = up.wants_drain_poll() || down.wants_drain_poll();
            if !draining {
                drain_poll = DRAIN_POLL.0;
            }
            let park_at = (splice.is_some() && up.parkable() && down.parkable())
                .then_some(quiet_since + PARK_AFTER);
            let copied = up.state.copied_bytes() + down.state.copied_bytes();
            let joinable = up.may_join() && down.may_join();
            let splice_due = self
                .later
                .as_ref()
                .is_some_and(|later| later.splice_due(copied, Instant::now()));
            let reads_paused_until = match self.later.as_mut() {
                // Past a FIN a connection cannot join the splice at all.
                Some(Later::Splice { pause, .. }) => pause.update(
                    splice_due && !joinable && first_fin.is_none(),
                    Instant::now(),
                ),
                _ => None,
            };
            up.pause_reads(reads_paused_until.is_some());
            down.pause_reads(reads_paused_until.is_some());
            // A busy connection is held at once, even while kgate has bytes to write
            // (they stay in this loop's buffers: only a joinable one leaves it).
            if let Some(later) = self.later.as_mut()
                && !joinable
                && later
                    .hold_due(copied)
                    .is_some_and(|at| Instant::now() >= at)
            {
                later.hold_busy(client, server, Instant::now());
            }
            let later_at = self
                .later
                .as_ref()
                .filter(|_| joinable)
                .map(|later| later.due(quiet_since, copied));
            if let Some(at) = later_at
                && (Instant::now() >= at || splice_due)
            {
                self.progress.flows = [up.state, down.state];
                self.progress.idle_check = idle_check;
                return Stop::Later;
            }
            let hold_ends = self
                .later
                .as_mut()
                .and_then(|later| later.release_overdue_hold(Instant::now()));
            // One readiness future per socket and one timer: each is part of every
            // connection's task, so every one of them costs memory per connection.
            let drain_at = draining.then(|| Instant::now() + drain_poll);
            let wake_at = [drain_at, park_at, later_at, hold_ends, reads_paused_until]
                .into_iter()
                .flatten()
                .fold(idle_check, Instant::min);
            let result = tokio::select! {
                r = client.ready(interest(&up, &down)) => {
                    quiet_since = Instant::now();
                    on_socket_ready(client, r, Side::Client, &mut up, &mut down)
                }
                r = server.ready(interest(&down, &up)) => {
                    quiet_since = Instant::now();
                    on_socket_ready(server, r, Side::Server, &mut down, &mut up)
                }
                () = grant_requested(splice) => {
                    quiet_since = Instant::now();
                    up.on_grant_request()
                        .map_err(|f| (f, Side::Client))
                        .and_then(|()| down.on_grant_request().map_err(|f| (f, Side::Server)))
                }
                () = sleep_until(wake_at) => {
                    let now = Instant::now();
                    let drained = match drain_at {
                        Some(at) if now >= at => {
                            drain_poll = (drain_poll * 2).min(DRAIN_POLL.1);
                            up.on_drain_poll()
                                .map_err(|f| (f, Side::Client))
                                .and_then(|()| down.on_drain_poll().map_err(|f| (f, Side::Server)))
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
        end,
        path: super::path_of(modes),
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
            later: None,
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
    let modes = flows.map(|f| f.mode());
    ending.relayed(Transfer {
        from_client: flows[0].known_bytes(),
        from_server: flows[1].known_bytes(),
        end: match lost {
            Side::Client => End::ClientReset,
            Side::Server => End::ServerReset,
        },
        path: super::path_of(modes),
    });
}

/// `socket` is ready for some of what [`interest`] asked: the direction reading from
/// it and the one writing to it each take their part. `side` is the socket's side.
fn on_socket_ready(
    socket: &TcpStream,
    ready: io::Result<Ready>,
    side: Side,
    reading: &mut Flow,
    writing: &mut Flow,
) -> Result<(), (Fault, Side)> {
    let ready = ready.map_err(|e| (Fault::Source(e), side))?;
    if ready.is_error() {
        return socket_error(socket, side);
    }
    if reading.wants_to_read() && (ready.is_readable() || ready.is_read_closed()) {
        reading.on_readable().map_err(|f| (f, side))?;
    }
    if writing.wants_to_write() && (ready.is_writable() || ready.is_write_closed()) {
        writing.on_writable().map_err(|f| (f, side.other()))?;
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

/// A socket reported an error: the one it holds, or a reset.
fn socket_error(socket: &TcpStream, side: Side) -> Result<(), (Fault, Side)> {
    let error = match socket.take_error() {
        Ok(Some(e)) | Err(e) => e,
        Ok(None) => io::Error::from(io::ErrorKind::ConnectionReset),
    };
    Err((Fault::Source(error), side))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_pause_lasts_while_the_splice_waits_and_its_limit_at_most_then_backs_off() {
        let start = Instant::now();
        let mut pause = ReadPause::new(start);
        assert_eq!(pause.update(false, start), None, "nothing waits: no pause");
        let ends = start + READ_PAUSE_LIMIT;
        assert_eq!(pause.update(true, start), Some(ends));
        assert_eq!(pause.update(true, start + READ_PAUSE_LIMIT / 2), Some(ends));
        // Everything written out: the pause is over, and the next one may come at once.
        assert_eq!(pause.update(false, start + READ_PAUSE_LIMIT / 2), None);
        let again = start + READ_PAUSE_LIMIT;
        assert_eq!(pause.update(true, again), Some(again + READ_PAUSE_LIMIT));
        // A pause that reaches its limit lets reads go on, for longer each time.
        let mut now = again + READ_PAUSE_LIMIT;
        for backoff in [1, 2, 4, 8, 16, 32, 64, 64].map(Duration::from_secs) {
            assert_eq!(pause.update(true, now), None, "the limit ends the pause");
            assert_eq!(
                pause.update(true, now + backoff - Duration::from_millis(1)),
                None
            );
            now += backoff;
            assert_eq!(pause.update(true, now), Some(now + READ_PAUSE_LIMIT));
            now += READ_PAUSE_LIMIT;
        }
    }
}
