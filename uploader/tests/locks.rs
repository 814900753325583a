//! restic-format repository locks: a batch in flight holds one (and only then), other processes'
//! locks make batches and commands wait and then fail with a message naming them, stale ones are
//! ignored and removed by `shmback unlock`, a prune in the same process waits for the batch in
//! flight, and a lock that can no longer be refreshed stops all writing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Reaped, Server, T, cfg, daemon, fresh_repo, good_batch, quick_opts, shm_dir, shmback_pw, stalled_producer, text,
    wait_exit, wait_for_log,
};
use jiff::{SignedDuration, Timestamp};
use rustic_core::{
    BackupOptions, FileType, KeepOptions, OpenStatus, PathList, PruneOptions, Repository, SnapshotGroupCriterion,
    SnapshotOptions,
};
use shmback_proto::RejectCode;
use shmback_uploader::commands::{self, open_plain};
use shmback_uploader::locks::{Fence, LockFile, LockId, LockOptions, RepoLock, this_host};
use shmback_uploader::repository::{self, Purpose};
use shmback_uploader::serve::BatchOutcome;
use shmback_uploader::{RepositoryConfig, serve::snapshot_id_bytes};
use shmback_writer::{Outbox, OutboxOptions, WriteError};

/// Lock timings for in-process tests: waits of a couple of seconds, quick retries.
fn quick_locks(retry: Duration) -> LockOptions {
    LockOptions {
        retry,
        first_pause: Duration::from_millis(100),
        settle: Duration::from_millis(20),
        ..LockOptions::default()
    }
}

/// The test repository at `loc`, its locks waited for at most `retry`.
fn cfg_waiting(loc: &str, retry: Duration) -> RepositoryConfig {
    RepositoryConfig { locks: quick_locks(retry), ..cfg(loc) }
}

fn repo_of(loc: &str) -> Repository<OpenStatus> {
    open_plain(&cfg(loc)).unwrap()
}

/// The lock files in the repository, decrypted.
fn locks_in(loc: &str) -> Vec<(LockId, LockFile)> {
    let repo = repo_of(loc);
    repo.list::<LockId>().unwrap().map(|id| (id, repo.get_file::<LockFile>(&id).unwrap())).collect()
}

/// The names in the repository's locks/ directory.
fn lock_files(loc: &str) -> Vec<String> {
    match std::fs::read_dir(Path::new(loc).join("locks")) {
        Ok(dir) => dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => panic!("reading locks/: {e}"),
    }
}

/// Writes a lock as another process would: `host`, pid 4242, written `age` ago.
fn foreign_lock(loc: &str, exclusive: bool, host: &str, age: SignedDuration) -> LockId {
    let lock = LockFile {
        time: Timestamp::now() - age,
        exclusive,
        hostname: host.into(),
        username: "backup".into(),
        pid: 4242,
        uid: 1001,
        gid: 1001,
    };
    repo_of(loc).save_file(&lock).unwrap()
}

fn remove_lock(loc: &str, id: LockId) {
    repo_of(loc).remove_file(&id).unwrap();
}

fn poll(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < T, "{what} did not happen within {T:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_batch_in_flight_holds_a_restic_lock_and_releases_it_once_stored() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    let (stalled, release, sent) = stalled_producer(&seg);
    stalled.recv_timeout(T).unwrap();

    let held = locks_in(&loc);
    assert_eq!(held.len(), 1, "one lock while the batch is in flight: {held:?}");
    let (id, lock) = &held[0];
    assert!(!lock.exclusive, "a batch takes a non-exclusive lock, as restic's backup does");
    assert_eq!(lock.pid, i64::from(std::process::id()));
    assert_eq!(lock.hostname, this_host());
    assert!(Timestamp::now().duration_since(lock.time) < SignedDuration::from_mins(5), "written now: {}", lock.time);
    assert_eq!(lock_files(&loc), vec![id.to_hex().to_string()], "stored as locks/<id>");
    // The decrypted document carries restic's field names.
    let raw = repo_of(&loc).cat_file(FileType::Lock, id.to_hex().as_str()).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    for key in ["time", "exclusive", "hostname", "username", "pid"] {
        assert!(json.get(key).is_some(), "{key} missing from {json}");
    }
    assert_eq!(json["exclusive"], serde_json::Value::Bool(false));

    release.send(()).unwrap();
    sent.join().unwrap().unwrap();
    assert!(lock_files(&loc).is_empty(), "the lock is removed once the snapshot is stored: {:?}", lock_files(&loc));
    // Idle, the daemon holds none either: the next batch takes a fresh one and lets it go.
    good_batch(&seg, "second").unwrap();
    assert!(lock_files(&loc).is_empty());
    let out = server.stop();
    assert_eq!(out.iter().filter(|o| o.starts_with("Stored")).count(), 2, "{out:#?}");
}

#[test]
fn a_foreign_exclusive_lock_makes_a_batch_wait_then_fail_unacked_and_the_resent_batch_is_stored() {
    let (_r, loc) = fresh_repo();
    let other = foreign_lock(&loc, true, "prune-host", SignedDuration::ZERO);
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let config = cfg_waiting(&loc, Duration::from_secs(1));
    let server = Server::start_config(config, &seg, quick_opts(), |o| Some(format!("{o:?}")));

    let got = good_batch(&seg, "blocked");
    assert!(
        matches!(got, Err(WriteError::Rejected { code: RejectCode::StorageFailed, .. })),
        "the producer is told (no ack) and may resend: {got:?}"
    );
    assert_eq!(lock_files(&loc), vec![other.to_hex().to_string()], "the failed batch left no lock of its own");
    assert!(repo_of(&loc).get_all_snapshots().unwrap().is_empty(), "no snapshot for the refused batch");

    remove_lock(&loc, other);
    good_batch(&seg, "resent").unwrap();
    let out = server.stop();
    let why = &out[0];
    for part in ["repository is already locked exclusively", "PID 4242 on prune-host by backup", "shmback unlock"] {
        assert!(why.contains(part), "the rejection names the other lock ({part}): {why}");
    }
    assert!(out[1].starts_with("Stored"), "{out:#?}");
}

#[test]
fn the_daemon_waits_for_a_foreign_lock_and_stores_the_batch_once_it_is_gone() {
    let (dir, loc) = fresh_repo();
    let other = foreign_lock(&loc, true, "prune-host", SignedDuration::ZERO);
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = dir.path().join("daemon.log");
    let mut d = Reaped(daemon(&loc, &seg, &["--retry-lock", "1m"], &log));
    common::wait_for(&seg);
    let producer = {
        let seg = seg.clone();
        std::thread::spawn(move || good_batch(&seg, "waited"))
    };
    wait_for_log(&log, "repository already locked, waiting up to 1m0s");
    wait_for_log(&log, "PID 4242 on prune-host");
    remove_lock(&loc, other);
    let id = producer.join().unwrap().expect("stored once the other lock is gone");
    let snaps = commands::snapshots(&cfg(&loc)).unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snapshot_id_bytes(&snaps[0]), id);
    common::terminate(&mut d.0);
    assert!(lock_files(&loc).is_empty(), "{:?}", lock_files(&loc));
}

#[test]
fn stale_locks_are_ignored_and_unlock_removes_them_but_not_live_ones() {
    let (_r, loc) = fresh_repo();
    let host = this_host();
    // Older than 30 minutes, from anywhere; and fresh, from this host, by a process that is gone.
    let old = foreign_lock(&loc, true, "elsewhere", SignedDuration::from_mins(31));
    let dead = {
        let lock = LockFile { pid: 1 << 23, ..LockFile::for_this_process(true) };
        repo_of(&loc).save_file(&lock).unwrap()
    };
    let live = foreign_lock(&loc, false, "elsewhere", SignedDuration::ZERO);
    assert_eq!(host, LockFile::for_this_process(true).hostname);

    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let config = cfg_waiting(&loc, Duration::from_secs(1));
    let server = Server::start_config(config, &seg, quick_opts(), |o| Some(format!("{o:?}")));
    good_batch(&seg, "despite stale locks").unwrap();
    server.stop();

    let out = shmback_pw(&loc, &["unlock"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("successfully removed 2 locks"), "{said}");
    assert!(said.contains(&format!("kept (not stale): lock {live}")), "{said}");
    let mut left = lock_files(&loc);
    left.sort();
    assert_eq!(left, vec![live.to_hex().to_string()], "stale {old} and {dead} removed, the live one kept");

    let out = shmback_pw(&loc, &["unlock", "--remove-all"]);
    assert!(out.status.success() && text(&out).contains("successfully removed 1 locks"), "{}", text(&out));
    assert!(lock_files(&loc).is_empty());
}

#[test]
fn forget_prune_waits_for_a_shared_lock_and_fails_cleanly_after_the_bound() {
    let (dir, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    good_batch(&seg, "one").unwrap();
    good_batch(&seg, "two").unwrap();
    server.stop();
    let other = foreign_lock(&loc, false, "backup-host", SignedDuration::ZERO);

    let out = shmback_pw(&loc, &["forget", "--keep-last", "1", "--prune", "--retry-lock", "2s"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for part in ["repository is already locked (waited", "lock ", "PID 4242 on backup-host", "--retry-lock"] {
        assert!(said.contains(part), "{part:?} in: {said}");
    }
    assert_eq!(lock_files(&loc), vec![other.to_hex().to_string()], "no lock of its own left behind");
    assert_eq!(commands::snapshots(&cfg(&loc)).unwrap().len(), 2, "nothing forgotten");

    // Given time, it waits for the other lock to go and then does its work.
    let log = dir.path().join("forget.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["forget", "--keep-last", "1", "--prune", "--retry-lock", "1m"])
        .env("RESTIC_REPOSITORY", &loc)
        .env("RESTIC_PASSWORD", common::PW)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    wait_for_log(&log, "repository already locked, waiting up to 1m0s");
    remove_lock(&loc, other);
    let status = wait_exit(&mut child.0, T, || "forget did not finish".into());
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap());
    assert_eq!(commands::snapshots(&cfg(&loc)).unwrap().len(), 1);
    assert!(lock_files(&loc).is_empty());
    commands::check(&cfg(&loc), true).unwrap();
}

#[test]
fn a_prune_in_this_process_waits_for_the_batch_in_flight() {
    let (_r, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&loc, &seg);
    good_batch(&seg, "first").unwrap();
    let (stalled, release, sent) = stalled_producer(&seg);
    stalled.recv_timeout(T).unwrap();

    let keep = KeepOptions::default().keep_last(1);
    let prune = PruneOptions::default();
    let config = cfg_waiting(&loc, Duration::from_secs(2));
    let forget = || commands::forget(&config, &keep, SnapshotGroupCriterion::default(), Some(&prune), false);
    let e = forget().expect_err("no prune while a batch of this process is in flight");
    assert!(e.to_string().contains("a batch in flight in this process"), "{e:#}");
    assert_eq!(locks_in(&loc).len(), 1, "only the batch's lock");

    // Waiting on another thread: it runs once the batch is stored.
    let pruning = std::thread::scope(|s| {
        let t = s.spawn(forget);
        release.send(()).unwrap();
        sent.join().unwrap().unwrap();
        t.join().unwrap()
    });
    // The 2 s bound may run out before the batch is stored on a slow machine; then again.
    let report = pruning.or_else(|_| forget()).unwrap();
    assert!(report.pruned && report.removed == 1, "{report:?}");
    server.stop();
    assert!(lock_files(&loc).is_empty());
    commands::check(&cfg(&loc), true).unwrap();
}

#[test]
fn a_lock_that_cannot_be_refreshed_in_time_stops_every_write() {
    let (_r, loc) = fresh_repo();
    let fence = Fence::default();
    let repo = repository::open(&cfg(&loc), Purpose::Command, |b| fence.wrap(b)).unwrap();
    let snaps = repo.get_all_snapshots().unwrap();
    assert!(snaps.is_empty());
    let refused = |repo: &Repository<OpenStatus>| {
        let e = repo.delete_snapshots(&[rustic_core::repofile::SnapshotId::from(rustic_core::Id::random())]);
        e.err().map(|e| e.to_string())
    };
    let why = refused(&repo).expect("no write without a lock");
    assert!(why.contains("without a valid repository lock") && why.contains("holds no lock"), "{why}");

    // A lock whose last refresh is older than `refreshable_for` no longer protects anything.
    let opts = LockOptions { refreshable_for: Duration::ZERO, ..quick_locks(Duration::ZERO) };
    let lock = RepoLock::acquire(&repo, true, &opts, &fence, &|| false).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    let why = refused(&repo).expect("no write under a lock that was not refreshed in time");
    assert!(why.contains("could not be refreshed"), "{why}");
    drop(lock);
    assert!(lock_files(&loc).is_empty());
}

#[test]
fn a_held_lock_is_refreshed_replacing_its_file() {
    let (_r, loc) = fresh_repo();
    let fence = Fence::default();
    let repo = repository::open(&cfg(&loc), Purpose::Command, |b| fence.wrap(b)).unwrap();
    let opts = LockOptions { refresh: Duration::from_millis(200), ..quick_locks(Duration::ZERO) };
    let lock = RepoLock::acquire(&repo, false, &opts, &fence, &|| false).unwrap();
    let acquired = Timestamp::now();
    let first = lock.id();
    poll("a refresh", || lock.id() != first);
    poll("the replaced lock's removal", || !lock_files(&loc).contains(&first.to_hex().to_string()));
    // The file held now (read as it may be replaced again meanwhile) was written after the first.
    poll("a refreshed lock file", || {
        repo.get_file::<LockFile>(&lock.id()).is_ok_and(|l| l.time > acquired && !l.exclusive)
    });
    // A valid, refreshed lock lets writes through.
    let snap = rustic_core::SnapshotOptions::default().to_snapshot().unwrap();
    repo.save_snapshots(vec![snap]).unwrap();
    assert_eq!(repo.get_all_snapshots().unwrap().len(), 1);
    drop(lock);
    assert!(lock_files(&loc).is_empty(), "released on drop, refresh thread stopped");
}

#[test]
fn index_files_written_while_a_batch_lock_settles_are_loaded_before_its_archive() {
    // The daemon prepares a batch's index, parent and want-list during restic's pause after
    // writing the lock file, and keeps them only if the index files are still the same once the
    // lock is confirmed. Another backup (a restic backup takes only a shared lock, so nothing
    // stops it) stores a blob during that pause; the batch then sends the same bytes: reloaded,
    // its index knows the blob and the batch adds no data blob of its own.
    let (dir, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let settle = Duration::from_secs(5);
    let config = RepositoryConfig { locks: LockOptions { settle, ..quick_locks(T) }, ..cfg(&loc) };
    let server = Server::start_config(config, &seg, quick_opts(), |o| match o {
        BatchOutcome::Stored { snapshot, .. } => snapshot.summary.as_ref().map(|s| s.data_blobs),
        other => panic!("not stored: {other:?}"),
    });
    let shared = "bytes that the other backup stores first\n".repeat(50);
    let producer = {
        let (seg, shared) = (seg.clone(), shared.clone());
        std::thread::spawn(move || {
            let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
            let mut b = ob.batch();
            b.add_bytes("same-content", shared)?;
            b.commit()?.wait_durable(T)
        })
    };
    poll("the batch's lock file", || !lock_files(&loc).is_empty());
    let written = Instant::now();
    // Well after the batch's preparation (a fresh repository's index loads in milliseconds),
    // well before the end of the pause.
    std::thread::sleep(Duration::from_millis(1000));
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("first"), &shared).unwrap();
    let repo = repo_of(&loc).to_indexed_ids().unwrap();
    let paths = PathList::from_string(other.to_str().unwrap()).unwrap().sanitize().unwrap();
    let snap =
        repo.backup(&BackupOptions::default(), &paths, SnapshotOptions::default().to_snapshot().unwrap()).unwrap();
    assert_eq!(snap.summary.as_ref().unwrap().data_blobs, 1, "the other backup stored the blob");
    assert!(written.elapsed() < settle, "the other backup ended within the pause ({:?})", written.elapsed());

    producer.join().unwrap().expect("the batch is stored");
    let new_blobs = server.stop();
    assert_eq!(new_blobs, vec![0], "the batch deduplicated against the backup made during its lock's pause");
}
