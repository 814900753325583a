//! What the segment test binaries share: a /dev/shm directory, segment options with a quick
//! tick, and the truncation a producer with write access can do to its segment file.
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use shmback_proto::{RingConfig, SegmentOptions};

pub fn shm_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("/dev/shm is writable")
}

/// A ring of `cap` bytes, waits ticking every 10 ms.
pub fn opts(cap: usize) -> SegmentOptions {
    SegmentOptions {
        capacity: Some(cap),
        ring: RingConfig { tick: Duration::from_millis(10), ..RingConfig::default() },
        ..SegmentOptions::default()
    }
}

/// What a producer with write access to its segment file can do to it.
pub fn ftruncate(path: &Path, len: u64) {
    OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}
