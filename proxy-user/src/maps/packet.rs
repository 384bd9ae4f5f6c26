//! The packet data plane's maps and attachments (the programs are
//! proxy-ebpf/src/packet.rs; crate::dataplane::packet decides what goes in them).

use std::{io, sync::Mutex};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{SchedClassifier, TcAttachType},
};
use proxy_common::packet::{Event, FlowKey, PacketStats, Progress, Rule, maps as names, programs};
use tokio::io::{Interest, unix::AsyncFd};
use tracing::info;

use super::{Bpf, MapError, MapsError, lock, map_error, program, program_error};

/// Loads the TC programs (called by [`Bpf::load`] with the other programs).
pub(super) fn load_programs(ebpf: &mut Ebpf) -> Result<(), MapsError> {
    for name in [programs::INGRESS, programs::EGRESS] {
        let classifier: &mut SchedClassifier = program(ebpf, name)?;
        classifier.load().map_err(program_error(name))?;
    }
    Ok(())
}

/// The rules, each flow's progress and the counters of the packet data plane.
pub struct PacketMaps {
    rules: Mutex<HashMap<MapData, FlowKey, Rule>>,
    progress: Mutex<Array<MapData, Progress>>,
    stats: PerCpuArray<MapData, PacketStats>,
}

/// The programs' reports of flows that ended, as they come.
pub struct PacketEvents(AsyncFd<RingBuf<MapData>>);

impl PacketEvents {
    /// Waits for events, then calls `each` with every one queued.
    pub async fn next(&mut self, mut each: impl FnMut(Event)) -> io::Result<()> {
        let mut ready = self.0.readable_mut().await?;
        while let Some(item) = ready.get_inner_mut().next() {
            if let Ok(event) = bytemuck::try_pod_read_unaligned::<Event>(&item) {
                each(event);
            }
        }
        ready.clear_ready();
        Ok(())
    }
}

impl Bpf {
    /// Pins the packet data plane's maps and attaches its programs to the ingress and
    /// egress of each of `interfaces` (tcx; the attachments last as long as this `Bpf`).
    /// Must run inside the tokio runtime: the event ring is polled by it.
    pub fn packet(
        &mut self,
        interfaces: &[String],
    ) -> Result<(PacketMaps, PacketEvents), MapsError> {
        if let Some(error) = self.packet_load_error.take() {
            return Err(error);
        }
        let rules = self.take_pinned(names::RULES, names::RULES_PIN)?;
        let progress = self.take_pinned(names::PROGRESS, names::PROGRESS_PIN)?;
        let stats = self.take_pinned(names::STATS, names::STATS_PIN)?;
        let rules = rules.try_into().map_err(map_error(names::RULES))?;
        let progress = progress.try_into().map_err(map_error(names::PROGRESS))?;
        let stats = stats.try_into().map_err(map_error(names::STATS))?;
        for interface in interfaces {
            for (name, attach) in [
                (programs::INGRESS, TcAttachType::Ingress),
                (programs::EGRESS, TcAttachType::Egress),
            ] {
                let classifier: &mut SchedClassifier = program(&mut self.ebpf, name)?;
                classifier
                    .attach(interface, attach)
                    .map_err(program_error(name))?;
            }
        }
        let ring = self
            .ebpf
            .take_map(names::EVENTS)
            .ok_or(MapsError::Missing(names::EVENTS))?;
        let ring: RingBuf<MapData> = ring.try_into().map_err(map_error(names::EVENTS))?;
        // SAFETY: the ring buffer owns its map fd, open and unchanged while it lives,
        // and it lives inside the AsyncFd.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }.map_err(|e| {
                MapsError::Poll {
                    name: names::EVENTS,
                    source: e.into_parts().1,
                }
            })?;
        info!(
            ?interfaces,
            "packet data plane attached (tcx ingress and egress)"
        );
        Ok((
            PacketMaps {
                rules: Mutex::new(rules),
                progress: Mutex::new(progress),
                stats,
            },
            PacketEvents(ring),
        ))
    }
}

impl PacketMaps {
    /// Sets (or replaces, whole) the rule for segments arriving as `key`.
    pub fn set_rule(&self, key: &FlowKey, rule: &Rule) -> Result<(), MapError> {
        lock(&self.rules).insert(key, rule, 0)
    }

    pub fn rule(&self, key: &FlowKey) -> Result<Option<Rule>, MapError> {
        match lock(&self.rules).get(key, 0) {
            Ok(rule) => Ok(Some(rule)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes the rule for `key`; a missing one is not an error.
    pub fn remove_rule(&self, key: &FlowKey) {
        let _ = lock(&self.rules).remove(key);
    }

    /// Zeroes a flow's progress before its rules forward.
    pub fn reset_progress(&self, slot: u32) -> Result<(), MapError> {
        lock(&self.progress).set(slot, Progress::default(), 0)
    }

    pub fn progress(&self, slot: u32) -> Result<Progress, MapError> {
        lock(&self.progress).get(&slot, 0)
    }

    /// The programs' counters summed over CPUs.
    pub fn stats(&self) -> Result<PacketStats, MapError> {
        let per_cpu = self.stats.get(&0, 0)?;
        Ok(PacketStats::sum(per_cpu.iter()))
    }
}
