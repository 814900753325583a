//! What a producer says about an entry, and what the filesystem says: [`EntryMeta`] for entries
//! from memory or a reader, [`NewEntry`] for any entry on its way into a batch, and [`Source`],
//! where an entry's data is read from when its turn comes.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use shmback_proto::EntryKind;

use crate::error::WriteError;

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
pub(crate) const S_IFDIR: u32 = 0o040000;

/// Metadata of an entry added from memory or a reader.
#[derive(Clone, Copy, Debug)]
pub struct EntryMeta {
    /// Permission bits (the type bits are set by the writer).
    pub mode: u32,
    /// Owner's user id.
    pub uid: u32,
    /// Owner's group id.
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

/// Where a file's data comes from, as handed out when its turn comes.
pub(crate) enum Source<'a> {
    /// A regular file on disk, opened only now.
    File(PathBuf),
    /// A stream or reader.
    Reader(Box<dyn Read + Send + 'a>),
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

/// An entry as it is added: its manifest fields, and its data source in the form the entry list
/// keeps it.
pub(crate) struct NewEntry<'a> {
    pub(crate) kind: EntryKind,
    /// `None`: a stream, whose length travels after its data.
    pub(crate) size: Option<u64>,
    /// `st_mode`: type and permission bits.
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime_ns: i64,
    /// A symlink's target; empty for other kinds.
    pub(crate) target: Vec<u8>,
    pub(crate) data: NewData<'a>,
}

/// The data of a [`NewEntry`].
pub(crate) enum NewData<'a> {
    /// A directory or a symlink.
    None,
    /// A regular file at `root` joined with the part of the snapshot path from byte `suffix_from`
    /// on: a directory walk stores its root once, not every file's filesystem path.
    File { root: FsRoot, suffix_from: u32 },
    /// A stream or reader.
    Reader(Box<dyn Read + Send + 'a>),
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

/// A filesystem path stored once in an entry list ([`crate::entry_list::EntryList::add_root`]),
/// that the on-disk files of one `add_path` or `add_dir` lie at or below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FsRoot(pub(crate) u32);

impl<'a> NewEntry<'a> {
    /// A regular file from memory or a reader.
    pub(crate) fn in_memory(size: Option<u64>, meta: EntryMeta, data: NewData<'a>) -> Self {
        NewEntry {
            kind: EntryKind::File,
            size,
            mode: S_IFREG | (meta.mode & !S_IFMT),
            uid: meta.uid,
            gid: meta.gid,
            mtime_ns: meta.mtime_ns,
            target: Vec::new(),
            data,
        }
    }

    /// The entry for the filesystem object at `fs_path`, or `None` for types a snapshot does not
    /// hold. A regular file's data is `file` (where to find it again when its turn comes).
    pub(crate) fn from_metadata(
        fs_path: &Path,
        m: &std::fs::Metadata,
        file: NewData<'a>,
    ) -> Result<Option<Self>, WriteError> {
        let ft = m.file_type();
        let (kind, size, target, data) = if ft.is_file() {
            (EntryKind::File, Some(m.len()), vec![], file)
        } else if ft.is_dir() {
            (EntryKind::Dir, Some(0), vec![], NewData::None)
        } else if ft.is_symlink() {
            let t = std::fs::read_link(fs_path).map_err(|source| WriteError::Io { path: fs_path.into(), source })?;
            let t = t.into_os_string().into_vec();
            (EntryKind::Symlink, Some(t.len() as u64), t, NewData::None)
        } else {
            return Ok(None);
        };
        let (mode, uid, gid, mtime_ns) = (m.mode(), m.uid(), m.gid(), mtime_ns(m));
        Ok(Some(NewEntry { kind, size, mode, uid, gid, mtime_ns, target, data }))
    }
}

pub(crate) fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

pub(crate) fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}
