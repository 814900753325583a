//! The SIGBUS guard chains: a fault in a mapping that is not a segment still kills the process
//! with SIGBUS, after the guard has handled a truncated segment. It runs a child process, so it
//! has a binary of its own: a child spawned while other tests hold segment role locks would
//! hold copies of them until its exec (see `hostile.rs`).
#![cfg(not(loom))]

mod common;

use std::fs::OpenOptions;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::Duration;

use common::{ftruncate, opts, shm_dir};
use shmback_proto::{RingError, Segment};

#[test]
fn an_unrelated_sigbus_still_kills_the_process() {
    if let Some(dir) = std::env::var_os("SHMBACK_SIGBUS_CHILD") {
        let dir = PathBuf::from(dir);
        // The guard is installed and handles a fault in a segment...
        let path = dir.join("seg");
        let mut c = Segment::consumer(&path, &opts(4096)).unwrap();
        ftruncate(&path, 0);
        assert!(matches!(c.wait(Duration::from_millis(50)), Err(RingError::SegmentDamaged { .. })));
        println!("segment fault survived");
        // ...but a fault in a mapping that is not a segment goes to the previous handler.
        let other = dir.join("not-a-segment");
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&other).unwrap();
        f.set_len(4096).unwrap();
        // SAFETY: maps 4096 bytes of a file we own, shared and readable; unmapped by process exit.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        f.set_len(0).unwrap();
        // SAFETY: `p` is a live 4096-byte mapping; the read faults (SIGBUS) as the file is empty.
        let byte = unsafe { std::ptr::read_volatile(p as *const u8) };
        println!("survived an unrelated SIGBUS (read {byte})");
        std::process::exit(0);
    }
    let d = shm_dir();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["an_unrelated_sigbus_still_kills_the_process", "--exact", "--nocapture", "--test-threads=1"])
        .env("SHMBACK_SIGBUS_CHILD", d.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("segment fault survived"), "child: {out:?}");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "child: {out:?}");
}
