//! The configuration file: TOML text -> a validated [`Config`].
//!
//! Parsing is strict (`deny_unknown_fields`); every error names the file, the line and
//! column, and what to change. Names and references keep their spans so the checks that
//! serde cannot make (duplicates, a frontend naming a missing backend) point at the
//! offending line too.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use bytesize::ByteSize;
use proxy_common::{MAX_FRONTENDS, MAX_SERVERS, xdp::MAX_FRONTEND_ADDRESSES};
use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

mod accept_proxy;
mod crowdsec;
mod tls;
mod xdp;
pub use accept_proxy::AcceptProxy;
pub use crowdsec::{ApiKey, Crowdsec};
pub use tls::{CheckTls, Trust};
pub use xdp::{Xdp, XdpMode};

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub global: Global,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    /// `[xdp]`: early drop in the driver; `None` when the section is absent.
    pub xdp: Option<Xdp>,
    /// `[crowdsec]`: CrowdSec's ban decisions in the XDP blocklist; needs `[xdp]`.
    pub crowdsec: Option<Crowdsec>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Global {
    pub bpf_pin_path: PathBuf,
    pub control_socket: PathBuf,
    pub dataplane: DataplaneMode,
    /// Where Prometheus scrapes `/metrics`; none when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// How long SIGTERM waits for open connections before closing them.
    pub shutdown_timeout: Duration,
    /// Leave the pinned maps in place at exit (a restart removes and recreates them).
    pub keep_pins: bool,
    /// `freebind` for every frontend that does not set its own.
    pub freebind: bool,
    /// `log_connections` for every frontend that does not set its own.
    pub log_connections: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    /// sockmap where eBPF loads, userspace otherwise.
    #[default]
    Auto,
    Sockmap,
    /// Connections copied until handed off to TC programs that forward their segments
    /// (opt-in; see dataplane/packet.rs).
    Packet,
    Userspace,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Frontend {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Index into [`Config::backends`].
    pub backend: usize,
    /// A connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
    /// The same, once either side has sent its FIN.
    pub half_closed_timeout: Duration,
    /// Open connections at most; more are closed at once.
    pub max_connections: Option<u32>,
    /// Open connections from one client address at most.
    pub max_connections_per_source: Option<u32>,
    /// Clients come through trusted proxies that send a PROXY header first.
    pub accept_proxy: Option<AcceptProxy>,
    /// Listen even where the address is not (yet) on this host (`IP_FREEBIND`): the
    /// backup of a VRRP pair listens on the virtual address it does not hold.
    pub freebind: bool,
    /// A line in the log for each connection (ending.rs).
    pub log_connections: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Backend {
    pub name: String,
    pub balance: Balance,
    /// Further servers tried after the first connect fails.
    pub retries: u32,
    pub health: HealthConfig,
    pub proxy_protocol: ProxyProtocol,
    pub connect_timeout: Duration,
    /// Bytes one direction of a spliced connection may have queued in the kernel
    /// before kgate stops splicing it and TCP flow control holds the sender.
    pub queue_limit: u64,
    /// How long the sockmap data plane copies a connection before splicing it (unless
    /// it moved `dataplane::SPLICE_AFTER_BYTES` sooner): a short session costs less
    /// copied than joined to the splice and taken out again. Zero splices at once.
    pub splice_after: Duration,
    pub servers: Vec<Server>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// In turn, in proportion to the servers' weights.
    #[default]
    RoundRobin,
    /// The server with the fewest active connections per unit of weight.
    LeastConn,
    /// A hash of the client address: a client keeps its server while the pool is unchanged.
    Source,
}

/// `[backends.health]`: how the servers are checked.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthConfig {
    pub check: CheckType,
    pub interval: Duration,
    pub fastinter: Duration,
    pub downinter: Duration,
    pub rise: u32,
    pub fall: u32,
    pub timeout: Duration,
    /// Check this port instead of the server's.
    pub port: Option<u16>,
    /// Check this address instead of the server's.
    pub address: Option<std::net::IpAddr>,
    /// Start each check with a PROXY v2 LOCAL header (default: when the backend
    /// takes PROXY headers).
    pub send_proxy: bool,
    /// The name the smtp check gives in EHLO.
    pub helo: String,
    /// How the smtps and imaps checks treat the server's certificate.
    pub tls: CheckTls,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// No checks: servers are always taken as up.
    #[default]
    None,
    Tcp,
    Smtp,
    Imap,
    /// TLS from the first byte (465), then the smtp dialogue.
    Smtps,
    /// TLS from the first byte (993), then the imap dialogue.
    Imaps,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    V2,
    V1,
    None,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub name: String,
    pub address: SocketAddr,
    /// Share of new connections relative to the other servers (roundrobin, leastconn, source).
    pub weight: u32,
    /// Open connections at most; the server is skipped while it has that many.
    pub max_connections: Option<u32>,
}

pub const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/kgate";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/kgate/kgate.sock";
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_HALF_CLOSED_TIMEOUT: Duration = Duration::from_secs(60);
/// Enough for a fast reader never to be held back (a socket's send buffer grows to
/// about 4 MiB), small enough that 200 stalled connections cost under 1 GiB.
const DEFAULT_QUEUE_LIMIT: u64 = 4 << 20;
/// Longer than a short mail session (banner, a few commands, QUIT) takes over the
/// internet; short enough that a held connection soon parks.
const DEFAULT_SPLICE_AFTER: Duration = Duration::from_secs(1);
const DEFAULT_RETRIES: u32 = 3;
const MAX_WEIGHT: u32 = 256;
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_SMTP_CHECK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
const DEFAULT_HELO: &str = "kgate.invalid";
/// Below this a single full-sized skb can exceed the bound.
const MIN_QUEUE_LIMIT: u64 = 64 << 10;
/// A spliced socket's send buffer is set to twice the bound, in an `int`.
const MAX_QUEUE_LIMIT: u64 = 256 << 20;

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not `#[source]`: the message says the cause, once, and what to do.
    #[error("{path}: cannot read the configuration: {}", read_error(.error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    /// "1 frontend, 2 backends, 8 servers".
    pub fn summary(&self) -> String {
        let servers: usize = self.backends.iter().map(|b| b.servers.len()).sum();
        let count = |n: usize, noun: &str| format!("{n} {noun}{}", if n == 1 { "" } else { "s" });
        format!(
            "{}, {}, {}",
            count(self.frontends.len(), "frontend"),
            count(self.backends.len(), "backend"),
            count(servers, "server")
        )
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let locate = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            // toml's own message repeats the location and quotes the line; keep only
            // the part that says what is wrong.
            let message = e.message().trim_end();
            let message = match e.span() {
                // toml says no more than "duplicate key": name it.
                Some(span) if message == "duplicate key" => {
                    let key = text.get(span.clone()).unwrap_or_default().trim_matches('"');
                    format!(
                        "`{key}` is set twice in the same table: keep one of the two (or, for a \
                         second section, start it with its own [[...]] header)"
                    )
                }
                _ => message.to_owned(),
            };
            locate(e.span(), message)
        })?;
        file.validate()
            .map_err(|Located { span, message }| locate(Some(span), message))
    }
}

/// An error reading the file, with what to do about it.
fn read_error(error: &std::io::Error) -> String {
    let hint = match error.kind() {
        std::io::ErrorKind::NotFound => {
            "; give the file with -c FILE (the Debian package's example is \
             /usr/share/doc/kgate/examples/kgate.toml)"
        }
        std::io::ErrorKind::PermissionDenied => "; run as root, or give a file you may read",
        _ => "",
    };
    format!("{error}{hint}")
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// A validation error and the span of the value it is about.
struct Located {
    span: Range<usize>,
    message: String,
}

fn at<T>(value: &Spanned<T>, message: impl fmt::Display) -> Located {
    Located {
        span: value.span(),
        message: message.to_string(),
    }
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    global: GlobalSection,
    #[serde(default)]
    frontends: Vec<FrontendSection>,
    #[serde(default)]
    backends: Vec<BackendSection>,
    #[serde(default)]
    xdp: Option<xdp::XdpSection>,
    #[serde(default)]
    crowdsec: Option<Spanned<crowdsec::CrowdsecSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GlobalSection {
    #[serde(default = "default_pin_path")]
    bpf_pin_path: Spanned<PathBuf>,
    #[serde(default = "default_control_socket")]
    control_socket: Spanned<PathBuf>,
    #[serde(default)]
    dataplane: DataplaneMode,
    #[serde(default)]
    metrics_listen: Option<Spanned<Address>>,
    #[serde(default, deserialize_with = "optional_duration")]
    shutdown_timeout: Option<Duration>,
    #[serde(default)]
    keep_pins: bool,
    #[serde(default)]
    freebind: bool,
    #[serde(default = "yes")]
    log_connections: bool,
}

impl Default for GlobalSection {
    fn default() -> Self {
        GlobalSection {
            bpf_pin_path: default_pin_path(),
            control_socket: default_control_socket(),
            dataplane: DataplaneMode::default(),
            metrics_listen: None,
            shutdown_timeout: None,
            keep_pins: false,
            freebind: false,
            log_connections: true,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_pin_path() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_PIN_PATH))
}

fn no_servers() -> Spanned<Vec<ServerSection>> {
    Spanned::new(0..0, Vec::new())
}

fn default_control_socket() -> Spanned<PathBuf> {
    Spanned::new(0..0, PathBuf::from(DEFAULT_CONTROL_SOCKET))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FrontendSection {
    name: Spanned<String>,
    listen: Spanned<Vec<Spanned<Address>>>,
    backend: Spanned<String>,
    #[serde(default, deserialize_with = "optional_duration")]
    idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    half_closed_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "optional_max_connections")]
    max_connections: Option<u32>,
    #[serde(default, deserialize_with = "optional_max_connections_per_source")]
    max_connections_per_source: Option<u32>,
    #[serde(default)]
    accept_proxy: Option<Spanned<bool>>,
    #[serde(default)]
    trusted_sources: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    accept_proxy_timeout: Option<Spanned<String>>,
    freebind: Option<bool>,
    log_connections: Option<bool>,
    any_address: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSection {
    name: Spanned<String>,
    #[serde(default)]
    balance: Balance,
    #[serde(default)]
    proxy_protocol: ProxyProtocol,
    #[serde(default, deserialize_with = "optional_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    queue_limit: Option<Spanned<ByteSize>>,
    #[serde(default, deserialize_with = "optional_delay")]
    splice_after: Option<Duration>,
    #[serde(default, deserialize_with = "optional_retries")]
    retries: Option<u32>,
    #[serde(default)]
    health: Option<HealthSection>,
    #[serde(default = "no_servers")]
    servers: Spanned<Vec<ServerSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    #[serde(default)]
    check: CheckType,
    #[serde(default, deserialize_with = "optional_duration")]
    interval: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    fastinter: Option<Duration>,
    #[serde(default, deserialize_with = "optional_duration")]
    downinter: Option<Duration>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    port: Option<Spanned<i64>>,
    address: Option<Spanned<String>>,
    send_proxy: Option<bool>,
    helo: Option<String>,
    tls_verify: Option<Spanned<bool>>,
    tls_ca_file: Option<Spanned<PathBuf>>,
    tls_server_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    name: Spanned<String>,
    address: Spanned<Address>,
    weight: Option<Spanned<i64>>,
    #[serde(default, deserialize_with = "optional_max_connections")]
    max_connections: Option<u32>,
}

/// A socket address with an error message that shows the expected form.
#[derive(Clone, Copy)]
struct Address(SocketAddr);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Address).map_err(|_| {
            let form = "write it as \"192.0.2.1:25\" or \"[2001:db8::1]:25\"";
            let (host, port) = text.rsplit_once(':').unwrap_or((&text, ""));
            let host = host.trim_start_matches('[').trim_end_matches(']');
            de::Error::custom(
                match (host.parse::<std::net::IpAddr>(), port.parse::<u64>()) {
                    (Ok(_), Ok(port)) => format!("`{text}`: port {port} is over 65535"),
                    (Err(_), Ok(_)) if !host.is_empty() => format!(
                        "`{text}` names a host: kgate takes IP addresses (it resolves no names); \
                     {form}"
                    ),
                    _ => format!("`{text}` is not an address with a port: {form}"),
                },
            )
        })
    }
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let duration = optional_delay(d)?;
    if duration.is_some_and(|d| d.is_zero()) {
        return Err(de::Error::custom(
            "zero is not allowed here: give a duration such as \"2s\"",
        ));
    }
    Ok(duration)
}

/// A duration that may be zero ("at once").
fn optional_delay<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    // A bare number is the commonest slip (`interval = 1`): say which unit to add.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Number(i64),
    }
    let text = match Written::deserialize(d)? {
        Written::Text(text) => text,
        Written::Number(n) => {
            return Err(de::Error::custom(format!(
                "`{n}` has no unit: write \"{n}s\" for seconds (or \"{n}ms\", \"{n}m\")"
            )));
        }
    };
    let duration = humantime::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "`{text}` is not a duration ({e}): write it as \"500ms\", \"5s\" or \"2m\""
        ))
    })?;
    Ok(Some(duration))
}

fn optional_max_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    optional_limit(d, "max_connections")
}

fn optional_max_connections_per_source<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    optional_limit(d, "max_connections_per_source")
}

fn optional_limit<'de, D: Deserializer<'de>>(d: D, key: &str) -> Result<Option<u32>, D::Error> {
    match i64::deserialize(d)? {
        0 => Err(de::Error::custom(
            "a limit of 0 would refuse every client: leave the key out for no limit",
        )),
        limit => u32::try_from(limit).map(Some).map_err(|_| {
            de::Error::custom(format!(
                "{key} = {limit} is out of range: give 1 to {}, or leave the key out for no \
                 limit",
                u32::MAX
            ))
        }),
    }
}

fn optional_retries<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let retries = i64::deserialize(d)?;
    u32::try_from(retries).map(Some).map_err(|_| {
        de::Error::custom(format!(
            "retries = {retries} is out of range: give 0 (the first server only) to {}",
            u32::MAX
        ))
    })
}

impl ConfigFile {
    fn validate(self) -> Result<Config, Located> {
        let global = self.global.validate()?;

        let mut backend_index = HashMap::new();
        let mut backends = Vec::with_capacity(self.backends.len());
        let mut servers_so_far = 0;
        for section in self.backends {
            // The pinned `servers` map has a slot for each server: `run` could not
            // publish more (pool.rs, `Slots`).
            if let Some(server) = section
                .servers
                .get_ref()
                .get(MAX_SERVERS.saturating_sub(servers_so_far))
            {
                return Err(at(
                    &server.name,
                    format!(
                        "more than {MAX_SERVERS} servers in all backends together: kgate \
                         publishes at most {MAX_SERVERS}; split the gateway or drop servers"
                    ),
                ));
            }
            servers_so_far += section.servers.get_ref().len();
            if backend_index
                .insert(section.name.get_ref().clone(), backends.len())
                .is_some()
            {
                return Err(at(
                    &section.name,
                    format!(
                        "a backend named `{}` is defined twice: give each [[backends]] its own name",
                        section.name.get_ref()
                    ),
                ));
            }
            backends.push(section.validate()?);
        }

        let mut frontend_names = HashMap::new();
        let mut listening: HashMap<SocketAddr, String> = HashMap::new();
        // With [xdp], each listen address takes a slot in the program's frontend map.
        let mut first_address_over_xdp_capacity = None;
        let mut frontends = Vec::with_capacity(self.frontends.len());
        for section in self.frontends {
            let name = section.name.get_ref();
            check_name(&section.name, "frontend")?;
            // The programs count each frontend's bytes in a slot of their own
            // (slots.rs).
            if frontends.len() == MAX_FRONTENDS {
                return Err(at(
                    &section.name,
                    format!(
                        "more than {MAX_FRONTENDS} frontends: kgate counts the bytes of at \
                         most {MAX_FRONTENDS}; list more addresses in one frontend's `listen`"
                    ),
                ));
            }
            if frontend_names.insert(name.clone(), ()).is_some() {
                return Err(at(
                    &section.name,
                    format!(
                        "a frontend named `{name}` is defined twice: give each [[frontends]] its own name"
                    ),
                ));
            }
            let backend = *backend_index
                .get(section.backend.get_ref())
                .ok_or_else(|| {
                    let known: Vec<_> = backends.iter().map(|b| format!("`{}`", b.name)).collect();
                    at(
                        &section.backend,
                        format!(
                            "frontend `{name}` names backend `{}`, which is not defined: define a \
                         [[backends]] with that name, or use one of: {}",
                            section.backend.get_ref(),
                            if known.is_empty() {
                                "(none defined)".to_owned()
                            } else {
                                known.join(", ")
                            }
                        ),
                    )
                })?;
            if section.listen.get_ref().is_empty() {
                return Err(at(
                    &section.listen,
                    format!(
                        "frontend `{name}` listens nowhere: give `listen` at least one address like \"192.0.2.1:25\""
                    ),
                ));
            }
            let any_address = section.any_address.as_ref().is_some_and(|a| *a.get_ref());
            let mut listen = Vec::new();
            for address in section.listen.get_ref() {
                let addr = address.get_ref().0;
                if addr.port() == 0 {
                    return Err(at(
                        address,
                        format!("`{addr}` has port 0: give the port clients connect to"),
                    ));
                }
                if addr.ip().is_unspecified() && !any_address {
                    return Err(at(
                        address,
                        format!(
                            "`{addr}` listens on every address of this host, not one: give the \
                             address clients connect to (\"192.0.2.1:{port}\"), or set \
                             `any_address = true` in frontend `{name}` if every address is meant",
                            port = addr.port()
                        ),
                    ));
                }
                if let Some(other) = listening.insert(addr, name.clone()) {
                    return Err(at(
                        address,
                        format!(
                            "`{addr}` is already a listen address of frontend `{other}`: each address can be listened on once"
                        ),
                    ));
                }
                if listening.len() > MAX_FRONTEND_ADDRESSES {
                    first_address_over_xdp_capacity.get_or_insert(address.span());
                }
                listen.push(addr);
            }
            if let Some(set) = &section.any_address
                && *set.get_ref()
                && !listen.iter().any(|a| a.ip().is_unspecified())
            {
                return Err(at(
                    set,
                    format!(
                        "frontend `{name}` sets `any_address` but listens on no 0.0.0.0 or [::] \
                         address: remove the key"
                    ),
                ));
            }
            frontends.push(Frontend {
                name: name.clone(),
                listen,
                backend,
                idle_timeout: section.idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
                half_closed_timeout: section
                    .half_closed_timeout
                    .unwrap_or(DEFAULT_HALF_CLOSED_TIMEOUT),
                max_connections: section.max_connections,
                max_connections_per_source: section.max_connections_per_source,
                accept_proxy: accept_proxy::AcceptProxyKeys {
                    accept_proxy: section.accept_proxy,
                    trusted_sources: section.trusted_sources,
                    accept_proxy_timeout: section.accept_proxy_timeout,
                }
                .validate(name)?,
                freebind: section.freebind.unwrap_or(global.freebind),
                log_connections: section.log_connections.unwrap_or(global.log_connections),
            });
        }
        if frontends.is_empty() {
            return Err(Located {
                span: 0..0,
                message: "no frontend is defined: add a [[frontends]] section with `name`, \
                          `listen` and `backend`"
                    .to_owned(),
            });
        }

        let xdp = self.xdp.map(xdp::XdpSection::validate).transpose()?;
        if let (Some(_), Some(span)) = (&xdp, first_address_over_xdp_capacity) {
            return Err(Located {
                span,
                message: format!(
                    "more than {MAX_FRONTEND_ADDRESSES} listen addresses in all frontends \
                     together: the XDP program knows at most {MAX_FRONTEND_ADDRESSES}; drop \
                     addresses or the [xdp] section"
                ),
            });
        }

        let crowdsec = match self.crowdsec {
            Some(section) if xdp.is_none() => {
                return Err(Located {
                    span: section.span(),
                    message: "[crowdsec] puts its bans in the XDP blocklist: add an [xdp] \
                              section (the interfaces clients come in on), or remove [crowdsec]"
                        .to_owned(),
                });
            }
            section => section
                .map(crowdsec::CrowdsecSection::validate)
                .transpose()?,
        };

        Ok(Config {
            global,
            frontends,
            backends,
            xdp,
            crowdsec,
        })
    }
}

impl GlobalSection {
    fn validate(self) -> Result<Global, Located> {
        for (key, path) in [
            ("bpf_pin_path", &self.bpf_pin_path),
            ("control_socket", &self.control_socket),
        ] {
            if !path.get_ref().is_absolute() {
                return Err(at(
                    path,
                    format!(
                        "`{key}` must be an absolute path, like \"{}\"",
                        if key == "bpf_pin_path" {
                            DEFAULT_PIN_PATH
                        } else {
                            DEFAULT_CONTROL_SOCKET
                        }
                    ),
                ));
            }
        }
        Ok(Global {
            bpf_pin_path: self.bpf_pin_path.into_inner(),
            control_socket: self.control_socket.into_inner(),
            dataplane: self.dataplane,
            metrics_listen: self.metrics_listen.map(|a| a.into_inner().0),
            shutdown_timeout: self.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
            keep_pins: self.keep_pins,
            freebind: self.freebind,
            log_connections: self.log_connections,
        })
    }
}

impl BackendSection {
    fn validate(self) -> Result<Backend, Located> {
        let name = self.name.get_ref();
        check_name(&self.name, "backend")?;
        if self.servers.get_ref().is_empty() {
            let span = if self.servers.span().is_empty() {
                self.name.span()
            } else {
                self.servers.span()
            };
            return Err(Located {
                span,
                message: format!(
                    "backend `{name}` has no servers: add a [[backends.servers]] section with \
                     `name` and `address` after it"
                ),
            });
        }
        let mut server_names = HashMap::new();
        let mut servers = Vec::new();
        for server in self.servers.into_inner() {
            check_name(&server.name, "server")?;
            if server_names
                .insert(server.name.get_ref().clone(), ())
                .is_some()
            {
                return Err(at(
                    &server.name,
                    format!(
                        "backend `{name}` has two servers named `{}`: give each server its own name",
                        server.name.get_ref()
                    ),
                ));
            }
            let address = server.address.get_ref().0;
            if address.port() == 0 || address.ip().is_unspecified() {
                return Err(at(
                    &server.address,
                    format!(
                        "server address `{address}` cannot be connected to: give the server's own address and port"
                    ),
                ));
            }
            let weight = match &server.weight {
                None => 1,
                Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(w.get_ref()) => *w.get_ref() as u32,
                Some(w) => {
                    return Err(at(
                        w,
                        format!(
                            "weight {} is out of range: give 1 to {MAX_WEIGHT} (use `kgate \
                             server set` with drain or maint to take a server out)",
                            w.get_ref()
                        ),
                    ));
                }
            };
            servers.push(Server {
                name: server.name.into_inner(),
                address,
                weight,
                max_connections: server.max_connections,
            });
        }
        let queue_limit = match &self.queue_limit {
            None => DEFAULT_QUEUE_LIMIT,
            Some(limit) if limit.get_ref().as_u64() < MIN_QUEUE_LIMIT => {
                return Err(at(
                    limit,
                    format!(
                        "queue_limit {} is too small: give at least {}",
                        limit.get_ref().display().iec(),
                        ByteSize::b(MIN_QUEUE_LIMIT).display().iec()
                    ),
                ));
            }
            Some(limit) if limit.get_ref().as_u64() > MAX_QUEUE_LIMIT => {
                return Err(at(
                    limit,
                    format!(
                        "queue_limit {} is too large: give at most {} (a spliced socket's send \
                         buffer is set to twice it)",
                        limit.get_ref().display().iec(),
                        ByteSize::b(MAX_QUEUE_LIMIT).display().iec()
                    ),
                ));
            }
            Some(limit) => limit.get_ref().as_u64(),
        };
        let health = match self.health {
            None => HealthSection::none().validate(self.proxy_protocol)?,
            Some(section) => section.validate(self.proxy_protocol)?,
        };
        Ok(Backend {
            name: name.clone(),
            balance: self.balance,
            retries: self.retries.unwrap_or(DEFAULT_RETRIES),
            health,
            proxy_protocol: self.proxy_protocol,
            connect_timeout: self.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            queue_limit,
            splice_after: self.splice_after.unwrap_or(DEFAULT_SPLICE_AFTER),
            servers,
        })
    }
}

impl HealthSection {
    fn none() -> HealthSection {
        HealthSection {
            check: CheckType::None,
            interval: None,
            fastinter: None,
            downinter: None,
            rise: None,
            fall: None,
            timeout: None,
            port: None,
            address: None,
            send_proxy: None,
            helo: None,
            tls_verify: None,
            tls_ca_file: None,
            tls_server_name: None,
        }
    }

    fn validate(self, proxy_protocol: ProxyProtocol) -> Result<HealthConfig, Located> {
        let count = |value: &Option<Spanned<i64>>, key: &str, default: u32| match value {
            None => Ok(default),
            Some(v) => match u32::try_from(*v.get_ref()) {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(at(
                    v,
                    format!(
                        "{key} = {} is out of range: give 1 to {} checks in a row",
                        v.get_ref(),
                        u32::MAX
                    ),
                )),
            },
        };
        let interval = self.interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
        // postscreen greets with `220-`, waits postscreen_greet_wait (6 s by default),
        // then sends the final `220 `: an smtp check must outlast that wait. smtpd on
        // 465 has no postscreen, but may hold its greeting for its lookups of the client.
        let default_timeout = match self.check {
            CheckType::Smtp | CheckType::Smtps => DEFAULT_SMTP_CHECK_TIMEOUT,
            _ => DEFAULT_CHECK_TIMEOUT,
        };
        let address = match &self.address {
            None => None,
            Some(text) => Some(text.get_ref().parse().map_err(|_| {
                at(
                    text,
                    format!(
                        "`{}` is not an IP address: give the address to check, like \"192.0.2.1\" (the port goes in `port`)",
                        text.get_ref()
                    ),
                )
            })?),
        };
        let port = match &self.port {
            None => None,
            Some(port) if *port.get_ref() == 0 => {
                return Err(at(
                    port,
                    "port 0 cannot be checked: give the port to connect to",
                ));
            }
            Some(port) => Some(u16::try_from(*port.get_ref()).map_err(|_| {
                at(
                    port,
                    format!("port {} is out of range: give 1 to 65535", port.get_ref()),
                )
            })?),
        };
        Ok(HealthConfig {
            check: self.check,
            interval,
            fastinter: self.fastinter.unwrap_or(interval),
            downinter: self.downinter.unwrap_or(interval),
            rise: count(&self.rise, "rise", DEFAULT_RISE)?,
            fall: count(&self.fall, "fall", DEFAULT_FALL)?,
            timeout: self.timeout.unwrap_or(default_timeout),
            port,
            address,
            send_proxy: self
                .send_proxy
                .unwrap_or(proxy_protocol != ProxyProtocol::None),
            helo: self.helo.unwrap_or_else(|| DEFAULT_HELO.to_owned()),
            tls: tls::TlsKeys {
                tls_verify: self.tls_verify,
                tls_ca_file: self.tls_ca_file,
                tls_server_name: self.tls_server_name,
            }
            .validate(self.check)?,
        })
    }
}

/// Names appear in logs, status tables and `BACKEND/SERVER` arguments.
fn check_name(name: &Spanned<String>, what: &str) -> Result<(), Located> {
    let text = name.get_ref();
    let valid = !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(at(
            name,
            format!(
                "{what} name `{text}` is not usable: use 1 to 64 letters, digits, `-`, `_` or `.`"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[global]
bpf_pin_path = "/sys/fs/bpf/kgate-x"
dataplane = "userspace"

[[frontends]]
name = "smtp"
listen = ["10.0.20.1:25", "[2001:db8::1]:25"]
backend = "mail-smtp"

[[backends]]
name = "mail-smtp"
proxy_protocol = "v1"
connect_timeout = "1500ms"
splice_after = "0s"

[[backends.servers]]
name = "node1"
address = "10.0.20.101:30125"

[[backends.servers]]
name = "node2"
address = "[2001:db8::2]:30125"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("kgate.toml"))
    }

    /// The error as `kgate check` prints it.
    fn error(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn a_complete_config_parses_into_typed_values() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.global.bpf_pin_path, Path::new("/sys/fs/bpf/kgate-x"));
        assert_eq!(
            config.global.control_socket,
            Path::new(DEFAULT_CONTROL_SOCKET)
        );
        assert_eq!(config.global.dataplane, DataplaneMode::Userspace);
        let frontend = &config.frontends[0];
        assert_eq!(frontend.name, "smtp");
        assert_eq!(
            frontend.listen,
            vec![
                "10.0.20.1:25".parse().unwrap(),
                "[2001:db8::1]:25".parse().unwrap()
            ]
        );
        let backend = &config.backends[frontend.backend];
        assert_eq!(backend.name, "mail-smtp");
        assert_eq!(backend.proxy_protocol, ProxyProtocol::V1);
        assert_eq!(backend.connect_timeout, Duration::from_millis(1500));
        assert_eq!(backend.splice_after, Duration::ZERO);
        assert_eq!(backend.servers.len(), 2);
        assert_eq!(
            backend.servers[1].address,
            "[2001:db8::2]:30125".parse().unwrap()
        );
    }

    #[test]
    fn defaults_apply_when_keys_are_left_out() {
        let config = parse(
            r#"
[[frontends]]
name = "f"
listen = ["127.0.0.1:2525"]
backend = "b"
[[backends]]
name = "b"
[[backends.servers]]
name = "s"
address = "127.0.0.1:25"
"#,
        )
        .unwrap();
        assert_eq!(config.global.bpf_pin_path, Path::new(DEFAULT_PIN_PATH));
        assert_eq!(config.global.dataplane, DataplaneMode::Auto);
        assert_eq!(config.backends[0].proxy_protocol, ProxyProtocol::V2);
        assert_eq!(config.backends[0].balance, Balance::RoundRobin);
        assert_eq!(config.backends[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(config.backends[0].splice_after, DEFAULT_SPLICE_AFTER);
    }

    /// Two backends of `per_backend` servers each.
    fn with_servers(per_backend: usize) -> String {
        let mut text = String::from(
            "[[frontends]]\nname = \"f\"\nlisten = [\"127.0.0.1:2525\"]\nbackend = \"a\"\n",
        );
        for backend in ["a", "b"] {
            text.push_str(&format!("[[backends]]\nname = \"{backend}\"\n"));
            for i in 0..per_backend {
                text.push_str(&format!(
                    "[[backends.servers]]\nname = \"s{i}\"\naddress = \"127.0.0.1:{}\"\n",
                    1000 + i
                ));
            }
        }
        text
    }

    #[test]
    fn more_servers_than_run_can_publish_are_an_error_at_the_first_one_too_many() {
        parse(&with_servers(MAX_SERVERS / 2)).expect("exactly the maximum is valid");
        let message = error(&with_servers(550));
        assert!(message.contains("more than 1024 servers"), "{message}");
        // Backend `a` holds 550 (3 lines each, after 4 lines of frontend and 2 of its
        // header); the 1025th server is b's 475th, named s474.
        let line = 4 + 2 + 550 * 3 + 2 + 474 * 3 + 2;
        assert!(
            message.contains(&format!("kgate.toml:{line}:")),
            "{message}"
        );
    }

    #[test]
    fn more_frontends_than_the_programs_count_are_an_error_at_the_first_one_too_many() {
        let with_frontends = |n: usize| {
            let mut text = String::new();
            for i in 0..n {
                text.push_str(&format!(
                    "[[frontends]]\nname = \"f{i}\"\nlisten = [\"127.0.0.1:{}\"]\nbackend = \"b\"\n",
                    10_000 + i
                ));
            }
            text + "[[backends]]\nname = \"b\"\n[[backends.servers]]\nname = \"s\"\n\
                    address = \"127.0.0.1:25\"\n"
        };
        parse(&with_frontends(MAX_FRONTENDS)).expect("exactly the maximum is valid");
        let message = error(&with_frontends(MAX_FRONTENDS + 1));
        assert!(message.contains("more than 256 frontends"), "{message}");
        // Four lines each: the 257th frontend's name is on line 256 * 4 + 2.
        let line = MAX_FRONTENDS * 4 + 2;
        assert!(
            message.contains(&format!("kgate.toml:{line}:")),
            "{message}"
        );
    }

    #[test]
    fn more_listen_addresses_than_the_xdp_program_knows_are_an_error_with_xdp_only() {
        let addresses: Vec<String> = (0..=MAX_FRONTEND_ADDRESSES)
            .map(|i| format!("\"127.0.0.1:{}\"", 10_000 + i))
            .collect();
        let text = format!(
            "[[frontends]]\nname = \"f\"\nlisten = [{}]\nbackend = \"b\"\n\
             [[backends]]\nname = \"b\"\n[[backends.servers]]\nname = \"s\"\n\
             address = \"127.0.0.1:25\"\n",
            addresses.join(", ")
        );
        parse(&text).expect("without [xdp] the addresses take no map slot");
        let message = error(&format!("{text}[xdp]\ninterfaces = [\"eth0\"]\n"));
        assert!(
            message.contains("more than 1024 listen addresses"),
            "{message}"
        );
        assert!(message.contains("kgate.toml:3:"), "{message}");
    }

    #[test]
    fn queue_limit_is_between_one_skb_and_what_a_send_buffer_can_be_set_to() {
        let with = |limit: &str| {
            GOOD.replace(
                "splice_after",
                &format!("queue_limit = \"{limit}\"\nsplice_after"),
            )
        };
        assert_eq!(
            parse(&with("256MiB")).unwrap().backends[0].queue_limit,
            256 << 20
        );
        assert!(error(&with("32KiB")).contains("too small"));
        let message = error(&with("1GiB"));
        assert!(
            message.contains("too large: give at most 256.0 MiB"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_at_its_line() {
        let text = GOOD.replace("dataplane = \"userspace\"", "dataplan = \"userspace\"");
        let message = error(&text);
        assert!(
            message.starts_with("kgate.toml:4:1: unknown field `dataplan`"),
            "{message}"
        );
        assert!(message.contains("expected one of"), "{message}");
    }

    #[test]
    fn a_bad_listen_address_names_the_line_and_the_expected_form() {
        let text = GOOD.replace("\"10.0.20.1:25\"", "\"10.0.20.1\"");
        let message = error(&text);
        assert!(message.starts_with("kgate.toml:8:"), "{message}");
        assert!(
            message.contains("`10.0.20.1` is not an address with a port"),
            "{message}"
        );
        assert!(message.contains("\"192.0.2.1:25\""), "{message}");
    }

    #[test]
    fn a_frontend_naming_a_missing_backend_is_an_error() {
        let text = GOOD.replace("backend = \"mail-smtp\"", "backend = \"mail-smpt\"");
        let message = error(&text);
        assert!(message.starts_with("kgate.toml:9:11: "), "{message}");
        assert!(
            message.contains("`mail-smpt`, which is not defined"),
            "{message}"
        );
        assert!(message.contains("`mail-smtp`"), "{message}");
    }

    #[test]
    fn addresses_durations_and_their_slips_get_messages_that_say_the_fix() {
        let message = |listen: &str, interval: &str| {
            let text = format!(
                "[[frontends]]\nname = \"f\"\nlisten = [{listen}]\nbackend = \"b\"\n\
                 [[backends]]\nname = \"b\"\n[backends.health]\ncheck = \"tcp\"\n\
                 interval = {interval}\n[[backends.servers]]\nname = \"s\"\n\
                 address = \"127.0.0.1:25\"\n"
            );
            Config::parse(&text, Path::new("k.toml"))
                .unwrap_err()
                .to_string()
        };
        let m = message("\"127.0.0.1:70000\"", "\"2s\"");
        assert!(m.contains("port 70000 is over 65535"), "{m}");
        let m = message("\"mail.example.org:25\"", "\"2s\"");
        assert!(m.contains("names a host"), "{m}");
        let m = message("\"127.0.0.1:25\"", "1");
        assert!(m.contains("`1` has no unit: write \"1s\""), "{m}");
        let m = message("\"127.0.0.1:25\"", "\"0s\"");
        assert!(m.contains("zero is not allowed here"), "{m}");
    }

    #[test]
    fn duplicate_names_are_errors() {
        let servers = GOOD.replace("name = \"node2\"", "name = \"node1\"");
        let message = error(&servers);
        assert!(message.starts_with("kgate.toml:22:8: "), "{message}");
        assert!(message.contains("two servers named `node1`"), "{message}");

        let frontends = format!(
            "{GOOD}\n[[frontends]]\nname = \"smtp\"\nlisten = [\"10.0.20.1:587\"]\nbackend = \"mail-smtp\"\n"
        );
        let message = error(&frontends);
        assert!(message.starts_with("kgate.toml:26:8: "), "{message}");
        assert!(
            message.contains("frontend named `smtp` is defined twice"),
            "{message}"
        );

        let backends = format!(
            "{GOOD}\n[[backends]]\nname = \"mail-smtp\"\n[[backends.servers]]\nname = \"n\"\naddress = \"10.0.0.1:25\"\n"
        );
        let message = error(&backends);
        assert!(message.starts_with("kgate.toml:26:8: "), "{message}");
        assert!(
            message.contains("backend named `mail-smtp` is defined twice"),
            "{message}"
        );
    }

    #[test]
    fn an_empty_server_list_is_an_error() {
        let text = r#"
[[frontends]]
name = "f"
listen = ["127.0.0.1:2525"]
backend = "b"

[[backends]]
name = "b"
"#;
        let message = error(text);
        assert!(message.starts_with("kgate.toml:8:8: "), "{message}");
        assert!(message.contains("backend `b` has no servers"), "{message}");
    }

    #[test]
    fn the_same_listen_address_twice_is_an_error() {
        let text = GOOD.replace("\"[2001:db8::1]:25\"", "\"10.0.20.1:25\"");
        let message = error(&text);
        assert!(message.starts_with("kgate.toml:8:27: "), "{message}");
        assert!(
            message.contains("already a listen address of frontend `smtp`"),
            "{message}"
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for (from, to, expect) in [
            ("\"1500ms\"", "\"soon\"", "is not a duration"),
            ("\"1500ms\"", "\"0s\"", "zero"),
            (
                "proxy_protocol = \"v1\"",
                "proxy_protocol = \"v3\"",
                "unknown variant `v3`",
            ),
            (
                "dataplane = \"userspace\"",
                "dataplane = \"xdp\"",
                "unknown variant `xdp`",
            ),
            (
                "\"/sys/fs/bpf/kgate-x\"",
                "\"kgate-x\"",
                "must be an absolute path",
            ),
            (
                "name = \"node1\"",
                "name = \"node 1\"",
                "server name `node 1` is not usable",
            ),
            (
                "\"10.0.20.101:30125\"",
                "\"0.0.0.0:30125\"",
                "cannot be connected to",
            ),
            ("\"10.0.20.1:25\"", "\"10.0.20.1:0\"", "has port 0"),
        ] {
            assert!(GOOD.contains(from), "{from}");
            let message = error(&GOOD.replacen(from, to, 1));
            assert!(message.contains(expect), "{to}: {message}");
            assert!(message.starts_with("kgate.toml:"), "{message}");
        }
    }

    #[test]
    fn no_frontend_is_an_error() {
        let message = error("[global]\n");
        assert!(message.contains("no frontend is defined"), "{message}");
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        // The first example of the Configuration section, wherever that section is.
        let example = readme
            .split("\n## Configuration\n")
            .nth(1)
            .and_then(|section| section.split("```toml\n").nth(1))
            .and_then(|rest| rest.split("```").next())
            .expect("README.md's Configuration section has a ```toml example");
        let config = parse(example).unwrap();
        assert_eq!(config.frontends[0].name, "smtp");
    }

    #[test]
    fn freebind_is_off_unless_set_and_a_frontend_overrides_the_global_default() {
        let text = |global: &str, frontend: &str| {
            format!(
                "[global]\n{global}\n[[frontends]]\nname = \"a\"\nlisten = [\"10.0.20.1:25\"]\n\
                 backend = \"b\"\n{frontend}\n[[frontends]]\nname = \"c\"\n\
                 listen = [\"10.0.20.1:587\"]\nbackend = \"b\"\n[[backends]]\nname = \"b\"\n\
                 [[backends.servers]]\nname = \"s\"\naddress = \"127.0.0.1:25\"\n"
            )
        };
        let freebind =
            |config: Config| -> Vec<bool> { config.frontends.iter().map(|f| f.freebind).collect() };
        assert_eq!(freebind(parse(&text("", "")).unwrap()), [false, false]);
        assert_eq!(
            freebind(parse(&text("", "freebind = true")).unwrap()),
            [true, false]
        );
        assert_eq!(
            freebind(parse(&text("freebind = true", "")).unwrap()),
            [true, true]
        );
        assert_eq!(
            freebind(parse(&text("freebind = true", "freebind = false")).unwrap()),
            [false, true]
        );
        let error = error(&text("", "freebind = \"yes\""));
        assert!(error.contains("kgate.toml:7:12:"), "{error}");
        assert!(error.contains("invalid type"), "{error}");
    }

    #[test]
    fn log_connections_is_on_unless_off_and_a_frontend_overrides_the_global_default() {
        let text = |global: &str, frontend: &str| {
            format!(
                "[global]\n{global}\n[[frontends]]\nname = \"a\"\nlisten = [\"10.0.20.1:25\"]\n\
                 backend = \"b\"\n{frontend}\n[[frontends]]\nname = \"c\"\n\
                 listen = [\"10.0.20.1:587\"]\nbackend = \"b\"\n[[backends]]\nname = \"b\"\n\
                 [[backends.servers]]\nname = \"s\"\naddress = \"127.0.0.1:25\"\n"
            )
        };
        let logged = |config: Config| -> Vec<bool> {
            config.frontends.iter().map(|f| f.log_connections).collect()
        };
        assert_eq!(logged(parse(&text("", "")).unwrap()), [true, true]);
        assert_eq!(
            logged(parse(&text("", "log_connections = false")).unwrap()),
            [false, true]
        );
        assert_eq!(
            logged(parse(&text("log_connections = false", "")).unwrap()),
            [false, false]
        );
        assert_eq!(
            logged(parse(&text("log_connections = false", "log_connections = true")).unwrap()),
            [true, false]
        );
    }

    #[test]
    fn a_key_set_twice_is_named() {
        let twice = GOOD.replacen(
            "dataplane = \"userspace\"",
            "dataplane = \"userspace\"\ndataplane = \"sockmap\"",
            1,
        );
        assert_eq!(
            error(&twice),
            "kgate.toml:5:1: `dataplane` is set twice in the same table: keep one of the two \
             (or, for a second section, start it with its own [[...]] header)"
        );
    }

    #[test]
    fn numbers_out_of_range_say_the_range() {
        let server = "address = \"10.0.20.101:30125\"";
        let backend = "splice_after = \"0s\"";
        let frontend = "backend = \"mail-smtp\"";
        for (after, key, expect) in [
            (
                frontend,
                "max_connections = 5000000000",
                "kgate.toml:10:19: max_connections = 5000000000 is out of range: give 1 to \
                 4294967295, or leave the key out for no limit",
            ),
            (
                frontend,
                "max_connections_per_source = -1",
                "kgate.toml:10:30: max_connections_per_source = -1 is out of range: give 1 to \
                 4294967295, or leave the key out for no limit",
            ),
            (
                server,
                "max_connections = 4294967296",
                "kgate.toml:20:19: max_connections = 4294967296 is out of range",
            ),
            (
                backend,
                "retries = -1",
                "kgate.toml:16:11: retries = -1 is out of range: give 0 (the first server only) \
                 to 4294967295",
            ),
            (
                server,
                "weight = 5000000000",
                "kgate.toml:20:10: weight 5000000000 is out of range: give 1 to 256",
            ),
            (
                backend,
                "[backends.health]\ncheck = \"tcp\"\nrise = 0",
                "kgate.toml:18:8: rise = 0 is out of range: give 1 to 4294967295 checks in a row",
            ),
            (
                backend,
                "[backends.health]\ncheck = \"tcp\"\nfall = 99999999999",
                "kgate.toml:18:8: fall = 99999999999 is out of range: give 1 to 4294967295",
            ),
            (
                backend,
                "[backends.health]\ncheck = \"tcp\"\nport = 70000",
                "kgate.toml:18:8: port 70000 is out of range: give 1 to 65535",
            ),
        ] {
            assert!(GOOD.contains(after), "{after}");
            let message = error(&GOOD.replacen(after, &format!("{after}\n{key}"), 1));
            assert!(message.starts_with(expect), "{key}: {message}");
            assert!(!message.contains("expected u"), "{key}: {message}");
        }
    }

    #[test]
    fn a_file_that_cannot_be_read_says_why_once_and_what_to_do() {
        let missing = Path::new("/nonexistent/kgate.toml");
        let message = format!(
            "{:#}",
            anyhow::Error::from(Config::load(missing).unwrap_err())
        );
        assert_eq!(
            message,
            "/nonexistent/kgate.toml: cannot read the configuration: No such file or directory \
             (os error 2); give the file with -c FILE (the Debian package's example is \
             /usr/share/doc/kgate/examples/kgate.toml)"
        );
    }

    #[test]
    fn listening_on_every_address_takes_any_address() {
        for wildcard in ["0.0.0.0:25", "[::]:25"] {
            let text = GOOD.replacen("\"10.0.20.1:25\"", &format!("\"{wildcard}\""), 1);
            let message = error(&text);
            assert!(
                message.starts_with(&format!(
                    "kgate.toml:8:11: `{wildcard}` listens on every address of this host, not \
                     one: give the address clients connect to (\"192.0.2.1:25\"), or set \
                     `any_address = true` in frontend `smtp`"
                )),
                "{message}"
            );
            let allowed = text.replacen(
                "backend = \"mail-smtp\"",
                "backend = \"mail-smtp\"\nany_address = true",
                1,
            );
            let config = parse(&allowed).unwrap();
            assert_eq!(config.frontends[0].listen[0], wildcard.parse().unwrap());
        }
        let needless = GOOD.replacen(
            "backend = \"mail-smtp\"",
            "backend = \"mail-smtp\"\nany_address = true",
            1,
        );
        assert!(
            error(&needless).starts_with(
                "kgate.toml:10:15: frontend `smtp` sets `any_address` but listens on no 0.0.0.0 \
                 or [::] address: remove the key"
            ),
            "{}",
            error(&needless)
        );
    }

    #[test]
    fn lines_and_columns_count_from_one() {
        assert_eq!(line_column("ab\ncd", 0), (1, 1));
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab\n", 3), (2, 1));
    }

    /// GOOD with `keys` after the frontend's `backend` line (line 9): they start on line 10.
    fn frontend_with(keys: &str) -> String {
        GOOD.replacen(
            "backend = \"mail-smtp\"\n",
            &format!("backend = \"mail-smtp\"\n{keys}\n"),
            1,
        )
    }

    #[test]
    fn accept_proxy_takes_trusted_sources_and_a_timeout() {
        let config = parse(&frontend_with(
            "accept_proxy = true\ntrusted_sources = [\"10.0.30.0/24\", \"2001:db8:30::1\"]\n\
             accept_proxy_timeout = \"2s\"",
        ))
        .unwrap();
        let accept = config.frontends[0].accept_proxy.as_ref().unwrap();
        let sources: Vec<String> = accept
            .trusted_sources
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(sources, ["10.0.30.0/24", "2001:db8:30::1/128"]);
        assert_eq!(accept.timeout, Duration::from_secs(2));
        let config = parse(&frontend_with(
            "accept_proxy = true\ntrusted_sources = [\"10.0.30.0/24\"]",
        ))
        .unwrap();
        assert_eq!(
            config.frontends[0].accept_proxy.as_ref().unwrap().timeout,
            Duration::from_secs(5)
        );
        assert_eq!(parse(GOOD).unwrap().frontends[0].accept_proxy, None);
        let off = parse(&frontend_with("accept_proxy = false")).unwrap();
        assert_eq!(off.frontends[0].accept_proxy, None);
    }

    #[test]
    fn accept_proxy_errors_name_the_line_and_what_to_write() {
        for (keys, at, expect) in [
            (
                "accept_proxy = true",
                "kgate.toml:10:16: ",
                "add trusted_sources",
            ),
            (
                "accept_proxy = true\ntrusted_sources = []",
                "kgate.toml:11:19: ",
                "trusted_sources is empty",
            ),
            (
                "accept_proxy = true\ntrusted_sources = [\"10.0.30.0/24\", \"lb.example\"]",
                "kgate.toml:11:36: ",
                "`lb.example` is not an IP prefix",
            ),
            (
                "accept_proxy = true\ntrusted_sources = [\"10.0.30.1/24\"]",
                "kgate.toml:11:20: ",
                "did you mean \"10.0.30.0/24\"",
            ),
            (
                "trusted_sources = [\"10.0.30.0/24\"]",
                "kgate.toml:10:19: ",
                "add `accept_proxy = true`",
            ),
            (
                "accept_proxy_timeout = \"2s\"",
                "kgate.toml:10:24: ",
                "add `accept_proxy = true`",
            ),
            (
                "accept_proxy = true\ntrusted_sources = [\"10.0.0.0/8\"]\naccept_proxy_timeout = \"0s\"",
                "kgate.toml:12:24: ",
                "of zero",
            ),
            (
                "accept_proxy = true\ntrusted_sources = [\"10.0.0.0/8\"]\naccept_proxy_timeout = \"soon\"",
                "kgate.toml:12:24: ",
                "is not a duration",
            ),
            (
                "accept_proxy = \"yes\"",
                "kgate.toml:10:16: ",
                "expected a boolean",
            ),
        ] {
            let message = error(&frontend_with(keys));
            assert!(message.starts_with(at), "{keys}: {message}");
            assert!(message.contains(expect), "{keys}: {message}");
        }
    }
}
