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

use std::{
    collections::HashMap,
    io,
    os::fd::AsRawFd,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use mio::{Events, Interest, Token, unix::SourceFd};
use tokio::{
    io::unix::AsyncFd,
    sync::Notify,
    time::{Instant, MissedTickBehavior},
};
use tracing::{debug, warn};

use super::{relay::Parked, sockmap::Sockmap};
use crate::{maps::GrantRequests, sockopt};

/// How long a spliced connection's relay waits with nothing to do before it parks.
/// Long enough that a short session (an SMTP greeting and QUIT) ends in its first task.
pub const PARK_AFTER: Duration = Duration::from_millis(50);
/// How often parked connections are looked at for their idle deadline.
const IDLE_SWEEP: Duration = Duration::from_millis(100);
/// Epoll events read at once.
const EVENTS: usize = 256;
/// Once this many connections have parked, the memory their tasks held is given back
/// to the system (see [`give_back_freed_memory`]): when a sweep finds no more parked,
/// or [`TRIM_EVERY`] after the last time while they keep coming.
const TRIM_AFTER_PARKED: usize = 1024;
const TRIM_EVERY: Duration = Duration::from_secs(1);

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
    /// By the client socket's cookie.
    parked: HashMap<u64, Box<Parked>>,
    /// Connections parked since memory was last given back.
    parked_since_trim: usize,
}

enum Waiter {
    /// The connection's relay runs in a task.
    Relay(Arc<Notify>),
    /// The connection is parked under this client cookie.
    Parked(u64),
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
    pub fn park(&self, parked: Box<Parked>) -> Option<Box<Parked>> {
        let cookies = parked.splice().cookies();
        let mut state = self.lock();
        if state.closed {
            return Some(parked);
        }
        // Under the lock: a request from now on finds the connection parked.
        if parked.splice().take_grant_request() {
            parked.splice().grant_waiter().notify_one();
            return Some(parked);
        }
        let sockets = parked.sockets();
        for (i, (socket, cookie)) in sockets.iter().zip(cookies).enumerate() {
            let fd = socket.as_raw_fd();
            let registered = self.registry.register(
                &mut SourceFd(&fd),
                Token(cookie as usize),
                Interest::READABLE,
            );
            if let Err(e) = registered {
                debug!("cannot park a connection: {e}");
                for socket in &sockets[..i] {
                    let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
                }
                return Some(parked);
            }
        }
        for cookie in cookies {
            state.waiters.insert(cookie, Waiter::Parked(cookies[0]));
        }
        state.parked.insert(cookies[0], parked);
        state.parked_since_trim += 1;
        None
    }

    /// Takes the connection parked under `client_cookie` out of the parking.
    fn take(&self, state: &mut State, client_cookie: u64) -> Option<Box<Parked>> {
        let parked = state.parked.remove(&client_cookie)?;
        for socket in parked.sockets() {
            let _ = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd()));
        }
        let waiter = parked.splice().grant_waiter();
        for cookie in parked.splice().cookies() {
            state.waiters.insert(cookie, Waiter::Relay(waiter.clone()));
        }
        Some(parked)
    }

    /// Takes the connections parked under `client_cookies` out of the parking, each
    /// into a task of its own.
    fn resume(&self, mut state: MutexGuard<'_, State>, client_cookies: &[u64]) {
        let resumed: Vec<_> = client_cookies
            .iter()
            .filter_map(|&cookie| self.take(&mut state, cookie))
            .collect();
        drop(state);
        for parked in resumed {
            tokio::spawn(parked.resume());
        }
    }

    /// The program asked for a larger grant for socket `cookie`.
    fn on_grant_request(&self, cookie: u64) {
        let state = self.lock();
        match state.waiters.get(&cookie) {
            Some(Waiter::Relay(waiter)) => waiter.notify_one(),
            Some(&Waiter::Parked(client_cookie)) => {
                if let Some(parked) = state.parked.get(&client_cookie) {
                    // The resumed relay finds the request waiting.
                    parked.splice().grant_waiter().notify_one();
                }
                self.resume(state, &[client_cookie]);
            }
            None => {}
        }
    }

    /// Epoll reported socket `cookie`.
    fn on_event(&self, cookie: u64) {
        let state = self.lock();
        let Some(&Waiter::Parked(client_cookie)) = state.waiters.get(&cookie) else {
            return;
        };
        let news = state.parked.get(&client_cookie).is_some_and(|parked| {
            let [client, server] = parked.sockets();
            has_news(if cookie == client_cookie {
                client
            } else {
                server
            })
        });
        if news {
            self.resume(state, &[client_cookie]);
        }
    }

    /// The watcher has stopped: resumes every parked connection, and parks none
    /// from now on.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let all: Vec<u64> = state.parked.keys().copied().collect();
        self.resume(state, &all);
    }

    /// Resumes the connections whose idle deadline has come. Returns how many
    /// connections parked since the last call.
    fn on_idle_sweep(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let newly_parked = std::mem::take(&mut state.parked_since_trim);
        let due: Vec<u64> = state
            .parked
            .iter()
            .filter(|(_, parked)| parked.idle_check() <= now)
            .map(|(&cookie, _)| cookie)
            .collect();
        self.resume(state, &due);
        newly_parked
    }
}

/// Returns the memory freed by ended tasks to the system. glibc keeps freed memory for
/// reuse and returns it only from the top of its heaps, so after a burst of
/// connections has parked, the tasks they no longer have still count in kgate's
/// resident memory: measured, 2.7 KB of the 3 KB per parked connection, 360 B after
/// trimming.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
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
    let mut newly_parked = 0;
    let mut last_trim = Instant::now();
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
                        parking.on_event(event.token().0 as u64);
                    }
                    if seen < EVENTS {
                        break;
                    }
                }
                ready.clear_ready();
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let parked_now = parking.on_idle_sweep(now);
                newly_parked += parked_now;
                if newly_parked >= TRIM_AFTER_PARKED
                    && (parked_now == 0 || now >= last_trim + TRIM_EVERY)
                {
                    give_back_freed_memory();
                    (newly_parked, last_trim) = (0, now);
                }
            }
        }
    }
}
