//! The frame side of a producer: its [`Source`] (a segment's ring or an HTTP body), the batch
//! decoder, and what the frames of the batch in flight have delivered so far. The serve loop reads a batch's manifest through
//! [`Pump::next_manifest_frame`]; during the data phase the archiver's file readers
//! (`reader.rs`) drive [`Pump::step`] and [`Pump::take_pending`] in turns.
//!
//! One [`Ring`] (the pump behind a lock, and the condition readers wait on for their turn) lives
//! as long as the segment is served, so the consumer and decoder stay where they are between
//! batches.
//!
//! A little over the house's ~400 lines: the data phase's bookkeeping is one state machine.

use std::collections::HashSet;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use shmback_proto::batch::Event;
use shmback_proto::frame::FrameKind;
use shmback_proto::{BatchDecoder, Begin, Entry, RejectCode, RingError, WantList};

use super::shutdown::Shutdown;
use super::source::Source;

/// How a batch's data phase ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BatchEnd {
    /// COMMIT arrived and the decoder validated the whole batch.
    Committed,
    /// No snapshot may be made: why, and the code for the producer.
    Failed(String, RejectCode),
}

/// What the ring gave the serve loop outside the data phase, owned (the frame is released
/// before the loop acts on it).
pub(crate) enum ManifestFrame {
    /// Nothing arrived within a tick.
    Nothing,
    /// The producer is gone and the ring is drained: a batch still open is torn.
    ProducerGone,
    /// A new batch; `interrupted` is the one it tore, if one was open.
    Begin {
        begin: Begin,
        interrupted: Option<u64>,
    },
    Entry(Entry),
    EndOfManifest,
    /// The producer aborted batch `seq`.
    Abort {
        seq: u64,
        reason: String,
    },
    /// A frame outside any batch (the tail of a batch torn before this consumer attached).
    Skipped,
    /// A frame the batch cannot take, or bytes that are no frame (a corrupt ring discards
    /// everything published): the open batch is rejected and the rest of it skipped.
    Invalid(String),
}

/// A DATA frame fed to the decoder but not yet fully copied out.
#[derive(Clone, Copy)]
struct Pending {
    pos: u64,
    file: u64,
    read: usize,
    last: bool,
}

/// What one step on the ring produced in the data phase.
pub(crate) enum Step {
    /// The next DATA frame belongs to this file.
    Owner(u64),
    /// Something changed (a file completed, the batch ended): re-check.
    Progress,
    /// Nothing arrived within a tick.
    Idle,
}

/// The frame source, the decoder and the bookkeeping of the batch in flight.
pub(crate) struct Pump {
    source: Source,
    decoder: BatchDecoder,
    tick: Duration,
    /// Zero: a stalled producer is waited for for ever.
    idle_limit: Duration,
    /// Since when the ring has been empty while we waited for the producer.
    waiting_since: Option<Instant>,
    pub(crate) shutdown: Shutdown,
    /// File `i` of the batch is fully delivered when `i < completed_below`.
    completed_below: u64,
    pending: Option<Pending>,
    skipped: HashSet<u64>,
    /// A file that was opened but not read to its end (rustic gave up on it): no snapshot.
    incomplete: Option<u64>,
    end: Option<BatchEnd>,
    /// A segment's fill and producer, for the metrics.
    sampler: crate::monitor::RingSampler,
}

impl Pump {
    pub(crate) fn new(source: Source, tick: Duration, idle_limit: Duration, shutdown: Shutdown) -> Self {
        Pump {
            source,
            decoder: BatchDecoder::new(),
            tick,
            idle_limit,
            waiting_since: None,
            shutdown,
            completed_below: 0,
            pending: None,
            skipped: HashSet::new(),
            incomplete: None,
            end: None,
            sampler: Default::default(),
        }
    }

    /// The frame source, to publish a batch's outcome.
    pub(crate) fn source(&mut self) -> &mut Source {
        &mut self.source
    }

    /// Leaves the open batch: its remaining frames are skipped up to the next BEGIN.
    pub(crate) fn skip_rest_of_batch(&mut self) {
        self.decoder.reset();
    }

    /// The sequence the producer last recorded as begun, if no outcome answers it yet.
    pub(crate) fn unanswered_begun_seq(&self) -> Option<u64> {
        self.source.unanswered_begun_seq()
    }

    /// A ring no producer can use any more (see `Consumer::unusable`), if this one is.
    pub(crate) fn unusable(&self) -> Option<RingError> {
        self.source.unusable()
    }

    /// Why a batch is rejected when the ring stayed empty past the idle limit, if it did.
    pub(crate) fn stalled(&self) -> Option<String> {
        let since = self.waiting_since?;
        (!self.idle_limit.is_zero() && since.elapsed() >= self.idle_limit).then(|| {
            format!(
                "the producer is alive but sent nothing for {:?} (--batch-idle, SHMBACK_BATCH_IDLE): \
                 the batch is rejected; resend it, or raise the limit for producers that pause longer",
                self.idle_limit
            )
        })
    }

    /// Waits one tick for the ring; `Ok(false)` when nothing arrived.
    fn wait(&mut self) -> Result<bool, RingError> {
        if let Source::Ring(c) = &self.source {
            self.sampler.sample(c);
        }
        match self.source.wait(self.tick) {
            Ok(()) => Ok(true),
            Err(RingError::Timeout { .. }) => {
                self.waiting_since.get_or_insert_with(Instant::now);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The next frame outside the data phase. Errors are the segment's, not a batch's: the ring
    /// cannot be waited on any more.
    pub(crate) fn next_manifest_frame(&mut self) -> Result<ManifestFrame, RingError> {
        match self.wait() {
            Ok(true) => {}
            Ok(false) => return Ok(ManifestFrame::Nothing),
            Err(RingError::PeerGone { .. }) => return Ok(ManifestFrame::ProducerGone),
            Err(e) => return Err(e),
        }
        let frame = match self.source.peek() {
            Ok(Some(frame)) => frame,
            // Published bytes that were only padding.
            Ok(None) => return Ok(ManifestFrame::Nothing),
            Err(e @ RingError::Corrupt { .. }) => {
                self.decoder.reset();
                return Ok(ManifestFrame::Invalid(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        self.waiting_since = None;
        let event = match frame.decode() {
            Ok(f) => self.decoder.feed(f).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let owned = match event {
            Ok(Event::Begin { begin, interrupted }) => ManifestFrame::Begin { begin, interrupted },
            Ok(Event::Entry { entry, .. }) => ManifestFrame::Entry(entry),
            Ok(Event::EndOfManifest { .. }) => ManifestFrame::EndOfManifest,
            Ok(Event::Abort { seq, reason, .. }) => ManifestFrame::Abort { seq, reason },
            Ok(Event::Skipped(_) | Event::WantAsked) => ManifestFrame::Skipped,
            Ok(other) => {
                let what: String = format!("{other:?}").chars().take(80).collect();
                ManifestFrame::Invalid(format!("unexpected {what} outside a batch's data"))
            }
            Err(why) => ManifestFrame::Invalid(why),
        };
        frame.release();
        if matches!(owned, ManifestFrame::Invalid(_)) {
            // A frame the codec refused never reached the decoder: leave the batch either way.
            self.decoder.reset();
        }
        Ok(owned)
    }

    /// Clears the previous batch's data-phase bookkeeping before a new batch's data.
    pub(crate) fn start_data(&mut self) {
        self.completed_below = 0;
        self.pending = None;
        self.skipped.clear();
        self.incomplete = None;
        self.end = None;
        self.waiting_since = None;
    }

    /// Whether the open batch asked for a want-list (its producer waits for one).
    pub(crate) fn want_asked(&self) -> bool {
        self.decoder.want_asked()
    }

    /// Answers the open batch's WANT with `list` (published into the segment; only a ring's
    /// producer can ask) and returns the list as published, which the batch's WANTED must name.
    pub(crate) fn publish_want(&mut self, list: &WantList) -> WantList {
        let seq = self.decoder.seq();
        let published = match &mut self.source {
            Source::Ring(c) => c.publish_want(seq, list),
            Source::Body(_) => WantList::all(),
        };
        self.decoder.answer_want(published.clone());
        published
    }

    /// Whether file `file` gets data (false: the applied want-list left it out).
    pub(crate) fn file_wanted(&self, file: u64) -> bool {
        self.decoder.file_wanted(file)
    }

    /// How the data phase ended, once it has.
    pub(crate) fn end(&self) -> Option<&BatchEnd> {
        self.end.as_ref()
    }

    pub(crate) fn fail(&mut self, why: String, code: RejectCode) {
        if self.end.is_none() {
            self.end = Some(BatchEnd::Failed(why, code));
        }
    }

    /// Whether file `file` has all its bytes delivered (or has none).
    pub(crate) fn file_done(&self, file: u64) -> bool {
        self.completed_below > file || self.decoder.file_sizes().get(file as usize) == Some(&Some(0))
    }

    pub(crate) fn is_skipped(&self, file: u64) -> bool {
        self.skipped.contains(&file)
    }

    /// Marks a file the archiver will not read (any more): its bytes are drained by whoever
    /// steps next. One opened but abandoned part-way fails the batch at its end.
    pub(crate) fn mark_skipped(&mut self, file: u64, opened_but_unfinished: bool) {
        if self.completed_below <= file {
            self.skipped.insert(file);
            if opened_but_unfinished && self.incomplete.is_none() {
                self.incomplete = Some(file);
            }
        }
    }

    /// Finds out who owns the next DATA frame, consuming END_OF_FILE / COMMIT / ABORT frames and
    /// failing the batch on anything invalid. Waits at most one tick for data.
    pub(crate) fn step(&mut self) -> Step {
        if self.end.is_some() {
            return Step::Progress;
        }
        if self.shutdown.expired() {
            // Abandoned, whatever the readers were doing: no snapshot (the gate refuses it).
            self.pending = None;
            self.fail(self.shutdown.reason(), RejectCode::ShuttingDown);
            return Step::Progress;
        }
        if let Some(p) = self.pending {
            return Step::Owner(p.file);
        }
        match self.wait() {
            Ok(true) => {}
            Ok(false) => {
                if let Some(why) = self.stalled() {
                    self.fail(why, RejectCode::Stalled);
                    return Step::Progress;
                }
                return Step::Idle;
            }
            Err(RingError::PeerGone { .. }) => {
                self.fail("the producer died or left mid-batch".into(), RejectCode::Aborted);
                return Step::Progress;
            }
            Err(e) => {
                self.fail(e.to_string(), RejectCode::Malformed);
                return Step::Progress;
            }
        }
        let frame = match self.source.peek() {
            Ok(Some(f)) => f,
            Ok(None) => return Step::Idle,
            Err(e) => {
                self.fail(e.to_string(), RejectCode::Malformed);
                return Step::Progress;
            }
        };
        self.waiting_since = None;
        if frame.kind() == FrameKind::Begin as u8 {
            // The producer began anew: this batch is torn. The BEGIN stays for the serve loop.
            self.fail("torn: the producer restarted and began a new batch".into(), RejectCode::Aborted);
            return Step::Progress;
        }
        let pos = frame.position();
        let event = match frame.decode() {
            Ok(f) => self.decoder.feed(f).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        // Turn the event into owned facts before the frame is released.
        let (step, failure, release) = match event {
            Ok(Event::Data { file, last, .. }) => {
                // The decoder delivers files in order: every earlier file (including empty ones,
                // which get no DATA frames) is complete.
                self.completed_below = self.completed_below.max(file);
                self.pending = Some(Pending { pos, file, read: 0, last });
                (Step::Owner(file), None, false)
            }
            Ok(Event::EndOfFile { file, .. }) => {
                self.completed_below = file + 1;
                (Step::Progress, None, true)
            }
            Ok(Event::Commit { .. }) => {
                self.end = Some(BatchEnd::Committed);
                (Step::Progress, None, true)
            }
            Ok(Event::Wanted { .. }) => (Step::Progress, None, true),
            Ok(Event::Abort { reason, .. }) => {
                (Step::Progress, Some((format!("the producer aborted the batch: {reason}"), RejectCode::Aborted)), true)
            }
            Ok(other) => (
                Step::Progress,
                Some((format!("unexpected {other:?} in the data section"), RejectCode::Malformed)),
                true,
            ),
            Err(e) => (Step::Progress, Some((e, RejectCode::Malformed)), true),
        };
        if release {
            frame.release();
        }
        if let Some((why, code)) = failure {
            self.fail(why, code);
        }
        step
    }

    /// Copies bytes of the pending DATA frame into `buf` (or discards them when `buf` is None).
    pub(crate) fn take_pending(&mut self, buf: Option<&mut [u8]>) -> usize {
        let Some(p) = self.pending else { return 0 };
        let frame = match self.source.peek() {
            Ok(Some(f)) if f.position() == p.pos => f,
            _ => {
                self.pending = None;
                self.fail("the ring changed under a pending frame".into(), RejectCode::Malformed);
                return 0;
            }
        };
        let payload = frame.payload();
        let left = payload.len() - p.read;
        let n = match buf {
            Some(buf) => {
                let n = buf.len().min(left);
                buf[..n].copy_from_slice(&payload[p.read..p.read + n]);
                n
            }
            None => left,
        };
        if n == left {
            frame.release();
            self.pending = None;
            if p.last {
                self.completed_below = p.file + 1;
            }
        } else {
            self.pending = Some(Pending { read: p.read + n, ..p });
        }
        n
    }

    /// Reads the rest of the batch (after `archive()` has taken every file it wanted), draining
    /// skipped files, and returns how it ended. A file nobody read to its end fails it; so does a
    /// failure, after which the rest of the batch is skipped up to the next BEGIN.
    pub(crate) fn finish(&mut self) -> BatchEnd {
        let end = loop {
            if let Some(end) = &self.end {
                break end.clone();
            }
            if let Step::Owner(file) = self.step() {
                if !self.skipped.contains(&file) && self.incomplete.is_none() {
                    self.incomplete = Some(file);
                }
                self.take_pending(None);
            }
        };
        let end = match (end, self.incomplete) {
            (BatchEnd::Committed, Some(file)) => BatchEnd::Failed(
                format!("file {file} of the batch was not read to its end by the archiver"),
                RejectCode::StorageFailed,
            ),
            (end, _) => end,
        };
        if matches!(end, BatchEnd::Failed(..)) {
            self.decoder.reset();
        }
        self.end = Some(end.clone());
        end
    }
}

/// A segment's pump behind a lock, with the condition the archiver's readers wait on for their
/// turn. Shared by the serve loop, the readers of the batch in flight and the snapshot gate.
pub(crate) struct Ring {
    pump: Mutex<Pump>,
    turn: Condvar,
}

impl Ring {
    pub(crate) fn new(pump: Pump) -> Self {
        Ring { pump: Mutex::new(pump), turn: Condvar::new() }
    }

    /// The pump. A reader that panicked leaves it consistent (every change is a single step), so
    /// a poisoned lock is taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Pump> {
        self.pump.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes readers waiting for their turn.
    pub(crate) fn notify(&self) {
        self.turn.notify_all();
    }

    /// Waits (releasing the pump) until another reader made progress, or a short while.
    pub(crate) fn wait_turn<'a>(&self, pump: MutexGuard<'a, Pump>) -> MutexGuard<'a, Pump> {
        self.turn.wait_timeout(pump, Duration::from_millis(50)).map(|(g, _)| g).unwrap_or_else(|e| e.into_inner().0)
    }
}
