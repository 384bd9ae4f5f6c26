//! The splice's maps: the two sock hashes, the per-socket flow state and counters.

use std::{io, os::fd::AsRawFd, sync::Mutex};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf, SockHash},
    programs::SkSkb,
};
use proxy_common::{FlowCounters, FlowGrant, SpliceStats, maps as names, programs};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::info;

use super::{Bpf, MapError, MapsError, lock, map_error, program, program_error};

/// The two sock hashes of the splice, the per-socket flow state and the counters.
pub struct SpliceMaps {
    peers: Mutex<SockHash<MapData, u64>>,
    spliced: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, FlowCounters>>,
    grants: Mutex<HashMap<MapData, u64, FlowGrant>>,
    stats: PerCpuArray<MapData, SpliceStats>,
    /// Whether the program learns where a socket's stream stands when it joins, so a
    /// connection may join mid-stream (see tcp_layout.rs).
    pub joins_mid_stream: bool,
}

/// The program's requests for a larger grant, as they come: each is a socket cookie.
pub struct GrantRequests(AsyncFd<RingBuf<MapData>>);

impl GrantRequests {
    /// Waits for requests, then calls `each` with the cookie of every one queued.
    pub async fn next(&mut self, mut each: impl FnMut(u64)) -> io::Result<()> {
        let mut ready = self.0.readable_mut().await?;
        while let Some(item) = ready.get_inner_mut().next() {
            if let Ok(cookie) = <[u8; 8]>::try_from(&*item) {
                each(u64::from_ne_bytes(cookie));
            }
        }
        ready.clear_ready();
        Ok(())
    }
}

impl Bpf {
    /// Pins the splice's maps and attaches the verdict program to `spliced`. Must run
    /// inside the tokio runtime: the grant request ring is polled by it.
    pub fn splice(&mut self) -> Result<(SpliceMaps, GrantRequests), MapsError> {
        let peers = self.take_pinned(names::PEERS, names::PEERS_PIN)?;
        let spliced = self.take_pinned(names::SPLICED, names::SPLICED_PIN)?;
        let flows = self.take_pinned(names::FLOWS, names::FLOWS_PIN)?;
        let grants = self.take_pinned(names::GRANTS, names::GRANTS_PIN)?;
        let stats = self.take_pinned(names::SPLICE_STATS, names::SPLICE_STATS_PIN)?;

        let peers: SockHash<MapData, u64> = peers.try_into().map_err(map_error(names::PEERS))?;
        let spliced: SockHash<MapData, u64> =
            spliced.try_into().map_err(map_error(names::SPLICED))?;
        let flows = flows.try_into().map_err(map_error(names::FLOWS))?;
        let grants = grants.try_into().map_err(map_error(names::GRANTS))?;
        let stats = stats.try_into().map_err(map_error(names::SPLICE_STATS))?;

        let verdict: &mut SkSkb = program(&mut self.ebpf, programs::SPLICE)?;
        verdict
            .attach(spliced.fd())
            .map_err(program_error(programs::SPLICE))?;
        let ring = self
            .ebpf
            .take_map(names::GRANT_REQUESTS)
            .ok_or(MapsError::Missing(names::GRANT_REQUESTS))?;
        let ring: RingBuf<MapData> = ring.try_into().map_err(map_error(names::GRANT_REQUESTS))?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the same for as
        // long as the ring lives, and the ring lives inside the AsyncFd.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                MapsError::Poll {
                    name: names::GRANT_REQUESTS,
                    source: e.into_parts().1,
                }
            })?;
        info!(pin_dir = %self.pin_dir.display(), "eBPF splice program attached, maps pinned");
        let maps = SpliceMaps {
            peers: Mutex::new(peers),
            spliced: Mutex::new(spliced),
            flows: Mutex::new(flows),
            grants: Mutex::new(grants),
            stats,
            joins_mid_stream: self.joins_mid_stream,
        };
        Ok((maps, GrantRequests(ring)))
    }
}

impl SpliceMaps {
    /// `PEERS[key] = socket`.
    pub fn insert_peer(&self, key: u64, socket: &impl AsRawFd) -> Result<(), MapError> {
        lock(&self.peers).insert(key, socket.as_raw_fd(), 0)
    }

    /// `SPLICED[key] = socket`: from now on the verdict program sees its bytes.
    pub fn insert_spliced(&self, key: u64, socket: &impl AsRawFd) -> Result<(), MapError> {
        lock(&self.spliced).insert(key, socket.as_raw_fd(), 0)
    }

    /// Starts the flow state of socket `key`: nothing counted yet, and `grant`.
    pub fn insert_flow(&self, key: u64, grant: FlowGrant) -> Result<(), MapError> {
        lock(&self.flows).insert(key, FlowCounters::default(), 0)?;
        self.set_grant(key, grant)
    }

    /// What the verdict program has done with socket `key`'s bytes so far.
    pub fn flow_counters(&self, key: u64) -> Result<FlowCounters, MapError> {
        lock(&self.flows).get(&key, 0)
    }

    /// Replaces socket `key`'s grant (atomically, as the program sees it).
    pub fn set_grant(&self, key: u64, grant: FlowGrant) -> Result<(), MapError> {
        lock(&self.grants).insert(key, grant, 0)
    }

    /// Forgets socket `key`'s flow state; a missing entry is not an error.
    pub fn remove_flow(&self, key: u64) {
        let _ = lock(&self.grants).remove(&key);
        let _ = lock(&self.flows).remove(&key);
    }

    pub fn remove_peer(&self, key: u64) -> Result<(), MapError> {
        lock(&self.peers).remove(&key)
    }

    pub fn remove_spliced(&self, key: u64) -> Result<(), MapError> {
        lock(&self.spliced).remove(&key)
    }

    /// The verdict program's counters summed over CPUs.
    pub fn stats(&self) -> Result<SpliceStats, MapError> {
        let per_cpu = self.stats.get(&0, 0)?;
        Ok(SpliceStats::sum(per_cpu.iter()))
    }
}
