//! The `servers` map that bpftool reads, and the per-server byte
//! counters the splice program keeps.

use aya::maps::{Array, MapData, PerCpuArray};
use proxy_common::{ServerBytes, ServerEntry, maps as names};

use super::{Bpf, MapError, MapsError, map_error};

pub struct ServerMaps {
    entries: std::sync::Mutex<Array<MapData, ServerEntry>>,
    bytes: std::sync::Mutex<PerCpuArray<MapData, ServerBytes>>,
}

impl Bpf {
    /// Pins the `servers` map and the per-server byte counters.
    pub fn servers(&mut self) -> Result<ServerMaps, MapsError> {
        let entries = self.take_pinned(names::SERVERS, names::SERVERS_PIN)?;
        let bytes = self.take_pinned(names::SERVER_BYTES, names::SERVER_BYTES_PIN)?;
        Ok(ServerMaps {
            entries: std::sync::Mutex::new(entries.try_into().map_err(map_error(names::SERVERS))?),
            bytes: std::sync::Mutex::new(bytes.try_into().map_err(map_error(names::SERVER_BYTES))?),
        })
    }
}

impl ServerMaps {
    /// Replaces the entry of `slot`.
    pub fn publish(&self, slot: u32, entry: &ServerEntry) -> Result<(), MapError> {
        super::lock(&self.entries).set(slot, entry, 0)
    }

    /// Empties `slot` (a removed server's), so that a new server there starts at zero.
    pub fn clear(&self, slot: u32) -> Result<(), MapError> {
        super::lock(&self.entries).set(slot, ServerEntry::default(), 0)?;
        let mut bytes = super::lock(&self.bytes);
        let cpus = bytes.get(&slot, 0)?.len();
        let zeros = aya::maps::PerCpuValues::try_from(vec![ServerBytes::default(); cpus])?;
        bytes.set(slot, zeros, 0)
    }

    /// Bytes the splice program moved for the server in `slot`, all CPUs together.
    pub fn spliced_bytes(&self, slot: u32) -> Result<ServerBytes, MapError> {
        let per_cpu = super::lock(&self.bytes).get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(ServerBytes::default(), |acc, b| ServerBytes {
                bytes_in: acc.bytes_in + b.bytes_in,
                bytes_out: acc.bytes_out + b.bytes_out,
            }))
    }
}
