//! The end of a connection's life: its counts and its log line.
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
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::info;

use crate::{
    accept_proxy::Rejection,
    admission::{Admitted, FrontendLoad, Refusal},
    gateway::Gateway,
    pool::{Path, Pool, ServerRuntime},
};

/// What a connection moved and how it ended.
#[derive(Clone, Copy, Debug)]
pub struct Transfer {
    pub from_client: u64,
    pub from_server: u64,
    pub end: End,
    pub path: Path,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent its FIN first; both sides then closed.
    ClientClosed,
    /// The server sent its FIN first; both sides then closed.
    ServerClosed,
    ClientReset,
    ServerReset,
    /// Nothing moved for `idle_timeout`; both sides were reset.
    IdleTimeout,
    /// Half-closed and nothing moved for `half_closed_timeout`; both sides were reset.
    HalfClosedTimeout,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::ClientClosed => "client closed",
            End::ServerClosed => "server closed",
            End::ClientReset => "client reset",
            End::ServerReset => "server reset",
            End::IdleTimeout => "idle timeout",
            End::HalfClosedTimeout => "half-closed timeout",
        })
    }
}

/// A client connection, counted open (for a graceful shutdown) until dropped.
pub struct Open {
    connections: Arc<AtomicUsize>,
    /// The data plane that carries it, for its log line.
    dataplane: &'static str,
}

impl Open {
    /// Counts a connection open in `connections`.
    pub fn new(connections: &Arc<AtomicUsize>, dataplane: &'static str) -> Open {
        connections.fetch_add(1, Ordering::AcqRel);
        Open {
            connections: connections.clone(),
            dataplane,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum Outcome {
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
    /// The record of a connection `peer` made to `gateway`'s `frontend`, just accepted.
    pub fn new(open: Open, gateway: Arc<Gateway>, frontend: usize, peer: SocketAddr) -> Ending {
        Ending {
            open,
            gateway,
            frontend,
            server: None,
            peer,
            started: Instant::now(),
            connect_time: None,
            path: Path::Copied,
            _admitted: None,
        }
    }

    /// The client is `source`, as a PROXY header named it.
    pub fn client_named(&mut self, source: SocketAddr) {
        self.peer = source;
    }

    /// Keeps the frontend's slot until the log line.
    pub fn admitted(&mut self, admitted: Admitted) {
        self._admitted = Some(admitted);
    }

    fn pool(&self) -> &Pool {
        &self.gateway.pools[self.gateway.config.frontends[self.frontend].backend]
    }

    /// The connection goes to `server`, which took `connect_time` to connect.
    pub fn connected(&mut self, server: usize, connect_time: Duration) {
        let runtime = &self.pool().servers[server];
        runtime.total.fetch_add(1, Ordering::Relaxed);
        runtime.rate.add();
        runtime.active.fetch_add(1, Ordering::Relaxed);
        self.server = Some(server);
        self.connect_time = Some(connect_time);
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

    /// The frontend's run-time state, whose counters the relay adds the bytes it copies
    /// to as it copies them, as it does the server's.
    pub fn frontend_load(&self) -> Arc<FrontendLoad> {
        self.gateway.loads[self.frontend].clone()
    }

    /// The relay is over: logs it (its bytes were counted as they moved).
    pub fn relayed(self, transfer: Transfer) {
        self.log(Outcome::Relayed(transfer));
    }

    /// Counts the connection over and logs its line.
    pub fn log(self, outcome: Outcome) {
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
                journal.dataplane = self.open.dataplane,
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
