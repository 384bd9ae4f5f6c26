//! Publishing each server's state and counters in the pinned `servers` map, so that
//! `kgate status` and `bpftool map dump pinned <pin>/servers` show them from any shell.

use std::{sync::Arc, sync::atomic::Ordering, time::Duration};

use proxy_common::ServerEntry;
use tracing::warn;

use crate::{daemon::Daemon, gateway::Gateway, maps::ServerMaps};

/// How often counters are published; state changes are published at once.
const PERIOD: Duration = Duration::from_secs(1);

/// Publishes every server now, then every [`PERIOD`] and after every state change.
pub async fn run(daemon: Arc<Daemon>) {
    let Some(maps) = &daemon.server_maps else {
        return;
    };
    let mut failed = false;
    loop {
        let freed = daemon.collect_slots().await;
        match publish_all(&daemon.gateway(), maps, &freed) {
            Ok(()) => failed = false,
            // Once per failure streak: the next period tries again.
            Err(e) if !failed => {
                warn!("publishing server state in the pinned map: {e}");
                failed = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(PERIOD) => {}
            _ = daemon.changed.notified() => {}
        }
    }
}

/// Writes every server of `gateway`, and empties the slots in `freed`.
pub fn publish_all(
    gateway: &Gateway,
    maps: &ServerMaps,
    freed: &[u32],
) -> Result<(), crate::maps::MapError> {
    for &slot in freed {
        maps.clear(slot)?;
    }
    for (backend_id, (backend, pool)) in gateway
        .config
        .backends
        .iter()
        .zip(&gateway.pools)
        .enumerate()
    {
        for (server, runtime) in backend.servers.iter().zip(&pool.servers) {
            let spliced = maps.spliced_bytes(runtime.slot)?;
            let health = runtime.health();
            let mut entry = ServerEntry {
                backend_id: backend_id as u32,
                port: server.address.port(),
                in_use: 1,
                consecutive_ok: health.consecutive_ok,
                consecutive_fail: health.consecutive_fail,
                active_connections: runtime.active.load(Ordering::Relaxed),
                total_connections: runtime.total.load(Ordering::Relaxed),
                bytes_in: spliced.bytes_in + runtime.copied_in.load(Ordering::Relaxed),
                bytes_out: spliced.bytes_out + runtime.copied_out.load(Ordering::Relaxed),
                ..ServerEntry::default()
            };
            put(&mut entry.backend, &backend.name);
            put(&mut entry.server, &server.name);
            put(&mut entry.address, &server.address.to_string());
            put(&mut entry.state, &runtime.state());
            put(&mut entry.last_check, health.last_check);
            maps.publish(runtime.slot, &entry)?;
        }
    }
    Ok(())
}

/// Copies `text` into a NUL-padded field, cut to fit with a NUL left at the end.
fn put(field: &mut [u8], text: &str) {
    let n = text.len().min(field.len() - 1);
    field[..n].copy_from_slice(&text.as_bytes()[..n]);
    field[n..].fill(0);
}

/// The text of a NUL-padded field.
pub fn text(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_round_trip_and_are_cut_to_fit() {
        let mut field = [0xffu8; 8];
        put(&mut field, "drain");
        assert_eq!(text(&field), "drain");
        assert_eq!(field[5..], [0, 0, 0]);
        put(&mut field, "much too long");
        assert_eq!(text(&field), "much to");
    }
}
