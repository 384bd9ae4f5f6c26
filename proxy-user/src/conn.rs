//! One client connection, from accept to the relay: its PROXY header received (on
//! an `accept_proxy` frontend), its admission, its server connected and sent the
//! header. Its log line is `ending`'s.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Instant};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{
    accept_proxy::{self, Received},
    balance,
    config::Backend,
    dataplane::{Connected, CounterSlots, SpliceTerms, Timeouts},
    ending::{Ending, Open, Outcome},
    gateway::Gateway,
    proxy_header, upstream,
};

/// Takes the connection as far as its server's header; logs it when it ends there.
pub async fn handle(
    open: Open,
    gateway: Arc<Gateway>,
    frontend: usize,
    mut client: TcpStream,
    peer: SocketAddr,
) -> Option<Connected> {
    let mut ending = Ending::new(open, gateway.clone(), frontend, peer);
    let load = &gateway.loads[frontend];
    let frontend = &gateway.config.frontends[frontend];
    let backend_index = frontend.backend;
    let backend = &gateway.config.backends[backend_index];

    let local = match client.local_addr() {
        Ok(local) => local,
        // Reset before it could be looked at.
        Err(e) => {
            ending.log(Outcome::ClientFailed(e));
            return None;
        }
    };
    let Received {
        source,
        destination,
        header_length,
    } = match &frontend.accept_proxy {
        None => Received {
            source: peer,
            destination: local,
            header_length: 0,
        },
        Some(settings) => match accept_proxy::receive(&mut client, peer, local, settings).await {
            Ok(received) => received,
            Err(rejection) => {
                load.proxy_rejections.count(&rejection);
                ending.log(Outcome::ProxyRefused(rejection));
                return None;
            }
        },
    };
    ending.client_named(source);

    match load.admit(frontend, source.ip().to_canonical()) {
        Err(refusal) => {
            ending.log(Outcome::Refused(refusal));
            return None;
        }
        Ok(admitted) => ending.admitted(admitted),
    }
    let _ = client.set_nodelay(true);
    let pool = &gateway.pools[backend_index];
    let order = balance::order(pool, backend, source.ip().to_canonical());
    let connecting = Instant::now();
    let Some(upstream::Upstream { mut stream, server }) =
        upstream::connect(backend, pool, &order).await
    else {
        pool.counters.no_server.fetch_add(1, Ordering::Relaxed);
        ending.log(Outcome::NoServer);
        return None;
    };
    ending.connected(server, connecting.elapsed());
    if let Err(e) = send_header(&mut stream, backend, source, destination).await {
        ending.log(Outcome::ServerFailed(e));
        return None;
    }
    let timeouts = Timeouts {
        idle: frontend.idle_timeout,
        half_closed: frontend.half_closed_timeout,
    };
    let terms = SpliceTerms {
        queue_limit: backend.queue_limit,
        counters: CounterSlots {
            server: pool.servers[server].slot,
            frontend: load.slot,
        },
        after: backend.splice_after,
        client_bytes_read: header_length,
    };
    Some(Connected {
        client,
        server: stream,
        terms,
        timeouts,
        ending,
    })
}

/// The header naming `source` as the client, which connected to `destination`.
async fn send_header(
    server: &mut TcpStream,
    backend: &Backend,
    source: SocketAddr,
    destination: SocketAddr,
) -> std::io::Result<()> {
    match proxy_header::for_connection(backend.proxy_protocol, source, destination) {
        Some(header) => server.write_all(&header).await,
        None => Ok(()),
    }
}
