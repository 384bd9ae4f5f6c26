//! The control socket: a Unix stream socket where `kgate reload`, `kgate status`,
//! `kgate server set` and `kgate upgrade` reach the running daemon. One request line,
//! one reply line: `ok ...` or `error: ...`. Only root (the socket's owner) may connect.
//!
//! At most [`MAX_CONNECTIONS`] are served at once, each given [`IO_TIMEOUT`] to send
//! its request and take its reply: more wait in the kernel's listen queue, where
//! they hold no file descriptor of kgate's. A script that opens control connections
//! and forgets them (20,000 of them took every descriptor kgate had) can no longer
//! take the descriptors client connections need.

use std::{
    fs, io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
    time::timeout,
};
use tracing::{info, warn};

use crate::{daemon::Daemon, handover, pool::AdminState, status};

/// Longest request accepted.
const MAX_REQUEST: usize = 1024;
/// Control connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// How long a control connection may take to send its request, and to take its reply.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the control socket, replacing a stale one a previous kgate left.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another kgate runs with this control_socket",
                    path.display()
                ),
            ));
        }
        fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests on `listener`; an upgrade goes to the main loop through `upgrades`.
pub async fn serve(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    upgrades: mpsc::Sender<handover::Request>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                let upgrades = upgrades.clone();
                tokio::spawn(async move {
                    answer(daemon, upgrades, stream).await;
                    drop(slot);
                });
            }
            Err(e) => {
                warn!("control socket: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(
    daemon: Arc<Daemon>,
    upgrades: mpsc::Sender<handover::Request>,
    stream: UnixStream,
) {
    let (reader, mut writer) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(reader).take(MAX_REQUEST as u64);
    let reply = match timeout(IO_TIMEOUT, reader.read_line(&mut line)).await {
        Ok(Ok(_)) => match line.trim().strip_prefix("upgrade ") {
            Some(binary) => upgrade(&upgrades, binary).await,
            None => execute(&daemon, line.trim()).await,
        },
        Ok(Err(e)) => Err(format!("unreadable request: {e}")),
        Err(_) => return,
    };
    let reply = match reply {
        Ok(text) => format!("ok {text}\n"),
        Err(text) => format!("error: {text}\n"),
    };
    let _ = timeout(IO_TIMEOUT, writer.write_all(reply.as_bytes())).await;
}

async fn execute(daemon: &Arc<Daemon>, request: &str) -> Result<String, String> {
    let words: Vec<&str> = request.split_whitespace().collect();
    match words.as_slice() {
        ["reload"] => daemon.reload().await.map_err(|e| e.to_string()),
        // One line of JSON: the reply is one line.
        ["status"] => serde_json::to_string(&status::build(daemon)).map_err(|e| e.to_string()),
        ["server", "set", name, state] => {
            let state: AdminState = state.parse()?;
            let gateway = daemon.gateway();
            let (b, s) = gateway.server(name).ok_or_else(|| {
                let known: Vec<String> = gateway
                    .config
                    .backends
                    .iter()
                    .flat_map(|b| {
                        b.servers
                            .iter()
                            .map(move |s| format!("{}/{}", b.name, s.name))
                    })
                    .collect();
                format!(
                    "no server `{name}`: give BACKEND/SERVER as in the configuration, one of: {}",
                    known.join(", ")
                )
            })?;
            gateway.pools[b].servers[s].set_admin(state);
            daemon.changed.notify_one();
            info!(server = %name, "set to {state} by the operator");
            gateway.log_availability();
            Ok(format!("{name} {state}"))
        }
        _ => Err(format!(
            "unknown request `{request}`: expected `reload`, `status`, `server set \
             BACKEND/SERVER ready|drain|maint` or `upgrade BINARY`"
        )),
    }
}

/// Asks the main loop to hand over to `binary` and waits for the outcome.
async fn upgrade(
    upgrades: &mpsc::Sender<handover::Request>,
    binary: &str,
) -> Result<String, String> {
    let (reply, outcome) = oneshot::channel();
    let request = handover::Request {
        binary: PathBuf::from(binary),
        reply,
    };
    let gone = || "this kgate has already handed over to another one, or is stopping".to_owned();
    upgrades.send(request).await.map_err(|_| gone())?;
    outcome.await.map_err(|_| gone())?
}

/// How long a client waits for the daemon's reply (an upgrade waits longer).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Nothing listens at the socket (kgate is not running, or elsewhere).
    #[error("cannot reach kgate at {}: {error}", path.display())]
    Unreachable {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    #[error("kgate at {} did not answer: {error}", path.display())]
    NoAnswer {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Sends one request to the daemon at `path` and returns its reply, waiting up to
/// `wait` for it.
pub fn request_within(
    path: &std::path::Path,
    request: &str,
    wait: std::time::Duration,
) -> Result<String, RequestError> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|error| {
        RequestError::Unreachable {
            path: path.to_owned(),
            error,
        }
    })?;
    let no_answer = |error| RequestError::NoAnswer {
        path: path.to_owned(),
        error,
    };
    stream.set_read_timeout(Some(wait)).map_err(no_answer)?;
    writeln!(stream, "{request}").map_err(no_answer)?;
    let mut reply = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(no_answer)?;
    Ok(reply.trim_end().to_owned())
}
