//! The stream verdict program that splices a proxied connection in the kernel.
//!
//! Userspace puts both sockets of a connection into two sock hashes keyed by socket
//! cookie: `KGATE_PEERS` (cookie -> the peer socket, no program) and `KGATE_SPLICED`
//! (cookie -> the socket itself, this program attached). Every skb a spliced socket
//! receives is redirected to the egress side of its peer, as long as its direction
//! is within the bound userspace granted (`KGATE_GRANTS`); past it, bytes are passed
//! to the socket's own queue, where TCP flow control holds the sender back until
//! userspace forwards them. The insertion order that makes this lossless, and the
//! grant handshake, are written down in proxy-user/src/dataplane/sockmap.rs.
//!
//! Before either, bytes a retransmission repeats are cut off the skb: the kernel
//! hands the program whole skbs, overlaps included (`skip_repeated_bytes`). So are
//! bytes userspace read itself before the socket joined the splice: a socket joins
//! mid-stream, and the skb at its head may have been read in part.
//!
//! The XDP early-drop program (blocklists, SYN rate limits) is in `xdp.rs`, the packet
//! data plane's TC programs in `packet.rs`.
#![no_std]
#![no_main]

mod packet;
mod xdp;

use aya_ebpf::{
    Global,
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    helpers::{bpf_get_socket_cookie, bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    ByteCounts, FROM_CLIENT, FlowCounters, FlowGrant, GRANT_REQUEST_RING_BYTES, MAX_FRONTENDS,
    MAX_SERVERS, MAX_SPLICED_SOCKETS, SpliceStats,
};

#[btf_map]
static KGATE_PEERS: SockHash<u64, MAX_SPLICED_SOCKETS> = SockHash::new();

#[btf_map]
static KGATE_SPLICED: SockHash<u64, MAX_SPLICED_SOCKETS> = SockHash::new();

#[btf_map]
static KGATE_FLOWS: HashMap<u64, FlowCounters, MAX_SPLICED_SOCKETS> = HashMap::new();

#[btf_map]
static KGATE_GRANTS: HashMap<u64, FlowGrant, MAX_SPLICED_SOCKETS> = HashMap::new();

#[btf_map]
static KGATE_GRANT_REQ: RingBuf<u64, GRANT_REQUEST_RING_BYTES> = RingBuf::new();

#[btf_map]
static KGATE_SPL_STATS: PerCpuArray<SpliceStats, 1> = PerCpuArray::new();

// The `servers` map that bpftool shows is created by userspace (maps/servers.rs): no
// program reads it.

#[btf_map]
static KGATE_SRV_BYTES: PerCpuArray<ByteCounts, MAX_SERVERS> = PerCpuArray::new();

#[btf_map]
static KGATE_FE_BYTES: PerCpuArray<ByteCounts, MAX_FRONTENDS> = PerCpuArray::new();

/// Where `copied_seq` is in the kernel's `struct tcp_sock` (see
/// [`proxy_common::programs::COPIED_SEQ_OFFSET`]); 0 until userspace sets it at load.
#[unsafe(no_mangle)]
static KGATE_COPIED_SEQ_AT: Global<u32> = Global::new(0);

#[stream_verdict]
pub fn kgate_splice(ctx: SkBuffContext) -> u32 {
    match try_splice(&ctx) {
        Ok(verdict) | Err(verdict) => verdict,
    }
}

fn try_splice(ctx: &SkBuffContext) -> Result<u32, u32> {
    // A bare FIN comes through as an empty skb. Redirected, the kernel's send worker
    // takes "0 bytes sent" for a broken pipe and marks the peer socket failed (EPIPE)
    // with its transmit stopped. TCP has already recorded the FIN, and userspace
    // passes it on itself, so the empty skb is simply dropped.
    if ctx.len() == 0 {
        return Ok(sk_action::SK_DROP);
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let len = u64::from(ctx.len());
    let stats = KGATE_SPL_STATS.get_ptr_mut(0).ok_or(sk_action::SK_DROP)?;
    // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
    let stats = unsafe { &mut *stats };
    // Userspace creates both entries before the socket joins KGATE_SPLICED; without
    // them the bytes stay with the socket, where userspace can still read them.
    let counters = KGATE_FLOWS.get_ptr_mut(cookie).ok_or(sk_action::SK_PASS)?;
    let grant = KGATE_GRANTS.get_ptr(cookie).ok_or(sk_action::SK_PASS)?;
    // SAFETY: this socket's skbs are handled one at a time, and only this program
    // writes its counters; the grant is replaced whole by userspace, never torn.
    let (counters, grant) = unsafe { (&mut *counters, *grant) };
    let len = match skip_repeated_bytes(ctx, counters, stats) {
        Ok(0) => return Ok(sk_action::SK_DROP),
        Ok(len) => u64::from(len),
        Err(()) => {
            counters.lost += len;
            stats.trim_failures += 1;
            return Err(sk_action::SK_DROP);
        }
    };
    if !grant.allows(counters, len) {
        counters.passed += len;
        stats.passed_bytes += len;
        return Ok(sk_action::SK_PASS);
    }
    let socket = cookie;
    let verdict = KGATE_PEERS.redirect_skb(ctx, &mut cookie, 0);
    if verdict == i64::from(sk_action::SK_PASS) {
        counters.redirected += len;
        // A full ring only delays the request: the program passes bytes at the bound,
        // which wakes userspace all the same.
        if grant.wants_more(counters) && KGATE_GRANT_REQ.output(socket, 0).is_err() {
            stats.grant_requests_lost += 1;
        }
        stats.redirected_skbs += 1;
        stats.redirected_bytes += len;
        let from_client = grant.direction == FROM_CLIENT;
        count_bytes(grant.server_slot, grant.frontend_slot, from_client, len);
        Ok(sk_action::SK_PASS)
    } else {
        // Userspace inserts the peer before the socket itself joins KGATE_SPLICED, so
        // this happens only when the peer was closed under a live connection.
        stats.redirect_failures += 1;
        warn!(
            ctx,
            "kgate: socket {} has no peer, {} bytes dropped", cookie, len
        );
        Err(sk_action::SK_DROP)
    }
}

/// Adds `len` bytes to the counters of a connection's server and frontend, as
/// `kgate status` and the metrics show them while the connection is open.
fn count_bytes(server_slot: u32, frontend_slot: u32, from_client: bool, len: u64) {
    for bytes in [
        KGATE_SRV_BYTES.get_ptr_mut(server_slot),
        KGATE_FE_BYTES.get_ptr_mut(frontend_slot),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: the per-CPU slot belongs to this CPU while the program runs.
        let bytes: &mut ByteCounts = unsafe { &mut *bytes };
        if from_client {
            bytes.bytes_in += len;
        } else {
            bytes.bytes_out += len;
        }
    }
}

/// TCP's FIN flag in `tcp_skb_cb::tcp_flags`.
const TCP_FIN: u32 = 0x01;
/// The most `bpf_skb_adjust_room` cuts off a stream verdict program's skb at once.
const MAX_TRIM_STEP: u32 = 0xfff;
/// Enough steps for the largest overlap TCP can queue (at most a receive buffer, far
/// less in practice: a retransmitted segment).
const MAX_TRIM_STEPS: u32 = 1024;

/// Cuts off the head of the skb that earlier skbs already carried (see
/// [`FlowCounters::overlap`]) and returns how many bytes are left.
fn skip_repeated_bytes(
    ctx: &SkBuffContext,
    counters: &mut FlowCounters,
    stats: &mut SpliceStats,
) -> Result<u32, ()> {
    // A stream verdict program's cb[] is the start of skb->cb, where TCP keeps the
    // skb's control block: seq, end_seq, then (in cb[3]'s low byte) the TCP flags.
    let cb = ctx.skb.cb();
    let (seq, end_seq, flags) = (cb[0], cb[1], cb[3] & 0xff);
    let data_end = end_seq.wrapping_sub(flags & TCP_FIN);
    let len = ctx.len();
    if data_end.wrapping_sub(seq) != len {
        // Not TCP's control block (never seen): nothing to go by.
        stats.unsequenced_skbs += 1;
        return Ok(len);
    }
    if counters.seq_known == 0 {
        // The socket's first skb: the stream goes on from where its reader stopped,
        // userspace before the socket joined (nothing yet, for a socket spliced from
        // its first byte). Unknown, this skb is taken to start there.
        match read_position(ctx) {
            Some(copied_seq) => counters.handled_up_to(copied_seq),
            None => stats.unpositioned_sockets += 1,
        }
    }
    let mut repeated = counters.overlap(seq, len);
    counters.handled_up_to(data_end);
    if repeated == 0 {
        return Ok(len);
    }
    counters.trimmed += u64::from(repeated);
    stats.trimmed_bytes += u64::from(repeated);
    for _ in 0..MAX_TRIM_STEPS {
        if repeated == 0 {
            break;
        }
        let step = repeated.min(MAX_TRIM_STEP);
        ctx.adjust_room(-(step as i32), 0, 0).map_err(|_| ())?;
        repeated -= step;
    }
    if repeated != 0 {
        return Err(());
    }
    Ok(ctx.len())
}

/// The socket's `copied_seq`: the sequence number of the next byte its reader takes.
fn read_position(ctx: &SkBuffContext) -> Option<u32> {
    let offset = KGATE_COPIED_SEQ_AT.load();
    if offset == 0 {
        return None;
    }
    // SAFETY: `sk` is a field of the program's context; the verifier checks the read.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: the helper checks that `sk` is a TCP socket, or returns null.
    let tcp = unsafe { bpf_skc_to_tcp_sock(sk.cast()) };
    if tcp.is_null() {
        return None;
    }
    let field = tcp.cast::<u8>().wrapping_add(offset as usize).cast::<u32>();
    // SAFETY: a checked kernel read; it fails rather than faults.
    unsafe { bpf_probe_read_kernel(field) }.ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
