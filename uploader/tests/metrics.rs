//! `shmback run --metrics-addr`: the Prometheus series a backup through a segment leaves (during
//! it and after), `/readyz` before the repository is open and once it is, and an endpoint that
//! outlives malformed requests.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::{
    Reaped, T, daemon, fresh_repo, good_batch, raw_path_entry, send_raw, shm_dir, stalled_producer, terminate,
};
use shmback_proto::frame::FrameKind;

/// The address the daemon's log says it serves the endpoints on (it was given port 0).
fn metrics_addr(log: &Path) -> SocketAddr {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("serving /metrics")) {
            let at = line.find("local=").expect("the line names the address") + "local=".len();
            let addr = line[at..].split_whitespace().next().unwrap();
            return addr.parse().unwrap_or_else(|e| panic!("{addr:?} in {line:?}: {e}"));
        }
        assert!(t.elapsed() < T, "the daemon never served its metrics:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `request` as it is and returns the status and body of the answer (status 0: the
/// connection closed without one).
fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, T).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(request).unwrap();
    let mut answer = Vec::new();
    // A server closing on a request it refuses may reset the connection: what came is the answer.
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    raw(addr, format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes())
}

/// The samples of a text exposition: (name, labels) → value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

fn parse(text: &str) -> Samples {
    let mut samples = Samples::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|e| panic!("value of {line:?}: {e}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = inner
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once("=\"").unwrap_or_else(|| panic!("label {kv:?} in {line:?}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        samples.insert((name, labels), value);
    }
    samples
}

fn scrape(addr: SocketAddr) -> Samples {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    parse(&body)
}

/// The value of `name` with exactly `labels`, if the series exists.
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    samples.get(&(name.to_string(), labels)).copied()
}

/// Scrapes until `name{labels}` is `want` (bounded); returns that scrape.
fn wait_for_value(addr: SocketAddr, name: &str, labels: &[(&str, &str)], want: f64) -> Samples {
    let t = Instant::now();
    loop {
        let samples = scrape(addr);
        if value(&samples, name, labels) == Some(want) {
            return samples;
        }
        assert!(t.elapsed() < T, "{name}{labels:?} never became {want}; last scrape: {samples:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_ready(addr: SocketAddr) {
    let t = Instant::now();
    loop {
        let (status, body) = get(addr, "/readyz");
        if status == 200 {
            assert_eq!(body, "ready\n");
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(t.elapsed() < T, "never ready: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn a_backup_through_a_segment_shows_in_the_metrics_during_and_after() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let segment = seg.to_str().unwrap();
    let log = work.path().join("log");
    let mut child = Reaped(daemon(&loc, &seg, &["--metrics-addr", "127.0.0.1:0"], &log));
    let addr = metrics_addr(&log);
    wait_ready(addr);
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    // Idle: an empty repository, no producer (the ring is sampled about once a second).
    let idle = wait_for_value(addr, "shmback_producer_alive", &[("segment", segment)], 0.0);
    assert_eq!(value(&idle, "shmback_snapshots", &[]), Some(0.0));
    let started = value(&idle, "shmback_start_timestamp_seconds", &[]).unwrap();
    assert!(started > 0.0 && started <= unix_now(), "start {started}");
    assert_eq!(value(&idle, "shmback_ring_fill_ratio", &[("segment", segment)]), Some(0.0));

    // During: a producer stalls mid-batch (one 2 MiB file, 512 KiB sent).
    let before = unix_now();
    let (stalled, release, sent) = stalled_producer(&seg);
    stalled.recv_timeout(T).expect("the producer reached its stall");
    let during = wait_for_value(addr, "shmback_producer_alive", &[("segment", segment)], 1.0);
    let stored = [("result", "stored"), ("source", segment)];
    assert_eq!(value(&during, "shmback_batches_total", &stored), Some(0.0), "nothing stored yet");
    let fill = value(&during, "shmback_ring_fill_ratio", &[("segment", segment)]).unwrap();
    assert!((0.0..=1.0).contains(&fill), "fill ratio {fill}");

    // After: one batch stored, with its file and bytes.
    release.send(()).unwrap();
    sent.join().unwrap().expect("the stalled batch is stored once released");
    let after = wait_for_value(addr, "shmback_batches_total", &stored, 1.0);
    let v = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels);
    assert_eq!(v("shmback_files_total", &[("state", "new")]), Some(1.0));
    assert_eq!(v("shmback_files_total", &[("state", "changed")]), Some(0.0));
    assert_eq!(v("shmback_files_total", &[("state", "unmodified")]), Some(0.0));
    assert_eq!(v("shmback_processed_bytes_total", &[]), Some((2u64 << 20) as f64));
    let added = v("shmback_added_bytes_total", &[]).unwrap();
    let stored_bytes = v("shmback_stored_bytes_total", &[]).unwrap();
    // New repository: every byte is new (plus the tree); one repeated byte compresses well.
    assert!(added >= (2u64 << 20) as f64, "added {added}");
    assert!(stored_bytes > 0.0 && stored_bytes < added, "stored {stored_bytes} of {added} added");
    assert_eq!(v("shmback_batch_duration_seconds_count", &[]), Some(1.0));
    let took = v("shmback_batch_duration_seconds_sum", &[]).unwrap();
    assert!(took > 0.0, "duration {took}");
    let at = v("shmback_last_success_timestamp_seconds", &[("source", segment)]).unwrap();
    assert!(at >= before.floor() && at <= unix_now(), "last success at {at}, the batch began at {before}");
    assert_eq!(v("shmback_snapshots", &[]), Some(1.0));
    assert_eq!(v("shmback_batches_total", &[("result", "rejected"), ("source", segment)]), Some(0.0));

    // A second batch (one new file) is stored; a hostile one is rejected, and counted as such.
    good_batch(&seg, "second").expect("a second batch is stored");
    send_raw(&seg, &[(FrameKind::Entry, raw_path_entry(b"../escape"))]);
    let later = wait_for_value(addr, "shmback_batches_total", &[("result", "rejected"), ("source", segment)], 1.0);
    assert_eq!(value(&later, "shmback_batches_total", &stored), Some(2.0));
    assert_eq!(value(&later, "shmback_files_total", &[("state", "new")]), Some(2.0));
    assert_eq!(value(&later, "shmback_snapshots", &[]), Some(2.0));
    assert_eq!(value(&later, "shmback_batches_total", &[("result", "failed"), ("source", segment)]), Some(0.0));
    // Every producer has let go.
    wait_for_value(addr, "shmback_producer_alive", &[("segment", segment)], 0.0);

    assert!(terminate(&mut child.0).success(), "{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn malformed_requests_get_an_answer_or_a_closed_connection_and_the_endpoint_stays_up() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let mut child = Reaped(daemon(&loc, &seg, &["--metrics-addr", "127.0.0.1:0"], &log));
    let addr = metrics_addr(&log);
    wait_ready(addr);
    let (status, body) = get(addr, "/nope");
    assert_eq!(status, 404);
    assert!(body.contains("serves /metrics, /healthz and /readyz"), "{body}");
    let (status, body) =
        raw(addr, b"POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    assert_eq!((status, body.as_str()), (405, "/metrics answers GET and HEAD only\n"));
    // Not HTTP at all; a header larger than the server reads; a request cut short; a method of
    // 64 KiB; a request line with no version.
    assert_eq!(raw(addr, b"\x00\x01\x02 hello\r\n\r\n").0, 400);
    let huge = format!("GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "a".repeat(100 << 10));
    assert!(matches!(raw(addr, huge.as_bytes()).0, 0 | 431), "an oversized header is refused");
    drop(TcpStream::connect(addr).unwrap().write_all(b"GET /metr"));
    assert!(matches!(raw(addr, &vec![b'A'; 64 << 10]).0, 0 | 400 | 431));
    assert_eq!(raw(addr, b"GET /metrics\r\n\r\n").0, 400);
    // A client that connects and sends nothing holds no more than a connection: others are served.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
    let (status, body) = raw(addr, b"HEAD /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    assert_eq!((status, body.as_str()), (200, ""), "HEAD answers without a body");
    drop(idle);
    assert_eq!(scrape(addr).get(&("shmback_snapshots".into(), BTreeMap::new())), Some(&0.0));
    assert!(terminate(&mut child.0).success(), "{}", std::fs::read_to_string(&log).unwrap());
}

#[test]
fn readyz_is_503_with_the_reason_until_the_repository_is_open() {
    // A REST server that accepts connections (the kernel's backlog does) and never answers:
    // opening the repository hangs, and the endpoint says so meanwhile.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let repo = format!("rest:http://{}/", silent.local_addr().unwrap());
    let work = tempfile::tempdir().unwrap();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let mut child = Reaped(daemon(&repo, &seg, &["--metrics-addr", "127.0.0.1:0"], &log));
    let addr = metrics_addr(&log);
    assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()), "alive while the repository is being opened");
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: the repository is not open yet"), "{body}");
    let metrics = scrape(addr);
    assert_eq!(
        value(&metrics, "shmback_batches_total", &[("result", "stored"), ("source", seg.to_str().unwrap())]),
        None
    );
    assert!(child.0.try_wait().unwrap().is_none(), "the daemon is still opening the repository");
    drop(silent);
}

#[test]
fn a_metrics_port_in_use_fails_at_start_up_with_the_flag_named() {
    let (work, loc) = fresh_repo();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let out = common::shmback_pw(
        &loc,
        &["run", "--segment", seg.to_str().unwrap(), "--metrics-addr", &taken.local_addr().unwrap().to_string()],
    );
    let text = common::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot serve metrics on") && text.contains("--metrics-addr"), "{text}");
    assert!(!seg.exists(), "nothing was served");
    drop(work);
}
