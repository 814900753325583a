//! The send pipeline of a committed batch: metadata re-read, BEGIN, the manifest, each file's
//! data straight from its source into reserved ring space, COMMIT; ABORT when a source changes.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use shmback_proto::frame::abort_code;
use shmback_proto::{Begin, Entry, EntryKind, Frame, FrameKind, Labels, Producer, Segment};

use crate::entries::{Pending, Source, entry_from_metadata, mtime_ns};
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

/// Sends `pending` (sorted in manifest order) as one batch labelled `labels`. `start` is when the
/// commit began, for the ticket's elapsed time.
pub(crate) fn send_batch<'o>(
    channel: Channel<'o>,
    labels: Labels,
    mut pending: Vec<Pending<'o>>,
    mut progress: impl FnMut(&Progress),
    start: Instant,
) -> Result<Ticket<'o>, WriteError> {
    refresh_metadata(&mut pending)?;

    let Channel { producer, segment, timeout, frame_size, .. } = channel;
    let ring = |e| WriteError::from_ring(e, timeout);

    // An uploader that has not attached yet (both starting together) is waited for; one that
    // leaves mid-batch is `UploaderGone` at once.
    if !producer.consumer_alive() {
        let segment = segment.display().to_string();
        producer.wait_for_consumer(timeout).map_err(|_| WriteError::NoUploader { segment, waited: timeout })?;
    }
    let p = producer;
    let seq = p.next_batch_seq();
    let epoch = p.consumer_epoch();
    let mut prog = Progress {
        entries: pending.len() as u64,
        files_total: pending.iter().filter(|x| x.entry.kind == EntryKind::File).count() as u64,
        bytes_total: pending.iter().filter(|x| x.entry.kind == EntryKind::File).filter_map(|x| x.entry.size).sum(),
        ..Progress::default()
    };
    p.send(&Frame::Begin(Begin { seq, labels }), timeout).map_err(ring)?;
    p.record_begun(seq);
    for x in &pending {
        p.send(&Frame::Entry(x.entry.clone()), timeout).map_err(ring)?;
    }
    p.send(&Frame::EndOfManifest { entries: prog.entries }, timeout).map_err(ring)?;
    progress(&prog);

    let mut last_report = Instant::now();
    for x in pending.iter_mut().filter(|x| x.entry.kind == EntryKind::File) {
        let sent = send_data(p, timeout, x, frame_size, &mut prog, &mut |pr| {
            if last_report.elapsed() >= Duration::from_millis(100) {
                last_report = Instant::now();
                progress(pr);
            }
        });
        match sent {
            Ok(()) => {}
            Err(Failure::Source(e)) => {
                // Tell the uploader to drop the batch; if even that fails, the uploader tears
                // it when the next batch begins.
                let reason = e.to_string();
                let _ = p.send(&Frame::Abort { code: abort_code::SOURCE_CHANGED, reason }, timeout);
                p.flush();
                return Err(e);
            }
            Err(Failure::Ring(e)) => return Err(ring(e)),
        }
        prog.files_done += 1;
    }
    p.send(&Frame::Commit { entries: prog.entries, bytes: prog.bytes_done }, timeout).map_err(ring)?;
    p.flush();
    progress(&prog);
    Ok(Ticket { producer: p, seq, epoch, progress: prog, elapsed: start.elapsed() })
}

/// Re-reads every on-disk file's metadata for the manifest; nothing has been sent yet, so a
/// vanished or retyped file simply fails the commit.
fn refresh_metadata(pending: &mut [Pending<'_>]) -> Result<(), WriteError> {
    for x in pending.iter_mut() {
        if let Source::File(p) = &x.source {
            let m = std::fs::symlink_metadata(p).map_err(|source| WriteError::Io { path: p.clone(), source })?;
            if !m.file_type().is_file() {
                return Err(WriteError::SourceChanged { path: p.clone(), what: "no longer a regular file".into() });
            }
            // The same mapping as when the file was added, from fresh metadata.
            if let Some((entry, _)) = entry_from_metadata(std::mem::take(&mut x.entry.path), p, &m)? {
                x.entry = entry;
            }
        }
    }
    Ok(())
}

enum Failure {
    /// The source misbehaved: abort the batch.
    Source(WriteError),
    /// The ring failed: the uploader is gone or stuck.
    Ring(shmback_proto::RingError),
}

impl From<shmback_proto::RingError> for Failure {
    fn from(e: shmback_proto::RingError) -> Self {
        Failure::Ring(e)
    }
}

/// Streams one file's data: `read()` straight into reserved ring space.
fn send_data(
    p: &mut Producer<Segment>,
    timeout: Duration,
    x: &mut Pending<'_>,
    frame_size: usize,
    prog: &mut Progress,
    tick: &mut dyn FnMut(&Progress),
) -> Result<(), Failure> {
    let origin = x.origin.clone();
    let changed = |what: String| Failure::Source(WriteError::SourceChanged { path: origin.clone(), what });
    let io = |source| Failure::Source(WriteError::Io { path: origin.clone(), source });
    let size = x.entry.size;
    let mut reader: Box<dyn Read + Send + '_> = match &mut x.source {
        Source::File(path) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW) // a file swapped for a symlink is not followed
                .open(&*path)
                .map_err(|e| if e.kind() == ErrorKind::NotFound { changed("deleted".into()) } else { io(e) })?;
            check_unchanged(&f, &x.entry).map_err(changed)?;
            let sent = pump(p, &mut (&f), size, frame_size, timeout, prog, tick, &changed, &io)?;
            check_unchanged(&f, &x.entry).map_err(|w| changed(format!("{w} while it was read")))?;
            debug_assert_eq!(Some(sent), size);
            return Ok(());
        }
        Source::Bytes(b) => Box::new(std::io::Cursor::new(std::mem::take(b))),
        Source::Reader(r) => Box::new(r),
        Source::None => return Ok(()),
    };
    let sent = pump(p, &mut reader, size, frame_size, timeout, prog, tick, &changed, &io)?;
    if size.is_none() {
        p.send(&Frame::EndOfFile { len: sent }, timeout)?;
    }
    Ok(())
}

/// Compares an open file's metadata with its manifest entry.
fn check_unchanged(f: &File, e: &Entry) -> Result<(), String> {
    let m = f.metadata().map_err(|err| format!("fstat failed: {err}"))?;
    if Some(m.len()) != e.size {
        return Err(format!("size {} in the manifest, now {}", e.size.unwrap_or(0), m.len()));
    }
    if mtime_ns(&m) != e.mtime_ns {
        return Err("modification time differs from the manifest".into());
    }
    Ok(())
}

/// Copies `size` bytes (or, for `None`, everything) from `r` into DATA frames.
#[allow(clippy::too_many_arguments)]
fn pump(
    p: &mut Producer<Segment>,
    r: &mut dyn Read,
    size: Option<u64>,
    frame_size: usize,
    timeout: Duration,
    prog: &mut Progress,
    tick: &mut dyn FnMut(&Progress),
    changed: &dyn Fn(String) -> Failure,
    io: &dyn Fn(std::io::Error) -> Failure,
) -> Result<u64, Failure> {
    let mut sent = 0u64;
    loop {
        let want = match size {
            Some(s) if sent == s => break,
            Some(s) => ((s - sent) as usize).min(frame_size),
            None => frame_size,
        };
        let mut res = p.reserve(FrameKind::Data, want, timeout)?;
        let n = loop {
            match r.read(&mut res) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            }
        };
        if n == 0 {
            // Uncommitted: the reservation is dropped, nothing of it is visible.
            let _ = res;
            return match size {
                Some(s) => Err(changed(format!("ended after {sent} of {s} bytes"))),
                None => Ok(sent),
            };
        }
        res.commit_len(n);
        sent += n as u64;
        prog.bytes_done += n as u64;
        if size.is_none() {
            prog.bytes_total += n as u64;
        }
        tick(prog);
    }
    // A known size was reached: the source must have nothing more.
    let mut probe = [0u8; 1];
    match r.read(&mut probe) {
        Ok(0) => Ok(sent),
        Ok(_) => Err(changed(format!("longer than the {sent} bytes in the manifest"))),
        Err(e) => Err(io(e)),
    }
}
