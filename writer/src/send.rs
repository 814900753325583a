//! The send pipeline of a committed batch — BEGIN, the manifest, each file's data read from its
//! source, END_OF_FILE for streams, COMMIT; ABORT when a source changes — written into a
//! [`Sink`]: the ring ([`RingSink`]) or a byte stream such as an HTTP body ([`StreamSink`]).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use shmback_proto::frame::abort_code;
use shmback_proto::stream;
use shmback_proto::{Begin, Frame, FrameKind, Labels, Producer, RingError, Segment, WantList};

use crate::entries::{Source, mtime_ns};
use crate::entry_list::{FileData, Manifest};
use crate::error::WriteError;
use crate::progress::Progress;
use crate::ticket::Ticket;

/// Where the frames of a batch go.
pub(crate) trait Sink {
    /// Sends one frame.
    fn frame(&mut self, frame: &Frame<'_>) -> Result<(), WriteError>;
    /// Reads at most `want` bytes from `r` into one DATA frame and sends it; `Ok(0)` at the end
    /// of `r` (nothing sent).
    fn data(&mut self, r: &mut dyn Read, want: usize) -> Result<usize, DataError>;
    /// Called once BEGIN is sent.
    fn begun(&mut self, _seq: u64) {}
    /// Whether this sink's uploader answers want-lists (only a ring's can).
    fn asks_want(&mut self) -> bool {
        false
    }
    /// Publishes the manifest and waits for the uploader's want-list for batch `seq` of `files`
    /// files. Anything but a usable answer (a timeout, a malformed answer) is "send everything",
    /// which an uploader always accepts; a gone uploader or a rejected batch is an error.
    fn want_list(&mut self, _seq: u64, _files: u64) -> Result<WantList, WriteError> {
        Ok(WantList::all())
    }
    /// Publishes what was sent.
    fn flush(&mut self) -> Result<(), WriteError>;
}

/// Why [`Sink::data`] failed.
pub(crate) enum DataError {
    /// Reading the source failed.
    Read(std::io::Error),
    /// The sink failed.
    Sink(WriteError),
}

/// Why the pipeline stopped.
pub(crate) enum Failure {
    /// The source misbehaved: the batch was aborted (an ABORT frame went out if the sink took it).
    Source(WriteError),
    /// The sink failed: the uploader is gone, stuck, or the connection dropped.
    Sink(WriteError),
}

impl Failure {
    /// `origin` no longer matches its manifest entry (or a reader lied about its size).
    fn changed(origin: &Path, what: String) -> Self {
        Failure::Source(WriteError::SourceChanged { path: origin.into(), what })
    }

    fn io(origin: &Path, source: std::io::Error) -> Self {
        Failure::Source(WriteError::Io { path: origin.into(), source })
    }

    pub(crate) fn into_error(self) -> WriteError {
        match self {
            Failure::Source(e) | Failure::Sink(e) => e,
        }
    }
}

/// Sends `manifest` as batch `seq` into `sink`: the one send pipeline of every transport.
/// `keep` keeps in-memory data in the manifest for a resend. Returns what was sent.
pub(crate) fn pipeline(
    sink: &mut dyn Sink,
    seq: u64,
    labels: &Labels,
    manifest: &mut Manifest<'_>,
    frame_size: usize,
    keep: bool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Progress, Failure> {
    let totals = Progress {
        entries: manifest.len() as u64,
        files_total: manifest.file_count(),
        bytes_total: manifest.file_bytes(),
        ..Progress::default()
    };
    let mut totals = totals;
    sink.frame(&Frame::Begin(Begin { seq, labels: labels.clone() })).map_err(Failure::Sink)?;
    sink.begun(seq);
    let ask = sink.asks_want();
    if ask {
        sink.frame(&Frame::Want).map_err(Failure::Sink)?;
    }
    for i in 0..manifest.len() {
        sink.frame(&Frame::Entry(manifest.entry(i))).map_err(Failure::Sink)?;
    }
    sink.frame(&Frame::EndOfManifest { entries: totals.entries }).map_err(Failure::Sink)?;
    let want = if ask {
        let list = sink.want_list(seq, totals.files_total).map_err(Failure::Sink)?;
        sink.frame(&Frame::Wanted { covered: list.covered(), digest: list.digest() }).map_err(Failure::Sink)?;
        list
    } else {
        WantList::all()
    };
    // Files the list leaves out are not read at all: count them now, so totals show what will go.
    let mut file_index = 0u64;
    for i in 0..manifest.len() {
        if manifest.is_file(i) {
            if !want.is_wanted(file_index) {
                totals.files_unchanged += 1;
                totals.bytes_unchanged += manifest.entry_size(i);
            }
            file_index += 1;
        }
    }
    totals.bytes_total -= totals.bytes_unchanged;
    progress(&totals);

    let mut data = DataSender { sink, frame_size, progress: totals, report: progress, last_report: Instant::now() };
    let mut file_index = 0u64;
    for i in 0..manifest.len() {
        if manifest.is_file(i) {
            file_index += 1;
            if !want.is_wanted(file_index - 1) {
                // Unchanged since the uploader's parent snapshot: its content is taken from there.
                drop(manifest.take_file(i, keep));
                continue;
            }
        }
        let file = match manifest.take_file(i, keep) {
            Ok(Some(file)) => file,
            Ok(None) => continue,
            // Nothing of this file went out yet: the batch ends torn, not aborted.
            Err(e) => return Err(Failure::Sink(e)),
        };
        match data.send_file(file) {
            Ok(()) => {}
            Err(Failure::Source(e)) => {
                // Tell the uploader to drop the batch; if even that fails, the uploader tears
                // it (at the next BEGIN in a ring, at the end of the body over HTTP).
                let reason = e.to_string();
                let _ = data.sink.frame(&Frame::Abort { code: abort_code::SOURCE_CHANGED, reason });
                let _ = data.sink.flush();
                return Err(Failure::Source(e));
            }
            Err(sink) => return Err(sink),
        }
        data.progress.files_done += 1;
    }
    let DataSender { sink, progress: sent, report, .. } = data;
    sink.frame(&Frame::Commit { entries: sent.entries, bytes: sent.bytes_done }).map_err(Failure::Sink)?;
    sink.flush().map_err(Failure::Sink)?;
    report(&sent);
    Ok(sent)
}

/// The outbox's ring and settings, borrowed by a batch for its whole life.
pub(crate) struct RingChannel<'o> {
    pub(crate) producer: &'o mut Producer<Segment>,
    /// The segment's path, to name it when no uploader attaches.
    pub(crate) segment: &'o Path,
}

/// Sends `manifest` through the ring as one batch labelled `labels`. `start` is when the commit
/// began, for the ticket's elapsed time.
pub(crate) fn send_ring<'o>(
    channel: RingChannel<'o>,
    timeout: Duration,
    frame_size: usize,
    labels: Labels,
    mut manifest: Manifest<'o>,
    mut progress: impl FnMut(&Progress),
    start: Instant,
) -> Result<Ticket<'o>, WriteError> {
    manifest.refresh_metadata()?;
    let RingChannel { producer, segment } = channel;
    // An uploader that has not attached yet (both starting together) is waited for; one that
    // leaves mid-batch is `UploaderGone` at once.
    if !producer.consumer_alive() {
        let segment = segment.display().to_string();
        producer.wait_for_consumer(timeout).map_err(|_| WriteError::NoUploader { segment, waited: timeout })?;
    }
    let seq = producer.next_batch_seq();
    let epoch = producer.consumer_epoch();
    let mut sink = RingSink { producer, timeout, epoch };
    let sent = pipeline(&mut sink, seq, &labels, &mut manifest, frame_size, false, &mut progress)
        .map_err(Failure::into_error)?;
    Ok(Ticket::ring(sink.producer, seq, epoch, sent, start.elapsed()))
}

/// The ring as a sink: DATA is read straight into reserved ring space (one copy).
struct RingSink<'p> {
    producer: &'p mut Producer<Segment>,
    timeout: Duration,
    /// The consumer's attach epoch when the batch began: an answer from another consumer is not
    /// trusted.
    epoch: u64,
}

impl Sink for RingSink<'_> {
    fn frame(&mut self, frame: &Frame<'_>) -> Result<(), WriteError> {
        self.producer.send(frame, self.timeout).map_err(|e| WriteError::from_ring(e, self.timeout))
    }

    fn data(&mut self, r: &mut dyn Read, want: usize) -> Result<usize, DataError> {
        let mut res = self
            .producer
            .reserve(FrameKind::Data, want, self.timeout)
            .map_err(|e| DataError::Sink(WriteError::from_ring(e, self.timeout)))?;
        let n = read_some(r, &mut res).map_err(DataError::Read)?;
        if n > 0 {
            res.commit_len(n);
        }
        // At n == 0 the reservation is dropped uncommitted: nothing of it is visible.
        Ok(n)
    }

    fn begun(&mut self, seq: u64) {
        self.producer.record_begun(seq);
    }

    fn asks_want(&mut self) -> bool {
        self.producer.consumer_answers_want_lists()
    }

    fn want_list(&mut self, seq: u64, files: u64) -> Result<WantList, WriteError> {
        match self.producer.wait_want(seq, self.epoch, files, self.timeout) {
            Ok(list) => Ok(list),
            // Slow or broken: send everything; the uploader accepts that whatever it answered.
            Err(RingError::Timeout { .. } | RingError::Corrupt { .. }) => Ok(WantList::all()),
            Err(e) => Err(WriteError::from_ring(e, self.timeout)),
        }
    }

    fn flush(&mut self) -> Result<(), WriteError> {
        self.producer.flush();
        Ok(())
    }
}

/// A byte stream as a sink: frames in stream form (PROTOCOL.md, "Over HTTP"), DATA read into a
/// buffer of one frame, then written. Write errors are [`WriteError::Connection`].
pub(crate) struct StreamSink<W: Write> {
    out: W,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl<W: Write> StreamSink<W> {
    pub(crate) fn new(out: W, frame_size: usize) -> Self {
        StreamSink { out, buf: vec![0; frame_size], scratch: Vec::new() }
    }

    pub(crate) fn into_inner(self) -> W {
        self.out
    }
}

fn connection(e: std::io::Error) -> WriteError {
    WriteError::Connection { what: e.to_string() }
}

impl<W: Write> Sink for StreamSink<W> {
    fn frame(&mut self, frame: &Frame<'_>) -> Result<(), WriteError> {
        self.scratch.clear();
        stream::encode_frame(frame, &mut self.scratch).map_err(|e| WriteError::Ring(e.into()))?;
        self.out.write_all(&self.scratch).map_err(connection)
    }

    fn data(&mut self, r: &mut dyn Read, want: usize) -> Result<usize, DataError> {
        let want = want.min(self.buf.len());
        let n = read_some(r, &mut self.buf[..want]).map_err(DataError::Read)?;
        if n == 0 {
            return Ok(0);
        }
        let write = |out: &mut W, buf: &[u8]| -> std::io::Result<()> {
            out.write_all(&stream::header_bytes(FrameKind::Data, n as u32))?;
            out.write_all(buf)?;
            out.write_all(stream::padding_bytes(n))
        };
        write(&mut self.out, &self.buf[..n]).map_err(|e| DataError::Sink(connection(e)))?;
        Ok(n)
    }

    fn flush(&mut self) -> Result<(), WriteError> {
        self.out.flush().map_err(connection)
    }
}

/// One `read`, retried when interrupted.
fn read_some(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The data phase of a batch, from the end of its manifest to COMMIT: each file's bytes read from
/// its source into DATA frames, counted in `progress` as they go.
struct DataSender<'s, 'r> {
    sink: &'s mut dyn Sink,
    /// Payload bytes per DATA frame.
    frame_size: usize,
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
            self.sink.frame(&Frame::EndOfFile { len: sent }).map_err(Failure::Sink)?;
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
            let n = match self.sink.data(r, want) {
                Ok(n) => n,
                Err(DataError::Read(e)) => return Err(Failure::io(origin, e)),
                Err(DataError::Sink(e)) => return Err(Failure::Sink(e)),
            };
            if n == 0 {
                return match size {
                    Some(s) => Err(Failure::changed(origin, format!("ended after {sent} of {s} bytes"))),
                    None => Ok(sent),
                };
            }
            sent += n as u64;
            self.progress.bytes_done += n as u64;
            self.progress.bytes_read += n as u64;
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
