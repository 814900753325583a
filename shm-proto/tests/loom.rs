//! Loom models of the ring protocol: the same `Producer`/`Consumer` code as production, over
//! `HeapMemory` (loom atomics; ring bytes tracked per 8-byte slot, so reading bytes the producer
//! may still write is a reported causality violation; futex sleeps without timeout, so a lost
//! wake-up is a reported deadlock).
//!
//! Run: `CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" cargo test -p shmback-proto --release --test loom`
#![cfg(loom)]

use std::sync::Arc;
use std::time::Duration;

use shmback_proto::model::HeapMemory;
use shmback_proto::{Consumer, Frame, FrameKind, Producer, RejectCode, RingConfig, RingError, Role};

const LONG: Duration = Duration::from_secs(3600);

fn cfg(publish: usize) -> RingConfig {
    RingConfig { publish_bytes: Some(publish), ..RingConfig::default() }
}

type Mem = Arc<HeapMemory>;

/// A 64-byte ring and both halves over it, publishing after `publish` bytes.
fn ring(publish: usize) -> (Mem, Producer<Mem>, Consumer<Mem>) {
    let mem = Arc::new(HeapMemory::new(64));
    (mem.clone(), Producer::new(mem.clone(), cfg(publish)), Consumer::new(mem, cfg(publish)))
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

fn write(p: &mut Producer<Arc<HeapMemory>>, len: usize, fill: u8) {
    let mut r = p.reserve(FrameKind::Data, len, LONG).unwrap();
    r.fill(fill);
    r.commit();
}

fn read(c: &mut Consumer<Arc<HeapMemory>>) -> Vec<u8> {
    let f = c.recv(LONG).unwrap();
    let v = f.payload().to_vec();
    f.release();
    v
}

/// Reserve/commit/release with wrap-around and padding on a 64-byte ring: three 24-byte frames
/// (16-byte payloads) do not fit at once, so the producer blocks until the consumer releases, and
/// the third frame wraps behind a padding frame. Publish on every commit.
#[test]
fn wrap_around_padding_and_blocking() {
    model(|| {
        let (_, mut p, mut c) = ring(8);
        let t = loom::thread::spawn(move || {
            for i in 1..=3u8 {
                write(&mut p, 16, i);
            }
            p.flush();
        });
        for i in 1..=3u8 {
            assert_eq!(read(&mut c), vec![i; 16]);
        }
        t.join().unwrap();
    });
}

/// The same stream with batched publication (only at flush or when the producer must wait):
/// nothing is lost or seen early, and neither side sleeps forever.
#[test]
fn batched_publication_has_no_lost_wakeups() {
    model(|| {
        let (_, mut p, mut c) = ring(1 << 20);
        let t = loom::thread::spawn(move || {
            write(&mut p, 16, 1);
            write(&mut p, 24, 2);
            p.flush();
        });
        assert_eq!(read(&mut c), vec![1; 16]);
        assert_eq!(read(&mut c), vec![2; 24]);
        t.join().unwrap();
    });
}

/// The durable-ack path: the producer sends a COMMIT and sleeps on the ack; the consumer reads it
/// and publishes the snapshot id. The producer gets exactly that id.
#[test]
fn durable_ack_wakes_the_producer_with_the_id() {
    model(|| {
        let (_, mut p, mut c) = ring(1 << 20);
        let t = loom::thread::spawn(move || {
            let epoch = p.consumer_epoch();
            p.send(&Frame::Commit { entries: 0, bytes: 0 }, LONG).unwrap();
            p.wait_durable(1, epoch, LONG)
        });
        let f = c.recv(LONG).unwrap();
        assert_eq!(f.kind(), FrameKind::Commit as u8);
        f.release();
        c.publish_durable(1, &[7; 32]);
        assert_eq!(t.join().unwrap(), Ok([7; 32]));
    });
}

/// A rejection reaches a sleeping producer as `Rejected`, never as a durable ack.
#[test]
fn rejection_wakes_the_producer() {
    model(|| {
        let (_, mut p, mut c) = ring(1 << 20);
        let t = loom::thread::spawn(move || {
            let epoch = p.consumer_epoch();
            p.wait_durable(1, epoch, LONG)
        });
        c.publish_rejected(1, RejectCode::Malformed);
        assert_eq!(t.join().unwrap(), Err(RingError::Rejected { seq: 1, code: RejectCode::Malformed }));
    });
}

/// A producer that dies mid-copy (payload written, frame never committed, so never published):
/// the consumer never sees the frame (a torn read would be reported by the slot tracker) and gets
/// `PeerGone`. (A *committed* frame may be published early when the consumer sleeps; it is whole.)
#[test]
fn producer_dying_between_copy_and_publish_leaves_nothing_visible() {
    model(|| {
        let (mem, mut p, mut c) = ring(1 << 20);
        let t = loom::thread::spawn(move || {
            let mut r = p.reserve(FrameKind::Data, 16, LONG).unwrap();
            r.fill(9);
            drop(r);
            mem.kill(Role::Producer);
        });
        assert_eq!(c.wait(LONG), Err(RingError::PeerGone { peer: Role::Producer }));
        assert!(c.peek().unwrap().is_none());
        t.join().unwrap();
    });
}

/// A producer that published one frame and died while copying the next: the consumer gets the
/// first frame whole, then `PeerGone`.
#[test]
fn producer_dying_after_a_publish_delivers_only_whole_frames() {
    model(|| {
        let (mem, mut p, mut c) = ring(1 << 20);
        let t = loom::thread::spawn(move || {
            write(&mut p, 8, 1);
            p.flush();
            let mut r = p.reserve(FrameKind::Data, 8, LONG).unwrap();
            r.fill(2);
            drop(r);
            mem.kill(Role::Producer);
        });
        assert_eq!(read(&mut c), vec![1; 8]);
        assert_eq!(c.wait(LONG), Err(RingError::PeerGone { peer: Role::Producer }));
        t.join().unwrap();
    });
}

/// A consumer that dies while the producer waits for room: the producer gets `PeerGone`.
#[test]
fn consumer_dying_unblocks_a_waiting_producer() {
    model(|| {
        let mem = Arc::new(HeapMemory::new(64));
        let mut p = Producer::new(mem.clone(), cfg(8));
        let t = loom::thread::spawn(move || mem.kill(Role::Consumer));
        write(&mut p, 24, 1);
        write(&mut p, 24, 2);
        // The ring is full; room comes only from a release the dead consumer never makes.
        assert_eq!(p.reserve(FrameKind::Data, 24, LONG).err(), Some(RingError::PeerGone { peer: Role::Consumer }));
        t.join().unwrap();
    });
}

/// The SIGBUS guard's table (`fault`): a fault handler on another thread either finds the mapping
/// registered and finishes its remap before `unregister` returns, or does not find it. The
/// mapping is modelled as a cell: the remap and the later unmap both write it, so a remap that
/// could still run after `unregister` is a reported causality violation.
#[test]
fn fault_table_unregister_waits_out_a_handler() {
    use shmback_proto::fault::FaultTable;
    model(|| {
        let table = Arc::new(FaultTable::<2>::new());
        let pages = Arc::new(loom::cell::UnsafeCell::new(0u8));
        let slot = table.register(0x1000, 0x2000).unwrap();
        let (t, p) = (table.clone(), pages.clone());
        let handler = loom::thread::spawn(move || {
            t.on_fault(0x2fff, |start, len| {
                assert_eq!((start, len), (0x1000, 0x2000));
                // SAFETY: loom tracks the access; a race with the unmap below is reported.
                p.with_mut(|b| unsafe { *b = 1 });
                true
            })
        });
        table.unregister(slot);
        // munmap
        // SAFETY: as above.
        pages.with_mut(|b| unsafe { *b = 2 });
        handler.join().unwrap();
    });
}

/// The truncated flag: the owner that sees it set also sees the zero pages the handler mapped
/// (Release/Acquire), and concurrent registrations get distinct slots with their own ranges.
#[test]
fn fault_table_flag_publishes_the_remap_and_slots_do_not_mix() {
    use shmback_proto::fault::FaultTable;
    model(|| {
        let table = Arc::new(FaultTable::<2>::new());
        let pages = Arc::new(loom::cell::UnsafeCell::new(0u8));
        let mine = table.register(0x1000, 0x1000).unwrap();
        let t = table.clone();
        let other = loom::thread::spawn(move || {
            let slot = t.register(0x8000, 0x1000).unwrap();
            t.unregister(slot);
            slot
        });
        let (t, p) = (table.clone(), pages.clone());
        let handler = loom::thread::spawn(move || {
            t.on_fault(0x1004, |start, len| {
                assert_eq!((start, len), (0x1000, 0x1000), "the other registration's range was used");
                // SAFETY: loom tracks the access.
                p.with_mut(|b| unsafe { *b = 7 });
                true
            })
        });
        if table.truncated(mine) {
            // SAFETY: loom tracks the access; without Release/Acquire on the flag it races.
            pages.with(|b| assert_eq!(unsafe { *b }, 7));
        }
        assert_ne!(other.join().unwrap(), mine);
        assert!(handler.join().unwrap(), "a fault in a registered mapping is handled");
        assert!(table.truncated(mine));
        table.unregister(mine);
    });
}

fn want_list(covered: u64, wanted: &[u64]) -> shmback_proto::WantList {
    let mut l = shmback_proto::WantList::none_of(covered);
    wanted.iter().for_each(|&f| l.want(f));
    l
}

/// The want-list exchange: the producer publishes its manifest's end and sleeps on the answer;
/// the consumer reads it and publishes a list over both reverse words. The producer sees the
/// whole list (the Relaxed word stores are ordered by `want_seq`'s Release / Acquire), never a
/// part of it, and no wake-up is lost.
#[test]
fn want_list_reaches_the_waiting_producer_whole() {
    model(|| {
        let (_, mut p, mut c) = ring(1 << 20);
        c.answer_want_lists();
        let sent = want_list(100, &[3, 70]);
        let expect = sent.clone();
        let t = loom::thread::spawn(move || {
            assert!(p.consumer_answers_want_lists());
            let epoch = p.consumer_epoch();
            p.send(&Frame::EndOfManifest { entries: 100 }, LONG).unwrap();
            p.wait_want(1, epoch, 100, LONG)
        });
        let f = c.recv(LONG).unwrap();
        assert_eq!(f.kind(), FrameKind::EndOfManifest as u8);
        f.release();
        assert_eq!(c.publish_want(1, &sent), sent);
        assert_eq!(t.join().unwrap(), Ok(expect));
    });
}

/// The reverse area is reused batch after batch: a producer waiting for batch 2 while the
/// consumer overwrites batch 1's words gets batch 2's list, never batch 1's words under batch 2's
/// sequence.
#[test]
fn a_reused_reverse_area_never_mixes_two_answers() {
    model(|| {
        let (_, mut p, mut c) = ring(1 << 20);
        c.answer_want_lists();
        c.publish_want(1, &want_list(128, &[0, 127]));
        let second = want_list(128, &[64]);
        let expect = second.clone();
        let t = loom::thread::spawn(move || p.wait_want(2, 0, 128, LONG));
        c.publish_want(2, &second);
        assert_eq!(t.join().unwrap(), Ok(expect));
    });
}

/// A consumer replaced while the producer waits for its answer (the old one never answered): the
/// producer gets `PeerGone` whichever way the attach and its sleep interleave, never a hang.
#[test]
fn a_consumer_replaced_during_the_want_wait_is_noticed() {
    model(|| {
        let (mem, mut p, mut c) = ring(1 << 20);
        c.answer_want_lists();
        let t = loom::thread::spawn(move || p.wait_want(1, 0, 10, LONG));
        // The successor attaches: epoch + 1, and the attach wakes the producer.
        mem.shared_words().consumer.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let wake = &mem.shared_words().producer.wake;
        if wake.fetch_add(2, std::sync::atomic::Ordering::AcqRel) & 1 != 0 {
            shmback_proto::Memory::wake(&*mem, wake);
        }
        let got = t.join().unwrap();
        assert_eq!(got, Err(RingError::PeerGone { peer: Role::Consumer }));
    });
}
