//! Sends a directory tree as one batch through a /dev/shm ring to a second process, which
//! validates every frame with the batch decoder, hashes the file bytes, and acknowledges the batch
//! through the reverse channel. Both sides print what they saw; the checksums must agree.
//!
//! ```text
//! cargo run --release -p shmback-proto --example ring_demo [DIR] [--ring BYTES]
//! ```
//! DIR defaults to this workspace's source tree. Only regular files, directories and symlinks are
//! sent; anything else is reported and skipped.
//!
//! The demo needs a real segment, which a whole-crate `--cfg loom` build (where the ring runs on
//! loom's model atomics) does not have: built that way it only says so.

#[cfg(not(loom))]
fn main() {
    demo::main()
}

#[cfg(loom)]
fn main() {
    eprintln!("ring_demo: built with --cfg loom, which has no /dev/shm segment; build it without --cfg loom");
    std::process::exit(2);
}

#[cfg(not(loom))]
mod demo {
    use std::ffi::OsStr;
    use std::fs::File;
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use shmback_proto::batch::Event;
    use shmback_proto::frame::FrameKind;
    use shmback_proto::{BatchDecoder, Begin, Entry, EntryKind, Frame, Labels, Segment, SegmentOptions};

    const TIMEOUT: Duration = Duration::from_secs(30);

    pub fn main() {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.first().map(String::as_str) == Some("--consume") {
            return consume(Path::new(&args[1]));
        }
        let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let mut ring = 4usize << 20;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--ring" => ring = it.next().and_then(|v| v.parse().ok()).expect("--ring BYTES (a power of two)"),
                "-h" | "--help" => {
                    println!("usage: ring_demo [DIR] [--ring BYTES]");
                    return;
                }
                d => dir = PathBuf::from(d),
            }
        }
        if let Err(e) = produce(&dir, ring) {
            eprintln!("ring_demo: {e}");
            std::process::exit(1);
        }
    }

    /// FNV-1a over 8-byte words (then the tail bytes): a checksum both processes compute over the
    /// same frames. Word-wise so the demo measures the ring, not a byte-at-a-time hash.
    fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            h ^= u64::from_le_bytes(w.try_into().unwrap());
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        for b in words.remainder() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }
    const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

    /// Walks `root` depth-first in `Path::cmp` order (the order the batch protocol requires).
    fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, Entry)>, skipped: &mut usize) -> std::io::Result<()> {
        let mut names: Vec<_> =
            std::fs::read_dir(root.join(rel))?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        names.sort_by(|a, b| Path::new(a).cmp(Path::new(b)));
        for name in names {
            let r = rel.join(&name);
            if name == "target" || name == ".git" {
                continue;
            }
            let full = root.join(&r);
            let m = std::fs::symlink_metadata(&full)?;
            let ft = m.file_type();
            let (kind, size, target) = if ft.is_dir() {
                (EntryKind::Dir, Some(0), vec![])
            } else if ft.is_file() {
                (EntryKind::File, Some(m.len()), vec![])
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&full)?.into_os_string();
                (EntryKind::Symlink, Some(t.len() as u64), t.as_bytes().to_vec())
            } else {
                *skipped += 1;
                continue;
            };
            let entry = Entry {
                path: r.as_os_str().as_bytes().to_vec(),
                kind,
                size,
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                target,
            };
            out.push((full, entry));
            if ft.is_dir() {
                walk(root, &r, out, skipped)?;
            }
        }
        Ok(())
    }

    fn produce(dir: &Path, ring: usize) -> Result<(), Box<dyn std::error::Error>> {
        let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut entries = vec![];
        let mut skipped = 0;
        walk(&dir, Path::new(""), &mut entries, &mut skipped)?;
        let shm = tempfile_dir()?;
        let seg = shm.join("demo");
        let opts = SegmentOptions { capacity: Some(ring), ..SegmentOptions::default() };
        let mut p = Segment::producer(&seg, &opts)?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["--consume", seg.to_str().ok_or("non-UTF-8 /dev/shm path")?])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line)?;
        let epoch = p.consumer_epoch();

        let start = Instant::now();
        let seq = p.next_batch_seq();
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string();
        let labels = Labels { host: Some(host), tags: vec!["ring-demo".into()], meta: vec![] };
        p.send(&Frame::Begin(Begin { seq, labels }), TIMEOUT)?;
        p.record_begun(seq);
        for (_, e) in &entries {
            p.send(&Frame::Entry(e.clone()), TIMEOUT)?;
        }
        p.send(&Frame::EndOfManifest { entries: entries.len() as u64 }, TIMEOUT)?;
        let (mut bytes, mut sum) = (0u64, FNV0);
        let chunk = (64 << 10).min(p.max_payload());
        for (full, e) in entries.iter().filter(|(_, e)| e.kind == EntryKind::File) {
            let mut f = File::open(full)?;
            let mut left = e.size.unwrap_or(0);
            while left > 0 {
                // Read straight into the ring: the file's bytes are copied once, page cache → ring.
                let want = (left as usize).min(chunk);
                let mut r = p.reserve(FrameKind::Data, want, TIMEOUT)?;
                let n = f.read(&mut r)?;
                if n == 0 {
                    // The reservation is dropped uncommitted: nothing of it becomes visible.
                    let _ = r;
                    p.send(
                        &Frame::Abort { code: 3, reason: format!("{} shrank while read", full.display()) },
                        TIMEOUT,
                    )?;
                    return Err(format!("{} shrank while it was read; batch aborted", full.display()).into());
                }
                sum = fnv(sum, &r[..n]);
                r.commit_len(n);
                left -= n as u64;
                bytes += n as u64;
            }
        }
        p.send(&Frame::Commit { entries: entries.len() as u64, bytes }, TIMEOUT)?;
        let id = p.wait_durable(seq, epoch, TIMEOUT)?;
        let secs = start.elapsed().as_secs_f64();
        let mut report = String::new();
        out.read_line(&mut report)?;
        child.wait()?;
        println!(
            "producer: sent batch {seq} of {} entries ({} files, {skipped} skipped), {:.1} MB in {:.3} s = {:.0} MB/s through a {} KiB ring",
            entries.len(),
            entries.iter().filter(|(_, e)| e.kind == EntryKind::File).count(),
            bytes as f64 / 1e6,
            secs,
            bytes as f64 / 1e6 / secs,
            ring >> 10
        );
        println!("producer: checksum {sum:016x}; durable ack id {}", hex(&id[..8]));
        print!("{report}");
        let theirs = report.split("checksum ").nth(1).map(|s| s.split(';').next().unwrap_or("").trim().to_string());
        if theirs.as_deref() != Some(&format!("{sum:016x}")) {
            return Err("consumer's checksum differs".into());
        }
        println!("ok: both processes agree on every byte");
        std::fs::remove_dir_all(&shm)?;
        Ok(())
    }

    fn tempfile_dir() -> std::io::Result<PathBuf> {
        let d = PathBuf::from(format!("/dev/shm/shmback-demo-{}", std::process::id()));
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The consumer process: attach, decode and validate one batch, ack it with its checksum as id.
    fn consume(seg: &Path) {
        let opts = SegmentOptions { create: false, ..SegmentOptions::default() };
        let mut c = Segment::consumer(seg, &opts).expect("attach as consumer");
        println!("ready");
        let mut dec = BatchDecoder::new();
        let (mut sum, mut files, mut entries) = (FNV0, 0u64, 0u64);
        loop {
            let f = c.recv(TIMEOUT).expect("frame");
            let frame = f.decode().expect("valid frame");
            match dec.feed(frame).expect("valid batch") {
                Event::Entry { entry, .. } => {
                    entries += 1;
                    files += (entry.kind == EntryKind::File) as u64;
                    let _ = Path::new(OsStr::from_bytes(&entry.path));
                }
                Event::Data { bytes, .. } => sum = fnv(sum, bytes),
                Event::Commit { seq, bytes, .. } => {
                    f.release();
                    let mut id = [0u8; 32];
                    id[..8].copy_from_slice(&sum.to_be_bytes());
                    c.publish_durable(seq, &id);
                    println!(
                        "consumer: batch {seq} valid: {entries} entries, {files} files, {bytes} bytes; checksum {sum:016x}; acked"
                    );
                    return;
                }
                Event::Abort { reason, .. } => panic!("batch aborted: {reason}"),
                _ => {}
            }
            f.release();
        }
    }
}
