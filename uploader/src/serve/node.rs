//! Manifest entries as rustic_core tree nodes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustic_core::jiff::Timestamp;
use rustic_core::repofile::{Metadata, Node, NodeType};
use shmback_proto::{Entry, EntryKind};

/// Go's `os.FileMode` bits, which restic (and so rustic) store as a node's mode.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;
const GO_MODE_SETUID: u32 = 1 << 23;
const GO_MODE_SETGID: u32 = 1 << 22;
const GO_MODE_STICKY: u32 = 1 << 20;

/// Unix `st_mode` → Go `os.FileMode` (type bits + permissions + special bits).
pub(crate) fn go_mode(unix: u32, kind: EntryKind) -> u32 {
    let mut m = unix & 0o777;
    match kind {
        EntryKind::Dir => m |= GO_MODE_DIR,
        EntryKind::Symlink => m |= GO_MODE_SYMLINK,
        EntryKind::File => {}
    }
    if unix & 0o4000 != 0 {
        m |= GO_MODE_SETUID;
    }
    if unix & 0o2000 != 0 {
        m |= GO_MODE_SETGID;
    }
    if unix & 0o1000 != 0 {
        m |= GO_MODE_STICKY;
    }
    m
}

/// The node for an entry, named after its last path component.
pub(crate) fn entry_to_node(e: &Entry) -> Node {
    let path = Path::new(OsStr::from_bytes(&e.path));
    let name = path.file_name().unwrap_or(OsStr::new(""));
    let node_type = match e.kind {
        EntryKind::File => NodeType::File,
        EntryKind::Dir => NodeType::Dir,
        EntryKind::Symlink => NodeType::from_link(Path::new(OsStr::from_bytes(&e.target))),
    };
    let meta = Metadata {
        mode: Some(go_mode(e.mode, e.kind)),
        mtime: Timestamp::from_nanosecond(e.mtime_ns as i128).ok(),
        uid: Some(e.uid),
        gid: Some(e.gid),
        size: if e.kind == EntryKind::File { e.size.unwrap_or(0) } else { 0 },
        ..Metadata::default()
    };
    Node::new_node(name, node_type, meta)
}
