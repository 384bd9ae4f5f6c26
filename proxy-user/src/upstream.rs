//! Connecting to a backend's server, trying the next one when a connect fails.

use std::{io, sync::atomic::Ordering};

use tokio::{net::TcpStream, time::timeout};
use tracing::warn;

use crate::{config::Backend, pool::Pool};

/// A connected server: the stream and the server's index in its backend.
pub struct Upstream {
    pub stream: TcpStream,
    pub server: usize,
}

/// Connects to the first server of `order` that answers within the backend's
/// connect timeout. `None` when none did (each failure is logged, and counted in
/// `pool`: the server's connect errors, the backend's retries).
pub async fn connect(backend: &Backend, pool: &Pool, order: &[usize]) -> Option<Upstream> {
    for (tried, &index) in order.iter().enumerate() {
        if tried > 0 {
            pool.counters.retries.fetch_add(1, Ordering::Relaxed);
        }
        let server = &backend.servers[index];
        let attempt = timeout(backend.connect_timeout, TcpStream::connect(server.address)).await;
        let error = match attempt {
            Ok(Ok(stream)) => {
                // The relay writes whole segments; small replies (SMTP) must not wait.
                let _ = stream.set_nodelay(true);
                return Some(Upstream {
                    stream,
                    server: index,
                });
            }
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {:?}", backend.connect_timeout),
            ),
        };
        pool.servers[index]
            .connect_errors
            .fetch_add(1, Ordering::Relaxed);
        warn!(
            backend = %backend.name,
            server = %format!("{}/{}", backend.name, server.name),
            address = %server.address,
            "connect failed: {error}; trying the next server"
        );
    }
    None
}
