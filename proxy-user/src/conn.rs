//! One client connection, from accept to its log line.

use std::{
    fmt,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::info;

use crate::{
    dataplane::{End, Transfer},
    gateway::Gateway,
    proxy_header, upstream,
};

/// How a connection ended, as its log line says.
#[derive(Debug)]
enum Outcome {
    Relayed(Transfer),
    /// No server of the backend could be connected.
    NoServer,
    /// The server failed before the relay began (while taking the header).
    ServerFailed(std::io::Error),
}

pub async fn handle(gateway: Arc<Gateway>, frontend: usize, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let frontend = &gateway.config.frontends[frontend];
    let backend_index = frontend.backend;
    let backend = &gateway.config.backends[backend_index];
    let _ = client.set_nodelay(true);

    let order = gateway.balancers[backend_index].order(backend.servers.len());
    let mut server_name = "-";
    let outcome = match upstream::connect(backend, order).await {
        None => Outcome::NoServer,
        Some(upstream::Upstream { mut stream, server }) => {
            server_name = &backend.servers[server].name;
            match send_header(&mut stream, backend, &client, peer).await {
                Err(e) => Outcome::ServerFailed(e),
                Ok(()) => Outcome::Relayed(gateway.dataplane.relay(&client, &stream).await),
            }
        }
    };
    info!(
        target: "kgate::conn",
        "{peer} {} {}/{server_name} {outcome} {}ms",
        frontend.name,
        backend.name,
        Duration::as_millis(&started.elapsed()),
    );
}

async fn send_header(
    server: &mut TcpStream,
    backend: &crate::config::Backend,
    client: &TcpStream,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let local = client.local_addr()?;
    match proxy_header::for_connection(backend.proxy_protocol, peer, local) {
        Some(header) => server.write_all(&header).await,
        None => Ok(()),
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Relayed(t) => write!(
                f,
                "{} bytes_in={} bytes_out={} end=\"{}\"",
                t.path, t.from_client, t.from_server, t.end
            ),
            Outcome::NoServer => f.write_str("- bytes_in=0 bytes_out=0 end=\"no server\""),
            Outcome::ServerFailed(e) => write!(
                f,
                "- bytes_in=0 bytes_out=0 end=\"{}: {e}\"",
                End::ServerReset
            ),
        }
    }
}
