//! Events per second, as HAProxy's stats page counts its session rates (`freq_ctr`):
//! the events of the current second, plus those of the second before weighed by the
//! part of it still inside the last 1 s. No task, no timer: counted when an event comes,
//! read when a status is built. Also the highest rate seen.

use std::{
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
pub struct Rate(Mutex<Window>);

#[derive(Debug, Default)]
struct Window {
    /// The second `current` counts, since [`epoch`].
    second: u64,
    current: u64,
    previous: u64,
    max: f64,
}

impl Rate {
    /// Counts one event now.
    pub fn add(&self) {
        self.add_at(since_epoch());
    }

    /// Events in the last second, now.
    pub fn per_second(&self) -> f64 {
        self.per_second_at(since_epoch())
    }

    /// The highest rate seen at an event.
    pub fn max(&self) -> f64 {
        self.lock().max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add_at(&self, now: Duration) {
        let mut window = self.lock();
        window.roll(now.as_secs());
        window.current += 1;
        let rate = window.rate(now);
        window.max = window.max.max(rate);
    }

    fn per_second_at(&self, now: Duration) -> f64 {
        let mut window = self.lock();
        window.roll(now.as_secs());
        window.rate(now)
    }
}

impl Window {
    /// Moves the window to `second`.
    fn roll(&mut self, second: u64) {
        match second.saturating_sub(self.second) {
            0 => {}
            1 => self.previous = std::mem::take(&mut self.current),
            _ => {
                self.previous = 0;
                self.current = 0;
            }
        }
        self.second = self.second.max(second);
    }

    fn rate(&self, now: Duration) -> f64 {
        let left_of_previous = 1.0 - f64::from(now.subsec_millis()) / 1000.0;
        self.current as f64 + self.previous as f64 * left_of_previous
    }
}

/// A fixed instant of this process: rates count whole seconds from it.
fn since_epoch() -> Duration {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn the_rate_counts_the_last_second_and_fades_the_one_before() {
        let rate = Rate::default();
        for ms in [10_100, 10_200, 10_300, 10_400] {
            rate.add_at(at(ms));
        }
        assert_eq!(rate.per_second_at(at(10_900)), 4.0);
        // A quarter into the next second, three quarters of the last one still count.
        rate.add_at(at(11_250));
        assert_eq!(rate.per_second_at(at(11_250)), 1.0 + 4.0 * 0.75);
        assert_eq!(rate.per_second_at(at(12_000)), 1.0);
        assert_eq!(rate.per_second_at(at(13_000)), 0.0, "two seconds later");
        assert_eq!(rate.max(), 4.0);
    }

    #[test]
    fn a_long_quiet_time_empties_the_window() {
        let rate = Rate::default();
        rate.add_at(at(5_000));
        rate.add_at(at(5_001));
        assert_eq!(rate.per_second_at(at(60_000)), 0.0);
        rate.add_at(at(60_500));
        assert_eq!(rate.per_second_at(at(60_500)), 1.0);
        assert_eq!(rate.max(), 2.0);
    }
}
