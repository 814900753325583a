//! The uploader's side of the want-list (PROTOCOL.md, "The want-list"): which files of a batch
//! the archiver will read, decided before it runs, with the archiver's own rule.
//!
//! rustic_core reuses a parent snapshot's content for a file, without opening it, when the parent
//! has a node of the same name in the same directory with the same type, size and mtime (ctime and
//! inode as its options say; a manifest carries neither, so neither can differ) and every data
//! blob of that node is in the index (`vendor/rustic_core/src/archiver/parent.rs`,
//! `Parent::is_parent` and `Parent::process`). This module applies that rule to the manifest
//! against the same parent snapshot, which the archive is then pinned to, with the same index:
//! the files it leaves out are exactly the ones the archiver will not open. If that ever fails
//! (the parent was removed between the want-list and the archive), the reader of a left-out file
//! fails the batch instead of waiting for data that will not come (`reader.rs`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};
use std::time::Instant;

use rustic_core::repofile::{Node, SnapshotFile};
use rustic_core::{IndexedIdsStatus, ParentOptions, Repository, SnapshotGroup, SnapshotGroupCriterion, StringList};
use shmback_proto::{Entry, EntryKind, WantList};
use tracing::{info, warn};

use super::manifest::Entries;
use super::node::entry_to_node;
use super::pump::Ring;

/// The parent snapshot a batch is archived against: the one rustic_core would pick by default
/// (the latest of the same host, label and paths), looked up once and then pinned.
pub(crate) fn find_parent(repo: &Repository<IndexedIdsStatus>, snap: &SnapshotFile) -> Option<SnapshotFile> {
    let mut probe = snap.clone();
    // archive() sets the snapshot's paths to the one backup path ("/") before it looks.
    probe.paths = "/".parse::<StringList>().ok()?;
    let group = SnapshotGroup::from_snapshot(&probe, SnapshotGroupCriterion::default());
    repo.get_snapshot_from_str("latest", |sn| group.matches(sn)).ok()
}

/// The parent options that pin the archive to `parent` (or to none).
pub(crate) fn pinned(parent: Option<&SnapshotFile>) -> ParentOptions {
    match parent {
        Some(p) => ParentOptions::default().parents(vec![p.id.to_string()]),
        None => ParentOptions::default().force(true),
    }
}

/// Batch's WANT answer, computed and not yet published.
pub(crate) struct Computed {
    list: WantList,
    took: std::time::Duration,
}

impl Computed {
    /// Computes the want-list of `entries` against `parent`.
    pub(crate) fn new(repo: &Repository<IndexedIdsStatus>, parent: Option<&SnapshotFile>, entries: &Entries) -> Self {
        let started = Instant::now();
        let list = want_list(repo, parent, entries);
        Computed { list, took: started.elapsed() }
    }

    /// Publishes the list to batch `seq`'s producer; logs and counts what it leaves out.
    pub(crate) fn publish(self, parent: Option<&SnapshotFile>, ring: &Ring, seq: u64) {
        let files = self.list.covered();
        let published = ring.lock().publish_want(&self.list);
        let unchanged = published.unwanted_of(files);
        metrics::counter!("shmback_want_list_files_total", "result" => "unchanged").increment(unchanged);
        metrics::counter!("shmback_want_list_files_total", "result" => "wanted").increment(files - unchanged);
        metrics::histogram!("shmback_want_list_duration_seconds").record(self.took.as_secs_f64());
        info!(
            seq,
            files,
            unchanged,
            covered = published.covered(),
            parent = ?parent.map(|p| p.id.to_string()),
            took_ms = self.took.as_millis() as u64,
            "want-list published"
        );
    }
}

/// The files of `entries` the archiver will read: all of them without a parent; with one, all
/// but those the parent has unchanged with their data indexed. Parent trees that cannot be read
/// make their files wanted (the archiver ignores such trees too).
pub(crate) fn want_list(
    repo: &Repository<IndexedIdsStatus>,
    parent: Option<&SnapshotFile>,
    entries: &Entries,
) -> WantList {
    let files = entries.iter().filter(|e| e.kind == EntryKind::File).count() as u64;
    let mut list = WantList::none_of(files);
    let Some(parent) = parent else {
        (0..files).for_each(|f| list.want(f));
        return list;
    };
    let mut walk = ParentWalk::new(repo, parent);
    for (file, e) in entries.iter().filter(|e| e.kind == EntryKind::File).enumerate() {
        if !walk.unchanged(&e) {
            list.want(file as u64);
        }
    }
    list
}

/// The parent's trees along the manifest's depth-first walk: one level per directory of the
/// current entry's path, loaded when first entered (only directories the manifest has).
struct ParentWalk<'r> {
    repo: &'r Repository<IndexedIdsStatus>,
    /// `(directory name, its parent nodes sorted by name, or None when the parent has no such tree)`.
    stack: Vec<(Vec<u8>, Option<Vec<Node>>)>,
}

impl<'r> ParentWalk<'r> {
    fn new(repo: &'r Repository<IndexedIdsStatus>, parent: &SnapshotFile) -> Self {
        let root = load(repo, &parent.tree);
        ParentWalk { repo, stack: vec![(Vec::new(), root)] }
    }

    /// Whether the parent has `e` unchanged by the archiver's rule (so it will not be opened).
    fn unchanged(&mut self, e: &Entry) -> bool {
        // Streams and empty files: nothing to save by leaving them out.
        if e.size.is_none_or(|s| s == 0) {
            return false;
        }
        let path = Path::new(OsStr::from_bytes(&e.path));
        let dirs: Vec<&[u8]> = path
            .parent()
            .into_iter()
            .flat_map(Path::components)
            .filter_map(|c| match c {
                Component::Normal(n) => Some(n.as_bytes()),
                _ => None,
            })
            .collect();
        // Keep the levels this entry shares with the last one; load the rest.
        let shared = self.stack[1..].iter().zip(&dirs).take_while(|((name, _), d)| name.as_slice() == **d).count();
        self.stack.truncate(1 + shared);
        for d in &dirs[shared..] {
            let next = self.stack.last().and_then(|(_, nodes)| nodes.as_ref()).and_then(|nodes| {
                let node = lookup(nodes, d)?;
                node.subtree.and_then(|id| load(self.repo, &id))
            });
            self.stack.push((d.to_vec(), next));
        }
        let Some(nodes) = self.stack.last().and_then(|(_, n)| n.as_ref()) else { return false };
        let Some(p) = lookup(nodes, path.file_name().map_or(&[][..], OsStr::as_bytes)) else { return false };
        let node = entry_to_node(e);
        // The archiver's rule (`Parent::is_parent`), with its default options (ctime and inode
        // not ignored); the manifest's nodes carry neither, so both always match there.
        let (ignore_ctime, ignore_inode) = (false, false);
        let (pm, m) = (&p.meta, &node.meta);
        let match_ctime = ignore_ctime || pm.ctime.zip(m.ctime).is_none_or(|(x, y)| x == y);
        let match_inode = !ignore_inode || pm.inode == 0 || m.inode == 0 || pm.inode == m.inode;
        let matched =
            p.node_type == node.node_type && pm.size == m.size && pm.mtime == m.mtime && match_ctime && match_inode;
        // `Parent::process`: reused only if every data blob is in the index.
        matched && p.content.iter().flatten().all(|id| self.repo.has_data(id))
    }
}

/// The node named `name` in `nodes` (a tree's nodes, sorted by name).
fn lookup<'n>(nodes: &'n [Node], name: &[u8]) -> Option<&'n Node> {
    nodes.binary_search_by(|n| n.name().as_bytes().cmp(name)).ok().map(|i| &nodes[i])
}

fn load(repo: &Repository<IndexedIdsStatus>, id: &rustic_core::TreeId) -> Option<Vec<Node>> {
    match repo.get_tree(id) {
        Ok(tree) => Some(tree.nodes),
        Err(e) => {
            warn!(tree = %id, error = %e, "a parent tree could not be read: its files are wanted");
            None
        }
    }
}
