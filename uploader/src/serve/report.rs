//! The one place a batch's outcome is settled: published to the producer (durable ack or
//! rejection), logged, and handed to the caller.
//!
//! Rejections are logged in full up to [`FULL_PER_INTERVAL`] per interval and source; beyond
//! that a hostile or broken producer gets one summary line per interval with the count, so it
//! cannot flood the log (100 000 bad frames once made 200 000 lines).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::options::BatchOutcome;
use super::source::Source;

/// Rejections logged in full per interval, per source.
const FULL_PER_INTERVAL: u32 = 10;
/// How often the count of rejections not logged in full is logged.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(60);

/// Settles the outcomes of one source's batches (a segment, or one HTTP producer's body).
pub(crate) struct Reporter<F> {
    /// The source as logs name it: a segment's path, or `http:PRODUCER`.
    source: String,
    on_batch: F,
    interval_start: Instant,
    logged: u32,
    unlogged: u64,
    last_unlogged: Option<String>,
}

impl<F: FnMut(&BatchOutcome)> Reporter<F> {
    pub(crate) fn new(source: &str, on_batch: F) -> Self {
        crate::monitor::source_started(source);
        Reporter {
            source: source.to_string(),
            on_batch,
            interval_start: Instant::now(),
            logged: 0,
            unlogged: 0,
            last_unlogged: None,
        }
    }

    /// Publishes `outcome` on `source`, logs it and tells the caller.
    pub(crate) fn settle(&mut self, source: &mut Source, outcome: BatchOutcome) {
        source.publish(&outcome);
        let from = self.source.clone();
        let from = from.as_str();
        match &outcome {
            BatchOutcome::Stored { seq, snapshot, elapsed } => {
                let (files, bytes, new_bytes, stored) = snapshot.summary.as_ref().map_or((0, 0, 0, 0), |s| {
                    (s.total_files_processed, s.total_bytes_processed, s.data_added_files, s.data_added_packed)
                });
                info!(
                    from, seq, snapshot = %snapshot.id, files, bytes, new_bytes, stored_bytes = stored, ?elapsed,
                    mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)),
                    "batch stored"
                );
            }
            BatchOutcome::Rejected { seq, why, code } => {
                self.roll_interval(false);
                if self.logged < FULL_PER_INTERVAL {
                    self.logged += 1;
                    warn!(from, seq, %why, %code, "batch rejected, no snapshot");
                } else {
                    self.unlogged += 1;
                    self.last_unlogged = Some(why.clone());
                }
            }
        }
        crate::monitor::batch_outcome(from, &outcome);
        (self.on_batch)(&outcome);
    }

    /// Logs invalid frames that belong to no batch (nothing to reject), under the same limit.
    pub(crate) fn note_unattributed(&mut self, why: &str) {
        self.roll_interval(false);
        if self.logged < FULL_PER_INTERVAL {
            self.logged += 1;
            warn!(from = %self.source, %why, "invalid frames outside any batch, skipped");
        } else {
            self.unlogged += 1;
            self.last_unlogged = Some(why.to_string());
        }
    }

    /// Logs the summary of an interval that has ended (call it while idle, too), or with `now`
    /// of the interval so far (when the segment stops being served).
    pub(crate) fn roll_interval(&mut self, now: bool) {
        if !now && self.interval_start.elapsed() < SUMMARY_INTERVAL {
            return;
        }
        if self.unlogged > 0 {
            warn!(
                from = %self.source,
                count = self.unlogged,
                last = self.last_unlogged.take().unwrap_or_default(),
                "{} more batches rejected (or invalid frames skipped) in the last {:.0?} (only the first {FULL_PER_INTERVAL} of an interval are \
                 logged in full): the producer on this source is broken or hostile",
                self.unlogged,
                self.interval_start.elapsed()
            );
        }
        self.interval_start = Instant::now();
        self.logged = 0;
        self.unlogged = 0;
    }
}
