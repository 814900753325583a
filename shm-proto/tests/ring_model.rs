//! The ring protocol on heap memory: agreement with a `VecDeque` model, wrap-around and padding,
//! cross-thread streaming, waiting (Timeout vs PeerGone), durable acks, hostile ring contents.
//! Runs under miri too (`cargo +nightly miri test -p shmback-proto --test ring_model`).
#![cfg(not(loom))]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use shmback_proto::model::HeapMemory;
use shmback_proto::ring::max_payload;
use shmback_proto::{Consumer, FrameKind, Producer, RejectCode, RingConfig, RingError, Role};

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig { cases: if cfg!(miri) { 2 } else { n }, ..ProptestConfig::default() }
}

fn pair(cap: usize, cfg: RingConfig) -> (Arc<HeapMemory>, Producer<Arc<HeapMemory>>, Consumer<Arc<HeapMemory>>) {
    let mem = Arc::new(HeapMemory::new(cap));
    (mem.clone(), Producer::new(mem.clone(), cfg), Consumer::new(mem, cfg))
}

fn fast() -> RingConfig {
    RingConfig { spin: Duration::ZERO, tick: Duration::from_millis(5), ..RingConfig::default() }
}

#[derive(Debug, Clone)]
enum Op {
    /// Reserve `len` bytes, commit the first `used % (len + 1)` of them.
    Write {
        len: usize,
        used: usize,
    },
    /// Reserve and drop without committing.
    Cancel {
        len: usize,
    },
    Flush,
    /// Read and release up to n frames.
    Read(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0usize..120, any::<usize>()).prop_map(|(len, used)| Op::Write { len, used }),
        1 => (0usize..120).prop_map(|len| Op::Cancel { len }),
        2 => Just(Op::Flush),
        4 => (1usize..6).prop_map(Op::Read),
    ]
}

proptest! {
    #![proptest_config(cases(200))]

    /// Random reserve/commit/flush/release sequences agree with a VecDeque of committed frames:
    /// the consumer sees exactly the published frames, in order, byte for byte; a full ring
    /// always has room again once drained.
    #[test]
    fn agrees_with_vecdeque_model(ops in proptest::collection::vec(op(), 1..120), publish in 8usize..200) {
        let cfg = RingConfig { publish_bytes: Some(publish), ..fast() };
        let (_mem, mut p, mut c) = pair(256, cfg);
        // Committed frames with the stream position where each ends.
        let mut committed: VecDeque<(Vec<u8>, u64)> = VecDeque::new();
        // Frames of `committed` the consumer may see: those ending at or before the published head.
        let visible = |c: &VecDeque<(Vec<u8>, u64)>, p: &Producer<Arc<HeapMemory>>| {
            c.iter().take_while(|(_, end)| *end <= p.published_position()).count()
        };
        let mut counter = 0u8;
        for op in ops {
            match op {
                Op::Write { len, used } => {
                    let used = used % (len + 1);
                    let payload: Vec<u8> = (0..used).map(|i| counter.wrapping_add(i as u8)).collect();
                    counter = counter.wrapping_add(1);
                    match p.try_reserve(FrameKind::Data, len).unwrap() {
                        Some(mut r) => {
                            r[..used].copy_from_slice(&payload);
                            r.commit_len(used);
                            committed.push_back((payload, p.position()));
                        }
                        None => {
                            // Full: after draining everything, the same request must fit.
                            p.flush();
                            while let Some(f) = c.peek().unwrap() {
                                prop_assert_eq!(f.payload(), &committed.pop_front().unwrap().0[..]);
                                f.release();
                            }
                            c.flush();
                            prop_assert!(committed.is_empty());
                            prop_assert!(p.try_reserve(FrameKind::Data, len).unwrap().is_some());
                        }
                    }
                }
                Op::Cancel { len } => {
                    let _ = p.try_reserve(FrameKind::Data, len).unwrap();
                }
                Op::Flush => p.flush(),
                Op::Read(n) => {
                    for _ in 0..n {
                        let published = visible(&committed, &p);
                        match c.peek().unwrap() {
                            Some(f) => {
                                prop_assert!(published > 0, "consumer saw an unpublished frame");
                                prop_assert_eq!(f.kind(), FrameKind::Data as u8);
                                prop_assert_eq!(f.payload(), &committed.pop_front().unwrap().0[..]);
                                f.release();
                            }
                            None => {
                                prop_assert_eq!(published, 0, "consumer missed a published frame");
                                break;
                            }
                        }
                    }
                }
            }
        }
        p.flush();
        while let Some(f) = c.peek().unwrap() {
            prop_assert_eq!(f.payload(), &committed.pop_front().unwrap().0[..]);
            f.release();
        }
        prop_assert!(committed.is_empty());
    }

    /// Whatever a hostile producer writes into the ring and publishes, the consumer returns
    /// frames or errors, never panics or reads out of bounds.
    #[test]
    fn hostile_ring_contents_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        shmback_proto::fuzzing::read_hostile_ring(&data);
    }
}

#[test]
fn frames_larger_than_half_the_ring_are_refused() {
    let (_m, mut p, _c) = pair(1024, fast());
    let max = max_payload(1024);
    assert_eq!(max, 504);
    assert!(p.try_reserve(FrameKind::Data, max).unwrap().is_some());
    assert_eq!(p.try_reserve(FrameKind::Data, max + 1).err(), Some(RingError::FrameTooLarge { len: max + 1, max }));
}

#[test]
fn padding_keeps_every_frame_contiguous() {
    let (_m, mut p, mut c) = pair(256, fast());
    // 3 frames of 72 bytes (8 + 64) leave 40 bytes at the end: the 4th wraps with a padding frame.
    for round in 0..10u8 {
        for i in 0..3u8 {
            let mut r = p.try_reserve(FrameKind::Data, 64).unwrap().expect("room");
            r.fill(round * 3 + i);
            r.commit();
        }
        p.flush();
        for i in 0..3u8 {
            let f = c.peek().unwrap().expect("frame");
            assert_eq!(f.payload(), &[round * 3 + i; 64][..]);
            f.release();
        }
        assert!(c.peek().unwrap().is_none());
    }
}

#[test]
fn stream_across_threads_with_a_small_ring() {
    let (_m, mut p, mut c) = pair(4096, RingConfig { spin: Duration::from_micros(5), ..fast() });
    let n: u32 = if cfg!(miri) { 60 } else { 20_000 };
    let producer = std::thread::spawn(move || {
        for i in 0..n {
            let len = (i as usize * 7919) % 1500;
            let mut r = p.reserve(FrameKind::Data, len, Duration::from_secs(10)).unwrap();
            for (j, b) in r.iter_mut().enumerate() {
                *b = (i as usize + j) as u8;
            }
            r.commit();
        }
        p.flush();
        p
    });
    for i in 0..n {
        let f = c.recv(Duration::from_secs(10)).unwrap();
        let len = (i as usize * 7919) % 1500;
        assert_eq!(f.payload().len(), len, "frame {i}");
        assert!(f.payload().iter().enumerate().all(|(j, b)| *b == (i as usize + j) as u8), "frame {i} corrupted");
        f.release();
    }
    producer.join().unwrap();
}

#[test]
fn timeout_while_alive_peer_gone_when_dead() {
    let (mem, mut p, mut c) = pair(1024, fast());
    assert_eq!(c.wait(Duration::from_millis(20)), Err(RingError::Timeout { peer: Role::Producer }));
    // A producer that copied a frame but died before publishing leaves nothing visible.
    let mut r = p.try_reserve(FrameKind::Data, 16).unwrap().unwrap();
    r.fill(7);
    r.commit();
    assert_eq!(p.unpublished(), 24);
    mem.kill(Role::Producer);
    assert_eq!(c.wait(Duration::from_secs(5)), Err(RingError::PeerGone { peer: Role::Producer }));
    assert!(c.peek().unwrap().is_none());
}

#[test]
fn published_frames_are_still_delivered_after_the_producer_dies() {
    let (mem, mut p, mut c) = pair(1024, fast());
    let mut r = p.try_reserve(FrameKind::Data, 3).unwrap().unwrap();
    r.copy_from_slice(b"abc");
    r.commit();
    p.flush();
    mem.kill(Role::Producer);
    drop(p);
    let f = c.recv(Duration::from_secs(1)).unwrap();
    assert_eq!(f.payload(), b"abc");
    f.release();
    assert_eq!(c.wait(Duration::from_secs(5)), Err(RingError::PeerGone { peer: Role::Producer }));
}

#[test]
fn producer_blocked_on_a_full_ring_sees_consumer_death() {
    let (mem, mut p, _c) = pair(1024, fast());
    while p.try_reserve(FrameKind::Data, 200).unwrap().map(|r| r.commit()).is_some() {}
    assert_eq!(
        p.reserve(FrameKind::Data, 200, Duration::from_millis(20)).err(),
        Some(RingError::Timeout { peer: Role::Consumer })
    );
    mem.kill(Role::Consumer);
    assert_eq!(
        p.reserve(FrameKind::Data, 200, Duration::from_secs(5)).err(),
        Some(RingError::PeerGone { peer: Role::Consumer })
    );
}

#[test]
fn durable_ack_rejection_and_consumer_replacement() {
    let (mem, mut p, mut c) = pair(1024, fast());
    let epoch = p.consumer_epoch();
    let id: [u8; 32] = std::array::from_fn(|i| i as u8 * 3);
    let waiter = std::thread::spawn(move || {
        let got = p.wait_durable(1, epoch, Duration::from_secs(10));
        (p, got)
    });
    std::thread::sleep(Duration::from_millis(20));
    c.publish_durable(1, &id);
    let (mut p, got) = waiter.join().unwrap();
    assert_eq!(got, Ok(id));

    c.publish_rejected(2, RejectCode::StorageFailed);
    assert_eq!(
        p.wait_durable(2, epoch, Duration::from_secs(1)),
        Err(RingError::Rejected { seq: 2, code: RejectCode::StorageFailed })
    );

    // A new consumer attached (epoch bumped) while batch 3 was in flight: the batch is lost.
    mem.shared_words().consumer.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    assert_eq!(p.wait_durable(3, epoch, Duration::from_secs(1)), Err(RingError::PeerGone { peer: Role::Consumer }));
    assert_eq!(
        p.wait_durable(3, p.consumer_epoch(), Duration::from_millis(10)),
        Err(RingError::Timeout { peer: Role::Consumer })
    );
}

#[test]
fn a_restarted_side_continues_from_the_published_positions() {
    let (mem, mut p, mut c) = pair(1024, fast());
    for i in 0..5u8 {
        let mut r = p.try_reserve(FrameKind::Data, 100).unwrap().unwrap();
        r.fill(i);
        r.commit();
    }
    p.flush();
    let f = c.peek().unwrap().unwrap();
    f.release();
    c.flush();
    drop((p, c));
    // New processes attach: the producer appends after what was published, the consumer resumes
    // at the first unreleased frame.
    let mut p2 = Producer::new(mem.clone(), fast());
    let mut c2 = Consumer::new(mem, fast());
    let mut r = p2.try_reserve(FrameKind::Data, 100).unwrap().unwrap();
    r.fill(9);
    r.commit();
    p2.flush();
    for want in [1u8, 2, 3, 4, 9] {
        let f = c2.peek().unwrap().unwrap();
        assert_eq!(f.payload(), &[want; 100][..]);
        f.release();
    }
}

#[test]
fn a_hostile_tail_is_an_error_for_the_producer_not_a_panic() {
    // Ahead of head, far ahead, more than a ring behind head, unaligned.
    for bogus in [|h: u64| h + 8, |h: u64| h.wrapping_add(u64::MAX / 2), |h: u64| h.wrapping_sub(1000), |h: u64| h - 3]
    {
        let (mem, mut p, _c) = pair(256, fast());
        while p.try_reserve(FrameKind::Data, 32).unwrap().map(|r| r.commit()).is_some() {}
        let tail = bogus(p.position());
        mem.shared_words().tail.store(tail, std::sync::atomic::Ordering::Release);
        assert!(matches!(p.try_reserve(FrameKind::Data, 32), Err(RingError::Corrupt { .. })), "tail {tail}");
        assert!(matches!(p.reserve(FrameKind::Data, 32, Duration::from_millis(50)), Err(RingError::Corrupt { .. })));
    }
}

#[test]
fn a_hostile_unaligned_head_never_makes_the_consumer_read_outside_the_ring() {
    // The producer publishes an unaligned head: the consumer discards what was published, which
    // leaves its own tail unaligned. A later head 8 bytes further (an aligned distance) must not
    // make it read a frame header across the ring's end.
    let cap = 256u64;
    let (mem, _p, mut c) = pair(cap as usize, fast());
    let head = cap - 4;
    mem.shared_words().head.store(head, std::sync::atomic::Ordering::Release);
    assert!(matches!(c.peek(), Err(RingError::Corrupt { .. })));
    // Every later publication is refused again (each refusal discards it).
    for more in 1..=3 {
        mem.shared_words().head.store(head + 8 * more, std::sync::atomic::Ordering::Release);
        assert!(matches!(c.peek(), Err(RingError::Corrupt { .. })), "an unaligned tail must stay an error");
    }
}
