//! Giving the memory of ended tasks back to the system.
//!
//! A connection that parks (sockmap) or is handed off (packet) ends its task, but
//! glibc keeps freed memory for reuse and returns it only from the top of its heaps:
//! after a burst of such connections, the tasks they no longer have still count in
//! kgate's resident memory (measured on the sockmap plane: 2.7 KB of the 3 KB per
//! parked connection, 360 B after trimming). So once many have left their tasks, the
//! freed memory is trimmed: when a sweep finds no more leaving, and [`TRIM_EVERY`]
//! after the last time while they keep coming.

use std::time::Duration;

use tokio::time::Instant;

/// Connections that left their tasks before a trim is worth its cost.
const TRIM_AFTER: usize = 1024;
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Counts connections that left their tasks, and trims when they are many.
pub struct Trim {
    left_since_trim: usize,
    last_trim: Instant,
}

impl Trim {
    pub fn new() -> Trim {
        Trim {
            left_since_trim: 0,
            last_trim: Instant::now(),
        }
    }

    /// A periodic sweep found `left` more connections out of their tasks.
    pub fn on_sweep(&mut self, left: usize, now: Instant) {
        self.left_since_trim += left;
        if self.left_since_trim >= TRIM_AFTER && (left == 0 || now >= self.last_trim + TRIM_EVERY) {
            give_back_freed_memory();
            self.last_trim = now;
            // A burst still leaving is trimmed once more when it ends, for the tasks
            // of its tail.
            self.left_since_trim = if left == 0 { 0 } else { TRIM_AFTER };
        }
    }
}

fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
