//! What the listener remembers per producer name while it runs: whether a batch is in flight
//! (one at a time per producer), and the last batches it stored (so a batch resent because its
//! answer was lost gets the same snapshot id instead of a second snapshot).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Stored batches remembered per producer (a client resends the batch it just sent).
const HISTORY: usize = 16;
/// Producer names remembered at most; beyond, idle ones are forgotten first.
const MAX_PRODUCERS: usize = 10_000;

#[derive(Default)]
struct State {
    in_flight: bool,
    stored: VecDeque<(u64, [u8; 32])>,
}

/// Every producer the listener has seen.
#[derive(Default)]
pub(crate) struct Producers(Mutex<HashMap<String, State>>);

impl Producers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, State>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks a batch of `name` in flight; false if one already is.
    pub(crate) fn try_begin(&self, name: &str) -> bool {
        let mut all = self.lock();
        if all.len() >= MAX_PRODUCERS && !all.contains_key(name) {
            all.retain(|_, s| s.in_flight);
        }
        let state = all.entry(name.to_string()).or_default();
        !std::mem::replace(&mut state.in_flight, true)
    }

    pub(crate) fn end(&self, name: &str) {
        if let Some(s) = self.lock().get_mut(name) {
            s.in_flight = false;
        }
    }

    pub(crate) fn record(&self, name: &str, seq: u64, id: [u8; 32]) {
        let mut all = self.lock();
        let stored = &mut all.entry(name.to_string()).or_default().stored;
        if stored.len() == HISTORY {
            stored.pop_front();
        }
        stored.push_back((seq, id));
    }

    /// The last sequence stored for `name` (0: none).
    pub(crate) fn last_stored(&self, name: &str) -> u64 {
        self.lock().get(name).and_then(|s| s.stored.back()).map_or(0, |(seq, _)| *seq)
    }

    /// The snapshot batch `seq` of `name` was stored as, if still remembered.
    pub(crate) fn stored(&self, name: &str, seq: u64) -> Option<[u8; 32]> {
        self.lock().get(name)?.stored.iter().find(|(s, _)| *s == seq).map(|(_, id)| *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_batch_in_flight_per_producer_and_recent_batches_remembered() {
        let p = Producers::default();
        assert!(p.try_begin("a"));
        assert!(!p.try_begin("a"));
        assert!(p.try_begin("b"));
        p.end("a");
        assert!(p.try_begin("a"));
        for seq in 1..=20 {
            p.record("a", seq, [seq as u8; 32]);
        }
        assert_eq!(p.last_stored("a"), 20);
        assert_eq!(p.stored("a", 20), Some([20; 32]));
        assert_eq!(p.stored("a", 5), Some([5; 32]));
        assert_eq!(p.stored("a", 4), None, "older than the history");
        assert_eq!(p.last_stored("b"), 0);
    }
}
