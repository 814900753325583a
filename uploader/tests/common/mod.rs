//! What the uploader's integration tests share: a fresh repository, a serving thread that waits
//! for its segment, batch builders (through the writer, and raw frames for hostile producers),
//! a producer that stalls on cue, and the `shmback` command line.
//!
//! Each test file includes this with `mod common;` and uses a part of it.
#![allow(dead_code)]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shmback_proto::frame::FrameKind;
use shmback_proto::{Begin, Entry, EntryKind, Frame, Labels, Producer, RejectCode, RingError, Segment, SegmentOptions};
use shmback_uploader::{BatchOutcome, RepositoryConfig, ServeOptions, open_repo, serve};
use shmback_writer::{Batch, Outbox, OutboxOptions, WriteError};

/// The password of every test repository.
pub const PW: &str = "pw";
/// How long any one wait in a test may take before it fails.
pub const T: Duration = Duration::from_secs(60);

/// The configuration of the test repository at `location`.
pub fn cfg(location: &str) -> RepositoryConfig {
    RepositoryConfig::new(location, PW).unwrap()
}

/// A new repository at `repo/` in a temporary directory: the directory (kept alive, with room
/// beside the repository for restore destinations) and the repository's location.
pub fn fresh_repo() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().join("repo").to_str().unwrap().to_string();
    open_repo(&cfg(&loc), true).unwrap();
    (dir, loc)
}

/// A directory in /dev/shm for segments.
pub fn shm_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap()
}

/// Waits (bounded) until `path` exists.
pub fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(path.exists(), "{} was not created", path.display());
}

/// Serve options for tests: a short tick, so shutdown and liveness checks are quick.
pub fn quick_opts() -> ServeOptions {
    ServeOptions { tick: Duration::from_millis(20), ..ServeOptions::default() }
}

/// `serve` on a thread, keeping what `keep` makes of each outcome.
pub struct Server<O: Send + 'static> {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<O>>,
}

impl Server<String> {
    /// Serves `seg` with [`quick_opts`], keeping each outcome's `Debug` text.
    pub fn start(repo: &str, seg: &Path) -> Self {
        Server::start_with(repo, seg, quick_opts(), |o| Some(format!("{o:?}")))
    }
}

impl<O: Send + 'static> Server<O> {
    /// Serves `seg` (the uploader creates it; this returns once it exists) with `opts`.
    pub fn start_with(
        repo: &str,
        seg: &Path,
        opts: ServeOptions,
        keep: impl FnMut(&BatchOutcome) -> Option<O> + Send + 'static,
    ) -> Self {
        Server::start_config(cfg(repo), seg, opts, keep)
    }

    /// Serves `seg` like [`Server::start_with`], with the repository configuration `config`.
    pub fn start_config(
        config: RepositoryConfig,
        seg: &Path,
        opts: ServeOptions,
        mut keep: impl FnMut(&BatchOutcome) -> Option<O> + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, seg2) = (stop.clone(), seg.to_path_buf());
        let handle = std::thread::spawn(move || {
            let mut r = open_repo(&config, false).unwrap();
            let mut out = vec![];
            serve(&mut r, &seg2, &opts, &stop2, |o| out.extend(keep(o))).unwrap();
            out
        });
        let t = Instant::now();
        while !seg.exists() && !handle.is_finished() && t.elapsed() < T {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(seg.exists(), "the uploader did not create the segment");
        Server { stop, handle }
    }

    /// Stops serving (after the grace period for a batch in flight) and returns what was kept.
    pub fn stop(self) -> Vec<O> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// Sends one small batch through the writer and waits for its durable ack.
pub fn good_batch(seg: &Path, name: &str) -> Result<[u8; 32], WriteError> {
    let mut ob = Outbox::open(seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
    let mut b = ob.batch();
    b.add_bytes(name, format!("contents of {name}"))?;
    b.commit()?.wait_durable(T).map(|id| id.0)
}

/// A file entry of `size` bytes.
pub fn file(path: &str, size: u64) -> Entry {
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

/// An ENTRY frame's payload.
pub fn entry_bytes(e: Entry) -> Vec<u8> {
    Frame::Entry(e).encode_to_vec().unwrap()
}

/// An END_OF_MANIFEST frame for `n` entries.
pub fn eom(n: u64) -> (FrameKind, Vec<u8>) {
    (FrameKind::EndOfManifest, Frame::EndOfManifest { entries: n }.encode_to_vec().unwrap())
}

/// An ENTRY payload whose path is replaced by raw bytes (the codec refuses to encode these).
pub fn raw_path_entry(path: &[u8]) -> Vec<u8> {
    let mut raw = entry_bytes(file("x", 0));
    raw.truncate(raw.len() - 1);
    raw[32..34].copy_from_slice(&(path.len() as u16).to_le_bytes());
    raw.extend_from_slice(path);
    raw
}

/// A producer attached to `seg` without the writer, for frames the writer never sends.
pub fn raw_producer(seg: &Path) -> Producer<Segment> {
    let opts = SegmentOptions { capacity: None, ..SegmentOptions::default() };
    let mut p = Segment::producer(seg, &opts).unwrap();
    // As the writer does: the uploader must be attached before a batch's epoch is taken.
    p.wait_for_consumer(T).unwrap();
    p
}

/// Writes BEGIN, then `frames` raw into the ring (bypassing the codec's checks), and returns
/// the producer, the batch's sequence and the consumer epoch to wait for its outcome with.
pub fn begin_raw(seg: &Path, frames: &[(FrameKind, Vec<u8>)]) -> (Producer<Segment>, u64, u64) {
    let mut p = raw_producer(seg);
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
    (p, seq, epoch)
}

/// Sends `frames` raw as one batch and asserts it is rejected as malformed.
pub fn send_raw(seg: &Path, frames: &[(FrameKind, Vec<u8>)]) {
    let (mut p, seq, epoch) = begin_raw(seg, frames);
    let got = p.wait_durable(seq, epoch, T);
    assert!(
        matches!(got, Err(RingError::Rejected { code: RejectCode::Malformed, .. })),
        "hostile batch {seq} was not rejected as malformed: {got:?}"
    );
}

/// A reader over `data` that stops once at `stall_at`: it says so on `reached`, then waits
/// until `resume` receives (or is dropped).
pub struct Stalling {
    data: Vec<u8>,
    sent: usize,
    stall_at: usize,
    reached: Option<Sender<()>>,
    resume: Receiver<()>,
}

impl Stalling {
    /// The reader, the "it stalled" signal and the handle that resumes it.
    pub fn new(data: Vec<u8>, stall_at: usize) -> (Stalling, Receiver<()>, Sender<()>) {
        let (reached_tx, reached_rx) = channel();
        let (resume_tx, resume_rx) = channel();
        (Stalling { data, sent: 0, stall_at, reached: Some(reached_tx), resume: resume_rx }, reached_rx, resume_tx)
    }
}

impl Read for Stalling {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.sent >= self.stall_at
            && let Some(reached) = self.reached.take()
        {
            let _ = reached.send(());
            let _ = self.resume.recv();
        }
        let end = if self.reached.is_some() { self.stall_at } else { self.data.len() };
        let n = buf.len().min(end - self.sent);
        buf[..n].copy_from_slice(&self.data[self.sent..self.sent + n]);
        self.sent += n;
        Ok(n)
    }
}

/// What a producer thread's batch came to.
pub type Sent = JoinHandle<Result<[u8; 32], WriteError>>;

/// Starts a producer thread on `seg` sending one 2 MiB file that stalls after 512 KiB. Returns
/// the "it stalled" signal, the release handle and the producer's result.
pub fn stalled_producer(seg: &Path) -> (Receiver<()>, Sender<()>, Sent) {
    let (reader, stalled, release) = Stalling::new(vec![0x5a; 2 << 20], 512 << 10);
    let seg = seg.to_path_buf();
    let h = std::thread::spawn(move || {
        let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
        let mut b = ob.batch();
        b.add_reader("slow.bin", Some(2 << 20), Default::default(), reader)?;
        b.commit()?.wait_durable(T).map(|id| id.0)
    });
    (stalled, release, h)
}

/// Fills one batch.
pub type Fill = Box<dyn FnOnce(&mut Batch<'_>)>;

/// Sends each batch (filled by its closure) through a real segment to an uploader serving
/// `repo`, each waited for until durable; returns the snapshot ids (hex), in order.
pub fn send_batches(repo: &str, batches: Vec<Fill>) -> Vec<String> {
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(repo, &seg);
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    let mut ids = vec![];
    for fill in batches {
        let mut b = ob.batch();
        fill(&mut b);
        let id = b.commit().unwrap().wait_durable(T).unwrap();
        ids.push(id.0.iter().map(|x| format!("{x:02x}")).collect());
    }
    drop(ob);
    server.stop();
    ids
}

/// Incompressible bytes from `seed` (xorshift).
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// `shmback ARGS` on the test repository at `repo` with its password [`PW`].
pub fn shmback_pw(repo: &str, args: &[&str]) -> Output {
    shmback(Path::new(repo), args, &[("RESTIC_PASSWORD", PW)])
}

/// `shmback ARGS` on repository `repo` with only the password variables in `env` (the ambient
/// ones are removed); waits for it.
pub fn shmback(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmback"));
    c.args(args).env("RESTIC_REPOSITORY", repo).stdin(Stdio::null());
    for v in ["RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND"] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Everything a command printed.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// `shmback run --segment SEG ARGS` on repository `repo` (password [`PW`]), its log to `log`.
pub fn daemon(repo: &str, seg: &Path, args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--segment", seg.to_str().unwrap()])
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PW)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

/// Waits (bounded) until the log at `log` contains `what`.
pub fn wait_for_log(log: &Path, what: &str) {
    let t = Instant::now();
    while !std::fs::read_to_string(log).unwrap_or_default().contains(what) {
        assert!(t.elapsed() < T, "the log never said {what:?}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends SIGTERM to `child` and waits (bounded) for it to exit; returns its status.
pub fn terminate(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_exit(child, T, || "the uploader did not exit after SIGTERM".into())
}

/// Waits at most `limit` for `child` to exit; past that it is killed and the test fails with
/// `why()`.
pub fn wait_exit(child: &mut Child, limit: Duration, why: impl FnOnce() -> String) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            child.kill().unwrap();
            panic!("{}", why());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped, so a failing test leaves no daemon behind.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `shmback-send`, built beside `shmback` by the workspace's test build.
pub fn send_bin() -> std::path::PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_shmback")).with_file_name("shmback-send");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo test --workspace` (or cargo build -p shmback-writer)",
        p.display()
    );
    p
}

/// The access key of the tests' in-process S3 server (`shmback_tests::s3_server`).
pub const S3_AK: &str = "shmbacktestaccesskey";
/// Its secret key.
pub const S3_SK: &str = "shmbacktestsecretkey0123456789abcdefghij";

/// `shmback ARGS` on `repo` with the test password [`PW`] and the S3 key [`S3_AK`] with `secret`;
/// no profile files, no instance metadata, no password or bandwidth variables from outside.
pub fn shmback_s3(repo: &str, args: &[&str], secret: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmback"));
    c.args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PW)
        .env("AWS_ACCESS_KEY_ID", S3_AK)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("RESTIC_PASSWORD_FILE")
        .env_remove("RESTIC_PASSWORD_COMMAND")
        .env_remove("SHMBACK_LIMIT_UPLOAD")
        .env_remove("SHMBACK_LIMIT_DOWNLOAD")
        .stdin(Stdio::null());
    c
}
