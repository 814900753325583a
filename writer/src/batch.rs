//! [`Batch`]: the entries of one snapshot, collected and validated as they are added, then handed
//! to the send pipeline in manifest order.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use shmback_proto::{EntryKind, Labels};

use crate::entries::{EntryMeta, FsRoot, NewData, NewEntry};
use crate::entry_list::{EntryList, Manifest};
use crate::error::WriteError;
use crate::outbox::{Channel, Route};
use crate::progress::Progress;
use crate::send::{StreamSink, pipeline, send_ring};
use crate::ticket::Ticket;

/// One snapshot's entries. Build it with `add_*`, then [`Batch::commit`]. Dropping it (or
/// [`Batch::abort`]) before commit sends nothing.
///
/// Entries are checked as they are added (an error leaves the batch as it was) and only recorded:
/// files are opened one at a time when their data is due, so a batch holds no file descriptors.
///
/// ```
/// use std::time::Duration;
/// use shmback_writer::{EntryMeta, Outbox, OutboxOptions};
///
/// # let shm = tempfile::tempdir_in("/dev/shm").unwrap();
/// # let segment = shm.path().join("shmback");
/// # let app = tempfile::tempdir().unwrap();
/// # let app_conf = app.path().join("app.conf");
/// # std::fs::write(&app_conf, "workers = 4\n").unwrap();
/// let mut outbox = Outbox::open(&segment, OutboxOptions::default())?;
/// # // A stand-in uploader: reads the batch and acknowledges it as snapshot 0707…07.
/// # let mut ring = shmback_proto::Segment::consumer(&segment, &Default::default()).unwrap();
/// # let uploader = std::thread::spawn(move || {
/// #     let mut batches = shmback_proto::BatchDecoder::new();
/// #     loop {
/// #         let frame = ring.recv(Duration::from_secs(20)).unwrap();
/// #         let event = batches.feed(frame.decode().unwrap()).unwrap();
/// #         let committed = match event {
/// #             shmback_proto::Event::Commit { seq, .. } => Some(seq),
/// #             _ => None,
/// #         };
/// #         frame.release();
/// #         if let Some(seq) = committed {
/// #             return ring.publish_durable(seq, &[7; 32]);
/// #         }
/// #     }
/// # });
/// let mut batch = outbox.batch();
/// batch.tag("nightly").label("release", "1.4.2");
/// batch.add_path("etc/app.conf", &app_conf)?;      // read when its turn comes, not now
/// batch.add_bytes("VERSION", "1.4.2\n")?;
/// // A stream of unknown size (a database dump, a child's stdout): read to its end.
/// let dump = std::io::Cursor::new(b"CREATE TABLE orders (id int);\n".to_vec());
/// batch.add_reader("dumps/orders.sql", None, EntryMeta::default(), dump)?;
/// // Checked when added: a second entry at the same path is refused, the batch unchanged.
/// assert!(batch.add_bytes("VERSION", "again").is_err());
/// assert_eq!(batch.len(), 3);
///
/// // The manifest also lists `etc` and `dumps`, added as directories (mode 0755).
/// let ticket = batch.commit_with_progress(|p| eprintln!("{}/{} bytes", p.bytes_done, p.bytes_total))?;
/// assert_eq!(ticket.progress().entries, 5);
/// ticket.wait_durable(Duration::from_secs(600))?;
/// # uploader.join().unwrap();
/// # Ok::<(), shmback_writer::WriteError>(())
/// ```
///
/// # When a source changes
/// Sizes and times go into the manifest before any data (the uploader needs every entry ahead of
/// the bytes). At commit every file is `lstat`ed again for the manifest; when its turn comes it is
/// opened (`O_NOFOLLOW`) and `fstat`ed, read, and `fstat`ed again. If the size or mtime differs at
/// either point, or the file ends early, the batch is **aborted** (an ABORT frame; the uploader
/// makes no snapshot) and [`WriteError::SourceChanged`] names the file: a snapshot never records
/// metadata that disagrees with the bytes stored. Send the batch again (from a quiescent state or
/// a consistent dump). A reader added with a size that yields fewer or more bytes aborts the same
/// way. A file that vanishes after `add_*` but before commit fails the commit before anything is
/// sent.
pub struct Batch<'o> {
    channel: Channel<'o>,
    entries: EntryList<'o>,
    tags: Vec<String>,
    meta: Vec<(String, String)>,
    host: Option<String>,
    skipped: Vec<(PathBuf, String)>,
}

impl<'o> Batch<'o> {
    pub(crate) fn new(channel: Channel<'o>) -> Self {
        Batch {
            channel,
            entries: EntryList::new(),
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
        self.entries.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.len() == 0
    }

    /// Sources `add_dir` skipped (sockets, devices, FIFOs), with why.
    pub fn skipped(&self) -> &[(PathBuf, String)] {
        &self.skipped
    }

    /// Adds one filesystem object at `snapshot_path`: a regular file (opened only when its data is
    /// sent), a directory (the directory entry alone; see [`Batch::add_dir`] for its contents) or a
    /// symlink (stored as a link). Other types are an error.
    pub fn add_path(&mut self, snapshot_path: impl AsRef<[u8]>, fs_path: impl AsRef<Path>) -> Result<(), WriteError> {
        let (snapshot_path, fs_path) = (snapshot_path.as_ref(), fs_path.as_ref());
        let m = std::fs::symlink_metadata(fs_path).map_err(|source| WriteError::Io { path: fs_path.into(), source })?;
        let file = if m.file_type().is_file() {
            NewData::File { root: self.entries.add_root(fs_path), suffix_from: snapshot_path.len() as u32 }
        } else {
            NewData::None
        };
        match NewEntry::from_metadata(fs_path, &m, file)? {
            Some(entry) => self.entries.add(snapshot_path, entry),
            None => Err(WriteError::Io {
                path: fs_path.into(),
                source: std::io::Error::new(ErrorKind::Unsupported, "not a regular file, directory or symlink"),
            }),
        }
    }

    /// Adds the directory `dir` at snapshot path `prefix` and everything below it: directories,
    /// regular files, symlinks (as links, never followed). Sockets, devices and FIFOs are skipped
    /// and listed in [`Batch::skipped`], and so is the content of a directory below `dir` that this
    /// user may not read (it is stored empty). An empty `prefix` puts the contents at the snapshot root.
    pub fn add_dir(&mut self, prefix: impl AsRef<[u8]>, dir: impl AsRef<Path>) -> Result<(), WriteError> {
        let dir = dir.as_ref();
        let prefix = prefix.as_ref();
        if !prefix.is_empty() {
            self.add_path(prefix, dir)?;
            if !self.entries.is_dir(prefix) {
                return Err(WriteError::Io {
                    path: dir.into(),
                    source: std::io::Error::new(ErrorKind::NotADirectory, "add_dir needs a directory"),
                });
            }
        }
        // Files below `dir` are found again as `dir` joined with their snapshot path below `prefix`.
        let root = self.entries.add_root(dir);
        let suffix_from = if prefix.is_empty() { 0 } else { prefix.len() + 1 };
        let listing = std::fs::read_dir(dir).map_err(|source| WriteError::Io { path: dir.into(), source })?;
        self.walk(Walk { root, suffix_from: suffix_from as u32 }, prefix, dir, listing)
    }

    /// Adds what `listing` (the open directory `dir`) holds, below snapshot path `prefix`.
    fn walk(&mut self, walk: Walk, prefix: &[u8], dir: &Path, listing: std::fs::ReadDir) -> Result<(), WriteError> {
        let io = |source| WriteError::Io { path: dir.into(), source };
        let mut children = Vec::new();
        for e in listing {
            let e = e.map_err(io)?;
            children.push(e.file_name());
        }
        let mut snap = prefix.to_vec();
        for name in children {
            let fs_path = dir.join(&name);
            let m = std::fs::symlink_metadata(&fs_path)
                .map_err(|source| WriteError::Io { path: fs_path.clone(), source })?;
            snap.truncate(prefix.len());
            if !snap.is_empty() {
                snap.push(b'/');
            }
            snap.extend_from_slice(name.as_bytes());
            let file = NewData::File { root: walk.root, suffix_from: walk.suffix_from };
            match NewEntry::from_metadata(&fs_path, &m, file)? {
                Some(entry) => {
                    let is_dir = entry.kind == EntryKind::Dir;
                    self.entries.add(&snap, entry)?;
                    if !is_dir {
                        continue;
                    }
                    // A directory below the one asked for that this user may not read (a
                    // volume's root-only `lost+found`, say) is kept, empty, and listed in
                    // `skipped`, as sockets are: one unreadable corner must not stop every backup.
                    match std::fs::read_dir(&fs_path) {
                        Err(e) if e.kind() == ErrorKind::PermissionDenied => self.skipped.push((
                            fs_path,
                            "directory not readable by this user (permission denied): stored empty".to_string(),
                        )),
                        Err(source) => return Err(WriteError::Io { path: fs_path, source }),
                        Ok(listing) => self.walk(walk, &snap, &fs_path, listing)?,
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
        let entry = NewEntry::in_memory(size, meta, NewData::Reader(Box::new(reader)));
        self.entries.add(snapshot_path.as_ref(), entry)
    }

    /// Adds a file with the given contents (mode 0644, owned by this process, modified now).
    pub fn add_bytes(&mut self, snapshot_path: impl AsRef<[u8]>, bytes: impl Into<Vec<u8>>) -> Result<(), WriteError> {
        let bytes = bytes.into();
        let entry = NewEntry::in_memory(Some(bytes.len() as u64), EntryMeta::default(), NewData::Bytes(bytes));
        self.entries.add(snapshot_path.as_ref(), entry)
    }

    /// Abandons the batch. Nothing was sent, so the uploader sees nothing.
    pub fn abort(self) {}

    /// Sends the batch: BEGIN, the manifest in depth-first path order (with any missing parent
    /// directories added), the file data in manifest order, COMMIT. Returns a [`Ticket`] for the
    /// durable ack. Files' metadata read more than a second before is read again first.
    pub fn commit(self) -> Result<Ticket<'o>, WriteError> {
        self.commit_with_progress(|_| {})
    }

    /// [`Batch::commit`], calling `progress` once the manifest is sent, at most every 100 ms while
    /// data is sent, and once after COMMIT.
    pub fn commit_with_progress(self, progress: impl FnMut(&Progress)) -> Result<Ticket<'o>, WriteError> {
        let start = Instant::now();
        let (channel, labels, manifest) = self.into_parts();
        let Channel { route, timeout, frame_size, .. } = channel;
        match route {
            Route::Ring(ring) => send_ring(ring, timeout, frame_size, labels, manifest, progress, start),
            Route::Http(client) => crate::http::send_http(client, frame_size, labels, manifest, progress, start),
            Route::Detached(_) => Err(WriteError::Detached),
        }
    }

    /// Writes the batch into `out` in stream form (PROTOCOL.md, "Over HTTP": the body of a push,
    /// or of a `GET /v1/batch` answer in pull mode) and returns its sequence and what was sent.
    /// The sequence is the milliseconds since the Unix epoch, bumped past the outbox's last one.
    /// A source that changes ends the stream with ABORT and returns
    /// [`WriteError::SourceChanged`]; a write error leaves the stream torn.
    pub fn write_to(self, out: impl Write) -> Result<(u64, Progress), WriteError> {
        let (channel, labels, mut manifest) = self.into_parts();
        let Channel { route, frame_size, .. } = channel;
        let mut unused = 0;
        let last = match route {
            Route::Http(client) => &mut client.last_seq,
            Route::Detached(last) => last,
            Route::Ring(_) => &mut unused,
        };
        let seq = crate::http::next_seq(last);
        manifest.refresh_metadata()?;
        let mut sink = StreamSink::new(out, frame_size);
        let sent = pipeline(&mut sink, seq, &labels, &mut manifest, frame_size, false, &mut |_| {})
            .map_err(crate::send::Failure::into_error)?;
        Ok((seq, sent))
    }

    /// The channel, the batch's labels (the outbox's extended by the batch's), the manifest.
    fn into_parts(self) -> (Channel<'o>, Labels, Manifest<'o>) {
        let manifest = self.entries.into_manifest(EntryMeta { mode: 0o755, ..EntryMeta::default() });
        let mut labels: Labels = self.channel.labels.clone();
        labels.tags.extend(self.tags);
        labels.meta.extend(self.meta);
        if self.host.is_some() {
            labels.host = self.host;
        }
        (self.channel, labels, manifest)
    }
}

/// Where the files of one `add_dir` walk are found again: the part of a snapshot path from byte
/// `suffix_from` on, below `root`.
#[derive(Clone, Copy)]
struct Walk {
    root: FsRoot,
    suffix_from: u32,
}
