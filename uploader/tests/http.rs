//! Batches over HTTP (`shmback run --listen`): the same guarantees as through a ring — one
//! snapshot per committed body, the durable ack only once the snapshot is stored, no snapshot
//! for a torn, aborted, truncated or hostile body — and the transport's own limits (token,
//! content type, one batch in flight per producer, a stalled body).
//!
//! The client here is a raw HTTP/1.1 writer, so a test can cut, corrupt or stall a body exactly
//! where it wants; the writer crate's own client is tested end to end in `http_send.rs`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use shmback_proto::frame::FrameKind;
use shmback_proto::stream::{CONTENT_TYPE, PUSH_PATH, encode_frame, header_bytes};
use shmback_proto::{Begin, Entry, EntryKind, Frame, Labels};
use shmback_uploader::serve::{HttpOptions, OnBatch, bind, listen};
use shmback_uploader::{BatchOutcome, ServeOptions};

/// A listener on 127.0.0.1 serving `repo`, with the outcomes it reported.
struct Listener {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    outcomes: Arc<Mutex<Vec<(String, bool)>>>,
}

impl Listener {
    fn start(repo: &str, http: HttpOptions, opts: ServeOptions) -> Listener {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(vec![]));
        let seen = outcomes.clone();
        let on: OnBatch = Arc::new(move |from: &str, o: &BatchOutcome| {
            seen.lock().unwrap().push((from.to_string(), matches!(o, BatchOutcome::Stored { .. })))
        });
        let config = cfg(repo);
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || listen(&config, listener, &http, &opts, &stop2, on));
        Listener { addr, stop, thread: Some(thread), outcomes }
    }

    fn stop(mut self) -> Vec<(String, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap().unwrap();
        self.outcomes.lock().unwrap().clone()
    }
}

/// One response: status, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Reads one HTTP/1.1 response (sized body) from `s`.
fn read_answer(s: &mut TcpStream) -> Answer {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .unwrap_or(0);
            if raw.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + len]).into_owned();
                return Answer { status, body };
            }
        }
    }
    panic!("the connection closed before a whole response: {:?}", String::from_utf8_lossy(&raw));
}

/// Starts a chunked POST of a batch; the caller writes chunks with [`chunk`].
/// The answer `s` has received within `wait`, if any.
fn answered_within(s: &mut TcpStream, wait: Duration) -> Option<Answer> {
    s.set_read_timeout(Some(wait)).unwrap();
    let waiting = s.peek(&mut [0u8; 1]);
    s.set_read_timeout(Some(T)).unwrap();
    match waiting {
        Ok(n) if n > 0 => Some(read_answer(s)),
        _ => None,
    }
}

fn open_push(addr: SocketAddr, token: Option<&str>, producer: &str, content_type: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "POST {PUSH_PATH} HTTP/1.1\r\nHost: backup\r\n{auth}Content-Type: {content_type}\r\n\
         Shmback-Producer: {producer}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .unwrap();
    s
}

fn chunk(s: &mut TcpStream, bytes: &[u8]) {
    // The uploader may answer (and close) before the whole body is written: that is allowed.
    let _ = write!(s, "{:x}\r\n", bytes.len()).and_then(|_| s.write_all(bytes)).and_then(|_| s.write_all(b"\r\n"));
}

fn end(s: &mut TcpStream) {
    let _ = s.write_all(b"0\r\n\r\n");
}

/// Pushes `body` in chunks of `size` bytes and returns the answer.
fn push(addr: SocketAddr, token: Option<&str>, producer: &str, body: &[u8], size: usize) -> Answer {
    let mut s = open_push(addr, token, producer, CONTENT_TYPE);
    for c in body.chunks(size.max(1)) {
        chunk(&mut s, c);
    }
    end(&mut s);
    read_answer(&mut s)
}

/// Like [`push`], but sends again while the producer's previous body is still being answered
/// (429), as a real client does.
fn push_when_free(addr: SocketAddr, producer: &str, body: &[u8], size: usize) -> Answer {
    let t = std::time::Instant::now();
    loop {
        let a = push(addr, None, producer, body, size);
        if a.status != 429 || t.elapsed() > T {
            return a;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The frames of one batch: a directory, the files given (path, bytes), committed.
fn batch_body(seq: u64, files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![];
    let labels = Labels { tags: vec!["http".into()], ..Labels::default() };
    encode_frame(&Frame::Begin(Begin { seq, labels }), &mut out).unwrap();
    let dir = Entry { path: b"srv".to_vec(), kind: EntryKind::Dir, size: Some(0), mode: 0o40755, ..file("srv", 0) };
    encode_frame(&Frame::Entry(dir), &mut out).unwrap();
    for (name, bytes) in files {
        encode_frame(&Frame::Entry(file(&format!("srv/{name}"), bytes.len() as u64)), &mut out).unwrap();
    }
    let entries = files.len() as u64 + 1;
    encode_frame(&Frame::EndOfManifest { entries }, &mut out).unwrap();
    let mut total = 0;
    for (_, bytes) in files {
        for part in bytes.chunks(100_000) {
            encode_frame(&Frame::Data(part), &mut out).unwrap();
        }
        total += bytes.len() as u64;
    }
    encode_frame(&Frame::Commit { entries, bytes: total }, &mut out).unwrap();
    out
}

fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![("a.bin", noise(1, 700_000)), ("b.txt", b"hello over http\n".to_vec()), ("empty", vec![])]
}

fn snapshot_count(repo: &str) -> usize {
    let o = shmback_pw(repo, &["snapshots", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap().len()
}

fn restored(dir: &tempfile::TempDir, repo: &str, name: &str) -> std::path::PathBuf {
    let dest = dir.path().join(name);
    let o = shmback_pw(repo, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    dest
}

#[test]
fn a_pushed_batch_is_stored_acked_with_its_snapshot_and_restored_byte_exact() {
    let (dir, repo) = fresh_repo();
    let l = Listener::start(&repo, HttpOptions::default(), quick_opts());
    let body = batch_body(1000, &files());
    // Small chunks: frames cross chunk boundaries everywhere.
    let a = push(l.addr, None, "web-1", &body, 4093);
    assert_eq!(a.status, 200, "{a:?}");
    let id = a.json()["snapshot"].as_str().unwrap().to_string();
    assert_eq!((a.json()["seq"].as_u64(), id.len()), (Some(1000), 64));
    let snaps = shmback_pw(&repo, &["snapshots", "--json"]);
    assert!(String::from_utf8_lossy(&snaps.stdout).contains(&id), "the acked snapshot is in the repository");
    let dest = restored(&dir, &repo, "r");
    for (name, bytes) in files() {
        assert_eq!(std::fs::read(dest.join("srv").join(name)).unwrap(), bytes, "{name}");
    }
    // The same batch again (its answer was lost): the same snapshot, no second one.
    let again = push(l.addr, None, "web-1", &body, 1 << 20);
    assert_eq!((again.status, again.json()["snapshot"].as_str()), (200, Some(id.as_str())));
    assert_eq!(snapshot_count(&repo), 1);
    let outcomes = l.stop();
    assert_eq!(outcomes, vec![("http:web-1".to_string(), true)]);
}

#[test]
fn torn_truncated_aborted_and_hostile_bodies_make_no_snapshot() {
    let (_dir, repo) = fresh_repo();
    let l = Listener::start(&repo, HttpOptions { max_frame: 1 << 20, ..HttpOptions::default() }, quick_opts());
    let body = batch_body(1, &files());

    // Cut mid-body, the connection closed: no answer to read, no snapshot.
    let mut s = open_push(l.addr, None, "p", CONTENT_TYPE);
    chunk(&mut s, &body[..body.len() / 2]);
    drop(s);

    // The body ends (properly chunked) inside a frame: 400, truncated.
    let a = push_when_free(l.addr, "p", &body[..body.len() - 3], 1000);
    assert_eq!((a.status, a.json()["code"].as_str()), (400, Some("malformed")), "{a:?}");
    assert!(a.json()["reason"].as_str().unwrap().contains("ended inside a frame"), "{a:?}");

    // Ends before COMMIT, on a frame boundary: the batch is torn.
    let commit_len = 8 + 16;
    let a = push_when_free(l.addr, "p", &body[..body.len() - commit_len], 1000);
    assert_ne!(a.status, 200, "{a:?}");

    // Aborted by its producer: 409.
    let mut aborted = body[..body.len() - commit_len].to_vec();
    encode_frame(&Frame::Abort { code: 2, reason: "disk read failed".into() }, &mut aborted).unwrap();
    let a = push_when_free(l.addr, "p", &aborted, 1 << 16);
    assert_eq!((a.status, a.json()["code"].as_str()), (409, Some("aborted")), "{a:?}");

    // A hostile path: 400, named.
    let mut hostile = vec![];
    encode_frame(&Frame::Begin(Begin { seq: 5, labels: Labels::default() }), &mut hostile).unwrap();
    hostile.extend_from_slice(&header_bytes(FrameKind::Entry, raw_path_entry(b"../../etc/passwd").len() as u32));
    let raw = raw_path_entry(b"../../etc/passwd");
    hostile.extend_from_slice(&raw);
    hostile.resize(hostile.len().next_multiple_of(8), 0);
    let a = push_when_free(l.addr, "p", &hostile, 1 << 16);
    assert_eq!((a.status, a.json()["seq"].as_u64()), (400, Some(5)), "{a:?}");

    // A frame header claiming more than the limit: 413 before its payload is read.
    let mut huge = vec![];
    encode_frame(&Frame::Begin(Begin { seq: 6, labels: Labels::default() }), &mut huge).unwrap();
    huge.extend_from_slice(&header_bytes(FrameKind::Data, 3 << 20));
    let a = push_when_free(l.addr, "p", &huge, 1 << 16);
    assert_eq!((a.status, a.json()["code"].as_str()), (413, Some("too-large")), "{a:?}");

    // Garbage that is no frame at all, and an empty body.
    let a = push_when_free(l.addr, "p", &[0xff; 64], 64);
    assert_eq!(a.status, 400, "{a:?}");
    let a = push_when_free(l.addr, "p", &[], 64);
    assert_eq!(a.status, 400, "{a:?}");
    assert!(a.json()["reason"].as_str().unwrap().contains("no complete batch"), "{a:?}");

    assert_eq!(snapshot_count(&repo), 0, "no snapshot from any of them");
    // The daemon is still serving: a good batch is stored.
    let a = push_when_free(l.addr, "p", &batch_body(7, &files()), 1 << 16);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(snapshot_count(&repo), 1);
    l.stop();
}

#[test]
fn tokens_content_types_and_producer_names_are_checked_before_anything_is_read() {
    let (_dir, repo) = fresh_repo();
    let http = HttpOptions { token: Some(b"s3cret-token".to_vec()), ..HttpOptions::default() };
    let l = Listener::start(&repo, http, quick_opts());
    let body = batch_body(1, &files());
    for token in [None, Some("wrong"), Some("s3cret-toke")] {
        let a = push(l.addr, token, "p", &body, 1 << 16);
        assert_eq!((a.status, a.body.as_str()), (401, ""), "no detail for a wrong token");
    }
    let mut s = open_push(l.addr, Some("s3cret-token"), "p", "application/octet-stream");
    end(&mut s);
    let a = read_answer(&mut s);
    assert_eq!(a.status, 415, "{a:?}");
    assert!(a.json()["reason"].as_str().unwrap().contains(CONTENT_TYPE));
    let a = push(l.addr, Some("s3cret-token"), "bad name/..", &body, 1 << 16);
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(snapshot_count(&repo), 0);
    let a = push(l.addr, Some("s3cret-token"), "p", &body, 1 << 16);
    assert_eq!(a.status, 200, "{a:?}");
    l.stop();
}

#[test]
fn one_batch_in_flight_per_producer_and_two_producers_at_once() {
    let (dir, repo) = fresh_repo();
    let l = Listener::start(&repo, HttpOptions::default(), quick_opts());
    let body_a = batch_body(1, &[("a.bin", noise(2, 300_000))]);
    let body_b = batch_body(1, &[("b.bin", noise(3, 300_000))]);
    // Producer a starts and holds its body open half-way.
    let mut a = open_push(l.addr, None, "a", CONTENT_TYPE);
    chunk(&mut a, &body_a[..1000]);
    // Another body of a meanwhile: 429, retry later. (Sent until a's first body has reached
    // the uploader; an empty body that got through instead is answered 400 and stores nothing,
    // and if a's first body arrived while that one was in flight, it was the one refused with
    // 429: it is opened again.)
    let t = std::time::Instant::now();
    let busy = loop {
        let probe = push(l.addr, None, "a", &[], 1);
        if probe.status == 429 || t.elapsed() > T {
            break probe;
        }
        assert_eq!(probe.status, 400, "{probe:?}");
        if let Some(refused) = answered_within(&mut a, Duration::from_millis(50)) {
            assert_eq!(refused.status, 429, "{refused:?}");
            a = open_push(l.addr, None, "a", CONTENT_TYPE);
            chunk(&mut a, &body_a[..1000]);
        }
    };
    assert_eq!((busy.status, busy.json()["code"].as_str()), (429, Some("busy")), "{busy:?}");
    // Producer b is not held up by a.
    let b = push(l.addr, None, "b", &body_b, 1 << 16);
    assert_eq!(b.status, 200, "{b:?}");
    chunk(&mut a, &body_a[1000..]);
    end(&mut a);
    assert_eq!(read_answer(&mut a).status, 200);
    let outcomes = l.stop();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(snapshot_count(&repo), 2);
    drop(dir);
}

#[test]
fn a_stalled_body_is_rejected_after_the_idle_limit_and_frees_its_producer() {
    let (_dir, repo) = fresh_repo();
    let opts = ServeOptions { batch_idle: Duration::from_millis(300), ..quick_opts() };
    let l = Listener::start(&repo, HttpOptions::default(), opts);
    let body = batch_body(1, &files());
    // Trickles a few bytes of a frame, then nothing: whole frames count, not bytes.
    let mut s = open_push(l.addr, None, "slow", CONTENT_TYPE);
    chunk(&mut s, &body[..200]);
    for b in &body[200..210] {
        std::thread::sleep(Duration::from_millis(50));
        chunk(&mut s, &[*b]);
    }
    let a = read_answer(&mut s);
    assert_eq!((a.status, a.json()["code"].as_str()), (408, Some("idle")), "{a:?}");
    // The producer can send again.
    let a = push(l.addr, None, "slow", &batch_body(2, &files()), 1 << 16);
    assert_eq!(a.status, 200, "{a:?}");
    l.stop();
}

#[test]
fn the_daemon_serves_http_and_a_segment_together_and_refuses_a_port_in_use() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--listen", &format!("127.0.0.1:{port}")])
        .env("RESTIC_REPOSITORY", &repo)
        .env("RESTIC_PASSWORD", PW)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("is another process using the port"), "{}", text(&o));
    drop(taken);

    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let log = dir.path().join("log");
    let mut d = Reaped(daemon(&repo, &seg, &["--listen", &free.to_string()], &log));
    wait_for_log(&log, "listening for batches over HTTP");
    wait_for(&seg);
    let a = push(free, None, "web", &batch_body(1, &files()), 1 << 16);
    assert_eq!(a.status, 200, "{a:?}");
    good_batch(&seg, "from-the-ring").unwrap();
    assert!(terminate(&mut d.0).success());
    assert_eq!(snapshot_count(&repo), 2);
}
