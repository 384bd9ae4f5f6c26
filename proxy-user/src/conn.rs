//! One client connection, from accept to its log line.
//!
//! The log line, one per connection, as HAProxy's tcplog gives it:
//! `CLIENT FRONTEND BACKEND/SERVER PATH bytes_in=N bytes_out=N end="CAUSE" DURATIONms`
//! where PATH says how the bytes moved (`spliced`, `copied`, `half-spliced`, or `-`
//! when none did) and CAUSE is one of `client closed`, `server closed`, `client
//! reset`, `server reset`, `idle timeout`, `half-closed timeout`, `no server`,
//! `over limit: ...`, or `server failed: ...` (before the relay began).

use std::{
    fmt,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::info;

use crate::{
    admission::Refusal,
    balance,
    config::Backend,
    daemon::Daemon,
    dataplane::{Timeouts, Transfer},
    gateway::Gateway,
    proxy_header, upstream,
};

/// How a connection ended.
#[derive(Debug)]
enum Outcome {
    Relayed(Transfer),
    /// Closed at once: a limit of the frontend was reached.
    Refused(Refusal),
    /// No server of the backend could be connected.
    NoServer,
    /// The server failed before the relay began (while taking the header).
    ServerFailed(std::io::Error),
}

pub async fn handle(
    daemon: &Daemon,
    gateway: Arc<Gateway>,
    frontend: usize,
    client: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let load = &gateway.loads[frontend];
    let frontend = &gateway.config.frontends[frontend];
    let backend_index = frontend.backend;
    let backend = &gateway.config.backends[backend_index];

    let mut server_name = "-";
    let outcome = match load.admit(frontend, peer.ip().to_canonical()) {
        Err(refusal) => Outcome::Refused(refusal),
        Ok(_admitted) => {
            let _ = client.set_nodelay(true);
            let pool = &gateway.pools[backend_index];
            let order = balance::order(pool, backend, peer.ip().to_canonical());
            match upstream::connect(backend, &order).await {
                None => {
                    pool.counters.no_server.fetch_add(1, Ordering::Relaxed);
                    Outcome::NoServer
                }
                Some(upstream::Upstream { mut stream, server }) => {
                    server_name = &backend.servers[server].name;
                    let runtime = &pool.servers[server];
                    runtime.total.fetch_add(1, Ordering::Relaxed);
                    runtime.active.fetch_add(1, Ordering::Relaxed);
                    let outcome = match send_header(&mut stream, backend, &client, peer).await {
                        Err(e) => Outcome::ServerFailed(e),
                        Ok(()) => {
                            let timeouts = Timeouts {
                                idle: frontend.idle_timeout,
                                half_closed: frontend.half_closed_timeout,
                            };
                            let transfer = daemon
                                .dataplane
                                .relay(
                                    &client,
                                    &stream,
                                    backend.queue_limit,
                                    runtime.slot,
                                    timeouts,
                                )
                                .await;
                            load.bytes_in
                                .fetch_add(transfer.from_client, Ordering::Relaxed);
                            load.bytes_out
                                .fetch_add(transfer.from_server, Ordering::Relaxed);
                            runtime
                                .copied_in
                                .fetch_add(transfer.copied_from_client, Ordering::Relaxed);
                            runtime
                                .copied_out
                                .fetch_add(transfer.copied_from_server, Ordering::Relaxed);
                            Outcome::Relayed(transfer)
                        }
                    };
                    runtime.active.fetch_sub(1, Ordering::Relaxed);
                    outcome
                }
            }
        }
    };
    info!(
        target: "kgate::conn",
        "{peer} {} {}/{server_name} {outcome} {}ms",
        frontend.name,
        backend.name,
        started.elapsed().as_millis(),
    );
}

async fn send_header(
    server: &mut TcpStream,
    backend: &Backend,
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
            Outcome::Refused(refusal) => {
                write!(f, "- bytes_in=0 bytes_out=0 end=\"{refusal}\"")
            }
            Outcome::NoServer => f.write_str("- bytes_in=0 bytes_out=0 end=\"no server\""),
            Outcome::ServerFailed(e) => {
                write!(f, "- bytes_in=0 bytes_out=0 end=\"server failed: {e}\"")
            }
        }
    }
}
