//! The XDP program, packet by packet, through BPF_PROG_TEST_RUN: crafted frames go
//! into the verifier-checked program built into this binary, with its maps filled as
//! the daemon fills them, and each verdict is checked. Loading programs needs root:
//! without it the tests print why and pass.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
    thread,
    time::Duration,
};

use aya::{
    EbpfLoader,
    programs::{TestRun, TestRunOptions},
};
use proxy_common::xdp::{ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE};

use super::*;
use crate::xdp::{
    boot_seconds,
    crowdsec::{Synced, sync_crowdsec_entries},
    sync_file_entries,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const FRONTEND_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const FRONTEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const SMTP: u16 = 25;
/// Listened on as 0.0.0.0:587: any IPv4 destination address.
const SUBMISSION: u16 = 587;

const ALLOWED_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
const BLOCKED_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const ALLOWED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 9);
const BLOCKED_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 9);

/// The XDP program, loaded but not attached, and its maps (not pinned).
struct Program {
    ebpf: Ebpf,
    maps: XdpMaps,
}

impl Program {
    /// `None` (after saying why) when this process may not load eBPF programs.
    fn load() -> Option<Program> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("skipping: loading the XDP program needs root");
            return None;
        }
        let mut ebpf = EbpfLoader::new()
            .load(super::super::EBPF_OBJECT)
            .expect("loading the eBPF object");
        load_program(&mut ebpf).expect("the verifier accepts the XDP program");
        let mut take = |name| ebpf.take_map(name).expect(name);
        let blocklist = Blocklist::new(take(names::BLOCKLIST_V4), take(names::BLOCKLIST_V6))
            .expect("blocklist maps");
        let maps = XdpMaps::new(
            take(names::FRONTENDS),
            take(names::CONFIG),
            take(names::STATS),
            blocklist,
        )
        .expect("XDP maps");
        maps.set_frontends(&[
            ((FRONTEND_V4, SMTP).into(), 0),
            ((FRONTEND_V6, SMTP).into(), 0),
            ((Ipv4Addr::UNSPECIFIED, SUBMISSION).into(), 1),
        ])
        .unwrap();
        maps.set_config(XdpConfig::NO_LIMIT).unwrap();
        Some(Program { ebpf, maps })
    }

    fn run(&self, frame: &[u8]) -> u32 {
        let program: &Xdp = self
            .ebpf
            .program(common::PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        result.return_value
    }

    fn block(&self, prefix: &str, expires_at: u32) {
        let prefix: Prefix = prefix.parse().unwrap();
        self.maps
            .blocklist()
            .insert(
                &prefix,
                BlockEntry::new(prefix.len(), expires_at, ORIGIN_COMMAND),
            )
            .unwrap();
    }
}

// ---- frames ----

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

/// Ethernet with `tags` (each a TPID, VLAN id 5) before `ethertype`.
fn eth(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for tpid in tags {
        frame.extend(tpid.to_be_bytes());
        frame.extend(5u16.to_be_bytes());
    }
    frame.extend(ethertype.to_be_bytes());
    frame.extend(payload);
    frame
}

fn tcp(dport: u16, flags: u8) -> Vec<u8> {
    let mut header = vec![0; 20];
    header[0..2].copy_from_slice(&40000u16.to_be_bytes());
    header[2..4].copy_from_slice(&dport.to_be_bytes());
    header[12] = 5 << 4;
    header[13] = flags;
    header
}

/// An IPv4 header with `options` (a multiple of 4 bytes) and the fragment field.
fn ipv4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    options: &[u8],
    fragment: u16,
    payload: &[u8],
) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let header_len = 20 + options.len();
    let mut packet = vec![0; 20];
    packet[0] = 0x40 | (header_len / 4) as u8;
    packet[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    packet[6..8].copy_from_slice(&fragment.to_be_bytes());
    packet[8] = 64;
    packet[9] = protocol;
    packet[12..16].copy_from_slice(&src.octets());
    packet[16..20].copy_from_slice(&dst.octets());
    packet.extend(options);
    packet.extend(payload);
    packet
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_with(src, dst, protocol, &[], 0, payload)
}

fn syn4(src: Ipv4Addr, dport: u16) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IP,
        &ipv4(src, FRONTEND_V4, TCP, &tcp(dport, SYN)),
    )
}

/// IPv6 whose payload starts with `next`: extension headers (from [`ext`],
/// [`fragment`]) then the upper-layer bytes.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = vec![0; 40];
    packet[0] = 0x60;
    packet[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    packet[6] = next;
    packet[7] = 64;
    packet[8..24].copy_from_slice(&src.octets());
    packet[24..40].copy_from_slice(&dst.octets());
    packet.extend(payload);
    packet
}

/// A hop-by-hop, routing or destination options header of `units` + 1 eight-byte
/// units (PadN filled).
fn ext(next: u8, units: u8) -> Vec<u8> {
    let mut header = vec![0; (usize::from(units) + 1) * 8];
    header[0] = next;
    header[1] = units;
    header[2] = 1; // PadN
    header[3] = (header.len() - 4) as u8;
    header
}

fn fragment(next: u8, offset_units: u16, more: bool) -> Vec<u8> {
    let mut header = vec![next, 0];
    header.extend((offset_units << 3 | u16::from(more)).to_be_bytes());
    header.extend([0, 0, 0x12, 0x34]);
    header
}

fn syn6(src: Ipv6Addr, dport: u16) -> Vec<u8> {
    eth(
        &[],
        ETH_P_IPV6,
        &ipv6(src, FRONTEND_V6, TCP, &tcp(dport, SYN)),
    )
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    /// Passed, and counted as malformed.
    Malformed,
    Drop,
}

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const ESP: u8 = 50;
const AH: u8 = 51;
const NO_NEXT: u8 = 59;
const DSTOPTS: u8 = 60;

/// Every frame of the verdict table, with what the program must do with it.
fn verdict_table() -> Vec<(&'static str, Vec<u8>, Expect)> {
    use Expect::*;
    let syn = tcp(SMTP, SYN);
    let v4_tcp = |src, payload: &[u8]| eth(&[], ETH_P_IP, &ipv4(src, FRONTEND_V4, TCP, payload));
    let v6_chain =
        |src, next, chain: &[u8]| eth(&[], ETH_P_IPV6, &ipv6(src, FRONTEND_V6, next, chain));
    let mut truncated_v6_ext = v6_chain(BLOCKED_V6, HOPOPTS, &concat(&[&ext(TCP, 0), &syn]));
    truncated_v6_ext.truncate(14 + 40 + 1);
    let chain_of = |n: usize| {
        let mut chain = Vec::new();
        for _ in 0..n {
            chain.extend(ext(DSTOPTS, 0));
        }
        let last = chain.len() - 8;
        chain[last] = TCP;
        chain.extend(&syn);
        chain
    };
    let mut ah = vec![TCP, 4, 0, 0]; // 4 + 2 units of 4 bytes: 24 bytes
    ah.resize(24, 0);
    let mut short_payload_len = ipv6(
        BLOCKED_V6,
        FRONTEND_V6,
        HOPOPTS,
        &concat(&[&ext(TCP, 1), &syn]),
    );
    short_payload_len[4..6].copy_from_slice(&8u16.to_be_bytes());
    let mut ihl_4 = ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn);
    ihl_4[0] = 0x44;
    let mut version_5 = ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn);
    version_5[0] = 0x55;
    let mut total_short = ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn);
    total_short[2..4].copy_from_slice(&19u16.to_be_bytes());
    let mut v6_version_4 = ipv6(BLOCKED_V6, FRONTEND_V6, TCP, &syn);
    v6_version_4[0] = 0x40;
    let cut = |mut frame: Vec<u8>, len: usize| {
        frame.truncate(len);
        frame
    };
    let options = [1u8; 8]; // eight NOPs
    let max_options = [1u8; 40];

    vec![
        // IPv4, plain
        (
            "v4 SYN from an allowed source",
            syn4(ALLOWED_V4, SMTP),
            Pass,
        ),
        ("v4 SYN from a blocked source", syn4(BLOCKED_V4, SMTP), Drop),
        (
            "v4 ACK from a blocked source",
            v4_tcp(BLOCKED_V4, &tcp(SMTP, ACK)),
            Drop,
        ),
        (
            "v4 SYN, blocked, to another port",
            syn4(BLOCKED_V4, 26),
            Pass,
        ),
        (
            "v4 SYN, blocked, to another address",
            eth(
                &[],
                ETH_P_IP,
                &ipv4(BLOCKED_V4, Ipv4Addr::new(192, 0, 2, 2), TCP, &syn),
            ),
            Pass,
        ),
        (
            "v4 SYN, blocked, to a wildcard frontend (0.0.0.0:587)",
            eth(
                &[],
                ETH_P_IP,
                &ipv4(
                    BLOCKED_V4,
                    Ipv4Addr::new(10, 9, 8, 7),
                    TCP,
                    &tcp(SUBMISSION, SYN),
                ),
            ),
            Drop,
        ),
        (
            "v4 UDP, blocked, to port 25",
            eth(&[], ETH_P_IP, &ipv4(BLOCKED_V4, FRONTEND_V4, UDP, &syn)),
            Pass,
        ),
        (
            "v4 ICMP, blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4(BLOCKED_V4, FRONTEND_V4, ICMP, &[8, 0, 0, 0]),
            ),
            Pass,
        ),
        // IPv4 options
        (
            "v4 with 8 bytes of options, blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &options, 0, &syn),
            ),
            Drop,
        ),
        (
            "v4 with 8 bytes of options, allowed",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(ALLOWED_V4, FRONTEND_V4, TCP, &options, 0, &syn),
            ),
            Pass,
        ),
        (
            "v4 with 40 bytes of options (IHL 15), blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &max_options, 0, &syn),
            ),
            Drop,
        ),
        // IPv4 malformed and truncated
        (
            "v4 with IHL 4, blocked",
            eth(&[], ETH_P_IP, &ihl_4),
            Malformed,
        ),
        (
            "v4 ethertype with version 5, blocked",
            eth(&[], ETH_P_IP, &version_5),
            Malformed,
        ),
        (
            "v4 total length under its header, blocked",
            eth(&[], ETH_P_IP, &total_short),
            Malformed,
        ),
        (
            "Ethernet header only (IPv4 ethertype)",
            eth(&[], ETH_P_IP, &[]),
            Malformed,
        ),
        (
            "v4 cut inside the IP header, blocked",
            cut(syn4(BLOCKED_V4, SMTP), 14 + 10),
            Malformed,
        ),
        (
            "v4 cut inside the ports, blocked",
            cut(syn4(BLOCKED_V4, SMTP), 14 + 20 + 3),
            Malformed,
        ),
        (
            "v4 cut before the TCP flags, blocked",
            cut(syn4(BLOCKED_V4, SMTP), 14 + 20 + 12),
            Malformed,
        ),
        (
            "v4 options longer than the frame, blocked",
            cut(
                eth(
                    &[],
                    ETH_P_IP,
                    &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &max_options, 0, &syn),
                ),
                14 + 30,
            ),
            Malformed,
        ),
        // IPv4 fragments
        (
            "v4 first fragment (MF, offset 0), blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &[], 0x2000, &syn),
            ),
            Drop,
        ),
        (
            "v4 tiny first fragment (8 bytes of TCP), blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &[], 0x2000, &syn[..8]),
            ),
            Drop,
        ),
        (
            "v4 non-first fragment, blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &[], 185, &syn),
            ),
            Pass,
        ),
        (
            "v4 last fragment (offset 1, no MF), blocked",
            eth(
                &[],
                ETH_P_IP,
                &ipv4_with(BLOCKED_V4, FRONTEND_V4, TCP, &[], 1, &syn),
            ),
            Pass,
        ),
        // VLAN
        (
            "802.1Q-tagged v4 SYN, blocked",
            eth(
                &[ETH_P_8021Q],
                ETH_P_IP,
                &ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn),
            ),
            Drop,
        ),
        (
            "802.1Q-tagged v4 SYN, allowed",
            eth(
                &[ETH_P_8021Q],
                ETH_P_IP,
                &ipv4(ALLOWED_V4, FRONTEND_V4, TCP, &syn),
            ),
            Pass,
        ),
        (
            "802.1ad + 802.1Q (QinQ) v4 SYN, blocked",
            eth(
                &[ETH_P_8021AD, ETH_P_8021Q],
                ETH_P_IP,
                &ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn),
            ),
            Drop,
        ),
        (
            "802.1Q-tagged v6 SYN, blocked",
            eth(
                &[ETH_P_8021Q],
                ETH_P_IPV6,
                &ipv6(BLOCKED_V6, FRONTEND_V6, TCP, &syn),
            ),
            Drop,
        ),
        (
            "three VLAN tags, blocked",
            eth(
                &[ETH_P_8021AD, ETH_P_8021Q, ETH_P_8021Q],
                ETH_P_IP,
                &ipv4(BLOCKED_V4, FRONTEND_V4, TCP, &syn),
            ),
            Pass,
        ),
        (
            "cut inside the VLAN tag",
            cut(eth(&[ETH_P_8021Q], ETH_P_IP, &[]), 15),
            Malformed,
        ),
        ("ARP", eth(&[], ETH_P_ARP, &[0; 28]), Pass),
        // IPv6
        (
            "v6 SYN from an allowed source",
            syn6(ALLOWED_V6, SMTP),
            Pass,
        ),
        ("v6 SYN from a blocked /48", syn6(BLOCKED_V6, SMTP), Drop),
        (
            "v6 SYN, blocked, to another port",
            syn6(BLOCKED_V6, 26),
            Pass,
        ),
        (
            "v6 cut inside the fixed header, blocked",
            cut(syn6(BLOCKED_V6, SMTP), 14 + 39),
            Malformed,
        ),
        (
            "v6 ethertype with version 4, blocked",
            eth(&[], ETH_P_IPV6, &v6_version_4),
            Malformed,
        ),
        (
            "v6 hop-by-hop, routing, destination options, blocked",
            v6_chain(
                BLOCKED_V6,
                HOPOPTS,
                &concat(&[&ext(ROUTING, 0), &ext(DSTOPTS, 2), &ext(TCP, 1), &syn]),
            ),
            Drop,
        ),
        (
            "v6 hop-by-hop, routing, destination options, allowed",
            v6_chain(
                ALLOWED_V6,
                HOPOPTS,
                &concat(&[&ext(ROUTING, 0), &ext(DSTOPTS, 2), &ext(TCP, 1), &syn]),
            ),
            Pass,
        ),
        (
            "v6 AH then TCP, blocked",
            v6_chain(BLOCKED_V6, AH, &concat(&[&ah, &syn])),
            Drop,
        ),
        (
            "v6 first fragment (offset 0), blocked",
            v6_chain(
                BLOCKED_V6,
                FRAGMENT,
                &concat(&[&fragment(TCP, 0, true), &syn]),
            ),
            Drop,
        ),
        (
            "v6 non-first fragment, blocked",
            v6_chain(
                BLOCKED_V6,
                FRAGMENT,
                &concat(&[&fragment(TCP, 10, false), &syn]),
            ),
            Pass,
        ),
        (
            "v6 hop-by-hop then fragment (offset 0), blocked",
            v6_chain(
                BLOCKED_V6,
                HOPOPTS,
                &concat(&[&ext(FRAGMENT, 0), &fragment(TCP, 0, true), &syn]),
            ),
            Drop,
        ),
        (
            "v6 eight extension headers, blocked",
            v6_chain(BLOCKED_V6, DSTOPTS, &chain_of(8)),
            Drop,
        ),
        (
            "v6 nine extension headers (over the walk), blocked",
            v6_chain(BLOCKED_V6, DSTOPTS, &chain_of(9)),
            Pass,
        ),
        (
            "v6 extension header past the payload length, blocked",
            eth(&[], ETH_P_IPV6, &short_payload_len),
            Malformed,
        ),
        (
            "v6 cut inside an extension header, blocked",
            truncated_v6_ext,
            Malformed,
        ),
        ("v6 ESP, blocked", v6_chain(BLOCKED_V6, ESP, &[0; 32]), Pass),
        (
            "v6 no next header, blocked",
            v6_chain(BLOCKED_V6, NO_NEXT, &[]),
            Pass,
        ),
        // Expiry
        (
            "v4 SYN from an expired /24",
            syn4(Ipv4Addr::new(203, 0, 113, 5), SMTP),
            Pass,
        ),
        (
            "v4 SYN under an expired /32 inside a blocked /24",
            syn4(Ipv4Addr::new(198, 51, 100, 7), SMTP),
            Drop,
        ),
        (
            "v4 SYN from a /32 expiring in an hour",
            syn4(Ipv4Addr::new(192, 0, 2, 200), SMTP),
            Drop,
        ),
    ]
}

#[test]
fn every_crafted_packet_gets_its_verdict_and_is_counted() {
    let Some(program) = Program::load() else {
        return;
    };
    let later = u32::try_from(boot_seconds() + 3600).unwrap();
    program.block("198.51.100.0/24", 0);
    program.block("198.51.100.7/32", 1); // expired long ago
    program.block("2001:db8:bad::/48", 0);
    program.block("203.0.113.0/24", 1);
    program.block("192.0.2.200/32", later);

    let mut failures = Vec::new();
    let table = verdict_table();
    for (what, frame, expected) in &table {
        let malformed_before = program.maps.stats().unwrap().malformed;
        let verdict = program.run(frame);
        let malformed = program.maps.stats().unwrap().malformed > malformed_before;
        let got = match (verdict, malformed) {
            (XDP_DROP, false) => Expect::Drop,
            (XDP_PASS, false) => Expect::Pass,
            (XDP_PASS, true) => Expect::Malformed,
            other => panic!("{what}: unexpected verdict {other:?}"),
        };
        let ok = if got == *expected { "ok" } else { "WRONG" };
        println!("{what:<58} {got:<9?} {ok}");
        if got != *expected {
            failures.push(format!("{what}: expected {expected:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    let count = |e: Expect| table.iter().filter(|(_, _, x)| *x == e).count() as u64;
    let stats = program.maps.stats().unwrap();
    assert_eq!(
        stats,
        XdpStats {
            passed: count(Expect::Pass) + count(Expect::Malformed),
            dropped_blocklist: count(Expect::Drop),
            dropped_syn_rate: 0,
            malformed: count(Expect::Malformed),
            // `block` makes command entries.
            dropped_by_origin: [0, 0, count(Expect::Drop), 0],
        }
    );
}

#[test]
fn syns_over_the_rate_are_dropped_per_source_and_nothing_else_is() {
    let Some(program) = Program::load() else {
        return;
    };
    // 4 a second, bursts of 3.
    program.maps.set_config(XdpConfig::syn_limit(4, 3)).unwrap();
    let a = Ipv4Addr::new(192, 0, 2, 10);
    let b = Ipv4Addr::new(192, 0, 2, 11);
    let verdicts =
        |frames: &[Vec<u8>]| -> Vec<u32> { frames.iter().map(|f| program.run(f)).collect() };

    let burst = vec![syn4(a, SMTP); 5];
    assert_eq!(
        verdicts(&burst),
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP, XDP_DROP]
    );
    // Not SYNs, another source, another port: untouched.
    let ack = eth(&[], ETH_P_IP, &ipv4(a, FRONTEND_V4, TCP, &tcp(SMTP, ACK)));
    let syn_ack = eth(
        &[],
        ETH_P_IP,
        &ipv4(a, FRONTEND_V4, TCP, &tcp(SMTP, SYN | ACK)),
    );
    assert_eq!(
        verdicts(&[ack, syn_ack, syn4(b, SMTP), syn4(a, 26)]),
        [XDP_PASS; 4]
    );
    // A quarter of a second buys one more SYN.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        verdicts(&[syn4(a, SMTP), syn4(a, SMTP)]),
        [XDP_PASS, XDP_DROP]
    );

    // IPv6 sources share a bucket per /64.
    let host = |last| Ipv6Addr::new(0x2001, 0xdb8, 7, 7, 0, 0, 0, last);
    let other_64 = Ipv6Addr::new(0x2001, 0xdb8, 7, 8, 0, 0, 0, 1);
    assert_eq!(
        verdicts(&[
            syn6(host(1), SMTP),
            syn6(host(2), SMTP),
            syn6(host(3), SMTP),
            syn6(host(4), SMTP)
        ]),
        [XDP_PASS, XDP_PASS, XDP_PASS, XDP_DROP]
    );
    assert_eq!(verdicts(&[syn6(other_64, SMTP)]), [XDP_PASS]);

    let stats = program.maps.stats().unwrap();
    assert_eq!(stats.dropped_syn_rate, 4);
    assert_eq!(stats.dropped_blocklist, 0);
    assert_eq!(stats.passed, 12);

    // Turned off: everything passes.
    program.maps.set_config(XdpConfig::NO_LIMIT).unwrap();
    assert_eq!(verdicts(&vec![syn4(a, SMTP); 10]), [XDP_PASS; 10]);
}

#[test]
fn a_blocked_source_is_dropped_before_its_rate_is_counted() {
    let Some(program) = Program::load() else {
        return;
    };
    program.maps.set_config(XdpConfig::syn_limit(1, 1)).unwrap();
    program.block("198.51.100.0/24", 0);
    for _ in 0..3 {
        assert_eq!(program.run(&syn4(BLOCKED_V4, SMTP)), XDP_DROP);
    }
    let stats = program.maps.stats().unwrap();
    assert_eq!((stats.dropped_blocklist, stats.dropped_syn_rate), (3, 0));
}

#[test]
fn frontends_can_be_replaced() {
    let Some(program) = Program::load() else {
        return;
    };
    program.block("198.51.100.0/24", 0);
    assert_eq!(program.run(&syn4(BLOCKED_V4, SMTP)), XDP_DROP);
    let moved = Ipv4Addr::new(192, 0, 2, 99);
    program
        .maps
        .set_frontends(&[((moved, SMTP).into(), 0)])
        .unwrap();
    assert_eq!(program.run(&syn4(BLOCKED_V4, SMTP)), XDP_PASS);
    assert_eq!(program.run(&syn4(BLOCKED_V4, SUBMISSION)), XDP_PASS);
    let to_moved = eth(
        &[],
        ETH_P_IP,
        &ipv4(BLOCKED_V4, moved, TCP, &tcp(SMTP, SYN)),
    );
    assert_eq!(program.run(&to_moved), XDP_DROP);
}

#[test]
fn the_blocklist_adds_finds_lists_and_removes_exact_prefixes() {
    let Some(program) = Program::load() else {
        return;
    };
    let list = program.maps.blocklist();
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    program.block("192.0.2.0/24", 0);
    program.block("2001:db8::/32", 0);
    assert_eq!(
        list.get(&p("192.0.2.0/24")).unwrap().map(|e| e.prefix_len),
        Some(24)
    );
    // A longer prefix inside is not "in the list".
    assert_eq!(list.get(&p("192.0.2.7")).unwrap(), None);
    assert_eq!(list.get(&p("192.0.0.0/16")).unwrap(), None);
    let listed: Vec<String> = list
        .entries()
        .unwrap()
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(listed, ["192.0.2.0/24", "2001:db8::/32"]);
    assert!(!list.remove(&p("192.0.2.7")).unwrap());
    assert!(list.remove(&p("192.0.2.0/24")).unwrap());
    assert!(!list.remove(&p("192.0.2.0/24")).unwrap());
}

#[test]
fn expired_entries_are_removed_and_live_ones_stay() {
    let Some(program) = Program::load() else {
        return;
    };
    let list = program.maps.blocklist();
    let now = boot_seconds();
    program.block("192.0.2.0/24", 0);
    program.block("198.51.100.0/24", u32::try_from(now - 1).unwrap());
    program.block("2001:db8::/32", u32::try_from(now + 3600).unwrap());
    program.block("2001:db8:1::/48", u32::try_from(now).unwrap());
    assert_eq!(list.remove_expired(now).unwrap(), 2);
    let left: Vec<String> = list
        .entries()
        .unwrap()
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(left, ["192.0.2.0/24", "2001:db8::/32"]);
}

#[test]
fn the_file_owns_its_entries_and_leaves_commands_alone() {
    let Some(program) = Program::load() else {
        return;
    };
    let list = program.maps.blocklist();
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    let set = |items: &[&str]| items.iter().map(|s| p(s)).collect::<BTreeSet<_>>();
    let later = u32::try_from(boot_seconds() + 3600).unwrap();
    program.block("203.0.113.0/24", 0); // a permanent command entry
    program.block("198.51.100.0/24", later); // a command entry with an expiry

    let file = set(&["192.0.2.0/24", "203.0.113.0/24", "198.51.100.0/24"]);
    assert_eq!(sync_file_entries(list, &file).unwrap(), (2, 0));
    let origin = |s: &str| list.get(&p(s)).unwrap().map(|e| (e.origin, e.expires_at));
    assert_eq!(origin("192.0.2.0/24"), Some((ORIGIN_FILE, 0)));
    assert_eq!(origin("203.0.113.0/24"), Some((ORIGIN_COMMAND, 0)));
    assert_eq!(
        origin("198.51.100.0/24"),
        Some((ORIGIN_FILE, 0)),
        "the file makes it permanent"
    );
    // Loading the same file again changes nothing.
    assert_eq!(sync_file_entries(list, &file).unwrap(), (0, 0));

    // The file shrinks: its own entries go, the command entry stays.
    assert_eq!(
        sync_file_entries(list, &set(&["203.0.113.0/24"])).unwrap(),
        (0, 2)
    );
    let left: Vec<String> = list
        .entries()
        .unwrap()
        .iter()
        .map(|(p, _)| p.to_string())
        .collect();
    assert_eq!(left, ["203.0.113.0/24"]);
}

#[test]
fn crowdsec_bans_come_and_go_and_never_touch_file_or_command_entries() {
    let Some(program) = Program::load() else {
        return;
    };
    let list = program.maps.blocklist();
    let p = |s: &str| s.parse::<Prefix>().unwrap();
    let end = u32::try_from(boot_seconds() + 3600).unwrap();
    let bans = |items: &[(&str, u32)]| -> std::collections::HashMap<Prefix, u32> {
        items.iter().map(|&(s, e)| (p(s), e)).collect()
    };
    program.block("203.0.113.0/24", 0); // the operator's
    sync_file_entries(list, &[p("192.0.2.0/24")].into_iter().collect()).unwrap();

    // Bans of an address and a range per family, and one on the operator's prefix.
    let wanted = bans(&[
        ("198.51.100.9", end),
        ("198.51.100.128/25", end),
        ("2001:db8:bad::/48", end),
        ("2001:db8::7", end + 60),
        ("203.0.113.0/24", end),
    ]);
    assert_eq!(
        sync_crowdsec_entries(list, &wanted).unwrap(),
        Synced {
            written: 4,
            removed: 0
        }
    );
    let entry = |s: &str| list.get(&p(s)).unwrap().map(|e| (e.origin, e.expires_at));
    assert_eq!(entry("198.51.100.9"), Some((ORIGIN_CROWDSEC, end)));
    assert_eq!(entry("2001:db8::7"), Some((ORIGIN_CROWDSEC, end + 60)));
    assert_eq!(entry("203.0.113.0/24"), Some((ORIGIN_COMMAND, 0)));
    assert_eq!(entry("192.0.2.0/24"), Some((ORIGIN_FILE, 0)));
    // The program drops the banned source, and counts it as CrowdSec's.
    assert_eq!(
        program.run(&syn4(Ipv4Addr::new(198, 51, 100, 9), SMTP)),
        XDP_DROP
    );
    assert_eq!(
        program.run(&syn6(
            Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1),
            SMTP
        )),
        XDP_DROP
    );
    let stats = program.maps.stats().unwrap();
    assert_eq!(stats.dropped_by(ORIGIN_CROWDSEC), 2);
    // Nothing changed: nothing written.
    assert_eq!(
        sync_crowdsec_entries(list, &wanted).unwrap(),
        Synced::default()
    );

    // One lifted, one lengthened; the file's and the operator's entries stay.
    let wanted = bans(&[
        ("198.51.100.128/25", end + 600),
        ("2001:db8:bad::/48", end),
        ("2001:db8::7", end + 60),
    ]);
    assert_eq!(
        sync_crowdsec_entries(list, &wanted).unwrap(),
        Synced {
            written: 1,
            removed: 1
        }
    );
    assert_eq!(entry("198.51.100.9"), None);
    assert_eq!(
        entry("198.51.100.128/25"),
        Some((ORIGIN_CROWDSEC, end + 600))
    );
    assert_eq!(
        program.run(&syn4(Ipv4Addr::new(198, 51, 100, 9), SMTP)),
        XDP_PASS
    );

    // An entry the operator made meanwhile is not overwritten by a new ban.
    program.block("198.51.100.9/32", 0);
    let mut wanted = wanted;
    wanted.insert(p("198.51.100.9"), end);
    assert_eq!(
        sync_crowdsec_entries(list, &wanted).unwrap(),
        Synced::default()
    );
    assert_eq!(entry("198.51.100.9"), Some((ORIGIN_COMMAND, 0)));

    // No bans at all: every CrowdSec entry leaves, nothing else does.
    assert_eq!(sync_crowdsec_entries(list, &bans(&[])).unwrap().removed, 3);
    let now = boot_seconds();
    let counts = OriginCounts::of(list.entries().unwrap().iter().map(|(_, e)| e), now);
    assert_eq!(
        counts,
        OriginCounts {
            file: 1,
            command: 2,
            crowdsec: 0
        }
    );
}
