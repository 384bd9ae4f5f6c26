//! `[crowdsec]`: kgate as a CrowdSec bouncer, its ban decisions in the XDP blocklist
//! (proxy-user/src/xdp/crowdsec/ runs it).
//!
//! ```toml
//! [crowdsec]
//! url          = "http://127.0.0.1:8080/"      # the local API (LAPI), plain HTTP
//! api_key_file = "/etc/kgate/crowdsec-key"     # or: api_key_env = "CROWDSEC_BOUNCER_KEY"
//! interval     = "10s"                         # default; how often decisions are pulled
//! ```

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

use super::{Located, at};

/// How often decisions are pulled when `interval` is left out (the firewall bouncer's
/// `update_frequency`).
pub const DEFAULT_CROWDSEC_INTERVAL: Duration = Duration::from_secs(10);
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The validated `[crowdsec]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crowdsec {
    /// The LAPI's base URL, `http://host:port/` (a path prefix is kept).
    pub url: http::Uri,
    pub api_key: ApiKey,
    pub interval: Duration,
}

/// Where the bouncer's API key (`cscli bouncers add NAME` prints it) is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiKey {
    /// A file holding the key (surrounding white space is ignored).
    File(PathBuf),
    /// An environment variable of kgate's (systemd `Environment=` or `EnvironmentFile=`).
    Env(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CrowdsecSection {
    url: LapiUrl,
    #[serde(default)]
    api_key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    api_key_env: Option<Spanned<String>>,
    #[serde(default, deserialize_with = "interval")]
    interval: Option<Duration>,
}

impl CrowdsecSection {
    /// `section` is the whole table, for errors about which keys it has.
    pub(super) fn validate(section: Spanned<CrowdsecSection>) -> Result<Crowdsec, Located> {
        let span = section.span();
        let located = |message: &str| Located {
            span: span.clone(),
            message: message.to_owned(),
        };
        let section = section.into_inner();
        let api_key = match (section.api_key_file, section.api_key_env) {
            (Some(file), None) => {
                if !file.get_ref().is_absolute() {
                    return Err(at(
                        &file,
                        "`api_key_file` must be an absolute path, like \"/etc/kgate/crowdsec-key\"",
                    ));
                }
                ApiKey::File(file.into_inner())
            }
            (None, Some(name)) => {
                let valid = !name.get_ref().is_empty()
                    && !name.get_ref().starts_with(|c: char| c.is_ascii_digit())
                    && name
                        .get_ref()
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(at(
                        &name,
                        format!(
                            "`{}` is not an environment variable name: use letters, digits and \
                             `_`, like \"CROWDSEC_BOUNCER_KEY\"",
                            name.get_ref()
                        ),
                    ));
                }
                ApiKey::Env(name.into_inner())
            }
            (None, None) => {
                return Err(located(
                    "[crowdsec] needs the bouncer's API key: set api_key_file (a file holding \
                     the key `cscli bouncers add kgate` printed) or api_key_env (the name of an \
                     environment variable holding it)",
                ));
            }
            (Some(_), Some(env)) => {
                return Err(at(
                    &env,
                    "[crowdsec] has both api_key_file and api_key_env: keep one",
                ));
            }
        };
        Ok(Crowdsec {
            url: section.url.0,
            api_key,
            interval: section.interval.unwrap_or(DEFAULT_CROWDSEC_INTERVAL),
        })
    }
}

/// The LAPI's URL, checked where toml can still point at it.
struct LapiUrl(http::Uri);

impl<'de> Deserialize<'de> for LapiUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let example = "like \"http://127.0.0.1:8080/\" (the LAPI's listen_uri)";
        let uri: http::Uri = text
            .parse()
            .map_err(|_| de::Error::custom(format!("`{text}` is not a URL: write it {example}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(de::Error::custom(format!(
                    "`{text}`: kgate talks plain HTTP to the local API, not https: give the \
                     LAPI's own listen_uri, {example}"
                )));
            }
            _ => {
                return Err(de::Error::custom(format!(
                    "`{text}` is not an http:// URL: write it {example}"
                )));
            }
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(de::Error::custom(format!(
                "`{text}` names no host: write it {example}"
            )));
        }
        if uri.query().is_some() {
            return Err(de::Error::custom(format!(
                "`{text}` has a query: give the LAPI's base URL only, {example}"
            )));
        }
        Ok(LapiUrl(uri))
    }
}

fn interval<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    let duration = humantime::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "`{text}` is not a duration ({e}): write it as \"10s\" or \"1m\""
        ))
    })?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&duration) {
        return Err(de::Error::custom(format!(
            "interval = \"{text}\": pull decisions every 1s to 1h (the default is 10s)"
        )));
    }
    Ok(Some(duration))
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

[xdp]
interfaces = ["eth0"]
"#;

    /// Lines of BASE: the [crowdsec] section starts on line 16.
    fn parse(crowdsec: &str) -> Result<Config, String> {
        Config::parse(&format!("{BASE}\n{crowdsec}"), Path::new("kgate.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn without_a_crowdsec_section_there_is_no_bouncer() {
        assert_eq!(parse("").unwrap().crowdsec, None);
    }

    #[test]
    fn a_full_section_parses_and_the_interval_defaults_to_10s() {
        let config = parse(
            "[crowdsec]\nurl = \"http://127.0.0.1:8080/\"\n\
             api_key_file = \"/etc/kgate/crowdsec-key\"\ninterval = \"30s\"\n",
        )
        .unwrap();
        assert_eq!(
            config.crowdsec,
            Some(Crowdsec {
                url: "http://127.0.0.1:8080/".parse().unwrap(),
                api_key: ApiKey::File("/etc/kgate/crowdsec-key".into()),
                interval: Duration::from_secs(30),
            })
        );
        let config = parse(
            "[crowdsec]\nurl = \"http://[::1]:8080\"\napi_key_env = \"CROWDSEC_BOUNCER_KEY\"\n",
        )
        .unwrap()
        .crowdsec
        .unwrap();
        assert_eq!(config.api_key, ApiKey::Env("CROWDSEC_BOUNCER_KEY".into()));
        assert_eq!(config.interval, DEFAULT_CROWDSEC_INTERVAL);
    }

    #[test]
    fn errors_name_the_line_the_column_and_what_to_change() {
        let key = "api_key_file = \"/k\"\n";
        for (section, expected) in [
            (
                format!("[crowdsec]\nurl = \"https://127.0.0.1:8080/\"\n{key}"),
                "kgate.toml:17:7: `https://127.0.0.1:8080/`: kgate talks plain HTTP",
            ),
            (
                format!("[crowdsec]\nurl = \"127.0.0.1:8080\"\n{key}"),
                "kgate.toml:17:7: `127.0.0.1:8080` is not an http:// URL",
            ),
            (
                format!("[crowdsec]\nurl = \"http://\"\n{key}"),
                "kgate.toml:17:7: `http://` is not a URL",
            ),
            (
                format!("[crowdsec]\nurl = \"http://lapi:8080/?x=1\"\n{key}"),
                "kgate.toml:17:7: `http://lapi:8080/?x=1` has a query",
            ),
            (
                "[crowdsec]\nurl = \"http://127.0.0.1:8080/\"\n".to_owned(),
                "kgate.toml:16:1: [crowdsec] needs the bouncer's API key",
            ),
            (
                format!("[crowdsec]\nurl = \"http://l/\"\n{key}api_key_env = \"K\"\n"),
                "kgate.toml:19:15: [crowdsec] has both api_key_file and api_key_env",
            ),
            (
                "[crowdsec]\nurl = \"http://l/\"\napi_key_file = \"key\"\n".to_owned(),
                "kgate.toml:18:16: `api_key_file` must be an absolute path",
            ),
            (
                "[crowdsec]\nurl = \"http://l/\"\napi_key_env = \"MY-KEY\"\n".to_owned(),
                "kgate.toml:18:15: `MY-KEY` is not an environment variable name",
            ),
            (
                format!("[crowdsec]\nurl = \"http://l/\"\n{key}interval = \"100ms\"\n"),
                "kgate.toml:19:12: interval = \"100ms\": pull decisions every 1s to 1h",
            ),
            (
                format!("[crowdsec]\nurl = \"http://l/\"\n{key}interval = \"often\"\n"),
                "kgate.toml:19:12: `often` is not a duration",
            ),
            (
                format!("[crowdsec]\nurl = \"http://l/\"\n{key}api_key = \"x\"\n"),
                "kgate.toml:19:1: unknown field `api_key`",
            ),
        ] {
            let message = parse(&section).expect_err(&section);
            assert!(
                message.starts_with(expected),
                "{section:?}: expected {expected:?}, got {message:?}"
            );
        }
    }

    #[test]
    fn crowdsec_without_xdp_is_an_error_at_the_section() {
        let text = BASE.replace("[xdp]\ninterfaces = [\"eth0\"]\n", "");
        let message = Config::parse(
            &format!("{text}\n[crowdsec]\nurl = \"http://l/\"\napi_key_env = \"K\"\n"),
            Path::new("kgate.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            message.starts_with("kgate.toml:14:1: [crowdsec] puts its bans in the XDP blocklist"),
            "{message}"
        );
    }
}
