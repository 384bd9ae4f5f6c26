//! The packet data plane: once a connection is handed off, TC programs forward every
//! segment between the client and the server, rewritten from one TCP connection into
//! the other (proxy-user/src/dataplane/packet.rs tells the handoff).
//!
//! A flow is one proxied connection: the client's connection to the gateway (A) and
//! the gateway's connection to the server (B). Each has a [`Rule`] in [`maps::RULES`],
//! keyed by the addresses and ports of its segments as they arrive at the gateway
//! ([`FlowKey`]): [`UP`] for segments from the client, [`DOWN`] for those from the
//! server. Both share the flow's [`Progress`] (an array slot), which only the programs
//! write.

use bytemuck::{Pod, Zeroable};

/// Names of the maps as the kernel knows them, and as they are pinned.
pub mod maps {
    /// [`FlowKey`](super::FlowKey) -> [`Rule`](super::Rule), written by userspace.
    pub const RULES: &str = "KGATE_PKT_RULES";
    /// Flow slot -> [`Progress`](super::Progress), written by the programs.
    pub const PROGRESS: &str = "KGATE_PKT_PROG";
    /// Ring buffer of [`Event`](super::Event)s: a flow closed or was reset.
    pub const EVENTS: &str = "KGATE_PKT_EVENTS";
    /// Per-CPU [`PacketStats`](super::PacketStats), one slot.
    pub const STATS: &str = "KGATE_PKT_STATS";

    pub const RULES_PIN: &str = "packet_rules";
    pub const PROGRESS_PIN: &str = "packet_progress";
    pub const STATS_PIN: &str = "packet_stats";
}

/// Names of the TC programs in the object file.
pub mod programs {
    /// Ingress: forwards the segments of handed-off connections.
    pub const INGRESS: &str = "kgate_pkt_ingress";
    /// Egress: keeps the gateway's own sockets of those connections silent.
    pub const EGRESS: &str = "kgate_pkt_egress";
}

/// Connections forwarded at once; two rules each.
pub const MAX_PACKET_FLOWS: usize = 65_536;

/// Bytes of the event ring: 8,192 events before userspace must have read one.
pub const EVENT_RING_BYTES: usize = 128 * 1024;

/// [`Rule::direction`]: segments from the client, for the server.
pub const UP: u8 = 0;
/// [`Rule::direction`]: segments from the server, for the client.
pub const DOWN: u8 = 1;

/// [`Rule::state`]: the handoff is under way; segments are dropped (their senders
/// send them again) so that the sockets' state cannot change while it is read.
pub const FREEZE: u8 = 1;
/// [`Rule::state`]: segments are rewritten and forwarded.
pub const FORWARD: u8 = 2;
/// [`Rule::state`]: before a handoff of a busy connection, the gateway's own sockets
/// of the flow announce a zero window (the egress program closes it in every segment
/// they send): their peers stop sending new data, what is in flight arrives, and the
/// sockets drain and get quiet. Nothing is dropped: the peers' ACKs, which ride on
/// their data, keep flowing. The handoff then opens the windows again (segments
/// kgate writes, marked [`INJECTED_MARK`]).
pub const HOLD: u8 = 3;

/// `skb->mark` of the segments kgate writes itself through raw sockets (resets,
/// window updates): the egress program lets them out even for a flow whose own
/// sockets it silences.
pub const INJECTED_MARK: u32 = 0x6b67_6174;

/// [`Rule::flags`]: both connections carry TCP timestamps.
pub const TIMESTAMPS: u8 = 1;

/// The addresses and ports of a segment as it arrives at the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    /// IPv4 addresses as IPv4-mapped IPv6 addresses.
    pub source: [u8; 16],
    pub destination: [u8; 16],
    /// In network byte order, as in the segment.
    pub source_port: u16,
    pub destination_port: u16,
}

/// How one direction of a flow is rewritten. Sequence numbers are added to with
/// wrapping arithmetic; the deltas are those between the two connections' sequence
/// spaces, read from the sockets at the handoff.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Rule {
    /// What the segment's addresses and ports become.
    pub new_key: FlowKey,
    /// [`FREEZE`] or [`FORWARD`].
    pub state: u8,
    /// [`UP`] or [`DOWN`].
    pub direction: u8,
    /// 1 for IPv6 (both connections of a flow are of the same family).
    pub is_v6: u8,
    /// [`TIMESTAMPS`].
    pub flags: u8,
    /// The flow's slot in [`maps::PROGRESS`].
    pub flow: u32,
    /// Added to the sequence number.
    pub seq_delta: u32,
    /// Added to the acknowledgement number and to SACK block edges.
    pub ack_delta: u32,
    /// The receiving connection's timestamp clock (ms) at the handoff, as its socket
    /// on the gateway announced it: timestamps from the sender are moved onto it.
    pub ts_clock_at_handoff: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the handoff.
    pub handoff_ns: u64,
    /// The sequence number (as it arrives) of the first byte forwarded: the sending
    /// side's socket's `rcv_nxt` at the handoff. Bytes are counted from it.
    pub base_seq: u32,
    /// The server's slot in the `servers` maps, where bytes are counted.
    pub server_slot: u32,
    /// The frontend's slot in the frontends' byte counters.
    pub frontend_slot: u32,
    /// The window in a segment is shifted left by `window_shift_in` (the sender's
    /// window scale), then right by `window_shift_out` (the scale the gateway announced
    /// to the receiver).
    pub window_shift_in: u8,
    pub window_shift_out: u8,
    pub _pad: [u8; 6],
    /// While [`HOLD`]: the last segment the gateway's own socket sent to this rule's
    /// sender, as it was before the egress program closed its window (written by that
    /// program). Userspace sends it again, window open, when the hold ends without a
    /// handoff: the peer may have nothing else coming to learn the window from.
    pub held_last_sent: LastSent,
}

/// A segment's sequence state, as [`Rule::held_last_sent`] keeps it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct LastSent {
    /// The sequence number past the segment (its payload and FIN).
    pub seq_end: u32,
    pub ack: u32,
    pub tsval: u32,
    pub tsecr: u32,
    /// As in the segment (the sender's scale applies).
    pub window: u16,
    /// 1 when the segment was seen (the fields above are set).
    pub seen: u8,
    /// 1 when the segment carried timestamps.
    pub timestamps: u8,
}

/// [`DirectionProgress::flags`]: the direction's FIN was forwarded.
pub const FIN_SEEN: u32 = 1;
/// [`DirectionProgress::flags`]: the receiver acknowledged that FIN.
pub const FIN_ACKED: u32 = 2;
/// [`DirectionProgress::flags`]: the direction's sender reset the connection.
pub const RESET: u32 = 4;
/// [`DirectionProgress::flags`]: [`DirectionProgress::tsval_delta`] is known.
pub const TS_KNOWN: u32 = 8;

/// What the programs saw of one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct DirectionProgress {
    /// Payload bytes forwarded past [`Rule::base_seq`] (retransmissions count once).
    pub bytes: u64,
    pub segments: u64,
    /// `bpf_ktime_get_ns()` of the last segment forwarded.
    pub last_ns: u64,
    /// `bpf_ktime_get_ns()` when this direction's FIN was first forwarded (0 before).
    pub fin_ns: u64,
    /// Added to the sender's timestamps; learnt from the first one forwarded.
    pub tsval_delta: u32,
    /// Sequence number (as the receiver sees it) just past this direction's FIN.
    pub fin_end: u32,
    /// [`FIN_SEEN`], [`FIN_ACKED`], [`RESET`], [`TS_KNOWN`].
    pub flags: u32,
    pub _pad: u32,
}

/// Both directions of a flow, [`UP`] first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Progress {
    pub direction: [DirectionProgress; 2],
}

/// [`Event::kind`]: both FINs were forwarded and acknowledged.
pub const CLOSED: u32 = 1;
/// [`Event::kind`]: a RST was forwarded.
pub const RESET_SEEN: u32 = 2;
/// [`Event::kind`]: the first FIN of the flow was forwarded (its half-closed timeout
/// starts).
pub const HALF_CLOSED: u32 = 3;
/// [`Event::kind`]: a SYN came on the flow's addresses (and was dropped): the client
/// made a new connection from the same port, so the old one is over for it.
pub const REUSED: u32 = 4;

/// A flow's end, as the programs report it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Event {
    pub flow: u32,
    pub kind: u32,
}

/// Counters kept by the packet programs, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PacketStats {
    /// Segments rewritten and redirected.
    pub forwarded_segments: u64,
    /// Their payload bytes (retransmissions too).
    pub forwarded_bytes: u64,
    /// Segments dropped during a handoff (their senders send them again).
    pub frozen_drops: u64,
    /// Segments of the gateway's own sockets whose window was closed while a busy
    /// connection was held before its handoff.
    pub held_windows: u64,
    /// Segments of the gateway's own sockets of a forwarded flow, dropped at egress.
    pub silenced: u64,
    /// Segments of a forwarded flow with no route to their new destination (dropped).
    pub no_route: u64,
    /// Segments of a forwarded flow whose headers could not be read or rewritten
    /// (dropped: they must not reach a socket that no longer follows the connection).
    pub malformed: u64,
    /// Events that did not fit in the ring (userspace finds the flow by its timeout).
    pub events_lost: u64,
}

impl PacketStats {
    /// Sums the per-CPU slots of the map.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a PacketStats>) -> PacketStats {
        per_cpu
            .into_iter()
            .fold(PacketStats::default(), |acc, s| PacketStats {
                forwarded_segments: acc.forwarded_segments + s.forwarded_segments,
                forwarded_bytes: acc.forwarded_bytes + s.forwarded_bytes,
                frozen_drops: acc.frozen_drops + s.frozen_drops,
                held_windows: acc.held_windows + s.held_windows,
                silenced: acc.silenced + s.silenced,
                no_route: acc.no_route + s.no_route,
                malformed: acc.malformed + s.malformed,
                events_lost: acc.events_lost + s.events_lost,
            })
    }
}

/// The window a segment announces once moved from the sender's scale to the scale the
/// gateway announced to the receiver: never more than the field holds.
pub fn translate_window(window: u16, shift_in: u8, shift_out: u8) -> u16 {
    let bytes = u32::from(window) << (shift_in & 15);
    let scaled = bytes >> (shift_out & 15);
    scaled.min(u32::from(u16::MAX)) as u16
}

/// Moves `bytes` forward by the serial-number distance from `counted_end` (the end
/// counted so far, as a sequence number) to `seq_end`, when that is ahead. Returns the
/// new end: retransmitted and reordered segments add nothing.
pub fn advance(bytes: &mut u64, counted_end: u32, seq_end: u32) -> u32 {
    let ahead = seq_end.wrapping_sub(counted_end) as i32;
    if ahead > 0 {
        *bytes += ahead as u64;
        seq_end
    } else {
        counted_end
    }
}

// SAFETY: each is `repr(C)` plain data with no implicit padding (bytemuck's Pod
// derive checks that).
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Rule {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Progress {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PacketStats {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_move_between_scales_and_saturate() {
        assert_eq!(translate_window(1000, 7, 7), 1000);
        assert_eq!(translate_window(1000, 9, 7), 4000);
        assert_eq!(translate_window(1000, 7, 9), 250);
        assert_eq!(
            translate_window(40000, 10, 2),
            u16::MAX,
            "too wide: saturates"
        );
        assert_eq!(translate_window(0, 14, 0), 0);
    }

    #[test]
    fn bytes_advance_only_past_the_counted_end_across_the_wrap() {
        let mut bytes = 0;
        let end = advance(&mut bytes, u32::MAX - 99, 100);
        assert_eq!((bytes, end), (200, 100));
        let end = advance(&mut bytes, end, 50);
        assert_eq!((bytes, end), (200, 100), "a retransmission adds nothing");
        let end = advance(&mut bytes, end, 1100);
        assert_eq!((bytes, end), (1200, 1100));
    }
}
