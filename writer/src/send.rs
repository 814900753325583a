//! The send pipeline of a committed batch: metadata re-read, BEGIN, the manifest, each file's
//! data straight from its source into reserved ring space, COMMIT; ABORT when a source changes.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use shmback_proto::frame::abort_code;
use shmback_proto::{Begin, Frame, FrameKind, Labels, Producer, Segment};

use crate::entries::{Source, mtime_ns};
use crate::entry_list::{FileData, Manifest};
use crate::error::WriteError;
use crate::progress::Progress;
use crate::ticket::Ticket;

/// The outbox's producing end and settings, borrowed by a batch for its whole life.
pub(crate) struct Channel<'o> {
    pub(crate) producer: &'o mut Producer<Segment>,
    /// The segment's path, to name it when no uploader attaches.
    pub(crate) segment: &'o Path,
    /// The outbox's labels, which the batch's own tags and values extend.
    pub(crate) labels: &'o Labels,
    pub(crate) timeout: Duration,
    pub(crate) frame_size: usize,
}

/// Sends `manifest` as one batch labelled `labels`. `start` is when the
/// commit began, for the ticket's elapsed time.
pub(crate) fn send_batch<'o>(
    channel: Channel<'o>,
    labels: Labels,
    mut manifest: Manifest<'o>,
    mut progress: impl FnMut(&Progress),
    start: Instant,
) -> Result<Ticket<'o>, WriteError> {
    manifest.refresh_metadata()?;

    let Channel { producer, segment, timeout, frame_size, .. } = channel;
    let ring = |e| WriteError::from_ring(e, timeout);

    // An uploader that has not attached yet (both starting together) is waited for; one that
    // leaves mid-batch is `UploaderGone` at once.
    if !producer.consumer_alive() {
        let segment = segment.display().to_string();
        producer.wait_for_consumer(timeout).map_err(|_| WriteError::NoUploader { segment, waited: timeout })?;
    }
    let seq = producer.next_batch_seq();
    let epoch = producer.consumer_epoch();
    let totals = Progress {
        entries: manifest.len() as u64,
        files_total: manifest.file_count(),
        bytes_total: manifest.file_bytes(),
        ..Progress::default()
    };
    producer.send(&Frame::Begin(Begin { seq, labels }), timeout).map_err(ring)?;
    producer.record_begun(seq);
    for i in 0..manifest.len() {
        producer.send(&Frame::Entry(manifest.entry(i)), timeout).map_err(ring)?;
    }
    producer.send(&Frame::EndOfManifest { entries: totals.entries }, timeout).map_err(ring)?;
    progress(&totals);

    let mut data = DataSender {
        producer,
        frame_size,
        timeout,
        progress: totals,
        report: &mut progress,
        last_report: Instant::now(),
    };
    for i in 0..manifest.len() {
        let Some(file) = manifest.take_file(i) else { continue };
        match data.send_file(file) {
            Ok(()) => {}
            Err(Failure::Source(e)) => {
                // Tell the uploader to drop the batch; if even that fails, the uploader tears
                // it when the next batch begins.
                let reason = e.to_string();
                let _ = data.producer.send(&Frame::Abort { code: abort_code::SOURCE_CHANGED, reason }, timeout);
                data.producer.flush();
                return Err(e);
            }
            Err(Failure::Ring(e)) => return Err(ring(e)),
        }
        data.progress.files_done += 1;
    }
    let DataSender { producer, progress: sent, .. } = data;
    producer.send(&Frame::Commit { entries: sent.entries, bytes: sent.bytes_done }, timeout).map_err(ring)?;
    producer.flush();
    progress(&sent);
    Ok(Ticket { producer, seq, epoch, progress: sent, elapsed: start.elapsed() })
}

enum Failure {
    /// The source misbehaved: abort the batch.
    Source(WriteError),
    /// The ring failed: the uploader is gone or stuck.
    Ring(shmback_proto::RingError),
}

impl Failure {
    /// `origin` no longer matches its manifest entry (or a reader lied about its size).
    fn changed(origin: &Path, what: String) -> Self {
        Failure::Source(WriteError::SourceChanged { path: origin.into(), what })
    }

    fn io(origin: &Path, source: std::io::Error) -> Self {
        Failure::Source(WriteError::Io { path: origin.into(), source })
    }
}

impl From<shmback_proto::RingError> for Failure {
    fn from(e: shmback_proto::RingError) -> Self {
        Failure::Ring(e)
    }
}

/// The data phase of a batch, from the end of its manifest to COMMIT: each file's bytes read
/// straight into reserved ring space as DATA frames, counted in `progress` as they go.
struct DataSender<'p, 'r> {
    producer: &'p mut Producer<Segment>,
    /// Payload bytes per DATA frame.
    frame_size: usize,
    timeout: Duration,
    progress: Progress,
    /// The caller's progress callback, called at most every 100 ms from here.
    report: &'r mut dyn FnMut(&Progress),
    last_report: Instant,
}

impl DataSender<'_, '_> {
    /// Streams one file's data from its source.
    fn send_file(&mut self, file: FileData<'_>) -> Result<(), Failure> {
        let FileData { source, size, mtime_ns, origin } = file;
        let origin = origin.as_path();
        let mut reader: Box<dyn Read + Send + '_> = match source {
            Source::File(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW) // a file swapped for a symlink is not followed
                    .open(&path)
                    .map_err(|e| {
                        if e.kind() == ErrorKind::NotFound {
                            Failure::changed(origin, "deleted".into())
                        } else {
                            Failure::io(origin, e)
                        }
                    })?;
                check_unchanged(&f, size, mtime_ns).map_err(|w| Failure::changed(origin, w))?;
                let sent = self.pump(&mut (&f), size, origin)?;
                check_unchanged(&f, size, mtime_ns)
                    .map_err(|w| Failure::changed(origin, format!("{w} while it was read")))?;
                debug_assert_eq!(Some(sent), size);
                return Ok(());
            }
            Source::Bytes(b) => Box::new(std::io::Cursor::new(b)),
            Source::Reader(r) => r,
        };
        let sent = self.pump(&mut reader, size, origin)?;
        if size.is_none() {
            self.producer.send(&Frame::EndOfFile { len: sent }, self.timeout)?;
        }
        Ok(())
    }

    /// Copies `size` bytes (or, for `None`, everything) from `r` into DATA frames; `origin` names
    /// the source in errors.
    fn pump(&mut self, r: &mut dyn Read, size: Option<u64>, origin: &Path) -> Result<u64, Failure> {
        let mut sent = 0u64;
        loop {
            let want = match size {
                Some(s) if sent == s => break,
                Some(s) => ((s - sent) as usize).min(self.frame_size),
                None => self.frame_size,
            };
            let mut res = self.producer.reserve(FrameKind::Data, want, self.timeout)?;
            let n = loop {
                match r.read(&mut res) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Failure::io(origin, e)),
                }
            };
            if n == 0 {
                // Uncommitted: the reservation is dropped, nothing of it is visible.
                let _ = res;
                return match size {
                    Some(s) => Err(Failure::changed(origin, format!("ended after {sent} of {s} bytes"))),
                    None => Ok(sent),
                };
            }
            res.commit_len(n);
            sent += n as u64;
            self.progress.bytes_done += n as u64;
            if size.is_none() {
                self.progress.bytes_total += n as u64;
            }
            self.tick();
        }
        // A known size was reached: the source must have nothing more.
        let mut probe = [0u8; 1];
        match r.read(&mut probe) {
            Ok(0) => Ok(sent),
            Ok(_) => Err(Failure::changed(origin, format!("longer than the {sent} bytes in the manifest"))),
            Err(e) => Err(Failure::io(origin, e)),
        }
    }

    fn tick(&mut self) {
        if self.last_report.elapsed() >= Duration::from_millis(100) {
            self.last_report = Instant::now();
            (self.report)(&self.progress);
        }
    }
}

/// Compares an open file's metadata with its manifest entry's `size` and `mtime_ns`.
fn check_unchanged(f: &File, size: Option<u64>, mtime: i64) -> Result<(), String> {
    let m = f.metadata().map_err(|err| format!("fstat failed: {err}"))?;
    if Some(m.len()) != size {
        return Err(format!("size {} in the manifest, now {}", size.unwrap_or(0), m.len()));
    }
    if mtime_ns(&m) != mtime {
        return Err("modification time differs from the manifest".into());
    }
    Ok(())
}
