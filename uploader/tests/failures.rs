//! The engine under failure: a producer that dies mid-batch, hostile frames written straight into
//! the segment, and the uploader SIGKILLed mid-batch. Each time: no snapshot for the bad batch,
//! the producer told (rejected / uploader gone), the repository checks clean with its data, and
//! the next batch is stored.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use shmback_proto::frame::FrameKind;
use shmback_proto::{Begin, Entry, EntryKind, Frame, Labels, RejectCode, Segment, SegmentOptions};
use shmback_uploader::commands::{check, snapshots};
use shmback_uploader::{ServeOptions, open_repo, serve};
use shmback_writer::{EntryMeta, Outbox, OutboxOptions, WriteError};

const PW: &str = "pw";

fn cfg(location: &str) -> shmback_uploader::RepositoryConfig {
    shmback_uploader::RepositoryConfig::new(location, PW).unwrap()
}
const T: Duration = Duration::from_secs(60);

fn file(path: &str, size: u64) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File,
        size: Some(size),
        mode: 0o100644,
        uid: 0,
        gid: 0,
        mtime_ns: 1_700_000_000_000_000_000,
        target: vec![],
    }
}

struct Server {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<String>>,
}

fn start(repo: &str, seg: &Path) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, seg2, repo) = (stop.clone(), seg.to_path_buf(), repo.to_string());
    let handle = std::thread::spawn(move || {
        let mut r = open_repo(&cfg(&repo), false).unwrap();
        let mut out = vec![];
        let opts = ServeOptions { tick: Duration::from_millis(20), ..ServeOptions::default() };
        serve(&mut r, &seg2, &opts, &s2, |o| out.push(format!("{o:?}"))).unwrap();
        out
    });
    // The uploader creates the segment; wait for it (bounded).
    for _ in 0..500 {
        if seg.exists() || handle.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(seg.exists(), "the uploader did not create the segment");
    Server { stop, handle }
}

impl Server {
    fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn good_batch(seg: &Path, name: &str) -> Result<[u8; 32], WriteError> {
    let mut ob = Outbox::open(seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
    let mut b = ob.batch();
    b.add_bytes(name, format!("contents of {name}"))?;
    b.commit()?.wait_durable(T).map(|id| id.0)
}

fn setup() -> (tempfile::TempDir, String, tempfile::TempDir) {
    let repo = tempfile::tempdir().unwrap();
    let loc = repo.path().to_str().unwrap().to_string();
    open_repo(&cfg(&loc), true).unwrap();
    (repo, loc, tempfile::tempdir_in("/dev/shm").unwrap())
}

#[test]
fn a_producer_dying_mid_batch_makes_no_snapshot_and_the_next_batch_is_stored() {
    let (_r, loc, shm) = setup();
    let seg = shm.path().join("seg");
    let server = start(&loc, &seg);
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

/// Writes `frames` raw into the ring (bypassing the codec's checks) as one batch.
fn send_raw(seg: &Path, frames: &[(FrameKind, Vec<u8>)]) {
    let opts = SegmentOptions { capacity: None, ..SegmentOptions::default() };
    let mut p = Segment::producer(seg, &opts).unwrap();
    // As the writer does: the uploader must be attached before the batch's epoch is taken.
    p.wait_for_consumer(T).unwrap();
    let epoch = p.consumer_epoch();
    let seq = p.next_batch_seq();
    p.send(&Frame::Begin(Begin { seq, labels: Labels::default() }), T).unwrap();
    p.record_begun(seq);
    for (kind, payload) in frames {
        let mut r = p.reserve(*kind, payload.len(), T).unwrap();
        r.copy_from_slice(payload);
        r.commit();
    }
    p.flush();
    let got = p.wait_durable(seq, epoch, T);
    assert!(
        matches!(got, Err(shmback_proto::RingError::Rejected { code: RejectCode::Malformed, .. })),
        "hostile batch {seq} was not rejected as malformed: {got:?}"
    );
}

fn entry_bytes(e: Entry) -> Vec<u8> {
    Frame::Entry(e).encode_to_vec().unwrap()
}

/// An ENTRY payload whose path is replaced by raw bytes (the codec refuses to encode these).
fn raw_path_entry(path: &[u8]) -> Vec<u8> {
    let mut raw = entry_bytes(file("x", 0));
    raw.truncate(raw.len() - 1);
    raw[32..34].copy_from_slice(&(path.len() as u16).to_le_bytes());
    raw.extend_from_slice(path);
    raw
}

#[test]
fn hostile_batches_are_rejected_and_the_daemon_keeps_serving() {
    let (_r, loc, shm) = setup();
    let seg = shm.path().join("seg");
    let server = start(&loc, &seg);
    let eom = |n: u64| (FrameKind::EndOfManifest, Frame::EndOfManifest { entries: n }.encode_to_vec().unwrap());
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
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_shmback"))
            .args(["run", "--segment", seg.to_str().unwrap()])
            .env("RESTIC_REPOSITORY", &loc)
            .env("RESTIC_PASSWORD", PW)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut child = run();
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    // The first batch streams big.bin and stalls after 8 MiB (twice the ring: the uploader is
    // inside the file) until the uploader has been SIGKILLed: mid-batch by construction, not by
    // timing.
    let (reached_tx, reached_rx) = std::sync::mpsc::channel();
    let (resume_tx, resume_rx) = std::sync::mpsc::channel();
    let killer = {
        let pid = child.id() as i32;
        std::thread::spawn(move || {
            reached_rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(200));
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
            resume_tx.send(()).unwrap();
        })
    };
    let stalling = Stalling { data: &big, sent: 0, stall_at: 8 << 20, reached: Some(reached_tx), resume: resume_rx };
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

/// Reads `data`, stopping once at `stall_at`: says so on `reached`, then waits for `resume`.
struct Stalling<'a> {
    data: &'a [u8],
    sent: usize,
    stall_at: usize,
    reached: Option<std::sync::mpsc::Sender<()>>,
    resume: std::sync::mpsc::Receiver<()>,
}

impl std::io::Read for Stalling<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent >= self.stall_at
            && let Some(reached) = self.reached.take()
        {
            reached.send(()).unwrap();
            self.resume.recv().unwrap();
        }
        let end = if self.reached.is_some() { self.stall_at } else { self.data.len() };
        let n = buf.len().min(end - self.sent);
        buf[..n].copy_from_slice(&self.data[self.sent..self.sent + n]);
        self.sent += n;
        Ok(n)
    }
}
