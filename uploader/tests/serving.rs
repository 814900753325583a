//! Serving several segments at once (a stalled producer holds up no other) and shutting down
//! with a batch in flight (abandoned after the grace period: no snapshot, a clean repository).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{T, cfg, daemon, fresh_repo, good_batch, shm_dir, stalled_producer, terminate, wait_for, wait_for_log};
use shmback_proto::RejectCode;
use shmback_uploader::commands::{check, snapshots};
use shmback_uploader::{ServeOptions, serve_all};
use shmback_writer::WriteError;

#[test]
fn several_segments_are_served_at_once_and_a_stalled_producer_holds_up_no_other() {
    let (_repo, loc) = fresh_repo();
    let shm = shm_dir();
    let (a, b) = (shm.path().join("a"), shm.path().join("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (loc, paths, stop) = (loc.clone(), vec![a.clone(), b.clone()], stop.clone());
        std::thread::spawn(move || {
            let out = std::sync::Mutex::new(vec![]);
            let opts = ServeOptions { tick: Duration::from_millis(20), ..ServeOptions::default() };
            serve_all(
                &cfg(&loc),
                &paths,
                &opts,
                &stop,
                || {},
                |seg, o| {
                    out.lock()
                        .unwrap()
                        .push((seg.file_name().unwrap().to_string_lossy().into_owned(), format!("{o:?}")))
                },
            )
            .unwrap();
            out.into_inner().unwrap()
        })
    };
    wait_for(&a);
    wait_for(&b);
    let (stalled, release, slow) = stalled_producer(&a);
    stalled.recv_timeout(T).expect("the slow producer started");
    // While segment a's batch is stuck mid-file, segment b's producer gets three batches stored.
    for i in 0..3 {
        good_batch(&b, &format!("fast{i}")).expect("a batch on segment b while a is stalled");
    }
    assert!(!slow.is_finished(), "the slow batch cannot have finished: its reader is blocked");
    release.send(()).unwrap();
    slow.join().unwrap().expect("the slow batch is stored once its producer resumes");
    stop.store(true, Ordering::Relaxed);
    let out = server.join().unwrap();
    assert_eq!(out.iter().filter(|(s, o)| s == "b" && o.starts_with("Stored")).count(), 3, "{out:#?}");
    assert_eq!(out.iter().filter(|(s, o)| s == "a" && o.starts_with("Stored")).count(), 1, "{out:#?}");
    // The fast batches were stored before the slow one finished.
    assert_eq!(out.last().unwrap().0, "a", "{out:#?}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 4);
    check(&cfg(&loc), true).unwrap();
}

#[test]
fn a_segment_named_twice_or_unusable_fails_at_start_up() {
    let (_repo, loc) = fresh_repo();
    let shm = shm_dir();
    let a = shm.path().join("a");
    let stop = Arc::new(AtomicBool::new(false));
    let opts = ServeOptions::default();
    let e = serve_all(&cfg(&loc), &[a.clone(), a.clone()], &opts, &stop, || {}, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("named twice"), "{e:#}");
    let e = serve_all(&cfg(&loc), &[shm.path().join("no/such/dir/seg")], &opts, &stop, || {}, |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("no/such/dir/seg"), "the error names the segment: {e:#}");
}

#[test]
fn sigterm_abandons_a_stalled_batch_after_the_grace_period_and_stores_nothing() {
    let (_repo, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = daemon(&loc, &seg, &["--grace", "1"], log.path());
    wait_for(&seg);
    let (stalled, release, slow) = stalled_producer(&seg);
    stalled.recv_timeout(T).expect("the producer started");
    // Wait (bounded) until the uploader is inside the batch: it logs the start once the manifest is in.
    wait_for_log(log.path(), "batch started");
    let status = terminate(&mut child);
    assert!(status.success(), "{status:?}");
    release.send(()).unwrap();
    let got = slow.join().unwrap();
    assert!(
        matches!(got, Err(WriteError::UploaderGone) | Err(WriteError::Rejected { code: RejectCode::ShuttingDown, .. })),
        "{got:?}"
    );
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(log.contains("grace period"), "the log says why the batch was abandoned:\n{log}");
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 0, "no snapshot of the abandoned batch");
    check(&cfg(&loc), true).unwrap();
}
