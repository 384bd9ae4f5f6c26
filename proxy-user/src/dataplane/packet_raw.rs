//! Segments kgate writes itself for forwarded connections, whole, to raw sockets: its
//! own sockets of a flow are in repair mode and cannot send.
//!
//! - Resets: at a timeout or at shutdown, kgate resets both peers of a flow. A reset
//!   is taken only at the sequence number its receiver expects next (RFC 5961): kgate
//!   sends it where the receiver's stream stands by the bytes forwarded to it. If the
//!   receiver had not acknowledged all of them, it answers with a challenge ACK,
//!   which finds no rule and no socket any more: the kernel then resets it itself, at
//!   the number that ACK gives.
//! - Window updates: a connection held before its handoff had its peers' windows
//!   closed (see `HOLD`); right after the handoff each peer gets the ACK it already
//!   had, with the window the other peer last announced, so that it sends again at
//!   once rather than at its next zero-window probe.
//!
//! Every such segment carries `INJECTED_MARK`, which the egress program lets out.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use proxy_common::packet::{DOWN, FIN_SEEN, FlowKey, INJECTED_MARK, Progress, UP};
use tracing::debug;

use crate::interfaces::unmapped;

const IPPROTO_TCP: u8 = 6;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const TCP_HEADER: usize = 20;
/// NOP, NOP, then the timestamp option (kind 8, length 10).
const TIMESTAMP_OPTION: usize = 12;

/// Raw IPv4 and IPv6 sockets (IPPROTO_RAW: the header is kgate's).
pub struct RawSegments {
    v4: OwnedFd,
    v6: OwnedFd,
}

/// A segment to write: a bare RST, or an ACK with a window and, when the connection
/// has them, timestamps (TSval, TSecr).
struct Segment {
    from: SocketAddr,
    to: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    timestamps: Option<(u32, u32)>,
}

/// What a window update says to one peer: the sequence numbers of the gateway's
/// socket facing it, and what that peer may send from its acknowledged point.
pub struct WindowUpdate {
    /// The gateway's address of the connection, and the peer's.
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    /// In the peer's units: shifted by the scale the gateway announced to it.
    pub window: u16,
    /// (TSval, TSecr), when the connection has timestamps: the gateway socket's
    /// clock, and what it last echoed (0 when unknown, which only RTT sampling uses).
    pub timestamps: Option<(u32, u32)>,
}

impl RawSegments {
    /// Opens the raw sockets; needs CAP_NET_RAW (and CAP_NET_ADMIN for their mark).
    pub fn open() -> io::Result<RawSegments> {
        let open = |family| {
            // SAFETY: socket(2) with constant arguments; the fd is owned below.
            let fd = unsafe {
                libc::socket(
                    family,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_RAW,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new fd, owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let mark = INJECTED_MARK;
            // SAFETY: setsockopt reads one u32 from `mark`.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    (&raw const mark).cast(),
                    size_of::<u32>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(fd)
        };
        Ok(RawSegments {
            v4: open(libc::AF_INET)?,
            v6: open(libc::AF_INET6)?,
        })
    }

    /// Resets the client and the server of a flow whose rules were keyed `keys` (as
    /// segments arrive from the client, from the server) and that was handed off with
    /// the gateway's sockets at `next_seq` (client side, server side).
    pub fn reset_both(&self, keys: &[FlowKey; 2], next_seq: [u32; 2], progress: &Progress) {
        for (key, seq, toward) in [
            // To the client: its stream from the gateway went on by what came from the
            // server.
            (
                &keys[UP as usize],
                next_seq[0],
                &progress.direction[DOWN as usize],
            ),
            (
                &keys[DOWN as usize],
                next_seq[1],
                &progress.direction[UP as usize],
            ),
        ] {
            let fin = u32::from(toward.flags & FIN_SEEN != 0);
            let seq = seq.wrapping_add(toward.bytes as u32).wrapping_add(fin);
            // The peer's segments arrive as `key`: the reset goes the other way.
            let segment = Segment {
                from: address(key.destination, key.destination_port),
                to: address(key.source, key.source_port),
                seq,
                ack: 0,
                flags: TCP_RST,
                window: 0,
                timestamps: None,
            };
            if let Err(e) = self.send(&segment) {
                debug!(to = %segment.to, "sending a reset: {e}");
            }
        }
    }

    /// Opens a peer's window again (see the module docs).
    pub fn update_window(&self, update: &WindowUpdate) -> io::Result<()> {
        self.send(&Segment {
            from: update.from,
            to: update.to,
            seq: update.seq,
            ack: update.ack,
            flags: TCP_ACK,
            window: update.window,
            timestamps: update.timestamps,
        })
    }

    fn send(&self, segment: &Segment) -> io::Result<()> {
        let tcp = tcp_bytes(segment);
        let (from, to) = (unmapped(segment.from.ip()), unmapped(segment.to.ip()));
        match (from, to) {
            (IpAddr::V4(source), IpAddr::V4(destination)) => {
                let mut packet = vec![0u8; 20];
                packet[0] = 0x45;
                packet[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
                packet[6] = 0x40; // don't fragment
                packet[8] = 64;
                packet[9] = IPPROTO_TCP;
                packet[12..16].copy_from_slice(&source.octets());
                packet[16..20].copy_from_slice(&destination.octets());
                // The kernel fills in the IP checksum and identification.
                packet.extend_from_slice(&tcp);
                let address = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(destination).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                send_to(&self.v4, &packet, &address)
            }
            (IpAddr::V6(source), IpAddr::V6(destination)) => {
                let mut packet = vec![0u8; 40];
                packet[0] = 0x60;
                packet[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
                packet[6] = IPPROTO_TCP;
                packet[7] = 64;
                packet[8..24].copy_from_slice(&source.octets());
                packet[24..40].copy_from_slice(&destination.octets());
                packet.extend_from_slice(&tcp);
                let address = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: destination.octets(),
                    },
                    sin6_scope_id: 0,
                };
                send_to(&self.v6, &packet, &address)
            }
            _ => Err(io::Error::other("mixed address families")),
        }
    }
}

/// The TCP header of `segment` (with its options), its checksum over the
/// pseudo-header.
fn tcp_bytes(segment: &Segment) -> Vec<u8> {
    let length = TCP_HEADER + segment.timestamps.map_or(0, |_| TIMESTAMP_OPTION);
    let mut tcp = vec![0u8; length];
    tcp[0..2].copy_from_slice(&segment.from.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&segment.to.port().to_be_bytes());
    tcp[4..8].copy_from_slice(&segment.seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&segment.ack.to_be_bytes());
    tcp[12] = (length as u8 / 4) << 4;
    tcp[13] = segment.flags;
    tcp[14..16].copy_from_slice(&segment.window.to_be_bytes());
    if let Some((tsval, tsecr)) = segment.timestamps {
        tcp[20..24].copy_from_slice(&[1, 1, 8, 10]);
        tcp[24..28].copy_from_slice(&tsval.to_be_bytes());
        tcp[28..32].copy_from_slice(&tsecr.to_be_bytes());
    }
    let mut sum = 0u32;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    let (from, to) = (unmapped(segment.from.ip()), unmapped(segment.to.ip()));
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
        }
        (s, d) => {
            add(&mapped_octets(s));
            add(&mapped_octets(d));
        }
    }
    add(&[0, IPPROTO_TCP]);
    add(&(length as u16).to_be_bytes());
    add(&tcp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    tcp[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tcp
}

fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A flow key's address and port back as a socket address (IPv4 from IPv4-mapped).
pub fn address(ip: [u8; 16], port: u16) -> SocketAddr {
    let v6 = std::net::Ipv6Addr::from(ip);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    SocketAddr::new(ip, u16::from_be_bytes(port.to_ne_bytes()))
}

fn send_to<A>(socket: &OwnedFd, packet: &[u8], address: &A) -> io::Result<()> {
    // SAFETY: sendto reads `packet` and the socket address, both valid for the call.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (address as *const A).cast(),
            size_of::<A>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum of a whole segment with its pseudo-header, computed the plain way.
    fn verify(from: SocketAddr, to: SocketAddr, tcp: &[u8]) -> u16 {
        let mut bytes = Vec::new();
        match (from.ip(), to.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                bytes.extend(s.octets());
                bytes.extend(d.octets());
            }
            (s, d) => {
                bytes.extend(mapped_octets(s));
                bytes.extend(mapped_octets(d));
            }
        }
        bytes.extend([0, IPPROTO_TCP]);
        bytes.extend((tcp.len() as u16).to_be_bytes());
        bytes.extend(tcp);
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn resets_and_window_updates_carry_their_fields_and_a_checksum_that_adds_up() {
        for (from, to) in [
            ("10.0.0.1:25", "192.0.2.7:40000"),
            ("[2001:db8::1]:993", "[2001:db8::9]:51000"),
        ] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
            for timestamps in [None, Some((0x0102_0304, 0))] {
                let segment = Segment {
                    from,
                    to,
                    seq: 0xdead_beef,
                    ack: 0x0bad_cafe,
                    flags: TCP_ACK,
                    window: 0x1234,
                    timestamps,
                };
                let tcp = tcp_bytes(&segment);
                assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), from.port());
                assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), to.port());
                assert_eq!(
                    u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
                    0xdead_beef
                );
                assert_eq!(
                    u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
                    0x0bad_cafe
                );
                assert_eq!(usize::from(tcp[12] >> 4) * 4, tcp.len());
                assert_eq!(u16::from_be_bytes([tcp[14], tcp[15]]), 0x1234);
                if timestamps.is_some() {
                    assert_eq!(tcp[20..26], [1, 1, 8, 10, 1, 2]);
                }
                assert_eq!(
                    verify(from, to, &tcp),
                    0xffff,
                    "a valid checksum sums to all ones"
                );
            }
        }
    }

    #[test]
    fn flow_key_addresses_come_back_as_they_went_in() {
        let v4: SocketAddr = "10.200.1.2:40000".parse().unwrap();
        let IpAddr::V4(ip) = v4.ip() else {
            unreachable!()
        };
        let port = u16::from_ne_bytes(v4.port().to_be_bytes());
        assert_eq!(address(ip.to_ipv6_mapped().octets(), port), v4);
    }
}
