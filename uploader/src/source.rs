//! The batch source: one decoded batch as a rustic_core `ReadSource`.
//!
//! The manifest is read before `archive()` starts, so `entries()` never waits on data (rustic's
//! one-entry lookahead cannot deadlock). File data is in the ring in manifest order; rustic opens
//! files from several worker threads, so readers take turns on the [`Pump`]: the reader whose file
//! owns the next DATA frame copies it straight from the ring into rustic's buffer (one copy), the
//! others wait. Files rustic drops unopened (unchanged since the parent snapshot) are marked
//! skipped and their bytes drained by whoever holds the pump next.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustic_core::{ReadSource, ReadSourceEntry, ReadSourceOpen, RusticResult};
use shmback_proto::batch::Event;
use shmback_proto::frame::FrameKind;
use shmback_proto::{BatchDecoder, Consumer, Entry, EntryKind, RejectCode, RingError, Segment};

use crate::node::entry_to_node;

/// How a batch ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BatchEnd {
    /// COMMIT arrived and the decoder validated the whole batch.
    Committed,
    /// No snapshot may be made: why, and the code for the producer.
    Failed(String, RejectCode),
}

/// A DATA frame fed to the decoder but not yet fully read.
#[derive(Clone, Copy)]
struct Pending {
    pos: u64,
    file: u64,
    read: usize,
    last: bool,
}

/// The ring, the decoder and the bookkeeping of one batch's data phase.
pub struct Pump {
    pub(crate) consumer: Consumer<Segment>,
    pub(crate) decoder: BatchDecoder,
    /// File `i` is fully delivered when `i < completed_below`.
    completed_below: u64,
    pending: Option<Pending>,
    skipped: HashSet<u64>,
    /// A file that was opened but not read to its end (rustic gave up on it): no snapshot.
    incomplete: Option<u64>,
    end: Option<BatchEnd>,
    tick: Duration,
    shutdown: Shutdown,
}

/// The daemon's stop flag and how long a batch in flight may still take once it is set.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Set by SIGTERM/SIGINT (or by a failing sibling segment).
    pub stop: Arc<AtomicBool>,
    /// How long a batch in flight may still take after `stop` is set before it is abandoned.
    pub grace: Duration,
    seen: Option<Instant>,
}

impl Shutdown {
    /// A shutdown policy over `stop`.
    pub fn new(stop: Arc<AtomicBool>, grace: Duration) -> Self {
        Shutdown { stop, grace, seen: None }
    }

    /// True once `stop` has been set for longer than the grace period.
    pub fn expired(&mut self) -> bool {
        if !self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.seen.get_or_insert_with(Instant::now).elapsed() >= self.grace
    }

    /// Why a batch was abandoned.
    pub fn reason(&self) -> String {
        format!(
            "the uploader is shutting down and the batch did not finish within the {:?} grace period \
             (--grace); no snapshot was made: resend the batch when the uploader is back",
            self.grace
        )
    }
}

/// What one step on the ring produced.
enum Step {
    /// The next DATA frame belongs to this file.
    Owner(u64),
    /// Something changed (a file completed, the batch ended): re-check.
    Progress,
    /// Nothing arrived within a tick.
    Idle,
}

impl Pump {
    pub(crate) fn new(consumer: Consumer<Segment>, decoder: BatchDecoder, tick: Duration, shutdown: Shutdown) -> Self {
        Pump {
            consumer,
            decoder,
            completed_below: 0,
            pending: None,
            skipped: HashSet::new(),
            incomplete: None,
            end: None,
            tick,
            shutdown,
        }
    }

    fn fail(&mut self, why: String, code: RejectCode) {
        if self.end.is_none() {
            self.end = Some(BatchEnd::Failed(why, code));
        }
    }

    /// Finds out who owns the next DATA frame, consuming END_OF_FILE / COMMIT / ABORT frames and
    /// failing the batch on anything invalid. Waits at most one tick for data.
    fn step(&mut self) -> Step {
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
        match self.consumer.wait(self.tick) {
            Ok(()) => {}
            Err(RingError::Timeout { .. }) => return Step::Idle,
            Err(RingError::PeerGone { .. }) => {
                self.fail("the producer died or left mid-batch".into(), RejectCode::Aborted);
                return Step::Progress;
            }
            Err(e) => {
                self.fail(e.to_string(), RejectCode::Malformed);
                return Step::Progress;
            }
        }
        let frame = match self.consumer.peek() {
            Ok(Some(f)) => f,
            Ok(None) => return Step::Idle,
            Err(e) => {
                self.fail(e.to_string(), RejectCode::Malformed);
                return Step::Progress;
            }
        };
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
    fn take_pending(&mut self, buf: Option<&mut [u8]>) -> usize {
        let Some(p) = self.pending else { return 0 };
        let frame = match self.consumer.peek() {
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
    /// skipped files, and returns how it ended. A file nobody read to its end fails it.
    pub(crate) fn finish(&mut self) -> BatchEnd {
        loop {
            match self.step() {
                Step::Owner(file) => {
                    if !self.skipped.contains(&file) && self.incomplete.is_none() {
                        self.incomplete = Some(file);
                    }
                    self.take_pending(None);
                }
                Step::Progress | Step::Idle => {}
            }
            if let Some(end) = &self.end {
                let mut end = end.clone();
                if let (BatchEnd::Committed, Some(file)) = (&end, self.incomplete) {
                    end = BatchEnd::Failed(
                        format!("file {file} of the batch was not read to its end by the archiver"),
                        RejectCode::StorageFailed,
                    );
                }
                return end;
            }
        }
    }
}

/// The pump shared by the readers, the source and the snapshot gate.
pub struct Shared {
    pump: Mutex<Pump>,
    turn: Condvar,
}

impl Shared {
    pub(crate) fn new(pump: Pump) -> Arc<Self> {
        Arc::new(Shared { pump: Mutex::new(pump), turn: Condvar::new() })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Pump> {
        self.pump.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pump back after the batch.
    pub(crate) fn into_pump(self: Arc<Self>) -> Option<Pump> {
        Arc::into_inner(self).map(|s| s.pump.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    fn skip(&self, file: u64, opened_but_unfinished: bool) {
        let mut p = self.lock();
        if p.completed_below <= file {
            p.skipped.insert(file);
            if opened_but_unfinished && p.incomplete.is_none() {
                p.incomplete = Some(file);
            }
        }
        drop(p);
        self.turn.notify_all();
    }

    /// Reads file `file`'s next bytes into `buf`: 0 at its end.
    fn read(&self, file: u64, buf: &mut [u8]) -> io::Result<usize> {
        let mut p = self.lock();
        loop {
            match &p.end {
                Some(BatchEnd::Failed(why, _)) => return Err(io::Error::other(why.clone())),
                // The decoder accepts COMMIT only after every file's bytes: nothing is left.
                Some(BatchEnd::Committed) => return Ok(0),
                None => {}
            }
            if p.completed_below > file || p.decoder.file_sizes().get(file as usize) == Some(&Some(0)) {
                return Ok(0);
            }
            match p.step() {
                Step::Owner(owner) if owner == file => {
                    let n = p.take_pending(Some(buf));
                    if n > 0 || buf.is_empty() {
                        drop(p);
                        self.turn.notify_all();
                        return Ok(n);
                    }
                }
                Step::Owner(owner) if p.skipped.contains(&owner) => {
                    p.take_pending(None);
                    self.turn.notify_all();
                }
                Step::Owner(owner) if owner < file => {
                    // Another reader's turn (or a file not opened yet): wait for progress.
                    p = self
                        .turn
                        .wait_timeout(p, Duration::from_millis(50))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                Step::Owner(owner) => {
                    let why = format!("data for file {owner} arrived while file {file} was incomplete");
                    p.fail(why, RejectCode::Malformed);
                }
                Step::Progress => self.turn.notify_all(),
                Step::Idle => {}
            }
        }
    }
}

/// A file's handle before rustic opens it. Dropped unopened (parent matched): its bytes are skipped.
pub struct BatchOpen {
    shared: Arc<Shared>,
    file: u64,
    opened: bool,
}

impl ReadSourceOpen for BatchOpen {
    type Reader = BatchReader;
    fn open(mut self) -> RusticResult<BatchReader> {
        self.opened = true;
        Ok(BatchReader { shared: self.shared.clone(), file: self.file, done: false })
    }
}

impl Drop for BatchOpen {
    fn drop(&mut self) {
        if !self.opened {
            self.shared.skip(self.file, false);
        }
    }
}

/// A file's bytes, read from the ring in its turn.
pub struct BatchReader {
    shared: Arc<Shared>,
    file: u64,
    done: bool,
}

impl Read for BatchReader {
    /// Fills `buf` completely unless the file ends (a short read means the end). rustic_core's
    /// chunker shrinks its read buffer to the length of any short read and never grows it back, so
    /// returning frame by frame made it read a byte at a time after a few unaligned frames
    /// (measured: a 64 MiB file at 3.9 MiB/s; see docs/decisions/0003-vendored-rustic-core.md).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut filled = 0;
        while filled < buf.len() && !self.done {
            match self.shared.read(self.file, &mut buf[filled..]) {
                Ok(0) => self.done = true,
                Ok(n) => filled += n,
                // Bytes already copied are returned; the failure repeats on the next call.
                Err(_) if filled > 0 => break,
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }
}

impl Drop for BatchReader {
    fn drop(&mut self) {
        if !self.done {
            self.shared.skip(self.file, true);
        }
    }
}

/// One batch's manifest as a rustic_core source.
pub struct BatchSource {
    entries: Mutex<Option<Vec<ReadSourceEntry<BatchOpen>>>>,
    size: u64,
}

impl BatchSource {
    /// Builds the source for `entries` (the validated manifest) over `shared`.
    pub(crate) fn new(entries: &[Entry], shared: &Arc<Shared>) -> RusticResult<Self> {
        let mut out = Vec::with_capacity(entries.len());
        let mut file = 0u64;
        let mut size = 0;
        for e in entries {
            let open = (e.kind == EntryKind::File).then(|| {
                let o = BatchOpen { shared: shared.clone(), file, opened: false };
                file += 1;
                o
            });
            size += e.size.unwrap_or(0);
            let path = PathBuf::from(OsStr::from_bytes(&e.path));
            out.push(ReadSourceEntry { path, node: entry_to_node(e), open });
        }
        Ok(BatchSource { entries: Mutex::new(Some(out)), size })
    }
}

impl ReadSource for BatchSource {
    type Open = BatchOpen;
    type Iter = std::iter::Map<
        std::vec::IntoIter<ReadSourceEntry<BatchOpen>>,
        fn(ReadSourceEntry<BatchOpen>) -> RusticResult<ReadSourceEntry<BatchOpen>>,
    >;

    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(Some(self.size))
    }

    fn entries(&self) -> Self::Iter {
        let v = self.entries.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        v.into_iter().map(Ok as fn(_) -> _)
    }
}
