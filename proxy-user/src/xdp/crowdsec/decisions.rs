//! What CrowdSec's local API (LAPI) tells a bouncer, and the bans kgate keeps from it.
//!
//! `GET /v1/decisions/stream?startup=true` answers with every active decision under
//! `new`; later pulls (without `startup`) with the decisions made (`new`) and those
//! deleted or expired (`deleted`) since this bouncer's previous pull. The LAPI answers
//! per value, not per decision: measured with Debian's CrowdSec 1.4.6, a second,
//! longer decision on an address comes as `new`, deleting one of two decisions on an
//! address says nothing, and `deleted` names the address once no decision on it is
//! left (with the id of the last one). So bans are kept per prefix: `new` sets the
//! prefix's end (the later end wins), `deleted` lifts the prefix.

use std::{collections::HashMap, time::Duration};

use serde::Deserialize;

use crate::xdp::prefix::{Prefix, PrefixError};

/// One answer of the decision stream. Either list may be `null`.
#[derive(Debug, Default, Deserialize)]
pub struct DecisionStream {
    #[serde(default)]
    pub new: Option<Vec<Decision>>,
    #[serde(default)]
    pub deleted: Option<Vec<Decision>>,
}

/// A decision as the LAPI sends it (fields kgate does not use are ignored).
#[derive(Debug, Deserialize)]
pub struct Decision {
    /// `ban`, `captcha`, ...: kgate applies bans only.
    #[serde(rename = "type")]
    pub kind: String,
    /// `Ip` or `Range` (kgate's), `Country`, `AS`, ... (not kgate's).
    pub scope: String,
    /// An address, or a prefix for `Range`.
    pub value: String,
    /// Time left, in Go's notation: `3h59m59.53s`; negative once over.
    pub duration: String,
}

impl Decision {
    /// The prefix this decision bans; `None` when it is not a ban, or not on an
    /// address or range (not for a packet filter).
    fn target(&self) -> Result<Option<Prefix>, String> {
        let scope = self.scope.to_ascii_lowercase();
        if !self.kind.eq_ignore_ascii_case("ban") || !(scope == "ip" || scope == "range") {
            return Ok(None);
        }
        match self.value.parse::<Prefix>() {
            Ok(prefix) if scope == "ip" && u32::from(prefix.len()) != max_len(&prefix) => {
                Err(format!("`{}`: an Ip decision names a range", self.value))
            }
            Ok(prefix) => Ok(Some(prefix)),
            // A range written with host bits (`192.0.2.7/24`) bans its whole range.
            Err(PrefixError::HostBits { suggestion, .. }) if scope == "range" => {
                Ok(Some(suggestion))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// How long the decision still runs; zero when it is over.
    fn time_left(&self) -> Result<Duration, String> {
        match parse_go_duration(&self.duration) {
            Some((false, left)) => Ok(left),
            Some((true, _)) => Ok(Duration::ZERO),
            None => Err(format!(
                "`{}`: unreadable duration `{}`",
                self.value, self.duration
            )),
        }
    }
}

fn max_len(prefix: &Prefix) -> u32 {
    if prefix.addr().is_ipv4() { 32 } else { 128 }
}

/// What a pull changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Prefixes banned anew or for longer.
    pub banned: usize,
    /// Prefixes whose ban was lifted.
    pub lifted: usize,
    /// Decisions that are not bans of addresses or ranges.
    pub not_ours: usize,
    /// Decisions kgate could not read, with why (the first few).
    pub unreadable: Vec<String>,
    pub unreadable_count: usize,
}

/// Unreadable decisions named in a log line at most.
const UNREADABLE_SHOWN: usize = 3;

impl Applied {
    fn unreadable(&mut self, why: String) {
        self.unreadable_count += 1;
        if self.unreadable.len() < UNREADABLE_SHOWN {
            self.unreadable.push(why);
        }
    }
}

/// The prefixes CrowdSec bans now, each with the `CLOCK_BOOTTIME` second its ban ends
/// (as [`BlockEntry::expires_at`](proxy_common::xdp::BlockEntry::expires_at) holds it).
#[derive(Debug, Default)]
pub struct Bans {
    ends: HashMap<Prefix, u32>,
}

impl Bans {
    /// The answer to a `startup=true` pull: every active decision. Replaces all bans.
    pub fn replace(&mut self, stream: DecisionStream, now: Duration) -> Applied {
        let before = std::mem::take(&mut self.ends);
        let mut applied = Applied::default();
        for decision in stream.new.unwrap_or_default() {
            self.add(&decision, now, &mut applied);
        }
        applied.banned = self
            .ends
            .iter()
            .filter(|(prefix, end)| before.get(prefix).is_none_or(|old| old < end))
            .count();
        applied.lifted = before.keys().filter(|p| !self.ends.contains_key(p)).count();
        applied
    }

    /// A later pull's answer: deleted decisions first, then new ones (a value can be in
    /// both, when it was unbanned and banned again since the last pull).
    pub fn apply(&mut self, stream: DecisionStream, now: Duration) -> Applied {
        let mut applied = Applied::default();
        for decision in stream.deleted.unwrap_or_default() {
            match decision.target() {
                Ok(Some(prefix)) => {
                    if self.ends.remove(&prefix).is_some() {
                        applied.lifted += 1;
                    }
                }
                Ok(None) => applied.not_ours += 1,
                Err(why) => applied.unreadable(why),
            }
        }
        for decision in stream.new.unwrap_or_default() {
            if self.add(&decision, now, &mut applied) {
                applied.banned += 1;
            }
        }
        applied
    }

    /// Adds a `new` decision; true when it banned its prefix anew or for longer.
    fn add(&mut self, decision: &Decision, now: Duration, applied: &mut Applied) -> bool {
        let left = match decision.target().and_then(|target| {
            target
                .map(|prefix| decision.time_left().map(|left| (prefix, left)))
                .transpose()
        }) {
            Ok(Some((prefix, left))) if !left.is_zero() => (prefix, left),
            Ok(Some(_)) => return false,
            Ok(None) => {
                applied.not_ours += 1;
                return false;
            }
            Err(why) => {
                applied.unreadable(why);
                return false;
            }
        };
        let (prefix, left) = left;
        let end = end_second(now, left);
        let current = self.ends.entry(prefix).or_insert(0);
        if *current < end {
            *current = end;
            return true;
        }
        false
    }

    /// Forgets bans that ended by `now` (`CLOCK_BOOTTIME` seconds); the XDP program
    /// ignores them already, and the blocklist's cleanup removes their entries.
    pub fn forget_ended(&mut self, now: u64) {
        self.ends.retain(|_, end| now < u64::from(*end));
    }

    pub fn ends(&self) -> &HashMap<Prefix, u32> {
        &self.ends
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }
}

/// The `CLOCK_BOOTTIME` second at which a ban with `left` to go at `now` ends, rounded
/// up (never 0, which would mean "never").
fn end_second(now: Duration, left: Duration) -> u32 {
    let end = now.saturating_add(left);
    let seconds = end
        .as_secs()
        .saturating_add(u64::from(end.subsec_nanos() > 0));
    u32::try_from(seconds).unwrap_or(u32::MAX).max(1)
}

/// Reads Go's `time.Duration` notation (`72h3m0.5s`, `-17.7ms`, `1.5µs`, `0s`):
/// whether it is negative, and its length. `None` when it is not that notation.
pub fn parse_go_duration(text: &str) -> Option<(bool, Duration)> {
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Some((negative, Duration::ZERO));
    }
    let mut seconds = 0f64;
    let mut parts = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let value: f64 = number.parse().ok()?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let scale = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" | "μs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        seconds += value * scale;
        parts += 1;
        rest = after;
    }
    if parts == 0 {
        return None;
    }
    Some((negative, Duration::try_from_secs_f64(seconds).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Prefix {
        text.parse().unwrap()
    }

    fn stream(json: &str) -> DecisionStream {
        serde_json::from_str(json).unwrap()
    }

    fn decision(kind: &str, scope: &str, value: &str, duration: &str) -> String {
        format!(
            r#"{{"duration":"{duration}","id":1,"origin":"cscli","scenario":"manual","scope":"{scope}","type":"{kind}","value":"{value}"}}"#
        )
    }

    const NOW: Duration = Duration::from_secs(1000);

    #[test]
    fn go_durations_as_the_lapi_writes_them() {
        let secs = |s: f64| Duration::from_secs_f64(s);
        assert_eq!(
            parse_go_duration("3h59m59.532112463s"),
            Some((false, secs(4.0 * 3600.0 - 0.467887537)))
        );
        assert_eq!(
            parse_go_duration("1m29.532115648s"),
            Some((false, secs(89.532115648)))
        );
        assert_eq!(
            parse_go_duration("-17.720155ms"),
            Some((true, secs(0.017720155)))
        );
        assert_eq!(parse_go_duration("0s"), Some((false, Duration::ZERO)));
        assert_eq!(parse_go_duration("0"), Some((false, Duration::ZERO)));
        assert_eq!(parse_go_duration("1.5µs"), Some((false, secs(1.5e-6))));
        assert_eq!(parse_go_duration("168h"), Some((false, secs(604800.0))));
        for bad in ["", "-", "4", "4x", "h", "1..2s", "1h-3m", "4h 3m"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn startup_bans_ips_and_ranges_of_both_families_until_their_end() {
        let mut bans = Bans::default();
        let answer = stream(&format!(
            r#"{{"deleted":null,"new":[{},{},{},{}]}}"#,
            decision("ban", "Range", "10.8.0.0/16", "1m29.5s"),
            decision("ban", "Ip", "10.9.9.9", "59m58.5s"),
            decision("ban", "Ip", "2001:db8::7", "3h59m59.5s"),
            decision("ban", "Range", "2001:db8:1::/48", "4h"),
        ));
        let applied = bans.replace(answer, NOW);
        assert_eq!(applied.banned, 4);
        let ends = bans.ends();
        assert_eq!(ends[&p("10.8.0.0/16")], 1090);
        assert_eq!(ends[&p("10.9.9.9")], 1000 + 3599);
        assert_eq!(ends[&p("2001:db8::7")], 1000 + 4 * 3600);
        assert_eq!(ends[&p("2001:db8:1::/48")], 1000 + 4 * 3600);
    }

    #[test]
    fn a_startup_answer_replaces_every_ban_and_counts_what_changed() {
        let mut bans = Bans::default();
        bans.replace(
            stream(&format!(
                r#"{{"new":[{},{}]}}"#,
                decision("ban", "Ip", "192.0.2.1", "1h"),
                decision("ban", "Ip", "192.0.2.2", "1h"),
            )),
            NOW,
        );
        let applied = bans.replace(
            stream(&format!(
                r#"{{"new":[{},{}],"deleted":[{}]}}"#,
                decision("ban", "Ip", "192.0.2.2", "1h"),
                decision("ban", "Ip", "192.0.2.3", "1h"),
                decision("ban", "Ip", "192.0.2.9", "-1s"),
            )),
            NOW,
        );
        assert_eq!((applied.banned, applied.lifted), (1, 1));
        let mut left: Vec<String> = bans.ends().keys().map(ToString::to_string).collect();
        left.sort();
        assert_eq!(left, ["192.0.2.2/32", "192.0.2.3/32"]);
    }

    #[test]
    fn deletions_lift_a_prefix_and_new_decisions_only_lengthen_a_ban() {
        let mut bans = Bans::default();
        bans.replace(
            stream(&format!(
                r#"{{"new":[{}]}}"#,
                decision("ban", "Ip", "10.7.7.7", "1h")
            )),
            NOW,
        );
        // A longer decision on the same address: the later end wins.
        let applied = bans.apply(
            stream(&format!(
                r#"{{"new":[{}]}}"#,
                decision("ban", "Ip", "10.7.7.7", "3h")
            )),
            NOW,
        );
        assert_eq!(applied.banned, 1);
        assert_eq!(bans.ends()[&p("10.7.7.7")], 1000 + 3 * 3600);
        // A shorter one does not shorten it.
        let applied = bans.apply(
            stream(&format!(
                r#"{{"new":[{}]}}"#,
                decision("ban", "Ip", "10.7.7.7", "10m")
            )),
            NOW,
        );
        assert_eq!(applied.banned, 0);
        assert_eq!(bans.ends()[&p("10.7.7.7")], 1000 + 3 * 3600);
        // Unbanned and banned again since the last pull: deleted first, then new.
        let applied = bans.apply(
            stream(&format!(
                r#"{{"deleted":[{}],"new":[{}]}}"#,
                decision("ban", "Ip", "10.7.7.7", "-20ms"),
                decision("ban", "Ip", "10.7.7.7", "5m"),
            )),
            NOW,
        );
        assert_eq!((applied.banned, applied.lifted), (1, 1));
        assert_eq!(bans.ends()[&p("10.7.7.7")], 1000 + 300);
        let applied = bans.apply(
            stream(&format!(
                r#"{{"deleted":[{}],"new":null}}"#,
                decision("ban", "Ip", "10.7.7.7", "-20ms")
            )),
            NOW,
        );
        assert_eq!(applied.lifted, 1);
        assert_eq!(bans.len(), 0);
    }

    #[test]
    fn other_types_and_scopes_are_left_to_other_bouncers_and_bad_values_are_reported() {
        let mut bans = Bans::default();
        let applied = bans.apply(
            stream(&format!(
                r#"{{"new":[{},{},{},{},{},{}]}}"#,
                decision("captcha", "Ip", "192.0.2.1", "1h"),
                decision("ban", "Country", "XX", "1h"),
                decision("ban", "Ip", "not-an-ip", "1h"),
                decision("ban", "Ip", "192.0.2.0/24", "1h"),
                decision("ban", "Ip", "192.0.2.2", "soon"),
                decision("ban", "Range", "192.0.2.7/24", "1h"),
            )),
            NOW,
        );
        assert_eq!(applied.not_ours, 2);
        assert_eq!(applied.unreadable_count, 3);
        assert!(applied.unreadable[0].contains("`not-an-ip` is not an IP prefix"));
        assert_eq!(
            applied.unreadable[1],
            "`192.0.2.0/24`: an Ip decision names a range"
        );
        assert_eq!(
            applied.unreadable[2],
            "`192.0.2.2`: unreadable duration `soon`"
        );
        // A range with host bits bans the range it lies in.
        assert_eq!(applied.banned, 1);
        assert!(bans.ends().contains_key(&p("192.0.2.0/24")));
    }

    #[test]
    fn ended_bans_are_forgotten() {
        let mut bans = Bans::default();
        bans.replace(
            stream(&format!(
                r#"{{"new":[{},{}]}}"#,
                decision("ban", "Ip", "192.0.2.1", "10s"),
                decision("ban", "Ip", "192.0.2.2", "1h"),
            )),
            NOW,
        );
        bans.forget_ended(1009);
        assert_eq!(bans.len(), 2);
        bans.forget_ended(1010);
        assert_eq!(bans.len(), 1);
        assert!(bans.ends().contains_key(&p("192.0.2.2")));
    }

    #[test]
    fn an_ended_ban_never_reads_as_forever() {
        assert_eq!(end_second(Duration::ZERO, Duration::from_millis(1)), 1);
        assert_eq!(end_second(Duration::from_millis(1500), Duration::ZERO), 2);
        assert_eq!(end_second(Duration::MAX, Duration::MAX), u32::MAX);
    }
}
