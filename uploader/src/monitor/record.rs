//! What serving records: each batch's outcome, the repository's snapshot count, and each ring's
//! fill and producer. The names are the project's metric scheme (docs/metrics.md lists them).

use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use shmback_proto::{Consumer, RejectCode, Segment};

use crate::serve::BatchOutcome;

/// Distinct `source` labels kept; later sources are counted as [`OTHER_SOURCE`]. HTTP producers
/// name themselves, and a series per name would let a client grow the daemon's memory and the
/// Prometheus database without bound.
const MAX_SOURCES: usize = 64;
/// The `source` label of sources beyond [`MAX_SOURCES`].
const OTHER_SOURCE: &str = "other";

/// `source` as a label value: itself while fewer than [`MAX_SOURCES`] were seen.
fn source_label(source: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = SEEN.get_or_init(Mutex::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.contains(source) {
        return source.to_string();
    }
    if seen.len() < MAX_SOURCES {
        seen.insert(source.to_string());
        return source.to_string();
    }
    OTHER_SOURCE.to_string()
}

/// Seconds since the Unix epoch, as Prometheus timestamps are.
fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Registers `source`'s batch counters at zero, so that its first failure is an increase (a
/// counter that appears at 1 shows no `increase()` in Prometheus).
pub(crate) fn source_started(source: &str) {
    let source = source_label(source);
    for result in ["stored", "rejected", "failed"] {
        counter!("shmback_batches_total", "source" => source.clone(), "result" => result).increment(0);
    }
}

/// Records how one batch of `source` (a segment's path, or `http:PRODUCER`) ended.
pub(crate) fn batch_outcome(source: &str, outcome: &BatchOutcome) {
    let source = source_label(source);
    match outcome {
        BatchOutcome::Stored { snapshot, elapsed, .. } => {
            counter!("shmback_batches_total", "source" => source.clone(), "result" => "stored").increment(1);
            histogram!("shmback_batch_duration_seconds").record(elapsed.as_secs_f64());
            if let Some(s) = &snapshot.summary {
                counter!("shmback_files_total", "state" => "new").increment(s.files_new);
                counter!("shmback_files_total", "state" => "changed").increment(s.files_changed);
                counter!("shmback_files_total", "state" => "unmodified").increment(s.files_unmodified);
                counter!("shmback_processed_bytes_total").increment(s.total_bytes_processed);
                counter!("shmback_added_bytes_total").increment(s.data_added);
                counter!("shmback_stored_bytes_total").increment(s.data_added_packed);
            }
            gauge!("shmback_last_success_timestamp_seconds", "source" => source).set(unix_now());
        }
        BatchOutcome::Rejected { code, .. } => {
            // The storage failed us: "failed". Anything else is the producer's batch (malformed,
            // aborted, stalled, too large) or the daemon stopping: "rejected".
            let result = if *code == RejectCode::StorageFailed { "failed" } else { "rejected" };
            counter!("shmback_batches_total", "source" => source, "result" => result).increment(1);
        }
    }
}

/// Records the repository's snapshot count.
pub(crate) fn snapshots(count: usize) {
    gauge!("shmback_snapshots").set(count as f64);
}

/// How often a ring's gauges are refreshed.
const RING_SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Refreshes a segment's `shmback_ring_fill_ratio` and `shmback_producer_alive`, at most once
/// per [`RING_SAMPLE_EVERY`]: the serve loop calls it on every wait, which is once per frame.
#[derive(Default)]
pub(crate) struct RingSampler {
    last: Option<Instant>,
}

impl RingSampler {
    /// Samples `ring` if the last sample is old enough.
    pub(crate) fn sample(&mut self, ring: &Consumer<Segment>) {
        if self.last.is_some_and(|at| at.elapsed() < RING_SAMPLE_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        let segment = ring.memory().path().display().to_string();
        let ratio = ring.filled() as f64 / ring.capacity().max(1) as f64;
        gauge!("shmback_ring_fill_ratio", "segment" => segment.clone()).set(ratio);
        gauge!("shmback_producer_alive", "segment" => segment).set(if ring.producer_alive() { 1.0 } else { 0.0 });
    }
}

/// Records when the daemon started (alert rules tell a daemon that never stored anything from
/// one that just started).
pub(super) fn started() {
    gauge!("shmback_start_timestamp_seconds").set(unix_now());
}

/// HELP lines of the metrics this crate records (the scheduler's and hooks' describe their own,
/// or show without help).
pub(super) fn describe() {
    describe_gauge!("shmback_start_timestamp_seconds", Unit::Seconds, "When the daemon started.");
    describe_counter!("shmback_batches_total", "Batches by source and result (stored, rejected, failed).");
    describe_histogram!("shmback_batch_duration_seconds", Unit::Seconds, "Time from BEGIN to the stored snapshot.");
    describe_counter!("shmback_files_total", "Files of stored batches, by state (new, changed, unmodified).");
    describe_counter!("shmback_processed_bytes_total", Unit::Bytes, "File bytes of stored batches.");
    describe_counter!(
        "shmback_added_bytes_total",
        Unit::Bytes,
        "Bytes new to the repository (after deduplication, before compression)."
    );
    describe_counter!("shmback_stored_bytes_total", Unit::Bytes, "Bytes written to the repository (packed).");
    describe_gauge!("shmback_last_success_timestamp_seconds", Unit::Seconds, "When a source's last batch was stored.");
    describe_gauge!("shmback_snapshots", "Snapshots in the repository, counted after each stored batch.");
    describe_gauge!("shmback_ring_fill_ratio", "How full a segment's ring is (0 to 1); near 1 the uploader is behind.");
    describe_gauge!("shmback_producer_alive", "1 while a producer is attached to the segment.");
    describe_counter!("shmback_backend_retries_total", "Backend requests retried, by failure class.");
    describe_counter!("shmback_backend_errors_total", "Backend requests failed for good, by failure class.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_beyond_the_cap_share_one_label() {
        let mine: Vec<String> = (0..MAX_SOURCES + 5).map(|i| format!("http:cap-test-{i}")).collect();
        let labels: Vec<String> = mine.iter().map(|s| source_label(s)).collect();
        // Other tests of this process may have taken some of the slots: at most MAX_SOURCES are
        // kept, and a kept one stays kept.
        let kept = labels.iter().filter(|l| *l != OTHER_SOURCE).count();
        assert!(kept <= MAX_SOURCES && kept > 0);
        assert!(labels[MAX_SOURCES..].iter().all(|l| l == OTHER_SOURCE));
        assert_eq!(source_label(&mine[0]), labels[0]);
    }
}
