//! kgate as a CrowdSec bouncer (`[crowdsec]`): the local API's ban decisions become
//! blocklist entries of origin "crowdsec", dropped by the XDP program like the others.
//!
//! How it goes, per [`Bouncer`] (one task):
//! 1. The first pull asks for every active decision (`startup=true`); each later one,
//!    every `interval`, for what changed since (decisions.rs says how they are read).
//! 2. After each pull the blocklist's crowdsec entries are made exactly the bans kgate
//!    holds ([`sync_crowdsec_entries`]): new and longer bans are written with their end,
//!    lifted ones removed. Entries from the file or `kgate block add` are never touched;
//!    a ban on their very prefix waits until they are gone (they block it meanwhile).
//! 3. An entry holds its ban's end, so the XDP program stops applying it on time even
//!    while kgate is stopped; the blocklist's cleanup removes it later.
//! 4. When the LAPI cannot be reached (or refuses the key), the entries stay as they
//!    are, one warning is logged, and pulls are retried after `interval`, then twice as
//!    long each time up to [`MAX_BACKOFF`]. The next pull that works asks for the whole
//!    list again (`startup=true`) and so catches up on everything missed.
//! 5. The blocklist maps outlive kgate (maps/xdp.rs), so a restarted kgate finds its
//!    crowdsec entries in place, and its first pull corrects them: decisions deleted
//!    while it was stopped leave, new ones come.

mod decisions;
mod lapi;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;
use proxy_common::xdp::{BlockEntry, ORIGIN_CROWDSEC};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use lapi::read_key;

use self::{decisions::Bans, lapi::Lapi};
use super::{Prefix, boot_time};
use crate::{
    config::Crowdsec,
    maps::{Blocklist, MapError, XdpMaps},
};

/// The longest wait between pulls while the LAPI cannot be reached.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What `kgate status` and the metrics show about the bouncer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BouncerStatus {
    pub url: String,
    pub interval_seconds: u64,
    pub state: LapiState,
    /// Unix seconds at which `state` began.
    pub since: u64,
    /// Unix seconds of the last pull that worked.
    pub last_pull: Option<u64>,
    /// Why the last pull failed, while unreachable.
    pub error: Option<String>,
    /// Prefixes banned by the decisions kgate holds.
    pub bans: usize,
    pub pulls: u64,
    pub failed_pulls: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LapiState {
    /// No pull has finished yet.
    Starting,
    /// The last pull worked.
    Connected,
    /// The last pull failed: entries stay as they are, pulls are retried.
    Unreachable,
}

/// The running bouncer task; stops when dropped.
pub struct Bouncer {
    settings: Crowdsec,
    key: HeaderValue,
    status: Arc<Mutex<BouncerStatus>>,
    task: JoinHandle<()>,
}

impl Bouncer {
    /// Starts pulling decisions into `maps`' blocklist. Must run inside a tokio runtime.
    pub fn start(settings: &Crowdsec, key: HeaderValue, maps: Arc<XdpMaps>) -> Bouncer {
        let status = Arc::new(Mutex::new(BouncerStatus {
            url: settings.url.to_string(),
            interval_seconds: settings.interval.as_secs(),
            state: LapiState::Starting,
            since: unix_now(),
            last_pull: None,
            error: None,
            bans: 0,
            pulls: 0,
            failed_pulls: 0,
        }));
        info!(
            url = %settings.url,
            interval = %humantime::format_duration(settings.interval),
            "CrowdSec bouncer started: pulling ban decisions from the LAPI"
        );
        let run = Run {
            lapi: Lapi::new(&settings.url, key.clone()),
            interval: settings.interval,
            maps,
            status: status.clone(),
        };
        Bouncer {
            settings: settings.clone(),
            key,
            status,
            task: tokio::spawn(run.pull_forever()),
        }
    }

    /// Whether this bouncer already runs with `settings` and `key` (a reload that
    /// changed neither leaves it alone).
    pub fn runs_with(&self, settings: &Crowdsec, key: &HeaderValue) -> bool {
        self.settings == *settings && self.key == *key
    }

    pub fn status(&self) -> BouncerStatus {
        lock(&self.status).clone()
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Run {
    lapi: Lapi,
    interval: Duration,
    maps: Arc<XdpMaps>,
    status: Arc<Mutex<BouncerStatus>>,
}

impl Run {
    async fn pull_forever(self) {
        let mut bans = Bans::default();
        // Whether `bans` holds the LAPI's whole list: false until a startup pull works,
        // and again after any failure.
        let mut whole = false;
        let mut backoff = self.interval;
        let mut map_failing = false;
        loop {
            let wait = match self.lapi.pull(!whole).await {
                Ok(stream) => {
                    let now = boot_time();
                    let applied = if whole {
                        bans.apply(stream, now)
                    } else {
                        bans.replace(stream, now)
                    };
                    bans.forget_ended(now.as_secs());
                    if applied.unreadable_count > 0 {
                        warn!(
                            skipped = applied.unreadable_count,
                            "CrowdSec decisions kgate cannot apply: {}",
                            applied.unreadable.join("; ")
                        );
                    }
                    let maps = self.maps.clone();
                    // A long list takes many syscalls: off the async workers.
                    let written = tokio::task::spawn_blocking(move || {
                        let synced = sync_crowdsec_entries(maps.blocklist(), bans.ends());
                        (bans, synced)
                    })
                    .await;
                    let synced = match written {
                        Ok((returned, synced)) => {
                            bans = returned;
                            synced
                        }
                        Err(e) => {
                            // The bans went with the task: start again from the whole list.
                            warn!("writing CrowdSec bans to the blocklist failed: {e}");
                            bans = Bans::default();
                            whole = false;
                            tokio::time::sleep(self.interval).await;
                            continue;
                        }
                    };
                    match synced {
                        Ok(changed) => {
                            if map_failing {
                                info!("CrowdSec bans are written to the blocklist again");
                            }
                            map_failing = false;
                            if changed.written + changed.removed > 0 {
                                info!(
                                    bans = bans.len(),
                                    written = changed.written,
                                    removed = changed.removed,
                                    "CrowdSec decisions applied to the blocklist"
                                );
                            }
                        }
                        Err(e) if !map_failing => {
                            map_failing = true;
                            warn!(
                                "writing CrowdSec bans to the blocklist failed (retried at \
                                 each pull): {e}"
                            );
                        }
                        Err(e) => debug!("writing CrowdSec bans to the blocklist failed: {e}"),
                    }
                    self.connected(bans.len(), !whole);
                    whole = true;
                    backoff = self.interval;
                    self.interval
                }
                Err(error) => {
                    whole = false;
                    self.unreachable(&error.to_string(), backoff);
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF.max(self.interval));
                    wait
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn connected(&self, bans: usize, startup: bool) {
        let mut status = lock(&self.status);
        let now = unix_now();
        if status.state != LapiState::Connected {
            match status.state {
                LapiState::Unreachable => info!(
                    url = %status.url,
                    unreachable_for = %humantime::format_duration(Duration::from_secs(
                        now.saturating_sub(status.since)
                    )),
                    bans,
                    "CrowdSec LAPI reachable again; its whole decision list was pulled"
                ),
                _ => info!(
                    url = %status.url,
                    bans,
                    "CrowdSec LAPI connected; its whole decision list was pulled"
                ),
            }
            status.state = LapiState::Connected;
            status.since = now;
        } else if startup {
            debug!(bans, "CrowdSec decision list pulled again");
        }
        status.last_pull = Some(now);
        status.error = None;
        status.bans = bans;
        status.pulls += 1;
    }

    fn unreachable(&self, error: &str, retry_in: Duration) {
        let mut status = lock(&self.status);
        status.failed_pulls += 1;
        status.error = Some(error.to_owned());
        if status.state == LapiState::Unreachable {
            debug!(
                "CrowdSec LAPI still unreachable: {error}; next pull in {}",
                humantime::format_duration(retry_in)
            );
            return;
        }
        // Once per outage: a LAPI down for an hour writes one line, not 360.
        warn!(
            url = %status.url,
            "CrowdSec LAPI unreachable: {error}; the blocklist keeps its CrowdSec entries \
             as they are (each ends on its own time); pulls are retried after {}, then \
             twice as long each time up to {}",
            humantime::format_duration(retry_in),
            humantime::format_duration(MAX_BACKOFF.max(self.interval))
        );
        status.state = LapiState::Unreachable;
        status.since = unix_now();
    }
}

/// What [`sync_crowdsec_entries`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Entries added, or given another end.
    pub written: usize,
    pub removed: usize,
}

/// Makes the crowdsec entries of `blocklist` exactly `bans` (prefix -> the
/// `CLOCK_BOOTTIME` second its ban ends). Entries of another origin are left alone, and
/// a ban on one of their prefixes is not written: that prefix is blocked anyway, and
/// the file's or the operator's word on it stands.
pub fn sync_crowdsec_entries(
    blocklist: &Blocklist,
    bans: &HashMap<Prefix, u32>,
) -> Result<Synced, MapError> {
    let current: HashMap<Prefix, BlockEntry> = blocklist.entries()?.into_iter().collect();
    let mut synced = Synced::default();
    for (prefix, entry) in &current {
        if entry.origin != ORIGIN_CROWDSEC || bans.contains_key(prefix) {
            continue;
        }
        // Read again: `kgate block add` may have made it a command entry meanwhile.
        let still_ours = blocklist
            .get(prefix)?
            .is_some_and(|e| e.origin == ORIGIN_CROWDSEC);
        if still_ours && blocklist.remove(prefix)? {
            synced.removed += 1;
        }
    }
    for (prefix, &end) in bans {
        let wanted = BlockEntry::new(prefix.len(), end, ORIGIN_CROWDSEC);
        match current.get(prefix) {
            Some(entry) if entry.origin != ORIGIN_CROWDSEC || *entry == wanted => {}
            Some(_) => {
                let still_ours = blocklist
                    .get(prefix)?
                    .is_some_and(|e| e.origin == ORIGIN_CROWDSEC);
                if still_ours {
                    blocklist.insert(prefix, wanted)?;
                    synced.written += 1;
                }
            }
            // Only where nothing is: an entry made meanwhile by another hand stays.
            None => {
                if blocklist.insert_if_absent(prefix, wanted)? {
                    synced.written += 1;
                }
            }
        }
    }
    Ok(synced)
}
