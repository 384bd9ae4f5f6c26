//! What kgate's eBPF programs and its daemon must agree on: map and program names,
//! capacities, and the `#[repr(C)]` values stored in maps.
#![no_std]

use bytemuck::{Pod, Zeroable};

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

    pub const PEERS_PIN: &str = "peers";
    pub const SPLICED_PIN: &str = "spliced";
    pub const SPLICE_STATS_PIN: &str = "splice_stats";
}

/// Names of the eBPF programs in the object file.
pub mod programs {
    pub const SPLICE: &str = "kgate_splice";
}

/// Sockets each sock hash can hold: two per spliced connection.
pub const MAX_SPLICED_SOCKETS: usize = 131_072;

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
            })
    }
}

#[cfg(feature = "user")]
// SAFETY: `SpliceStats` is `repr(C)`, made only of `u64`s, with no padding.
unsafe impl aya::Pod for SpliceStats {}
