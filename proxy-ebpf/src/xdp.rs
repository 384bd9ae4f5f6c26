//! XDP early drop: blocked sources and SYN floods never reach a socket.
//!
//! Only TCP packets addressed to a frontend (an address and port in `KGATE_XDP_FRONT`,
//! filled by the daemon from its config) are judged: dropped when their source is in
//! a blocklist (`KGATE_BLOCK_V4`/`_V6`, LPM tries), or when they are a SYN over their
//! source's rate (`KGATE_SYN_RATE`, a token bucket per IPv4 address or IPv6 /64).
//! Everything else passes, and so does every packet the program does not fully
//! understand: unknown protocols, non-first fragments, header chains longer than the
//! bounded walks below, and truncated or inconsistent headers (counted as `malformed`).
//!
//! Every packet read goes through [`load`], which checks it against `data_end` first.

use aya_ebpf::{
    bindings::{BPF_ANY, xdp_action},
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    helpers::{bpf_ktime_get_boot_ns, bpf_ktime_get_ns},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use proxy_common::xdp::{
    BlockEntry, FrontendKey, MAX_BLOCKED_PREFIXES, MAX_FRONTEND_ADDRESSES, MAX_SYN_SOURCES,
    SynBucket, SynSource, XdpConfig, XdpStats, v4_mapped,
};

#[btf_map]
static KGATE_BLOCK_V4: LpmTrie<[u8; 4], BlockEntry, MAX_BLOCKED_PREFIXES> = LpmTrie::new();

#[btf_map]
static KGATE_BLOCK_V6: LpmTrie<[u8; 16], BlockEntry, MAX_BLOCKED_PREFIXES> = LpmTrie::new();

#[btf_map]
static KGATE_XDP_FRONT: HashMap<FrontendKey, u32, MAX_FRONTEND_ADDRESSES> = HashMap::new();

#[btf_map]
static KGATE_SYN_RATE: LruHashMap<SynSource, SynBucket, MAX_SYN_SOURCES> = LruHashMap::new();

#[btf_map]
static KGATE_XDP_CONF: Array<XdpConfig, 1> = Array::new();

#[btf_map]
static KGATE_XDP_STATS: PerCpuArray<XdpStats, 1> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_HLEN: usize = 4;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IP_OFFSET_MASK: u16 = 0x1fff;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;

/// IPv6 extension headers walked before giving up (and passing the packet).
const MAX_V6_EXT_HEADERS: usize = 8;
/// No header chain of a packet XDP can see reaches past this (a page).
const MAX_HEADERS_LEN: usize = 4096;
/// Blocklist lookups per packet: the first, and a few more past expired entries.
const MAX_BLOCK_LOOKUPS: usize = 4;

const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Headers cut short or inconsistent: the packet passes, counted as malformed.
struct Malformed;

/// A TCP segment's addresses, as far as the program needs them. Plain fields, all
/// written before use: copying an enum with undefined bytes can make LLVM copy a
/// stale packet pointer byte by byte, which the verifier rejects.
#[derive(Default)]
struct Segment {
    is_v6: bool,
    /// IPv4-mapped for IPv4.
    source: [u8; 16],
    destination: FrontendKey,
    /// False when the datagram ends before the flags (a tiny first fragment).
    has_flags: bool,
    flags: u8,
}

impl Segment {
    fn source_v4(&self) -> [u8; 4] {
        [
            self.source[12],
            self.source[13],
            self.source[14],
            self.source[15],
        ]
    }
}

#[derive(Clone, Copy)]
enum Verdict {
    Pass,
    Malformed,
    /// By an entry of this origin (`BlockEntry::origin`).
    Blocked(u8),
    OverRate,
}

#[xdp]
pub fn kgate_xdp(ctx: XdpContext) -> u32 {
    let mut segment = Segment::default();
    let verdict = match parse(&ctx, &mut segment) {
        Ok(true) => judge(&segment),
        Ok(false) => Verdict::Pass,
        Err(Malformed) => Verdict::Malformed,
    };
    count(verdict);
    match verdict {
        Verdict::Pass | Verdict::Malformed => xdp_action::XDP_PASS,
        Verdict::Blocked(_) | Verdict::OverRate => xdp_action::XDP_DROP,
    }
}

fn judge(segment: &Segment) -> Verdict {
    if !is_frontend(segment) {
        return Verdict::Pass;
    }
    if let Some(origin) = blocked_by(segment) {
        return Verdict::Blocked(origin);
    }
    let syn = segment.has_flags && segment.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn && over_rate(segment) {
        Verdict::OverRate
    } else {
        Verdict::Pass
    }
}

fn count(verdict: Verdict) {
    let Some(stats) = KGATE_XDP_STATS.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
    let stats = unsafe { &mut *stats };
    match verdict {
        Verdict::Pass => stats.passed += 1,
        Verdict::Malformed => {
            stats.passed += 1;
            stats.malformed += 1;
        }
        Verdict::Blocked(origin) => stats.count_blocked(origin),
        Verdict::OverRate => stats.dropped_syn_rate += 1,
    }
}

/// An address and port a frontend listens on, exactly or as a wildcard address
/// (`0.0.0.0:25`, `[::]:25`).
fn is_frontend(segment: &Segment) -> bool {
    if KGATE_XDP_FRONT.get_ptr(segment.destination).is_some() {
        return true;
    }
    let wildcard = if segment.is_v6 {
        [0; 16]
    } else {
        v4_mapped([0; 4])
    };
    KGATE_XDP_FRONT
        .get_ptr(FrontendKey::new(wildcard, segment.destination.port))
        .is_some()
}

/// The origin of the blocklist entry that applies to the segment's source, if any.
fn blocked_by(segment: &Segment) -> Option<u8> {
    if segment.is_v6 {
        blocked_in(&KGATE_BLOCK_V6, Key::new(128, segment.source))
    } else {
        blocked_in(&KGATE_BLOCK_V4, Key::new(32, segment.source_v4()))
    }
}

/// The longest prefix that holds `key` decides, unless it has expired: then the next
/// shorter one does (a few lookups at most; the daemon removes expired entries).
/// Returns the deciding entry's origin.
#[inline(always)]
fn blocked_in<K>(
    trie: &LpmTrie<K, BlockEntry, MAX_BLOCKED_PREFIXES>,
    mut key: Key<K>,
) -> Option<u8> {
    for _ in 0..MAX_BLOCK_LOOKUPS {
        let entry = trie.get(&key)?;
        if entry.expires_at == 0 {
            return Some(entry.origin);
        }
        // SAFETY: the helper only reads a clock.
        let now = unsafe { bpf_ktime_get_boot_ns() } / NS_PER_SECOND;
        if entry.applies_at(now) {
            return Some(entry.origin);
        }
        if entry.prefix_len == 0 {
            return None;
        }
        key.prefix_len = u32::from(entry.prefix_len) - 1;
    }
    None
}

fn over_rate(segment: &Segment) -> bool {
    let Some(config) = KGATE_XDP_CONF.get(0) else {
        return false;
    };
    if config.syn_rate == 0 {
        return false;
    }
    let config = *config;
    let key = if segment.is_v6 {
        SynSource::v6(segment.source)
    } else {
        SynSource::v4(segment.source_v4())
    };
    // SAFETY: the helper only reads a clock.
    let now = unsafe { bpf_ktime_get_ns() };
    match KGATE_SYN_RATE.get_ptr_mut(key) {
        // SAFETY: a bucket is only written here; two CPUs taking from the same
        // source's bucket at once can both win, which only loosens the limit a little.
        Some(bucket) => !unsafe { &mut *bucket }.take(now, &config),
        None => {
            let mut bucket = SynBucket::full(now, &config);
            let allowed = bucket.take(now, &config);
            // An LRU map makes room by forgetting the least recent source.
            let _ = KGATE_SYN_RATE.insert(key, bucket, u64::from(BPF_ANY));
            !allowed
        }
    }
}

/// Reads `N` bytes at `offset` from the start of the packet, if they are all there.
#[inline(always)]
fn load<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], Malformed> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return Err(Malformed);
    }
    // SAFETY: the N bytes at `offset` are inside the packet (checked just above).
    Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Ethernet, up to two VLAN tags, then IPv4 or IPv6; fills `segment` and returns true
/// for a TCP segment whose ports this packet shows.
fn parse(ctx: &XdpContext, segment: &mut Segment) -> Result<bool, Malformed> {
    let mut ethertype = be16(load(ctx, ETH_HLEN - 2)?);
    let mut l3 = ETH_HLEN;
    // Two tags (802.1ad outer, 802.1Q inner), written out: no loop for the verifier.
    if is_vlan(ethertype) {
        ethertype = be16(load(ctx, l3 + 2)?);
        l3 += VLAN_HLEN;
        if is_vlan(ethertype) {
            ethertype = be16(load(ctx, l3 + 2)?);
            l3 += VLAN_HLEN;
        }
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, l3, segment),
        ETH_P_IPV6 => parse_v6(ctx, l3, segment),
        _ => Ok(false),
    }
}

fn parse_v4(ctx: &XdpContext, l3: usize, segment: &mut Segment) -> Result<bool, Malformed> {
    let header: [u8; IPV4_MIN_HLEN] = load(ctx, l3)?;
    if header[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(be16([header[2], header[3]]));
    if header_len < IPV4_MIN_HLEN || total_len < header_len {
        return Err(Malformed);
    }
    if header[9] != IPPROTO_TCP {
        return Ok(false);
    }
    // Only the first fragment carries the TCP header; dropping it is enough to keep
    // the whole datagram out.
    if be16([header[6], header[7]]) & IP_OFFSET_MASK != 0 {
        return Ok(false);
    }
    segment.is_v6 = false;
    segment.source = v4_mapped([header[12], header[13], header[14], header[15]]);
    segment.destination.addr = v4_mapped([header[16], header[17], header[18], header[19]]);
    tcp(ctx, l3 + header_len, total_len - header_len, segment)
}

fn parse_v6(ctx: &XdpContext, l3: usize, segment: &mut Segment) -> Result<bool, Malformed> {
    let header: [u8; IPV6_HLEN] = load(ctx, l3)?;
    if header[0] >> 4 != 6 {
        return Err(Malformed);
    }
    segment.is_v6 = true;
    segment.source.copy_from_slice(&header[8..24]);
    segment.destination.addr.copy_from_slice(&header[24..40]);
    let end = l3 + IPV6_HLEN + usize::from(be16([header[4], header[5]]));
    let mut next = header[6];
    let mut offset = l3 + IPV6_HLEN;
    for _ in 0..MAX_V6_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: [u8; 2] = load(ctx, offset)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            IPPROTO_AH => {
                let ext: [u8; 2] = load(ctx, offset)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let ext: [u8; 4] = load(ctx, offset)?;
                if be16([ext[2], ext[3]]) >> 3 != 0 {
                    return Ok(false);
                }
                next = ext[0];
                offset += 8;
            }
            // No next header, ESP, or a protocol that is not TCP.
            _ => return Ok(false),
        }
        if offset > end {
            return Err(Malformed);
        }
        if offset > MAX_HEADERS_LEN {
            return Ok(false);
        }
    }
    if next != IPPROTO_TCP {
        return Ok(false);
    }
    tcp(ctx, offset, end - offset, segment)
}

/// The TCP header at `offset`, of which the datagram holds `len` bytes.
fn tcp(
    ctx: &XdpContext,
    offset: usize,
    len: usize,
    segment: &mut Segment,
) -> Result<bool, Malformed> {
    // Real first fragments carry at least 8 bytes of it.
    if len < 4 {
        return Err(Malformed);
    }
    let ports: [u8; 4] = load(ctx, offset)?;
    segment.destination.port = be16([ports[2], ports[3]]);
    if len > TCP_FLAGS_OFFSET {
        let [flags] = load(ctx, offset + TCP_FLAGS_OFFSET)?;
        segment.has_flags = true;
        segment.flags = flags;
    }
    Ok(true)
}
