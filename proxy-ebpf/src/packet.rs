//! The packet data plane: segments of handed-off connections, forwarded at TC ingress.
//!
//! A segment whose addresses and ports match a rule (`KGATE_PKT_RULES`, keyed as it
//! arrives) becomes a segment of the other connection of its flow: addresses and ports
//! replaced, sequence and acknowledgement numbers moved between the two connections'
//! sequence spaces, SACK edges with the acknowledgements, timestamps moved onto the
//! clocks each receiver knows, the window moved between the two window scales; every
//! checksum updated incrementally. Then it is redirected to the interface that routes
//! to its new destination (`bpf_fib_lookup`, `bpf_redirect_neigh`, which fills in the
//! link-layer addresses). GSO segments keep their size: both connections were checked
//! to take it at the handoff.
//!
//! While a flow's rules say `FREEZE`, its segments are dropped (the handoff reads the
//! sockets then, and nothing may change them); their senders send them again. At
//! egress, segments the gateway's own sockets of such a flow would send are dropped:
//! those sockets no longer follow the connection. While they say `HOLD`, the egress
//! program closes the window in what those sockets send (see `HOLD`), and ingress lets
//! everything through. Segments kgate writes itself carry `INJECTED_MARK` and pass.
//!
//! Every read and write goes through the skb helpers (`bpf_skb_load_bytes`,
//! `bpf_skb_store_bytes`), which check bounds and reach into paged data.

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_SHOT,
        TC_ACT_UNSPEC, bpf_fib_lookup,
    },
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf},
    helpers::{bpf_csum_diff, bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use proxy_common::packet::{
    CLOSED, DOWN, EVENT_RING_BYTES, Event, FIN_ACKED, FIN_SEEN, FORWARD, FREEZE, FlowKey,
    HALF_CLOSED, HOLD, INJECTED_MARK, LastSent, MAX_PACKET_FLOWS, PacketStats, Progress, RESET,
    RESET_SEEN, REUSED, Rule, TIMESTAMPS, TS_KNOWN, UP, advance, translate_window,
};

use crate::count_bytes;

#[btf_map]
static KGATE_PKT_RULES: HashMap<FlowKey, Rule, { 2 * MAX_PACKET_FLOWS }> = HashMap::new();

#[btf_map]
static KGATE_PKT_PROG: Array<Progress, MAX_PACKET_FLOWS> = Array::new();

#[btf_map]
static KGATE_PKT_EVENTS: RingBuf<Event, EVENT_RING_BYTES> = RingBuf::new();

#[btf_map]
static KGATE_PKT_STATS: PerCpuArray<PacketStats, 1> = PerCpuArray::new();

/// Room the programs need beyond their 512-byte stack, per CPU.
#[repr(C)]
struct Scratch {
    /// The option area as it came, and as it goes.
    old_options: [u8; TCP_MAX_OPTIONS],
    new_options: [u8; TCP_MAX_OPTIONS],
    /// IPv6 (source, destination) as they came, and as they go.
    old_addresses: [[u8; 16]; 2],
    new_addresses: [[u8; 16]; 2],
    fib: bpf_fib_lookup,
    /// Where the segment's option area starts, and its length.
    options_at: u32,
    options_len: u32,
}

#[btf_map]
static KGATE_PKT_SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// What the programs answer for a segment that is none of their business: the next
/// program attached to the hook (tcx) sees it, or the stack when there is none. Not
/// TC_ACT_OK, which would end the chain: a second kgate (the one an upgrade starts)
/// attaches its programs after the first one's, and other software may have its own.
const NOT_OURS: i32 = TC_ACT_UNSPEC;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offsets within the TCP header.
const TCP_SEQ: usize = 4;
const TCP_ACK_NUMBER: usize = 8;
const TCP_DOFF: usize = 12;
const TCP_FLAGS: usize = 13;
const TCP_WINDOW: usize = 14;
const TCP_CHECKSUM: usize = 16;
const TCP_MIN_HLEN: usize = 20;
/// The most option bytes a TCP header holds.
const TCP_MAX_OPTIONS: usize = 40;

const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
const OPT_TIMESTAMP_LEN: usize = 10;

const NS_PER_MS: u64 = 1_000_000;

/// A segment as it arrived: where its headers are, and what it says. Plain fields,
/// filled in place: an `Option<Segment>` makes BTF the kernel refuses.
#[derive(Default)]
struct Segment {
    key: FlowKey,
    is_v6: bool,
    /// Offset of the TCP header.
    l4: usize,
    /// Where the IP datagram ends: link-layer padding after it is no payload.
    end: usize,
}

/// A segment that cannot be handled as a segment of its flow.
struct Broken;

#[classifier]
pub fn kgate_pkt_ingress(ctx: TcContext) -> i32 {
    match try_ingress(&ctx) {
        Ok(action) => action,
        Err(Broken) => {
            count(|s| s.malformed += 1);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn kgate_pkt_egress(ctx: TcContext) -> i32 {
    let mut segment = Segment::default();
    if !parse(&ctx, &mut segment) {
        return NOT_OURS;
    }
    // The gateway's own segments of a flow: their reverse is the flow's rule key.
    // Forwarded segments come from an ingress interface; the sockets' have none.
    let key = segment.key;
    let reverse = FlowKey {
        source: key.destination,
        destination: key.source,
        source_port: key.destination_port,
        destination_port: key.source_port,
    };
    // SAFETY: reading fields of the program's context.
    let (from_ingress, mark) =
        unsafe { ((*ctx.skb.skb).ingress_ifindex != 0, (*ctx.skb.skb).mark) };
    if from_ingress || mark == INJECTED_MARK {
        return NOT_OURS;
    }
    let Some(rule) = KGATE_PKT_RULES.get_ptr_mut(reverse) else {
        return NOT_OURS;
    };
    // SAFETY: a rule of the map; userspace replaces rules whole, and only this program
    // writes `held_last_sent`, which nothing else reads while the rule holds.
    let rule = unsafe { &mut *rule };
    match rule.state {
        FREEZE | FORWARD => {
            count(|s| s.silenced += 1);
            TC_ACT_SHOT
        }
        HOLD => match close_window(&ctx, &segment, &mut rule.held_last_sent) {
            Ok(()) => NOT_OURS,
            Err(Broken) => {
                count(|s| s.malformed += 1);
                TC_ACT_SHOT
            }
        },
        _ => NOT_OURS,
    }
}

/// Announces a zero window in a segment of the gateway's own socket, and keeps what
/// the segment said in `last`.
fn close_window(ctx: &TcContext, segment: &Segment, last: &mut LastSent) -> Result<(), Broken> {
    let l4 = segment.l4;
    let seq = u32::from_be(load::<u32>(ctx, l4 + TCP_SEQ)?);
    let ack = u32::from_be(load::<u32>(ctx, l4 + TCP_ACK_NUMBER)?);
    let doff = usize::from(load::<u8>(ctx, l4 + TCP_DOFF)? >> 4) * 4;
    let flags: u8 = load(ctx, l4 + TCP_FLAGS)?;
    let window: u16 = load(ctx, l4 + TCP_WINDOW)?;
    let payload = segment.end.checked_sub(l4 + doff).ok_or(Broken)? as u32;
    last.seq_end = seq
        .wrapping_add(payload)
        .wrapping_add(u32::from(flags & TCP_FIN != 0));
    last.ack = ack;
    last.window = u16::from_be(window);
    last.timestamps = 0;
    // Linux puts the timestamps first, after two NOPs, in every segment but a SYN.
    if doff >= TCP_MIN_HLEN + 12 {
        let head: [u8; 4] = load(ctx, l4 + TCP_MIN_HLEN)?;
        if head == [OPT_NOP, OPT_NOP, OPT_TIMESTAMP, OPT_TIMESTAMP_LEN as u8] {
            last.tsval = u32::from_be(load::<u32>(ctx, l4 + TCP_MIN_HLEN + 4)?);
            last.tsecr = u32::from_be(load::<u32>(ctx, l4 + TCP_MIN_HLEN + 8)?);
            last.timestamps = 1;
        }
    }
    last.seen = 1;
    if window != 0 {
        replace_u16(ctx, l4 + TCP_WINDOW, l4 + TCP_CHECKSUM, window, 0)?;
        count(|s| s.held_windows += 1);
    }
    Ok(())
}

fn try_ingress(ctx: &TcContext) -> Result<i32, Broken> {
    let mut segment = Segment::default();
    if !parse(ctx, &mut segment) {
        return Ok(NOT_OURS);
    }
    // SAFETY: userspace replaces a rule whole (a hash map update swaps the element):
    // this reference sees one version of it throughout.
    let Some(rule) = (unsafe { KGATE_PKT_RULES.get(segment.key) }) else {
        return Ok(NOT_OURS);
    };
    match rule.state {
        FREEZE => {
            count(|s| s.frozen_drops += 1);
            Ok(TC_ACT_SHOT)
        }
        FORWARD => {
            // A SYN on a flow's addresses is a new connection: the client's kernel has
            // no socket left for the old one (lingering here for late retransmissions)
            // and reused its port. Never forward it into the old server connection:
            // drop it (the client sends it again) and tell kgate, which ends a closed
            // flow at once and so frees the addresses for the listener.
            if load::<u8>(ctx, segment.l4 + TCP_FLAGS)? & TCP_SYN != 0 {
                report(rule.flow, REUSED);
                return Ok(TC_ACT_SHOT);
            }
            let scratch = KGATE_PKT_SCRATCH.get_ptr_mut(0).ok_or(Broken)?;
            // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
            forward(ctx, &segment, rule, unsafe { &mut *scratch })
        }
        _ => Ok(NOT_OURS),
    }
}

fn parse(ctx: &TcContext, segment: &mut Segment) -> bool {
    parse_into(ctx, segment).is_some()
}

fn parse_into(ctx: &TcContext, segment: &mut Segment) -> Option<()> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let key = &mut segment.key;
    let (is_v6, l4) = match proto {
        ETH_P_IP => {
            let version_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            let total = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?));
            segment.end = ETH_HLEN + total;
            let fragment = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
            let protocol: u8 = ctx.load(ETH_HLEN + 9).ok()?;
            if version_ihl >> 4 != 4
                || ihl < 20
                || fragment & 0x3fff != 0
                || protocol != IPPROTO_TCP
            {
                return None;
            }
            key.source[10] = 0xff;
            key.source[11] = 0xff;
            key.destination[10] = 0xff;
            key.destination[11] = 0xff;
            let source: [u8; 4] = ctx.load(ETH_HLEN + 12).ok()?;
            let destination: [u8; 4] = ctx.load(ETH_HLEN + 16).ok()?;
            key.source[12..].copy_from_slice(&source);
            key.destination[12..].copy_from_slice(&destination);
            (false, ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(ETH_HLEN + 6).ok()?;
            if next != IPPROTO_TCP {
                return None;
            }
            let payload = usize::from(u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).ok()?));
            segment.end = ETH_HLEN + IPV6_HLEN + payload;
            key.source = ctx.load(ETH_HLEN + 8).ok()?;
            key.destination = ctx.load(ETH_HLEN + 24).ok()?;
            (true, ETH_HLEN + IPV6_HLEN)
        }
        _ => return None,
    };
    key.source_port = ctx.load(l4).ok()?;
    key.destination_port = ctx.load(l4 + 2).ok()?;
    segment.is_v6 = is_v6;
    segment.l4 = l4;
    // A GSO packet over 64 KiB (BIG TCP) has no length in its header.
    if segment.end <= l4 || segment.end > ctx.len() as usize {
        segment.end = ctx.len() as usize;
    }
    Some(())
}

fn forward(
    ctx: &TcContext,
    segment: &Segment,
    rule: &Rule,
    scratch: &mut Scratch,
) -> Result<i32, Broken> {
    let l4 = segment.l4;
    let checksum = l4 + TCP_CHECKSUM;
    let seq = u32::from_be(load::<u32>(ctx, l4 + TCP_SEQ)?);
    let ack = u32::from_be(load::<u32>(ctx, l4 + TCP_ACK_NUMBER)?);
    let doff = usize::from(load::<u8>(ctx, l4 + TCP_DOFF)? >> 4) * 4;
    let flags: u8 = load(ctx, l4 + TCP_FLAGS)?;
    let window = u16::from_be(load::<u16>(ctx, l4 + TCP_WINDOW)?);
    if doff < TCP_MIN_HLEN || segment.is_v6 != (rule.is_v6 == 1) {
        return Err(Broken);
    }
    let payload = segment.end.checked_sub(l4 + doff).ok_or(Broken)? as u32;

    rewrite_addresses(ctx, segment, rule, scratch)?;
    replace_u16(
        ctx,
        l4,
        checksum,
        segment.key.source_port,
        rule.new_key.source_port,
    )?;
    replace_u16(
        ctx,
        l4 + 2,
        checksum,
        segment.key.destination_port,
        rule.new_key.destination_port,
    )?;
    let new_seq = seq.wrapping_add(rule.seq_delta);
    replace_u32(ctx, l4 + TCP_SEQ, checksum, seq.to_be(), new_seq.to_be())?;
    if flags & TCP_ACK != 0 {
        let new_ack = ack.wrapping_add(rule.ack_delta);
        replace_u32(
            ctx,
            l4 + TCP_ACK_NUMBER,
            checksum,
            ack.to_be(),
            new_ack.to_be(),
        )?;
    }
    let new_window = translate_window(window, rule.window_shift_in, rule.window_shift_out);
    replace_u16(
        ctx,
        l4 + TCP_WINDOW,
        checksum,
        window.to_be(),
        new_window.to_be(),
    )?;

    let progress = KGATE_PKT_PROG.get_ptr_mut(rule.flow).ok_or(Broken)?;
    // SAFETY: the flow's slot. Each direction's half is written by the segments of
    // that direction, but for FIN_ACKED, which the other direction sets; userspace
    // zeroes the slot before the rules forward.
    let progress = unsafe { &mut *progress };
    if doff > TCP_MIN_HLEN {
        scratch.options_at = (l4 + TCP_MIN_HLEN) as u32;
        scratch.options_len = (doff - TCP_MIN_HLEN) as u32;
        rewrite_options(ctx, rule, progress, scratch)?;
    }
    let first_time = note_progress(rule, progress, seq, new_seq, ack, flags, payload);
    if first_time != 0 {
        count_bytes(
            rule.server_slot,
            rule.frontend_slot,
            rule.direction == UP,
            first_time,
        );
    }
    count(|s| {
        s.forwarded_segments += 1;
        s.forwarded_bytes += u64::from(payload);
    });
    redirect(ctx, segment, rule, &mut scratch.fib)
}

#[inline(never)]
fn rewrite_addresses(
    ctx: &TcContext,
    segment: &Segment,
    rule: &Rule,
    scratch: &mut Scratch,
) -> Result<(), Broken> {
    let checksum = segment.l4 + TCP_CHECKSUM;
    if segment.is_v6 {
        scratch.old_addresses = [segment.key.source, segment.key.destination];
        scratch.new_addresses = [rule.new_key.source, rule.new_key.destination];
        store(ctx, ETH_HLEN + 8, &scratch.new_addresses)?;
        // SAFETY: both buffers are 32 bytes of the scratch map, a multiple of 4.
        let diff = unsafe {
            bpf_csum_diff(
                scratch.old_addresses.as_mut_ptr() as *mut u32,
                32,
                scratch.new_addresses.as_mut_ptr() as *mut u32,
                32,
                0,
            )
        };
        if diff < 0 {
            return Err(Broken);
        }
        return ctx
            .l4_csum_replace(checksum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
            .map_err(|_| Broken);
    }
    for (offset, old, new) in [
        (ETH_HLEN + 12, &segment.key.source, &rule.new_key.source),
        (
            ETH_HLEN + 16,
            &segment.key.destination,
            &rule.new_key.destination,
        ),
    ] {
        let old = u32::from_ne_bytes([old[12], old[13], old[14], old[15]]);
        let new = u32::from_ne_bytes([new[12], new[13], new[14], new[15]]);
        store(ctx, offset, &new)?;
        ctx.l3_csum_replace(ETH_HLEN + 10, old as u64, new as u64, 4)
            .map_err(|_| Broken)?;
        ctx.l4_csum_replace(
            checksum,
            old as u64,
            new as u64,
            BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .map_err(|_| Broken)?;
    }
    Ok(())
}

/// Moves the timestamps onto the receiver's clocks and the SACK edges into the
/// receiver's sequence space, then fixes the checksum over the whole option area
/// (options sit at any offset, and the area is a multiple of 4 bytes).
#[inline(never)]
fn rewrite_options(
    ctx: &TcContext,
    rule: &Rule,
    progress: &mut Progress,
    scratch: &mut Scratch,
) -> Result<(), Broken> {
    let len = scratch.options_len as usize & 0x3c;
    let options_at = scratch.options_at as usize;
    if len == 0 || len > TCP_MAX_OPTIONS {
        return Ok(());
    }
    let Scratch {
        old_options: old,
        new_options: new,
        ..
    } = scratch;
    // Word by word: a load of a variable length does not get past the verifier.
    for word in 0..TCP_MAX_OPTIONS / 4 {
        let at = word * 4;
        if at >= len {
            break;
        }
        let value: [u8; 4] = load(ctx, options_at + at)?;
        old.get_mut(at..at + 4)
            .ok_or(Broken)?
            .copy_from_slice(&value);
    }
    *new = *old;
    // Each option is rewritten where it is found: the walk keeps nothing but its
    // position, which only grows, so the verifier sees few distinct states (a loop
    // counter beside it multiplied them past the verifier's limit).
    let mut at = 0;
    while at + 1 < len {
        let kind = *new.get(at).ok_or(Broken)?;
        if kind == OPT_EOL {
            break;
        }
        if kind == OPT_NOP {
            at += 1;
            continue;
        }
        let size = usize::from(*new.get(at + 1).ok_or(Broken)?);
        if size < 2 || at + size > len {
            break;
        }
        if kind == OPT_TIMESTAMP && size == OPT_TIMESTAMP_LEN && rule.flags & TIMESTAMPS != 0 {
            move_timestamps(new, at, rule, progress)?;
        } else if kind == OPT_SACK {
            move_sack_edges(new, at, size, rule.ack_delta)?;
        }
        at += size;
    }
    if new == old {
        return Ok(());
    }
    for word in 0..TCP_MAX_OPTIONS / 4 {
        let at = word * 4;
        if at >= len {
            break;
        }
        let (was, is) = (
            old.get(at..at + 4).ok_or(Broken)?,
            new.get(at..at + 4).ok_or(Broken)?,
        );
        if was != is {
            let value = [is[0], is[1], is[2], is[3]];
            store(ctx, options_at + at, &value)?;
        }
    }
    // SAFETY: both buffers are in the scratch map, `len` bytes long, a multiple of 4.
    let diff = unsafe {
        bpf_csum_diff(
            old.as_mut_ptr() as *mut u32,
            len as u32,
            new.as_mut_ptr() as *mut u32,
            len as u32,
            0,
        )
    };
    if diff < 0 {
        return Err(Broken);
    }
    let checksum = options_at - TCP_MIN_HLEN + TCP_CHECKSUM;
    ctx.l4_csum_replace(checksum, 0, diff as u64, 0)
        .map_err(|_| Broken)
}

/// Counts the direction's bytes, its FIN and its reset, and the other direction's FIN
/// once this one acknowledges it; reports the flow's end. Returns how many bytes the
/// segment forwarded for the first time (a retransmission repeats counted ones).
#[allow(clippy::too_many_arguments)]
fn note_progress(
    rule: &Rule,
    progress: &mut Progress,
    seq: u32,
    new_seq: u32,
    ack: u32,
    flags: u8,
    payload: u32,
) -> u64 {
    let [up, down] = &mut progress.direction;
    let (this, other) = if rule.direction == DOWN {
        (down, up)
    } else {
        (up, down)
    };
    // Only data counts: the ACK after a FIN already stands one past the last byte.
    let counted_before = this.bytes;
    if payload > 0 {
        let counted_end = rule.base_seq.wrapping_add(this.bytes as u32);
        advance(&mut this.bytes, counted_end, seq.wrapping_add(payload));
    }
    let first_time = this.bytes - counted_before;
    this.segments += 1;
    // SAFETY: no preconditions.
    this.last_ns = unsafe { bpf_ktime_get_ns() };
    if flags & TCP_FIN != 0 && this.flags & FIN_SEEN == 0 {
        this.fin_end = new_seq.wrapping_add(payload).wrapping_add(1);
        this.fin_ns = this.last_ns;
        this.flags |= FIN_SEEN;
        if other.flags & FIN_SEEN == 0 {
            report(rule.flow, HALF_CLOSED);
        }
    }
    if flags & TCP_RST != 0 {
        this.flags |= RESET;
        report(rule.flow, RESET_SEEN);
        return first_time;
    }
    // The other direction's FIN is acknowledged by this one, in the space this sender
    // sees: its acknowledgement as it arrived.
    let acks_fin = flags & TCP_ACK != 0
        && other.flags & FIN_SEEN != 0
        && ack.wrapping_sub(other.fin_end) as i32 >= 0;
    if acks_fin && other.flags & FIN_ACKED == 0 {
        other.flags |= FIN_ACKED;
        if this.flags & FIN_ACKED != 0 {
            report(rule.flow, CLOSED);
        }
    }
    first_time
}

#[inline(never)]
fn redirect(
    ctx: &TcContext,
    segment: &Segment,
    rule: &Rule,
    fib: &mut bpf_fib_lookup,
) -> Result<i32, Broken> {
    // SAFETY: plain data; every field the lookup reads is set below.
    *fib = unsafe { core::mem::zeroed() };
    fib.l4_protocol = IPPROTO_TCP;
    fib.sport = rule.new_key.source_port;
    fib.dport = rule.new_key.destination_port;
    // SAFETY: reading a field of the program's context.
    fib.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let (source, destination) = (rule.new_key.source, rule.new_key.destination);
    if segment.is_v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&source);
        fib.__bindgen_anon_4.ipv6_dst = words(&destination);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([source[12], source[13], source[14], source[15]]);
        fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes([
            destination[12],
            destination[13],
            destination[14],
            destination[15],
        ]);
    }
    // SAFETY: the lookup reads and writes `fib`, which lives on this stack.
    let found = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            fib,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if found != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        count(|s| s.no_route += 1);
        return Ok(TC_ACT_SHOT);
    }
    // SAFETY: no nexthop given: the kernel resolves the new destination's neighbour.
    Ok(unsafe { bpf_redirect_neigh(fib.ifindex, core::ptr::null_mut(), 0, 0) } as i32)
}

fn words(address: &[u8; 16]) -> [u32; 4] {
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        let at = i * 4;
        *word = u32::from_ne_bytes([
            address[at],
            address[at + 1],
            address[at + 2],
            address[at + 3],
        ]);
    }
    words
}

fn report(flow: u32, kind: u32) {
    if KGATE_PKT_EVENTS.output(Event { flow, kind }, 0).is_err() {
        count(|s| s.events_lost += 1);
    }
}

fn count(update: impl FnOnce(&mut PacketStats)) {
    if let Some(stats) = KGATE_PKT_STATS.get_ptr_mut(0) {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        update(unsafe { &mut *stats });
    }
}

fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Broken> {
    ctx.load(offset).map_err(|_| Broken)
}

fn store<T>(ctx: &TcContext, offset: usize, value: &T) -> Result<(), Broken> {
    ctx.store(offset, value, 0).map_err(|_| Broken)
}

/// Replaces a 16-bit field (as it is in the packet) and fixes the TCP checksum.
fn replace_u16(
    ctx: &TcContext,
    offset: usize,
    checksum: usize,
    old: u16,
    new: u16,
) -> Result<(), Broken> {
    if old == new {
        return Ok(());
    }
    store(ctx, offset, &new)?;
    ctx.l4_csum_replace(checksum, old as u64, new as u64, 2)
        .map_err(|_| Broken)
}

/// Replaces a 32-bit field (as it is in the packet) and fixes the TCP checksum.
fn replace_u32(
    ctx: &TcContext,
    offset: usize,
    checksum: usize,
    old: u32,
    new: u32,
) -> Result<(), Broken> {
    if old == new {
        return Ok(());
    }
    store(ctx, offset, &new)?;
    ctx.l4_csum_replace(checksum, old as u64, new as u64, 4)
        .map_err(|_| Broken)
}

fn read_be32(buf: &[u8; TCP_MAX_OPTIONS], at: usize) -> Result<u32, Broken> {
    let bytes = buf.get(at..at + 4).ok_or(Broken)?;
    Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

fn write_be32(buf: &mut [u8; TCP_MAX_OPTIONS], at: usize, value: u32) -> Result<(), Broken> {
    buf.get_mut(at..at + 4)
        .ok_or(Broken)?
        .copy_from_slice(&value.to_be_bytes());
    Ok(())
}

/// Moves the timestamp option at `at` onto the receiver's clocks: the sender's value
/// by this direction's delta (learnt from the first one), the echo back by the other
/// direction's.
#[inline(never)]
fn move_timestamps(
    options: &mut [u8; TCP_MAX_OPTIONS],
    at: usize,
    rule: &Rule,
    progress: &mut Progress,
) -> Result<(), Broken> {
    let (mine, peer) = halves(rule);
    let tsval = read_be32(options, at + 2)?;
    let tsecr = read_be32(options, at + 6)?;
    let other = progress.direction[peer];
    let this = &mut progress.direction[mine];
    if this.flags & TS_KNOWN == 0 {
        // The receiver's clock now, as its socket on the gateway would send it.
        // SAFETY: no preconditions.
        let elapsed = unsafe { bpf_ktime_get_ns() }.wrapping_sub(rule.handoff_ns);
        let clock = rule
            .ts_clock_at_handoff
            .wrapping_add((elapsed / NS_PER_MS) as u32);
        this.tsval_delta = clock.wrapping_sub(tsval);
        this.flags |= TS_KNOWN;
    }
    write_be32(options, at + 2, tsval.wrapping_add(this.tsval_delta))?;
    // 0 (no echo) until the other direction has moved a timestamp of its own.
    let echo = if other.flags & TS_KNOWN != 0 {
        tsecr.wrapping_sub(other.tsval_delta)
    } else {
        0
    };
    write_be32(options, at + 6, echo)
}

/// The most edges a SACK option holds (four blocks).
const MAX_SACK_EDGES: usize = 8;

/// Moves the edges of the SACK option at `at` (`size` bytes) into the receiver's
/// sequence space, as the acknowledgement number is.
#[inline(never)]
fn move_sack_edges(
    options: &mut [u8; TCP_MAX_OPTIONS],
    at: usize,
    size: usize,
    delta: u32,
) -> Result<(), Broken> {
    let edges = (size.saturating_sub(2) / 4).min(MAX_SACK_EDGES);
    for edge in 0..MAX_SACK_EDGES {
        if edge >= edges {
            break;
        }
        let offset = at + 2 + edge * 4;
        let value = read_be32(options, offset)?;
        write_be32(options, offset, value.wrapping_add(delta))?;
    }
    Ok(())
}

/// The indexes of the rule's direction and of the other one in [`Progress`].
fn halves(rule: &Rule) -> (usize, usize) {
    if rule.direction == DOWN {
        (1, 0)
    } else {
        (0, 1)
    }
}
