//! XDP early drop as the daemon runs it: blocked sources and SYN floods are dropped in
//! the driver, before a socket exists (the program is proxy-ebpf/src/xdp.rs, its maps
//! are handled in maps/xdp.rs).
//!
//! At start ([`EarlyDrop::start`]), in this order:
//! 1. every interface in `[xdp] interfaces` must exist (else kgate does not start);
//! 2. the maps are pinned; the blocklists a previous kgate left are reused;
//! 3. [`EarlyDrop::apply`] fills them from the config: the frontends' addresses and
//!    ports (the only destinations the program judges), the SYN rate limit, and the
//!    blocklist file; a reload calls it again with the new config;
//! 4. the program is attached: in the driver where it supports XDP, in the generic
//!    path otherwise (`mode = "auto"`), and the log says which.
//!
//! Blocklist entries, and why they last:
//! - Entries come from the blocklist file (origin "file"), from `kgate block add`
//!   (origin "command") or from CrowdSec's ban decisions (origin "crowdsec", with
//!   `[crowdsec]`: crowdsec/mod.rs). Loading the file adds its prefixes and removes the
//!   file entries it no longer lists; the bouncer only ever adds and removes crowdsec
//!   entries; command entries are left alone by both.
//! - Kept across restarts: the two blocklist maps stay pinned when kgate exits, and
//!   the next kgate opens the same maps, so command entries survive a restart or an
//!   upgrade, and `kgate block` works from any shell, even while kgate is stopped.
//!   bpffs lives in memory: after a reboot only the file's entries come back, so a
//!   block meant to last belongs in the file.
//! - Expiry: an entry made with `--expires` holds its end (a `CLOCK_BOOTTIME`
//!   second) and the program ignores it from then on, looking past it for a shorter
//!   prefix that still applies; every [`CLEANUP_INTERVAL`] the daemon removes
//!   expired entries.

mod blocklist_file;
pub mod crowdsec;
mod prefix;

use std::{
    collections::{BTreeSet, HashMap},
    ffi::CStr,
    io,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use proxy_common::xdp::{
    BlockEntry, ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE, XdpConfig, XdpStats,
};
use tracing::{info, warn};

pub use blocklist_file::read as read_blocklist_file;
pub use prefix::Prefix;

use self::crowdsec::{Bouncer, BouncerStatus, sync_crowdsec_entries};
use crate::{
    config::{Config, XdpMode},
    maps::{Attached, Blocklist, Bpf, MapError, OriginCounts, XdpMaps},
};

/// How often the daemon removes expired blocklist entries.
pub const CLEANUP_INTERVAL: Duration = Duration::from_secs(10);

/// The running XDP program's maps, the task that removes expired entries, and the
/// CrowdSec bouncer. The program itself stays attached as long as the [`Bpf`] it was
/// attached from.
pub struct EarlyDrop {
    maps: Arc<XdpMaps>,
    cleanup: tokio::task::JoinHandle<()>,
    /// Running while the configuration has `[crowdsec]`.
    bouncer: Mutex<Option<Bouncer>>,
}

impl EarlyDrop {
    /// Sets up and attaches the XDP program when the config has an `[xdp]` section,
    /// loading the eBPF object into `bpf` if the data plane did not. Must run inside
    /// a tokio runtime.
    pub fn start(config: &Config, bpf: &mut Option<Bpf>) -> anyhow::Result<Option<EarlyDrop>> {
        let Some(settings) = &config.xdp else {
            return Ok(None);
        };
        check_interfaces(&settings.interfaces)?;
        if bpf.is_none() {
            let loaded = Bpf::load(&config.global.bpf_pin_path, None).context(
                "[xdp] is configured, but eBPF cannot load here: run kgate as root (or with \
                 CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON), or remove the [xdp] section",
            )?;
            *bpf = Some(loaded);
        }
        let bpf = bpf.as_mut().expect("loaded just above");
        let maps = bpf.xdp().context(
            "setting up the XDP program failed: kgate needs a kernel with XDP, BTF and \
             bpf_ktime_get_boot_ns (5.8 or later)",
        )?;
        let maps = Arc::new(maps);
        let early_drop = EarlyDrop {
            cleanup: tokio::spawn(remove_expired_entries(maps.clone())),
            maps,
            bouncer: Mutex::new(None),
        };
        early_drop.apply(config)?;
        for interface in &settings.interfaces {
            let attached = bpf
                .attach_xdp(interface, settings.mode)
                .map_err(|e| attach_error(interface, settings.mode, e.into()))?;
            match (attached, settings.mode) {
                (Attached::Generic, XdpMode::Auto) => info!(
                    interface = %interface,
                    mode = %attached,
                    "XDP attached in generic mode: the driver of {interface} has no native XDP"
                ),
                _ => info!(interface = %interface, mode = %attached, "XDP attached"),
            }
        }
        Ok(Some(early_drop))
    }

    /// Makes the maps match `config`: the frontends, the SYN rate limit, the
    /// blocklist file's entries, and the CrowdSec bouncer (started, restarted with new
    /// settings, or stopped with its entries removed). At start, and again on each
    /// reload. Nothing changes when the blocklist file or the bouncer's key cannot be
    /// read, or the file has a bad line.
    pub fn apply(&self, config: &Config) -> anyhow::Result<()> {
        let Some(settings) = &config.xdp else {
            bail!("the configuration has no [xdp] section any more: restart kgate to detach XDP");
        };
        let file = match &settings.blocklist_file {
            Some(path) => read_blocklist_file(path)?,
            None => BTreeSet::new(),
        };
        let crowdsec = match &config.crowdsec {
            Some(settings) => Some((settings, crowdsec::read_key(&settings.api_key)?)),
            None => None,
        };
        let frontends: Vec<_> = config
            .frontends
            .iter()
            .enumerate()
            .flat_map(|(index, frontend)| {
                let index = u32::try_from(index).unwrap_or(u32::MAX);
                frontend.listen.iter().map(move |&address| (address, index))
            })
            .collect();
        self.maps
            .set_frontends(&frontends)
            .context("writing the frontends into the XDP map")?;
        let limit = settings.syn_limit.map_or(XdpConfig::NO_LIMIT, |limit| {
            XdpConfig::syn_limit(limit.rate, limit.burst)
        });
        self.maps
            .set_config(limit)
            .context("writing the SYN rate limit into the XDP map")?;
        let (added, removed) = sync_file_entries(self.maps.blocklist(), &file)
            .context("writing the blocklist file's entries")?;
        if let Some(path) = &settings.blocklist_file {
            info!(
                file = %path.display(),
                prefixes = file.len(),
                added,
                removed,
                "blocklist file loaded"
            );
        } else if removed > 0 {
            info!(
                removed,
                "no blocklist file configured: its earlier entries were removed"
            );
        }
        let mut bouncer = self.bouncer.lock().unwrap_or_else(|p| p.into_inner());
        match crowdsec {
            Some((settings, key)) => {
                if !bouncer
                    .as_ref()
                    .is_some_and(|b| b.runs_with(settings, &key))
                {
                    if bouncer.is_some() {
                        info!("[crowdsec] changed: the bouncer starts again with the new settings");
                    }
                    *bouncer = Some(Bouncer::start(settings, key, self.maps.clone()));
                }
            }
            None => {
                if bouncer.take().is_some() {
                    info!("[crowdsec] removed: the bouncer stopped");
                }
                let synced = sync_crowdsec_entries(self.maps.blocklist(), &HashMap::new())
                    .context("removing the CrowdSec entries of the blocklist")?;
                if synced.removed > 0 {
                    info!(
                        removed = synced.removed,
                        "no [crowdsec] configured: the CrowdSec entries of the blocklist were removed"
                    );
                }
            }
        }
        Ok(())
    }

    /// The CrowdSec bouncer's state, with `[crowdsec]`.
    pub fn crowdsec_status(&self) -> Option<BouncerStatus> {
        self.bouncer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(Bouncer::status)
    }

    /// The program's counters, summed over CPUs.
    pub fn stats(&self) -> Result<XdpStats, MapError> {
        self.maps.stats()
    }

    /// Blocklist entries that apply now, both families, by origin (for the status
    /// document and the metrics).
    pub fn blocklist_by_origin(&self) -> Result<OriginCounts, MapError> {
        let entries = self.maps.blocklist().entries()?;
        Ok(OriginCounts::of(
            entries.iter().map(|(_, e)| e),
            boot_seconds(),
        ))
    }

    /// One log line with the counters, at shutdown.
    pub fn log_totals(&self) {
        match self.stats() {
            Ok(s) => info!(
                passed = s.passed,
                dropped_blocklist = s.dropped_blocklist,
                dropped_syn_rate = s.dropped_syn_rate,
                malformed = s.malformed,
                dropped_file = s.dropped_by(ORIGIN_FILE),
                dropped_command = s.dropped_by(ORIGIN_COMMAND),
                dropped_crowdsec = s.dropped_by(ORIGIN_CROWDSEC),
                "XDP totals"
            ),
            Err(e) => warn!("could not read the XDP counters: {e}"),
        }
    }
}

impl Drop for EarlyDrop {
    fn drop(&mut self) {
        self.cleanup.abort();
        // The bouncer's task stops with it.
        self.bouncer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
    }
}

/// Makes the file entries of `blocklist` exactly `file`: adds what is new, removes
/// file entries no longer listed. Command entries stay; a permanent one is not
/// turned into a file entry, one with an expiry is (the file makes it permanent).
/// Returns (added, removed).
pub fn sync_file_entries(
    blocklist: &Blocklist,
    file: &BTreeSet<Prefix>,
) -> Result<(usize, usize), MapError> {
    let current: HashMap<Prefix, BlockEntry> = blocklist.entries()?.into_iter().collect();
    let mut removed = 0;
    for (prefix, entry) in &current {
        if entry.origin == ORIGIN_FILE && !file.contains(prefix) && blocklist.remove(prefix)? {
            removed += 1;
        }
    }
    let mut added = 0;
    for prefix in file {
        let keep = current.get(prefix).is_some_and(|entry| {
            entry.origin == ORIGIN_FILE || (entry.origin == ORIGIN_COMMAND && entry.expires_at == 0)
        });
        if !keep {
            blocklist.insert(prefix, BlockEntry::new(prefix.len(), 0, ORIGIN_FILE))?;
            added += 1;
        }
    }
    Ok((added, removed))
}

async fn remove_expired_entries(maps: Arc<XdpMaps>) {
    let mut tick = tokio::time::interval(CLEANUP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let maps = maps.clone();
        // A long list takes many syscalls: off the async workers.
        let result =
            tokio::task::spawn_blocking(move || maps.blocklist().remove_expired(boot_seconds()))
                .await;
        match result {
            Ok(Ok(0)) => {}
            Ok(Ok(removed)) => info!(removed, "expired blocklist entries removed"),
            Ok(Err(e)) => warn!("removing expired blocklist entries failed: {e}"),
            Err(e) => warn!("removing expired blocklist entries failed: {e}"),
        }
    }
}

/// `CLOCK_BOOTTIME`, the clock of blocklist expiry (`bpf_ktime_get_boot_ns` in the
/// program): it keeps counting while the machine is suspended.
pub fn boot_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; CLOCK_BOOTTIME always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME) failed");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

pub fn boot_seconds() -> u64 {
    boot_time().as_secs()
}

/// [`BlockEntry::expires_at`] for an entry that lasts `duration` from now.
pub fn expires_after(duration: Duration) -> u32 {
    let end = boot_time() + duration;
    let seconds = end.as_secs() + u64::from(end.subsec_nanos() > 0);
    u32::try_from(seconds).unwrap_or(u32::MAX)
}

/// Every name in `[xdp] interfaces` must exist in kgate's network namespace.
fn check_interfaces(names: &[String]) -> anyhow::Result<()> {
    let present = interface_names();
    for name in names {
        if !present.contains(name) {
            bail!(
                "[xdp] interfaces: there is no interface `{name}` here (this network namespace \
                 has {}): correct the name in the config, or create the interface first",
                present.join(", ")
            );
        }
    }
    Ok(())
}

/// The interfaces of this thread's network namespace (if_nameindex(3)).
fn interface_names() -> Vec<String> {
    let mut names = Vec::new();
    // SAFETY: if_nameindex returns an array ended by a zero entry (or null on error),
    // which is read up to that entry and then freed once.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return names;
        }
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names
}

/// What to do when attaching to `interface` failed, from the kernel's error.
fn attach_error(interface: &str, mode: XdpMode, error: anyhow::Error) -> anyhow::Error {
    let errno = error
        .chain()
        .find_map(|cause| cause.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error);
    let hint = match errno {
        Some(libc::EOPNOTSUPP) if mode == XdpMode::Native => format!(
            "the driver of {interface} has no native XDP: set mode = \"auto\" (or \"generic\") in [xdp]"
        ),
        Some(libc::EBUSY | libc::EEXIST) => format!(
            "another XDP program is attached to {interface}: remove it (`ip link set dev \
             {interface} xdp off`) or leave {interface} out of [xdp] interfaces"
        ),
        _ => {
            "kgate needs root (or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON) to attach XDP".to_owned()
        }
    };
    error.context(format!("attaching XDP to {interface} failed: {hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_rounds_up_to_the_next_second() {
        let now = boot_seconds();
        let at = u64::from(expires_after(Duration::from_millis(1500)));
        assert!(at >= now + 2 && at <= now + 3, "{at} vs {now}");
    }

    #[test]
    fn loopback_is_an_interface_and_a_typo_is_not() {
        assert!(interface_names().contains(&"lo".to_owned()));
        check_interfaces(&["lo".to_owned()]).unwrap();
        let message = check_interfaces(&["eht0".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("[xdp] interfaces: there is no interface `eht0` here"),
            "{message}"
        );
        assert!(message.contains("lo"), "{message}");
    }
}
