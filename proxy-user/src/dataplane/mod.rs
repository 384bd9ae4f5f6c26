//! Moving a connection's bytes once the server is connected and has its header
//! ([`Dataplane::relay`], the one entry point of every plane).
//!
//! The three data planes run the same lifecycle ([`relay`]): every connection is
//! copied first, then
//! - `userspace` copies every byte through kgate to the end;
//! - `sockmap` ([`sockmap`], with [`parking`] for connections it carries alone) hands
//!   both sockets to the eBPF splice program and only watches for the ends of the
//!   connection. A connection is copied for its first `splice_after` (or
//!   [`SPLICE_AFTER_BYTES`]) and spliced from there on: a short session is over
//!   before then, and costs less copied than joined to the splice and taken out
//!   again. Each direction is either spliced or copied at any time, so a connection
//!   the kernel refuses to splice (a socket that already got its FIN, say) is still
//!   carried, by copying;
//! - `packet` ([`packet`], with [`packet_raw`] for the segments kgate itself sends)
//!   hands the connection off, at its first quiet moment, to the TC programs that
//!   forward its segments like a router; one it cannot hand off stays copied.
//!
//! What a connection moved and how it ended goes to its [`Ending`], which logs it.

mod direction;
mod packet;
mod packet_raw;
mod parking;
mod relay;
mod sockmap;
mod trim;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpStream;
use tracing::{info, warn};

pub use packet::Packet;
pub use sockmap::Sockmap;

use crate::{ending::Ending, pool::Path};

/// A connection whose server has its header: what the data plane relays.
pub struct Connected {
    pub client: TcpStream,
    pub server: TcpStream,
    pub terms: SpliceTerms,
    pub timeouts: Timeouts,
    pub ending: Ending,
}

pub enum Dataplane {
    Sockmap(Arc<Sockmap>),
    /// Copied until handed off to the TC programs (packet.rs).
    Packet(Arc<Packet>),
    Userspace,
}

impl Dataplane {
    pub fn name(&self) -> &'static str {
        match self {
            Dataplane::Sockmap(_) => "sockmap",
            Dataplane::Packet(_) => "packet",
            Dataplane::Userspace => "userspace",
        }
    }

    /// Carries `client` <-> `server` until both sides have closed, one has reset, or
    /// the connection idled out; then `ending` logs it. Returns early when the
    /// connection is parked: the rest happens in the task that resumes it.
    pub async fn relay(&self, connected: Connected) {
        let Connected {
            client,
            server,
            terms,
            timeouts,
            ending,
        } = connected;
        let plan = match self {
            Dataplane::Sockmap(sockmap) => relay::Plan::Splice(sockmap.clone()),
            Dataplane::Packet(packet) => relay::Plan::HandOff(packet.clone()),
            Dataplane::Userspace => relay::Plan::Copy,
        };
        relay::Relay::new(client, server, plan, terms, timeouts, ending)
            .run()
            .await;
    }

    /// Resets what the kernel alone still carries (forwarded flows); called once at
    /// shutdown, when the open connections had their time.
    pub fn close_all(&self) {
        if let Dataplane::Packet(packet) = self {
            packet.close_all();
        }
    }

    /// Logs the data plane's totals; called once at shutdown.
    pub fn log_totals(&self) {
        if let Dataplane::Packet(packet) = self {
            match packet.stats() {
                None => {}
                Some(Ok(stats)) => info!(
                    handed_off = packet.handed_off(),
                    forwarded_segments = stats.forwarded_segments,
                    forwarded_bytes = stats.forwarded_bytes,
                    frozen_drops = stats.frozen_drops,
                    held_windows = stats.held_windows,
                    silenced = stats.silenced,
                    no_route = stats.no_route,
                    malformed = stats.malformed,
                    events_lost = stats.events_lost,
                    "packet totals"
                ),
                Some(Err(e)) => warn!("reading the packet counters: {e}"),
            }
        }
        if let Dataplane::Sockmap(sockmap) = self {
            match sockmap.maps.stats() {
                Ok(stats) => info!(
                    redirected_bytes = stats.redirected_bytes,
                    redirect_failures = stats.redirect_failures,
                    passed_bytes = stats.passed_bytes,
                    trimmed_bytes = stats.trimmed_bytes,
                    trim_failures = stats.trim_failures,
                    unsequenced_skbs = stats.unsequenced_skbs,
                    grant_requests_lost = stats.grant_requests_lost,
                    unpositioned_sockets = stats.unpositioned_sockets,
                    "splice totals"
                ),
                Err(e) => warn!("reading the splice counters: {e}"),
            }
        }
    }
}

/// How a connection is spliced, on the sockmap data plane.
#[derive(Clone, Copy, Debug)]
pub struct SpliceTerms {
    /// The most bytes one spliced direction may have queued in the kernel.
    pub queue_limit: u64,
    /// Where the eBPF programs count the connection's bytes.
    pub counters: CounterSlots,
    /// How long the connection is copied first; see [`SPLICE_AFTER_BYTES`].
    pub after: Duration,
    /// Bytes kgate read from the client before the relay began, not to be forwarded
    /// (an accepted PROXY header, see `accept_proxy`): the client socket's TCP
    /// counters include them.
    pub client_bytes_read: u64,
}

/// Where the eBPF programs count a connection's bytes (spliced or forwarded): its
/// server's slot and its frontend's in their byte counter maps.
#[derive(Clone, Copy, Debug)]
pub struct CounterSlots {
    pub server: u32,
    pub frontend: u32,
}

/// A connection that has copied this many bytes (both directions together) is
/// spliced at once, however young: it is moving bulk.
pub const SPLICE_AFTER_BYTES: u64 = 64 * 1024;

/// How long a connection may go without moving a byte.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub idle: Duration,
    /// Once either side has sent its FIN.
    pub half_closed: Duration,
}

/// How one direction of a connection moves its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the kernel. `written_base` is the target socket's written-bytes counter
    /// (see `sockopt::SendQueue::written`) when the splice began; `cookie` is the source
    /// socket's, the key of its flow state in the maps.
    Spliced { written_base: u64, cookie: u64 },
    /// Read and written by kgate.
    Copied,
}

/// How a connection whose directions move so carries its bytes.
fn path_of(flows: [Mode; 2]) -> Path {
    match flows.map(|m| matches!(m, Mode::Spliced { .. })) {
        [true, true] => Path::Spliced,
        [false, false] => Path::Copied,
        _ => Path::Mixed,
    }
}
