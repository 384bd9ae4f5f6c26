//! The blocklist file named by `[xdp] blocklist_file`: one prefix a line.
//!
//! ```text
//! # spam sources
//! 192.0.2.0/24
//! 198.51.100.7          # one host
//! 2001:db8:bad::/48
//! ```
//!
//! `#` starts a comment; blank lines are ignored; a prefix listed twice counts once.
//! Any bad line makes the whole file invalid, so a typo never half-applies a list.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use proxy_common::xdp::MAX_BLOCKED_PREFIXES;

use super::prefix::{Prefix, PrefixError};

#[derive(Debug, thiserror::Error)]
pub enum BlocklistFileError {
    // The causes are part of the message, not `source`s: printed with `{:#}`, a
    // source would repeat them.
    #[error("{path}: cannot read the blocklist file: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}:{line}: {error}; fix or remove that line")]
    Invalid {
        path: PathBuf,
        line: usize,
        error: PrefixError,
    },
    #[error(
        "{path}:{line}: more than {MAX_BLOCKED_PREFIXES} {family} prefixes: the blocklist holds \
         that many; merge neighbouring prefixes into shorter ones"
    )]
    TooMany {
        path: PathBuf,
        line: usize,
        family: &'static str,
    },
}

/// Reads and parses the file at `path`.
pub fn read(path: &Path) -> Result<BTreeSet<Prefix>, BlocklistFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| BlocklistFileError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse(&text, path)
}

/// Parses `text`; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<BTreeSet<Prefix>, BlocklistFileError> {
    let mut prefixes = BTreeSet::new();
    let (mut v4, mut v6) = (0, 0);
    for (index, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default().trim();
        if content.is_empty() {
            continue;
        }
        let prefix: Prefix = content
            .parse()
            .map_err(|error| BlocklistFileError::Invalid {
                path: path.to_owned(),
                line: index + 1,
                error,
            })?;
        if !prefixes.insert(prefix) {
            continue;
        }
        // One trie per family, each of MAX_BLOCKED_PREFIXES entries.
        let (count, family) = if prefix.addr().is_ipv4() {
            (&mut v4, "IPv4")
        } else {
            (&mut v6, "IPv6")
        };
        *count += 1;
        if *count > MAX_BLOCKED_PREFIXES {
            return Err(BlocklistFileError::TooMany {
                path: path.to_owned(),
                line: index + 1,
                family,
            });
        }
    }
    Ok(prefixes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<Vec<String>, String> {
        parse(text, Path::new("blocklist"))
            .map(|set| set.iter().map(ToString::to_string).collect())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn more_prefixes_of_a_family_than_its_trie_holds_is_an_error_at_the_first_one_over() {
        let mut text: String = (0..MAX_BLOCKED_PREFIXES as u32)
            .map(|i| format!("{}\n", std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        text.push_str("2001:db8::/32\n10.0.0.0\n");
        assert!(
            parse_text(&text).is_ok(),
            "a full trie of each family, a repeat"
        );
        text.push_str("192.0.2.0/24\n");
        let message = parse_text(&text).unwrap_err();
        assert!(
            message.starts_with(&format!(
                "blocklist:{}: more than",
                MAX_BLOCKED_PREFIXES + 3
            )),
            "{message}"
        );
    }

    #[test]
    fn prefixes_comments_and_blank_lines() {
        let text = "# spam sources\n\n192.0.2.0/24\n  198.51.100.7   # one host\n\
                    2001:db8:bad::/48\n192.0.2.0/24\n";
        assert_eq!(
            parse_text(text).unwrap(),
            ["192.0.2.0/24", "198.51.100.7/32", "2001:db8:bad::/48"]
        );
        assert_eq!(parse_text("").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_bad_line_is_an_error_with_its_number() {
        let message = parse_text("192.0.2.0/24\n\n10.0.0.1/8\n").unwrap_err();
        assert_eq!(
            message,
            "blocklist:3: `10.0.0.1/8` has bits set past its /8: did you mean 10.0.0.0/8?; \
             fix or remove that line"
        );
        let message = parse_text("192.0.2.0/24 198.51.100.0/24\n").unwrap_err();
        assert!(message.starts_with("blocklist:1: `192.0.2.0/24 198.51.100.0/24` is not"));
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let message = read(Path::new("/nonexistent/kgate-blocklist"))
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("/nonexistent/kgate-blocklist: cannot read the blocklist file"),
            "{message}"
        );
    }
}
