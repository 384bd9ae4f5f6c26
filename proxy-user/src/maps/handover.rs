//! The pins at an upgrade (the lifecycle is in crate::handover): the new kgate takes
//! the pin directory over from the running one without ever leaving it half-pinned.
//!
//! - The lock: the old kgate passes its locked pin directory (the open file that holds
//!   the `flock`) to the new one. A lock belongs to the open file, so both hold the
//!   same lock; any other kgate still finds the directory in use.
//! - The pins: the new kgate pins its own maps in a staging directory inside the pin
//!   directory, and [`Bpf::commit_pins`] renames each over the old one's once it is
//!   ready to serve: `bpftool` and `kgate status` see the old maps, then the new ones,
//!   never none. A rename only moves a name: the old kgate's maps (its sock hashes
//!   keyed by socket cookie, with its open connections in them) live on through its
//!   own file descriptors until it exits.
//! - The old kgate then forgets its pins ([`Bpf::hand_over_pins`]): it must not
//!   remove at exit what are now the new one's names.
//! - XDP: an interface takes one XDP link, so the new kgate cannot attach beside the
//!   old one. The old kgate pins each of its links ([`Bpf::offer_xdp_links`]); the new
//!   one opens the pin, removes it, and moves the link to its own program in one step
//!   (`bpf_link_update`): no packet meets an interface without the program. Should the
//!   upgrade fail, the old kgate moves the links back ([`Bpf::withdraw_xdp_links`]).

use std::{
    fs, io,
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    Xdp,
    links::{FdLink, LinkError, PinnedLink},
    xdp::XdpLink,
};
use tracing::{info, warn};

use super::{Bpf, MapsError, PINS, program, program_error};

/// Pins of XDP links offered to the next kgate: `<pin_dir>/xdp_link_<interface>`.
const XDP_LINK_PREFIX: &str = "xdp_link_";

/// Staging directories are `<pin_dir>/takeover-<pid>` (bpffs refuses names with a dot).
const STAGING_PREFIX: &str = "takeover-";

/// Takes over `lock`, the running kgate's lock on `pin_dir`; returns it and the
/// staging directory to pin in until the takeover commits.
pub(super) fn take_lock(
    pin_dir: &Path,
    lock: fs::File,
) -> Result<(fs::File, Option<PathBuf>), MapsError> {
    let pin_error = |source| MapsError::Pin {
        path: pin_dir.to_owned(),
        source,
    };
    let handed = lock.metadata().map_err(pin_error)?;
    let here = fs::metadata(pin_dir).map_err(pin_error)?;
    if (handed.dev(), handed.ino()) != (here.dev(), here.ino()) {
        // bpf_pin_path changed in the file since the old kgate started: its pins stay
        // its own, and this one claims the new directory as any start does.
        info!(
            pin_dir = %pin_dir.display(),
            "bpf_pin_path changed: the maps are pinned afresh, the old kgate keeps its own"
        );
        return Ok((super::claim_pin_dir(pin_dir)?, None));
    }
    // The same open file as the old kgate's: the lock is already ours, so this
    // succeeds, where any other open of the directory would find it in use.
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(MapsError::PinDirInUse {
                path: pin_dir.to_owned(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(pin_error(e)),
    }
    let staging = pin_dir.join(format!("{STAGING_PREFIX}{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir(&staging).map_err(|source| MapsError::Pin {
        path: staging.clone(),
        source,
    })?;
    Ok((lock, Some(staging)))
}

/// Removes what a kgate killed in the middle of an upgrade left: staging directories,
/// and XDP links offered and never taken (removing the pin detaches a dead kgate's
/// program). Only called while holding the lock as the only kgate of `pin_dir`.
pub(super) fn remove_stale_staging(pin_dir: &Path) {
    remove_leftovers(pin_dir);
}

/// Removes staging directories and offered XDP links under `pin_dir`.
fn remove_leftovers(pin_dir: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if name.starts_with(STAGING_PREFIX) {
            warn!(dir = %path.display(), "removing what an interrupted upgrade left");
            let _ = fs::remove_dir_all(&path);
        } else if name.starts_with(XDP_LINK_PREFIX) {
            info!(pin = %path.display(), "removing an XDP attachment no kgate took over");
            let _ = fs::remove_file(&path);
        }
    }
}

fn link_error(path: &Path) -> impl Fn(LinkError) -> MapsError + '_ {
    move |e| MapsError::Pin {
        path: path.to_owned(),
        source: io::Error::other(e),
    }
}

impl Bpf {
    /// The open file holding the lock on the pin directory, to pass on at an upgrade;
    /// `None` once passed on.
    pub fn pin_dir_lock(&self) -> Option<BorrowedFd<'_>> {
        self.pin_dir_lock.as_ref().map(|lock| lock.as_fd())
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether this kgate is taking the pins over from a running one (not committed).
    pub fn taking_over(&self) -> bool {
        self.staging.is_some()
    }

    /// Ends a takeover: moves each staged pin over the old kgate's, and removes the
    /// old kgate's pins that this one does not have. Does nothing outside a takeover.
    pub fn commit_pins(&mut self) -> Result<(), MapsError> {
        let Some(staging) = self.staging.take() else {
            return Ok(());
        };
        for pin in &self.pins {
            let name = pin.file_name().expect("a pin path ends with its name");
            fs::rename(staging.join(name), pin).map_err(|source| MapsError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        for name in PINS {
            let path = self.pin_dir.join(name);
            if !self.pins.contains(&path) {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        info!(pin = %path.display(), "removed the old kgate's pin, which this one does not use")
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        warn!(pin = %path.display(), "could not remove the old kgate's pin: {e}")
                    }
                }
            }
        }
        let _ = fs::remove_dir(&staging);
        // XDP links the old kgate offered for interfaces this one does not attach to.
        remove_leftovers(&self.pin_dir);
        info!(pin_dir = %self.pin_dir.display(), "took over the pinned maps");
        Ok(())
    }

    /// Before an upgrade: pins each XDP attachment for the new kgate to take over.
    pub fn offer_xdp_links(&mut self) -> Result<(), MapsError> {
        if self.xdp_links.is_empty() {
            return Ok(());
        }
        let xdp: &mut Xdp = program(&mut self.ebpf, proxy_common::xdp::PROGRAM)?;
        for (interface, id) in std::mem::take(&mut self.xdp_links) {
            let path = self.pin_dir.join(format!("{XDP_LINK_PREFIX}{interface}"));
            let link = xdp
                .take_link(id)
                .map_err(program_error(proxy_common::xdp::PROGRAM))?;
            let pinned = FdLink::try_from(link)
                .map_err(link_error(&path))?
                .pin(&path)
                .map_err(|e| MapsError::Pin {
                    path: path.clone(),
                    source: io::Error::other(e),
                })?;
            self.offered_links.push((interface, pinned));
        }
        Ok(())
    }

    /// The upgrade failed: moves the offered XDP attachments back to this kgate's
    /// program (the new one may have taken them before it failed).
    pub fn withdraw_xdp_links(&mut self) {
        if self.offered_links.is_empty() {
            return;
        }
        let xdp: &mut Xdp = match program(&mut self.ebpf, proxy_common::xdp::PROGRAM) {
            Ok(xdp) => xdp,
            Err(e) => return warn!("cannot take the XDP attachments back: {e}"),
        };
        for (interface, pinned) in std::mem::take(&mut self.offered_links) {
            let path = self.pin_dir.join(format!("{XDP_LINK_PREFIX}{interface}"));
            let _ = fs::remove_file(&path);
            let back = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| e.to_string())
                .and_then(|link| xdp.attach_to_link(link).map_err(|e| e.to_string()));
            match back {
                Ok(id) => self.xdp_links.push((interface, id)),
                Err(e) => warn!(%interface, "cannot take the XDP attachment back: {e}"),
            }
        }
    }

    /// At start: moves the XDP attachment of `interface` that the old kgate offered
    /// to this one's program. False when none was offered.
    pub(super) fn take_over_xdp_link(&mut self, interface: &str) -> Result<bool, MapsError> {
        let path = self.pin_dir.join(format!("{XDP_LINK_PREFIX}{interface}"));
        if !path.exists() {
            return Ok(false);
        }
        let link = FdLink::from(PinnedLink::from_pin(&path).map_err(link_error(&path))?);
        // Unpinned before the update: if this kgate dies, closing its fd detaches
        // nothing the old one still holds.
        let _ = fs::remove_file(&path);
        let link = XdpLink::try_from(link).map_err(link_error(&path))?;
        let xdp: &mut Xdp = program(&mut self.ebpf, proxy_common::xdp::PROGRAM)?;
        let id = xdp
            .attach_to_link(link)
            .map_err(program_error(proxy_common::xdp::PROGRAM))?;
        self.xdp_links.push((interface.to_owned(), id));
        Ok(true)
    }

    /// The new kgate has taken over. When it took the pins (the same `bpf_pin_path`),
    /// its maps are pinned where this one's were: this one removes no pin at exit, and
    /// lets go of its hold on the lock, which the new one holds too. This one's maps
    /// live on for its open connections until it exits.
    pub fn hand_over_pins(&mut self, pins_taken: bool) {
        if pins_taken {
            self.pins.clear();
            self.pin_dir_lock = None;
        }
    }
}
