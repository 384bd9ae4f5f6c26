//! The HTTP server on `metrics_listen`: the live stats page at `/` (its script and
//! style beside it, all compiled into the binary: the page loads nothing from
//! elsewhere), the status document it refreshes itself from at `/status.json`, and the
//! Prometheus metrics at `/metrics`.
//!
//! One request per connection (`Connection: close`), GET or HEAD, answered from memory.
//! At most [`MAX_CONNECTIONS`] are served at once, each given [`REQUEST_TIMEOUT`] to
//! send its request head: more wait in the kernel's listen queue, holding no file
//! descriptor of kgate's (as control connections do, see control.rs).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::timeout,
};
use tracing::{debug, warn};

use crate::{daemon::Daemon, metrics, status};

/// Longest request head read; anything longer is refused.
const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CONNECTIONS: usize = 16;

const PAGE: &str = include_str!("web/page.html");
const SCRIPT: &str = include_str!("web/page.js");
const STYLE: &str = include_str!("web/page.css");

/// The page may load its own script, style and status document, and nothing else.
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                           connect-src 'self'; img-src data:; base-uri 'none'; \
                           form-action 'none'; frame-ancestors 'none'";

pub async fn serve(daemon: Arc<Daemon>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    let answered = timeout(REQUEST_TIMEOUT * 2, answer(stream, &daemon)).await;
                    drop(slot);
                    // A client's failures are its own; logged per request, they would be
                    // a way to fill the log.
                    match answered {
                        Ok(Err(e)) => debug!("HTTP request on metrics_listen: {e}"),
                        Err(_) => debug!("HTTP request on metrics_listen: not answered in time"),
                        Ok(Ok(())) => {}
                    }
                });
            }
            Err(e) => {
                warn!("metrics_listen: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a request gets back.
#[derive(Debug, PartialEq)]
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
    /// Content-Security-Policy, for the page.
    policy: Option<&'static str>,
}

impl Reply {
    fn ok(content_type: &'static str, body: impl Into<String>) -> Reply {
        Reply {
            status: "200 OK",
            content_type,
            body: body.into(),
            policy: None,
        }
    }

    fn error(status: &'static str, body: &str) -> Reply {
        Reply {
            status,
            ..Reply::ok("text/plain; charset=utf-8", body)
        }
    }
}

async fn answer(mut stream: TcpStream, daemon: &Daemon) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;

    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let (method, reply) = match request.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {
            let method = request.method.unwrap_or_default();
            let path = request.path.unwrap_or_default();
            let accept = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("accept"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            (method, route(method, path, accept, daemon))
        }
        Ok(httparse::Status::Partial) if head.len() >= MAX_REQUEST => (
            "",
            Reply::error("431 Request Header Fields Too Large", "request too long\n"),
        ),
        _ => ("", Reply::error("400 Bad Request", "not an HTTP request\n")),
    };
    let mut response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    if let Some(policy) = reply.policy {
        response.push_str(&format!("Content-Security-Policy: {policy}\r\n"));
    }
    if reply.status.starts_with("405") {
        response.push_str("Allow: GET, HEAD\r\n");
    }
    response.push_str("\r\n");
    if method != "HEAD" {
        response.push_str(&reply.body);
    }
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// `accept` is the request's `Accept` header: it chooses the metrics' format.
fn route(method: &str, path: &str, accept: Option<&str>, daemon: &Daemon) -> Reply {
    if method != "GET" && method != "HEAD" {
        return Reply::error("405 Method Not Allowed", "only GET and HEAD\n");
    }
    // The query string changes nothing (a browser may add one to defeat caches).
    let path = path.split('?').next().unwrap_or_default();
    match path {
        "/" | "/index.html" => Reply {
            policy: Some(PAGE_POLICY),
            ..Reply::ok("text/html; charset=utf-8", PAGE)
        },
        "/page.js" => Reply::ok("text/javascript; charset=utf-8", SCRIPT),
        "/page.css" => Reply::ok("text/css; charset=utf-8", STYLE),
        "/status.json" => match serde_json::to_string(&status::build(daemon)) {
            Ok(json) => Reply::ok("application/json", json),
            Err(e) => Reply::error("500 Internal Server Error", &format!("{e}\n")),
        },
        "/metrics" => {
            let format = metrics::Format::negotiate(accept);
            match metrics::render(daemon, format) {
                Ok(text) => Reply::ok(format.content_type(), text),
                Err(e) => Reply::error("500 Internal Server Error", &format!("{e}\n")),
            }
        }
        _ => Reply::error(
            "404 Not Found",
            "kgate serves / (the stats page), /status.json and /metrics\n",
        ),
    }
}
