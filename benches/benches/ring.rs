//! Ring throughput and wake-up latency, with the baselines measured in the same run:
//! single-thread memcpy of the same bytes, a pipe and a unix socketpair between two processes.
//!
//! Every transport moves `iters` frames of `frame` bytes from a hot source buffer and ends with an
//! ack from the receiving side, which copies every byte out (copy in + copy out for all).
//!
//! `cargo bench -p shmback-benches --bench ring`, then `python3 benches/report.py` for the table.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shmback_benches::{send_stream, serve_ring};
use shmback_proto::{Frame, FrameKind, Producer, Segment, SegmentOptions};

const PEER: &str = env!("CARGO_BIN_EXE_shmback-bench-peer");
const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const FRAMES: [usize; 3] = [4 * KIB, 64 * KIB, MIB];
const RINGS: [usize; 4] = [MIB, 4 * MIB, 16 * MIB, 64 * MIB];
const LONG: Duration = Duration::from_secs(60);

fn label(n: usize) -> String {
    if n >= MIB { format!("{}MiB", n / MIB) } else { format!("{}KiB", n / KIB) }
}

fn seg_opts(capacity: usize) -> SegmentOptions {
    SegmentOptions { capacity: Some(capacity), ..SegmentOptions::default() }
}

/// Sends `iters` DATA frames of `src` and a COMMIT carrying `seq`, then waits for its ack.
fn ring_transfer(p: &mut Producer<Segment>, src: &[u8], iters: u64, seq: &mut u64) {
    for _ in 0..iters {
        let mut r = p.reserve(FrameKind::Data, src.len(), LONG).unwrap();
        r.copy_from_slice(src);
        r.commit();
    }
    *seq += 1;
    let epoch = p.consumer_epoch();
    p.send(&Frame::Commit { entries: *seq, bytes: 0 }, LONG).unwrap();
    p.wait_durable(*seq, epoch, LONG).unwrap();
}

/// Measures every frame size that fits the ring through `p` (its consumer acks each COMMIT).
fn bench_frames(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    p: &mut Producer<Segment>,
    ring: usize,
) {
    let mut seq = 0;
    let max = p.max_payload();
    for frame in FRAMES.into_iter().filter(|f| *f <= max) {
        let src = vec![0x5au8; frame];
        g.throughput(Throughput::Bytes(frame as u64));
        g.bench_function(BenchmarkId::new(label(frame), label(ring)), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                ring_transfer(p, &src, iters, &mut seq);
                t.elapsed()
            })
        });
    }
}

fn spawn_ring_peer(path: &Path) -> Child {
    let mut child =
        Command::new(PEER).args(["ring", path.to_str().unwrap()]).stdout(Stdio::piped()).spawn().expect("spawn peer");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

fn ring_process(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_process");
    for ring in RINGS {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("bench");
        let mut p = Segment::producer(&path, &seg_opts(ring)).unwrap();
        let mut child = spawn_ring_peer(&path);
        bench_frames(&mut g, &mut p, ring);
        drop(p);
        child.wait().unwrap();
    }
    g.finish();
}

fn ring_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_thread");
    let ring = 4 * MIB;
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("bench");
    let mut p = Segment::producer(&path, &seg_opts(ring)).unwrap();
    let mut cons = Segment::consumer(&path, &seg_opts(ring)).unwrap();
    let consumer = std::thread::spawn(move || serve_ring(&mut cons, &mut vec![0u8; 2 * MIB]));
    bench_frames(&mut g, &mut p, ring);
    drop(p);
    consumer.join().unwrap();
    g.finish();
}

fn baselines(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    // memcpy: the same frames from a hot source into a pre-faulted region the size of the default
    // ring, cycling through it as the ring does.
    let mut dst = vec![0u8; 4 * MIB];
    for frame in FRAMES {
        let src = vec![0x5au8; frame];
        g.throughput(Throughput::Bytes(frame as u64));
        g.bench_function(BenchmarkId::new("memcpy", label(frame)), |b| {
            let mut off = 0;
            b.iter(|| {
                if off + frame > dst.len() {
                    off = 0;
                }
                dst[off..off + frame].copy_from_slice(&src);
                std::hint::black_box(&dst);
                off += frame;
            })
        });
    }

    let mut child = Command::new(PEER).arg("pipe").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let (w, r) = (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    bench_stream(&mut g, "pipe", w, r);
    child.wait().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = Command::new(PEER).args(["socket", sock.to_str().unwrap()]).spawn().unwrap();
    let (s, _) = listener.accept().unwrap();
    let r = s.try_clone().unwrap();
    bench_stream(&mut g, "socketpair", s, r);
    child.wait().unwrap();
    g.finish();
}

/// Sends every frame size through a byte stream to a peer process, then ends the session.
fn bench_stream(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    mut w: impl Write,
    mut r: impl std::io::Read,
) {
    for frame in FRAMES {
        let src = vec![0x5au8; frame];
        g.throughput(Throughput::Bytes(frame as u64));
        g.bench_function(BenchmarkId::new(name, label(frame)), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                send_stream(&mut w, &mut r, &src, iters).unwrap();
                t.elapsed()
            })
        });
    }
    w.write_all(&0u64.to_le_bytes()).unwrap();
}

/// Wake-up round trip between two processes: one 8-byte COMMIT frame out, the ack back, both
/// sides idle in between (so it includes spin-then-futex wake-ups on both sides).
fn latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("latency");
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let path = dir.path().join("bench");
    let mut p = Segment::producer(&path, &seg_opts(4 * MIB)).unwrap();
    let mut child = spawn_ring_peer(&path);
    let mut seq = 0;
    g.bench_function("roundtrip", |b| b.iter(|| ring_transfer(&mut p, &[], 0, &mut seq)));
    drop(p);
    child.wait().unwrap();
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .without_plots()
}

criterion_group! { name = benches; config = config(); targets = baselines, ring_process, ring_thread, latency }
criterion_main!(benches);
