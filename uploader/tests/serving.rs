//! Serving several segments at once (a stalled producer holds up no other) and shutting down
//! with a batch in flight (abandoned after the grace period: no snapshot, a clean repository).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use shmback_proto::RejectCode;
use shmback_uploader::commands::{check, snapshots};
use shmback_uploader::{ServeOptions, open_repo, serve_all};
use shmback_writer::{Outbox, OutboxOptions, WriteError};

const PW: &str = "pw";

fn cfg(location: &str) -> shmback_uploader::RepositoryConfig {
    shmback_uploader::RepositoryConfig::new(location, PW).unwrap()
}
const T: Duration = Duration::from_secs(60);

/// A reader of `len` bytes that yields the first `first` bytes, tells `started`, then blocks until
/// `go` receives (or is dropped).
struct Stalling {
    left: u64,
    first: u64,
    started: Option<Sender<()>>,
    go: Receiver<()>,
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        if self.first == 0
            && let Some(s) = self.started.take()
        {
            let _ = s.send(());
            let _ = self.go.recv();
        }
        let cap = if self.first > 0 { self.first } else { self.left };
        let n = buf.len().min(cap as usize);
        buf[..n].fill(0x5a);
        self.left -= n as u64;
        self.first = self.first.saturating_sub(n as u64);
        Ok(n)
    }
}

/// Starts a producer thread on `seg` sending one 2 MiB file that stalls after 512 KiB. Returns
/// the "it stalled" signal, the release handle and the producer's result.
type Sent = std::thread::JoinHandle<Result<[u8; 32], WriteError>>;

fn stalled_producer(seg: &Path) -> (Receiver<()>, Sender<()>, Sent) {
    let (started_tx, started_rx) = channel();
    let (go_tx, go_rx) = channel();
    let seg = seg.to_path_buf();
    let h = std::thread::spawn(move || {
        let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
        let mut b = ob.batch();
        let r = Stalling { left: 2 << 20, first: 512 << 10, started: Some(started_tx), go: go_rx };
        b.add_reader("slow.bin", Some(2 << 20), Default::default(), r)?;
        b.commit()?.wait_durable(T).map(|id| id.0)
    });
    (started_rx, go_tx, h)
}

fn quick_batch(seg: &Path, name: &str) -> Result<[u8; 32], WriteError> {
    let mut ob = Outbox::open(seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
    let mut b = ob.batch();
    b.add_bytes(name, format!("contents of {name}"))?;
    b.commit()?.wait_durable(T).map(|id| id.0)
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "{} was not created", path.display());
}

/// A new repository in a temporary directory: the directory (kept alive) and its location.
fn fresh_repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap().to_string();
    open_repo(&cfg(&loc), true).unwrap();
    (dir, loc)
}

#[test]
fn several_segments_are_served_at_once_and_a_stalled_producer_holds_up_no_other() {
    let (_repo, loc) = fresh_repo();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (a, b) = (shm.path().join("a"), shm.path().join("b"));
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (loc, paths, stop) = (loc.clone(), vec![a.clone(), b.clone()], stop.clone());
        std::thread::spawn(move || {
            let out = std::sync::Mutex::new(vec![]);
            let opts = ServeOptions { tick: Duration::from_millis(20), ..ServeOptions::default() };
            serve_all(&cfg(&loc), &paths, &opts, &stop, |seg, o| {
                out.lock().unwrap().push((seg.file_name().unwrap().to_string_lossy().into_owned(), format!("{o:?}")))
            })
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
        quick_batch(&b, &format!("fast{i}")).expect("a batch on segment b while a is stalled");
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
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let a = shm.path().join("a");
    let stop = Arc::new(AtomicBool::new(false));
    let opts = ServeOptions::default();
    let e = serve_all(&cfg(&loc), &[a.clone(), a.clone()], &opts, &stop, |_, _| {}).unwrap_err();
    assert!(e.to_string().contains("named twice"), "{e:#}");
    let e = serve_all(&cfg(&loc), &[shm.path().join("no/such/dir/seg")], &opts, &stop, |_, _| {}).unwrap_err();
    assert!(format!("{e:#}").contains("no/such/dir/seg"), "the error names the segment: {e:#}");
}

#[test]
fn sigterm_abandons_a_stalled_batch_after_the_grace_period_and_stores_nothing() {
    let (_repo, loc) = fresh_repo();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--grace", "1", "--segment", seg.to_str().unwrap()])
        .env("RESTIC_REPOSITORY", &loc)
        .env("RESTIC_PASSWORD", PW)
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    wait_for(&seg);
    let (stalled, release, slow) = stalled_producer(&seg);
    stalled.recv_timeout(T).expect("the producer started");
    // Wait (bounded) until the uploader is inside the batch: it logs the start once the manifest is in.
    let t = Instant::now();
    while !std::fs::read_to_string(log.path()).unwrap().contains("batch started") {
        assert!(t.elapsed() < T, "the uploader never started the batch");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > T {
            child.kill().unwrap();
            panic!("the uploader did not exit after SIGTERM with a stalled batch in flight");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
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
