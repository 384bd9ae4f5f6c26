//! Prometheus' own tools against kgate's `/metrics` (Debian's `prometheus` package):
//! `promtool check metrics`, and a real Prometheus server that scrapes kgate in the
//! gateway namespace, as it would scrape an exporter.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::lab::NetNs;

/// One answer of `/metrics`: its `Content-Type` and body.
pub struct Scrape {
    pub content_type: String,
    pub body: String,
}

/// `GET /metrics` on `address` in `ns`, with `accept` as the `Accept` header if any.
pub fn scrape(ns: &NetNs, address: &str, accept: Option<&str>) -> Scrape {
    let address = address.to_owned();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let text = ns.run(move || {
        let mut c = TcpStream::connect(&address).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(c, "GET /metrics HTTP/1.1\r\nHost: kgate\r\n{accept}\r\n").unwrap();
        let mut response = String::new();
        c.read_to_string(&mut response).unwrap();
        response
    });
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .expect("a Content-Type")
        .to_owned();
    Scrape {
        content_type,
        body: body.to_owned(),
    }
}

/// `promtool check metrics` with `body` on its standard input.
pub fn promtool_check(body: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask test` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A Prometheus server in a namespace, scraping one target every second. Dropping it
/// kills it; its storage is in the directory it was given.
pub struct Prometheus {
    child: Child,
    ns: NetNs,
    listen: String,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen`, scraping `target` (`host:port`,
    /// path `/metrics`) with its default `Accept` header, which prefers OpenMetrics.
    pub fn start(ns: &NetNs, listen: &str, target: &str, dir: &Path) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: kgate\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let child = ns
            .command("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus)");
        Prometheus {
            child,
            ns: ns.clone(),
            listen: listen.to_owned(),
        }
    }

    /// The instant query `expr` through the HTTP API: each series' labels and value.
    pub fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let listen = self.listen.clone();
        let path = format!("/api/v1/query?query={}", encode(expr));
        let text = self.ns.run(move || {
            let mut c = TcpStream::connect(&listen).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            write!(
                c,
                "GET {path} HTTP/1.1\r\nHost: prometheus\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut response = String::new();
            c.read_to_string(&mut response).ok()?;
            Some(response)
        });
        let Some((_, body)) = text.as_deref().and_then(|t| t.split_once("\r\n\r\n")) else {
            return Vec::new();
        };
        let Ok(answer) = serde_json::from_str::<serde_json::Value>(body) else {
            return Vec::new();
        };
        answer["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|series| {
                let value = series["value"][1].as_str()?.parse().ok()?;
                Some((series["metric"].clone(), value))
            })
            .collect()
    }

    /// Waits (up to `timeout`) for `expr` to return at least one series, and returns
    /// what it returned last.
    pub fn wait_for(&self, expr: &str, timeout: Duration) -> Vec<(serde_json::Value, f64)> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(expr);
            if !result.is_empty() || Instant::now() > deadline {
                return result;
            }
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
