//! Admitting a client: the frontend's connection limits, checked before any work is
//! done for it.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use crate::{accept_proxy::Rejections, config::Frontend, rate::Rate};

/// Open connections of one frontend, in total and per client address, and its counts.
#[derive(Debug, Default)]
pub struct FrontendLoad {
    /// The frontend's slot in the programs' byte counters (slots.rs).
    pub slot: u32,
    active: AtomicU32,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    /// Clients closed at once because a limit was reached.
    pub refused: AtomicU64,
    /// Clients admitted.
    pub admitted: AtomicU64,
    /// Clients admitted a second.
    pub rate: Rate,
    /// Bytes from and to the clients that kgate copied itself, counted as they go;
    /// the eBPF programs count the ones they move in the frontend's slot.
    pub copied_in: AtomicU64,
    pub copied_out: AtomicU64,
    /// Connections closed before their PROXY header was taken (`accept_proxy`).
    pub proxy_rejections: Rejections,
}

/// Why a client was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections(u32),
    MaxConnectionsPerSource(u32),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::MaxConnections(n) => write!(f, "over limit: max_connections {n}"),
            Refusal::MaxConnectionsPerSource(n) => {
                write!(f, "over limit: max_connections_per_source {n}")
            }
        }
    }
}

/// A client's place in its frontend's counts; given back on drop.
#[derive(Debug)]
pub struct Admitted {
    load: Arc<FrontendLoad>,
    source: Option<IpAddr>,
}

impl FrontendLoad {
    pub fn new(slot: u32) -> FrontendLoad {
        FrontendLoad {
            slot,
            ..FrontendLoad::default()
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn admit(
        self: &Arc<Self>,
        frontend: &Frontend,
        source: IpAddr,
    ) -> Result<Admitted, Refusal> {
        let result = self.try_admit(frontend, source);
        let counter = if result.is_ok() {
            self.rate.add();
            &self.admitted
        } else {
            &self.refused
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    fn try_admit(
        self: &Arc<Self>,
        frontend: &Frontend,
        source: IpAddr,
    ) -> Result<Admitted, Refusal> {
        let max = frontend.max_connections.unwrap_or(u32::MAX);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map_err(|_| Refusal::MaxConnections(max))?;
        let mut admitted = Admitted {
            load: self.clone(),
            source: None,
        };
        if let Some(max) = frontend.max_connections_per_source {
            let mut per_source = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
            let count = per_source.entry(source).or_default();
            if *count >= max {
                // `admitted` drops here and gives the frontend slot back.
                return Err(Refusal::MaxConnectionsPerSource(max));
            }
            *count += 1;
            admitted.source = Some(source);
        }
        Ok(admitted)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(source) = self.source {
            let mut per_source = self
                .load
                .per_source
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(count) = per_source.get_mut(&source) {
                *count -= 1;
                if *count == 0 {
                    per_source.remove(&source);
                }
            }
        }
        self.load.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn frontend(max: Option<u32>, per_source: Option<u32>) -> Frontend {
        Frontend {
            name: "f".into(),
            listen: vec![],
            backend: 0,
            idle_timeout: Duration::from_secs(1),
            half_closed_timeout: Duration::from_secs(1),
            max_connections: max,
            max_connections_per_source: per_source,
            accept_proxy: None,
            freebind: false,
            log_connections: true,
        }
    }

    #[test]
    fn the_connection_over_max_connections_is_refused_and_counted() {
        let load = Arc::new(FrontendLoad::default());
        let f = frontend(Some(2), None);
        let a = load.admit(&f, "192.0.2.1".parse().unwrap()).unwrap();
        let _b = load.admit(&f, "192.0.2.2".parse().unwrap()).unwrap();
        assert_eq!(
            load.admit(&f, "192.0.2.3".parse().unwrap()).unwrap_err(),
            Refusal::MaxConnections(2)
        );
        assert_eq!(load.refused.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(load.active(), 1);
        assert!(load.admit(&f, "192.0.2.3".parse().unwrap()).is_ok());
    }

    #[test]
    fn each_source_has_its_own_limit_and_a_refusal_gives_the_slot_back() {
        let load = Arc::new(FrontendLoad::default());
        let f = frontend(Some(10), Some(1));
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let first = load.admit(&f, one).unwrap();
        assert_eq!(
            load.admit(&f, one).unwrap_err(),
            Refusal::MaxConnectionsPerSource(1)
        );
        assert_eq!(
            load.active(),
            1,
            "the refused client holds no frontend slot"
        );
        assert!(load.admit(&f, "192.0.2.2".parse().unwrap()).is_ok());
        drop(first);
        assert!(load.admit(&f, one).is_ok());
        assert!(
            load.per_source
                .lock()
                .unwrap()
                .get(&"192.0.2.2".parse().unwrap())
                .is_none()
        );
    }
}
