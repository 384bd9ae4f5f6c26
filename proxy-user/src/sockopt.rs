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
    Ok(TcpCounters {
        bytes_received: info.tcpi_bytes_received,
        bytes_acked: info.tcpi_bytes_acked,
        since_data_received: Duration::from_millis(info.tcpi_last_data_recv.into()),
    })
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
}
