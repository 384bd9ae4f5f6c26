//! The `servers` map that `kgate status` and bpftool read, and the per-server byte
//! counters the splice program keeps.

use std::path::Path;

use aya::maps::{Array, Map, MapData, PerCpuArray};
use proxy_common::{MAX_SERVERS, ServerBytes, ServerEntry, maps as names};

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

/// The servers a running kgate published under `pin_dir`, for `kgate status`.
pub fn read_published(pin_dir: &Path) -> Result<Vec<ServerEntry>, MapsError> {
    let path = pin_dir.join(names::SERVERS_PIN);
    let data = MapData::from_pin(&path).map_err(|e| MapsError::Pin {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let array: Array<MapData, ServerEntry> = Map::Array(data)
        .try_into()
        .map_err(map_error(names::SERVERS))?;
    let mut entries = Vec::new();
    for slot in 0..MAX_SERVERS as u32 {
        // Slots of removed servers are empty until a new server takes them.
        let entry = array.get(&slot, 0).map_err(map_error(names::SERVERS))?;
        if entry.in_use == 1 {
            entries.push(entry);
        }
    }
    Ok(entries)
}
