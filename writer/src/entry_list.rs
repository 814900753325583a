//! The entries of a batch, kept compact because a batch may hold millions: every path's bytes in
//! one buffer, one fixed-size record per entry, and an index by path for the checks made as
//! entries are added. [`EntryList`] collects and checks; [`Manifest`] is the same entries sorted
//! in manifest order, handing out each file's data source once, when its turn comes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use shmback_proto::frame::validate_path;
use shmback_proto::{Entry, EntryKind};

use crate::entries::{EntryMeta, FsRoot, NewData, NewEntry, S_IFDIR, Source, as_path, mtime_ns};
use crate::error::WriteError;

/// End of a chain of records whose paths share a hash.
const NO_RECORD: u32 = u32::MAX;

/// One entry. Its snapshot path is `bytes[path_start..][..path_len]`, followed by its symlink
/// target (`target_len` bytes).
struct Record {
    path_start: usize,
    path_len: u32,
    target_len: u32,
    kind: EntryKind,
    /// A parent directory nobody added: it gets the batch's default metadata at commit.
    implied: bool,
    size: Option<u64>,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    data: DataRef,
    /// The record added before this one whose path has the same hash, or [`NO_RECORD`].
    next_same_hash: u32,
}

/// Where a [`Record`]'s data is: the variants of [`NewData`], with readers and in-memory bytes
/// kept aside (they are few) so that every record has the same small size.
enum DataRef {
    None,
    File { root: FsRoot, suffix_from: u32 },
    Reader(u32),
    Bytes(u32),
}

/// The storage both [`EntryList`] and [`Manifest`] read.
struct Store<'a> {
    /// Snapshot paths, symlink targets and filesystem roots, back to back.
    bytes: Vec<u8>,
    records: Vec<Record>,
    /// `(start, len)` in `bytes` of each [`FsRoot`].
    roots: Vec<(usize, usize)>,
    readers: Vec<Option<Box<dyn Read + Send + 'a>>>,
    buffers: Vec<Vec<u8>>,
    /// When the oldest on-disk metadata in `records` was read (None: no on-disk entries).
    stat_at: Option<Instant>,
}

/// On-disk metadata read less than this long before a send is not read again for it.
const METADATA_FRESH_FOR: Duration = Duration::from_secs(1);

impl Store<'_> {
    fn path(&self, r: &Record) -> &[u8] {
        &self.bytes[r.path_start..][..r.path_len as usize]
    }

    fn target(&self, r: &Record) -> &[u8] {
        &self.bytes[r.path_start + r.path_len as usize..][..r.target_len as usize]
    }

    /// The on-disk path of a file added from the filesystem: its root, joined with the part of
    /// its snapshot path below the root's snapshot path.
    fn fs_path(&self, r: &Record) -> Option<PathBuf> {
        let DataRef::File { root, suffix_from } = r.data else { return None };
        let (start, len) = self.roots[root.0 as usize];
        let root = as_path(&self.bytes[start..][..len]);
        let suffix = &self.path(r)[suffix_from as usize..];
        // `join("")` would append a `/`, which changes what `lstat` sees for a symlink.
        Some(if suffix.is_empty() { root.to_path_buf() } else { root.join(as_path(suffix)) })
    }
}

/// The entries added to a batch so far, checked as they come.
pub(crate) struct EntryList<'a> {
    store: Store<'a>,
    /// Hash of a path → the last record added with that hash.
    index: HashMap<u64, u32>,
    hasher: RandomState,
    /// Entries the producer added (implied parents not counted).
    added: usize,
}

impl<'a> EntryList<'a> {
    pub(crate) fn new() -> Self {
        EntryList {
            store: Store {
                bytes: Vec::new(),
                records: Vec::new(),
                roots: Vec::new(),
                readers: Vec::new(),
                buffers: Vec::new(),
                stat_at: None,
            },
            index: HashMap::new(),
            hasher: RandomState::new(),
            added: 0,
        }
    }

    /// Entries the producer added.
    pub(crate) fn len(&self) -> usize {
        self.added
    }

    /// Stores a filesystem path that files are then added at or below.
    pub(crate) fn add_root(&mut self, fs_path: &Path) -> FsRoot {
        use std::os::unix::ffi::OsStrExt;
        let bytes = fs_path.as_os_str().as_bytes();
        self.store.roots.push((self.store.bytes.len(), bytes.len()));
        self.store.bytes.extend_from_slice(bytes);
        FsRoot(self.store.roots.len() as u32 - 1)
    }

    /// Whether `path` was added as a directory.
    pub(crate) fn is_dir(&self, path: &[u8]) -> bool {
        self.find(path).is_some_and(|i| {
            let r = &self.store.records[i];
            !r.implied && r.kind == EntryKind::Dir
        })
    }

    fn find(&self, path: &[u8]) -> Option<usize> {
        let mut i = *self.index.get(&self.hasher.hash_one(path))?;
        while i != NO_RECORD {
            let r = &self.store.records[i as usize];
            if self.store.path(r) == path {
                return Some(i as usize);
            }
            i = r.next_same_hash;
        }
        None
    }

    fn insert(&mut self, mut record: Record) {
        let hash = self.hasher.hash_one(self.store.path(&record));
        let i = self.store.records.len() as u32;
        record.next_same_hash = self.index.insert(hash, i).unwrap_or(NO_RECORD);
        self.store.records.push(record);
    }

    /// Checks `path` (valid, not added yet, nothing but directories above it, nothing below it
    /// unless it is a directory) and adds the entry; an error leaves the list unchanged.
    pub(crate) fn add(&mut self, path: &[u8], entry: NewEntry<'a>) -> Result<(), WriteError> {
        if matches!(entry.data, NewData::File { .. }) {
            // Its metadata was read just now, by the caller.
            self.store.stat_at.get_or_insert_with(Instant::now);
        }
        let shown = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
        validate_path(path).map_err(|why| WriteError::InvalidPath { path: shown(path), why })?;
        let is_dir = entry.kind == EntryKind::Dir;
        let existing = self.find(path);
        if let Some(i) = existing {
            if !self.store.records[i].implied {
                return Err(WriteError::Duplicate { path: shown(path) });
            }
            if !is_dir {
                let below = |r: &&Record| {
                    let p = self.store.path(r);
                    !r.implied && p.starts_with(path) && p.get(path.len()) == Some(&b'/')
                };
                let child = self.store.records.iter().find(below).map(|r| shown(self.store.path(r)));
                return Err(WriteError::NotADirectory { path: child.unwrap_or_default(), parent: shown(path) });
            }
        }
        let parents = || path.iter().enumerate().filter(|(_, b)| **b == b'/').map(|(i, _)| &path[..i]);
        for parent in parents() {
            if self.find(parent).is_some_and(|i| self.store.records[i].kind != EntryKind::Dir) {
                return Err(WriteError::NotADirectory { path: shown(path), parent: shown(parent) });
            }
        }

        let path_start = self.store.bytes.len();
        self.store.bytes.extend_from_slice(path);
        self.store.bytes.extend_from_slice(&entry.target);
        let data = match entry.data {
            NewData::None => DataRef::None,
            NewData::File { root, suffix_from } => DataRef::File { root, suffix_from },
            NewData::Reader(r) => {
                self.store.readers.push(Some(r));
                DataRef::Reader(self.store.readers.len() as u32 - 1)
            }
            NewData::Bytes(b) => {
                self.store.buffers.push(b);
                DataRef::Bytes(self.store.buffers.len() as u32 - 1)
            }
        };
        let record = Record {
            path_start,
            path_len: path.len() as u32,           // at most MAX_PATH_LEN: validated above
            target_len: entry.target.len() as u32, // at most PATH_MAX: read from a symlink
            kind: entry.kind,
            implied: false,
            size: entry.size,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            mtime_ns: entry.mtime_ns,
            data,
            next_same_hash: NO_RECORD,
        };
        match existing {
            Some(i) => {
                let slot = &mut self.store.records[i];
                *slot = Record { next_same_hash: slot.next_same_hash, ..record };
            }
            None => self.insert(record),
        }
        for parent in parents() {
            if self.find(parent).is_none() {
                // The parent's path is a prefix of this one: it shares its bytes.
                self.insert(Record {
                    path_start,
                    path_len: parent.len() as u32,
                    target_len: 0,
                    kind: EntryKind::Dir,
                    implied: true,
                    size: Some(0),
                    mode: 0,
                    uid: 0,
                    gid: 0,
                    mtime_ns: 0,
                    data: DataRef::None,
                    next_same_hash: NO_RECORD,
                });
            }
        }
        self.added += 1;
        Ok(())
    }

    /// The entries in manifest order (depth-first, as `Path::cmp` orders paths), parents nobody
    /// added given `parents` (a directory's type bits are set here).
    pub(crate) fn into_manifest(self, parents: EntryMeta) -> Manifest<'a> {
        let EntryList { mut store, index, .. } = self;
        drop(index);
        for r in store.records.iter_mut().filter(|r| r.implied) {
            (r.mode, r.uid, r.gid, r.mtime_ns) = (S_IFDIR | parents.mode, parents.uid, parents.gid, parents.mtime_ns);
        }
        let Store { bytes, records, .. } = &mut store;
        // Paths are unique, so an unstable sort gives the one order, without a buffer of half the
        // records that a stable sort allocates.
        let path = |r: &Record| as_path(&bytes[r.path_start..][..r.path_len as usize]);
        records.sort_unstable_by(|a, b| path(a).cmp(path(b)));
        Manifest { store }
    }
}

/// A file's data, handed out by [`Manifest::take_file`] when its turn comes.
pub(crate) struct FileData<'a> {
    pub(crate) source: Source<'a>,
    /// From the manifest: `None` for a stream.
    pub(crate) size: Option<u64>,
    /// From the manifest.
    pub(crate) mtime_ns: i64,
    /// What errors name: the filesystem path, or the snapshot path for readers and bytes.
    pub(crate) origin: PathBuf,
}

/// A batch's entries in manifest order.
pub(crate) struct Manifest<'a> {
    store: Store<'a>,
}

impl<'a> Manifest<'a> {
    /// Entries, implied parents included.
    pub(crate) fn len(&self) -> usize {
        self.store.records.len()
    }

    fn files(&self) -> impl Iterator<Item = &Record> {
        self.store.records.iter().filter(|r| r.kind == EntryKind::File)
    }

    pub(crate) fn file_count(&self) -> u64 {
        self.files().count() as u64
    }

    /// Bytes of the files of known size.
    pub(crate) fn file_bytes(&self) -> u64 {
        self.files().filter_map(|r| r.size).sum()
    }

    /// Whether the `i`th entry is a file (files are what a want-list counts).
    pub(crate) fn is_file(&self, i: usize) -> bool {
        self.store.records[i].kind == EntryKind::File
    }

    /// The `i`th entry's size (0 when unknown or not a file).
    pub(crate) fn entry_size(&self, i: usize) -> u64 {
        self.store.records[i].size.unwrap_or(0)
    }

    /// The `i`th entry as the protocol carries it.
    pub(crate) fn entry(&self, i: usize) -> Entry {
        let r = &self.store.records[i];
        Entry {
            path: self.store.path(r).to_vec(),
            kind: r.kind,
            size: r.size,
            mode: r.mode,
            uid: r.uid,
            gid: r.gid,
            mtime_ns: r.mtime_ns,
            target: self.store.target(r).to_vec(),
        }
    }

    /// Re-reads every on-disk file's metadata for the manifest; nothing has been sent yet, so a
    /// vanished or retyped file simply fails the commit. Metadata read less than a second ago
    /// (a directory walked and committed at once, as `shmback-send` does) is kept: a second
    /// `lstat` of every file cost as much as the walk, and a file that changes after the last
    /// read is found at its send either way (its size and mtime are checked as it is read).
    pub(crate) fn refresh_metadata(&mut self) -> Result<(), WriteError> {
        if self.store.stat_at.is_none_or(|t| t.elapsed() < METADATA_FRESH_FOR) {
            return Ok(());
        }
        let started = Instant::now();
        for i in 0..self.store.records.len() {
            let Some(p) = self.store.fs_path(&self.store.records[i]) else { continue };
            let m = std::fs::symlink_metadata(&p).map_err(|source| WriteError::Io { path: p.clone(), source })?;
            if !m.file_type().is_file() {
                return Err(WriteError::SourceChanged { path: p, what: "no longer a regular file".into() });
            }
            let r = &mut self.store.records[i];
            (r.size, r.mode, r.uid, r.gid, r.mtime_ns) = (Some(m.len()), m.mode(), m.uid(), m.gid(), mtime_ns(&m));
        }
        self.store.stat_at = Some(started);
        Ok(())
    }

    /// The data of the `i`th entry if it is a file. A reader is handed out once; bytes are kept
    /// (copied out) when `keep` is set, for a transport that may send the batch again.
    pub(crate) fn take_file(&mut self, i: usize, keep: bool) -> Result<Option<FileData<'a>>, WriteError> {
        let r = &self.store.records[i];
        if r.kind != EntryKind::File {
            return Ok(None);
        }
        let (size, mtime_ns) = (r.size, r.mtime_ns);
        let (source, origin) = match r.data {
            DataRef::File { .. } => {
                let Some(p) = self.store.fs_path(r) else { return Ok(None) };
                (Source::File(p.clone()), p)
            }
            DataRef::Reader(k) => {
                let origin = as_path(self.store.path(r)).to_path_buf();
                match self.store.readers[k as usize].take() {
                    Some(reader) => (Source::Reader(reader), origin),
                    // Sent once already (a resend after a dropped connection): a reader cannot be
                    // read twice, and skipping it would send a batch its COMMIT contradicts.
                    None => return Err(WriteError::NotResendable { path: origin }),
                }
            }
            DataRef::Bytes(k) => {
                let origin = as_path(self.store.path(r)).to_path_buf();
                let buf = &mut self.store.buffers[k as usize];
                (Source::Bytes(if keep { buf.clone() } else { std::mem::take(buf) }), origin)
            }
            DataRef::None => return Ok(None),
        };
        Ok(Some(FileData { source, size, mtime_ns, origin }))
    }

    /// The first reader already sent, if any: a batch holding one cannot be sent again.
    pub(crate) fn spent_reader(&self) -> Option<PathBuf> {
        self.store.records.iter().find_map(|r| match r.data {
            DataRef::Reader(k) if self.store.readers[k as usize].is_none() => {
                Some(as_path(self.store.path(r)).to_path_buf())
            }
            _ => None,
        })
    }
}
