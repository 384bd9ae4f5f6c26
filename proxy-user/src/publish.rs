//! Publishing each server's state and counters in the pinned `servers` map, so that
//! `bpftool map dump pinned <pin>/servers` shows them from any shell: the entries of
//! the status document (`status`) that `kgate status` and the stats page show.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use proxy_common::ServerEntry;
use tracing::warn;

use crate::{daemon::Daemon, gateway::Gateway, maps::StatusMaps, status};

/// How often counters are published; state changes are published at once.
const PERIOD: Duration = Duration::from_secs(1);

/// Publishes every server now, then every [`PERIOD`] and after every state change;
/// frees the slots of removed servers and frontends as their connections end (with no
/// maps to publish in too: the slots are counted all the same).
pub async fn run(daemon: Arc<Daemon>) {
    let mut failed = false;
    loop {
        let published = daemon
            .free_slots()
            .await
            .and_then(|()| match &daemon.status_maps {
                Some(maps) => publish_all(&daemon.gateway(), maps),
                None => Ok(()),
            });
        match published {
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

/// Writes every server of `gateway`. The entries are the status document's
/// (`status::servers`), so bpftool shows what `kgate status` does.
fn publish_all(gateway: &Gateway, maps: &StatusMaps) -> Result<(), crate::maps::MapError> {
    let backend_ids: HashMap<&str, u32> = gateway
        .config
        .backends
        .iter()
        .enumerate()
        .map(|(id, b)| (b.name.as_str(), id as u32))
        .collect();
    for (slot, server) in status::servers(gateway, Some(maps)) {
        let address: SocketAddr = server.address.parse().expect("written from a SocketAddr");
        let mut entry = ServerEntry {
            backend_id: backend_ids[server.backend.as_str()],
            port: address.port(),
            consecutive_ok: server.consecutive_ok,
            consecutive_fail: server.consecutive_fail,
            active_connections: server.active_connections,
            total_connections: server.total_connections,
            bytes_in: server.bytes_in,
            bytes_out: server.bytes_out,
            ..ServerEntry::default()
        };
        put(&mut entry.backend, &server.backend);
        put(&mut entry.server, &server.server);
        put(&mut entry.address, &server.address);
        put(&mut entry.state, &server.state);
        put(&mut entry.last_check, &server.last_check);
        maps.publish(slot, &entry)?;
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
#[cfg(test)]
fn text(field: &[u8]) -> String {
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
