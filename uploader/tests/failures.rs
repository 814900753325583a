//! The engine under failure: a producer that dies mid-batch, hostile frames written straight into
//! the segment, and the uploader SIGKILLed mid-batch. Each time: no snapshot for the bad batch,
//! the producer told (rejected / uploader gone), the repository checks clean with its data, and
//! the next batch is stored.

mod common;

use std::time::Duration;

use common::{
    Server, Stalling, T, cfg, daemon, entry_bytes, eom, file, fresh_repo, good_batch, raw_path_entry, send_raw, shm_dir,
};
use shmback_proto::frame::FrameKind;
use shmback_proto::{Begin, Frame, Labels, Segment, SegmentOptions};
use shmback_uploader::commands::{check, snapshots};
use shmback_writer::{EntryMeta, Outbox, OutboxOptions, WriteError};

fn setup() -> (tempfile::TempDir, String, tempfile::TempDir) {
    let (repo, loc) = fresh_repo();
    (repo, loc, shm_dir())
}

#[test]
fn a_producer_dying_mid_batch_makes_no_snapshot_and_the_next_batch_is_stored() {
    let (_r, loc, shm) = setup();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    {
        let opts = SegmentOptions { capacity: None, ..SegmentOptions::default() };
        let mut p = Segment::producer(&seg, &opts).unwrap();
        let seq = p.next_batch_seq();
        p.send(&Frame::Begin(Begin { seq, labels: Labels::default() }), T).unwrap();
        p.record_begun(seq);
        p.send(&Frame::Entry(file("big", 1 << 20)), T).unwrap();
        p.send(&Frame::EndOfManifest { entries: 1 }, T).unwrap();
        p.send(&Frame::Data(&[7u8; 100_000]), T).unwrap();
        p.flush();
        // The producer process "dies": its segment (and lock) go away mid-data.
    }
    good_batch(&seg, "after").unwrap();
    let out = server.stop();
    assert!(out[0].starts_with("Rejected { seq: 1") && out[0].contains("Aborted"), "{out:#?}");
    assert!(out[1].starts_with("Stored { seq: 2"), "{out:#?}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 1);
    check(&cfg(&loc), true).unwrap();
}

#[test]
fn hostile_batches_are_rejected_and_the_daemon_keeps_serving() {
    let (_r, loc, shm) = setup();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    let hostile: Vec<Vec<(FrameKind, Vec<u8>)>> = vec![
        vec![(FrameKind::Entry, raw_path_entry(b"../escape"))],
        vec![(FrameKind::Entry, raw_path_entry(b"/etc/passwd"))],
        vec![(FrameKind::Entry, raw_path_entry(b"a\0b"))],
        vec![(FrameKind::Entry, entry_bytes(file("b", 0))), (FrameKind::Entry, entry_bytes(file("a", 0)))],
        vec![(FrameKind::Entry, entry_bytes(file("a", 0))), (FrameKind::Entry, entry_bytes(file("a", 0)))],
        // Data longer than the entry says, then data for no file.
        vec![(FrameKind::Entry, entry_bytes(file("a", 2))), eom(1), (FrameKind::Data, b"xyz".to_vec())],
        // A length past anything sane in a label, and an unknown frame type.
        vec![(FrameKind::Entry, vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])],
    ];
    for frames in &hostile {
        send_raw(&seg, frames);
    }
    // Wrong COMMIT totals after a complete data section.
    send_raw(
        &seg,
        &[
            (FrameKind::Entry, entry_bytes(file("a", 3))),
            eom(1),
            (FrameKind::Data, b"abc".to_vec()),
            (FrameKind::Commit, Frame::Commit { entries: 1, bytes: 99 }.encode_to_vec().unwrap()),
        ],
    );
    good_batch(&seg, "fine").unwrap();
    let out = server.stop();
    assert_eq!(out.iter().filter(|o| o.starts_with("Rejected")).count(), hostile.len() + 1, "{out:#?}");
    assert!(out.last().unwrap().starts_with("Stored"), "{out:#?}");
    let snaps = snapshots(&cfg(&loc)).unwrap();
    assert_eq!(snaps.len(), 1, "only the good batch made a snapshot");
    check(&cfg(&loc), true).unwrap();
}

#[test]
fn an_uploader_killed_mid_batch_stores_nothing_and_a_resend_after_restart_restores() {
    let (_r, loc, shm) = setup();
    let seg = shm.path().join("seg");
    let src = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..40u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let run = || daemon(&loc, &seg, &[], log.path());
    let mut child = run();
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    // The first batch streams big.bin and stalls after 8 MiB (twice the ring: the uploader is
    // inside the file) until the uploader has been SIGKILLed: mid-batch by construction, not by
    // timing.
    let (stalling, reached_rx, resume_tx) = Stalling::new(big.clone(), 8 << 20);
    let killer = {
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            reached_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
            resume_tx.send(()).unwrap();
        })
    };
    let mut b = ob.batch();
    b.add_reader("data/big.bin", Some(big.len() as u64), EntryMeta::default(), stalling).unwrap();
    let first = b.commit().and_then(|t| t.wait_durable(T));
    killer.join().unwrap();
    child.wait().unwrap();
    assert!(matches!(first, Err(WriteError::UploaderGone)), "{first:?}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 0, "no snapshot for the batch in flight");
    check(&cfg(&loc), true).unwrap();

    let mut child = run();
    let mut b = ob.batch();
    b.add_dir("data", src.path()).unwrap();
    b.commit().unwrap().wait_durable(T).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let dest = tempfile::tempdir().unwrap();
    shmback_uploader::commands::restore(&cfg(&loc), "latest", dest.path()).unwrap();
    assert!(std::fs::read(dest.path().join("data/big.bin")).unwrap() == big, "restored bytes differ");
}
