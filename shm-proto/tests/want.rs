//! The want-list exchange on heap memory and on a real segment: who is asked, what an answer
//! must look like to be trusted, a consumer replaced between the answer and the data, a stale
//! answer, a rejection while the producer waits.
#![cfg(not(loom))]

mod common;

use std::sync::Arc;
use std::time::Duration;

use shmback_proto::model::HeapMemory;
use shmback_proto::{Consumer, Producer, RejectCode, RingConfig, RingError, Role, Segment, WantList};

fn fast() -> RingConfig {
    RingConfig { spin: Duration::ZERO, tick: Duration::from_millis(5), ..RingConfig::default() }
}

fn pair(words: usize) -> (Arc<HeapMemory>, Producer<Arc<HeapMemory>>, Consumer<Arc<HeapMemory>>) {
    let mem = Arc::new(HeapMemory::with_reverse(4096, words));
    (mem.clone(), Producer::new(mem.clone(), fast()), Consumer::new(mem, fast()))
}

const SHORT: Duration = Duration::from_millis(50);

fn list(covered: u64, wanted: &[u64]) -> WantList {
    let mut l = WantList::none_of(covered);
    wanted.iter().for_each(|&f| l.want(f));
    l
}

#[test]
fn only_a_consumer_that_answers_is_asked_and_its_answer_arrives_whole() {
    let (_mem, mut p, mut c) = pair(2);
    assert!(!p.consumer_answers_want_lists(), "a consumer that never said so is not asked");
    c.answer_want_lists();
    assert!(p.consumer_answers_want_lists());
    let sent = list(100, &[0, 63, 64, 99]);
    assert_eq!(c.publish_want(1, &sent), sent);
    let got = p.wait_want(1, 0, 100, SHORT).unwrap();
    assert_eq!(got, sent);
    assert_eq!(got.digest(), sent.digest());
}

#[test]
fn a_list_longer_than_the_reverse_area_is_cut_and_the_rest_is_wanted() {
    let (_mem, mut p, mut c) = pair(1);
    c.answer_want_lists();
    let published = c.publish_want(1, &list(100, &[5]));
    assert_eq!(published.covered(), 64);
    let got = p.wait_want(1, 0, 100, SHORT).unwrap();
    assert_eq!(got, published);
    assert!(got.is_wanted(5) && !got.is_wanted(6) && got.is_wanted(64) && got.is_wanted(99));
}

#[test]
fn a_consumer_replaced_after_answering_is_peer_gone_and_a_newer_build_is_asked_again() {
    let (mem, mut p, mut c) = pair(2);
    c.answer_want_lists();
    c.publish_want(1, &list(10, &[]));
    // Another consumer attaches (epoch + 1) before the producer read the answer: the answer was
    // the old consumer's, whose batch is lost with it.
    mem.shared_words().consumer.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    assert_eq!(p.wait_want(1, 0, 10, SHORT), Err(RingError::PeerGone { peer: Role::Consumer }));
    // An older build that attached does not answer want-lists: the codec epoch is stale.
    assert!(!p.consumer_answers_want_lists());
    let mut c2 = Consumer::new(mem.clone(), fast());
    c2.answer_want_lists();
    assert!(p.consumer_answers_want_lists());
}

#[test]
fn an_answer_for_an_older_batch_is_not_used_and_a_rejection_ends_the_wait() {
    let (_mem, mut p, mut c) = pair(2);
    c.answer_want_lists();
    c.publish_want(1, &list(10, &[]));
    // Batch 2's producer sees batch 1's answer: not its own; it waits, then times out.
    assert_eq!(p.wait_want(2, 0, 10, SHORT), Err(RingError::Timeout { peer: Role::Consumer }));
    // A second answer for the same or an older batch changes nothing.
    assert_eq!(c.publish_want(1, &list(10, &[1])), WantList::all());
    // The consumer rejects batch 2 instead (e.g. its manifest is over a limit).
    c.publish_rejected(2, RejectCode::TooLarge);
    assert_eq!(p.wait_want(2, 0, 10, SHORT), Err(RingError::Rejected { seq: 2, code: RejectCode::TooLarge }));
}

#[test]
fn hostile_answers_are_refused() {
    let (mem, mut p, _c) = pair(2);
    let w = mem.shared_words();
    let set = |seq: u64, len: u64| {
        w.batch.want_len.store(len, std::sync::atomic::Ordering::Relaxed);
        w.batch.want_seq.store(seq, std::sync::atomic::Ordering::Release);
    };
    set(1, 11);
    let e = p.wait_want(1, 0, 10, SHORT).unwrap_err();
    assert!(e.to_string().contains("covers 11 files; the batch has 10"), "{e}");
    set(2, 129);
    let e = p.wait_want(2, 0, 1000, SHORT).unwrap_err();
    assert!(e.to_string().contains("the reverse area holds 128"), "{e}");
    set(9, 1);
    let e = p.wait_want(3, 0, 10, SHORT).unwrap_err();
    assert!(e.to_string().contains("answers batch 9, this batch is 3"), "{e}");
}

#[test]
fn a_segment_carries_the_answer_between_its_two_sides() {
    let dir = common::shm_dir();
    let path = dir.path().join("seg");
    let mut c = Segment::consumer(&path, &common::opts(64 << 10)).unwrap();
    let mut p = Segment::producer(&path, &common::opts(64 << 10)).unwrap();
    assert!(!p.consumer_answers_want_lists());
    c.answer_want_lists();
    assert!(p.consumer_answers_want_lists());
    let epoch = p.consumer_epoch();
    // 64 KiB of reverse area: 524,288 files per list.
    let files = 600_000;
    let published = c.publish_want(7, &list(files, &[1, 524_287, 599_999]));
    assert_eq!(published.covered(), 524_288);
    let got = p.wait_want(7, epoch, files, SHORT).unwrap();
    assert_eq!(got, published);
    assert!(got.is_wanted(1) && got.is_wanted(524_287) && !got.is_wanted(2) && got.is_wanted(524_288));
}
