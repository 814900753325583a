//! The rustic side of a batch: its manifest as a rustic_core `ReadSource`, and its files as
//! readers that take turns on the segment's [`Ring`].
//!
//! The manifest is complete before `archive()` starts, so `entries()` never waits on data
//! (rustic's one-entry lookahead cannot deadlock). File data is in the ring in manifest order;
//! rustic opens files from several worker threads, so the reader whose file owns the next DATA
//! frame copies it straight from the ring into rustic's buffer (one copy), the others wait. Files
//! rustic drops unopened (unchanged since the parent snapshot) are marked skipped and their bytes
//! drained by whoever steps the pump next; with a want-list (`want.rs`) their bytes never come,
//! and a left-out file the archiver opens after all fails the batch at once.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rustic_core::{ReadSource, ReadSourceEntry, ReadSourceOpen, RusticResult};
use shmback_proto::{EntryKind, RejectCode};

use super::manifest::{Entries, EntryIter};
use super::node::entry_to_node;
use super::pump::{BatchEnd, Ring, Step};

/// Reads file `file`'s next bytes into `buf`: 0 at its end.
fn read(ring: &Ring, file: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut pump = ring.lock();
    loop {
        match pump.end() {
            Some(BatchEnd::Failed(why, _)) => return Err(io::Error::other(why.clone())),
            // The decoder accepts COMMIT only after every file's bytes: nothing is left.
            Some(BatchEnd::Committed) => return Ok(0),
            None => {}
        }
        if !pump.file_wanted(file) {
            // The want-list left it out because the parent had it unchanged, yet the archiver
            // wants its bytes: the parent changed since (removed, or its data gone from the
            // index). No data will come; the batch fails and the producer sends it again.
            let why = format!(
                "file {file} was left out by the want-list (unchanged since the parent snapshot), but the \
                 archiver reads it: the parent snapshot or its data changed between the want-list and the \
                 archive; send the batch again"
            );
            pump.fail(why.clone(), RejectCode::StorageFailed);
            drop(pump);
            ring.notify();
            return Err(io::Error::other(why));
        }
        if pump.file_done(file) {
            return Ok(0);
        }
        match pump.step() {
            Step::Owner(owner) if owner == file => {
                let n = pump.take_pending(Some(buf));
                if n > 0 || buf.is_empty() {
                    drop(pump);
                    ring.notify();
                    return Ok(n);
                }
            }
            Step::Owner(owner) if pump.is_skipped(owner) => {
                pump.take_pending(None);
                ring.notify();
            }
            // Another reader's turn (or a file not opened yet): wait for progress.
            Step::Owner(owner) if owner < file => pump = ring.wait_turn(pump),
            Step::Owner(owner) => {
                let why = format!("data for file {owner} arrived while file {file} was incomplete");
                pump.fail(why, RejectCode::Malformed);
            }
            Step::Progress => ring.notify(),
            Step::Idle => {}
        }
    }
}

fn skip(ring: &Ring, file: u64, opened_but_unfinished: bool) {
    ring.lock().mark_skipped(file, opened_but_unfinished);
    ring.notify();
}

/// A file's handle before rustic opens it. Dropped unopened (parent matched): its bytes are skipped.
pub(crate) struct BatchOpen {
    ring: Arc<Ring>,
    file: u64,
    opened: bool,
}

impl ReadSourceOpen for BatchOpen {
    type Reader = BatchReader;
    fn open(mut self) -> RusticResult<BatchReader> {
        self.opened = true;
        Ok(BatchReader { ring: self.ring.clone(), file: self.file, done: false })
    }
}

impl Drop for BatchOpen {
    fn drop(&mut self) {
        if !self.opened {
            skip(&self.ring, self.file, false);
        }
    }
}

/// A file's bytes, read from the ring in its turn.
pub(crate) struct BatchReader {
    ring: Arc<Ring>,
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
            match read(&self.ring, self.file, &mut buf[filled..]) {
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
            skip(&self.ring, self.file, true);
        }
    }
}

/// One batch's manifest as a rustic_core source. Its entries are handed out once.
pub(crate) struct BatchSource {
    entries: Mutex<Option<Entries>>,
    ring: Arc<Ring>,
    size: u64,
}

impl BatchSource {
    pub(crate) fn new(entries: Entries, ring: Arc<Ring>) -> Self {
        let size = entries.declared_bytes();
        BatchSource { entries: Mutex::new(Some(entries)), ring, size }
    }
}

impl Drop for BatchSource {
    fn drop(&mut self) {
        // archive() failed before it asked for the entries: every file is skipped.
        if let Some(entries) = self.entries.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            drop(SourceEntries { entries: entries.into_iter(), ring: self.ring.clone(), next_file: 0 });
        }
    }
}

/// The manifest's entries as rustic's, built one at a time (the manifest stays compact).
pub(crate) struct SourceEntries {
    entries: EntryIter,
    ring: Arc<Ring>,
    /// Index of the next file entry among the batch's files.
    next_file: u64,
}

impl Iterator for SourceEntries {
    type Item = RusticResult<ReadSourceEntry<BatchOpen>>;

    fn next(&mut self) -> Option<Self::Item> {
        let e = self.entries.next()?;
        let open = (e.kind == EntryKind::File).then(|| {
            self.next_file += 1;
            BatchOpen { ring: self.ring.clone(), file: self.next_file - 1, opened: false }
        });
        let node = entry_to_node(&e);
        Some(Ok(ReadSourceEntry { path: PathBuf::from(OsStr::from_bytes(&e.path)), node, open }))
    }
}

/// Files the archiver never asked for (it stopped early) are skipped like files it dropped
/// unopened, so the rest of the batch drains and the real failure is the one reported.
impl Drop for SourceEntries {
    fn drop(&mut self) {
        let files = self.entries.by_ref().filter(|e| e.kind == EntryKind::File).count() as u64;
        if files > 0 {
            let mut pump = self.ring.lock();
            for file in self.next_file..self.next_file + files {
                pump.mark_skipped(file, false);
            }
            drop(pump);
            self.ring.notify();
        }
    }
}

impl ReadSource for BatchSource {
    type Open = BatchOpen;
    type Iter = SourceEntries;

    fn size(&self) -> RusticResult<Option<u64>> {
        Ok(Some(self.size))
    }

    fn entries(&self) -> Self::Iter {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner()).take().unwrap_or_default();
        SourceEntries { entries: entries.into_iter(), ring: self.ring.clone(), next_file: 0 }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use shmback_proto::{Begin, Entry, Frame, Labels, Segment, SegmentOptions, WantList};

    use super::*;
    use crate::serve::pump::{ManifestFrame, Pump};
    use crate::serve::shutdown::Shutdown;
    use crate::serve::source::Source;

    const T: Duration = Duration::from_secs(10);

    fn file(path: &str, size: u64) -> Frame<'static> {
        let path = path.as_bytes().to_vec();
        Frame::Entry(Entry {
            path,
            kind: EntryKind::File,
            size: Some(size),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            target: vec![],
        })
    }

    /// The engine opens a file the want-list left out (its pinned parent vanished): the reader
    /// fails the batch at once instead of waiting for bytes that will never come; the wanted
    /// file's bytes still arrive whole.
    #[test]
    fn a_left_out_file_the_archiver_opens_fails_the_batch_at_once() {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = shm.path().join("seg");
        let opts = SegmentOptions { capacity: Some(64 << 10), ..SegmentOptions::default() };
        let mut consumer = Segment::consumer(&path, &opts).unwrap();
        consumer.answer_want_lists();
        let mut producer = Segment::producer(&path, &opts).unwrap();
        let epoch = producer.consumer_epoch();
        for f in [Frame::Begin(Begin { seq: 1, labels: Labels::default() }), Frame::Want, file("a", 3), file("b", 2)] {
            producer.send(&f, T).unwrap();
        }
        producer.send(&Frame::EndOfManifest { entries: 2 }, T).unwrap();
        producer.flush();

        let shutdown = Shutdown::new(Arc::new(AtomicBool::new(false)), T);
        let ring = Arc::new(Ring::new(Pump::new(Source::Ring(consumer), Duration::from_millis(10), T, shutdown)));
        loop {
            match ring.lock().next_manifest_frame().unwrap() {
                ManifestFrame::EndOfManifest => break,
                ManifestFrame::Invalid(why) => panic!("{why}"),
                _ => {}
            }
        }
        assert!(ring.lock().want_asked());
        ring.lock().start_data();
        let mut list = WantList::none_of(2);
        list.want(1);
        assert_eq!(ring.lock().publish_want(&list), list);

        let got = producer.wait_want(1, epoch, 2, T).unwrap();
        assert_eq!(got, list);
        producer.send(&Frame::Wanted { covered: got.covered(), digest: got.digest() }, T).unwrap();
        producer.send(&Frame::Data(b"bb"), T).unwrap();
        producer.send(&Frame::Commit { entries: 2, bytes: 2 }, T).unwrap();
        producer.flush();

        let mut buf = [0u8; 8];
        assert_eq!(read(&ring, 1, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"bb");
        let e = read(&ring, 0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("left out by the want-list"), "{e}");
        match ring.lock().end() {
            Some(BatchEnd::Failed(why, RejectCode::StorageFailed)) => {
                assert!(why.contains("send the batch again"), "{why}")
            }
            other => panic!("the batch must fail as storage-failed (resend), got {other:?}"),
        }
    }
}
