//! The serve loop against producers that are broken, hostile or stalled: corruption while the
//! manifest arrives is rejected at once with its cause, a stalled batch times out, a manifest
//! too large is refused, repeated rejections do not flood the log, and a daemon that cannot open
//! its repository leaves no segment behind.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{
    PW, Server, T, begin_raw, cfg, daemon, entry_bytes, file, fresh_repo, good_batch, quick_opts, raw_path_entry,
    send_raw, shm_dir, shmback, stalled_producer, terminate, text, wait_for,
};
use shmback_proto::frame::FrameKind;
use shmback_proto::{Producer, RejectCode, RingError, Segment};
use shmback_uploader::ServeOptions;
use shmback_uploader::commands::snapshots;
use shmback_writer::{Outbox, OutboxOptions, WriteError};

/// Offset of the ring in the segment file, and of `head` in its header (PROTOCOL.md).
const RING_OFFSET: u64 = 4096;
const HEAD_OFFSET: u64 = 128;

/// Writes `bytes` at the producer's position straight into the ring file and publishes a head
/// `advance` bytes further: what a producer that ignores the protocol can do.
fn publish_raw(p: &Producer<Segment>, seg: &Path, bytes: &[u8], advance: u64) {
    let pos = p.position();
    assert_eq!(pos, p.published_position(), "flush before writing raw bytes");
    let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
    f.write_all_at(bytes, RING_OFFSET + pos % p.capacity() as u64).unwrap();
    f.write_all_at(&(pos + advance).to_le_bytes(), HEAD_OFFSET).unwrap();
}

fn expect_rejected(p: &mut Producer<Segment>, seq: u64, epoch: u64, code: RejectCode) {
    let got = p.wait_durable(seq, epoch, T);
    assert!(matches!(got, Err(RingError::Rejected { code: c, .. }) if c == code), "batch {seq}: {got:?}");
}

#[test]
fn corruption_while_the_manifest_arrives_is_rejected_at_once_and_serving_goes_on() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    let entry = entry_bytes(file("a", 0));
    // A frame header of an unknown codec version.
    let bad_version = [4u8, 0, 0, 0, FrameKind::Entry as u8, 9, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0];
    // A header whose length runs past what is published.
    let overrun = [0u8, 16, 0, 0, FrameKind::Entry as u8, 1, 0, 0];
    // Random bytes.
    let noise: Vec<u8> = (0..64u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (bytes, advance) in [(&bad_version[..], 16), (&overrun[..], 8), (&noise[..], 64)] {
        let (mut p, seq, epoch) = begin_raw(&seg, &[(FrameKind::Entry, entry.clone())]);
        publish_raw(&p, &seg, bytes, advance);
        expect_rejected(&mut p, seq, epoch, RejectCode::Malformed);
    }
    good_batch(&seg, "after").unwrap();
    let out = server.stop();
    assert_eq!(out.iter().filter(|o| o.starts_with("Rejected")).count(), 3, "{out:#?}");
    for o in &out[..3] {
        assert!(o.contains("ring corrupt"), "the rejection names the cause: {o}");
    }
    assert!(out[3].starts_with("Stored"), "{out:#?}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 1);
}

#[test]
fn a_misaligned_head_stops_only_its_segment_with_the_fix_named() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let (bad, good) = (shm.path().join("bad"), shm.path().join("good"));
    let log = shm.path().join("log");
    let mut child = daemon(&loc, &bad, &["--segment", good.to_str().unwrap()], &log);
    wait_for(&bad);
    wait_for(&good);
    let (mut p, seq, epoch) = begin_raw(&bad, &[]);
    publish_raw(&p, &bad, &[0; 8], 4);
    expect_rejected(&mut p, seq, epoch, RejectCode::Malformed);
    drop(p);
    good_batch(&good, "still served").unwrap();
    let status = terminate(&mut child);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the broken segment is an error at exit:\n{log}");
    assert!(log.contains("not 8-byte aligned") && log.contains("remove the segment file"), "{log}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 1);
}

/// Offset of `tail` in the segment header (shm-proto/PROTOCOL.md, "Header").
const TAIL_OFFSET: u64 = 256;

#[test]
fn a_segment_truncated_by_its_producer_is_attached_again_and_served() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    let (p, _, _) = begin_raw(&seg, &[(FrameKind::Entry, entry_bytes(file("a", 0)))]);
    // Once the uploader has read BEGIN and the entry (its tail, published when it drains the
    // ring, reaches the producer's head), the producer truncates the file under both mappings,
    // then goes away. Truncating earlier would leave no batch in flight to reject.
    let word = |off: u64| {
        let mut b = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&seg).unwrap(), &mut b, off).unwrap();
        u64::from_le_bytes(b)
    };
    let t = std::time::Instant::now();
    while word(TAIL_OFFSET) == 0 || word(TAIL_OFFSET) != word(HEAD_OFFSET) {
        assert!(t.elapsed() < T, "the uploader never read the manifest's first frames");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(0).unwrap();
    drop(p);
    // The uploader re-creates the segment once the producer has let go.
    let t = std::time::Instant::now();
    while std::fs::metadata(&seg).map_or(0, |m| m.len()) == 0 {
        assert!(t.elapsed() < T, "the uploader never re-created the damaged segment");
        std::thread::sleep(Duration::from_millis(20));
    }
    good_batch(&seg, "after").unwrap();
    let out = server.stop();
    assert!(out[0].starts_with("Rejected") && out[0].contains("truncated"), "{out:#?}");
    assert!(out.last().unwrap().starts_with("Stored"), "{out:#?}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 1);
}

#[test]
fn a_stalled_batch_is_rejected_after_the_idle_limit() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let opts = ServeOptions { batch_idle: Duration::from_secs(1), ..quick_opts() };
    let (tx, outcomes) = std::sync::mpsc::channel();
    let server = Server::start_with(&loc, &seg, opts, move |o| {
        let _ = tx.send(format!("{o:?}"));
        Some(format!("{o:?}"))
    });
    // Stalled in the data phase: the batch is rejected while the producer still blocks.
    let (stalled, release, slow) = stalled_producer(&seg);
    stalled.recv_timeout(T).expect("the producer started");
    let first = outcomes.recv_timeout(T).expect("the stalled batch gets an outcome while it is stalled");
    assert!(first.starts_with("Rejected") && first.contains("--batch-idle"), "{first}");
    release.send(()).unwrap();
    let got = slow.join().unwrap();
    assert!(matches!(got, Err(WriteError::Rejected { code: RejectCode::Stalled, .. })), "{got:?}");
    // Stalled in the manifest: BEGIN and one entry, then nothing.
    let (mut p, seq, epoch) = begin_raw(&seg, &[(FrameKind::Entry, entry_bytes(file("a", 0)))]);
    expect_rejected(&mut p, seq, epoch, RejectCode::Stalled);
    drop(p);
    good_batch(&seg, "after").unwrap();
    let out = server.stop();
    assert_eq!(out.iter().filter(|o| o.contains("--batch-idle")).count(), 2, "{out:#?}");
    assert!(out.last().unwrap().starts_with("Stored"), "{out:#?}");
}

#[test]
fn a_manifest_over_the_entry_limit_is_refused_while_it_arrives() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let opts = ServeOptions { max_entries: 100, ..quick_opts() };
    let server = Server::start_with(&loc, &seg, opts, |o| Some(format!("{o:?}")));
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    let mut b = ob.batch();
    for i in 0..101 {
        b.add_bytes(format!("f{i:03}"), "x").unwrap();
    }
    let got = b.commit().and_then(|t| t.wait_durable(T));
    assert!(matches!(got, Err(WriteError::Rejected { code: RejectCode::TooLarge, .. })), "{got:?}");
    let mut b = ob.batch();
    for i in 0..100 {
        b.add_bytes(format!("f{i:03}"), "x").unwrap();
    }
    b.commit().unwrap().wait_durable(T).unwrap();
    drop(ob);
    let out = server.stop();
    assert!(out[0].contains("more than 100 entries") && out[0].contains("--max-entries"), "{out:#?}");
    assert!(out[1].starts_with("Stored"), "{out:#?}");
}

#[test]
fn a_flood_of_bad_batches_is_logged_in_full_only_at_first() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = shm.path().join("log");
    let mut child = daemon(&loc, &seg, &[], &log);
    wait_for(&seg);
    for _ in 0..60 {
        send_raw(&seg, &[(FrameKind::Entry, raw_path_entry(b"../escape"))]);
    }
    assert!(terminate(&mut child).success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.matches("batch rejected, no snapshot").count(), 10, "{log}");
    assert!(log.contains("50 more batches rejected"), "a summary counts the rest:\n{log}");
    assert!(log.lines().count() < 20, "{log}");
}

#[test]
fn a_daemon_that_cannot_open_its_repository_creates_no_segment() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let o = shmback(Path::new(&loc), &["run", "--segment", seg.to_str().unwrap()], &[("RESTIC_PASSWORD", "wrong")]);
    assert!(!o.status.success() && text(&o).contains("wrong password"), "{}", text(&o));
    assert!(!seg.exists(), "a segment was left behind by a daemon that never served it");
    let o = shmback(Path::new(&loc), &["snapshots"], &[("RESTIC_PASSWORD", PW)]);
    assert!(o.status.success(), "{}", text(&o));
}
