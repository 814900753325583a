//! The /dev/shm segment: creation, mode, validation on attach (each error distinct and
//! actionable), one process per role, liveness through OFD locks, reset, and the ring over it.
#![cfg(not(loom))]

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{opts, shm_dir};
use shmback_proto::layout::HEADER_SIZE;
use shmback_proto::{Frame, FrameKind, RingError, Role, Segment, SegmentError, SegmentOptions};

fn any_size() -> SegmentOptions {
    SegmentOptions { capacity: None, ..opts(4096) }
}

#[test]
fn created_atomically_with_mode_0600_and_attached_by_the_other_side() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let p = Segment::open(&path, Role::Producer, &opts(64 << 10)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), HEADER_SIZE + (64 << 10) + (64 << 10));
    // No temporary files are left next to it.
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    let c = Segment::open(&path, Role::Consumer, &any_size()).unwrap();
    assert_eq!(c.generation(), 1);
    let info = c.info();
    assert_eq!(info.capacity, 64 << 10);
    assert_eq!(info.producer.0, std::process::id());
    assert!(info.producer.2, "producer seen alive");
    drop(p);
    assert!(!c.info().producer.2, "producer seen gone once its segment is closed");
}

#[test]
fn group_shared_segments_are_0660() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let _s = Segment::open(&path, Role::Consumer, &SegmentOptions { group_shared: true, ..opts(4096) }).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
}

#[test]
fn concurrent_creators_agree_on_one_segment() {
    for _ in 0..20 {
        let d = shm_dir();
        let path = d.path().join("seg");
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Segment::open(&path, Role::Producer, &opts(8192)).unwrap());
            let b = s.spawn(|| Segment::open(&path, Role::Consumer, &opts(8192)).unwrap());
            (a.join().unwrap(), b.join().unwrap())
        });
        // Both see the other: they attached to the same file.
        assert!(a.info().consumer.2 && b.info().producer.2);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}

#[test]
fn one_process_per_role() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let _p = Segment::open(&path, Role::Producer, &opts(4096)).unwrap();
    match Segment::open(&path, Role::Producer, &opts(4096)) {
        Err(e @ SegmentError::RoleTaken { role: Role::Producer, .. }) => {
            assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
        }
        other => panic!("expected RoleTaken, got {:?}", other.err()),
    }
}

#[test]
fn missing_segment_without_create_is_not_found() {
    let d = shm_dir();
    let e = Segment::open(d.path().join("nope"), Role::Consumer, &SegmentOptions { create: false, ..opts(4096) })
        .err()
        .unwrap();
    assert!(matches!(e, SegmentError::NotFound { .. }), "{e}");
}

fn corrupt(path: &PathBuf, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn made(d: &tempfile::TempDir) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = d.path().join(format!("seg{}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    drop(Segment::open(&path, Role::Producer, &opts(8192)).unwrap());
    path
}

#[test]
fn attach_validates_every_header_field() {
    let d = shm_dir();
    // A producer: a consumer re-initialises a damaged segment instead (tests/hostile.rs).
    let attach = |p: &PathBuf| Segment::open(p, Role::Producer, &any_size()).err().expect("attach must fail");

    let p = made(&d);
    corrupt(&p, 0, b"NOTSHMBK");
    assert!(matches!(attach(&p), SegmentError::BadMagic { .. }));

    let p = made(&d);
    corrupt(&p, 8, &2u32.to_le_bytes());
    let e = attach(&p);
    assert!(matches!(e, SegmentError::Version { found: 2, expected: 1, .. }), "{e}");
    assert!(e.to_string().contains("same shmback release"));

    let p = made(&d);
    corrupt(&p, 24, &(8192u64 + 8).to_le_bytes());
    assert!(matches!(attach(&p), SegmentError::BadGeometry { .. }));

    let p = made(&d);
    corrupt(&p, 24, &16384u64.to_le_bytes());
    assert!(
        matches!(attach(&p), SegmentError::Truncated { expected, .. } if expected == HEADER_SIZE + 16384 + (64 << 10))
    );

    let p = made(&d);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(HEADER_SIZE + 100).unwrap();
    assert!(matches!(attach(&p), SegmentError::Truncated { .. }));

    let p = made(&d);
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(100).unwrap();
    assert!(matches!(attach(&p), SegmentError::TooSmall { size: 100, .. }));

    let p = made(&d);
    let e = Segment::open(&p, Role::Consumer, &opts(16384)).err().unwrap();
    assert!(matches!(e, SegmentError::CapacityMismatch { found: 8192, wanted: 16384, .. }), "{e}");

    // A header stuck in INITIALISING (a re-initialisation died; nobody holds the locks).
    let p = made(&d);
    corrupt(&p, 16, &1u32.to_le_bytes());
    let e = attach(&p);
    assert!(matches!(e, SegmentError::NotReady { state: 1, .. }), "{e}");
    assert!(e.to_string().contains("the uploader, which re-initialises it"), "{e}");

    // Not a regular file.
    let fifo = d.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    assert!(matches!(attach(&fifo), SegmentError::NotRegular { .. } | SegmentError::Io { .. }));
}

#[test]
fn bad_options_are_refused() {
    let d = shm_dir();
    let e = Segment::open(d.path().join("s"), Role::Producer, &opts(5000)).err().unwrap();
    assert!(matches!(e, SegmentError::InvalidOptions(_)), "{e}");
}

#[test]
fn reset_bumps_the_generation_and_is_refused_while_in_use() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let c = Segment::open(&path, Role::Consumer, &opts(8192)).unwrap();
    let e = Segment::reset(&path, &opts(16384)).err().unwrap();
    assert!(matches!(e, SegmentError::InUse { role: Role::Consumer, .. }), "{e}");
    drop(c);
    assert_eq!(Segment::reset(&path, &opts(16384)).unwrap(), 2);
    let s = Segment::open(&path, Role::Producer, &any_size()).unwrap();
    assert_eq!(s.generation(), 2);
    assert_eq!(s.info().capacity, 16384);
}

#[test]
fn ring_over_a_segment_between_two_threads_with_acks() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let mut c = Segment::consumer(&path, &opts(64 << 10)).unwrap();
    let path2 = path.clone();
    let producer = std::thread::spawn(move || {
        let mut p = Segment::producer(&path2, &opts(64 << 10)).unwrap();
        let epoch = p.consumer_epoch();
        let data = vec![0xabu8; 20_000];
        for _ in 0..500 {
            p.send(&Frame::Data(&data), Duration::from_secs(10)).unwrap();
        }
        p.send(&Frame::Commit { entries: 0, bytes: 0 }, Duration::from_secs(10)).unwrap();
        p.wait_durable(1, epoch, Duration::from_secs(10))
    });
    let mut bytes = 0;
    loop {
        let f = c.recv(Duration::from_secs(10)).unwrap();
        match f.decode().unwrap() {
            Frame::Data(d) => bytes += d.len(),
            Frame::Commit { .. } => break,
            other => panic!("{other:?}"),
        }
        f.release();
    }
    assert_eq!(bytes, 500 * 20_000);
    c.publish_durable(1, &[5; 32]);
    assert_eq!(producer.join().unwrap(), Ok([5; 32]));
}

#[test]
fn closing_a_side_is_peer_gone_for_the_other() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let mut c = Segment::consumer(&path, &opts(4096)).unwrap();
    // No producer ever attached: nobody holds the producer lock.
    assert_eq!(c.wait(Duration::from_secs(2)), Err(RingError::PeerGone { peer: Role::Producer }));
    let mut p = Segment::producer(&path, &opts(4096)).unwrap();
    assert_eq!(c.wait(Duration::from_millis(30)), Err(RingError::Timeout { peer: Role::Producer }));
    let mut r = p.reserve(FrameKind::Data, 10, Duration::from_secs(1)).unwrap();
    r.fill(1);
    r.commit(); // committed, never published
    drop(p);
    let start = Instant::now();
    assert_eq!(c.wait(Duration::from_secs(5)), Err(RingError::PeerGone { peer: Role::Producer }));
    assert!(start.elapsed() < Duration::from_secs(1), "PeerGone took {:?}", start.elapsed());
    assert!(c.peek().unwrap().is_none(), "an unpublished frame became visible");
}

#[test]
fn consumer_sees_how_full_the_ring_is_and_whether_a_producer_is_attached() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let mut c = Segment::consumer(&path, &opts(4096)).unwrap();
    assert!(!c.producer_alive());
    assert_eq!(c.filled(), 0);
    let mut p = Segment::producer(&path, &opts(4096)).unwrap();
    assert!(c.producer_alive());
    p.send(&Frame::Data(&[7u8; 100]), Duration::from_secs(1)).unwrap();
    p.flush();
    // A frame is its 8-byte header and the payload rounded up to 8 bytes.
    assert_eq!(c.filled(), 8 + 104);
    let f = c.recv(Duration::from_secs(1)).unwrap();
    f.release();
    assert_eq!(c.filled(), 0, "a released frame no longer counts");
    drop(p);
    assert!(!c.producer_alive());
}
