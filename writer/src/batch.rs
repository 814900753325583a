//! [`Batch`]: the entries of one snapshot, collected, validated, then streamed as manifest and
//! data; and the [`Ticket`] that waits for the uploader's durable ack.
//!
//! # When a source changes
//! Sizes and times go into the manifest before any data (the uploader needs every entry ahead of
//! the bytes). At commit every file is `lstat`ed again for the manifest; when its turn comes it is
//! opened (`O_NOFOLLOW`) and `fstat`ed, read, and `fstat`ed again. If the size or mtime differs at
//! either point, or the file ends early, the batch is **aborted** (an ABORT frame; the uploader
//! makes no snapshot) and [`WriteError::SourceChanged`] names the file: a snapshot never records
//! metadata that disagrees with the bytes stored. Send the batch again (from a quiescent state or
//! a consistent dump). A reader added with a size that yields fewer or more bytes aborts the same
//! way. A file that vanishes after `add_*` but before commit fails the commit before anything is
//! sent.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shmback_proto::frame::{abort_code, validate_path};
use shmback_proto::{Begin, Entry, EntryKind, Frame, FrameKind, Labels};

use crate::error::WriteError;
use crate::outbox::Outbox;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

/// Metadata of an entry added from memory or a reader.
#[derive(Clone, Copy, Debug)]
pub struct EntryMeta {
    /// Permission bits (the type bits are set by the writer).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

impl Default for EntryMeta {
    /// Mode 0644, owned by this process's user and group, modified now.
    fn default() -> Self {
        let (uid, gid) = std::fs::metadata("/proc/self").map(|m| (m.uid(), m.gid())).unwrap_or((0, 0));
        Self { mode: 0o644, uid, gid, mtime_ns: now_ns() }
    }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

enum Source<'a> {
    /// A directory or a symlink: no data.
    None,
    /// A regular file on disk, opened when its turn comes.
    File(PathBuf),
    /// A stream or reader.
    Reader(Box<dyn Read + Send + 'a>),
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

struct Pending<'a> {
    entry: Entry,
    source: Source<'a>,
    /// Where the entry came from, for messages (fs path, or the snapshot path).
    origin: PathBuf,
}

/// Files, bytes, and totals of a batch as it is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Entries in the manifest.
    pub entries: u64,
    /// Files whose data has been sent.
    pub files_done: u64,
    /// Files in the batch.
    pub files_total: u64,
    /// Data bytes sent.
    pub bytes_done: u64,
    /// Data bytes expected (streams of unknown size count as they arrive).
    pub bytes_total: u64,
}

/// One snapshot's entries. Build it with `add_*`, then [`Batch::commit`]. Dropping it (or
/// [`Batch::abort`]) before commit sends nothing.
pub struct Batch<'o> {
    outbox: &'o mut Outbox,
    pending: Vec<Pending<'o>>,
    /// Every added path → whether it is a directory.
    kinds: HashMap<Vec<u8>, bool>,
    /// Every proper ancestor of an added path.
    ancestors: HashSet<Vec<u8>>,
    tags: Vec<String>,
    meta: Vec<(String, String)>,
    host: Option<String>,
    skipped: Vec<(PathBuf, String)>,
}

impl<'o> Batch<'o> {
    pub(crate) fn new(outbox: &'o mut Outbox) -> Self {
        Batch {
            outbox,
            pending: Vec::new(),
            kinds: HashMap::new(),
            ancestors: HashSet::new(),
            tags: Vec::new(),
            meta: Vec::new(),
            host: None,
            skipped: Vec::new(),
        }
    }

    /// Adds a tag to this batch's snapshot (besides the outbox's).
    pub fn tag(&mut self, tag: impl Into<String>) -> &mut Self {
        self.tags.push(tag.into());
        self
    }

    /// Adds a key/value label to this batch's snapshot.
    pub fn label(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.meta.push((key.into(), value.into()));
        self
    }

    /// Sets the host recorded for this batch's snapshot (default: the outbox's, else the uploader's).
    pub fn host(&mut self, host: impl Into<String>) -> &mut Self {
        self.host = Some(host.into());
        self
    }

    /// Entries added so far.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Sources `add_dir` skipped (sockets, devices, FIFOs), with why.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    /// Checks `path` and records it; errors leave the batch unchanged.
    fn claim(&mut self, path: &[u8], is_dir: bool) -> Result<(), WriteError> {
        let shown = || String::from_utf8_lossy(path).into_owned();
        validate_path(path).map_err(|why| WriteError::InvalidPath { path: shown(), why })?;
        if self.kinds.contains_key(path) {
            return Err(WriteError::Duplicate { path: shown() });
        }
        if !is_dir && self.ancestors.contains(path) {
            let child = self.kinds.keys().find(|k| k.starts_with(path) && k.get(path.len()) == Some(&b'/'));
            return Err(WriteError::NotADirectory {
                path: child.map(|c| String::from_utf8_lossy(c).into_owned()).unwrap_or_default(),
                parent: shown(),
            });
        }
        let parents: Vec<&[u8]> =
            path.iter().enumerate().filter(|(_, b)| **b == b'/').map(|(i, _)| &path[..i]).collect();
        for p in &parents {
            if self.kinds.get(*p) == Some(&false) {
                return Err(WriteError::NotADirectory { path: shown(), parent: String::from_utf8_lossy(p).into() });
            }
        }
        for p in parents {
            self.ancestors.insert(p.to_vec());
        }
        self.kinds.insert(path.to_vec(), is_dir);
        Ok(())
    }

    fn push(&mut self, entry: Entry, source: Source<'o>, origin: PathBuf) -> Result<(), WriteError> {
        self.claim(&entry.path, entry.kind == EntryKind::Dir)?;
        self.pending.push(Pending { entry, source, origin });
        Ok(())
    }

    /// Adds one filesystem object at `snapshot_path`: a regular file (opened only when its data is
    /// sent), a directory (the directory entry alone; see [`Batch::add_dir`] for its contents) or a
    /// symlink (stored as a link). Other types are an error.
    pub fn add_path(&mut self, snapshot_path: impl AsRef<[u8]>, fs_path: impl AsRef<Path>) -> Result<(), WriteError> {
        let fs_path = fs_path.as_ref();
        let m = std::fs::symlink_metadata(fs_path).map_err(|source| WriteError::Io { path: fs_path.into(), source })?;
        match entry_from_metadata(snapshot_path.as_ref().to_vec(), fs_path, &m)? {
            Some((entry, source)) => self.push(entry, source, fs_path.into()),
            None => Err(WriteError::Io {
                path: fs_path.into(),
                source: std::io::Error::new(ErrorKind::Unsupported, "not a regular file, directory or symlink"),
            }),
        }
    }

    /// Adds the directory `dir` at snapshot path `prefix` and everything below it: directories,
    /// regular files, symlinks (as links, never followed). Sockets, devices and FIFOs are skipped
    /// and listed in [`Batch::skipped`]. An empty `prefix` puts the contents at the snapshot root.
    pub fn add_dir(&mut self, prefix: impl AsRef<[u8]>, dir: impl AsRef<Path>) -> Result<(), WriteError> {
        let dir = dir.as_ref();
        let prefix = prefix.as_ref().to_vec();
        if !prefix.is_empty() {
            self.add_path(&prefix, dir)?;
            if self.kinds.get(&prefix) != Some(&true) {
                return Err(WriteError::Io {
                    path: dir.into(),
                    source: std::io::Error::new(ErrorKind::NotADirectory, "add_dir needs a directory"),
                });
            }
        }
        self.walk(&prefix, dir)
    }

    fn walk(&mut self, prefix: &[u8], dir: &Path) -> Result<(), WriteError> {
        let io = |source| WriteError::Io { path: dir.into(), source };
        let mut children = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io)? {
            let e = e.map_err(io)?;
            children.push(e.file_name());
        }
        for name in children {
            let fs_path = dir.join(&name);
            let m = std::fs::symlink_metadata(&fs_path)
                .map_err(|source| WriteError::Io { path: fs_path.clone(), source })?;
            let mut snap = prefix.to_vec();
            if !snap.is_empty() {
                snap.push(b'/');
            }
            snap.extend_from_slice(name.as_bytes());
            match entry_from_metadata(snap.clone(), &fs_path, &m)? {
                Some((entry, source)) => {
                    let is_dir = entry.kind == EntryKind::Dir;
                    self.push(entry, source, fs_path.clone())?;
                    if is_dir {
                        self.walk(&snap, &fs_path)?;
                    }
                }
                None => {
                    self.skipped.push((fs_path, format!("{:?} is not a file, directory or symlink", m.file_type())))
                }
            }
        }
        Ok(())
    }

    /// Adds a file whose bytes come from `reader`. `size: None` is a stream (e.g. `pg_dump`
    /// output): it is read to its end, its length travels after its data. With `Some(n)` the
    /// reader must yield exactly `n` bytes, or the batch is aborted.
    pub fn add_reader(
        &mut self,
        snapshot_path: impl AsRef<[u8]>,
        size: Option<u64>,
        meta: EntryMeta,
        reader: impl Read + Send + 'o,
    ) -> Result<(), WriteError> {
        let path = snapshot_path.as_ref().to_vec();
        let origin = PathBuf::from(OsStr::from_bytes(&path));
        let entry = memory_entry(path, size, meta);
        self.push(entry, Source::Reader(Box::new(reader)), origin)
    }

    /// Adds a file with the given contents (mode 0644, owned by this process, modified now).
    pub fn add_bytes(&mut self, snapshot_path: impl AsRef<[u8]>, bytes: impl Into<Vec<u8>>) -> Result<(), WriteError> {
        let bytes = bytes.into();
        let path = snapshot_path.as_ref().to_vec();
        let origin = PathBuf::from(OsStr::from_bytes(&path));
        let entry = memory_entry(path, Some(bytes.len() as u64), EntryMeta::default());
        self.push(entry, Source::Bytes(bytes), origin)
    }

    /// Abandons the batch. Nothing was sent, so the uploader sees nothing.
    pub fn abort(self) {}

    /// Sends the batch: BEGIN, the manifest in depth-first path order (with any missing parent
    /// directories added), the file data in manifest order, COMMIT. Returns a [`Ticket`] for the
    /// durable ack.
    pub fn commit(self) -> Result<Ticket<'o>, WriteError> {
        self.commit_with_progress(|_| {})
    }

    /// [`Batch::commit`], calling `progress` after every file and every few MiB.
    pub fn commit_with_progress(mut self, mut progress: impl FnMut(&Progress)) -> Result<Ticket<'o>, WriteError> {
        let start = Instant::now();
        self.add_missing_parents();
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by(|a, b| as_path(&a.entry.path).cmp(as_path(&b.entry.path)));
        refresh_metadata(&mut pending)?;

        let outbox = self.outbox;
        let timeout = outbox.opts.timeout;
        let frame_size = outbox.frame_size();
        let ring = |e| WriteError::from_ring(e, timeout);
        let mut labels: Labels = outbox.opts.labels.clone();
        labels.tags.extend(self.tags);
        labels.meta.extend(self.meta);
        if self.host.is_some() {
            labels.host = self.host;
        }

        // An uploader that has not attached yet (both starting together) is waited for; one that
        // leaves mid-batch is `UploaderGone` at once.
        if !outbox.producer.consumer_alive() {
            let segment = outbox.path().display().to_string();
            outbox
                .producer
                .wait_for_consumer(timeout)
                .map_err(|_| WriteError::NoUploader { segment, waited: timeout })?;
        }
        let p = &mut outbox.producer;
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
            let sent = send_data(outbox, x, frame_size, &mut prog, &mut |pr| {
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
                    let _ = outbox.producer.send(&Frame::Abort { code: abort_code::SOURCE_CHANGED, reason }, timeout);
                    outbox.producer.flush();
                    return Err(e);
                }
                Err(Failure::Ring(e)) => return Err(ring(e)),
            }
            prog.files_done += 1;
        }
        let p = &mut outbox.producer;
        p.send(&Frame::Commit { entries: prog.entries, bytes: prog.bytes_done }, timeout).map_err(ring)?;
        p.flush();
        progress(&prog);
        Ok(Ticket { outbox, seq, epoch, progress: prog, elapsed: start.elapsed() })
    }

    /// Adds directory entries for parents nobody added (mode 0755, owned by this process, mtime
    /// now), so the manifest is a complete tree.
    fn add_missing_parents(&mut self) {
        let missing: Vec<Vec<u8>> = self.ancestors.iter().filter(|a| !self.kinds.contains_key(*a)).cloned().collect();
        let meta = EntryMeta { mode: 0o755, ..EntryMeta::default() };
        for path in missing {
            let origin = PathBuf::from(OsStr::from_bytes(&path));
            let entry = Entry {
                path: path.clone(),
                kind: EntryKind::Dir,
                size: Some(0),
                mode: S_IFDIR | meta.mode,
                uid: meta.uid,
                gid: meta.gid,
                mtime_ns: meta.mtime_ns,
                target: vec![],
            };
            self.kinds.insert(path, true);
            self.pending.push(Pending { entry, source: Source::None, origin });
        }
    }
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

fn memory_entry(path: Vec<u8>, size: Option<u64>, meta: EntryMeta) -> Entry {
    Entry {
        path,
        kind: EntryKind::File,
        size,
        mode: S_IFREG | (meta.mode & !S_IFMT),
        uid: meta.uid,
        gid: meta.gid,
        mtime_ns: meta.mtime_ns,
        target: vec![],
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

/// The entry for a filesystem object, or `None` for types a snapshot does not hold.
fn entry_from_metadata<'a>(
    path: Vec<u8>,
    fs_path: &Path,
    m: &std::fs::Metadata,
) -> Result<Option<(Entry, Source<'a>)>, WriteError> {
    let ft = m.file_type();
    let (kind, size, target, source) = if ft.is_file() {
        (EntryKind::File, Some(m.len()), vec![], Source::File(fs_path.into()))
    } else if ft.is_dir() {
        (EntryKind::Dir, Some(0), vec![], Source::None)
    } else if ft.is_symlink() {
        let t = std::fs::read_link(fs_path).map_err(|source| WriteError::Io { path: fs_path.into(), source })?;
        let t = t.into_os_string().into_vec();
        (EntryKind::Symlink, Some(t.len() as u64), t, Source::None)
    } else {
        return Ok(None);
    };
    let entry = Entry { path, kind, size, mode: m.mode(), uid: m.uid(), gid: m.gid(), mtime_ns: mtime_ns(m), target };
    Ok(Some((entry, source)))
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
    outbox: &mut Outbox,
    x: &mut Pending<'_>,
    frame_size: usize,
    prog: &mut Progress,
    tick: &mut dyn FnMut(&Progress),
) -> Result<(), Failure> {
    let timeout = outbox.opts.timeout;
    let p = &mut outbox.producer;
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
    p: &mut shmback_proto::Producer<shmback_proto::Segment>,
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

/// A hex-printed snapshot id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 32]);

impl std::fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

/// A committed batch, waiting for the uploader to store its snapshot.
pub struct Ticket<'o> {
    outbox: &'o mut Outbox,
    seq: u64,
    epoch: u64,
    progress: Progress,
    elapsed: Duration,
}

impl Ticket<'_> {
    /// The batch's sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// What was sent.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// How long sending took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// Waits until the uploader has stored the batch's snapshot and returns its id. `Rejected`:
    /// no snapshot was made. `UploaderGone`: the uploader died or restarted before storing it;
    /// send the batch again.
    pub fn wait_durable(self, timeout: Duration) -> Result<SnapshotId, WriteError> {
        self.outbox
            .producer
            .wait_durable(self.seq, self.epoch, timeout)
            .map(SnapshotId)
            .map_err(|e| WriteError::from_ring(e, timeout))
    }
}
