//! A TCP client written by hand on a raw IPv4 socket, for segments the kernel's own
//! TCP would not send when asked: a retransmission that overlaps bytes the receiver
//! already has, as real networks produce after loss and reordering.
//!
//! The client namespace's kernel knows nothing of this connection and would answer
//! the peer's SYN-ACK with a reset: [`RawTcp::connect`] first installs an nftables
//! rule in the namespace that drops the kernel's resets from the client's port.
//! Everything runs inside the client namespace (in a thread from [`NetNs::run`]).
//!
//! [`NetNs::run`]: crate::lab::NetNs::run

use std::{
    io::{self, Write as _},
    mem,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;
/// How long the client waits for any one answer of the peer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
const WINDOW: u16 = 65_535;

/// One segment the peer sent to this client.
#[derive(Debug)]
struct Segment {
    seq: u32,
    ack: u32,
    flags: u8,
    payload_len: u32,
}

/// An established connection from `local` to `remote`, driven segment by segment.
pub struct RawTcp {
    socket: OwnedFd,
    local: SocketAddrV4,
    remote: SocketAddrV4,
    /// Our initial sequence number + 1: the sequence number of stream byte 0.
    stream_start: u32,
    /// The next sequence number the peer sends (what we acknowledge).
    peer_next: u32,
}

impl RawTcp {
    /// Drops this namespace's kernel resets from `local`'s port, then makes the
    /// three-way handshake with `remote`. Call inside the namespace that owns `local`.
    pub fn connect(local: SocketAddrV4, remote: SocketAddrV4) -> anyhow::Result<RawTcp> {
        drop_kernel_resets(local.port())?;
        // SAFETY: socket(2) with constant arguments; the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("socket(AF_INET, SOCK_RAW, TCP)");
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        set_receive_timeout(&socket, Duration::from_millis(200))?;
        let isn = 0x1000_0000u32 ^ u32::from(local.port()) << 8;
        let mut tcp = RawTcp {
            socket,
            local,
            remote,
            stream_start: isn.wrapping_add(1),
            peer_next: 0,
        };
        tcp.send(isn, SYN, &[])?;
        let syn_ack = tcp.wait_for("a SYN-ACK", |s| {
            s.flags & (SYN | ACK) == SYN | ACK && s.ack == isn.wrapping_add(1)
        })?;
        tcp.peer_next = syn_ack.seq.wrapping_add(1);
        tcp.send(tcp.stream_start, ACK, &[])?;
        Ok(tcp)
    }

    /// Sends `data` as one segment holding stream bytes `offset..offset + data.len()`,
    /// whatever the peer has already received.
    pub fn send_at(&self, offset: u32, data: &[u8]) -> anyhow::Result<()> {
        self.send(self.stream_start.wrapping_add(offset), ACK | PSH, data)
    }

    /// Waits until the peer has acknowledged stream bytes up to `end` (exclusive).
    pub fn wait_acked(&mut self, end: u32) -> anyhow::Result<()> {
        let want = self.stream_start.wrapping_add(end);
        self.wait_for(&format!("the ACK of {end} bytes"), |s| {
            s.flags & ACK != 0 && !seq_before(s.ack, want)
        })
        .map(drop)
    }

    /// Ends the stream after `len` bytes with a FIN, waits for the peer's FIN and
    /// acknowledges it: a clean close on both sides.
    pub fn close_after(&mut self, len: u32) -> anyhow::Result<()> {
        let fin_seq = self.stream_start.wrapping_add(len);
        self.send(fin_seq, FIN | ACK, &[])?;
        let fin = self.wait_for("the peer's FIN", |s| s.flags & FIN != 0)?;
        self.peer_next = fin.seq.wrapping_add(fin.payload_len).wrapping_add(1);
        self.send(fin_seq.wrapping_add(1), ACK, &[])
    }

    fn send(&self, seq: u32, flags: u8, payload: &[u8]) -> anyhow::Result<()> {
        let segment = build_segment(self.local, self.remote, seq, self.peer_next, flags, payload);
        // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
        let mut to: libc::sockaddr_in = unsafe { mem::zeroed() };
        to.sin_family = libc::AF_INET as libc::sa_family_t;
        to.sin_addr.s_addr = u32::from(*self.remote.ip()).to_be();
        // SAFETY: sendto(2) with a buffer and address that live across the call.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&raw const to).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if sent != segment.len() as isize {
            return Err(io::Error::last_os_error()).context("sending a raw TCP segment");
        }
        Ok(())
    }

    /// Reads the peer's segments until one matches `wanted`; fails on a reset or after
    /// [`ANSWER_TIMEOUT`].
    fn wait_for(
        &mut self,
        what: &str,
        wanted: impl Fn(&Segment) -> bool,
    ) -> anyhow::Result<Segment> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let mut buf = vec![0u8; 65_536];
        while Instant::now() < deadline {
            // SAFETY: recv(2) into a buffer we own, of its length.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("receiving on the raw socket");
            }
            let Some(segment) = parse_segment(&buf[..n as usize], self.remote, self.local) else {
                continue;
            };
            if segment.flags & RST != 0 {
                bail!("the peer reset the connection while we waited for {what}");
            }
            if wanted(&segment) {
                return Ok(segment);
            }
        }
        bail!("no {what} from {} within {ANSWER_TIMEOUT:?}", self.remote)
    }
}

/// `a` comes before `b` in sequence space.
fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// An nftables table in the current namespace that drops TCP resets from `port`.
/// It goes with the namespace.
fn drop_kernel_resets(port: u16) -> anyhow::Result<()> {
    let rules = format!(
        "table ip kgate_rawtcp {{\n  chain output {{\n    type filter hook output priority 0; \
         policy accept;\n    tcp sport {port} tcp flags & rst == rst drop\n  }}\n}}\n"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (Debian package nftables; `cargo xtask test` installs it)")?;
    nft.stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes())?;
    let out = nft.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft -f: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn set_receive_timeout(socket: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt(2) with a timeval that lives across the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP header without options, then `payload`, with the checksum over the IPv4
/// pseudo-header (the kernel adds the IP header).
fn build_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut segment = Vec::with_capacity(20 + payload.len());
    segment.extend_from_slice(&from.port().to_be_bytes());
    segment.extend_from_slice(&to.port().to_be_bytes());
    segment.extend_from_slice(&seq.to_be_bytes());
    let ack = if flags & ACK != 0 { ack } else { 0 };
    segment.extend_from_slice(&ack.to_be_bytes());
    segment.push(5 << 4); // data offset: 5 words, no options
    segment.push(flags);
    segment.extend_from_slice(&WINDOW.to_be_bytes());
    segment.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    segment.extend_from_slice(payload);
    let checksum = tcp_checksum(*from.ip(), *to.ip(), &segment);
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

fn tcp_checksum(from: Ipv4Addr, to: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len() + 1);
    pseudo.extend_from_slice(&from.octets());
    pseudo.extend_from_slice(&to.octets());
    pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The TCP segment in IPv4 `packet` when it goes from `from` to `to`.
fn parse_segment(packet: &[u8], from: SocketAddrV4, to: SocketAddrV4) -> Option<Segment> {
    let ihl = usize::from(*packet.first()? & 0x0f) * 4;
    if packet.len() < ihl + 20 || packet[9] != libc::IPPROTO_TCP as u8 {
        return None;
    }
    let source = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let destination = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let tcp = &packet[ihl..];
    let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
    let word = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
    if source != *from.ip()
        || destination != *to.ip()
        || port(0) != from.port()
        || port(2) != to.port()
    {
        return None;
    }
    let data_offset = usize::from(tcp[12] >> 4) * 4;
    Some(Segment {
        seq: word(4),
        ack: word(8),
        flags: tcp[13],
        payload_len: tcp.len().saturating_sub(data_offset) as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_segment_checks_out_and_parses_back() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40_000);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 2525);
        let segment = build_segment(from, to, 7, 9, ACK | PSH, b"hello");
        // A segment with its checksum in place sums to zero (all ones, complemented).
        assert_eq!(tcp_checksum(*from.ip(), *to.ip(), &segment), 0);
        let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0];
        packet.extend_from_slice(&from.ip().octets());
        packet.extend_from_slice(&to.ip().octets());
        packet.extend_from_slice(&segment);
        let parsed = parse_segment(&packet, from, to).expect("our own segment");
        assert_eq!((parsed.seq, parsed.ack, parsed.flags), (7, 9, ACK | PSH));
        assert_eq!(parsed.payload_len, 5);
        assert!(parse_segment(&packet, to, from).is_none(), "the other way");
    }

    #[test]
    fn sequence_order_wraps_around() {
        assert!(seq_before(1, 2));
        assert!(seq_before(u32::MAX, 0));
        assert!(!seq_before(2, 2));
        assert!(!seq_before(0, u32::MAX));
    }
}
