//! The kgate lab: network namespaces on this machine with real peers in them, used by
//! the integration tests in `tests/tests/` and by `cargo xtask demo`.
//!
//! - [`lab`]: a client, a gateway and backends, each in its own network namespace,
//!   joined by veths and routed through the gateway ([`lab::Lab`], [`lab::NetNs`]).
//! - [`pair`]: two gateways sharing a virtual address on a bridge, a client and a
//!   backend ([`pair::PairLab`]); [`keepalived`] runs a private keepalived in one.
//! - [`kgate`]: runs the `kgate` daemon in the gateway and watches its log.
//! - [`journal`]: runs kgate as systemd would, logging to a private journald.
//! - [`browser`]: headless Chromium, driven over the DevTools protocol, for pages kgate serves.
//! - [`backend`]: what sits behind the proxy: PROXY header reading, a threaded TCP
//!   server and a mock mail server.
//! - [`postfix`]: a real, private Postfix (postscreen behind PROXY v2) in a namespace.
//! - [`crowdsec`]: a real, private CrowdSec local API in a namespace.
//! - [`dovecot`]: a real, private Dovecot (IMAP behind PROXY v2) in a namespace.
//! - [`tls`]: self-signed certificates and `openssl s_client` sessions.
//! - [`prometheus`]: `promtool check metrics`, and a real Prometheus scraping kgate.
//! - [`smtp`]: a small SMTP client, and the byte sequences of kgate's health checks.
//! - [`rawtcp`]: a hand-made TCP client that sends overlapping retransmissions.
//! - [`sockmap`]: counts the entries of kgate's pinned sock hashes.
//! - [`packet`]: counts the rules of the packet data plane.
//! - [`bpftool`]: what `bpftool` prints of a pinned map.
//! - [`xdp`]: reads the XDP counters and runs `kgate block`.
//!
//! Everything here needs root (network namespaces); tests start with
//! [`lab::skip_without_root`], the only allowed reason to skip.

pub mod backend;
pub mod bpftool;
pub mod browser;
pub mod crowdsec;
pub mod dovecot;
pub mod journal;
pub mod keepalived;
pub mod kgate;
pub mod lab;
pub mod packet;
pub mod pair;
pub mod postfix;
pub mod prometheus;
pub mod rawtcp;
pub mod rig;
pub mod smtp;
pub mod sockmap;
pub mod tls;
pub mod xdp;

mod proc;
