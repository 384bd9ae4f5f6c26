//! Joining a connection's two sockets to the eBPF splice, and leaving it.
//!
//! The order, measured lossless on kernel 6.18 (DESIGN.md, "Connection lifecycle"):
//!
//! 1. the client C is accepted and the server B connected;
//! 2. the PROXY header is written to B by userspace, before anything is spliced, and
//!    so is every byte kgate copied before the splice (`splice_after`): nothing it
//!    read is still unwritten. Bytes it has not read stay in the sockets' queues, the
//!    head skb perhaps read in part: the program starts each socket's stream at the
//!    socket's reading position (`copied_seq`), and cuts off what kgate read;
//! 3. `PEERS[C] = B`, `PEERS[B] = C`: the redirect targets exist before any program
//!    sees a byte (a socket whose peer is missing has its bytes dropped);
//! 4. `SPLICED[B] = B`, then `SPLICED[C] = C`: the verdict program now sees their bytes;
//! 5. `SO_RCVLOWAT = 1` on each spliced socket: this runs the data-ready callback, so
//!    bytes that arrived before step 4 (an SMTP banner, a TLS ClientHello) go through
//!    the verdict now instead of waiting for more bytes that may never come.
//!
//! The kernel only takes TCP sockets that are established into a sock hash: a socket
//! that has already received its FIN is refused. Whatever is refused is copied by
//! userspace instead; a direction is never half in one plane and half in the other.
//!
//! Each socket's flow state (`FLOWS`, `GRANTS`) is created before it joins `SPLICED`,
//! with a grant: how many more bytes the program may redirect before it passes the
//! socket's bytes to userspace instead (see direction.rs). Halfway through a grant the
//! program asks for more (`GRANT_REQUESTS`), and the relay extends it by what the peer
//! has taken meanwhile.
//!
//! The bound, and why the send buffers are set: the kernel keeps two kinds of bytes in
//! one queue per socket, in order (the psock's backlog): bytes redirected *to* the
//! socket that its send buffer could not take yet, and bytes the socket received and
//! the program passed while that queue was not empty. Bytes queued there belong to no
//! socket's memory: TCP keeps its receive window open over them. So if a client never
//! reads, bytes redirected to the client's socket stay queued, everything the client
//! sends behind them is passed into the same queue, and the client can upload without
//! limit (measured: 3 GiB in a second, with an echo backend). Hence two rules, kept
//! for each direction, bytes from a source to a target socket:
//!
//! - at most `queue_limit` bytes are on their way out through the target: redirected
//!   and not yet in its send queue, plus in its send queue and not yet acknowledged
//!   (grants, and kgate's own copies into a spliced target, both count them);
//! - the target's send buffer is set to twice `queue_limit` (the kernel doubles it
//!   again), so the kernel's worker can always move every redirected byte into it.
//!
//! Then the backlog drains as soon as it forms, passed bytes land in the receiving
//! socket's own message queue, charged to its receive buffer, and TCP flow control
//! holds the sender back: a connection costs at most `queue_limit` and a receive
//! buffer per direction, whatever its peers do.
//!
//! Leaving: entries are removed from `SPLICED` first, then from `PEERS` and the flow
//! state, and only after the relay has seen every redirected byte reach the target's
//! send queue.

use std::{
    os::fd::AsFd,
    pin::pin,
    sync::Arc,
    task::{Context, Waker},
};

use socket2::SockRef;
use tokio::{net::TcpStream, sync::Notify};
use tracing::debug;

use proxy_common::{FROM_CLIENT, FROM_SERVER, FlowCounters, FlowGrant};

use super::{CounterSlots, Mode, SpliceTerms, parking::Parking};
use crate::{
    maps::{GrantRequests, MapError, SpliceMaps},
    sockopt,
};

/// The sockmap data plane: the splice's maps, and the connections parked while the
/// kernel moves their bytes.
pub struct Sockmap {
    pub maps: SpliceMaps,
    pub parking: Parking,
}

impl Sockmap {
    /// Starts watching parked connections and the program's grant requests. Must run
    /// inside the tokio runtime.
    pub fn start(maps: SpliceMaps, requests: GrantRequests) -> std::io::Result<Arc<Sockmap>> {
        let (parking, poll) = Parking::new()?;
        // The watcher holds the data plane for as long as the runtime runs.
        let sockmap = Arc::new(Sockmap { maps, parking });
        tokio::spawn(super::parking::watch(sockmap.clone(), poll, requests));
        Ok(sockmap)
    }
}

/// A connection's place in the sock hashes; removes it on drop.
pub struct Splice {
    sockmap: Arc<Sockmap>,
    /// Cookies of (client, server).
    cookies: [u64; 2],
    peers: bool,
    /// Which of (client, server) have flow state.
    flow_state: [bool; 2],
    /// Which of (client, server) are in `SPLICED`.
    spliced: [bool; 2],
    flows: [Mode; 2],
    queue_limit: u64,
    counters: CounterSlots,
    /// Woken when the program asks for a larger grant for either socket, while the
    /// relay runs; none while the connection is parked (the parking routes requests).
    grant_requests: Option<Arc<Notify>>,
    /// Whether `grant_requests` is registered for both cookies.
    watching: bool,
}

impl Splice {
    /// Splices as much of the connection as the kernel takes. Never fails: what
    /// cannot be spliced is left to be copied.
    pub fn start(
        sockmap: Arc<Sockmap>,
        client: &TcpStream,
        server: &TcpStream,
        terms: SpliceTerms,
    ) -> Splice {
        let mut splice = Splice {
            sockmap,
            cookies: [0; 2],
            peers: false,
            flow_state: [false; 2],
            spliced: [false; 2],
            flows: [Mode::Copied; 2],
            queue_limit: terms.queue_limit,
            counters: terms.counters,
            grant_requests: Some(Arc::default()),
            watching: false,
        };
        if let Err(e) = splice.join(client, server) {
            debug!("connection copied instead of spliced: {e}");
        }
        splice
    }

    /// The mode of (client -> server, server -> client).
    pub fn flows(&self) -> [Mode; 2] {
        self.flows
    }

    /// What the program has done with the bytes of socket `cookie`.
    pub fn counters(&self, cookie: u64) -> Result<FlowCounters, MapError> {
        self.sockmap.maps.flow_counters(cookie)
    }

    /// The most bytes one direction may have on their way out through its target
    /// (see the module docs).
    pub fn queue_limit(&self) -> u64 {
        self.queue_limit
    }

    /// Lets the program redirect socket `cookie`'s bytes again, until `queued` (on
    /// their way out through the target already) and the redirected ones reach
    /// `queue_limit`; provided nothing more was passed since `counters` were read.
    pub fn grant(&self, cookie: u64, counters: FlowCounters, queued: u64) -> Result<(), MapError> {
        let headroom = self.queue_limit.saturating_sub(queued);
        self.sockmap.maps.set_grant(
            cookie,
            self.grant_after(counters, self.direction(cookie), headroom),
        )
    }

    /// Answers the program's request for more: [`Splice::grant`], unless the peer has
    /// fallen behind (less than a quarter of `queue_limit` left), in which case the
    /// direction stops at its current bound. Only while nothing passed waits to be
    /// read: the caller checks that `counters.passed` were all read.
    pub fn extend(&self, cookie: u64, counters: FlowCounters, queued: u64) -> Result<(), MapError> {
        if self.queue_limit.saturating_sub(queued) < self.queue_limit / 4 {
            return Ok(());
        }
        self.grant(cookie, counters, queued)
    }

    /// Completes when the program has asked for a larger grant for either socket.
    pub async fn grant_requested(&self) {
        match &self.grant_requests {
            Some(requests) => requests.notified().await,
            None => std::future::pending().await,
        }
    }

    /// Whether the program asked for a larger grant since the relay last looked (and
    /// forgets that it did).
    pub fn take_grant_request(&self) -> bool {
        let Some(requests) = &self.grant_requests else {
            return false;
        };
        let mut notified = pin!(requests.notified());
        notified
            .as_mut()
            .poll(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    pub fn sockmap(&self) -> &Arc<Sockmap> {
        &self.sockmap
    }

    /// Cookies of (client, server).
    pub fn cookies(&self) -> [u64; 2] {
        self.cookies
    }

    /// What wakes the relay for a grant request while it runs.
    pub fn grant_waiter(&self) -> Option<&Arc<Notify>> {
        self.grant_requests.as_ref()
    }

    /// The connection parks: its grant requests go to the parking instead. The
    /// parking keeps nothing of a connection's but its record (see parking.rs).
    pub fn drop_grant_waiter(&mut self) {
        self.grant_requests = None;
    }

    /// The connection resumes: a new waiter for its relay's grant requests.
    pub fn renew_grant_waiter(&mut self) -> Arc<Notify> {
        self.grant_requests.insert(Arc::default()).clone()
    }

    fn direction(&self, cookie: u64) -> u32 {
        if cookie == self.cookies[0] {
            FROM_CLIENT
        } else {
            FROM_SERVER
        }
    }

    fn grant_after(&self, counters: FlowCounters, direction: u32, headroom: u64) -> FlowGrant {
        FlowGrant {
            redirect_until: counters.redirected.saturating_add(headroom),
            resume_at_passed: counters.passed,
            // Asking halfway leaves userspace time to answer before the bound.
            notify_at: counters.redirected.saturating_add(headroom / 2),
            server_slot: self.counters.server,
            direction,
            frontend_slot: self.counters.frontend,
            _pad: 0,
        }
    }

    fn join(&mut self, client: &TcpStream, server: &TcpStream) -> Result<(), String> {
        let cookie = |s: &TcpStream| {
            SockRef::from(s)
                .cookie()
                .map_err(|e| format!("SO_COOKIE: {e}"))
        };
        let sending = |s: &TcpStream| {
            sockopt::send_queue(s.as_fd()).map_err(|e| format!("TCP_INFO or SIOCOUTQ: {e}"))
        };
        let [c, b] = [cookie(client)?, cookie(server)?];
        self.cookies = [c, b];
        // Read before any byte can be redirected into the sockets.
        let [to_server, to_client] = [sending(server)?, sending(client)?];
        // Before the program sees a byte: each socket is the target of the other's
        // direction (the bound, in the module docs).
        for socket in [server, client] {
            sockopt::force_send_buffer(socket.as_fd(), self.queue_limit.saturating_mul(2))
                .map_err(|e| format!("SO_SNDBUFFORCE: {e}"))?;
        }

        // Step 3.
        self.sockmap
            .maps
            .insert_peer(c, server)
            .map_err(|e| format!("PEERS[client]: {e}"))?;
        self.peers = true;
        self.sockmap
            .maps
            .insert_peer(b, client)
            .map_err(|e| format!("PEERS[server]: {e}"))?;

        // Flow state before the program can see a byte.
        if let Some(requests) = &self.grant_requests {
            self.sockmap.parking.watch_grant_requests([c, b], requests);
            self.watching = true;
        }
        let targets = [(c, FROM_CLIENT, to_server), (b, FROM_SERVER, to_client)];
        for (i, (key, direction, target)) in targets.into_iter().enumerate() {
            let headroom = self.queue_limit.saturating_sub(target.unacked);
            let grant = self.grant_after(FlowCounters::default(), direction, headroom);
            self.sockmap
                .maps
                .insert_flow(key, grant)
                .map_err(|e| format!("FLOWS: {e}"))?;
            self.flow_state[i] = true;
        }

        // Step 4, then step 5 for each socket that joined. Both join before either is
        // kicked: a banner the server's kick releases could otherwise reach the
        // client, and the client's FIN come back, before the client joins, and a
        // socket that has its FIN cannot join (the direction would be copied).
        self.sockmap
            .maps
            .insert_spliced(b, server)
            .map_err(|e| format!("SPLICED[server]: {e}"))?;
        self.spliced[1] = true;
        self.flows[1] = Mode::Spliced {
            written_base: to_client.written,
            cookie: b,
        };
        let client_joined = self
            .sockmap
            .maps
            .insert_spliced(c, client)
            .map_err(|e| format!("SPLICED[client]: {e}"));
        if client_joined.is_ok() {
            self.spliced[0] = true;
            self.flows[0] = Mode::Spliced {
                written_base: to_server.written,
                cookie: c,
            };
        }
        kick(server);
        if client_joined.is_ok() {
            kick(client);
        }
        client_joined
    }
}

/// Runs the verdict over bytes already queued on a spliced socket.
pub fn kick(socket: &TcpStream) {
    if let Err(e) = sockopt::set_receive_low_watermark(socket.as_fd(), 1) {
        debug!("SO_RCVLOWAT: {e}");
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        for (cookie, spliced) in self.cookies.into_iter().zip(self.spliced) {
            if spliced && let Err(e) = self.sockmap.maps.remove_spliced(cookie) {
                debug!(cookie, "removing from SPLICED: {e}");
            }
        }
        if self.peers {
            for cookie in self.cookies {
                // The second insert may have failed: a missing key is expected then.
                let _ = self.sockmap.maps.remove_peer(cookie);
            }
        }
        for (cookie, has_state) in self.cookies.into_iter().zip(self.flow_state) {
            if has_state {
                self.sockmap.maps.remove_flow(cookie);
            }
        }
        if self.watching {
            self.sockmap.parking.unwatch_grant_requests(self.cookies);
        }
    }
}
