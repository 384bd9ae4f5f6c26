//! Socket options and calls no crate wraps: TCP_INFO, SIOCOUTQ, SO_RCVLOWAT,
//! SO_SNDBUFFORCE and a zero-timeout poll. Once a connection is spliced, userspace sees none of its bytes;
//! these counters are how it still knows how far each direction has got.

use std::{io, mem, os::fd::AsFd, os::fd::AsRawFd, time::Duration};

/// The counters of TCP_INFO that kgate uses.
#[derive(Clone, Copy, Debug)]
pub struct TcpCounters {
    /// Bytes received in order from the peer (the FIN not counted).
    pub bytes_received: u64,
    /// Bytes this socket has sent that the peer acknowledged.
    pub bytes_acked: u64,
    /// Time since the socket last received data.
    pub since_data_received: Duration,
}

pub fn tcp_counters(socket: impl AsFd) -> io::Result<TcpCounters> {
    let info = tcp_info(socket)?;
    Ok(TcpCounters {
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        since_data_received: Duration::from_millis(info.tcpi_last_data_recv.into()),
    })
}

fn tcp_info(socket: impl AsFd) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Where a socket's sending stands.
#[derive(Clone, Copy, Debug)]
pub struct SendQueue {
    /// Every byte ever written into the send queue (plus a constant that depends on
    /// the handshake): compare two readings, never a reading with zero.
    pub written: u64,
    /// Bytes in the send queue, sent or not, that the peer has not acknowledged.
    pub unacked: u64,
}

/// TCP_INFO is read before SIOCOUTQ: bytes acknowledged between the two readings then
/// make `written` too small, never too large, so a caller waiting for it to reach a
/// target never stops early.
pub fn send_queue(socket: impl AsFd) -> io::Result<SendQueue> {
    let acked = tcp_counters(socket.as_fd())?.bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let unacked = u64::try_from(queued).unwrap_or(0);
    Ok(SendQueue {
        written: acked + unacked,
        unacked,
    })
}

/// Sets the send buffer to `bytes` whatever `net.core.wmem_max` says (SO_SNDBUFFORCE,
/// CAP_NET_ADMIN); the kernel doubles the value for its own overhead, and stops tuning
/// it by itself.
pub fn force_send_buffer(socket: impl AsFd, bytes: u64) -> io::Result<()> {
    let bytes = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX / 2);
    set_int(socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

pub fn set_receive_low_watermark(socket: impl AsFd, bytes: libc::c_int) -> io::Result<()> {
    set_int(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

fn set_int(
    socket: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option reads one int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes received and not read yet (SIOCINQ).
pub fn unread_bytes(socket: impl AsFd) -> io::Result<u64> {
    let mut unread: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one int.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::FIONREAD, &mut unread) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(unread).unwrap_or(0))
}

/// What the handoff to the packet data plane reads of a connection in TCP_INFO.
#[derive(Clone, Copy, Debug)]
pub struct TcpShape {
    pub established: bool,
    pub timestamps: bool,
    pub window_scaling: bool,
    /// The peer's window scale (applies to the windows it sends).
    pub peer_window_scale: u8,
    /// The scale this socket announced (applies to the windows it sends).
    pub own_window_scale: u8,
    /// The MSS this socket announced to its peer.
    pub announced_mss: u32,
    /// The MSS it sends with (the peer's, within the path MTU, less options).
    pub send_mss: u32,
}

pub fn tcp_shape(socket: impl AsFd) -> io::Result<TcpShape> {
    const TCP_ESTABLISHED: u8 = 1;
    const TCPI_OPT_TIMESTAMPS: u8 = 1;
    const TCPI_OPT_WSCALE: u8 = 4;
    let info = tcp_info(socket)?;
    Ok(TcpShape {
        established: info.tcpi_state == TCP_ESTABLISHED,
        timestamps: info.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
        window_scaling: info.tcpi_options & TCPI_OPT_WSCALE != 0,
        // Two 4-bit fields, tcpi_snd_wscale in the low bits.
        peer_window_scale: info.tcpi_snd_rcv_wscale & 0x0f,
        own_window_scale: info.tcpi_snd_rcv_wscale >> 4,
        announced_mss: info.tcpi_advmss,
        send_mss: info.tcpi_snd_mss,
    })
}

/// A socket put in repair mode (CAP_NET_ADMIN) by [`enter_repair`]: it transmits
/// nothing of its own, its sequence numbers can be read, and closing it sends neither
/// FIN nor RST.
pub struct Repaired {
    /// SO_REUSEADDR before: the kernel clears it when the socket leaves repair mode.
    reuse_address: bool,
}

pub fn enter_repair(socket: impl AsFd) -> io::Result<Repaired> {
    let socket = socket.as_fd();
    let reuse_address = get_u32(socket, libc::SOL_SOCKET, libc::SO_REUSEADDR)? != 0;
    set_int(socket, libc::IPPROTO_TCP, libc::TCP_REPAIR, 1)?;
    Ok(Repaired { reuse_address })
}

impl Repaired {
    /// Takes the socket out of repair mode, as it was. SO_REUSEADDR comes back too:
    /// without it, the TIME_WAIT the socket may end in would keep its address from a
    /// new listener (a restarted kgate's) for a minute.
    pub fn leave(&self, socket: impl AsFd) -> io::Result<()> {
        /// Leaves repair mode without the window probe the kernel otherwise sends.
        const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
        let socket = socket.as_fd();
        set_int(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR,
            TCP_REPAIR_OFF_NO_WP,
        )?;
        set_int(
            socket,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            libc::c_int::from(self.reuse_address),
        )
    }
}

/// A socket's sequence numbers and timestamp clock, read in repair mode.
#[derive(Clone, Copy, Debug)]
pub struct Sequence {
    /// The next sequence number it expects from its peer.
    pub receive_next: u32,
    /// The sequence number of the next byte it would send.
    pub send_next: u32,
    /// Its TCP timestamp clock now (what it would send as TSval).
    pub ts_clock: u32,
    /// The window its peer last announced to it, in bytes.
    pub send_window: u32,
}

pub fn sequence(socket: impl AsFd) -> io::Result<Sequence> {
    const TCP_RECV_QUEUE: libc::c_int = 1;
    const TCP_SEND_QUEUE: libc::c_int = 2;
    let socket = socket.as_fd();
    set_int(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
    )?;
    let receive_next = get_u32(socket, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
    set_int(
        socket,
        libc::IPPROTO_TCP,
        libc::TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
    )?;
    let send_next = get_u32(socket, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
    let ts_clock = get_u32(socket, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)?;
    // struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    let mut window = [0u32; 5];
    let mut len = mem::size_of_val(&window) as libc::socklen_t;
    // SAFETY: the option writes at most `len` bytes into `window`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_REPAIR_WINDOW,
            window.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Sequence {
        receive_next,
        send_next,
        ts_clock,
        send_window: window[1],
    })
}

fn get_u32(socket: impl AsFd, level: libc::c_int, name: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: the option writes at most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Whether the socket is readable, at its end, or failed, as poll(2) says right now.
/// Unlike a read or SO_ERROR, this leaves a pending error for the next reader.
pub fn has_events(socket: impl AsFd) -> io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: socket.as_fd().as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call; a zero timeout never blocks.
    match unsafe { libc::poll(&mut poll, 1, 0) } {
        -1 => Err(io::Error::last_os_error()),
        ready => Ok(ready > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    #[test]
    fn counters_follow_the_bytes_of_a_loopback_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let written_before = send_queue(&client).unwrap().written;

        client.write_all(&[7; 1000]).unwrap();
        let mut buf = [0; 1000];
        server.read_exact(&mut buf).unwrap();

        assert_eq!(send_queue(&client).unwrap().written - written_before, 1000);
        assert_eq!(tcp_counters(&server).unwrap().bytes_received, 1000);
        set_receive_low_watermark(&server, 1).unwrap();
    }

    #[test]
    fn a_socket_leaves_repair_mode_with_the_reuse_address_it_had() {
        let listener =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        listener.set_reuse_address(true).unwrap();
        listener
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        listener.listen(1).unwrap();
        let address = listener.local_addr().unwrap().as_socket().unwrap();
        let client = TcpStream::connect(address).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        for (socket, reuse) in [(accepted.as_fd(), true), (client.as_fd(), false)] {
            let repaired = match enter_repair(socket) {
                Ok(repaired) => repaired,
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    eprintln!("skipped: repair mode needs CAP_NET_ADMIN");
                    return;
                }
                Err(e) => panic!("entering repair mode: {e}"),
            };
            repaired.leave(socket).unwrap();
            let now = get_u32(socket, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap();
            assert_eq!(now != 0, reuse);
        }
    }
}
