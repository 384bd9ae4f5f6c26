//! XDP early drop: what the `kgate_xdp` program and the daemon share.
//!
//! The program drops TCP packets addressed to one of kgate's frontends (an address and
//! port in [`maps::FRONTENDS`]) when their source is in a blocklist, or when they are a
//! SYN over their source's rate limit. Everything else passes. The decisions that do
//! not need the packet ([`BlockEntry::applies_at`], [`SynBucket::take`]) live here so
//! that they are tested on the host.

use bytemuck::{Pod, Zeroable};

/// Names of the maps as the kernel knows them (at most 15 bytes), and their pins
/// under `bpf_pin_path`.
pub mod maps {
    /// LPM trie: IPv4 source prefix -> [`BlockEntry`](super::BlockEntry).
    pub const BLOCKLIST_V4: &str = "KGATE_BLOCK_V4";
    /// LPM trie: IPv6 source prefix -> [`BlockEntry`](super::BlockEntry).
    pub const BLOCKLIST_V6: &str = "KGATE_BLOCK_V6";
    /// Hash: [`FrontendKey`](super::FrontendKey) -> frontend index in the config.
    pub const FRONTENDS: &str = "KGATE_XDP_FRONT";
    /// LRU hash: [`SynSource`](super::SynSource) -> [`SynBucket`](super::SynBucket).
    pub const SYN_RATE: &str = "KGATE_SYN_RATE";
    /// Array, one slot: [`XdpConfig`](super::XdpConfig).
    pub const CONFIG: &str = "KGATE_XDP_CONF";
    /// Per-CPU array, one slot: [`XdpStats`](super::XdpStats).
    pub const STATS: &str = "KGATE_XDP_STATS";

    /// Kept when kgate exits and reused when it starts: see proxy-user/src/xdp/mod.rs.
    pub const BLOCKLIST_V4_PIN: &str = "blocklist_v4";
    pub const BLOCKLIST_V6_PIN: &str = "blocklist_v6";
    pub const FRONTENDS_PIN: &str = "xdp_frontends";
    pub const SYN_RATE_PIN: &str = "syn_rate";
    pub const CONFIG_PIN: &str = "xdp_config";
    pub const STATS_PIN: &str = "xdp_stats";
}

/// The name of the XDP program in the object file.
pub const PROGRAM: &str = "kgate_xdp";

/// Prefixes each blocklist (IPv4, IPv6) can hold.
pub const MAX_BLOCKED_PREFIXES: usize = 262_144;
/// Frontend addresses (address and port pairs), all frontends together.
pub const MAX_FRONTEND_ADDRESSES: usize = 1024;
/// Sources whose SYN rate is tracked; the least recently seen are forgotten first.
pub const MAX_SYN_SOURCES: usize = 65_536;
/// Highest `syn_rate` and `syn_burst` accepted: keeps [`SynBucket`] arithmetic far
/// from overflow.
pub const MAX_SYN_RATE: u32 = 1_000_000;

/// Credit one SYN costs in a [`SynBucket`]: credit is counted in SYN-nanoseconds, so a
/// rate of `r` SYNs per second adds `r` credit per nanosecond.
pub const SYN_COST: u64 = 1_000_000_000;

/// IPv6 sources share a rate limit per /64: a host usually holds a whole /64.
pub const SYN_RATE_V6_PREFIX: u32 = 64;

/// [`BlockEntry::origin`]: listed in the configured blocklist file.
pub const ORIGIN_FILE: u8 = 1;
/// [`BlockEntry::origin`]: added with `kgate block add`.
pub const ORIGIN_COMMAND: u8 = 2;
/// [`BlockEntry::origin`]: a ban decision of CrowdSec's local API (`[crowdsec]`).
pub const ORIGIN_CROWDSEC: u8 = 3;

/// The value of a blocklist entry. The key is the prefix itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BlockEntry {
    /// The `CLOCK_BOOTTIME` second from which the entry no longer applies; 0: never.
    /// The program ignores an expired entry; the daemon removes it later.
    pub expires_at: u32,
    /// The entry's own prefix length, so that the program can look past an expired
    /// entry for a shorter prefix that still applies.
    pub prefix_len: u8,
    /// [`ORIGIN_FILE`], [`ORIGIN_COMMAND`] or [`ORIGIN_CROWDSEC`].
    pub origin: u8,
    pub _pad: [u8; 2],
}

impl BlockEntry {
    pub const fn new(prefix_len: u8, expires_at: u32, origin: u8) -> BlockEntry {
        BlockEntry {
            expires_at,
            prefix_len,
            origin,
            _pad: [0; 2],
        }
    }

    /// Whether the entry blocks at `now` (`CLOCK_BOOTTIME` seconds).
    #[inline(always)]
    pub fn applies_at(&self, now: u64) -> bool {
        self.expires_at == 0 || now < u64::from(self.expires_at)
    }
}

/// A frontend's address and port, as the program looks them up: IPv4 addresses in
/// their IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), so one map holds both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FrontendKey {
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: u16,
}

impl FrontendKey {
    #[inline(always)]
    pub const fn new(addr: [u8; 16], port: u16) -> FrontendKey {
        FrontendKey {
            addr,
            port,
            _pad: 0,
        }
    }
}

/// `::ffff:a.b.c.d`: how an IPv4 address is written into 16-byte keys.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

/// Whose SYNs share one token bucket: an IPv4 address, or an IPv6 /64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SynSource {
    /// IPv4-mapped for IPv4; the /64 with its host bits cleared for IPv6.
    pub addr: [u8; 16],
}

impl SynSource {
    #[inline(always)]
    pub const fn v4(addr: [u8; 4]) -> SynSource {
        SynSource {
            addr: v4_mapped(addr),
        }
    }

    #[inline(always)]
    pub const fn v6(addr: [u8; 16]) -> SynSource {
        let a = addr;
        SynSource {
            addr: [
                a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        }
    }
}

/// One source's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SynBucket {
    /// Credit in SYN-nanoseconds ([`SYN_COST`] per SYN).
    pub credit: u64,
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) of the last SYN seen.
    pub last_ns: u64,
}

impl SynBucket {
    /// The bucket of a source not seen before: full.
    #[inline(always)]
    pub fn full(now_ns: u64, config: &XdpConfig) -> SynBucket {
        SynBucket {
            credit: u64::from(config.syn_burst) * SYN_COST,
            last_ns: now_ns,
        }
    }

    /// Refills for the time since the last SYN, then takes one SYN's credit. False
    /// when the bucket did not hold enough: the SYN is over the limit.
    ///
    /// No overflow: the time credited is capped at `syn_refill_ns`, so the credit
    /// added is at most `syn_burst * SYN_COST` (both bounded by [`MAX_SYN_RATE`]).
    #[inline(always)]
    pub fn take(&mut self, now_ns: u64, config: &XdpConfig) -> bool {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        let elapsed = if elapsed > config.syn_refill_ns {
            config.syn_refill_ns
        } else {
            elapsed
        };
        let cap = u64::from(config.syn_burst) * SYN_COST;
        let mut credit = self.credit + elapsed * u64::from(config.syn_rate);
        if credit > cap {
            credit = cap;
        }
        self.last_ns = now_ns;
        if credit >= SYN_COST {
            self.credit = credit - SYN_COST;
            true
        } else {
            self.credit = credit;
            false
        }
    }
}

/// Settings the daemon gives the program (one slot of [`maps::CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct XdpConfig {
    /// SYNs per second each source may send to the frontends; 0: no limit.
    pub syn_rate: u32,
    /// SYNs a source may send at once after being quiet.
    pub syn_burst: u32,
    /// Nanoseconds in which an empty bucket fills up (`syn_burst / syn_rate`).
    pub syn_refill_ns: u64,
}

impl XdpConfig {
    /// `rate` SYNs per second with bursts of `burst`, both clamped to
    /// 1..=[`MAX_SYN_RATE`]; `rate` 0 turns the limit off.
    pub const fn syn_limit(rate: u32, burst: u32) -> XdpConfig {
        if rate == 0 {
            return XdpConfig::NO_LIMIT;
        }
        let rate = if rate > MAX_SYN_RATE {
            MAX_SYN_RATE
        } else {
            rate
        };
        let burst = if burst == 0 {
            1
        } else if burst > MAX_SYN_RATE {
            MAX_SYN_RATE
        } else {
            burst
        };
        XdpConfig {
            syn_rate: rate,
            syn_burst: burst,
            syn_refill_ns: (burst as u64 * SYN_COST).div_ceil(rate as u64),
        }
    }

    pub const NO_LIMIT: XdpConfig = XdpConfig {
        syn_rate: 0,
        syn_burst: 0,
        syn_refill_ns: 0,
    };
}

/// Counters kept by the XDP program, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct XdpStats {
    /// Packets passed on to the kernel: everything not dropped.
    pub passed: u64,
    /// Packets to a frontend dropped because their source is in a blocklist.
    pub dropped_blocklist: u64,
    /// SYNs to a frontend dropped because their source was over its rate.
    pub dropped_syn_rate: u64,
    /// Of `passed`: packets whose headers were cut short or inconsistent.
    pub malformed: u64,
    /// Of `dropped_blocklist`, by the origin of the entry that matched, indexed by
    /// [`BlockEntry::origin`]: 1 the blocklist file, 2 `kgate block add`, 3 CrowdSec.
    /// An array, not named fields: the program indexes it with a masked origin, which
    /// the verifier can bound (a `match` compiles to arithmetic it cannot).
    pub dropped_by_origin: [u64; 4],
}

impl XdpStats {
    /// Sums the per-CPU slots of the map.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a XdpStats>) -> XdpStats {
        per_cpu
            .into_iter()
            .fold(XdpStats::default(), |acc, s| XdpStats {
                passed: acc.passed + s.passed,
                dropped_blocklist: acc.dropped_blocklist + s.dropped_blocklist,
                dropped_syn_rate: acc.dropped_syn_rate + s.dropped_syn_rate,
                malformed: acc.malformed + s.malformed,
                dropped_by_origin: core::array::from_fn(|i| {
                    acc.dropped_by_origin[i] + s.dropped_by_origin[i]
                }),
            })
    }

    /// Counts one packet dropped by a blocklist entry of `origin`.
    #[inline(always)]
    pub fn count_blocked(&mut self, origin: u8) {
        self.dropped_blocklist += 1;
        self.dropped_by_origin[usize::from(origin & ORIGIN_MASK)] += 1;
    }

    /// Packets dropped by entries of `origin` ([`ORIGIN_FILE`], ...).
    pub fn dropped_by(&self, origin: u8) -> u64 {
        self.dropped_by_origin[usize::from(origin & ORIGIN_MASK)]
    }
}

/// Origins fit in two bits: [`XdpStats::dropped_by_origin`] has a slot for each.
const ORIGIN_MASK: u8 = 3;

// SAFETY: each is `repr(C)` plain data with no implicit padding (bytemuck's Pod
// derive checks that).
#[cfg(feature = "user")]
unsafe impl aya::Pod for BlockEntry {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FrontendKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SynSource {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for SynBucket {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for XdpStats {}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate() {
        let config = XdpConfig::syn_limit(2, 3);
        let mut bucket = SynBucket::full(0, &config);
        // Three at once, the fourth is over.
        assert!(bucket.take(0, &config));
        assert!(bucket.take(0, &config));
        assert!(bucket.take(0, &config));
        assert!(!bucket.take(0, &config));
        // 2 per second: one more after half a second, not before.
        assert!(!bucket.take(SECOND / 2 - 1, &config));
        assert!(bucket.take(SECOND / 2, &config));
        assert!(!bucket.take(SECOND / 2, &config));
    }

    #[test]
    fn a_quiet_source_gets_its_burst_back_and_no_more() {
        let config = XdpConfig::syn_limit(10, 5);
        let mut bucket = SynBucket::full(0, &config);
        for _ in 0..5 {
            assert!(bucket.take(0, &config));
        }
        assert!(!bucket.take(0, &config));
        // An hour later: five again, not 36,000.
        let later = 3600 * SECOND;
        let passed = (0..100).filter(|_| bucket.take(later, &config)).count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn the_largest_settings_do_not_overflow() {
        let config = XdpConfig::syn_limit(u32::MAX, u32::MAX);
        assert_eq!(config.syn_rate, MAX_SYN_RATE);
        assert_eq!(config.syn_burst, MAX_SYN_RATE);
        let mut bucket = SynBucket::full(0, &config);
        assert!(bucket.take(u64::MAX, &config));
        let slow = XdpConfig::syn_limit(1, MAX_SYN_RATE);
        let mut bucket = SynBucket {
            credit: 0,
            last_ns: 0,
        };
        assert!(bucket.take(u64::MAX, &slow));
        assert_eq!(bucket.credit, u64::from(MAX_SYN_RATE) * SYN_COST - SYN_COST);
    }

    #[test]
    fn a_clock_going_backwards_adds_no_credit() {
        let config = XdpConfig::syn_limit(1, 1);
        let mut bucket = SynBucket::full(10 * SECOND, &config);
        assert!(bucket.take(10 * SECOND, &config));
        assert!(!bucket.take(5 * SECOND, &config));
    }

    #[test]
    fn entries_expire_at_their_second() {
        let forever = BlockEntry::new(32, 0, ORIGIN_FILE);
        assert!(forever.applies_at(u64::MAX));
        let until_100 = BlockEntry::new(24, 100, ORIGIN_COMMAND);
        assert!(until_100.applies_at(99));
        assert!(!until_100.applies_at(100));
    }

    #[test]
    fn blocklist_drops_are_counted_by_origin_and_summed_over_cpus() {
        let mut one = XdpStats::default();
        one.count_blocked(ORIGIN_CROWDSEC);
        one.count_blocked(ORIGIN_FILE);
        let mut two = XdpStats::default();
        two.count_blocked(ORIGIN_CROWDSEC);
        two.count_blocked(ORIGIN_COMMAND);
        let sum = XdpStats::sum([&one, &two]);
        assert_eq!(sum.dropped_blocklist, 4);
        assert_eq!(
            [ORIGIN_FILE, ORIGIN_COMMAND, ORIGIN_CROWDSEC].map(|o| sum.dropped_by(o)),
            [1, 1, 2]
        );
    }

    #[test]
    fn sources_are_v4_addresses_and_v6_slash_64s() {
        assert_eq!(
            SynSource::v4([192, 0, 2, 1]).addr,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1]
        );
        let a = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 2, 9, 9, 9, 9, 9, 9, 9, 9];
        let mut b = a;
        b[15] = 1;
        assert_eq!(SynSource::v6(a), SynSource::v6(b));
        assert_eq!(&SynSource::v6(a).addr[..8], &a[..8]);
        assert_eq!(&SynSource::v6(a).addr[8..], &[0; 8]);
    }
}
