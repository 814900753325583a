//! The producer-side handoff, same corpus, same run: `shmback-writer` sending a directory tree
//! through a 4 MiB ring to a draining consumer process (it validates every frame and copies the
//! data out, acking each batch), against `cp -a` of the same tree into /dev/shm (the usual handoff:
//! copy into an outbox, then back it up). Also records the /dev/shm bytes each one occupies at its
//! peak, in target/criterion/handoff-memory.json (`benches/report.py` prints it).
//!
//! The corpus (generated once into the temp dir, ~213 MB): 10,000 small files of 1–16 KiB in 100
//! directories, and 4 files of 32 MiB. Both sides read it from the page cache (warm).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shmback_writer::{Outbox, OutboxOptions, SegmentOptions};

const PEER: &str = env!("CARGO_BIN_EXE_shmback-bench-peer");

fn corpus() -> (PathBuf, u64) {
    let root = std::env::temp_dir().join("shmback-bench-corpus-v1");
    let done = root.join(".complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&root);
        for i in 0..10_000u64 {
            let dir = root.join(format!("small/d{:02}", i % 100));
            std::fs::create_dir_all(&dir).unwrap();
            let len = 1024 + (i * 7919 % (15 * 1024)) as usize;
            let data: Vec<u8> = (0..len).map(|j| (j as u64 * 31 + i) as u8).collect();
            std::fs::write(dir.join(format!("f{i}.dat")), data).unwrap();
        }
        std::fs::create_dir_all(root.join("large")).unwrap();
        for i in 0..4u64 {
            let data: Vec<u8> = (0..32u64 << 20).map(|j| (j.wrapping_mul(2654435761) >> 13) as u8 ^ i as u8).collect();
            std::fs::write(root.join(format!("large/blob{i}.bin")), data).unwrap();
        }
        std::fs::write(&done, b"").unwrap();
    }
    (root.clone(), tree_bytes(&root, false))
}

/// Sum of file sizes, or (allocated) of blocks in use.
fn tree_bytes(p: &Path, allocated: bool) -> u64 {
    let m = std::fs::symlink_metadata(p).unwrap();
    let own = if allocated {
        m.blocks() * 512
    } else if m.is_file() {
        m.len()
    } else {
        0
    };
    if m.is_dir() {
        own + std::fs::read_dir(p).unwrap().map(|e| tree_bytes(&e.unwrap().path(), allocated)).sum::<u64>()
    } else {
        own
    }
}

fn handoff(c: &mut Criterion) {
    let (src, bytes) = corpus();
    let mut g = c.benchmark_group("handoff");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10).measurement_time(Duration::from_secs(10));

    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let opts = OutboxOptions {
        segment: SegmentOptions { capacity: Some(4 << 20), ..SegmentOptions::default() },
        ..OutboxOptions::default()
    };
    let mut outbox = Outbox::open(&seg, opts).unwrap();
    let mut child = Command::new(PEER).args(["drain", seg.to_str().unwrap()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    g.bench_function("writer_ring", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let mut batch = outbox.batch();
                batch.add_dir("corpus", &src).unwrap();
                batch.commit().unwrap().wait_durable(Duration::from_secs(600)).unwrap();
            }
            t.elapsed()
        })
    });
    let ring_peak = std::fs::metadata(&seg).unwrap().blocks() * 512;
    drop(outbox);
    child.wait().unwrap();

    let dst = shm.path().join("outbox");
    let mut cp_peak = 0;
    g.bench_function("cp_a_to_dev_shm", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let st = Command::new("cp").arg("-a").arg(&src).arg(&dst).status().unwrap();
                total += t.elapsed();
                assert!(st.success());
                cp_peak = cp_peak.max(tree_bytes(&dst, true));
                std::fs::remove_dir_all(&dst).unwrap();
            }
            total
        })
    });
    g.finish();
    let report = format!(
        "{{\"corpus_bytes\": {bytes}, \"ring_segment_bytes\": {ring_peak}, \"cp_a_outbox_bytes\": {cp_peak}}}\n"
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/criterion");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("handoff-memory.json"), report).unwrap();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).without_plots();
    targets = handoff
}
criterion_main!(benches);
