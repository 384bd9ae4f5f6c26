//! Choosing the server for a new connection, and the ones to try after it.

use std::{
    hash::{Hash, Hasher},
    net::IpAddr,
    sync::atomic::Ordering,
};

use crate::{
    config::{Backend, Balance},
    pool::Pool,
};

/// Servers to try, best first: at most `retries + 1` of those that take connections.
pub fn order(pool: &Pool, backend: &Backend, client: IpAddr) -> Vec<usize> {
    let candidates: Vec<usize> = (0..backend.servers.len())
        .filter(|&i| pool.servers[i].takes_connections(backend.servers[i].max_connections))
        .collect();
    let mut order = match backend.balance {
        Balance::RoundRobin => round_robin(pool, backend, &candidates),
        Balance::LeastConn => least_connections(pool, backend, &candidates),
        Balance::Source => by_source(backend, &candidates, client),
    };
    order.truncate(backend.retries as usize + 1);
    order
}

/// Smooth weighted round robin (each pick adds every weight to its server's current
/// weight, takes the largest and subtracts the total): picks spread evenly, in
/// proportion to the weights. The retries follow in configuration order.
fn round_robin(pool: &Pool, backend: &Backend, candidates: &[usize]) -> Vec<usize> {
    let Some(first) = ({
        let mut current = pool.round_robin.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = candidates
            .iter()
            .map(|&i| i64::from(backend.servers[i].weight))
            .sum();
        for &i in candidates {
            current[i] += i64::from(backend.servers[i].weight);
        }
        let best = candidates
            .iter()
            .copied()
            .max_by_key(|&i| (current[i], -(i as i64)));
        if let Some(best) = best {
            current[best] -= total;
        }
        best
    }) else {
        return Vec::new();
    };
    let start = candidates.iter().position(|&i| i == first).unwrap_or(0);
    candidates[start..]
        .iter()
        .chain(&candidates[..start])
        .copied()
        .collect()
}

/// Fewest active connections per unit of weight first; ties in configuration order.
fn least_connections(pool: &Pool, backend: &Backend, candidates: &[usize]) -> Vec<usize> {
    let mut order = candidates.to_vec();
    // Compare active/weight without division: a/w < b/v  <=>  a*v < b*w.
    order.sort_by(|&a, &b| {
        let load = |i: usize| u128::from(pool.servers[i].active.load(Ordering::Relaxed));
        let weight = |i: usize| u128::from(backend.servers[i].weight);
        (load(a) * weight(b)).cmp(&(load(b) * weight(a)))
    });
    order
}

/// Weighted rendezvous hashing of the client address: each server scores
/// `-weight / ln(hash)`, highest first. A client keeps its server while the pool is
/// unchanged, and only the clients of a server that leaves move.
fn by_source(backend: &Backend, candidates: &[usize], client: IpAddr) -> Vec<usize> {
    let score = |i: usize| {
        let server = &backend.servers[i];
        // Fixed keys: the same client maps to the same server across restarts.
        let mut hasher = std::hash::DefaultHasher::new();
        client.hash(&mut hasher);
        server.name.hash(&mut hasher);
        // A uniform number in (0, 1).
        let unit = ((hasher.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        -f64::from(server.weight) / unit.ln()
    };
    let mut order = candidates.to_vec();
    order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
    order
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, time::Duration};

    use super::*;
    use crate::{
        config::{HealthConfig, ProxyProtocol, Server},
        pool::AdminState,
    };

    fn backend(balance: Balance, weights: &[u32]) -> Backend {
        Backend {
            name: "b".into(),
            balance,
            retries: 3,
            health: HealthConfig {
                check: crate::config::CheckType::None,
                interval: Duration::from_secs(2),
                fastinter: Duration::from_secs(2),
                downinter: Duration::from_secs(2),
                rise: 2,
                fall: 3,
                timeout: Duration::from_secs(2),
                port: None,
                address: None,
                send_proxy: true,
                helo: "h".into(),
                tls: Default::default(),
            },
            proxy_protocol: ProxyProtocol::V2,
            connect_timeout: Duration::from_secs(1),
            queue_limit: 1 << 20,
            splice_after: Duration::ZERO,
            servers: weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| Server {
                    name: format!("s{i}"),
                    address: SocketAddr::from(([192, 0, 2, i as u8 + 1], 25)),
                    weight,
                    max_connections: None,
                })
                .collect(),
        }
    }

    fn client(n: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc633_6400u32 + n)) // 198.51.100.0/24 and up
    }

    #[test]
    fn round_robin_follows_the_weights_exactly() {
        let b = backend(Balance::RoundRobin, &[1, 2, 5]);
        let pool = Pool::fresh(b.servers.len(), 0);
        let mut counts = [0; 3];
        for n in 0..800 {
            counts[order(&pool, &b, client(n))[0]] += 1;
        }
        assert_eq!(counts, [100, 200, 500]);
    }

    #[test]
    fn round_robin_retries_the_others_in_turn() {
        let b = backend(Balance::RoundRobin, &[1, 1, 1]);
        let pool = Pool::fresh(b.servers.len(), 0);
        assert_eq!(order(&pool, &b, client(0)), [0, 1, 2]);
        assert_eq!(order(&pool, &b, client(0)), [1, 2, 0]);
    }

    #[test]
    fn least_connections_prefers_the_least_loaded_per_weight() {
        let b = backend(Balance::LeastConn, &[1, 2, 1]);
        let pool = Pool::fresh(b.servers.len(), 0);
        pool.servers[0].active.store(3, Ordering::Relaxed);
        pool.servers[1].active.store(4, Ordering::Relaxed); // 2 per unit of weight
        pool.servers[2].active.store(1, Ordering::Relaxed);
        assert_eq!(order(&pool, &b, client(0)), [2, 1, 0]);
    }

    #[test]
    fn source_keeps_a_client_on_its_server_and_spreads_clients() {
        let b = backend(Balance::Source, &[1, 1, 1, 1]);
        let pool = Pool::fresh(b.servers.len(), 0);
        let mut counts = [0; 4];
        for n in 0..4000 {
            let first = order(&pool, &b, client(n))[0];
            assert_eq!(order(&pool, &b, client(n))[0], first, "client {n} moved");
            counts[first] += 1;
        }
        for c in counts {
            assert!((850..1150).contains(&c), "{counts:?}");
        }
        // A server leaving moves only its own clients.
        let before: Vec<usize> = (0..1000).map(|n| order(&pool, &b, client(n))[0]).collect();
        pool.servers[2].set_admin(AdminState::Maint);
        for (n, &was) in before.iter().enumerate() {
            let now = order(&pool, &b, client(n as u32))[0];
            if was != 2 {
                assert_eq!(now, was, "client {n} moved though its server stayed");
            } else {
                assert_ne!(now, 2);
            }
        }
    }

    #[test]
    fn drained_full_and_down_servers_are_skipped() {
        let mut b = backend(Balance::RoundRobin, &[1, 1, 1, 1]);
        b.servers[3].max_connections = Some(1);
        let pool = Pool::fresh(b.servers.len(), 0);
        pool.servers[0].set_admin(AdminState::Drain);
        pool.servers[1].set_health(crate::pool::HealthView {
            state: crate::health::state::Health::Down,
            ..crate::pool::HealthView::unchecked("")
        });
        pool.servers[3].active.store(1, Ordering::Relaxed);
        for n in 0..5 {
            assert_eq!(order(&pool, &b, client(n)), [2]);
        }
        pool.servers[2].set_admin(AdminState::Maint);
        assert!(order(&pool, &b, client(0)).is_empty());
    }

    #[test]
    fn retries_bound_the_servers_tried() {
        let mut b = backend(Balance::RoundRobin, &[1; 6]);
        b.retries = 1;
        let pool = Pool::fresh(b.servers.len(), 0);
        assert_eq!(order(&pool, &b, client(0)).len(), 2);
    }
}
