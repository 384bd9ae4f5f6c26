//! Spliced connections with nothing to do, watched together.
//!
//! While the kernel moves a spliced connection's bytes, its relay only waits: for a
//! FIN, a reset, bytes passed at the bound, a grant request, or the idle check. A
//! waiting task still holds its future, the tokio registrations of both sockets and
//! the relay's state: about 3 KB a connection. So a relay that has had nothing to do
//! for [`PARK_AFTER`] parks its connection here, and its task ends: the sockets leave
//! tokio for one epoll set shared by every parked connection, and the relay's state
//! waits in one small record. The first news (something to read on either socket, an
//! error, a grant request, or the idle deadline) takes the connection out again, into
//! a new task that carries on where the relay stopped.
//!
//! Spliced sockets wake epoll for every segment the program redirects (the kernel
//! calls data-ready after each verdict), so an event alone is no news: the watcher
//! asks poll(2), and only a readable byte, a FIN or an error resumes the relay.
//!
//! Parked records live side by side in one slab, and a parked connection holds no
//! allocation of its own: connections tend to park in bursts, right after the tasks
//! of a burst end, and a small allocation left among the freed tasks would keep its
//! whole page resident.

use std::{
    collections::HashMap,
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use mio::{Events, Interest, Token, unix::SourceFd};
use slab::Slab;
use tokio::{
    io::unix::AsyncFd,
    sync::Notify,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, warn};

use super::{relay::Parked, sockmap::Sockmap, trim::Trim};
use crate::{maps::GrantRequests, sockopt};

/// How long a spliced connection's relay waits with nothing to do before it parks.
/// Long enough that a short session (an SMTP greeting and QUIT) ends in its first task.
pub const PARK_AFTER: Duration = Duration::from_millis(50);
/// How often parked connections are looked at for their idle deadline.
const IDLE_SWEEP: Duration = Duration::from_millis(100);
/// Epoll events read at once.
const EVENTS: usize = 256;
pub struct Parking {
    registry: mio::Registry,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The watcher has stopped: nothing parks any more.
    closed: bool,
    /// What a grant request for a socket wakes, by the socket's cookie.
    waiters: HashMap<u64, Waiter>,
    /// A connection's key here, twice and plus 0 or 1 for (client, server), is its
    /// sockets' epoll token.
    parked: Slab<Parked>,
    /// Connections parked since memory was last given back.
    parked_since_sweep: usize,
}

enum Waiter {
    /// The connection's relay runs in a task.
    Relay(Arc<Notify>),
    /// The connection is parked under this key.
    Parked(usize),
}

impl Parking {
    /// The parking, and the epoll set its watcher waits on.
    pub fn new() -> io::Result<(Parking, AsyncFd<mio::Poll>)> {
        let poll = mio::Poll::new()?;
        let registry = poll.registry().try_clone()?;
        // SAFETY: the epoll fd belongs to `poll`, which lives inside the AsyncFd.
        let poll = unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let parking = Parking {
            registry,
            state: Mutex::default(),
        };
        Ok((parking, poll))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// From now on, the program's grant requests for these sockets wake `waiter`.
    pub fn watch_grant_requests(&self, cookies: [u64; 2], waiter: &Arc<Notify>) {
        let mut state = self.lock();
        for cookie in cookies {
            state.waiters.insert(cookie, Waiter::Relay(waiter.clone()));
        }
    }

    pub fn unwatch_grant_requests(&self, cookies: [u64; 2]) {
        let mut state = self.lock();
        for cookie in cookies {
            state.waiters.remove(&cookie);
        }
    }

    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    /// Watches `parked` until there is news for it. Gives it back when it must go on
    /// at once: a grant request came in since its relay last looked, or its sockets
    /// cannot be watched.
    pub fn park(&self, mut parked: Parked) -> Option<Parked> {
        let cookies = parked.splice().cookies();
        let mut state = self.lock();
        if state.closed {
            return Some(parked);
        }
        // Under the lock: a request from now on finds the connection parked.
        if parked.splice().take_grant_request() {
            if let Some(waiter) = parked.splice().grant_waiter() {
                waiter.notify_one();
            }
            return Some(parked);
        }
        let key = state.parked.vacant_key();
        let sockets = parked.sockets();
        for (side, socket) in sockets.iter().enumerate() {
            let fd = socket.as_raw_fd();
            let registered =
                self.registry
                    .register(&mut SourceFd(&fd), token(key, side), Interest::READABLE);
            if let Err(e) = registered {
                debug!("cannot park a connection: {e}");
                for socket in &sockets[..side] {
                    let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
                }
                return Some(parked);
            }
        }
        for cookie in cookies {
            state.waiters.insert(cookie, Waiter::Parked(key));
        }
        parked.splice_mut().drop_grant_waiter();
        let inserted = state.parked.insert(parked);
        debug_assert_eq!(inserted, key, "the tokens name the key it was parked under");
        state.parked_since_sweep += 1;
        None
    }

    /// Takes the connection parked under `key` out of the parking.
    fn take(&self, state: &mut State, key: usize) -> Option<Parked> {
        let mut parked = state.parked.try_remove(key)?;
        for socket in parked.sockets() {
            let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
        }
        let waiter = parked.splice_mut().renew_grant_waiter();
        for cookie in parked.splice().cookies() {
            state.waiters.insert(cookie, Waiter::Relay(waiter.clone()));
        }
        Some(parked)
    }

    /// Takes the connections parked under `keys` out of the parking, each into a
    /// task of its own; `requested`: with a grant request waiting for its relay.
    fn resume(&self, mut state: MutexGuard<'_, State>, keys: &[usize], requested: bool) {
        let resumed: Vec<_> = keys
            .iter()
            .filter_map(|&key| self.take(&mut state, key))
            .collect();
        drop(state);
        for parked in resumed {
            if requested && let Some(waiter) = parked.splice().grant_waiter() {
                waiter.notify_one();
            }
            tokio::spawn(parked.resume());
        }
    }

    /// The program asked for a larger grant for socket `cookie`.
    fn on_grant_request(&self, cookie: u64) {
        let state = self.lock();
        match state.waiters.get(&cookie) {
            Some(Waiter::Relay(waiter)) => waiter.notify_one(),
            Some(&Waiter::Parked(key)) => self.resume(state, &[key], true),
            None => {}
        }
    }

    /// Epoll reported the socket of `token`.
    fn on_event(&self, token: Token) {
        let (key, side) = (token.0 >> 1, token.0 & 1);
        let state = self.lock();
        let news = state
            .parked
            .get(key)
            .is_some_and(|parked| has_news(parked.sockets()[side]));
        if news {
            self.resume(state, &[key], false);
        }
    }

    /// The watcher has stopped: resumes every parked connection, and parks none
    /// from now on.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let all: Vec<usize> = state.parked.iter().map(|(key, _)| key).collect();
        self.resume(state, &all, false);
    }

    /// Resumes the connections whose idle deadline has come. Returns how many
    /// connections parked since the last call.
    fn on_idle_sweep(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let newly_parked = std::mem::take(&mut state.parked_since_sweep);
        let due: Vec<usize> = state
            .parked
            .iter()
            .filter(|(_, parked)| parked.idle_check() <= now)
            .map(|(key, _)| key)
            .collect();
        self.resume(state, &due, false);
        newly_parked
    }
}

/// The epoll token of the socket on `side` (0 client, 1 server) of the connection
/// parked under `key`.
fn token(key: usize, side: usize) -> Token {
    Token(key << 1 | side)
}

/// Whether a parked socket has something for its relay: a byte to read (passed by
/// the program, or not seen by it yet), its FIN, or an error. If poll itself fails,
/// the relay finds out why.
fn has_news(socket: &std::net::TcpStream) -> bool {
    sockopt::has_events(socket).unwrap_or(true)
}

/// Waits for news of parked connections and for the program's grant requests, for as
/// long as the daemon runs.
pub async fn watch(sockmap: Arc<Sockmap>, poll: AsyncFd<mio::Poll>, requests: GrantRequests) {
    let error = watch_until_failure(&sockmap.parking, poll, requests).await;
    warn!("{error}: connections are no longer parked");
    sockmap.parking.close();
}

async fn watch_until_failure(
    parking: &Parking,
    mut poll: AsyncFd<mio::Poll>,
    mut requests: GrantRequests,
) -> String {
    let mut events = Events::with_capacity(EVENTS);
    let mut sweep = tokio::time::interval(IDLE_SWEEP);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut trim = Trim::new();
    loop {
        tokio::select! {
            read = requests.next(|cookie| parking.on_grant_request(cookie)) => {
                if let Err(e) = read {
                    return format!("reading the splice's grant requests: {e}");
                }
            }
            ready = poll.readable_mut() => {
                let mut ready = match ready {
                    Ok(ready) => ready,
                    Err(e) => return format!("waiting on parked connections: {e}"),
                };
                loop {
                    match ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return format!("waiting on parked connections: {e}"),
                    }
                    let mut seen = 0;
                    for event in &events {
                        seen += 1;
                        parking.on_event(event.token());
                    }
                    if seen < EVENTS {
                        break;
                    }
                }
                ready.clear_ready();
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                trim.on_sweep(parking.on_idle_sweep(now), now);
            }
        }
    }
}
