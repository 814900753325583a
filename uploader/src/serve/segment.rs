//! The serve loop of one source (a segment, or an HTTP body): it owns the source's [`Ring`]
//! (frame source and decoder) for as long as it serves, collects each batch's manifest, hands
//! complete ones to [`run_batch`], and settles every outcome through its [`Reporter`].

use std::path::Path;
use std::sync::Arc;

use shmback_proto::{Consumer, RejectCode, RingError, Segment};
use tracing::info;

use super::batch::{Repo, run_batch};
use super::manifest::{Limits, Manifest};
use super::options::{BatchOutcome, ServeOptions};
use super::pump::{ManifestFrame, Pump, Ring};
use super::report::Reporter;
use super::shutdown::Shutdown;
use super::source::Source;

/// Why serving a segment stopped before the daemon did.
#[derive(Debug)]
pub(crate) enum SegmentStop {
    /// The ring can no longer be read: only this segment stops (or is attached again, if its
    /// file was damaged).
    Ring(RingError),
    /// Attaching the segment again after damage failed.
    Attach(shmback_proto::SegmentError),
    /// The repository failed between batches: every segment stops (they share it).
    Repository(anyhow::Error),
}

/// Serves the attached segment at `path` until `stop` is set (the batch in flight then gets
/// `opts.grace`), settling every batch's outcome, then calling `on_batch` with it.
pub(crate) fn serve_segment(
    repo: &mut Repo,
    path: &Path,
    consumer: Consumer<Segment>,
    opts: &ServeOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
    on_batch: impl FnMut(&BatchOutcome),
) -> Result<(), SegmentStop> {
    let label = path.display().to_string();
    let mut consumer = consumer;
    // Producers that know want-lists ask for one per batch from now on.
    consumer.answer_want_lists();
    serve_source(repo, &label, Source::Ring(consumer), opts, stop, on_batch)
}

/// Serves `source` until `stop` is set or the source is exhausted (an HTTP body carries one
/// batch): the same loop, decoder and gate for every transport.
pub(crate) fn serve_source(
    repo: &mut Repo,
    label: &str,
    source: Source,
    opts: &ServeOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
    on_batch: impl FnMut(&BatchOutcome),
) -> Result<(), SegmentStop> {
    let shutdown = Shutdown::new(stop, opts.grace);
    let ring = Arc::new(Ring::new(Pump::new(source, opts.tick, opts.batch_idle, shutdown)));
    let mut reporter = Reporter::new(label, on_batch);
    let result = manifest_loop(repo, &ring, opts, &mut reporter);
    reporter.roll_interval(true);
    result
}

fn manifest_loop(
    repo: &mut Repo,
    ring: &Arc<Ring>,
    opts: &ServeOptions,
    reporter: &mut Reporter<impl FnMut(&BatchOutcome)>,
) -> Result<(), SegmentStop> {
    let limits = Limits { max_entries: opts.max_entries, max_bytes: opts.max_manifest_bytes };
    let mut open: Option<Manifest> = None;
    loop {
        let mut pump = ring.lock();
        if pump.shutdown.requested() && (open.is_none() || pump.shutdown.expired()) {
            if let Some(m) = open.take() {
                let why = pump.shutdown.reason();
                reject(reporter, &mut pump, m.seq(), why, RejectCode::ShuttingDown);
            }
            return Ok(());
        }
        let frame = match pump.next_manifest_frame() {
            Ok(frame) => frame,
            Err(e) => {
                if let Some(m) = open.take() {
                    reject(reporter, &mut pump, m.seq(), e.to_string(), RejectCode::Malformed);
                }
                return Err(SegmentStop::Ring(e));
            }
        };
        match frame {
            ManifestFrame::Nothing => {
                if let Some(why) = open.as_ref().and_then(|_| pump.stalled()) {
                    let seq = open.take().map_or(0, |m| m.seq());
                    reject(reporter, &mut pump, seq, why, RejectCode::Stalled);
                }
                if pump.source().exhausted() {
                    return Ok(());
                }
                reporter.roll_interval(false);
            }
            ManifestFrame::ProducerGone => {
                if let Some(m) = open.take() {
                    let why = "the producer died or left while sending the manifest".to_string();
                    reject(reporter, &mut pump, m.seq(), why, RejectCode::Aborted);
                }
                if pump.source().exhausted() {
                    return Ok(());
                }
            }
            ManifestFrame::Begin { begin, interrupted } => {
                if let Some(seq) = interrupted {
                    let why = "torn: the producer began a new batch".to_string();
                    reporter.settle(pump.source(), BatchOutcome::Rejected { seq, why, code: RejectCode::Aborted });
                }
                open = None;
                if begin.seq <= pump.source().last_durable_seq() {
                    info!(seq = begin.seq, "batch already stored; skipping its frames");
                    pump.skip_rest_of_batch();
                    pump.source().already_stored(begin.seq);
                    continue;
                }
                open = Some(Manifest::new(begin));
            }
            ManifestFrame::Entry(entry) => {
                let Some(m) = &mut open else { continue };
                if let Err(why) = m.entries.push(entry, limits) {
                    let seq = m.seq();
                    open = None;
                    reject(reporter, &mut pump, seq, why, RejectCode::TooLarge);
                }
            }
            ManifestFrame::EndOfManifest => {
                let Some(manifest) = open.take() else { continue };
                drop(pump);
                let (outcome, reloaded) = run_batch(repo, ring, manifest, opts);
                reporter.settle(ring.lock().source(), outcome);
                reloaded.map_err(SegmentStop::Repository)?;
            }
            ManifestFrame::Abort { seq, reason } => {
                open = None;
                let why = format!("the producer aborted it: {reason}");
                reporter.settle(pump.source(), BatchOutcome::Rejected { seq, why, code: RejectCode::Aborted });
            }
            ManifestFrame::Skipped => {}
            ManifestFrame::Invalid(why) => {
                // With no batch open (its BEGIN itself was bad), the one the producer last began
                // is rejected, unless it is answered already.
                match open.take().map(|m| m.seq()).or_else(|| pump.unanswered_begun_seq()) {
                    Some(seq) => reject(reporter, &mut pump, seq, why, RejectCode::Malformed),
                    None => reporter.note_unattributed(&why),
                }
                if let Some(e) = pump.unusable() {
                    return Err(SegmentStop::Ring(e));
                }
            }
        }
    }
}

/// Rejects batch `seq` from the manifest phase: its remaining frames are skipped up to the next
/// BEGIN.
fn reject(
    reporter: &mut Reporter<impl FnMut(&BatchOutcome)>,
    pump: &mut Pump,
    seq: u64,
    why: String,
    code: RejectCode,
) {
    pump.skip_rest_of_batch();
    reporter.settle(pump.source(), BatchOutcome::Rejected { seq, why, code });
}
