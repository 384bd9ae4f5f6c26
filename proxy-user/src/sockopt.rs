//! Socket options and calls no crate wraps: TCP_INFO, SIOCOUTQ, SO_RCVLOWAT and a
//! zero-timeout poll. Once a connection is spliced, userspace sees none of its bytes;
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

/// Bytes in the send queue, sent or not, that the peer has not acknowledged.
pub fn unacknowledged_bytes(socket: impl AsFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(socket.as_fd().as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Every byte ever written into the socket's send queue (plus a constant that
/// depends on the handshake): compare two readings, never a reading with zero.
///
/// TCP_INFO is read before SIOCOUTQ: bytes acknowledged between the two readings then
/// make the sum too small, never too large, so a caller waiting for the sum to reach
/// a target never stops early.
pub fn bytes_written(socket: impl AsFd) -> io::Result<u64> {
    let acked = tcp_counters(socket.as_fd())?.bytes_acked;
    Ok(acked + unacknowledged_bytes(socket)?)
}

pub fn set_receive_low_watermark(socket: impl AsFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: SO_RCVLOWAT reads one int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
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
        let written_before = bytes_written(&client).unwrap();

        client.write_all(&[7; 1000]).unwrap();
        let mut buf = [0; 1000];
        server.read_exact(&mut buf).unwrap();

        assert_eq!(bytes_written(&client).unwrap() - written_before, 1000);
        assert_eq!(tcp_counters(&server).unwrap().bytes_received, 1000);
        set_receive_low_watermark(&server, 1).unwrap();
    }
}
