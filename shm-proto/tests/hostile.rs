//! A hostile or broken producer and a shared host, written against the layout in PROTOCOL.md
//! (raw `ftruncate`/`pwrite` on the segment file, not only the writer API): truncation under a
//! live mapping (the SIGBUS guard), repair of a damaged segment on the consumer's next attach,
//! owner and mode on attach, header validation before mapping, monotonic acknowledgements.
#![cfg(not(loom))]

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{ftruncate, opts, shm_dir};
use shmback_proto::layout::HEADER_SIZE;
use shmback_proto::model::HeapMemory;
use shmback_proto::{
    Consumer, Frame, FrameKind, Producer, RejectCode, RingConfig, RingError, Role, Segment, SegmentError,
    SegmentOptions,
};

const T: Duration = Duration::from_secs(10);
/// Offset of `head` in the header (PROTOCOL.md, "Header").
const HEAD_OFFSET: u64 = 128;

fn pwrite(path: &Path, off: u64, bytes: &[u8]) {
    OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, off).unwrap();
}

fn damaged(r: Result<impl std::fmt::Debug, RingError>, path: &Path) {
    match r {
        Err(e @ RingError::SegmentDamaged { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("truncated or replaced by its producer"), "{msg}");
            assert!(msg.contains("re-created on the next attach"), "{msg}");
        }
        other => panic!("expected SegmentDamaged, got {other:?}"),
    }
}

/// Sends one frame and waits for it on the other side: the segment works.
fn round_trip(path: &Path, cap: usize) {
    let mut p = when_released(|| Segment::producer(path, &opts(cap))).unwrap();
    let mut c = when_released(|| Segment::consumer(path, &opts(cap))).unwrap();
    p.send(&Frame::Data(b"after repair"), T).unwrap();
    p.flush();
    let f = c.recv(T).unwrap();
    assert_eq!(f.decode().unwrap(), Frame::Data(b"after repair"));
    f.release();
}

#[test]
fn truncation_mid_read_is_an_error_on_both_sides_not_a_sigbus() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let mut c = Segment::consumer(&path, &opts(64 << 10)).unwrap();
    let mut p = Segment::producer(&path, &opts(64 << 10)).unwrap();
    p.send(&Frame::Data(&[7u8; 1000]), T).unwrap();
    p.flush();
    let f = c.recv(T).unwrap();
    ftruncate(&path, 0);
    // The payload now lies past the end of the file: the read faults, the guard maps zero pages
    // over the segment and the read completes (without it this process dies of SIGBUS).
    assert_eq!(f.payload(), &[0u8; 1000][..]);
    f.release();
    assert!(c.memory().truncated());
    damaged(c.peek().map(|f| f.is_some()), &path);
    damaged(c.wait(T), &path);
    damaged(c.recv(T).map(|_| ()), &path);
    damaged(c.check_intact(), &path);
    // The producer's own mapping faults at its next access (here: writing a reservation), and
    // every operation after it reports the damage.
    let mut r = p.reserve(FrameKind::Data, 10, T).unwrap();
    r.fill(1);
    r.commit();
    assert!(p.memory().truncated());
    damaged(p.reserve(FrameKind::Data, 10, T).map(|_| ()), &path);
    damaged(p.check_intact(), &path);
    damaged(p.send(&Frame::Data(b"x"), T), &path);
    let epoch = p.consumer_epoch();
    damaged(p.wait_durable(1, epoch, T), &path);
    drop(p);
    drop(c);
    // Restart: the consumer re-initialises the segment (generation + 1) and it works again.
    let c = Segment::open(&path, Role::Consumer, &opts(64 << 10)).unwrap();
    // The header was lost with the truncation, and its generation with it: numbering restarts.
    assert_eq!(c.generation(), 1);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), HEADER_SIZE + (64 << 10) + (64 << 10));
    drop(c);
    round_trip(&path, 64 << 10);
}

#[test]
fn truncation_to_zero_mid_wait_ends_the_wait_with_an_error() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let mut c = Segment::consumer(&path, &opts(64 << 10)).unwrap();
    let _p = Segment::producer(&path, &opts(64 << 10)).unwrap();
    let waiter = std::thread::spawn(move || c.recv(T).map(|f| f.kind()));
    std::thread::sleep(Duration::from_millis(100));
    ftruncate(&path, 0);
    damaged(waiter.join().expect("the consumer thread survives"), &path);
}

#[test]
fn truncation_to_half_mid_wait_then_a_frame_past_the_end_is_an_error() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let cap = 64 << 10;
    let o = SegmentOptions { reverse_capacity: 0, ..opts(cap) };
    let mut c = Segment::consumer(&path, &o).unwrap();
    let mut p = Segment::producer(&path, &o).unwrap();
    // Move both positions past the middle of the ring.
    for _ in 0..2 {
        p.send(&Frame::Data(&[1u8; 20_000]), T).unwrap();
        p.flush();
        c.recv(T).unwrap().release();
    }
    c.flush();
    let tail = 2 * (8 + 20_000);
    assert!(HEADER_SIZE + tail > (HEADER_SIZE + cap as u64) / 2 + 4096);
    let waiter = std::thread::spawn(move || c.recv(T).map(|f| f.kind()));
    std::thread::sleep(Duration::from_millis(100));
    // Half the file: the header stays, the frame the producer now "publishes" lies past the end.
    ftruncate(&path, (HEADER_SIZE + cap as u64) / 2);
    pwrite(&path, HEAD_OFFSET, &(tail + 16).to_le_bytes());
    damaged(waiter.join().expect("the consumer thread survives"), &path);
    drop(p);
}

/// Attaches with `attach`, waiting (bounded) while a role lock still looks held by a side that
/// is gone. A child process spawned at that moment (by anything in this process) holds copies of
/// every open file description until its exec closes them, and with them the role locks: attach
/// rightly refuses until then (the serve loop retries the same way). The one test that spawns a
/// child lives in its own binary (`sigbus_chain.rs`) so that it cannot race these.
fn when_released<S>(attach: impl Fn() -> Result<S, SegmentError>) -> Result<S, SegmentError> {
    let start = std::time::Instant::now();
    loop {
        match attach() {
            Err(SegmentError::DamagedInUse { .. } | SegmentError::RoleTaken { .. }) if start.elapsed() < T => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other,
        }
    }
}

/// Each way a producer can leave its segment, then a consumer restart.
#[test]
fn a_restarted_consumer_reinitialises_a_damaged_segment() {
    let cap = 16 << 10;
    let full = HEADER_SIZE + cap as u64 + (64 << 10);
    // With the header gone the old generation is unknown: the new one starts at 1 again.
    type Damage<'a> = &'a dyn Fn(&Path);
    let damages: [(&str, Damage, u64); 7] = [
        ("truncated to zero", &|p| ftruncate(p, 0), 1),
        ("truncated to half", &|p| ftruncate(p, full / 2), 2),
        ("truncated inside the header", &|p| ftruncate(p, 100), 2),
        (
            "zeroed (truncated and re-grown)",
            &|p| {
                ftruncate(p, 0);
                ftruncate(p, full);
            },
            1,
        ),
        ("extended", &|p| ftruncate(p, full + 4096), 2),
        ("state not READY", &|p| pwrite(p, 16, &1u32.to_le_bytes()), 2),
        ("ring capacity garbage", &|p| pwrite(p, 24, &12345u64.to_le_bytes()), 2),
    ];
    for (what, damage, generation) in damages {
        let d = shm_dir();
        let path = d.path().join("seg");
        round_trip(&path, cap);
        damage(&path);
        let c = when_released(|| Segment::open(&path, Role::Consumer, &opts(cap)))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(c.generation(), generation, "{what}");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), full, "{what}");
        drop(c);
        round_trip(&path, cap);
    }
    // A consumer that does not choose a ring size keeps the one the damaged header still names.
    let d = shm_dir();
    let path = d.path().join("seg");
    round_trip(&path, cap);
    ftruncate(&path, full / 2);
    let c = when_released(|| Segment::open(&path, Role::Consumer, &SegmentOptions { capacity: None, ..opts(cap) }))
        .unwrap();
    assert_eq!((c.generation(), c.info().capacity), (2, cap));
}

#[test]
fn a_damaged_segment_held_by_a_live_producer_is_refused_with_the_fix() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let _p = Segment::open(&path, Role::Producer, &opts(8192)).unwrap();
    ftruncate(&path, 5000);
    let e = Segment::open(&path, Role::Consumer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::DamagedInUse { pid, .. } if pid == std::process::id()), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("the file is 5000 bytes") && msg.contains("restart or stop that producer"), "{msg}");
    // Nothing was re-initialised under the live producer.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 5000);
}

#[test]
fn a_producer_attaching_to_a_damaged_segment_is_told_the_fix() {
    let d = shm_dir();
    let path = d.path().join("seg");
    drop(Segment::open(&path, Role::Consumer, &opts(8192)).unwrap());
    ftruncate(&path, 6000);
    let e = Segment::open(&path, Role::Producer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::Truncated { found: 6000, .. }), "{e}");
    assert!(e.to_string().contains("start the uploader, which re-initialises it"), "{e}");
    // And once a consumer attached, the producer attaches too.
    drop(Segment::open(&path, Role::Consumer, &opts(8192)).unwrap());
    Segment::open(&path, Role::Producer, &opts(8192)).unwrap();
}

#[test]
fn a_segment_other_users_can_access_is_refused() {
    let d = shm_dir();
    for role in [Role::Consumer, Role::Producer] {
        let path = d.path().join(format!("seg-{role}"));
        drop(Segment::open(&path, Role::Producer, &opts(8192)).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = Segment::open(&path, role, &opts(8192)).err().expect("refused");
        assert!(matches!(e, SegmentError::InsecureMode { mode: 0o666, .. }), "{role}: {e}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("remove {}", path.display())) && msg.contains("mode 0600"), "{msg}");
    }
    // A file pre-created by someone else is not "damaged", and never repaired: refused first.
    let path = d.path().join("precreated");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o646)).unwrap();
    let e = Segment::open(&path, Role::Consumer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::InsecureMode { mode: 0o646, .. }), "{e}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

/// Needs root (CI runs as root) to hand a file to another uid.
#[test]
fn a_segment_owned_by_another_user_is_refused_unless_group_shared_with_us() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test gives a file to another uid, which needs root: run it as root (CI does)");
    let nobody = 65534;
    let d = shm_dir();
    let chown = |p: &Path, uid: u32, gid: u32| std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();

    let path = d.path().join("private");
    drop(Segment::open(&path, Role::Producer, &opts(8192)).unwrap());
    chown(&path, nobody, nobody);
    let e = Segment::open(&path, Role::Consumer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::ForeignOwner { uid: 65534, euid: 0, mode: 0o600, .. }), "{e}");
    assert!(e.to_string().contains("--group-shared"), "{e}");
    assert!(matches!(Segment::reset(&path, &opts(8192)), Err(SegmentError::ForeignOwner { .. })));

    // Group-shared on purpose (flag and mode) with a group of ours: accepted.
    let path = d.path().join("shared");
    let shared = SegmentOptions { group_shared: true, ..opts(8192) };
    drop(Segment::open(&path, Role::Producer, &shared).unwrap());
    chown(&path, nobody, 0);
    Segment::open(&path, Role::Consumer, &opts(8192)).expect("group-shared with our group");
    // The same file in a group that is not ours: refused.
    chown(&path, nobody, nobody);
    let e = Segment::open(&path, Role::Consumer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::ForeignOwner { gid: 65534, .. }), "{e}");

    // Mode 0660 and our group, but the header does not say group-shared: refused.
    let path = d.path().join("mode-only");
    drop(Segment::open(&path, Role::Producer, &opts(8192)).unwrap());
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660)).unwrap();
    chown(&path, nobody, 0);
    let e = Segment::open(&path, Role::Consumer, &opts(8192)).err().expect("refused");
    assert!(matches!(e, SegmentError::ForeignOwner { .. }), "{e}");
}

/// xorshift bytes: a header that is not ours, the same on every run.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_sparse_2gib_file_is_refused_from_its_header_without_being_mapped() {
    let d = shm_dir();
    let path = d.path().join("seg");
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    f.set_permissions(std::fs::Permissions::from_mode(0o600)).unwrap();
    f.write_all_at(&noise(4096), 0).unwrap();
    f.set_len(2 << 30).unwrap();
    let blocks_before = f.metadata().unwrap().blocks();
    let e = Segment::open(&path, Role::Consumer, &SegmentOptions { capacity: None, ..opts(4096) }).err().unwrap();
    assert!(matches!(e, SegmentError::BadMagic { .. }), "{e}");
    assert!(e.to_string().contains("is not a shmback segment"), "{e}");
    // Nothing was populated: still one page of data (st_blocks counts 512-byte units).
    let blocks = f.metadata().unwrap().blocks();
    assert_eq!(blocks, blocks_before, "the file grew from {blocks_before} to {blocks} blocks");
    assert!(blocks <= 64, "{blocks} blocks allocated");
}

#[test]
fn a_small_random_file_is_not_a_segment() {
    let d = shm_dir();
    let path = d.path().join("seg");
    std::fs::write(&path, noise(8192)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    for role in [Role::Consumer, Role::Producer] {
        let e = Segment::open(&path, role, &opts(4096)).err().unwrap();
        assert!(matches!(e, SegmentError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("is not a shmback segment"), "{e}");
    }
    // Never "repaired": it is someone's file.
    assert_eq!(std::fs::read(&path).unwrap(), noise(8192));
}

#[test]
fn acknowledged_sequences_never_go_backwards() {
    let mem = Arc::new(HeapMemory::new(4096));
    let mut c = Consumer::new(mem.clone(), RingConfig::default());
    let mut p = Producer::new(mem.clone(), RingConfig::default());
    let epoch = p.consumer_epoch();
    c.publish_durable(5, &[5; 32]);
    c.publish_durable(3, &[3; 32]);
    c.publish_durable(5, &[9; 32]);
    assert_eq!(c.last_durable_seq(), 5);
    assert_eq!(p.wait_durable(5, epoch, T), Ok([5; 32]), "the id of batch 5 is kept");
    c.publish_rejected(7, RejectCode::Malformed);
    c.publish_rejected(6, RejectCode::StorageFailed);
    let rev = &mem.shared_words().reverse;
    assert_eq!(rev.rejected_seq.load(std::sync::atomic::Ordering::Acquire), 7);
    assert_eq!(
        p.wait_durable(7, epoch, T),
        Err(RingError::Rejected { seq: 7, code: RejectCode::Malformed }),
        "the code of batch 7 is kept"
    );
}
