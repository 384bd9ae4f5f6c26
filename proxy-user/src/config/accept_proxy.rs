//! `accept_proxy` on a frontend: its clients come through another proxy (a load
//! balancer, an HAProxy in front) that opens each connection with a PROXY header
//! naming the real client (proxy-user/src/accept_proxy.rs reads it).
//!
//! ```toml
//! [[frontends]]
//! accept_proxy         = true
//! trusted_sources      = ["10.0.30.0/24", "2001:db8:30::/64"]   # required with it
//! accept_proxy_timeout = "5s"                                   # default
//! ```

use std::{net::IpAddr, time::Duration};

use ipnet::IpNet;
use toml::Spanned;

use super::{Located, at};

/// How long a trusted proxy has to send the whole header by default. It writes the
/// header as soon as it has connected, so a few seconds is plenty.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The validated settings of a frontend that accepts PROXY headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptProxy {
    /// Only connections from these prefixes may send a header; others are closed.
    pub trusted_sources: Vec<IpNet>,
    /// The whole header must arrive within this time.
    pub timeout: Duration,
}

impl AcceptProxy {
    /// Whether `peer` (the address the connection really comes from) may send a header.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_sources.iter().any(|net| net.contains(&peer))
    }
}

/// The keys as written in a `[[frontends]]` section (its fields there: serde cannot
/// flatten them into a section that denies unknown keys).
pub(super) struct AcceptProxyKeys {
    pub accept_proxy: Option<Spanned<bool>>,
    pub trusted_sources: Option<Spanned<Vec<Spanned<String>>>>,
    pub accept_proxy_timeout: Option<Spanned<String>>,
}

impl AcceptProxyKeys {
    pub(super) fn validate(self, frontend: &str) -> Result<Option<AcceptProxy>, Located> {
        let enabled = self.accept_proxy.as_ref().is_some_and(|a| *a.get_ref());
        if !enabled {
            if let Some(trusted) = &self.trusted_sources {
                return Err(at(
                    trusted,
                    format!(
                        "frontend `{frontend}` has trusted_sources but does not accept PROXY \
                         headers: add `accept_proxy = true`, or remove trusted_sources"
                    ),
                ));
            }
            if let Some(timeout) = &self.accept_proxy_timeout {
                return Err(at(
                    timeout,
                    format!(
                        "frontend `{frontend}` has accept_proxy_timeout but does not accept \
                         PROXY headers: add `accept_proxy = true`, or remove the timeout"
                    ),
                ));
            }
            return Ok(None);
        }
        let accept = self.accept_proxy.expect("enabled, so present");
        let Some(trusted) = self.trusted_sources else {
            return Err(at(
                &accept,
                format!(
                    "frontend `{frontend}` accepts PROXY headers from anyone: add \
                     trusted_sources with the prefixes of the proxies in front of it, like \
                     trusted_sources = [\"10.0.30.0/24\"] (anyone else could claim any address)"
                ),
            ));
        };
        if trusted.get_ref().is_empty() {
            return Err(at(
                &trusted,
                "trusted_sources is empty, so every connection would be refused: list the \
                 prefixes of the proxies in front of this frontend, like [\"10.0.30.0/24\"]",
            ));
        }
        let mut trusted_sources = Vec::new();
        for text in trusted.get_ref() {
            trusted_sources.push(prefix(text.get_ref()).map_err(|message| at(text, message))?);
        }
        let timeout = match &self.accept_proxy_timeout {
            None => DEFAULT_TIMEOUT,
            Some(text) => match humantime::parse_duration(text.get_ref()) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    return Err(at(
                        text,
                        "an accept_proxy_timeout of zero would refuse every client: give \
                         the time a proxy has to send its header, like \"5s\"",
                    ));
                }
                Err(e) => {
                    return Err(at(
                        text,
                        format!(
                            "`{}` is not a duration ({e}): write it as \"500ms\" or \"5s\"",
                            text.get_ref()
                        ),
                    ));
                }
            },
        };
        Ok(Some(AcceptProxy {
            trusted_sources,
            timeout,
        }))
    }
}

/// `10.0.30.0/24`, `2001:db8::/64`, or an address alone for one host. An IPv4-mapped
/// IPv6 prefix becomes the IPv4 prefix it means: clients are matched unmapped.
fn prefix(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match text.parse::<IpAddr>() {
            Ok(addr) => IpNet::from(addr),
            Err(_) => {
                return Err(format!(
                    "`{text}` is not an IP prefix: write it like \"10.0.30.0/24\", \
                     \"2001:db8::/64\", or an address alone"
                ));
            }
        },
    };
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has bits set past its /{}: did you mean \"{}\"?",
            net.prefix_len(),
            net.trunc()
        ));
    }
    Ok(match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
                .expect("a mapped prefix of /96 or more is a valid IPv4 prefix"),
            None => net,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_match_unmapped_clients() {
        assert_eq!(prefix("10.0.30.0/24").unwrap().to_string(), "10.0.30.0/24");
        assert_eq!(prefix("10.0.30.7").unwrap().to_string(), "10.0.30.7/32");
        assert_eq!(
            prefix("2001:db8::/64").unwrap().to_string(),
            "2001:db8::/64"
        );
        assert_eq!(
            prefix("::ffff:10.0.30.0/120").unwrap().to_string(),
            "10.0.30.0/24"
        );
        let accept = AcceptProxy {
            trusted_sources: vec![prefix("10.0.30.0/24").unwrap()],
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(accept.trusts("10.0.30.9".parse().unwrap()));
        assert!(accept.trusts("::ffff:10.0.30.9".parse().unwrap()));
        assert!(!accept.trusts("10.0.31.9".parse().unwrap()));
        assert!(!accept.trusts("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn bad_prefixes_say_what_to_write() {
        assert!(
            prefix("lb.example")
                .unwrap_err()
                .contains("is not an IP prefix")
        );
        assert!(
            prefix("10.0.30.0/33")
                .unwrap_err()
                .contains("is not an IP prefix")
        );
        assert_eq!(
            prefix("10.0.30.1/24").unwrap_err(),
            "`10.0.30.1/24` has bits set past its /24: did you mean \"10.0.30.0/24\"?"
        );
    }
}
