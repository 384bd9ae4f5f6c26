//! The XDP early-drop program's maps and attachments (the program is
//! proxy-ebpf/src/xdp.rs; the daemon side, crate::xdp, decides what goes in them).
//!
//! Pins under `bpf_pin_path`: `blocklist_v4` and `blocklist_v6` outlive kgate: they
//! are kept when it exits and reused by the next start ([`reuse_kept_pins`]), so
//! blocks made at run time survive a restart, and `kgate block` can edit them from
//! any shell ([`Blocklist::open_pinned`]). `xdp_frontends`, `xdp_config`, `syn_rate`
//! and `xdp_stats` belong to one run and are removed with the other pins.

use std::{
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, MapInfo, MapType, PerCpuArray, lpm_trie::Key},
    programs::{ProgramError, Xdp, XdpMode as AttachFlags},
};
use proxy_common::xdp::{
    self as common, BlockEntry, FrontendKey, MAX_BLOCKED_PREFIXES, XdpConfig, XdpStats,
    maps as names, v4_mapped,
};
use tracing::warn;

use super::{Bpf, MapError, MapsError, lock, map_error, program, program_error};
use crate::{config::XdpMode, xdp::Prefix};

/// The blocklists' (map name, pin name, key size): the pins kept across runs.
const KEPT: [(&str, &str, usize); 2] = [
    (
        names::BLOCKLIST_V4,
        names::BLOCKLIST_V4_PIN,
        size_of::<Key<[u8; 4]>>(),
    ),
    (
        names::BLOCKLIST_V6,
        names::BLOCKLIST_V6_PIN,
        size_of::<Key<[u8; 16]>>(),
    ),
];

/// Loads the XDP program (called by [`Bpf::load`] with the other programs).
pub(super) fn load_program(ebpf: &mut Ebpf) -> Result<(), MapsError> {
    let xdp: &mut Xdp = program(ebpf, common::PROGRAM)?;
    xdp.load().map_err(program_error(common::PROGRAM))
}

/// Makes the loader open the blocklists a previous kgate pinned instead of creating
/// new ones. A pinned map of another layout (an older kgate's) is removed, with a
/// warning: its entries cannot be read as this version's.
pub(super) fn reuse_kept_pins(loader: &mut EbpfLoader<'_>, pin_dir: &Path) {
    for (name, pin, key_size) in KEPT {
        let path = pin_dir.join(pin);
        if !path.exists() {
            continue;
        }
        match MapInfo::from_pin(&path) {
            Ok(info) if is_blocklist(&info, key_size) => {
                loader.map_pin_path(name, path);
            }
            result => {
                let why = match result {
                    Ok(_) => "it has another layout (made by another kgate version)".to_owned(),
                    Err(e) => format!("it cannot be read ({e})"),
                };
                warn!(pin = %path.display(), "replacing the pinned blocklist, whose entries are lost: {why}");
                if let Err(e) = fs::remove_file(&path) {
                    warn!(pin = %path.display(), "could not remove the old blocklist: {e}");
                }
            }
        }
    }
}

fn is_blocklist(info: &MapInfo, key_size: usize) -> bool {
    matches!(info.map_type(), Ok(MapType::LpmTrie))
        && info.key_size() as usize == key_size
        && info.value_size() as usize == size_of::<BlockEntry>()
        && info.max_entries() as usize == MAX_BLOCKED_PREFIXES
}

/// Where an interface's XDP program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// In the driver, before an skb exists.
    Native,
    /// In the generic path, after the skb is built.
    Generic,
    /// The attachment of the kgate this one replaces, moved to this one's program at
    /// once (an upgrade, maps/handover.rs), in the mode it had.
    TakenOver,
}

impl fmt::Display for Attached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Attached::Native => "native",
            Attached::Generic => "generic",
            Attached::TakenOver => "taken over",
        })
    }
}

impl Bpf {
    /// Pins the XDP program's maps (the blocklists as kept pins) and returns their
    /// handles. Nothing is attached yet: fill the maps, then [`Bpf::attach_xdp`].
    pub fn xdp(&mut self) -> Result<XdpMaps, MapsError> {
        if let Some(error) = self.xdp_load_error.take() {
            return Err(error);
        }
        let frontends = self.take_pinned(names::FRONTENDS, names::FRONTENDS_PIN)?;
        let config = self.take_pinned(names::CONFIG, names::CONFIG_PIN)?;
        let stats = self.take_pinned(names::STATS, names::STATS_PIN)?;
        // Only the program uses it; pinned so that `bpftool` can show it.
        self.take_pinned(names::SYN_RATE, names::SYN_RATE_PIN)?;
        let v4 = self.take_kept(names::BLOCKLIST_V4, names::BLOCKLIST_V4_PIN)?;
        let v6 = self.take_kept(names::BLOCKLIST_V6, names::BLOCKLIST_V6_PIN)?;
        XdpMaps::new(frontends, config, stats, Blocklist::new(v4, v6)?)
    }

    /// Attaches the XDP program to `interface`: in the driver, in the generic path, or
    /// (auto) in the driver where it supports XDP and in the generic path otherwise.
    /// The attachment lasts as long as this `Bpf`.
    pub fn attach_xdp(&mut self, interface: &str, mode: XdpMode) -> Result<Attached, MapsError> {
        if self.take_over_xdp_link(interface)? {
            return Ok(Attached::TakenOver);
        }
        let program: &mut Xdp = program(&mut self.ebpf, common::PROGRAM)?;
        let native = match mode {
            XdpMode::Generic => None,
            XdpMode::Native | XdpMode::Auto => Some(program.attach(interface, AttachFlags::Driver)),
        };
        let (link, attached) = match native {
            Some(Ok(link)) => (link, Attached::Native),
            Some(Err(e)) if mode == XdpMode::Native || !driver_lacks_xdp(&e) => {
                return Err(program_error(common::PROGRAM)(e));
            }
            Some(Err(_)) | None => (
                program
                    .attach(interface, AttachFlags::Skb)
                    .map_err(program_error(common::PROGRAM))?,
                Attached::Generic,
            ),
        };
        self.xdp_links.push((interface.to_owned(), link));
        Ok(attached)
    }

    /// Takes map `name` and pins it as `pin_dir/pin` unless it is pinned there already
    /// (reused at load), without adding it to the pins removed at exit.
    fn take_kept(&mut self, name: &'static str, pin: &str) -> Result<Map, MapsError> {
        let map = self.ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
        let path = self.pin_dir.join(pin);
        let pin_error = |source| MapsError::Pin {
            path: path.clone(),
            source,
        };
        let own_id = match &map {
            Map::LpmTrie(data) => data.info().map_err(map_error(name))?.id(),
            _ => return Err(MapsError::Missing(name)),
        };
        match MapInfo::from_pin(&path) {
            Ok(pinned) if pinned.id() == own_id => return Ok(map),
            Ok(_) => fs::remove_file(&path).map_err(pin_error)?,
            Err(_) => {}
        }
        map.pin(&path).map_err(|e| pin_error(io::Error::other(e)))?;
        Ok(map)
    }
}

/// The kernel's answer when a driver has no native XDP.
fn driver_lacks_xdp(error: &ProgramError) -> bool {
    matches!(error, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EOPNOTSUPP))
}

/// Handles on the XDP program's maps, for the daemon.
pub struct XdpMaps {
    frontends: Mutex<HashMap<MapData, FrontendKey, u32>>,
    config: Mutex<Array<MapData, XdpConfig>>,
    stats: PerCpuArray<MapData, XdpStats>,
    blocklist: Blocklist,
}

impl XdpMaps {
    fn new(
        frontends: Map,
        config: Map,
        stats: Map,
        blocklist: Blocklist,
    ) -> Result<Self, MapsError> {
        Ok(XdpMaps {
            frontends: Mutex::new(frontends.try_into().map_err(map_error(names::FRONTENDS))?),
            config: Mutex::new(config.try_into().map_err(map_error(names::CONFIG))?),
            stats: stats.try_into().map_err(map_error(names::STATS))?,
            blocklist,
        })
    }

    /// Makes `addresses` (each with its frontend's index) the frontends the program
    /// guards, and no others.
    pub fn set_frontends(&self, addresses: &[(SocketAddr, u32)]) -> Result<(), MapError> {
        let mut map = lock(&self.frontends);
        let wanted: Vec<(FrontendKey, u32)> = addresses
            .iter()
            .map(|&(address, index)| (frontend_key(address), index))
            .collect();
        let stale: Vec<FrontendKey> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.iter().any(|(k, _)| k == key))
            .collect();
        for key in stale {
            map.remove(&key)?;
        }
        for (key, index) in wanted {
            map.insert(key, index, 0)?;
        }
        Ok(())
    }

    /// Replaces the program's settings (the SYN rate limit).
    pub fn set_config(&self, config: XdpConfig) -> Result<(), MapError> {
        lock(&self.config).set(0, config, 0)
    }

    /// The program's counters summed over CPUs: for `kgate status`, the metrics and
    /// the log at shutdown.
    pub fn stats(&self) -> Result<XdpStats, MapError> {
        let per_cpu = self.stats.get(&0, 0)?;
        Ok(XdpStats::sum(per_cpu.iter()))
    }

    pub fn blocklist(&self) -> &Blocklist {
        &self.blocklist
    }
}

fn frontend_key(address: SocketAddr) -> FrontendKey {
    let addr = match address.ip() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    FrontendKey::new(addr, address.port())
}

/// The two blocklists (LPM tries keyed by source prefix), from the daemon or from a
/// `kgate block` command working on the pins.
pub struct Blocklist {
    v4: Mutex<LpmTrie<MapData, [u8; 4], BlockEntry>>,
    v6: Mutex<LpmTrie<MapData, [u8; 16], BlockEntry>>,
}

impl Blocklist {
    fn new(v4: Map, v6: Map) -> Result<Blocklist, MapsError> {
        Ok(Blocklist {
            v4: Mutex::new(v4.try_into().map_err(map_error(names::BLOCKLIST_V4))?),
            v6: Mutex::new(v6.try_into().map_err(map_error(names::BLOCKLIST_V6))?),
        })
    }

    /// Opens the blocklists pinned under `pin_dir` (by a running kgate, or one that ran
    /// since the machine started).
    pub fn open_pinned(pin_dir: &Path) -> Result<Blocklist, MapsError> {
        let open = |name: &'static str, pin: &str, key_size: usize| {
            let path = pin_dir.join(pin);
            let info = MapInfo::from_pin(&path).map_err(map_error(name))?;
            if !is_blocklist(&info, key_size) {
                return Err(MapsError::Pin {
                    path,
                    source: io::Error::other(
                        "this map is not a blocklist of this kgate version: restart kgate \
                         (it replaces the map) and try again",
                    ),
                });
            }
            let data = MapData::from_pin(&path).map_err(map_error(name))?;
            Map::from_map_data(data).map_err(map_error(name))
        };
        let [(v4_name, v4_pin, v4_key), (v6_name, v6_pin, v6_key)] = KEPT;
        Blocklist::new(
            open(v4_name, v4_pin, v4_key)?,
            open(v6_name, v6_pin, v6_key)?,
        )
    }

    /// Adds `prefix`, or replaces its entry.
    pub fn insert(&self, prefix: &Prefix, entry: BlockEntry) -> Result<(), MapError> {
        let entry = BlockEntry {
            prefix_len: prefix.len(),
            ..entry
        };
        match prefix.addr() {
            IpAddr::V4(a) => {
                lock(&self.v4).insert(&Key::new(prefix.len().into(), a.octets()), entry, 0)
            }
            IpAddr::V6(a) => {
                lock(&self.v6).insert(&Key::new(prefix.len().into(), a.octets()), entry, 0)
            }
        }
    }

    /// Adds `prefix` only if it has no entry yet (`BPF_NOEXIST`, so an entry another
    /// process made meanwhile is never overwritten); false when it had one.
    pub fn insert_if_absent(&self, prefix: &Prefix, entry: BlockEntry) -> Result<bool, MapError> {
        const BPF_NOEXIST: u64 = 1;
        let entry = BlockEntry {
            prefix_len: prefix.len(),
            ..entry
        };
        let inserted = match prefix.addr() {
            IpAddr::V4(a) => lock(&self.v4).insert(
                &Key::new(prefix.len().into(), a.octets()),
                entry,
                BPF_NOEXIST,
            ),
            IpAddr::V6(a) => lock(&self.v6).insert(
                &Key::new(prefix.len().into(), a.octets()),
                entry,
                BPF_NOEXIST,
            ),
        };
        match inserted {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The entry of exactly `prefix` (not of a shorter prefix that holds it).
    pub fn get(&self, prefix: &Prefix) -> Result<Option<BlockEntry>, MapError> {
        let found = match prefix.addr() {
            IpAddr::V4(a) => lock(&self.v4).get(&Key::new(prefix.len().into(), a.octets()), 0),
            IpAddr::V6(a) => lock(&self.v6).get(&Key::new(prefix.len().into(), a.octets()), 0),
        };
        match found {
            Ok(entry) if entry.prefix_len == prefix.len() => Ok(Some(entry)),
            Ok(_) | Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes exactly `prefix`; false when it was not there.
    pub fn remove(&self, prefix: &Prefix) -> Result<bool, MapError> {
        let removed = match prefix.addr() {
            IpAddr::V4(a) => lock(&self.v4).remove(&Key::new(prefix.len().into(), a.octets())),
            IpAddr::V6(a) => lock(&self.v6).remove(&Key::new(prefix.len().into(), a.octets())),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Every entry, IPv4 first.
    pub fn entries(&self) -> Result<Vec<(Prefix, BlockEntry)>, MapError> {
        let mut entries = Vec::new();
        for item in lock(&self.v4).iter() {
            let (key, entry) = item?;
            let addr = IpAddr::V4(Ipv4Addr::from(key.data()));
            entries.push((Prefix::masked(addr, key.prefix_len()), entry));
        }
        for item in lock(&self.v6).iter() {
            let (key, entry) = item?;
            let addr = IpAddr::V6(Ipv6Addr::from(key.data()));
            entries.push((Prefix::masked(addr, key.prefix_len()), entry));
        }
        Ok(entries)
    }

    /// Removes the entries that expired before `now` (`CLOCK_BOOTTIME` seconds);
    /// returns how many. An entry renewed meanwhile (by `kgate block add`) stays.
    pub fn remove_expired(&self, now: u64) -> Result<usize, MapError> {
        let mut removed = 0;
        for (prefix, entry) in self.entries()? {
            if entry.applies_at(now) {
                continue;
            }
            let still_expired = self.get(&prefix)?.is_some_and(|e| !e.applies_at(now));
            if still_expired && self.remove(&prefix)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// Blocklist entries by where they came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginCounts {
    pub file: usize,
    pub command: usize,
    pub crowdsec: usize,
}

impl OriginCounts {
    /// The entries among `entries` that apply at `now`, by origin.
    pub fn of<'a>(entries: impl IntoIterator<Item = &'a BlockEntry>, now: u64) -> OriginCounts {
        let mut counts = OriginCounts::default();
        for entry in entries.into_iter().filter(|e| e.applies_at(now)) {
            counts.add(entry.origin);
        }
        counts
    }

    fn add(&mut self, origin: u8) {
        match origin {
            common::ORIGIN_FILE => self.file += 1,
            common::ORIGIN_COMMAND => self.command += 1,
            common::ORIGIN_CROWDSEC => self.crowdsec += 1,
            _ => {}
        }
    }

    pub fn total(&self) -> usize {
        self.file + self.command + self.crowdsec
    }
}

#[cfg(test)]
mod tests;
