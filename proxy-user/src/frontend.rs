//! Listening on a frontend's addresses (accepting is the daemon's: a reload may hand
//! an address to another frontend).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

const LISTEN_BACKLOG: i32 = 4096;

/// Binds one exact address. IPv6 sockets take IPv6 only, so `[::]:25` and
/// `0.0.0.0:25` can both be listened on.
///
/// With `freebind` (`IP_FREEBIND`, `IPV6_FREEBIND`) the address need not be on this
/// host: the backup of a VRRP pair listens on the virtual address before keepalived
/// brings it, and the kernel hands it the clients once it does. Nothing else in kgate
/// looks at which addresses the host has.
pub fn bind(address: SocketAddr, freebind: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if freebind {
        if address.is_ipv6() {
            socket.set_freebind_v6(true)?;
        } else {
            socket.set_freebind_v4(true)?;
        }
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 192.0.2.1 (TEST-NET-1) and 2001:db8::1 are on no host; nothing is sent to them.
    #[tokio::test]
    async fn freebind_listens_on_an_address_this_host_does_not_have() {
        for address in ["192.0.2.1:2525", "[2001:db8::1]:2525"] {
            let address: SocketAddr = address.parse().unwrap();
            let error = bind(address, false).expect_err("not a local address");
            assert_eq!(error.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{address}");
            let listener = bind(address, true).unwrap_or_else(|e| panic!("{address}: {e}"));
            assert_eq!(listener.local_addr().unwrap(), address);
        }
    }
}
