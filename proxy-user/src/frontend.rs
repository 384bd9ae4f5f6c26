//! Listening on a frontend's addresses and accepting clients.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tracing::warn;

use crate::{conn, gateway::Gateway};

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

/// Accepts clients of frontend `frontend` on `listener` forever, a task each.
pub async fn serve(gateway: Arc<Gateway>, frontend: usize, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                tokio::spawn(conn::handle(gateway.clone(), frontend, client, peer));
            }
            Err(e) => {
                // Out of file descriptors or memory: back off instead of spinning.
                warn!(
                    frontend = %gateway.config.frontends[frontend].name,
                    "accept failed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
