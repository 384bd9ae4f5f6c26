//! Dropping the capabilities kgate needs only to start.
//!
//! Loading and attaching eBPF programs, creating maps, mounting bpffs and pinning
//! need CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and more. Once running, kgate still
//! binds listeners on reload (CAP_NET_BIND_SERVICE for ports below 1024) and updates
//! its maps (CAP_BPF, CAP_NET_ADMIN, for kernels that restrict BPF to them); and at an
//! upgrade the new binary it starts inherits no more than these, yet loads its
//! programs: without CAP_PERFMON the verifier also walks every speculative path,
//! which takes the splice program past its complexity limit (E2BIG, measured here on
//! 6.18), so CAP_PERFMON is kept too; and CAP_NET_RAW, with which the packet data
//! plane's raw sockets reset forwarded connections (the new binary of an upgrade opens
//! its own). Nothing else. Capabilities belong to each thread, so every runtime thread drops its own
//! as soon as it runs after [`drop_now`]: [`on_thread_activity`] is the runtime's
//! thread hook. (An idle blocking-pool thread keeps its set until it next runs or
//! exits after tokio's keep-alive of 10 s.)

use std::{
    cell::Cell,
    sync::atomic::{AtomicBool, Ordering},
};

use caps::{CapSet, Capability, CapsHashSet};
use tracing::{info, warn};

/// What kgate keeps after start-up.
const KEPT: [Capability; 5] = [
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
];

static DROP: AtomicBool = AtomicBool::new(false);

thread_local! {
    static DROPPED: Cell<bool> = const { Cell::new(false) };
}

/// From now on, every thread keeps only [`KEPT`]; the calling thread at once.
pub fn drop_now() {
    DROP.store(true, Ordering::SeqCst);
    match drop_in_this_thread() {
        Ok(()) => info!(
            "capabilities dropped: kept {}",
            KEPT.map(|c| c.to_string()).join(", ")
        ),
        Err(e) => warn!("could not drop capabilities: {e}"),
    }
}

/// The runtime's thread start/unpark hook.
pub fn on_thread_activity() {
    if DROP.load(Ordering::Relaxed) && !DROPPED.get() {
        let _ = drop_in_this_thread();
    }
}

fn drop_in_this_thread() -> Result<(), caps::errors::CapsError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    let kept: CapsHashSet = KEPT.into_iter().filter(|c| permitted.contains(c)).collect();
    // Shrinking the bounding set takes CAP_SETPCAP, which a systemd unit may not
    // grant (it bounds the set itself); the effective and permitted sets are what
    // matter to a running process.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !kept.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    DROPPED.set(true);
    Ok(())
}
