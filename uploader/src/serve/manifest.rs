//! A batch's manifest as the serve loop keeps it until the archiver has walked it.
//!
//! Kept compact, because a manifest can be millions of entries: one fixed-size record per entry
//! and one byte arena in which each path is stored as the length it shares with the previous
//! path plus the rest. Manifests arrive sorted depth-first, so neighbours share most of their
//! bytes. Owned `Entry` values (and, before this, rustic's nodes built for all of them up front)
//! cost about ten times as much; entries are rebuilt one at a time as the archiver asks.

use std::time::Instant;

use shmback_proto::{Begin, Entry, EntryKind};

/// A batch whose manifest is being (or has been) received.
pub(crate) struct Manifest {
    pub(crate) begin: Begin,
    /// When BEGIN arrived (the batch's elapsed time and idle limit count from here).
    pub(crate) started: Instant,
    pub(crate) entries: Entries,
}

impl Manifest {
    pub(crate) fn new(begin: Begin) -> Self {
        Manifest { begin, started: Instant::now(), entries: Entries::default() }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.begin.seq
    }
}

/// The limits a manifest is held to while it arrives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_entries: u64,
    pub(crate) max_bytes: usize,
}

/// One entry without its path and target bytes (those are in the arena, in order).
struct Record {
    size: u64,
    mtime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Bytes of the path shared with the previous entry's path.
    shared: u16,
    /// Bytes of the path stored in the arena after the shared part.
    rest: u16,
    target: u16,
    kind: EntryKind,
    size_known: bool,
}

/// The entries of one manifest, in manifest order.
#[derive(Default)]
pub(crate) struct Entries {
    records: Vec<Record>,
    arena: Vec<u8>,
    last_path: Vec<u8>,
    streams: u64,
    declared_bytes: u64,
}

impl Entries {
    /// Appends an entry the batch decoder has validated, or says which limit it would break.
    pub(crate) fn push(&mut self, entry: Entry, limits: Limits) -> Result<(), String> {
        if self.records.len() as u64 >= limits.max_entries {
            return Err(format!(
                "the batch has more than {} entries (--max-entries, SHMBACK_MAX_ENTRIES): send the tree as \
                 several batches, or raise the limit if the uploader has the memory",
                limits.max_entries
            ));
        }
        // Validated paths and targets are at most 4096 bytes, so every length fits in u16.
        let shared = entry.path.iter().zip(&self.last_path).take_while(|(a, b)| a == b).count();
        let rest = &entry.path[shared..];
        let record = Record {
            size: entry.size.unwrap_or(0),
            mtime_ns: entry.mtime_ns,
            mode: entry.mode,
            uid: entry.uid,
            gid: entry.gid,
            shared: u16::try_from(shared).map_err(|_| "a path longer than 64 KiB".to_string())?,
            rest: u16::try_from(rest.len()).map_err(|_| "a path longer than 64 KiB".to_string())?,
            target: u16::try_from(entry.target.len()).map_err(|_| "a symlink target longer than 64 KiB".to_string())?,
            kind: entry.kind,
            size_known: entry.size.is_some(),
        };
        if self.held_bytes() + rest.len() + entry.target.len() + size_of::<Record>() > limits.max_bytes {
            return Err(format!(
                "the batch's manifest needs more than {} bytes of memory (paths and targets of {} entries): \
                 send the tree as several batches",
                limits.max_bytes,
                self.records.len()
            ));
        }
        self.arena.extend_from_slice(rest);
        self.arena.extend_from_slice(&entry.target);
        self.records.push(record);
        if entry.kind == EntryKind::File {
            match entry.size {
                Some(n) => self.declared_bytes += n,
                None => self.streams += 1,
            }
        }
        self.last_path = entry.path;
        Ok(())
    }

    /// Memory the manifest holds (what it has allocated, not only what it uses).
    fn held_bytes(&self) -> usize {
        self.records.capacity() * size_of::<Record>() + self.arena.capacity() + self.last_path.capacity()
    }

    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Bytes the manifest declares for its files of known size.
    pub(crate) fn declared_bytes(&self) -> u64 {
        self.declared_bytes
    }

    /// The entries rebuilt one at a time, in manifest order, leaving the manifest in place.
    pub(crate) fn iter(&self) -> impl Iterator<Item = Entry> + '_ {
        let (mut at, mut path) = (0usize, Vec::new());
        self.records.iter().map(move |r| rebuild(r, &self.arena, &mut at, &mut path))
    }

    /// Files whose size is unknown until their END_OF_FILE (streams).
    pub(crate) fn streams(&self) -> u64 {
        self.streams
    }
}

impl IntoIterator for Entries {
    type Item = Entry;
    type IntoIter = EntryIter;

    fn into_iter(self) -> EntryIter {
        EntryIter { records: self.records.into_iter(), arena: self.arena, at: 0, path: Vec::new() }
    }
}

/// The entries rebuilt one at a time, in manifest order.
pub(crate) struct EntryIter {
    records: std::vec::IntoIter<Record>,
    arena: Vec<u8>,
    /// Where the next entry's bytes start in the arena.
    at: usize,
    /// The previous entry's path (the next one shares a prefix of it).
    path: Vec<u8>,
}

impl Iterator for EntryIter {
    type Item = Entry;

    fn next(&mut self) -> Option<Entry> {
        let r = self.records.next()?;
        Some(rebuild(&r, &self.arena, &mut self.at, &mut self.path))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.records.size_hint()
    }
}

/// Rebuilds the entry of `r`, whose bytes start at `*at` in `arena`, from the previous entry's
/// `path`; advances both.
fn rebuild(r: &Record, arena: &[u8], at: &mut usize, path: &mut Vec<u8>) -> Entry {
    let (rest, target) = (usize::from(r.rest), usize::from(r.target));
    path.truncate(usize::from(r.shared));
    path.extend_from_slice(&arena[*at..*at + rest]);
    let target = arena[*at + rest..*at + rest + target].to_vec();
    *at += rest + target.len();
    Entry {
        path: path.clone(),
        kind: r.kind,
        size: r.size_known.then_some(r.size),
        mode: r.mode,
        uid: r.uid,
        gid: r.gid,
        mtime_ns: r.mtime_ns,
        target,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind, target: &str) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            size: (kind == EntryKind::File).then_some(path.len() as u64),
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_ns: -5,
            target: target.as_bytes().to_vec(),
        }
    }

    const ROOMY: Limits = Limits { max_entries: 100, max_bytes: 1 << 20 };

    #[test]
    fn entries_come_back_as_they_went_in() {
        let given = vec![
            entry("a", EntryKind::Dir, ""),
            entry("a/b", EntryKind::File, ""),
            entry("a/bc", EntryKind::Symlink, "../x"),
            entry("a/bc/d", EntryKind::File, ""),
            entry("z", EntryKind::File, ""),
        ];
        let mut entries = Entries::default();
        for e in given.clone() {
            entries.push(e, ROOMY).unwrap();
        }
        assert_eq!((entries.len(), entries.streams(), entries.declared_bytes()), (5, 0, 3 + 6 + 1));
        assert_eq!(entries.iter().collect::<Vec<_>>(), given);
        assert_eq!(entries.into_iter().collect::<Vec<_>>(), given);
    }

    #[test]
    fn the_limits_name_themselves() {
        let mut entries = Entries::default();
        let two = Limits { max_entries: 2, ..ROOMY };
        entries.push(entry("a", EntryKind::File, ""), two).unwrap();
        entries.push(entry("b", EntryKind::File, ""), two).unwrap();
        let e = entries.push(entry("c", EntryKind::File, ""), two).unwrap_err();
        assert!(e.contains("more than 2 entries") && e.contains("--max-entries"), "{e}");
        let small = Limits { max_entries: 100, max_bytes: 4096 };
        let mut entries = Entries::default();
        let long = "x".repeat(200);
        let e = (0..100)
            .find_map(|i| entries.push(entry(&format!("{i:03}{long}"), EntryKind::File, ""), small).err())
            .unwrap();
        assert!(e.contains("more than 4096 bytes of memory"), "{e}");
    }
}
