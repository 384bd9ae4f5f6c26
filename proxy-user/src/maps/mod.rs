//! The eBPF side of kgate as seen from userspace: loads the object built into the
//! binary, loads its programs, pins the maps under `bpf_pin_path`, and gives typed
//! handles to the rest of the daemon. The only module that imports aya.
//!
//! [`Bpf`] owns the object (its programs and their attachments) and the pins; each
//! feature takes its maps from it: [`Bpf::splice`] for the data plane,
//! [`Bpf::status_maps`] for what `kgate status` shows, [`Bpf::xdp`] for early drop.

mod handover;
mod packet;
mod servers;
mod splice;
mod tcp_layout;
mod xdp;

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Mutex,
};

pub use aya::maps::MapError;
use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{ProgramError, SkSkb},
};
use proxy_common::{maps as names, programs};
use tracing::{info, warn};

pub use packet::{PacketEvents, PacketMaps};
pub use servers::StatusMaps;
pub use splice::{GrantRequests, SpliceMaps};
pub use xdp::{Attached, Blocklist, OriginCounts, XdpMaps};

/// The eBPF object, built by build.rs from proxy-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted on a systemd machine; kgate mounts it there when missing.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// Every map kgate pins, by pin name: a previous run's leftovers are removed at start.
const PINS: &[&str] = &[
    names::PEERS_PIN,
    names::SPLICED_PIN,
    names::FLOWS_PIN,
    names::GRANTS_PIN,
    names::SPLICE_STATS_PIN,
    names::SERVERS_PIN,
    names::SERVER_BYTES_PIN,
    names::FRONTEND_BYTES_PIN,
    proxy_common::packet::maps::RULES_PIN,
    proxy_common::packet::maps::PROGRESS_PIN,
    proxy_common::packet::maps::STATS_PIN,
    // Not the blocklists: those are kept (maps/xdp.rs).
    proxy_common::xdp::maps::FRONTENDS_PIN,
    proxy_common::xdp::maps::CONFIG_PIN,
    proxy_common::xdp::maps::SYN_RATE_PIN,
    proxy_common::xdp::maps::STATS_PIN,
];

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF program `{name}` failed to load or attach")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error(
        "the eBPF object has no map or program `{0}`: the binary was built from mismatched sources"
    )]
    Missing(&'static str),
    #[error("map `{name}`")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("polling map `{name}`")]
    Poll {
        name: &'static str,
        source: io::Error,
    },
    #[error("pinning maps under {path}")]
    Pin { path: PathBuf, source: io::Error },
    #[error(
        "another kgate runs with bpf_pin_path {}: stop it first, or give this one a \
         bpf_pin_path of its own",
        path.display()
    )]
    PinDirInUse { path: PathBuf },
}

/// The loaded eBPF object and the maps it pinned; unpins them on drop.
pub struct Bpf {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// The pin directory, locked for as long as this kgate runs (see [`claim_pin_dir`]);
    /// `None` once handed over to the kgate that took over (handover.rs).
    pin_dir_lock: Option<fs::File>,
    /// While taking over from a running kgate: where this one pins its maps until
    /// [`Bpf::commit_pins`] moves them over the old one's (handover.rs).
    staging: Option<PathBuf>,
    /// Each pin by its final path (under `pin_dir`).
    pins: Vec<PathBuf>,
    /// Why the XDP program did not load, reported by [`Bpf::xdp`] only: a kernel
    /// that rejects it can still run the splice.
    xdp_load_error: Option<MapsError>,
    /// Why the packet data plane's programs did not load, reported by [`Bpf::packet`].
    packet_load_error: Option<MapsError>,
    /// Whether the splice program can learn where a socket's stream stands when it
    /// joins (see tcp_layout.rs): only then may a connection join mid-stream.
    joins_mid_stream: bool,
    /// The XDP attachments, by interface (xdp.rs).
    xdp_links: Vec<(String, aya::programs::xdp::XdpLinkId)>,
    /// XDP attachments pinned for the kgate an upgrade starts (handover.rs).
    offered_links: Vec<(String, aya::programs::links::PinnedLink)>,
}

impl Bpf {
    /// Loads the object and its programs (nothing attached yet) and prepares `pin_dir`.
    /// Must run inside a tokio runtime: the programs' log records are forwarded by a task.
    ///
    /// `handed_lock` is the running kgate's lock on the pin directory, passed on at an
    /// upgrade: this one then takes the pins over from it (handover.rs) instead of
    /// stopping because the directory is in use.
    pub fn load(pin_dir: &Path, handed_lock: Option<fs::File>) -> Result<Bpf, MapsError> {
        let (pin_dir_lock, staging) = match handed_lock {
            Some(lock) => handover::take_lock(pin_dir, lock)?,
            None => (claim_pin_dir(pin_dir)?, None),
        };
        let mut loader = EbpfLoader::new();
        xdp::reuse_kept_pins(&mut loader, pin_dir);
        let copied_seq_offset = tcp_layout::copied_seq_offset().unwrap_or_else(|e| {
            warn!("connections are spliced from their first byte: {e}");
            0
        });
        loader.override_global(programs::COPIED_SEQ_OFFSET, &copied_seq_offset, true);
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        forward_ebpf_logs(&mut ebpf);
        // Every program loads before any map is taken out of `ebpf` (the other order
        // fails with EBADF for BTF maps in aya 0.14).
        let splice: &mut SkSkb = program(&mut ebpf, programs::SPLICE)?;
        splice.load().map_err(program_error(programs::SPLICE))?;
        let xdp_load_error = xdp::load_program(&mut ebpf).err();
        let packet_load_error = packet::load_programs(&mut ebpf).err();
        if staging.is_none() {
            remove_stale_pins(pin_dir)?;
        }
        Ok(Bpf {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            pin_dir_lock: Some(pin_dir_lock),
            staging,
            pins: Vec::new(),
            xdp_load_error,
            packet_load_error,
            joins_mid_stream: copied_seq_offset != 0,
            xdp_links: Vec::new(),
            offered_links: Vec::new(),
        })
    }

    /// Takes map `name` out of the object and pins it as `pin_dir/pin`.
    fn take_pinned(&mut self, name: &'static str, pin: &str) -> Result<Map, MapsError> {
        let map = self.ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
        self.pin(map, pin)
    }

    /// Pins `map` as `pin` in the pin directory, removed with the others at exit.
    fn pin(&mut self, map: Map, pin: &str) -> Result<Map, MapsError> {
        let path = self.staging.as_ref().unwrap_or(&self.pin_dir).join(pin);
        map.pin(&path).map_err(|e| MapsError::Pin {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        self.pins.push(self.pin_dir.join(pin));
        Ok(map)
    }

    /// Leaves the pins in place when this object drops (`keep_pins`); the next start
    /// replaces them.
    pub fn keep_pins(&mut self) {
        self.pins.clear();
    }

    /// Removes the pins, so nothing outlives this process. Idempotent.
    pub fn unpin(&self) {
        if let Some(staging) = &self.staging {
            // Never committed: the pins under `pin_dir` are the running kgate's.
            let _ = fs::remove_dir_all(staging);
            return;
        }
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

impl Drop for Bpf {
    fn drop(&mut self) {
        self.unpin();
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, MapsError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(MapsError::Missing(name))?
        .try_into()
        .map_err(program_error(name))
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> MapsError {
    move |source| MapsError::Program { name, source }
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> MapsError {
    move |source| MapsError::Map { name, source }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a map handle half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Makes `pin_dir` on a bpf filesystem (mounting bpffs at /sys/fs/bpf where nothing
/// did) and locks it (flock) for as long as the returned file is open: a second
/// kgate with the same `bpf_pin_path` then stops here, before it has touched a pin of
/// the one that runs. The kernel drops the lock when its holder exits, however.
fn claim_pin_dir(pin_dir: &Path) -> Result<fs::File, MapsError> {
    let pin_error = |source| MapsError::Pin {
        path: pin_dir.to_owned(),
        source,
    };
    if pin_dir.starts_with(BPF_FS_ROOT) && !is_bpf_fs(Path::new(BPF_FS_ROOT)) {
        mount_bpf_fs(Path::new(BPF_FS_ROOT)).map_err(pin_error)?;
        info!("mounted a bpf filesystem on {BPF_FS_ROOT}");
    }
    fs::create_dir_all(pin_dir).map_err(pin_error)?;
    // The maps say who connects where: root's business only.
    fs::set_permissions(pin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(pin_error)?;
    if !is_bpf_fs(pin_dir) {
        return Err(pin_error(io::Error::other(format!(
            "{} is not on a bpf filesystem: mount one with `mount -t bpf bpf DIR` or set \
             bpf_pin_path under {BPF_FS_ROOT}",
            pin_dir.display()
        ))));
    }
    let dir = fs::File::open(pin_dir).map_err(pin_error)?;
    match dir.try_lock() {
        Ok(()) => Ok(dir),
        Err(fs::TryLockError::WouldBlock) => Err(MapsError::PinDirInUse {
            path: pin_dir.to_owned(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(pin_error(e)),
    }
}

/// Removes pins a previous kgate left behind (it was killed, or kept them).
fn remove_stale_pins(pin_dir: &Path) -> Result<(), MapsError> {
    let pin_error = |source| MapsError::Pin {
        path: pin_dir.to_owned(),
        source,
    };
    for pin in PINS {
        let path = pin_dir.join(pin);
        if path.exists() {
            warn!(pin = %path.display(), "removing a map pinned by an earlier kgate that did not exit cleanly");
            fs::remove_file(&path).map_err(pin_error)?;
        }
    }
    handover::remove_stale_staging(pin_dir);
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
