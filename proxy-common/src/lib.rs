//! What kgate's eBPF programs and its daemon must agree on: map and program names,
//! capacities, and the `#[repr(C)]` values stored in maps.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// XDP early drop (blocklists, SYN rate limits): its own names, types and capacities.
pub mod xdp;

/// The packet data plane (TC forwarding of handed-off connections): its own names,
/// types and capacities.
pub mod packet;

/// Names of the maps as the kernel knows them (at most 15 bytes) and as they are
/// pinned under `bpf_pin_path`.
pub mod maps {
    /// `PEERS[cookie(x)]` = the peer socket of `x`. No program is attached to it: it
    /// is only the redirect target table.
    pub const PEERS: &str = "KGATE_PEERS";
    /// `SPLICED[cookie(x)]` = `x`. The stream verdict program is attached here, so
    /// membership means "the bytes `x` receives are spliced to its peer".
    pub const SPLICED: &str = "KGATE_SPLICED";
    /// Per-CPU [`SpliceStats`](crate::SpliceStats), one slot.
    pub const SPLICE_STATS: &str = "KGATE_SPL_STATS";

    /// `FLOWS[cookie(x)]` = [`FlowCounters`](crate::FlowCounters) of the bytes `x` received.
    pub const FLOWS: &str = "KGATE_FLOWS";
    /// `GRANTS[cookie(x)]` = [`FlowGrant`](crate::FlowGrant): how far `x` may be spliced.
    pub const GRANTS: &str = "KGATE_GRANTS";
    /// Ring buffer of socket cookies (`u64`) whose grant is half used
    /// ([`FlowGrant::notify_at`](crate::FlowGrant::notify_at)); not pinned.
    pub const GRANT_REQUESTS: &str = "KGATE_GRANT_REQ";

    /// `SERVERS[slot]` = [`ServerEntry`](crate::ServerEntry): a hash of the live servers,
    /// created and written by userspace for bpftool (no program reads it).
    pub const SERVERS: &str = "KGATE_SERVERS";
    /// Per CPU, `SERVER_BYTES[slot]` = [`ByteCounts`](crate::ByteCounts) the programs
    /// moved for the server in `slot` (spliced or forwarded).
    pub const SERVER_BYTES: &str = "KGATE_SRV_BYTES";
    /// Per CPU, `FRONTEND_BYTES[slot]` = [`ByteCounts`](crate::ByteCounts) the programs
    /// moved for the frontend in `slot`.
    pub const FRONTEND_BYTES: &str = "KGATE_FE_BYTES";

    pub const PEERS_PIN: &str = "peers";
    pub const SERVERS_PIN: &str = "servers";
    pub const SERVER_BYTES_PIN: &str = "server_bytes";
    pub const FRONTEND_BYTES_PIN: &str = "frontend_bytes";
    pub const FLOWS_PIN: &str = "flows";
    pub const GRANTS_PIN: &str = "grants";
    pub const SPLICED_PIN: &str = "spliced";
    pub const SPLICE_STATS_PIN: &str = "splice_stats";
}

/// Names of the eBPF programs in the object file.
pub mod programs {
    pub const SPLICE: &str = "kgate_splice";
    /// The splice program's global `u32`: the byte offset of `copied_seq` in the
    /// kernel's `struct tcp_sock`, set by userspace from the kernel's BTF at load (0
    /// when unknown). It tells the program where a socket's stream stands when its first
    /// skb comes: how far userspace read before the socket joined the splice.
    pub const COPIED_SEQ_OFFSET: &str = "KGATE_COPIED_SEQ_AT";
}

/// Bytes of the grant request ring: 4,096 requests (8 bytes and an 8-byte header each)
/// before userspace must have read one. A power of two and a multiple of the page.
pub const GRANT_REQUEST_RING_BYTES: usize = 64 * 1024;

/// Sockets each sock hash can hold: two per spliced connection.
pub const MAX_SPLICED_SOCKETS: usize = 131_072;

/// Servers kgate can publish, all backends together.
pub const MAX_SERVERS: usize = 1024;

/// Frontends whose bytes the programs can count.
pub const MAX_FRONTENDS: usize = 256;

/// Text fields of [`ServerEntry`]: NUL-padded, described as `char` arrays in the
/// map's BTF, so bpftool shows them as strings.
pub const NAME_LEN: usize = 32;

/// What the verdict program did with the bytes one spliced socket received. Written
/// only by the program (one socket's skbs are handled one at a time), read by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowCounters {
    /// Bytes redirected to the peer socket.
    pub redirected: u64,
    /// Bytes passed to the socket's own receive queue, for userspace to forward.
    pub passed: u64,
    /// Bytes cut off the head of skbs because the program had handled them already
    /// (see [`FlowCounters::overlap`]).
    pub trimmed: u64,
    /// Bytes dropped because their repeated head could not be cut off: the stream
    /// has a hole, and userspace resets the connection.
    pub lost: u64,
    /// The [`FlowGrant::notify_at`] the program last asked userspace about.
    pub notified: u64,
    /// TCP sequence number just past the last byte the program handled.
    pub next_seq: u32,
    /// 1 once `next_seq` holds a sequence number (0 before the socket's first skb).
    pub seq_known: u32,
}

impl FlowCounters {
    /// How many bytes at the head of an skb holding `len` bytes from sequence number
    /// `seq` on were in an earlier skb already.
    ///
    /// TCP queues a retransmitted segment that partly overlaps bytes it already has
    /// (and moves such segments from its out-of-order queue) without cutting the
    /// overlap off: `recvmsg` skips it by sequence number, but the kernel hands a
    /// stream verdict program whole skbs (`tcp_read_skb`). Forwarded as they are, the
    /// overlapping bytes would reach the peer twice.
    pub fn overlap(&self, seq: u32, len: u32) -> u32 {
        if self.seq_known == 0 {
            return 0;
        }
        // Serial-number arithmetic: positive when `seq` is before `next_seq`.
        let behind = self.next_seq.wrapping_sub(seq) as i32;
        if behind <= 0 {
            0
        } else {
            (behind as u32).min(len)
        }
    }

    /// Records that the bytes up to `end_seq` (exclusive) have been handled.
    pub fn handled_up_to(&mut self, end_seq: u32) {
        let ahead = end_seq.wrapping_sub(self.next_seq) as i32;
        if self.seq_known == 0 || ahead > 0 {
            self.next_seq = end_seq;
            self.seq_known = 1;
        }
    }
}

/// How far the verdict program may redirect one socket's bytes. Written only by
/// userspace; the program reads it.
///
/// An skb is redirected when `passed == resume_at_passed` (userspace has taken every
/// passed byte, so nothing redirected can overtake one) and the redirected total stays
/// within `redirect_until` (the per-direction bound on bytes queued in the kernel);
/// otherwise it is passed, held back by TCP flow control until userspace forwards it.
///
/// Once `redirected` reaches `notify_at` the program asks userspace, once, for more
/// (the socket's cookie in `GRANT_REQUESTS`): userspace extends `redirect_until` by
/// what the peer has taken meanwhile, so a direction whose peer keeps up is never
/// held back, and one whose peer does not stops at the bound.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FlowGrant {
    pub redirect_until: u64,
    pub resume_at_passed: u64,
    pub notify_at: u64,
    /// The connection's server: its slot in `SERVERS` and `SERVER_BYTES`.
    pub server_slot: u32,
    /// [`FROM_CLIENT`] or [`FROM_SERVER`]: which way this socket's bytes go.
    pub direction: u32,
    /// The connection's frontend: its slot in `FRONTEND_BYTES`.
    pub frontend_slot: u32,
    pub _pad: u32,
}

/// [`FlowGrant::direction`] of a client socket: its bytes go to the server.
pub const FROM_CLIENT: u32 = 0;
/// [`FlowGrant::direction`] of a server socket.
pub const FROM_SERVER: u32 = 1;

/// Bytes the programs moved for one server or frontend, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ByteCounts {
    /// From clients to the server.
    pub bytes_in: u64,
    /// From the server to clients.
    pub bytes_out: u64,
}

/// One server as `kgate status` and `bpftool map dump pinned .../servers` show it.
/// Published by userspace, whole, about once a second and on every state change.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServerEntry {
    pub backend: [u8; NAME_LEN],
    pub server: [u8; NAME_LEN],
    /// "192.0.2.1:25" or "[2001:db8::1]:25".
    pub address: [u8; 48],
    /// "up", "down", "drain", "maint" or "unchecked".
    pub state: [u8; 16],
    /// "ok", "refused", "timeout", "bad reply", "error", or "" before the first check.
    pub last_check: [u8; 16],
    /// Backend index in the configuration.
    pub backend_id: u32,
    pub port: u16,
    pub _pad: [u8; 2],
    pub consecutive_ok: u32,
    pub consecutive_fail: u32,
    pub active_connections: u64,
    pub total_connections: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Default for ServerEntry {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}

impl FlowGrant {
    /// Whether an skb of `len` bytes may be redirected.
    pub fn allows(&self, counters: &FlowCounters, len: u64) -> bool {
        counters.passed == self.resume_at_passed && counters.redirected + len <= self.redirect_until
    }

    /// Whether the program should ask for more now (and then records that it did).
    pub fn wants_more(&self, counters: &mut FlowCounters) -> bool {
        if counters.redirected < self.notify_at || counters.notified == self.notify_at {
            return false;
        }
        counters.notified = self.notify_at;
        true
    }
}

/// Counters kept by the stream verdict program, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SpliceStats {
    /// Socket buffers handed to the peer socket.
    pub redirected_skbs: u64,
    /// Bytes handed to the peer socket.
    pub redirected_bytes: u64,
    /// Socket buffers whose socket had no peer in `PEERS` (dropped by the kernel).
    pub redirect_failures: u64,
    /// Bytes passed to userspace because their direction was over its bound.
    pub passed_bytes: u64,
    /// Bytes a retransmission repeated in an skb, cut off before it was handled.
    pub trimmed_bytes: u64,
    /// Skbs whose repeated head could not be cut off; their connection is reset.
    pub trim_failures: u64,
    /// Skbs whose TCP control block did not add up (sequence numbers not checked).
    pub unsequenced_skbs: u64,
    /// Requests for a larger grant that did not fit in the ring.
    pub grant_requests_lost: u64,
    /// Sockets whose reading position the program could not learn (no `copied_seq`
    /// offset, or the read failed): their first skb was taken to start there.
    pub unpositioned_sockets: u64,
}

impl SpliceStats {
    /// Sums the per-CPU slots of the map.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a SpliceStats>) -> SpliceStats {
        per_cpu
            .into_iter()
            .fold(SpliceStats::default(), |acc, s| SpliceStats {
                redirected_skbs: acc.redirected_skbs + s.redirected_skbs,
                redirected_bytes: acc.redirected_bytes + s.redirected_bytes,
                redirect_failures: acc.redirect_failures + s.redirect_failures,
                passed_bytes: acc.passed_bytes + s.passed_bytes,
                trimmed_bytes: acc.trimmed_bytes + s.trimmed_bytes,
                trim_failures: acc.trim_failures + s.trim_failures,
                unpositioned_sockets: acc.unpositioned_sockets + s.unpositioned_sockets,
                unsequenced_skbs: acc.unsequenced_skbs + s.unsequenced_skbs,
                grant_requests_lost: acc.grant_requests_lost + s.grant_requests_lost,
            })
    }
}

// SAFETY: each is `repr(C)` plain data with no implicit padding (bytemuck's Pod
// derive checks that).
#[cfg(feature = "user")]
unsafe impl aya::Pod for SpliceStats {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowCounters {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowGrant {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ByteCounts {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServerEntry {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_redirects_only_within_its_bound_and_after_every_passed_byte() {
        let grant = FlowGrant {
            redirect_until: 100,
            resume_at_passed: 10,
            ..FlowGrant::default()
        };
        let counters = |redirected, passed| FlowCounters {
            redirected,
            passed,
            ..FlowCounters::default()
        };
        assert!(grant.allows(&counters(0, 10), 100));
        assert!(!grant.allows(&counters(1, 10), 100), "over the bound");
        assert!(
            !grant.allows(&counters(0, 11), 1),
            "a passed byte not yet taken"
        );
        assert!(
            !grant.allows(&counters(0, 9), 1),
            "passed bytes of an older grant"
        );
    }

    #[test]
    fn the_program_asks_for_more_once_per_grant() {
        let grant = FlowGrant {
            redirect_until: 100,
            notify_at: 50,
            ..FlowGrant::default()
        };
        let mut counters = FlowCounters {
            redirected: 49,
            ..FlowCounters::default()
        };
        assert!(!grant.wants_more(&mut counters), "not halfway yet");
        counters.redirected = 60;
        assert!(grant.wants_more(&mut counters));
        counters.redirected = 70;
        assert!(!grant.wants_more(&mut counters), "asked already");
        let extended = FlowGrant {
            redirect_until: 160,
            notify_at: 110,
            ..grant
        };
        counters.redirected = 110;
        assert!(
            extended.wants_more(&mut counters),
            "a new grant, a new request"
        );
    }

    #[test]
    fn only_bytes_before_the_next_sequence_number_overlap() {
        let mut flow = FlowCounters::default();
        assert_eq!(flow.overlap(1000, 100), 0, "nothing seen yet");
        flow.handled_up_to(1100);
        assert_eq!(flow.overlap(1100, 100), 0, "the next bytes");
        assert_eq!(
            flow.overlap(1050, 100),
            50,
            "a retransmission half repeated"
        );
        assert_eq!(flow.overlap(900, 100), 100, "all of it repeated");
        assert_eq!(flow.overlap(1200, 100), 0, "after a gap (not expected)");
        flow.handled_up_to(1150);
        assert_eq!(flow.next_seq, 1150);
        flow.handled_up_to(1120);
        assert_eq!(flow.next_seq, 1150, "never moves back");
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let mut flow = FlowCounters::default();
        flow.handled_up_to(u32::MAX - 9);
        assert_eq!(flow.overlap(u32::MAX - 19, 100), 10);
        flow.handled_up_to(20);
        assert_eq!(flow.next_seq, 20, "past the wrap is ahead");
        assert_eq!(flow.overlap(10, 100), 10);
        assert_eq!(flow.overlap(u32::MAX - 4, 10), 10);
    }
}
