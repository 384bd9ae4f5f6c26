//! The maps behind `kgate status`: the `servers` map that bpftool reads, and the
//! byte counters the eBPF programs keep per server and per frontend.
//!
//! `servers` is read by people, with `bpftool map dump pinned <pin>/servers`, and by
//! no program: kgate creates it here, not in the eBPF object, as a hash keyed by slot
//! that holds the live servers only, with a BTF description of its own in which the
//! text fields are arrays of `char`. bpftool prints an array as a string only when
//! its elements are a 1-byte integer named `char` (or encoded as one), which no Rust
//! type compiles to: `u8`, `i8` and `c_char` all reach BTF as `u8` or `i8`, and their
//! arrays print as lists of numbers.

use std::{
    io,
    mem::{offset_of, size_of},
    os::fd::{FromRawFd as _, OwnedFd},
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use proxy_common::{ByteCounts, MAX_SERVERS, ServerEntry, maps as names};

use super::{Bpf, MapError, MapsError, map_error};

pub struct StatusMaps {
    entries: std::sync::Mutex<HashMap<MapData, u32, ServerEntry>>,
    server_bytes: ByteCounters,
    frontend_bytes: ByteCounters,
}

/// A per-CPU array of [`ByteCounts`] by slot.
struct ByteCounters(std::sync::Mutex<PerCpuArray<MapData, ByteCounts>>);

impl Bpf {
    /// Creates and pins the `servers` map; pins the byte counters.
    pub fn status_maps(&mut self) -> Result<StatusMaps, MapsError> {
        let entries = create_servers_map().map_err(|e| MapsError::Map {
            name: names::SERVERS,
            source: MapError::IoError(e),
        })?;
        let entries = self.pin(Map::HashMap(entries), names::SERVERS_PIN)?;
        let server_bytes = self.take_pinned(names::SERVER_BYTES, names::SERVER_BYTES_PIN)?;
        let frontend_bytes = self.take_pinned(names::FRONTEND_BYTES, names::FRONTEND_BYTES_PIN)?;
        let counters = |map: Map, name| -> Result<ByteCounters, MapsError> {
            let array = map.try_into().map_err(map_error(name))?;
            Ok(ByteCounters(std::sync::Mutex::new(array)))
        };
        Ok(StatusMaps {
            entries: std::sync::Mutex::new(entries.try_into().map_err(map_error(names::SERVERS))?),
            server_bytes: counters(server_bytes, names::SERVER_BYTES)?,
            frontend_bytes: counters(frontend_bytes, names::FRONTEND_BYTES)?,
        })
    }
}

impl StatusMaps {
    /// Adds or replaces the entry of `slot`.
    pub fn publish(&self, slot: u32, entry: &ServerEntry) -> Result<(), MapError> {
        super::lock(&self.entries).insert(slot, entry, 0)
    }

    /// Removes `slot` (a removed server's), and zeroes its byte counters so that a new
    /// server there starts at zero.
    pub fn clear_server(&self, slot: u32) -> Result<(), MapError> {
        match super::lock(&self.entries).remove(&slot) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
        self.server_bytes.zero(slot)
    }

    /// Zeroes a removed frontend's byte counters, so that a new frontend in `slot`
    /// starts at zero.
    pub fn clear_frontend(&self, slot: u32) -> Result<(), MapError> {
        self.frontend_bytes.zero(slot)
    }

    /// Bytes the programs moved for the server in `slot`, all CPUs together.
    pub fn server_bytes(&self, slot: u32) -> Result<ByteCounts, MapError> {
        self.server_bytes.sum(slot)
    }

    /// Bytes the programs moved for the frontend in `slot`, all CPUs together.
    pub fn frontend_bytes(&self, slot: u32) -> Result<ByteCounts, MapError> {
        self.frontend_bytes.sum(slot)
    }
}

impl ByteCounters {
    fn zero(&self, slot: u32) -> Result<(), MapError> {
        let mut bytes = super::lock(&self.0);
        let cpus = bytes.get(&slot, 0)?.len();
        let zeros = aya::maps::PerCpuValues::try_from(vec![ByteCounts::default(); cpus])?;
        bytes.set(slot, zeros, 0)
    }

    fn sum(&self, slot: u32) -> Result<ByteCounts, MapError> {
        let per_cpu = super::lock(&self.0).get(&slot, 0)?;
        Ok(per_cpu
            .iter()
            .fold(ByteCounts::default(), |acc, b| ByteCounts {
                bytes_in: acc.bytes_in + b.bytes_in,
                bytes_out: acc.bytes_out + b.bytes_out,
            }))
    }
}

/// The hash map `slot -> ServerEntry`, described by [`server_btf`].
fn create_servers_map() -> io::Result<MapData> {
    let btf = server_btf();
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(btf.blob.as_ptr() as u64).to_ne_bytes());
    attr[8..16].copy_from_slice(&(log.as_mut_ptr() as u64).to_ne_bytes());
    attr[16..20].copy_from_slice(&(btf.blob.len() as u32).to_ne_bytes());
    attr[20..24].copy_from_slice(&(log.len() as u32).to_ne_bytes());
    attr[24..28].copy_from_slice(&1u32.to_ne_bytes());
    let btf_fd = bpf(BPF_BTF_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "loading the BTF of the servers map: {e} ({})",
                String::from_utf8_lossy(&log[..end]).trim()
            ),
        )
    })?;

    let mut attr = [0u8; 128];
    let name = names::SERVERS.as_bytes();
    for (at, value) in [
        (0, BPF_MAP_TYPE_HASH),
        (4, size_of::<u32>() as u32),
        (8, size_of::<ServerEntry>() as u32),
        (12, MAX_SERVERS as u32),
        (48, fd_number(&btf_fd)),
        (52, btf.key_type),
        (56, btf.value_type),
    ] {
        attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
    }
    attr[28..28 + name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
    let map = bpf(BPF_MAP_CREATE, &mut attr)?;
    // The map holds its own reference to the BTF.
    drop(btf_fd);
    MapData::from_fd(map).map_err(|e| io::Error::other(e.to_string()))
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_BTF_LOAD: libc::c_long = 18;
const BPF_MAP_TYPE_HASH: u32 = 1;

fn fd_number(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd() as u32
}

/// The bpf(2) call `cmd` with `attr`, for a command that returns a new descriptor.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a zero-padded bpf_attr for `cmd`, as large as the size given;
    // the pointers in it are to buffers that outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            attr.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A BTF blob describing `u32` (the key) and [`ServerEntry`] (the value).
struct ServerBtf {
    blob: Vec<u8>,
    key_type: u32,
    value_type: u32,
}

/// BTF kinds and integer encodings (linux/btf.h).
const BTF_KIND_INT: u32 = 1;
const BTF_KIND_ARRAY: u32 = 3;
const BTF_KIND_STRUCT: u32 = 4;
const BTF_INT_SIGNED: u32 = 1;

fn server_btf() -> ServerBtf {
    let mut types: Vec<u8> = Vec::new();
    let mut strings: Vec<u8> = vec![0];
    let mut next_id = 1u32;
    let mut string = |text: &str| {
        let at = strings.len() as u32;
        strings.extend_from_slice(text.as_bytes());
        strings.push(0);
        at
    };
    let mut add = |words: &[u32]| {
        for word in words {
            types.extend_from_slice(&word.to_ne_bytes());
        }
        next_id += 1;
        next_id - 1
    };
    let int = |name: u32, bytes: u32, encoding: u32| {
        [
            name,
            BTF_KIND_INT << 24,
            bytes,
            (encoding << 24) | (bytes * 8),
        ]
    };
    let char_ = add(&int(string("char"), 1, BTF_INT_SIGNED));
    let u16_ = add(&int(string("u16"), 2, 0));
    let u32_ = add(&int(string("u32"), 4, 0));
    let u64_ = add(&int(string("u64"), 8, 0));
    let mut text = |len: u32| add(&[0, BTF_KIND_ARRAY << 24, 0, char_, u32_, len]);
    let entry = ServerEntry::default();
    let name_text = text(entry.server.len() as u32);
    let address_text = text(entry.address.len() as u32);
    let state_text = text(entry.state.len() as u32);

    let members: [(&str, u32, usize); 13] = [
        ("backend", name_text, offset_of!(ServerEntry, backend)),
        ("server", name_text, offset_of!(ServerEntry, server)),
        ("address", address_text, offset_of!(ServerEntry, address)),
        ("state", state_text, offset_of!(ServerEntry, state)),
        (
            "last_check",
            state_text,
            offset_of!(ServerEntry, last_check),
        ),
        ("backend_id", u32_, offset_of!(ServerEntry, backend_id)),
        ("port", u16_, offset_of!(ServerEntry, port)),
        // `_pad` is left out: bpftool skips the hole.
        (
            "consecutive_ok",
            u32_,
            offset_of!(ServerEntry, consecutive_ok),
        ),
        (
            "consecutive_fail",
            u32_,
            offset_of!(ServerEntry, consecutive_fail),
        ),
        (
            "active_connections",
            u64_,
            offset_of!(ServerEntry, active_connections),
        ),
        (
            "total_connections",
            u64_,
            offset_of!(ServerEntry, total_connections),
        ),
        ("bytes_in", u64_, offset_of!(ServerEntry, bytes_in)),
        ("bytes_out", u64_, offset_of!(ServerEntry, bytes_out)),
    ];
    let mut words = vec![
        string("server"),
        (BTF_KIND_STRUCT << 24) | members.len() as u32,
        size_of::<ServerEntry>() as u32,
    ];
    for (name, type_id, offset) in members {
        words.extend([string(name), type_id, offset as u32 * 8]);
    }
    let value_type = add(&words);

    let mut blob = Vec::new();
    blob.extend_from_slice(&0xeb9fu16.to_ne_bytes());
    blob.extend_from_slice(&[1, 0]); // version, flags
    for word in [
        24,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        blob.extend_from_slice(&word.to_ne_bytes());
    }
    blob.extend_from_slice(&types);
    blob.extend_from_slice(&strings);
    ServerBtf {
        blob,
        key_type: u32_,
        value_type,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_btf_names_the_text_fields_char_and_ends_with_the_entry() {
        let btf = server_btf();
        assert_eq!(&btf.blob[..2], &0xeb9fu16.to_ne_bytes());
        let strings = &btf.blob[btf.blob.len() - strings_len(&btf.blob)..];
        assert!(strings.starts_with(b"\0char\0"), "{strings:?}");
        // The struct's size, the third word of its type, is the entry's.
        let types_end = btf.blob.len() - strings.len();
        let struct_start = types_end - 12 - 13 * 12;
        let size = u32::from_ne_bytes(
            btf.blob[struct_start + 8..struct_start + 12]
                .try_into()
                .unwrap(),
        );
        assert_eq!(size as usize, size_of::<ServerEntry>());
    }

    fn strings_len(blob: &[u8]) -> usize {
        u32::from_ne_bytes(blob[20..24].try_into().unwrap()) as usize
    }
}
