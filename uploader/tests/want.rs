//! The want-list through a real segment: an unchanged re-run reads no file data at all and still
//! restores byte-exact with the engine's "unmodified" counts; a changed file is the only one read;
//! without a parent every file crosses; a want-list shorter than the manifest (a small reverse
//! area) wants the files past its end.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Server, cfg, fresh_repo, shm_dir};
use rustic_core::repofile::SnapshotSummary;
use shmback_proto::SegmentOptions;
use shmback_uploader::{BatchOutcome, ServeOptions};
use shmback_writer::{Outbox, OutboxOptions, Progress};

const T: Duration = Duration::from_secs(120);

fn content(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 131 + seed * 7) % 253) as u8).collect()
}

/// `n` files of 1..5000 bytes in 5 directories, an empty file, a symlink, one file larger than
/// the ring. Returns the bytes of file data.
fn tree(root: &Path, n: usize) -> u64 {
    let mut bytes = 0;
    for i in 0..n {
        let d = root.join(format!("d{}", i % 5));
        std::fs::create_dir_all(&d).unwrap();
        let len = 1 + i * 997 % 5000;
        std::fs::write(d.join(format!("f{i:03}")), content(i, len)).unwrap();
        bytes += len as u64;
    }
    std::fs::write(root.join("big.bin"), content(99, 9 << 20)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("d0/f000", root.join("link")).unwrap();
    bytes + (9 << 20)
}

/// Serves `seg` and keeps each stored snapshot's summary (a rejection fails the test).
fn server(repo: &str, seg: &Path) -> Server<Result<SnapshotSummary, String>> {
    Server::start_with(repo, seg, ServeOptions::default(), |o| match o {
        BatchOutcome::Stored { snapshot, .. } => Some(Ok(snapshot.summary.clone().unwrap())),
        BatchOutcome::Rejected { why, .. } => Some(Err(why.clone())),
    })
}

fn send(ob: &mut Outbox, src: &Path) -> Progress {
    let mut b = ob.batch();
    b.add_dir("data", src).unwrap();
    let ticket = b.commit().unwrap();
    let p = ticket.progress();
    ticket.wait_durable(T).unwrap();
    p
}

#[test]
fn an_unchanged_rerun_reads_no_file_data_and_restores_byte_exact() {
    let (_repo_dir, loc) = fresh_repo();
    let src = tempfile::tempdir().unwrap();
    let bytes = tree(src.path(), 60);
    let files = 60 + 2; // and big.bin, empty
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = server(&loc, &seg);
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();

    let first = send(&mut ob, src.path());
    assert_eq!((first.bytes_read, first.files_unchanged), (bytes, 0), "without a parent every file is read");
    let second = send(&mut ob, src.path());
    assert_eq!(second.bytes_read, 0, "an unchanged re-run reads no file data: {second:?}");
    assert_eq!(second.bytes_done, 0);
    // Every non-empty file was left out (the empty one gets no data either way).
    assert_eq!((second.files_unchanged, second.bytes_unchanged), (files - 1, bytes));

    // One file changed (same size, new mtime): it alone is read.
    let f = src.path().join("d3/f003");
    let new: Vec<u8> = std::fs::read(&f).unwrap().iter().map(|b| b.wrapping_add(1)).collect();
    let mtime = std::fs::metadata(&f).unwrap().modified().unwrap() + Duration::from_secs(1);
    std::fs::write(&f, &new).unwrap();
    std::fs::File::options().write(true).open(&f).unwrap().set_modified(mtime).unwrap();
    let third = send(&mut ob, src.path());
    assert_eq!(third.bytes_read, new.len() as u64, "only the changed file is read: {third:?}");
    drop(ob);

    let s: Vec<SnapshotSummary> = server.stop().into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(s.len(), 3);
    // The engine counts the symlink as a file too.
    let files = files + 1;
    assert_eq!((s[0].files_new, s[0].files_unmodified), (files, 0));
    assert_eq!((s[1].files_new, s[1].files_changed, s[1].files_unmodified), (0, 0, files));
    assert_eq!(s[1].data_added_files, 0);
    assert_eq!((s[2].files_changed, s[2].files_unmodified), (1, files - 1));

    // The unchanged run's snapshot and the last one restore byte-exact.
    shmback_uploader::commands::check(&cfg(&loc), true).unwrap();
    for (snap, changed) in [("latest~1", false), ("latest", true)] {
        let dest = tempfile::tempdir().unwrap();
        shmback_uploader::commands::restore(&cfg(&loc), snap, dest.path()).unwrap();
        if changed {
            let (n, b) = shmback_uploader::demo::compare_trees(src.path(), &dest.path().join("data")).unwrap();
            assert_eq!((n, b), (files, bytes));
        } else {
            let restored = std::fs::read(dest.path().join("data/d3/f003")).unwrap();
            assert!(restored != new, "the re-run's snapshot holds the file as it was");
            assert_eq!(std::fs::read(dest.path().join("data/big.bin")).unwrap(), content(99, 9 << 20));
            for i in (0..60).filter(|&i| i != 3) {
                let rel = format!("data/d{}/f{i:03}", i % 5);
                assert_eq!(std::fs::read(dest.path().join(&rel)).unwrap(), content(i, 1 + i * 997 % 5000), "{rel}");
            }
        }
    }
}

#[test]
fn a_want_list_shorter_than_the_manifest_wants_the_files_past_its_end() {
    let (_repo_dir, loc) = fresh_repo();
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 100);
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    // The producer creates the segment with a reverse area of one word: lists of 64 files.
    let segment = SegmentOptions { reverse_capacity: 8, ..SegmentOptions::default() };
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, segment, ..OutboxOptions::default() }).unwrap();
    let server = server(&loc, &seg);
    send(&mut ob, src.path());
    let second = send(&mut ob, src.path());
    // Files in manifest order: big.bin, d0/…, d1/…, …, empty. The first 64 are covered; the
    // rest (all non-empty but the last) are read.
    let mut sizes = vec![9u64 << 20];
    for d in 0..5 {
        for i in (0..100).filter(|i| i % 5 == d) {
            sizes.push(1 + (i * 997 % 5000) as u64);
        }
    }
    sizes.push(0);
    let past: u64 = sizes[64..].iter().sum();
    assert_eq!(second.bytes_read, past, "{second:?}");
    assert_eq!(second.files_unchanged, 64, "the 64 covered files (the empty one is last)");
    drop(ob);
    let s: Vec<SnapshotSummary> = server.stop().into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        (s[1].files_new, s[1].files_changed, s[1].files_unmodified),
        (0, 0, 103),
        "all unmodified, the symlink included"
    );
}
