//! Upgrading kgate without refusing a connection or cutting one (`kgate upgrade`): the
//! running kgate (the old one) starts the new binary and hands it the sockets it
//! listens on; for a moment both accept, then the old one stops accepting, lets its
//! open connections finish (up to `shutdown_timeout`) and exits.
//!
//! The steps, and who owns what:
//! 1. `kgate upgrade` sends `upgrade BINARY` on the control socket (BINARY: by default
//!    the `kgate` that runs the command, so the one just installed).
//! 2. The old kgate makes a socket pair and starts `BINARY run -c FILE` with one end as
//!    fd 3 (`KGATE_HANDOVER_FD=3`). It sends over it one message per socket, the file
//!    descriptor attached (SCM_RIGHTS): each frontend listener, the metrics listener,
//!    the control socket, and the open pin directory that holds its `flock`; then
//!    the servers the operator set to drain or maint (`kgate server set`, a run-time
//!    state that a reload keeps too); then `Done`.
//! 3. The new kgate reads them before anything else, then starts as any kgate does
//!    from its configuration file (read again: it may have changed), with what it was
//!    handed: a listen address it was handed is not bound again (the same socket, so
//!    the same accept queue), others are bound; the control socket is not bound again;
//!    the pin directory's lock is the same lock (it belongs to the open file), so the
//!    new kgate may pin where the old one did, and any other kgate is still kept out.
//!    It loads its own eBPF programs and maps: pinned in a staging directory, renamed
//!    over the old ones once it accepts (maps/handover.rs). The old kgate's open
//!    connections stay in the old kgate's own sock hashes (keyed by socket cookie),
//!    which the new one never opens.
//! 4. Once it accepts, the new kgate answers `Ready` with its pid, and the old one,
//!    still the service's main process, tells systemd `MAINPID=` the new pid (so the
//!    unit needs no `NotifyAccess=all`). Any error before that (a file that does not
//!    validate, say) is answered `Failed` with the message, or the new kgate exits:
//!    either way the old one carries on as before, and `kgate upgrade` fails with the
//!    reason.
//! 5. On `Ready` the old kgate closes its copies of the listening sockets (they stay
//!    open in the new one: a client waiting in the accept queue is accepted there),
//!    stops its control socket, metrics and checks, forgets its pins, and drains as on
//!    SIGTERM. At exit it removes neither the pins nor the control socket: both are the
//!    new kgate's.

use std::{
    collections::HashMap,
    env, fs,
    io::{self, IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixListener,
    },
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nix::{
    cmsg_space,
    sys::{
        socket::{
            AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
            recvmsg, sendmsg, setsockopt, socketpair, sockopt,
        },
        time::TimeVal,
    },
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tracing::info;

use crate::pool::AdminState;

/// The environment variable that tells a starting kgate where its predecessor's end of
/// the socket pair is.
pub const FD_ENV: &str = "KGATE_HANDOVER_FD";
/// The fd the socket pair's end has in the new kgate.
const HANDOVER_FD: RawFd = 3;
/// How long the new kgate may take to start (load its programs, bind, pin) before the
/// old one gives up on it and kills it; and how long either waits for a message.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Longest message: one socket's description.
const MAX_MESSAGE: usize = 4096;

/// Old to new: what the attached fd is, or the end of the offer.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Listener(SocketAddr),
    Metrics(SocketAddr),
    Control(PathBuf),
    PinDirLock(PathBuf),
    /// `BACKEND/SERVER` and its operator state (no fd).
    ServerState(String, String),
    Done {
        pid: u32,
    },
}

/// New to old.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Ready { pid: u32, pins_taken: bool },
    Failed { error: String },
}

/// `kgate upgrade`, as the control socket passes it to the main loop.
pub struct Request {
    pub binary: PathBuf,
    pub reply: oneshot::Sender<Result<String, String>>,
}

/// What the old kgate hands over: each socket (a duplicate of its fd) and what it is.
#[derive(Default)]
pub struct Offer {
    sockets: Vec<(Message, OwnedFd)>,
    server_states: Vec<Message>,
}

impl Offer {
    pub fn listener(&mut self, address: SocketAddr, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(Message::Listener(address), fd)
    }

    pub fn metrics(&mut self, address: SocketAddr, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(Message::Metrics(address), fd)
    }

    pub fn control(&mut self, path: &Path, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(Message::Control(path.to_owned()), fd)
    }

    pub fn pin_dir_lock(&mut self, path: &Path, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.add(Message::PinDirLock(path.to_owned()), fd)
    }

    /// A server the operator set to `state` (drain or maint).
    pub fn server_state(&mut self, server: String, state: AdminState) {
        self.server_states
            .push(Message::ServerState(server, state.to_string()));
    }

    fn add(&mut self, message: Message, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.sockets.push((message, fd.try_clone_to_owned()?));
        Ok(())
    }
}

/// The kgate that took over.
pub struct Successor {
    pub pid: u32,
    /// Whether it pinned its maps where this one's were (the same `bpf_pin_path`).
    pub pins_taken: bool,
}

/// Starts `binary run -c config` and hands it `offer`; returns once it serves, or why
/// it does not (it is then stopped, and nothing of this kgate has changed).
pub async fn hand_over(binary: &Path, config: &Path, offer: Offer) -> Result<Successor, String> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| format!("cannot make the handover socket pair: {e}"))?;
    set_timeouts(&ours).map_err(|e| format!("handover socket: {e}"))?;

    let mut command = tokio::process::Command::new(binary);
    command
        .arg("run")
        .arg("-c")
        .arg(config)
        .env(FD_ENV, HANDOVER_FD.to_string())
        .stdin(Stdio::null());
    let their_fd = theirs.as_raw_fd();
    // SAFETY: only fcntl/dup2 (async-signal-safe) between fork and exec, on an fd that
    // is open in the child (it was open in the parent at fork).
    unsafe {
        command.pre_exec(move || place_at(their_fd, HANDOVER_FD));
    }
    let mut child = command.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e}: give the path of the new kgate binary",
            binary.display()
        )
    })?;
    drop(theirs);
    let child_pid = child.id().unwrap_or_default();
    info!(pid = child_pid, binary = %binary.display(), "upgrade: started the new kgate, handing over");

    let exchange = tokio::task::spawn_blocking(move || -> io::Result<Answer> {
        for (message, fd) in &offer.sockets {
            send(&ours, message, Some(fd.as_fd()))?;
        }
        for message in &offer.server_states {
            send(&ours, message, None)?;
        }
        send(
            &ours,
            &Message::Done {
                pid: std::process::id(),
            },
            None,
        )?;
        drop(offer);
        let (answer, _) = receive::<Answer>(&ours)?;
        Ok(answer)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));

    let why = match exchange {
        Ok(Answer::Ready { pid, pins_taken }) => {
            // Reaped by tokio when it exits, should this kgate still run then.
            drop(child);
            return Ok(Successor { pid, pins_taken });
        }
        Ok(Answer::Failed { error }) => error,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "it exited before it took over (its log says why)".to_owned()
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            format!("it did not take over within {TIMEOUT:?}")
        }
        Err(e) => format!("the handover failed: {e}"),
    };
    // Ours to stop: we started it. It has accepted nothing (it answers Ready first).
    let _ = child.start_kill();
    let _ = tokio::time::timeout(TIMEOUT, child.wait()).await;
    Err(format!(
        "the new kgate ({}, pid {child_pid}) did not take over: {why}; this kgate goes on serving",
        binary.display()
    ))
}

/// Puts `fd` at `target` without close-on-exec (in the child, before exec).
fn place_at(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: fcntl and dup2 on fds of this process.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_timeouts(socket: &impl AsFd) -> io::Result<()> {
    let timeout = TimeVal::new(TIMEOUT.as_secs() as _, 0);
    setsockopt(socket, sockopt::ReceiveTimeout, &timeout)?;
    setsockopt(socket, sockopt::SendTimeout, &timeout)?;
    Ok(())
}

fn send(socket: &OwnedFd, message: &impl Serialize, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let fds = fd.map(|fd| [fd.as_raw_fd()]);
    let control: Vec<ControlMessage<'_>> = fds
        .as_ref()
        .map(|fds| ControlMessage::ScmRights(fds))
        .into_iter()
        .collect();
    sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        &control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// One message and the fd that came with it. EOF when the other side has gone.
fn receive<T: for<'de> Deserialize<'de>>(socket: &OwnedFd) -> io::Result<(T, Option<OwnedFd>)> {
    let mut bytes = vec![0u8; MAX_MESSAGE];
    let mut space = cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut bytes)];
        let message = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        if message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
        {
            return Err(io::Error::other("a handover message was cut short"));
        }
        let mut fd = None;
        for control in message.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = control {
                for raw in fds {
                    // SAFETY: the kernel just installed this fd in our table for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (message.bytes, fd)
    };
    if len == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let value = serde_json::from_slice(&bytes[..len]).map_err(io::Error::other)?;
    Ok((value, fd))
}

/// What a new kgate was handed by the one it takes over from.
#[derive(Default)]
pub struct Handed {
    pub listeners: HashMap<SocketAddr, std::net::TcpListener>,
    pub metrics: Option<(SocketAddr, std::net::TcpListener)>,
    pub control: Option<(PathBuf, UnixListener)>,
    pub pin_dir_lock: Option<(PathBuf, fs::File)>,
    /// `BACKEND/SERVER` set to drain or maint in the old kgate.
    pub server_states: Vec<(String, AdminState)>,
}

impl Handed {
    /// The handed listener on `address`, if any.
    pub fn take_listener(&mut self, address: SocketAddr) -> Option<std::net::TcpListener> {
        self.listeners.remove(&address)
    }

    /// The handed metrics listener if it listens on `address`.
    pub fn take_metrics(&mut self, address: SocketAddr) -> Option<std::net::TcpListener> {
        match self.metrics.take() {
            Some((at, listener)) if at == address => Some(listener),
            _ => None,
        }
    }

    /// The handed control socket if it is bound at `path`.
    pub fn take_control(&mut self, path: &Path) -> Option<UnixListener> {
        match self.control.take() {
            Some((at, listener)) if at == path => Some(listener),
            _ => None,
        }
    }

    /// The handed lock on the pin directory, if it was `path`'s when handed (the
    /// maps module checks that it still is).
    pub fn take_pin_dir_lock(&mut self, path: &Path) -> Option<fs::File> {
        match self.pin_dir_lock.take() {
            Some((at, lock)) if at == path => Some(lock),
            _ => None,
        }
    }
}

/// The kgate being taken over from, to answer once this one serves (or cannot).
pub struct Predecessor {
    channel: OwnedFd,
    pub pid: u32,
}

impl Predecessor {
    /// Tells the old kgate that this one accepts: it stops accepting and drains.
    pub fn ready(self, pins_taken: bool) -> io::Result<()> {
        send(
            &self.channel,
            &Answer::Ready {
                pid: std::process::id(),
                pins_taken,
            },
            None,
        )
    }

    /// Tells the old kgate why this one cannot take over: it goes on serving.
    pub fn failed(self, error: &anyhow::Error) {
        let _ = send(
            &self.channel,
            &Answer::Failed {
                error: format!("{error:#}"),
            },
            None,
        );
    }
}

/// In a kgate started by `kgate upgrade`: receives what the old kgate hands over.
/// `None` when this kgate was started otherwise. Must run before any thread starts
/// (it takes the variable out of the environment).
pub fn receive_handover() -> anyhow::Result<Option<(Handed, Predecessor)>> {
    let Some(value) = env::var_os(FD_ENV) else {
        return Ok(None);
    };
    // SAFETY: called at start, before the runtime or any other thread exists.
    unsafe { env::remove_var(FD_ENV) };
    let fd: RawFd = value
        .to_str()
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{FD_ENV}={value:?} is not a file descriptor number"))?;
    if !is_socket(fd) {
        bail!(
            "{FD_ENV}={fd} names no socket: it is set by a running kgate for the kgate it \
             starts at an upgrade; unset it to start kgate by hand"
        );
    }
    // SAFETY: fd is an open socket (checked above) that nothing else in this process
    // owns: the old kgate placed it here for us.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on the fd we own.
    unsafe { libc::fcntl(channel.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    set_timeouts(&channel).context("handover socket")?;

    let mut handed = Handed::default();
    let pid = loop {
        let (message, fd) =
            receive::<Message>(&channel).context("receiving the sockets from the running kgate")?;
        match message {
            Message::Done { pid } => break pid,
            Message::ServerState(server, state) => {
                let state = state.parse().map_err(anyhow::Error::msg)?;
                handed.server_states.push((server, state));
                continue;
            }
            _ => {}
        }
        let fd = fd.with_context(|| format!("{message:?} came without its socket"))?;
        match message {
            Message::Listener(address) => {
                let listener = std::net::TcpListener::from(fd);
                check_address(&listener, address)?;
                handed.listeners.insert(address, listener);
            }
            Message::Metrics(address) => {
                let listener = std::net::TcpListener::from(fd);
                check_address(&listener, address)?;
                handed.metrics = Some((address, listener));
            }
            Message::Control(path) => handed.control = Some((path, UnixListener::from(fd))),
            Message::PinDirLock(path) => handed.pin_dir_lock = Some((path, fs::File::from(fd))),
            Message::Done { .. } | Message::ServerState(..) => unreachable!("handled above"),
        }
    };
    info!(
        from = pid,
        listeners = handed.listeners.len(),
        "upgrade: received the running kgate's sockets"
    );
    Ok(Some((handed, Predecessor { channel, pid })))
}

fn check_address(listener: &std::net::TcpListener, address: SocketAddr) -> anyhow::Result<()> {
    let bound = listener.local_addr()?;
    if bound != address {
        bail!("a socket handed over as {address} listens on {bound}");
    }
    listener.set_nonblocking(true)?;
    Ok(())
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat fills the zeroed struct; a closed fd makes it fail.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut stat) == 0 && (stat.st_mode & libc::S_IFMT) == libc::S_IFSOCK }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    #[test]
    fn a_listener_sent_over_the_pair_is_the_same_socket_on_the_other_side() {
        let (old, new) = pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        send(&old, &Message::Listener(address), Some(listener.as_fd())).unwrap();
        // The sender closes its own: the socket lives on in the message.
        drop(listener);
        let (message, fd) = receive::<Message>(&new).unwrap();
        assert!(matches!(message, Message::Listener(a) if a == address));
        let received = std::net::TcpListener::from(fd.expect("the fd came along"));
        assert_eq!(received.local_addr().unwrap(), address);

        // A client of the old socket is accepted from the received one.
        let mut client = std::net::TcpStream::connect(address).unwrap();
        let (mut accepted, _) = received.accept().unwrap();
        client.write_all(b"hello").unwrap();
        let mut got = [0u8; 5];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    #[test]
    fn answers_round_trip_and_a_closed_end_reads_as_eof() {
        let (old, new) = pair();
        send(
            &new,
            &Answer::Ready {
                pid: 42,
                pins_taken: true,
            },
            None,
        )
        .unwrap();
        let (answer, fd) = receive::<Answer>(&old).unwrap();
        assert!(matches!(
            answer,
            Answer::Ready {
                pid: 42,
                pins_taken: true
            }
        ));
        assert!(fd.is_none());
        drop(new);
        let eof = receive::<Answer>(&old).unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }
}
