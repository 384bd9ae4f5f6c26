//! `kgate block add|del|list`: the XDP blocklists, edited in their pinned maps.
//!
//! The maps are the running kgate's own (pinned under `bpf_pin_path`), so a change
//! applies to the next packet; they stay pinned when kgate stops, so the command also
//! works between runs (see proxy-user/src/xdp/mod.rs).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use proxy_common::xdp::{BlockEntry, ORIGIN_COMMAND, ORIGIN_CROWDSEC, ORIGIN_FILE};

use crate::{
    config::{Config, DEFAULT_PIN_PATH},
    maps::Blocklist,
    xdp::{self, Prefix},
};

#[derive(Subcommand)]
pub enum BlockCommand {
    /// Blocks a source prefix: its packets to the frontends are dropped by XDP. An
    /// address alone blocks that host. Adding a listed prefix again replaces its expiry.
    ///
    /// Example: kgate block add 192.0.2.0/24
    ///
    /// Example: kgate block add 2001:db8:bad::/48 --expires 1h
    Add {
        /// An IPv4 or IPv6 prefix, like 192.0.2.0/24, or an address.
        #[arg(value_parser = parse_prefix)]
        prefix: Prefix,
        /// Removes the block after this long, like 30m, 1h or 7d (default: never).
        #[arg(long, value_parser = parse_expiry)]
        expires: Option<Duration>,
        #[command(flatten)]
        maps: MapsLocation,
    },
    /// Removes a prefix, exactly as it was added.
    ///
    /// Example: kgate block del 192.0.2.0/24
    Del {
        /// The prefix, as `kgate block list` shows it.
        #[arg(value_parser = parse_prefix)]
        prefix: Prefix,
        #[command(flatten)]
        maps: MapsLocation,
    },
    /// Lists the blocked prefixes, their expiry and where they came from.
    ///
    /// Example: kgate block list
    List {
        #[command(flatten)]
        maps: MapsLocation,
    },
}

/// Where the blocklists are pinned.
#[derive(Args)]
pub struct MapsLocation {
    /// The configuration file, for `bpf_pin_path`.
    #[arg(short, long, default_value = "/etc/kgate/kgate.toml")]
    config: PathBuf,
    /// Where the maps are pinned (instead of the configuration's `bpf_pin_path`).
    #[arg(long)]
    pin_path: Option<PathBuf>,
}

pub fn block(command: BlockCommand) -> anyhow::Result<()> {
    match command {
        BlockCommand::Add {
            prefix,
            expires,
            maps,
        } => {
            let blocklist = open(&maps)?;
            let expires_at = expires.map_or(0, xdp::expires_after);
            blocklist
                .insert(
                    &prefix,
                    BlockEntry::new(prefix.len(), expires_at, ORIGIN_COMMAND),
                )
                .with_context(|| format!("adding {prefix} to the blocklist"))?;
            match expires {
                Some(after) => {
                    println!("blocked {prefix} for {}", humantime::format_duration(after))
                }
                None => println!("blocked {prefix} until `kgate block del {prefix}`"),
            }
        }
        BlockCommand::Del { prefix, maps } => {
            let blocklist = open(&maps)?;
            let entry = blocklist
                .get(&prefix)
                .with_context(|| format!("reading {prefix} in the blocklist"))?;
            let removed = blocklist
                .remove(&prefix)
                .with_context(|| format!("removing {prefix} from the blocklist"))?;
            if !removed {
                bail!(
                    "{prefix} is not in the blocklist: `kgate block list` shows what is (a \
                     prefix is removed exactly as it was added)"
                );
            }
            println!("unblocked {prefix}");
            match entry.map(|e| e.origin) {
                Some(ORIGIN_FILE) => println!(
                    "note: {prefix} is in the blocklist file and comes back when kgate starts \
                     or reloads: remove it from the file too"
                ),
                Some(ORIGIN_CROWDSEC) => println!(
                    "note: {prefix} was banned by a CrowdSec decision and comes back at the \
                     bouncer's next pull: delete the decision (`cscli decisions delete --ip \
                     ADDRESS` or `--range PREFIX`) instead"
                ),
                _ => {}
            }
        }
        BlockCommand::List { maps } => {
            let blocklist = open(&maps)?;
            let entries = blocklist.entries().context("reading the blocklist")?;
            print!("{}", table(entries, xdp::boot_seconds()));
        }
    }
    Ok(())
}

fn open(location: &MapsLocation) -> anyhow::Result<Blocklist> {
    let pin_path =
        match &location.pin_path {
            Some(path) => path.clone(),
            None => Config::load(&location.config)
                .with_context(|| {
                    format!(
                        "the blocklists are pinned under the configuration's bpf_pin_path (default \
                     {DEFAULT_PIN_PATH}): give the file with -c, or the directory with --pin-path"
                    )
                })?
                .global
                .bpf_pin_path,
        };
    Blocklist::open_pinned(&pin_path).with_context(|| not_pinned_hint(&pin_path))
}

fn not_pinned_hint(pin_path: &Path) -> String {
    format!(
        "no blocklist under {}: kgate has not run with an [xdp] section since the machine \
         started (or with another bpf_pin_path); start it, or put the prefix in the blocklist \
         file. Are you root?",
        pin_path.display()
    )
}

fn parse_prefix(text: &str) -> Result<Prefix, String> {
    text.parse::<Prefix>().map_err(|e| e.to_string())
}

fn parse_expiry(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}): write it like 30m, 1h or 7d"))?;
    if duration < Duration::from_secs(1) {
        return Err("an expiry under a second would block nothing: give at least 1s".to_owned());
    }
    Ok(duration)
}

/// The entries that still apply, sorted, in aligned columns.
fn table(mut entries: Vec<(Prefix, BlockEntry)>, now: u64) -> String {
    entries.retain(|(_, entry)| entry.applies_at(now));
    if entries.is_empty() {
        return "no blocked prefixes\n".to_owned();
    }
    entries.sort_by_key(|(prefix, _)| *prefix);
    let rows: Vec<[String; 3]> = entries
        .iter()
        .map(|(prefix, entry)| {
            let expires = if entry.expires_at == 0 {
                "never".to_owned()
            } else {
                let left = u64::from(entry.expires_at).saturating_sub(now);
                format!(
                    "in {}",
                    humantime::format_duration(Duration::from_secs(left))
                )
            };
            let origin = match entry.origin {
                ORIGIN_FILE => "file",
                ORIGIN_COMMAND => "command",
                ORIGIN_CROWDSEC => "crowdsec",
                _ => "other",
            };
            [prefix.to_string(), expires, origin.to_owned()]
        })
        .collect();
    let header = ["PREFIX", "EXPIRES", "FROM"].map(str::to_owned);
    let width = |c: usize| {
        rows.iter()
            .map(|r| r[c].len())
            .chain([header[c].len()])
            .max()
            .unwrap_or(0)
    };
    let (w0, w1) = (width(0), width(1));
    let mut out = String::new();
    for row in [&header].into_iter().chain(&rows) {
        out.push_str(&format!("{:<w0$}  {:<w1$}  {}\n", row[0], row[1], row[2]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_what_applies_sorted_with_time_left_and_origin() {
        let p = |s: &str| s.parse::<Prefix>().unwrap();
        let entries = vec![
            (p("2001:db8::/32"), BlockEntry::new(32, 0, ORIGIN_FILE)),
            (
                p("198.51.100.7"),
                BlockEntry::new(32, 1000 + 3600, ORIGIN_COMMAND),
            ),
            (p("192.0.2.0/24"), BlockEntry::new(24, 0, ORIGIN_COMMAND)),
            (
                p("203.0.113.0/24"),
                BlockEntry::new(24, 999, ORIGIN_COMMAND),
            ),
            (
                p("2001:db8:bad::/48"),
                BlockEntry::new(48, 1000 + 4 * 3600 - 5, ORIGIN_CROWDSEC),
            ),
        ];
        assert_eq!(
            table(entries, 1000),
            "PREFIX             EXPIRES        FROM\n\
             192.0.2.0/24       never          command\n\
             198.51.100.7/32    in 1h          command\n\
             2001:db8::/32      never          file\n\
             2001:db8:bad::/48  in 3h 59m 55s  crowdsec\n"
        );
        assert_eq!(table(Vec::new(), 0), "no blocked prefixes\n");
    }

    #[test]
    fn arguments_are_checked_with_a_clear_message() {
        assert!(
            parse_prefix("10.0.0.1/8")
                .unwrap_err()
                .contains("did you mean 10.0.0.0/8?")
        );
        assert!(
            parse_prefix("mail.example")
                .unwrap_err()
                .contains("not an IP prefix")
        );
        assert_eq!(parse_expiry("90m").unwrap(), Duration::from_secs(5400));
        assert!(parse_expiry("soon").unwrap_err().contains("not a duration"));
        assert!(parse_expiry("0s").unwrap_err().contains("at least 1s"));
    }
}
