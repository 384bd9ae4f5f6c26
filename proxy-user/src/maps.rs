//! The eBPF side of kgate as seen from userspace: loads the object built into the
//! binary, attaches the splice program, pins the maps under `bpf_pin_path`, and gives
//! typed handles to the rest of the daemon. The only module that imports aya.

use std::{
    fs, io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

pub use aya::maps::MapError;
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_common::{FlowCounters, FlowGrant, SpliceStats, maps as names, programs};
use tracing::{info, warn};

/// The eBPF object, built by build.rs from proxy-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted on a systemd machine; kgate mounts it there when missing.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF program `{name}` failed to load or attach")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("the eBPF object has no map `{0}`: the binary was built from mismatched sources")]
    MissingMap(&'static str),
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("pinning maps under {path}")]
    Pin { path: PathBuf, source: io::Error },
}

/// The two sock hashes of the splice, the per-socket flow state and the counters,
/// pinned while kgate runs.
pub struct SpliceMaps {
    peers: Mutex<SockHash<MapData, u64>>,
    spliced: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, FlowCounters>>,
    grants: Mutex<HashMap<MapData, u64, FlowGrant>>,
    stats: PerCpuArray<MapData, SpliceStats>,
    pins: Vec<PathBuf>,
    pin_dir: PathBuf,
    // Owns the program and its attachment to `spliced`.
    _ebpf: Ebpf,
}

impl SpliceMaps {
    /// Loads and attaches the splice program and pins its maps under `pin_dir`.
    /// Must run inside a tokio runtime: the program's log records are forwarded by a task.
    pub fn load(pin_dir: &Path) -> Result<SpliceMaps, MapsError> {
        let mut ebpf = EbpfLoader::new().load(EBPF_OBJECT)?;
        forward_ebpf_logs(&mut ebpf);

        let program_error = |source| MapsError::Program {
            name: programs::SPLICE,
            source,
        };
        let program: &mut SkSkb = ebpf
            .program_mut(programs::SPLICE)
            .ok_or(MapsError::MissingMap(programs::SPLICE))?
            .try_into()
            .map_err(program_error)?;
        // Programs load before maps are taken out of `ebpf` (the other order fails
        // with EBADF for BTF maps in aya 0.14).
        program.load().map_err(program_error)?;

        prepare_pin_dir(pin_dir)?;
        let mut pins = Vec::new();
        let mut take = |name: &'static str, pin: &str| -> Result<Map, MapsError> {
            let map = ebpf.take_map(name).ok_or(MapsError::MissingMap(name))?;
            let path = pin_dir.join(pin);
            map.pin(&path).map_err(|e| MapsError::Pin {
                path: path.clone(),
                source: io::Error::other(e),
            })?;
            pins.push(path);
            Ok(map)
        };
        let peers = take(names::PEERS, names::PEERS_PIN)?;
        let spliced = take(names::SPLICED, names::SPLICED_PIN)?;
        let flows = take(names::FLOWS, names::FLOWS_PIN)?;
        let grants = take(names::GRANTS, names::GRANTS_PIN)?;
        let stats = take(names::SPLICE_STATS, names::SPLICE_STATS_PIN)?;

        let map_error = |name| move |source| MapsError::Map { name, source };
        let peers: SockHash<MapData, u64> = peers.try_into().map_err(map_error(names::PEERS))?;
        let spliced: SockHash<MapData, u64> =
            spliced.try_into().map_err(map_error(names::SPLICED))?;
        let flows = flows.try_into().map_err(map_error(names::FLOWS))?;
        let grants = grants.try_into().map_err(map_error(names::GRANTS))?;
        let stats = stats.try_into().map_err(map_error(names::SPLICE_STATS))?;

        let program: &mut SkSkb = ebpf
            .program_mut(programs::SPLICE)
            .ok_or(MapsError::MissingMap(programs::SPLICE))?
            .try_into()
            .map_err(program_error)?;
        program.attach(spliced.fd()).map_err(program_error)?;

        info!(pin_dir = %pin_dir.display(), "eBPF splice program attached, maps pinned");
        Ok(SpliceMaps {
            peers: Mutex::new(peers),
            spliced: Mutex::new(spliced),
            flows: Mutex::new(flows),
            grants: Mutex::new(grants),
            stats,
            pins,
            pin_dir: pin_dir.to_owned(),
            _ebpf: ebpf,
        })
    }

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

    /// Removes the pins, so nothing outlives this process. Idempotent.
    pub fn unpin(&self) {
        for pin in &self.pins {
            match fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(pin = %pin.display(), "could not remove pinned map: {e}"),
            }
        }
        // Only empty: the directory may be shared with other kgate objects.
        let _ = fs::remove_dir(&self.pin_dir);
    }
}

impl Drop for SpliceMaps {
    fn drop(&mut self) {
        self.unpin();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map handle half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes `pin_dir` on a bpf filesystem (mounting bpffs at /sys/fs/bpf where nothing
/// did) and removes pins a previous kgate left behind.
fn prepare_pin_dir(pin_dir: &Path) -> Result<(), MapsError> {
    let pin_error = |source| MapsError::Pin {
        path: pin_dir.to_owned(),
        source,
    };
    if pin_dir.starts_with(BPF_FS_ROOT) && !is_bpf_fs(Path::new(BPF_FS_ROOT)) {
        mount_bpf_fs(Path::new(BPF_FS_ROOT)).map_err(pin_error)?;
        info!("mounted a bpf filesystem on {BPF_FS_ROOT}");
    }
    fs::create_dir_all(pin_dir).map_err(pin_error)?;
    if !is_bpf_fs(pin_dir) {
        return Err(pin_error(io::Error::other(format!(
            "{} is not on a bpf filesystem: mount one with `mount -t bpf bpf DIR` or set \
             bpf_pin_path under {BPF_FS_ROOT}",
            pin_dir.display()
        ))));
    }
    for pin in [
        names::PEERS_PIN,
        names::SPLICED_PIN,
        names::FLOWS_PIN,
        names::GRANTS_PIN,
        names::SPLICE_STATS_PIN,
    ] {
        let path = pin_dir.join(pin);
        if path.exists() {
            warn!(pin = %path.display(), "removing a map pinned by an earlier kgate that did not exit cleanly");
            fs::remove_file(&path).map_err(pin_error)?;
        }
    }
    Ok(())
}

fn is_bpf_fs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct it is given.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == BPF_FS_MAGIC
}

fn mount_bpf_fs(target: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())?;
    // SAFETY: all arguments are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Forwards the eBPF programs' aya-log records (rare events only) into kgate's log.
fn forward_ebpf_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e}");
            return;
        }
    };
    // SAFETY: the logger owns the ring buffer's fd, open and unchanged until it drops.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut logger = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF log records will not be shown: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
