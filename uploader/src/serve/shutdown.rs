//! Shutting down with a batch in flight: SIGTERM/SIGINT set a flag, and the batch then gets a
//! grace period to finish before it is abandoned (no snapshot; the producer resends later).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The daemon's stop flag and the grace period of the batch in flight.
#[derive(Debug)]
pub(crate) struct Shutdown {
    /// Set by SIGTERM/SIGINT, or by a sibling segment whose repository failed.
    stop: Arc<AtomicBool>,
    grace: Duration,
    /// When this segment first noticed the flag: the grace period runs from here.
    noticed: Option<Instant>,
}

impl Shutdown {
    pub(crate) fn new(stop: Arc<AtomicBool>, grace: Duration) -> Self {
        Shutdown { stop, grace, noticed: None }
    }

    /// Whether the daemon is stopping (a batch in flight may still finish).
    pub(crate) fn requested(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// True once the stop flag has been set for longer than the grace period.
    pub(crate) fn expired(&mut self) -> bool {
        if !self.requested() {
            return false;
        }
        self.noticed.get_or_insert_with(Instant::now).elapsed() >= self.grace
    }

    /// Why a batch was abandoned.
    pub(crate) fn reason(&self) -> String {
        format!(
            "the uploader is shutting down and the batch did not finish within the {:?} grace period \
             (--grace); no snapshot was made: resend the batch when the uploader is back",
            self.grace
        )
    }
}
