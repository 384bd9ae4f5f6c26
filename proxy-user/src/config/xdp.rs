//! `[xdp]`: the XDP program that drops blocked sources and SYN floods in the driver,
//! before a socket exists (proxy-user/src/xdp/ runs it).
//!
//! ```toml
//! [xdp]
//! interfaces     = ["eth0"]                 # where clients come in
//! mode           = "auto"                   # auto | native | generic
//! blocklist_file = "/etc/kgate/blocklist"   # optional: one prefix a line
//! syn_rate       = 20                       # optional: SYNs per second per source
//! syn_burst      = 40                       # optional: default syn_rate
//! ```

use std::{collections::HashSet, path::PathBuf};

use proxy_common::xdp::MAX_SYN_RATE;
use serde::Deserialize;
use toml::Spanned;

use super::{Located, at};

/// The validated `[xdp]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct Xdp {
    /// Interfaces the program is attached to.
    pub interfaces: Vec<String>,
    pub mode: XdpMode,
    /// Prefixes blocked from the start (and on every reload), one a line.
    pub blocklist_file: Option<PathBuf>,
    /// `None`: SYNs are not rate limited.
    pub syn_limit: Option<SynLimit>,
}

/// SYNs each source (an IPv4 address, an IPv6 /64) may send to the frontends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynLimit {
    /// Per second, on average.
    pub rate: u32,
    /// At once, after a quiet time.
    pub burst: u32,
}

/// How the program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver where it supports XDP, else in the generic (skb) path.
    #[default]
    Auto,
    /// In the driver, or kgate does not start.
    Native,
    /// In the generic path: works on any interface, costs an skb per packet.
    Generic,
}

/// Linux interface names are at most 15 bytes (IFNAMSIZ with its NUL).
const MAX_IFNAME_LEN: usize = 15;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct XdpSection {
    interfaces: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    mode: XdpMode,
    #[serde(default)]
    blocklist_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    syn_rate: Option<Spanned<i64>>,
    #[serde(default)]
    syn_burst: Option<Spanned<i64>>,
}

impl XdpSection {
    pub(super) fn validate(self) -> Result<Xdp, Located> {
        if self.interfaces.get_ref().is_empty() {
            return Err(at(
                &self.interfaces,
                "[xdp] names no interface: list those clients come in on, like \
                 interfaces = [\"eth0\"], or remove the [xdp] section",
            ));
        }
        let mut seen = HashSet::new();
        let mut interfaces = Vec::new();
        for name in self.interfaces.get_ref() {
            let text = name.get_ref();
            let valid = !text.is_empty()
                && text.len() <= MAX_IFNAME_LEN
                && text != "."
                && text != ".."
                && !text.contains(|c: char| c == '/' || c == ':' || c.is_whitespace());
            if !valid {
                return Err(at(
                    name,
                    format!(
                        "`{text}` cannot be an interface name: names are 1 to \
                         {MAX_IFNAME_LEN} characters without `/`, `:` or spaces (see `ip link`)"
                    ),
                ));
            }
            if !seen.insert(text.clone()) {
                return Err(at(
                    name,
                    format!("interface `{text}` is listed twice in [xdp] interfaces"),
                ));
            }
            interfaces.push(text.clone());
        }
        if let Some(path) = &self.blocklist_file
            && !path.get_ref().is_absolute()
        {
            return Err(at(
                path,
                "`blocklist_file` must be an absolute path, like \"/etc/kgate/blocklist\"",
            ));
        }
        let syn_limit = match (&self.syn_rate, &self.syn_burst) {
            (None, None) => None,
            (None, Some(burst)) => {
                return Err(at(
                    burst,
                    "`syn_burst` needs `syn_rate`: set syn_rate (SYNs per second per source) too",
                ));
            }
            (Some(rate), burst) => {
                let rate_value = check_syn_number(rate, "syn_rate")?;
                let burst = match burst {
                    Some(burst) => check_syn_number(burst, "syn_burst")?,
                    None => rate_value,
                };
                Some(SynLimit {
                    rate: rate_value,
                    burst,
                })
            }
        };
        Ok(Xdp {
            interfaces,
            mode: self.mode,
            blocklist_file: self.blocklist_file.map(Spanned::into_inner),
            syn_limit,
        })
    }
}

fn check_syn_number(value: &Spanned<i64>, key: &str) -> Result<u32, Located> {
    match *value.get_ref() {
        0 => Err(at(
            value,
            format!("{key} = 0 would drop every SYN: leave out `syn_rate` for no limit"),
        )),
        n if n > i64::from(MAX_SYN_RATE) => Err(at(
            value,
            format!("{key} = {n} is more than kgate can count: give at most {MAX_SYN_RATE}"),
        )),
        n if n < 0 => Err(at(
            value,
            format!("{key} = {n} is out of range: give 1 to {MAX_SYN_RATE} SYNs a second"),
        )),
        n => Ok(n as u32),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    const BASE: &str = r#"[[frontends]]
name = "smtp"
listen = ["192.0.2.1:25"]
backend = "mail"

[[backends]]
name = "mail"

[[backends.servers]]
name = "node1"
address = "192.0.2.101:25"
"#;

    /// Lines of BASE: the [xdp] section starts on line 13.
    fn parse(xdp: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}\n{xdp}"), Path::new("kgate.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn without_an_xdp_section_there_is_no_xdp() {
        assert_eq!(parse("").unwrap().xdp, None);
    }

    #[test]
    fn a_full_section_parses_into_typed_values() {
        let config = parse(
            "[xdp]\ninterfaces = [\"eth0\", \"bond0.20\"]\nmode = \"generic\"\n\
             blocklist_file = \"/etc/kgate/blocklist\"\nsyn_rate = 20\nsyn_burst = 50\n",
        )
        .unwrap();
        assert_eq!(
            config.xdp,
            Some(Xdp {
                interfaces: vec!["eth0".into(), "bond0.20".into()],
                mode: XdpMode::Generic,
                blocklist_file: Some("/etc/kgate/blocklist".into()),
                syn_limit: Some(SynLimit {
                    rate: 20,
                    burst: 50
                }),
            })
        );
    }

    #[test]
    fn defaults_are_auto_mode_no_file_no_limit_and_a_burst_of_one_second() {
        let xdp = parse("[xdp]\ninterfaces = [\"eth0\"]\n")
            .unwrap()
            .xdp
            .unwrap();
        assert_eq!(xdp.mode, XdpMode::Auto);
        assert_eq!(xdp.blocklist_file, None);
        assert_eq!(xdp.syn_limit, None);
        let xdp = parse("[xdp]\ninterfaces = [\"eth0\"]\nsyn_rate = 7\n")
            .unwrap()
            .xdp
            .unwrap();
        assert_eq!(xdp.syn_limit, Some(SynLimit { rate: 7, burst: 7 }));
    }

    #[test]
    fn errors_name_the_line_the_column_and_what_to_change() {
        for (section, expected) in [
            (
                "[xdp]\ninterfaces = []\n",
                "kgate.toml:14:14: [xdp] names no interface",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\", \"eth 1\"]\n",
                "kgate.toml:14:23: `eth 1` cannot be an interface name",
            ),
            (
                "[xdp]\ninterfaces = [\"a-very-long-interface\"]\n",
                "kgate.toml:14:15: `a-very-long-interface` cannot be an interface name",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\", \"eth0\"]\n",
                "kgate.toml:14:23: interface `eth0` is listed twice",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nmode = \"offload\"\n",
                "kgate.toml:15:8: unknown variant `offload`",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nblocklist_file = \"blocklist\"\n",
                "kgate.toml:15:18: `blocklist_file` must be an absolute path",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nsyn_rate = 0\n",
                "kgate.toml:15:12: syn_rate = 0 would drop every SYN",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nsyn_rate = 5\nsyn_burst = 2000000\n",
                "kgate.toml:16:13: syn_burst = 2000000 is more than kgate can count",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nsyn_burst = 5\n",
                "kgate.toml:15:13: `syn_burst` needs `syn_rate`",
            ),
            (
                "[xdp]\ninterfaces = [\"eth0\"]\nsyn_rate = -3\n",
                "kgate.toml:15:12: syn_rate = -3 is out of range: give 1 to 1000000 SYNs a second",
            ),
            (
                "[xdp]\ninterface = [\"eth0\"]\n",
                "kgate.toml:14:1: unknown field `interface`",
            ),
        ] {
            let message = parse(section).expect_err(section);
            assert!(
                message.starts_with(expected),
                "{section:?}: expected {expected:?}, got {message:?}"
            );
        }
    }
}
