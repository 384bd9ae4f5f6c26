//! The packet data plane: after the PROXY header, the gateway forwards a connection's
//! segments like a router, at TC, and its two sockets go quiet.
//!
//! A connection starts copied, as on the userspace plane. At the first moment when
//! both of its TCP connections are quiet, it is handed off:
//!
//! 1. *Quiet*: kgate holds no byte it read and did not write, and neither socket has
//!    a byte unread (SIOCINQ) or a byte unacknowledged (SIOCOUTQ); both are
//!    established. Every byte either peer sent is then with the other peer, acked.
//!    The relay looks for that moment after each copy, then on a timer (1 ms,
//!    doubling to 64 ms): the header itself waits for the server's ACK.
//! 2. *Freeze*: rules in `FREEZE` for both connections' segments as they arrive. The
//!    TC program drops them from now on (their senders send them again), and drops
//!    what the two sockets would send: nothing can change the sockets any more.
//! 3. *Read*: both sockets go into TCP_REPAIR, which silences them for good and shows
//!    their sequence numbers and timestamp clocks; quiet is checked again (a segment
//!    may have landed between 1 and 2), else everything is undone and the relay goes
//!    on copying.
//! 4. *Forward*: the rules switch to `FORWARD` with the deltas between the two
//!    sequence spaces. With D1 = server socket's next seq − client socket's rcv_nxt and
//!    D2 = client socket's next seq − server socket's rcv_nxt, a segment from the
//!    client gets seq + D1 and ack − D2 (SACK edges too), one from the server seq + D2
//!    and ack − D1. The PROXY header is in D1: the server's socket sent it. Windows
//!    move between the window scales each side announced; timestamps onto the clocks
//!    each receiver knows (proxy-ebpf/src/packet.rs).
//!
//! A connection moving bulk is never quiet by itself: once it has copied 64 KiB the
//! relay holds it ([`Packet::hold`], rules in `HOLD`, as soon as it has moved that
//! much, whatever kgate still has to write): the egress program closes the window in
//! what the gateway's sockets send, so both peers stop sending while what is in
//! flight drains and is written out; then 1-4 go as above, and each peer gets a window
//! update from a raw socket. A hold that finds no quiet within its limit is let go
//! with the last segment sent again, window open.
//!
//! Segments dropped during 2-4 cost their senders a retransmission; nothing is lost,
//! as nothing was acknowledged for them. A connection that cannot be forwarded that
//! way stays copied, and the reason is counted ([`Fallback`]): a peer on this host
//! (loopback traffic passes no TC program), client and server of different address
//! families, timestamps on one connection only, an MSS one side would exceed on the
//! other, or no free flow slot.
//!
//! The TC programs report a flow's end (both FINs acknowledged, a reset, the first
//! FIN) on a ring; kgate keeps a closed flow's rules for [`LINGER`] (a lost last ACK
//! brings its FIN again), then removes them, closes the two sockets (in repair mode:
//! silently) and logs the connection with the bytes the programs counted. Idle and
//! half-closed timeouts come from the programs' last-segment times; at a timeout, and
//! at shutdown, kgate resets both peers itself (a raw socket: the repaired sockets
//! cannot send), where it could open one. A SYN on a flow's addresses is never
//! forwarded: the program drops it and reports it. Coming while the closed flow
//! lingers, it is a client that reused its port (its kernel kept nothing of the old
//! connection), so kgate ends the flow at once and the SYN sent again reaches the
//! listener; a live flow stays as it is.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_common::packet::{
    CLOSED, DOWN, Event, FIN_ACKED, FIN_SEEN, FORWARD, FREEZE, FlowKey, HALF_CLOSED, HOLD,
    MAX_PACKET_FLOWS, Progress, RESET, RESET_SEEN, REUSED, Rule, TIMESTAMPS, UP,
};
use slab::Slab;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    CounterSlots, Timeouts,
    packet_raw::{self, RawSegments, WindowUpdate},
    trim::Trim,
};
use crate::{
    ending::{End, Ending, Transfer},
    interfaces::{self, Routes},
    maps::{PacketEvents, PacketMaps},
    pool::Path,
    sockopt::{self, TcpShape},
};

/// How long a closed flow's rules stay.
const LINGER: Duration = Duration::from_secs(2);
/// How often flows are looked at for their timeouts and lingering ends.
const SWEEP: Duration = Duration::from_secs(1);
/// How often the trim looks whether connections were handed off (see `trim`).
const TRIM_CHECK: Duration = Duration::from_millis(100);
/// TCP timestamp option bytes (with their two NOPs) in every segment that has them.
const TIMESTAMP_BYTES: u32 = 12;

/// Why a connection was not handed off (it stays copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    LocalPeer,
    UnattachedInterface,
    AddressFamilies,
    Timestamps,
    Mss,
    NoFlowSlot,
    NotLoaded,
    Error,
}

impl Fallback {
    pub const ALL: [Fallback; 8] = [
        Fallback::LocalPeer,
        Fallback::UnattachedInterface,
        Fallback::AddressFamilies,
        Fallback::Timestamps,
        Fallback::Mss,
        Fallback::NoFlowSlot,
        Fallback::NotLoaded,
        Fallback::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::LocalPeer => "local peer",
            Fallback::UnattachedInterface => "unattached interface",
            Fallback::AddressFamilies => "address families",
            Fallback::Timestamps => "timestamps on one side",
            Fallback::Mss => "mss",
            Fallback::NoFlowSlot => "no flow slot",
            Fallback::NotLoaded => "programs not loaded",
            Fallback::Error => "error",
        }
    }
}

/// What a handoff attempt came to.
pub enum HandOff {
    /// Forwarded from now on: give the connection to [`Packet::adopt`].
    Done(Ticket),
    /// Something is still on its way: try again later.
    NotQuiet,
    /// This connection stays copied.
    Refused(Fallback),
}

/// A connection held for its handoff. Dropped, it lets the connection's segments
/// through again (its peers send again what was dropped), unless the handoff took
/// over its rules.
pub struct Held {
    packet: Arc<Packet>,
    keys: [FlowKey; 2],
    armed: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.armed {
            self.packet.release(&self.keys);
        }
    }
}

/// A flow the programs forward, whose sockets and record its relay still holds.
#[must_use]
pub struct Ticket {
    slot: usize,
    keys: [FlowKey; 2],
    next_seq: [u32; 2],
}

/// The packet data plane: its maps, the forwarded flows, and what fell back.
pub struct Packet {
    /// None when the programs could not load or attach: every connection then stays
    /// copied ([`Fallback::NotLoaded`]), and no flow or hold ever exists.
    maps: Option<PacketMaps>,
    /// Why the programs are not there.
    unavailable: Option<String>,
    flows: Mutex<Slab<Slot>>,
    fallbacks: [AtomicU64; Fallback::ALL.len()],
    handed_off: AtomicU64,
    raw: Option<RawSegments>,
    local: Mutex<LocalAddresses>,
    /// The interfaces the programs are attached to (indexes).
    attached: HashSet<u32>,
    /// None without the programs.
    routes: Option<Mutex<Routes>>,
}

// The size is the point: see `Forwarded`'s variant.
#[allow(clippy::large_enum_variant)]
enum Slot {
    /// Forwarded; its relay has not handed over its sockets and record yet. The end,
    /// if the programs reported it meanwhile.
    Reserved(Option<u32>),
    /// In place, not boxed: connections are handed off in bursts, right after the
    /// tasks of a burst end, and a small allocation left among the freed tasks would
    /// keep its whole page resident.
    Forwarded(Forwarded),
}

/// A forwarded connection: what kgate keeps of it until its end.
struct Forwarded {
    /// Its rules' keys: segments from the client, from the server.
    keys: [FlowKey; 2],
    /// The next sequence numbers of the gateway's client and server sockets at the
    /// handoff: where resets start from.
    next_seq: [u32; 2],
    /// The client and server sockets, in repair mode: silent, even when closed.
    _sockets: [std::net::TcpStream; 2],
    /// Logs the connection and gives its slots back (frontend, server, shutdown
    /// count); taken when the connection ends, before its rules linger.
    ending: Option<Ending>,
    /// Bytes kgate copied before the handoff: from the client, from the server.
    copied_before: [u64; 2],
    timeouts: Timeouts,
    handed_off: Instant,
    /// When to look at its timeouts next.
    check_at: Instant,
    /// Closed (both FINs acknowledged) and logged: its rules and sockets go at this time.
    lingers_until: Option<Instant>,
}

impl Packet {
    /// The data plane over `maps`, and the task that watches its flows (run it inside
    /// the tokio runtime). Opens the raw sockets for resets now: capabilities are
    /// dropped later.
    pub fn start(
        maps: PacketMaps,
        events: PacketEvents,
        attached: HashSet<u32>,
        routes: Routes,
    ) -> Arc<Packet> {
        let raw = match RawSegments::open() {
            Ok(raw) => Some(raw),
            Err(e) => {
                warn!(
                    "forwarded connections will be closed without resetting their peers at \
                     a timeout or at shutdown, and a busy connection's peers will wait for \
                     their next window probe after its handoff: no raw socket ({e}; it needs \
                     CAP_NET_RAW and CAP_NET_ADMIN)"
                );
                None
            }
        };
        let packet = Arc::new(Packet {
            maps: Some(maps),
            unavailable: None,
            flows: Mutex::default(),
            fallbacks: Default::default(),
            handed_off: AtomicU64::new(0),
            raw,
            local: Mutex::new(LocalAddresses::default()),
            attached,
            routes: Some(Mutex::new(routes)),
        });
        tokio::spawn(watch(packet.clone(), events));
        packet
    }

    /// The data plane without its programs, which could not load or attach
    /// (`reason`): every connection stays copied, counted.
    pub fn unavailable(reason: String) -> Arc<Packet> {
        Arc::new(Packet {
            maps: None,
            unavailable: Some(reason),
            flows: Mutex::default(),
            fallbacks: Default::default(),
            handed_off: AtomicU64::new(0),
            raw: None,
            local: Mutex::new(LocalAddresses::default()),
            attached: HashSet::new(),
            routes: None,
        })
    }

    /// Why the programs could not load or attach, if they could not.
    pub fn unavailable_reason(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// The programs' maps, for what runs only with flows or holds, which exist only
    /// with the maps.
    fn maps(&self) -> &PacketMaps {
        self.maps
            .as_ref()
            .expect("the packet data plane keeps no flow without its programs")
    }

    fn lock(&self) -> MutexGuard<'_, Slab<Slot>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections forwarded now.
    pub fn forwarded(&self) -> usize {
        self.lock().len()
    }

    /// Connections handed off since start.
    pub fn handed_off(&self) -> u64 {
        self.handed_off.load(Ordering::Relaxed)
    }

    /// How many connections stayed copied, for each reason.
    pub fn fallbacks(&self) -> impl Iterator<Item = (Fallback, u64)> + '_ {
        Fallback::ALL
            .into_iter()
            .zip(&self.fallbacks)
            .map(|(reason, count)| (reason, count.load(Ordering::Relaxed)))
    }

    /// The programs' counters.
    /// The programs' counters; `None` without the programs.
    pub fn stats(
        &self,
    ) -> Option<Result<proxy_common::packet::PacketStats, crate::maps::MapError>> {
        self.maps.as_ref().map(PacketMaps::stats)
    }

    /// Holds a busy connection for its handoff: from now on the TC program drops what
    /// its peers send with data (they keep it and send it again), so that the sockets
    /// can drain and get quiet. Undone by [`Packet::release`] or by the handoff.
    pub fn hold(self: &Arc<Self>, client: &TcpStream, server: &TcpStream) -> io::Result<Held> {
        let Some(maps) = &self.maps else {
            return Err(io::Error::other(
                "the packet data plane's programs are not loaded",
            ));
        };
        let keys = [
            key(client.peer_addr()?, client.local_addr()?),
            key(server.peer_addr()?, server.local_addr()?),
        ];
        let held = Rule {
            state: HOLD,
            ..Rule::default()
        };
        for key in &keys {
            if let Err(e) = maps.set_rule(key, &held) {
                self.undo(&keys, &[], None);
                return Err(io::Error::other(e));
            }
        }
        Ok(Held {
            packet: self.clone(),
            keys,
            armed: true,
        })
    }

    /// Hands `client` <-> `server` off to the TC programs if the connection is quiet
    /// now (see the module docs).
    pub fn try_hand_off(
        &self,
        client: &TcpStream,
        server: &TcpStream,
        counters: CounterSlots,
        held: Option<&mut Held>,
    ) -> HandOff {
        if self.maps.is_none() {
            return self.refuse(Fallback::NotLoaded);
        }
        match self.hand_off(client, server, counters, held) {
            Ok(handoff) => handoff,
            Err(e) => {
                debug!("handoff failed, the connection stays copied: {e}");
                self.refuse(Fallback::Error)
            }
        }
    }

    fn refuse(&self, reason: Fallback) -> HandOff {
        let index = Fallback::ALL.iter().position(|&r| r == reason).unwrap_or(0);
        self.fallbacks[index].fetch_add(1, Ordering::Relaxed);
        HandOff::Refused(reason)
    }

    fn hand_off(
        &self,
        client: &TcpStream,
        server: &TcpStream,
        counters: CounterSlots,
        held: Option<&mut Held>,
    ) -> io::Result<HandOff> {
        if !quiet(client, server)? {
            return Ok(HandOff::NotQuiet);
        }
        // What an undone handoff puts back: the hold, or nothing.
        let back = held.as_ref().map(|_| Rule {
            state: HOLD,
            ..Rule::default()
        });
        let peers = [client.peer_addr()?, server.peer_addr()?];
        let locals = [client.local_addr()?, server.local_addr()?];
        if peers[0].is_ipv4() != peers[1].is_ipv4() {
            return Ok(self.refuse(Fallback::AddressFamilies));
        }
        if peers
            .iter()
            .any(|peer| self.local_addresses_contain(peer.ip()))
        {
            return Ok(self.refuse(Fallback::LocalPeer));
        }
        if !self.routed_through_attached(&peers, &locals)? {
            return Ok(self.refuse(Fallback::UnattachedInterface));
        }
        let shapes = [sockopt::tcp_shape(client)?, sockopt::tcp_shape(server)?];
        if let Some(reason) = mismatch(&shapes) {
            return Ok(self.refuse(reason));
        }
        let keys = [key(peers[0], locals[0]), key(peers[1], locals[1])];

        let mut flows = self.lock();
        let slot = flows.vacant_key();
        if slot >= MAX_PACKET_FLOWS {
            return Ok(self.refuse(Fallback::NoFlowSlot));
        }
        let sockets = [client, server];
        let frozen = Rule {
            state: FREEZE,
            ..Rule::default()
        };
        self.maps()
            .reset_progress(slot as u32)
            .map_err(io::Error::other)?;
        for key in &keys {
            if let Err(e) = self.maps().set_rule(key, &frozen) {
                self.undo(&keys, &[], back.as_ref());
                return Err(io::Error::other(e));
            }
        }
        let mut repaired = Vec::with_capacity(2);
        for socket in sockets {
            match sockopt::enter_repair(socket) {
                Ok(before) => repaired.push((socket, before)),
                Err(e) => {
                    self.undo(&keys, &repaired, back.as_ref());
                    return Err(e);
                }
            }
        }
        let read = quiet(client, server)
            .map(|quiet| quiet.then(|| (sockopt::sequence(client), sockopt::sequence(server))));
        let (x, y) = match read {
            Ok(Some((Ok(x), Ok(y)))) => (x, y),
            Ok(None) => {
                self.undo(&keys, &repaired, back.as_ref());
                return Ok(HandOff::NotQuiet);
            }
            Ok(Some((Err(e), _) | (_, Err(e)))) | Err(e) => {
                self.undo(&keys, &repaired, back.as_ref());
                return Err(e);
            }
        };
        let handoff_ns = monotonic_ns();
        let flags = if shapes[0].timestamps { TIMESTAMPS } else { 0 };
        let is_v6 = u8::from(peers[0].is_ipv6());
        let scale = |shape: &TcpShape, peer: bool| match (shape.window_scaling, peer) {
            (false, _) => 0,
            (true, true) => shape.peer_window_scale,
            (true, false) => shape.own_window_scale,
        };
        let up = Rule {
            new_key: key(locals[1], peers[1]),
            state: FORWARD,
            direction: UP,
            is_v6,
            flags,
            flow: slot as u32,
            seq_delta: y.send_next.wrapping_sub(x.receive_next),
            ack_delta: y.receive_next.wrapping_sub(x.send_next),
            ts_clock_at_handoff: y.ts_clock,
            handoff_ns,
            base_seq: x.receive_next,
            server_slot: counters.server,
            frontend_slot: counters.frontend,
            window_shift_in: scale(&shapes[0], true),
            window_shift_out: scale(&shapes[1], false),
            ..Rule::default()
        };
        let down = Rule {
            new_key: key(locals[0], peers[0]),
            direction: DOWN,
            seq_delta: x.send_next.wrapping_sub(y.receive_next),
            ack_delta: x.receive_next.wrapping_sub(y.send_next),
            ts_clock_at_handoff: x.ts_clock,
            base_seq: y.receive_next,
            window_shift_in: scale(&shapes[1], true),
            window_shift_out: scale(&shapes[0], false),
            ..up
        };
        for (key, rule) in keys.iter().zip([&up, &down]) {
            if let Err(e) = self.maps().set_rule(key, rule) {
                // Nothing was forwarded with a half-set flow that a retransmission
                // cannot mend: its segments came back as they were.
                self.undo(&keys, &repaired, back.as_ref());
                return Err(io::Error::other(e));
            }
        }
        if let Some(held) = held {
            // The rules are the flow's now.
            held.armed = false;
            self.open_windows(&peers, &locals, &shapes, [&x, &y]);
        }
        flows.insert(Slot::Reserved(None));
        self.handed_off.fetch_add(1, Ordering::Relaxed);
        Ok(HandOff::Done(Ticket {
            slot,
            keys,
            next_seq: [x.send_next, y.send_next],
        }))
    }

    /// After the handoff of a held connection: each peer may send again, as much as
    /// the other peer last allowed (see packet_raw.rs).
    fn open_windows(
        &self,
        peers: &[SocketAddr; 2],
        locals: &[SocketAddr; 2],
        shapes: &[TcpShape; 2],
        sequences: [&sockopt::Sequence; 2],
    ) {
        let Some(raw) = &self.raw else {
            return;
        };
        for side in 0..2 {
            let (own, other) = (sequences[side], sequences[1 - side]);
            let shape = &shapes[side];
            let scale = if shape.window_scaling {
                shape.own_window_scale
            } else {
                0
            };
            let update = WindowUpdate {
                from: locals[side],
                to: peers[side],
                seq: own.send_next,
                ack: own.receive_next,
                window: u16::try_from(other.send_window >> scale).unwrap_or(u16::MAX),
                timestamps: shape.timestamps.then_some((own.ts_clock, 0)),
            };
            if let Err(e) = raw.update_window(&update) {
                debug!(to = %update.to, "opening a window after a hold: {e}");
            }
        }
    }

    /// Ends a hold that did not lead to a handoff: the rules go, and each peer gets
    /// the last segment the gateway sent it again, with its window open (see
    /// [`Rule::held_last_sent`]).
    fn release(&self, keys: &[FlowKey; 2]) {
        let last_sent = keys.map(|key| match self.maps().rule(&key) {
            Ok(Some(rule)) if rule.held_last_sent.seen == 1 => Some(rule.held_last_sent),
            _ => None,
        });
        self.undo(keys, &[], None);
        let Some(raw) = &self.raw else {
            return;
        };
        for (key, last) in keys.iter().zip(last_sent) {
            let Some(last) = last else {
                continue;
            };
            // The rule's key is the peer's segments as they arrive: this goes back.
            let update = WindowUpdate {
                from: packet_raw::address(key.destination, key.destination_port),
                to: packet_raw::address(key.source, key.source_port),
                seq: last.seq_end,
                ack: last.ack,
                window: last.window,
                timestamps: (last.timestamps == 1).then_some((last.tsval, last.tsecr)),
            };
            if let Err(e) = raw.update_window(&update) {
                debug!(to = %update.to, "opening a window after a hold: {e}");
            }
        }
    }

    /// Takes a half-done handoff back: the rules go (or become `back` again), the
    /// sockets leave repair mode.
    fn undo(
        &self,
        keys: &[FlowKey; 2],
        repaired: &[(&TcpStream, sockopt::Repaired)],
        back: Option<&Rule>,
    ) {
        for key in keys {
            match back {
                Some(rule) => {
                    if let Err(e) = self.maps().set_rule(key, rule) {
                        warn!("putting a hold back: {e}");
                        self.maps().remove_rule(key);
                    }
                }
                None => self.maps().remove_rule(key),
            }
        }
        for (socket, before) in repaired {
            if let Err(e) = before.leave(socket) {
                warn!("a socket stays in repair mode after an undone handoff: {e}");
            }
        }
    }

    /// The relay gives a handed-off connection its sockets and record: they stay
    /// until the flow ends.
    pub fn adopt(
        &self,
        ticket: Ticket,
        sockets: [std::net::TcpStream; 2],
        mut ending: Ending,
        copied_before: [u64; 2],
        timeouts: Timeouts,
    ) {
        ending.carried_on(Path::Forwarded);
        let now = Instant::now();
        let forwarded = Forwarded {
            keys: ticket.keys,
            next_seq: ticket.next_seq,
            _sockets: sockets,
            ending: Some(ending),
            copied_before,
            timeouts,
            handed_off: now,
            check_at: now + timeouts.idle,
            lingers_until: None,
        };
        let mut flows = self.lock();
        let Some(slot) = flows.get_mut(ticket.slot) else {
            return;
        };
        let reported = match slot {
            Slot::Reserved(reported) => *reported,
            Slot::Forwarded(_) => None,
        };
        *slot = Slot::Forwarded(forwarded);
        if let Some(kind) = reported {
            self.on_event(&mut flows, ticket.slot, kind, now);
        }
    }

    fn on_event(&self, flows: &mut Slab<Slot>, slot: usize, kind: u32, now: Instant) {
        let forwarded = match flows.get_mut(slot) {
            Some(Slot::Forwarded(forwarded)) => forwarded,
            Some(Slot::Reserved(reported)) => {
                // Keep the end the relay has not seen: a reset or a close wins. A SYN
                // is no end (the client sends it again, to find the flow adopted).
                if *reported != Some(RESET_SEEN) && kind != HALF_CLOSED && kind != REUSED {
                    *reported = Some(kind);
                }
                return;
            }
            None => return,
        };
        match kind {
            HALF_CLOSED => {
                forwarded.check_at = forwarded.check_at.min(now + forwarded.timeouts.half_closed);
            }
            CLOSED if forwarded.lingers_until.is_none() => {
                let progress = self.maps().progress(slot as u32).unwrap_or_default();
                forwarded.log(closed_by(&progress), &progress);
                forwarded.lingers_until = Some(now + LINGER);
            }
            RESET_SEEN => {
                let end = match self.maps().progress(slot as u32) {
                    Ok(progress) if progress.direction[DOWN as usize].flags & RESET != 0 => {
                        End::ServerReset
                    }
                    _ => End::ClientReset,
                };
                self.finish(flows, slot, end, false);
            }
            // Only a closed flow gives its addresses up: a SYN cannot end a live one
            // (as a socket answers a SYN on a live connection with an ACK, RFC 5961),
            // or anyone who guessed a client's port could.
            REUSED if forwarded.lingers_until.is_some() => {
                self.finish(flows, slot, End::ClientClosed, false);
            }
            _ => {}
        }
    }

    /// Ends lingering flows whose time has come, and flows past their timeouts.
    fn sweep(&self, now: Instant) {
        let mut flows = self.lock();
        let due: Vec<usize> = flows
            .iter()
            .filter_map(|(slot, entry)| match entry {
                Slot::Forwarded(f) if f.lingers_until.is_some_and(|at| at <= now) => Some(slot),
                Slot::Forwarded(f) if f.check_at <= now => Some(slot),
                _ => None,
            })
            .collect();
        for slot in due {
            self.check(&mut flows, slot, now);
        }
    }

    fn check(&self, flows: &mut Slab<Slot>, slot: usize, now: Instant) {
        let Some(Slot::Forwarded(forwarded)) = flows.get_mut(slot) else {
            return;
        };
        if let Some(at) = forwarded.lingers_until {
            if at <= now {
                self.finish(flows, slot, End::ClientClosed, false);
            }
            return;
        }
        let Ok(progress) = self.maps().progress(slot as u32) else {
            return self.finish(flows, slot, End::ServerReset, true);
        };
        let [up, down] = progress.direction;
        // An end the ring could not report.
        if (up.flags | down.flags) & RESET != 0 {
            let end = if down.flags & RESET != 0 {
                End::ServerReset
            } else {
                End::ClientReset
            };
            return self.finish(flows, slot, end, false);
        }
        if up.flags & down.flags & FIN_ACKED != 0 {
            forwarded.log(closed_by(&progress), &progress);
            forwarded.lingers_until = Some(now + LINGER);
            return;
        }
        let half_closed = (up.flags | down.flags) & FIN_SEEN != 0;
        let limit = if half_closed {
            forwarded.timeouts.half_closed
        } else {
            forwarded.timeouts.idle
        };
        let last_ns = up.last_ns.max(down.last_ns);
        let since_handoff = now.duration_since(forwarded.handed_off);
        let idle = if last_ns == 0 {
            since_handoff
        } else {
            Duration::from_nanos(monotonic_ns().saturating_sub(last_ns)).min(since_handoff)
        };
        if idle >= limit {
            let end = if half_closed {
                End::HalfClosedTimeout
            } else {
                End::IdleTimeout
            };
            return self.finish(flows, slot, end, true);
        }
        forwarded.check_at = now + (limit - idle);
    }

    /// Removes the flow's rules, resets its peers if asked, closes its sockets and
    /// logs it (unless it was logged when it closed).
    fn finish(&self, flows: &mut Slab<Slot>, slot: usize, end: End, reset_peers: bool) {
        let Some(Slot::Forwarded(mut forwarded)) = flows.try_remove(slot) else {
            return;
        };
        for key in &forwarded.keys {
            self.maps().remove_rule(key);
        }
        let progress = self.maps().progress(slot as u32).unwrap_or_default();
        if reset_peers && let Some(raw) = &self.raw {
            raw.reset_both(&forwarded.keys, forwarded.next_seq, &progress);
        }
        forwarded.log(end, &progress);
    }

    /// Resets and forgets every forwarded flow: kgate is exiting.
    pub fn close_all(&self) {
        let mut flows = self.lock();
        let slots: Vec<usize> = flows.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            if let Some(Slot::Forwarded(forwarded)) = flows.try_remove(slot) {
                for key in &forwarded.keys {
                    self.maps().remove_rule(key);
                }
                if let Some(raw) = &self.raw {
                    let progress = self.maps().progress(slot as u32).unwrap_or_default();
                    raw.reset_both(&forwarded.keys, forwarded.next_seq, &progress);
                }
            }
        }
    }

    /// Whether each peer is reached through an interface the programs are attached
    /// to: its segments come in there (routes are taken to be symmetric), and only
    /// there are they forwarded. Not so for an interface that came after kgate.
    fn routed_through_attached(
        &self,
        peers: &[SocketAddr; 2],
        locals: &[SocketAddr; 2],
    ) -> io::Result<bool> {
        let Some(routes) = &self.routes else {
            return Ok(false);
        };
        let mut routes = routes.lock().unwrap_or_else(|p| p.into_inner());
        for (peer, local) in peers.iter().zip(locals) {
            match routes.egress(local.ip(), peer.ip()) {
                Ok(Some(index)) if self.attached.contains(&index) => {}
                Ok(_) => return Ok(false),
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("looking up the route to {}: {e}", peer.ip()),
                    ));
                }
            }
        }
        Ok(true)
    }

    /// Whether `ip` is one of this host's addresses (or loopback), as of at most a
    /// second ago.
    fn local_addresses_contain(&self, ip: IpAddr) -> bool {
        let ip = interfaces::unmapped(ip);
        if ip.is_loopback() {
            return true;
        }
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local.refresh();
        local.addresses.contains(&ip)
    }
}

impl Forwarded {
    /// Logs the connection (once) with the bytes kgate copied and those the programs
    /// forwarded, and gives its slots back.
    fn log(&mut self, end: End, progress: &Progress) {
        if let Some(ending) = self.ending.take() {
            ending.relayed(Transfer {
                from_client: self.copied_before[0] + progress.direction[UP as usize].bytes,
                from_server: self.copied_before[1] + progress.direction[DOWN as usize].bytes,
                end,
                path: Path::Forwarded,
            });
        }
    }
}

/// Why the two connections cannot be translated into each other, if they cannot.
fn mismatch(shapes: &[TcpShape; 2]) -> Option<Fallback> {
    let [client, server] = shapes;
    if client.timestamps != server.timestamps {
        return Some(Fallback::Timestamps);
    }
    // A segment from one side may be as large as the MSS the gateway announced to that
    // side; the other side must take it whole.
    let options = if client.timestamps {
        TIMESTAMP_BYTES
    } else {
        0
    };
    let fits =
        |from: &TcpShape, to: &TcpShape| from.announced_mss.saturating_sub(options) <= to.send_mss;
    if !fits(client, server) || !fits(server, client) {
        return Some(Fallback::Mss);
    }
    None
}

/// Whether every byte either peer sent is with the other, acknowledged, and nothing
/// more is on its way through the gateway.
fn quiet(client: &TcpStream, server: &TcpStream) -> io::Result<bool> {
    for socket in [client, server] {
        let fd = socket.as_fd();
        if sockopt::unread_bytes(fd)? != 0
            || sockopt::send_queue(fd)?.unacked != 0
            || !sockopt::tcp_shape(fd)?.established
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// How a flow closed: by whichever side sent its FIN first.
fn closed_by(progress: &Progress) -> End {
    let [up, down] = progress.direction;
    if up.fin_ns != 0 && (down.fin_ns == 0 || up.fin_ns <= down.fin_ns) {
        End::ClientClosed
    } else {
        End::ServerClosed
    }
}

/// The key of segments from `from` to `to`.
fn key(from: SocketAddr, to: SocketAddr) -> FlowKey {
    FlowKey {
        source: mapped(from.ip()),
        destination: mapped(to.ip()),
        source_port: u16::from_ne_bytes(from.port().to_be_bytes()),
        destination_port: u16::from_ne_bytes(to.port().to_be_bytes()),
    }
}

/// IPv4 addresses as IPv4-mapped IPv6 ones, as the programs see them.
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// CLOCK_MONOTONIC, as `bpf_ktime_get_ns()` reads it.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// This host's addresses, read again when older than a second.
#[derive(Default)]
struct LocalAddresses {
    addresses: HashSet<IpAddr>,
    read_at: Option<Instant>,
}

impl LocalAddresses {
    fn refresh(&mut self) {
        if self
            .read_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        match interfaces::addresses() {
            Ok(addresses) => self.addresses = addresses,
            Err(e) => warn!("listing this host's addresses: {e}"),
        }
        self.read_at = Some(Instant::now());
    }
}

/// Watches the flows' ends and timeouts for as long as the daemon runs.
async fn watch(packet: Arc<Packet>, mut events: PacketEvents) {
    let mut ticks = Ticks::new(&packet);
    loop {
        tokio::select! {
            read = events.next(|Event { flow, kind }| {
                let mut flows = packet.lock();
                packet.on_event(&mut flows, flow as usize, kind, Instant::now());
            }) => {
                if let Err(e) = read {
                    warn!("reading the packet data plane's events: {e}; ends are found by the sweep");
                    loop {
                        ticks.next(&packet).await;
                    }
                }
            }
            () = ticks.next(&packet) => {}
        }
    }
}

/// The watcher's timers: the sweep of the flows' timeouts and lingering ends, and the
/// trim of the memory of the tasks that handed-off connections ended (see `trim`),
/// looked at as often as the sockmap plane's parking does.
struct Ticks {
    sweep: tokio::time::Interval,
    trim_check: tokio::time::Interval,
    trim: Trim,
    /// Connections handed off when the trim last looked.
    handed_off: u64,
}

impl Ticks {
    fn new(packet: &Packet) -> Ticks {
        let interval = |period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        };
        Ticks {
            sweep: interval(SWEEP),
            trim_check: interval(TRIM_CHECK),
            trim: Trim::new(),
            handed_off: packet.handed_off(),
        }
    }

    /// Waits for the next timer and does what it is for.
    async fn next(&mut self, packet: &Packet) {
        tokio::select! {
            _ = self.sweep.tick() => packet.sweep(Instant::now()),
            now = self.trim_check.tick() => {
                let handed_off = packet.handed_off();
                let since = handed_off.saturating_sub(self.handed_off);
                self.handed_off = handed_off;
                self.trim.on_sweep(since as usize, now);
            }
        }
    }
}
