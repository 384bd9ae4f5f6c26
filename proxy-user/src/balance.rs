//! Choosing the server for a new connection.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Round robin over a backend's servers: each connection starts one server further,
/// and a connection that cannot reach its server tries the following ones in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    /// Server indexes in the order to try them, each once.
    pub fn order(&self, servers: usize) -> impl Iterator<Item = usize> + use<> {
        let start = if servers == 0 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed) % servers
        };
        (0..servers).map(move |i| (start + i) % servers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_starts_at_the_next_server_and_tries_all() {
        let rr = RoundRobin::default();
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(rr.order(3).collect::<Vec<_>>(), [0, 1, 2]);
    }

    #[test]
    fn an_empty_pool_yields_nothing() {
        assert_eq!(RoundRobin::default().order(0).count(), 0);
    }
}
