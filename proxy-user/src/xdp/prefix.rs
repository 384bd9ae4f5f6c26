//! IP prefixes as operators write them: `192.0.2.0/24`, `2001:db8::/32`, or an address
//! alone for a single host.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

/// An IPv4 or IPv6 prefix with no bit set past its length. IPv4-mapped IPv6 prefixes
/// (`::ffff:192.0.2.0/120`) become the IPv4 prefix they mean: that is how such a
/// client's packets arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error(
        "`{0}` is not an IP prefix: write it like 192.0.2.0/24, 2001:db8::/32, or an address alone"
    )]
    Syntax(String),
    #[error("`{text}`: /{len} is longer than an {family} address (at most /{max})")]
    TooLong {
        text: String,
        len: u32,
        family: &'static str,
        max: u8,
    },
    #[error("`{text}` has bits set past its /{len}: did you mean {suggestion}?")]
    HostBits {
        text: String,
        len: u8,
        suggestion: Prefix,
    },
}

impl Prefix {
    /// `addr/len`, refused when `len` is too long or `addr` has bits set past it.
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let text = format!("{addr}/{len}");
        let max = max_len(addr);
        if len > max {
            return Err(PrefixError::TooLong {
                text,
                len: len.into(),
                family: family(addr),
                max,
            });
        }
        let prefix = Prefix::truncating(addr, len);
        if prefix.addr != addr {
            return Err(PrefixError::HostBits {
                text,
                len,
                suggestion: prefix,
            });
        }
        Ok(prefix.unmapped())
    }

    /// `addr/len` as read back from a map key: bits past `len` are ignored.
    pub fn masked(addr: IpAddr, len: u32) -> Prefix {
        Prefix::truncating(addr, u8::try_from(len).unwrap_or(u8::MAX))
    }

    /// `addr` with the bits past `len` cleared; `len` at most the address length.
    fn truncating(addr: IpAddr, len: u8) -> Prefix {
        let len = len.min(max_len(addr));
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Prefix { addr, len }
    }

    /// `::ffff:a.b.c.d/96+n` -> `a.b.c.d/n`.
    fn unmapped(self) -> Prefix {
        match self.addr {
            IpAddr::V6(a) if self.len >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => Prefix {
                    addr: IpAddr::V4(v4),
                    len: self.len - 96,
                },
                None => self,
            },
            _ => self,
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn len(&self) -> u8 {
        self.len
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

impl FromStr for Prefix {
    type Err = PrefixError;

    fn from_str(text: &str) -> Result<Prefix, PrefixError> {
        let syntax = || PrefixError::Syntax(text.to_owned());
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let len = match len {
            None => max_len(addr),
            Some(len) if !len.is_empty() && len.bytes().all(|b| b.is_ascii_digit()) => {
                let len: u32 = len.parse().unwrap_or(u32::MAX);
                u8::try_from(len)
                    .ok()
                    .filter(|&l| l <= max_len(addr))
                    .ok_or(PrefixError::TooLong {
                        text: text.to_owned(),
                        len,
                        family: family(addr),
                        max: max_len(addr),
                    })?
            }
            Some(_) => return Err(syntax()),
        };
        Prefix::new(addr, len).map_err(|e| match e {
            PrefixError::HostBits {
                len, suggestion, ..
            } => PrefixError::HostBits {
                text: text.to_owned(),
                len,
                suggestion,
            },
            other => other,
        })
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Prefix {
        text.parse().unwrap()
    }

    fn error(text: &str) -> String {
        text.parse::<Prefix>().unwrap_err().to_string()
    }

    #[test]
    fn prefixes_and_single_addresses_parse() {
        assert_eq!(p("192.0.2.0/24").to_string(), "192.0.2.0/24");
        assert_eq!(p("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(p("2001:db8::1").to_string(), "2001:db8::1/128");
        assert_eq!(p("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(p("::/0").to_string(), "::/0");
    }

    #[test]
    fn ipv4_mapped_prefixes_become_ipv4() {
        assert_eq!(p("::ffff:192.0.2.0/120").to_string(), "192.0.2.0/24");
        assert_eq!(p("::ffff:192.0.2.1").to_string(), "192.0.2.1/32");
        // Shorter than /96 it covers more than IPv4-mapped space: stays IPv6.
        assert_eq!(p("::/64").to_string(), "::/64");
    }

    #[test]
    fn bad_prefixes_say_what_is_wrong() {
        assert!(error("example.org").contains("is not an IP prefix"));
        assert!(error("192.0.2.0/").contains("is not an IP prefix"));
        assert!(error("192.0.2.0/x").contains("is not an IP prefix"));
        assert!(error("192.0.2.0/-1").contains("is not an IP prefix"));
        assert_eq!(
            error("192.0.2.0/33"),
            "`192.0.2.0/33`: /33 is longer than an IPv4 address (at most /32)"
        );
        assert!(error("2001:db8::/129").contains("(at most /128)"));
        assert!(error("2001:db8::/4294967296").contains("(at most /128)"));
        assert_eq!(
            error("192.0.2.1/24"),
            "`192.0.2.1/24` has bits set past its /24: did you mean 192.0.2.0/24?"
        );
        assert!(error("2001:db8::1/64").contains("did you mean 2001:db8::/64?"));
    }
}
