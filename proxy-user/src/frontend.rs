//! Listening on a frontend's addresses (accepting is the daemon's: a reload may hand
//! an address to another frontend).

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

const LISTEN_BACKLOG: i32 = 4096;

/// Binds one exact address. IPv6 sockets take IPv6 only, so `[::]:25` and
/// `0.0.0.0:25` can both be listened on.
pub fn bind(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}
