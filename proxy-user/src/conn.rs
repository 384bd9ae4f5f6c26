//! One client connection, from accept to its log line.
//!
//! The log line, one per connection, as HAProxy's tcplog gives it:
//! `CLIENT FRONTEND BACKEND/SERVER MOVED bytes_in=N bytes_out=N end="CAUSE"
//! [connect=Nms] DURATIONms` where MOVED says how the bytes moved (`spliced`, `copied`,
//! `half-spliced`, `forwarded`, or `-` when none did), CAUSE is one of `client closed`,
//! `server closed`, `client reset`, `server reset`, `idle timeout`, `half-closed
//! timeout`, `no server`, `over limit: ...`, `server failed: ...` (before the relay
//! began), `client failed: ...` (its socket, before anything was done), or `PROXY
//! header ...` (an `accept_proxy` frontend refused the connection, see
//! `accept_proxy`), and `connect=` is how long the server took to connect (retries
//! included), when one did. CLIENT is the address a PROXY header named, on such a
//! frontend. In the journal each part is also a field of its own (logging.rs):
//! `CLIENT`, `FRONTEND`, `BACKEND`, `SERVER` (`BACKEND/SERVER`, as the other lines
//! name a server), `DATAPLANE` (sockmap, userspace or packet), `MOVED`, `BYTES_IN`,
//! `BYTES_OUT`, `END`, `CONNECT_MS`, `DURATION_MS`. A frontend with `log_connections =
//! false` logs none.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::info;

use crate::{
    accept_proxy::{self, Received, Rejection},
    admission::{Admitted, Refusal},
    balance,
    config::Backend,
    daemon::Open,
    dataplane::{Path, SpliceTerms, Timeouts, Transfer},
    gateway::Gateway,
    pool::{Pool, ServerRuntime},
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
    /// The client's PROXY header was not taken (`accept_proxy`).
    ProxyRefused(Rejection),
    /// The client's socket failed before anything was done for it.
    ClientFailed(std::io::Error),
}

/// What a connection carries from accept to its log line, wherever it is relayed: a
/// parked connection keeps it while no task runs for it.
pub struct Ending {
    /// The daemon counts the connection open until this drops; the log line names
    /// its data plane.
    open: Open,
    gateway: Arc<Gateway>,
    frontend: usize,
    /// The server, once connected: counted active until the log line.
    server: Option<usize>,
    peer: SocketAddr,
    started: Instant,
    /// How long the server took to connect, once one did.
    connect_time: Option<Duration>,
    /// How the bytes move now, as the server's counts of open connections have it.
    path: Path,
    /// Held for its drop, which gives the frontend's slot back.
    _admitted: Option<Admitted>,
}

impl Ending {
    fn pool(&self) -> &Pool {
        &self.gateway.pools[self.gateway.config.frontends[self.frontend].backend]
    }

    fn set_server(&mut self, server: usize) {
        let runtime = &self.pool().servers[server];
        runtime.total.fetch_add(1, Ordering::Relaxed);
        runtime.rate.add();
        runtime.active.fetch_add(1, Ordering::Relaxed);
        self.server = Some(server);
    }

    /// The connection's bytes move on `path` from now on (it joined the splice).
    pub fn carried_on(&mut self, path: Path) {
        if let Some(runtime) = self.server_runtime() {
            runtime.moved(self.path, path);
        }
        self.path = path;
    }

    /// The server's runtime, whose counters the relay adds the bytes it copies to as
    /// it copies them (the eBPF program counts the spliced ones): `kgate status` shows
    /// open connections' bytes too.
    pub fn server_runtime(&self) -> Option<Arc<ServerRuntime>> {
        self.server
            .map(|server| self.pool().servers[server].clone())
    }

    /// The relay is over: counts its bytes and logs it.
    pub fn relayed(self, transfer: Transfer) {
        let load = &self.gateway.loads[self.frontend];
        load.bytes_in
            .fetch_add(transfer.from_client, Ordering::Relaxed);
        load.bytes_out
            .fetch_add(transfer.from_server, Ordering::Relaxed);
        self.log(Outcome::Relayed(transfer));
    }

    fn log(self, outcome: Outcome) {
        let frontend = &self.gateway.config.frontends[self.frontend];
        let backend = &self.gateway.config.backends[frontend.backend];
        let server_name = match self.server {
            Some(server) => {
                let runtime = &self.pool().servers[server];
                runtime.moved(self.path, Path::Copied);
                runtime.active.fetch_sub(1, Ordering::Relaxed);
                backend.servers[server].name.as_str()
            }
            None => "-",
        };
        if !frontend.log_connections {
            return;
        }
        let Parts {
            moved,
            bytes_in,
            bytes_out,
            end,
        } = outcome.parts();
        let duration_ms = self.started.elapsed().as_millis();
        let connect_ms = self.connect_time.map(|t| t.as_millis());
        info!(
            target: "kgate::conn",
            {
                journal.client = %self.peer,
                journal.frontend = %frontend.name,
                journal.backend = %backend.name,
                journal.server = self.server.map(|_| format!("{}/{server_name}", backend.name)),
                journal.dataplane = self.open.daemon().dataplane.name(),
                journal.moved = %moved,
                journal.bytes_in = bytes_in,
                journal.bytes_out = bytes_out,
                journal.end = %end,
                journal.connect_ms = connect_ms.map(|ms| ms as u64),
                journal.duration_ms = duration_ms as u64,
            },
            "{} {} {}/{server_name} {moved} bytes_in={bytes_in} bytes_out={bytes_out} end=\"{end}\"{} {duration_ms}ms",
            self.peer,
            frontend.name,
            backend.name,
            connect_ms.map(|ms| format!(" connect={ms}ms")).unwrap_or_default(),
        );
    }
}

pub async fn handle(
    open: Open,
    gateway: Arc<Gateway>,
    frontend: usize,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let daemon = open.daemon().clone();
    let mut ending = Ending {
        open,
        gateway: gateway.clone(),
        frontend,
        server: None,
        peer,
        started: Instant::now(),
        connect_time: None,
        path: Path::Copied,
        _admitted: None,
    };
    let load = &gateway.loads[frontend];
    let frontend = &gateway.config.frontends[frontend];
    let backend_index = frontend.backend;
    let backend = &gateway.config.backends[backend_index];

    let local = match client.local_addr() {
        Ok(local) => local,
        // Reset before it could be looked at.
        Err(e) => return ending.log(Outcome::ClientFailed(e)),
    };
    let Received {
        source,
        destination,
        header_length,
    } = match &frontend.accept_proxy {
        None => Received {
            source: peer,
            destination: local,
            header_length: 0,
        },
        Some(settings) => match accept_proxy::receive(&mut client, peer, local, settings).await {
            Ok(received) => received,
            Err(rejection) => {
                load.proxy_rejections.count(&rejection);
                return ending.log(Outcome::ProxyRefused(rejection));
            }
        },
    };
    ending.peer = source;

    match load.admit(frontend, source.ip().to_canonical()) {
        Err(refusal) => return ending.log(Outcome::Refused(refusal)),
        Ok(admitted) => ending._admitted = Some(admitted),
    }
    let _ = client.set_nodelay(true);
    let pool = &gateway.pools[backend_index];
    let order = balance::order(pool, backend, source.ip().to_canonical());
    let connecting = Instant::now();
    let Some(upstream::Upstream { mut stream, server }) =
        upstream::connect(backend, pool, &order).await
    else {
        pool.counters.no_server.fetch_add(1, Ordering::Relaxed);
        return ending.log(Outcome::NoServer);
    };
    ending.set_server(server);
    ending.connect_time = Some(connecting.elapsed());
    if let Err(e) = send_header(&mut stream, backend, source, destination).await {
        return ending.log(Outcome::ServerFailed(e));
    }
    let timeouts = Timeouts {
        idle: frontend.idle_timeout,
        half_closed: frontend.half_closed_timeout,
    };
    let terms = SpliceTerms {
        queue_limit: backend.queue_limit,
        server_slot: pool.servers[server].slot,
        after: backend.splice_after,
        client_bytes_read: header_length,
    };
    daemon
        .dataplane
        .relay(client, stream, terms, timeouts, ending)
        .await;
}

/// The header naming `source` as the client, which connected to `destination`.
async fn send_header(
    server: &mut TcpStream,
    backend: &Backend,
    source: SocketAddr,
    destination: SocketAddr,
) -> std::io::Result<()> {
    match proxy_header::for_connection(backend.proxy_protocol, source, destination) {
        Some(header) => server.write_all(&header).await,
        None => Ok(()),
    }
}

/// The parts of the log line an outcome decides.
struct Parts {
    /// How the bytes moved, `-` when none did.
    moved: String,
    bytes_in: u64,
    bytes_out: u64,
    end: String,
}

impl Outcome {
    fn parts(&self) -> Parts {
        let refused = |end: String| Parts {
            moved: "-".to_owned(),
            bytes_in: 0,
            bytes_out: 0,
            end,
        };
        match self {
            Outcome::Relayed(t) => Parts {
                moved: t.path.to_string(),
                bytes_in: t.from_client,
                bytes_out: t.from_server,
                end: t.end.to_string(),
            },
            Outcome::Refused(refusal) => refused(refusal.to_string()),
            Outcome::NoServer => refused("no server".to_owned()),
            Outcome::ServerFailed(e) => refused(format!("server failed: {e}")),
            Outcome::ProxyRefused(rejection) => refused(rejection.to_string()),
            Outcome::ClientFailed(e) => refused(format!("client failed: {e}")),
        }
    }
}
