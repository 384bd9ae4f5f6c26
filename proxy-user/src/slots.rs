//! Slots in the maps where the eBPF programs count bytes: each server and each
//! frontend has one for as long as it exists or has connections, and keeps it across
//! reloads, so its counts go on.

use std::sync::Arc;

use proxy_common::{MAX_FRONTENDS, MAX_SERVERS};

use crate::{admission::FrontendLoad, pool::ServerRuntime};

/// The slots of servers and of frontends.
#[derive(Debug)]
pub struct MapSlots {
    pub servers: Slots<ServerRuntime>,
    pub frontends: Slots<FrontendLoad>,
}

impl Default for MapSlots {
    fn default() -> Self {
        MapSlots {
            servers: Slots::new("servers", MAX_SERVERS),
            frontends: Slots::new("frontends", MAX_FRONTENDS),
        }
    }
}

/// Slots freed since the last look: their counters are to be zeroed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Freed {
    pub servers: Vec<u32>,
    pub frontends: Vec<u32>,
}

impl MapSlots {
    /// Frees and returns the slots of retired servers and frontends nothing holds any
    /// more (their last connection has ended).
    pub fn collect(&mut self) -> Freed {
        Freed {
            servers: self.servers.collect(),
            frontends: self.frontends.collect(),
        }
    }
}

/// Slots `0..capacity`, each held by a `T` (a server's or a frontend's run-time state).
#[derive(Debug)]
pub struct Slots<T> {
    what: &'static str,
    capacity: usize,
    next: u32,
    free: Vec<u32>,
    /// Removed by a reload, until nothing holds them: an open connection still counts
    /// its bytes in their slot.
    retiring: Vec<(u32, Arc<T>)>,
}

#[derive(Debug, thiserror::Error)]
#[error(
    "more than {capacity} {what}, with those a reload removed whose connections are still \
     open: kgate counts that many at most"
)]
pub struct SlotsFull {
    what: &'static str,
    capacity: usize,
}

impl<T> Slots<T> {
    fn new(what: &'static str, capacity: usize) -> Self {
        Slots {
            what,
            capacity,
            next: 0,
            free: Vec::new(),
            retiring: Vec::new(),
        }
    }

    /// Whether `n` more slots can be taken.
    pub fn check_room(&self, n: usize) -> Result<(), SlotsFull> {
        let room = self.free.len() + (self.capacity - self.next as usize);
        if n > room {
            return Err(self.full());
        }
        Ok(())
    }

    fn full(&self) -> SlotsFull {
        SlotsFull {
            what: self.what,
            capacity: self.capacity,
        }
    }

    pub fn take(&mut self) -> Result<u32, SlotsFull> {
        if let Some(slot) = self.free.pop() {
            return Ok(slot);
        }
        if self.next as usize >= self.capacity {
            return Err(self.full());
        }
        self.next += 1;
        Ok(self.next - 1)
    }

    /// `slot` is free once nothing but this holds `holder`.
    pub fn retire(&mut self, slot: u32, holder: Arc<T>) {
        self.retiring.push((slot, holder));
    }

    fn collect(&mut self) -> Vec<u32> {
        let mut freed = Vec::new();
        self.retiring.retain(|(slot, holder)| {
            let held = Arc::strong_count(holder) > 1;
            if !held {
                freed.push(*slot);
            }
            held
        });
        self.free.extend(&freed);
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_slot_is_free_once_nothing_holds_it_and_is_taken_again() {
        let mut slots: Slots<()> = Slots::new("things", 2);
        assert_eq!(slots.take().unwrap(), 0);
        assert_eq!(slots.take().unwrap(), 1);
        assert!(slots.check_room(0).is_ok());
        assert!(slots.check_room(1).is_err(), "all taken");
        let full = slots.take().unwrap_err().to_string();
        assert_eq!(
            full,
            "more than 2 things, with those a reload removed whose connections are still \
             open: kgate counts that many at most"
        );

        let holder = Arc::new(());
        let connection = holder.clone();
        slots.retire(0, holder);
        assert_eq!(slots.collect(), Vec::<u32>::new(), "a connection holds it");
        drop(connection);
        assert_eq!(slots.collect(), vec![0]);
        assert_eq!(slots.collect(), Vec::<u32>::new(), "freed once");
        assert!(slots.check_room(1).is_ok());
        assert_eq!(slots.take().unwrap(), 0);
    }
}
