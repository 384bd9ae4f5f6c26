//! The health state of one server, as HAProxy keeps it: `fall` failed checks in a row
//! take an up server down, `rise` passed checks in a row bring a down server up.
//!
//! A server starts **unchecked**: balanced to as if it were up (kgate must not refuse
//! every client for `rise` × interval after a start or reload), and its first check
//! decides at once: passed -> up, failed -> down (so a dead server gets clients for one
//! check at most, and `retries` move those to another server). This is what HAProxy
//! does too: a server starts up, but a single failed check away from down.
//!
//! The time to the next check: `inter` while steady and up, `fastinter` while the
//! server is on its way to the other state (up with failures, down with successes),
//! `downinter` while steady and down; each spread by ±[`SPREAD`] so that the checks
//! of many servers do not fire in lockstep.

use std::{fmt, time::Duration};

use super::failure::CheckFailure;

/// How far an interval is spread around its nominal value: ±10 %.
pub const SPREAD: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// No check has finished yet: treated as up when balancing.
    Unchecked,
    Up,
    Down,
}

impl Health {
    /// Whether clients may be sent to the server.
    pub fn is_usable(self) -> bool {
        matches!(self, Health::Unchecked | Health::Up)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Unchecked => "unchecked",
            Health::Up => "up",
            Health::Down => "down",
        })
    }
}

/// The rise/fall state of one server and its counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerHealth {
    state: Health,
    rise: u32,
    fall: u32,
    consecutive_ok: u32,
    consecutive_fail: u32,
    checks: u64,
    last: Option<Result<(), CheckFailure>>,
}

/// A change of state and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
    pub reason: TransitionReason,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransitionReason {
    /// `in_a_row` checks passed (1 for an unchecked server's first check).
    Passed { in_a_row: u32 },
    /// `in_a_row` checks failed; `failure` is the last one's reason.
    Failed {
        failure: CheckFailure,
        in_a_row: u32,
    },
}

impl fmt::Display for Transition {
    /// "first check failed: connection refused", "connection refused (3 failed checks
    /// in a row)", "2 checks passed in a row".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.from == Health::Unchecked;
        match &self.reason {
            TransitionReason::Passed { .. } if first => f.write_str("first check passed"),
            TransitionReason::Passed { in_a_row: 1 } => f.write_str("1 check passed"),
            TransitionReason::Passed { in_a_row } => {
                write!(f, "{in_a_row} checks passed in a row")
            }
            TransitionReason::Failed { failure, .. } if first => {
                write!(f, "first check failed: {failure}")
            }
            TransitionReason::Failed {
                failure,
                in_a_row: 1,
            } => write!(f, "{failure} (1 failed check)"),
            TransitionReason::Failed { failure, in_a_row } => {
                write!(f, "{failure} ({in_a_row} failed checks in a row)")
            }
        }
    }
}

impl ServerHealth {
    /// An unchecked server. `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> ServerHealth {
        ServerHealth {
            state: Health::Unchecked,
            rise: rise.max(1),
            fall: fall.max(1),
            consecutive_ok: 0,
            consecutive_fail: 0,
            checks: 0,
            last: None,
        }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Failed checks in a row that take it down from up.
    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// Checks passed in a row, up to now (0 after a failure).
    pub fn consecutive_ok(&self) -> u32 {
        self.consecutive_ok
    }

    /// Checks failed in a row, up to now (0 after a success).
    pub fn consecutive_fail(&self) -> u32 {
        self.consecutive_fail
    }

    /// Checks recorded so far.
    #[cfg(test)]
    pub fn checks(&self) -> u64 {
        self.checks
    }

    /// The last check's result, `None` before the first.
    pub fn last(&self) -> Option<&Result<(), CheckFailure>> {
        self.last.as_ref()
    }

    /// Records a check's result; returns the change of state it caused, if any.
    pub fn record(&mut self, result: Result<(), CheckFailure>) -> Option<Transition> {
        self.checks += 1;
        let from = self.state;
        let reason = match &result {
            Ok(()) => {
                self.consecutive_ok = self.consecutive_ok.saturating_add(1);
                self.consecutive_fail = 0;
                TransitionReason::Passed {
                    in_a_row: self.consecutive_ok,
                }
            }
            Err(failure) => {
                self.consecutive_fail = self.consecutive_fail.saturating_add(1);
                self.consecutive_ok = 0;
                TransitionReason::Failed {
                    failure: failure.clone(),
                    in_a_row: self.consecutive_fail,
                }
            }
        };
        let to = match (from, result.is_ok()) {
            (Health::Unchecked, true) => Health::Up,
            (Health::Unchecked, false) => Health::Down,
            (Health::Up, false) if self.consecutive_fail >= self.fall => Health::Down,
            (Health::Down, true) if self.consecutive_ok >= self.rise => Health::Up,
            (state, _) => state,
        };
        self.last = Some(result);
        self.state = to;
        (from != to).then_some(Transition { from, to, reason })
    }

    /// Whether the server is on its way to the other state: up with failed checks, or
    /// down with passed ones.
    pub fn is_changing(&self) -> bool {
        match self.state {
            Health::Unchecked => false,
            Health::Up => self.consecutive_fail > 0,
            Health::Down => self.consecutive_ok > 0,
        }
    }

    /// The nominal time to the next check (before the spread): `fastinter` while
    /// changing, `downinter` while down, `inter` otherwise (also before the first check).
    pub fn next_interval(
        &self,
        inter: Duration,
        fastinter: Duration,
        downinter: Duration,
    ) -> Duration {
        if self.is_changing() {
            fastinter
        } else if self.state == Health::Down {
            downinter
        } else {
            inter
        }
    }
}

/// `interval` spread by up to ±[`SPREAD`]: `random` 0 gives -10 %, `u64::MAX` +10 %,
/// and the values between are spread evenly.
pub fn spread(interval: Duration, random: u64) -> Duration {
    // In [-1, 1].
    let unit = (random as f64 / u64::MAX as f64) * 2.0 - 1.0;
    interval.mul_f64(1.0 + SPREAD * unit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::failure::Step;

    const INTER: Duration = Duration::from_secs(2);
    const FAST: Duration = Duration::from_secs(1);
    const DOWN: Duration = Duration::from_secs(4);

    fn fail() -> Result<(), CheckFailure> {
        Err(CheckFailure::Refused)
    }

    fn interval(h: &ServerHealth) -> Duration {
        h.next_interval(INTER, FAST, DOWN)
    }

    #[test]
    fn a_new_server_is_unchecked_and_usable() {
        let h = ServerHealth::new(2, 3);
        assert_eq!(h.state(), Health::Unchecked);
        assert!(h.state().is_usable());
        assert_eq!(
            (h.consecutive_ok(), h.consecutive_fail(), h.checks()),
            (0, 0, 0)
        );
        assert_eq!(h.last(), None);
        assert_eq!(interval(&h), INTER);
    }

    #[test]
    fn the_first_check_passing_brings_an_unchecked_server_up_at_once() {
        let mut h = ServerHealth::new(2, 3);
        let t = h.record(Ok(())).unwrap();
        assert_eq!((t.from, t.to), (Health::Unchecked, Health::Up));
        assert_eq!(t.reason, TransitionReason::Passed { in_a_row: 1 });
        assert_eq!(t.to_string(), "first check passed");
        assert_eq!(h.consecutive_ok(), 1);
    }

    #[test]
    fn the_first_check_failing_takes_an_unchecked_server_down_at_once() {
        let mut h = ServerHealth::new(2, 3);
        let t = h.record(fail()).unwrap();
        assert_eq!((t.from, t.to), (Health::Unchecked, Health::Down));
        assert_eq!(t.to_string(), "first check failed: connection refused");
        assert!(!h.state().is_usable());
        assert_eq!(h.last(), Some(&fail()));
    }

    #[test]
    fn an_up_server_goes_down_after_fall_failures_in_a_row() {
        let mut h = ServerHealth::new(2, 3);
        h.record(Ok(()));
        assert_eq!(h.record(fail()), None);
        assert_eq!(h.record(fail()), None);
        assert_eq!(h.state(), Health::Up);
        let timeout = CheckFailure::TimedOut(Step::Greeting);
        let t = h.record(Err(timeout.clone())).unwrap();
        assert_eq!((t.from, t.to), (Health::Up, Health::Down));
        assert_eq!(
            t.reason,
            TransitionReason::Failed {
                failure: timeout,
                in_a_row: 3
            }
        );
        assert_eq!(
            t.to_string(),
            "timed out waiting for the greeting (3 failed checks in a row)"
        );
        assert_eq!((h.consecutive_ok(), h.consecutive_fail()), (0, 3));
    }

    #[test]
    fn a_success_in_between_resets_the_failure_count() {
        let mut h = ServerHealth::new(2, 3);
        h.record(Ok(()));
        for result in [fail(), fail(), Ok(()), fail(), fail()] {
            assert_eq!(h.record(result), None);
        }
        assert_eq!(h.state(), Health::Up);
        assert_eq!(h.consecutive_fail(), 2);
        assert!(h.record(fail()).is_some());
    }

    #[test]
    fn a_down_server_comes_up_after_rise_successes_in_a_row() {
        let mut h = ServerHealth::new(2, 3);
        h.record(fail());
        assert_eq!(h.record(Ok(())), None);
        assert_eq!(h.record(fail()), None);
        assert_eq!(h.record(Ok(())), None);
        assert_eq!(h.state(), Health::Down);
        let t = h.record(Ok(())).unwrap();
        assert_eq!((t.from, t.to), (Health::Down, Health::Up));
        assert_eq!(t.to_string(), "2 checks passed in a row");
        assert_eq!(h.checks(), 5);
    }

    #[test]
    fn rise_and_fall_of_one_change_state_on_every_differing_result() {
        let mut h = ServerHealth::new(1, 1);
        h.record(Ok(()));
        let t = h.record(fail()).unwrap();
        assert_eq!(t.to_string(), "connection refused (1 failed check)");
        let t = h.record(Ok(())).unwrap();
        assert_eq!(t.to_string(), "1 check passed");
        // Zero is taken as one.
        assert_eq!(ServerHealth::new(0, 0), ServerHealth::new(1, 1));
    }

    #[test]
    fn intervals_follow_the_state() {
        let mut h = ServerHealth::new(2, 3);
        h.record(Ok(()));
        assert_eq!(interval(&h), INTER, "steady up");
        h.record(fail());
        assert!(h.is_changing());
        assert_eq!(interval(&h), FAST, "going down");
        h.record(fail());
        assert_eq!(interval(&h), FAST, "still going down");
        h.record(fail());
        assert!(!h.is_changing());
        assert_eq!(interval(&h), DOWN, "steady down");
        h.record(Ok(()));
        assert_eq!(interval(&h), FAST, "coming up");
        h.record(Ok(()));
        assert_eq!(h.state(), Health::Up);
        assert_eq!(interval(&h), INTER, "up again");
    }

    #[test]
    fn spread_stays_within_ten_percent_and_covers_the_range() {
        let ten = Duration::from_secs(10);
        assert_eq!(spread(ten, 0), Duration::from_secs(9));
        assert_eq!(spread(ten, u64::MAX), Duration::from_secs(11));
        let middle = spread(ten, u64::MAX / 2);
        assert!(
            middle.abs_diff(ten) < Duration::from_millis(1),
            "{middle:?}"
        );
        for r in [1, 12345, u64::MAX / 3, u64::MAX - 1] {
            let d = spread(ten, r);
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
        assert_eq!(spread(Duration::ZERO, 7), Duration::ZERO);
    }
}
