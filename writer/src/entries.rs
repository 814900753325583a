//! What a batch holds per entry until it is sent: the manifest [`Entry`] and where its data comes
//! from, and the mapping from filesystem metadata to entries.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use shmback_proto::{Entry, EntryKind};

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

pub(crate) enum Source<'a> {
    /// A directory or a symlink: no data.
    None,
    /// A regular file on disk, opened when its turn comes.
    File(PathBuf),
    /// A stream or reader.
    Reader(Box<dyn Read + Send + 'a>),
    /// Bytes in memory.
    Bytes(Vec<u8>),
}

pub(crate) struct Pending<'a> {
    pub(crate) entry: Entry,
    pub(crate) source: Source<'a>,
    /// Where the entry came from, for messages (fs path, or the snapshot path).
    pub(crate) origin: PathBuf,
}

pub(crate) fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

pub(crate) fn memory_entry(path: Vec<u8>, size: Option<u64>, meta: EntryMeta) -> Entry {
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

pub(crate) fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime().saturating_mul(1_000_000_000).saturating_add(m.mtime_nsec())
}

/// The entry for a filesystem object, or `None` for types a snapshot does not hold.
pub(crate) fn entry_from_metadata<'a>(
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
