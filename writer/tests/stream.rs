//! The writer end to end through a real segment, against a test consumer: byte-exact streams for
//! every kind of tree, readers and streams, path validation, changing sources, uploader death.

mod common;

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Outcome, T, opts, receive};
use shmback_proto::{EntryKind, Labels, RejectCode, Segment};
use shmback_writer::{EntryMeta, Outbox, OutboxOptions, WriteError};

fn outbox(seg: &Path, ring: usize) -> Outbox {
    Outbox::open(seg, OutboxOptions { segment: opts(ring), timeout: T, ..OutboxOptions::default() }).unwrap()
}

/// Runs `send` on a fresh outbox of `seg` in a producer thread (the test thread plays the uploader).
fn producer<R: Send + 'static>(
    seg: &Path,
    ring: usize,
    send: impl FnOnce(&mut Outbox) -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let seg = seg.to_path_buf();
    std::thread::spawn(move || send(&mut outbox(&seg, ring)))
}

/// Deterministic file contents.
fn content(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect()
}

/// Builds a tree exercising everything a batch must carry.
fn build_tree(root: &Path, ring: usize) {
    let w = |p: &str, data: &[u8]| {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    for i in 0..300 {
        w(&format!("small/d{}/f{i}.txt", i % 7), &content(i, i * 13 % 700));
    }
    w("big/huge.bin", &content(1, ring * 5 + 123)); // several times the ring
    w("empty/zero", b"");
    std::fs::create_dir_all(root.join("empty/dir")).unwrap();
    std::os::unix::fs::symlink("../big/huge.bin", root.join("empty/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    let mut deep = root.join("deep");
    for i in 0..60 {
        deep = deep.join(format!("level{i}"));
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"at the bottom").unwrap();
    w("names/données-é-😀.txt", b"unicode");
    let raw = root.join("names").join(OsStr::from_bytes(b"raw-\xff\xfe-name"));
    std::fs::write(raw, b"not utf-8").unwrap();
    // A sparse file: holes read as zeros.
    let f = std::fs::File::create(root.join("sparse.img")).unwrap();
    f.set_len(3 * ring as u64).unwrap();
    let mut f = f;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(ring as u64 + 7)).unwrap();
    f.write_all(b"island").unwrap();
    std::fs::set_permissions(root.join("small/d0/f0.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn walk_fs(root: &Path, rel: &Path, out: &mut Vec<(Vec<u8>, std::fs::Metadata)>) {
    for e in std::fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        out.push((r.as_os_str().as_bytes().to_vec(), m.clone()));
        if m.is_dir() {
            walk_fs(root, &r, out);
        }
    }
}

#[test]
fn every_kind_of_tree_arrives_byte_exact_and_in_order() {
    let ring = 64 << 10;
    let src = tempfile::tempdir().unwrap();
    build_tree(src.path(), ring);
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut c = Segment::consumer(&seg, &opts(ring)).unwrap();
    let root = src.path().to_path_buf();
    let producer = producer(&seg, ring, move |ob| {
        let mut b = ob.batch();
        b.add_dir("tree", &root).unwrap();
        b.tag("t1").label("k", "v");
        let t = b.commit().unwrap();
        (t.seq(), t.progress(), t.wait_durable(T))
    });
    let got = receive(&mut c, |_| {}).unwrap();
    c.publish_durable(got.begin.seq, &[9; 32]);
    let (seq, progress, durable) = producer.join().unwrap();
    assert_eq!(durable.unwrap().0, [9; 32]);
    assert_eq!(seq, got.begin.seq);
    assert!(matches!(got.outcome, Outcome::Commit));
    assert_eq!(got.begin.labels.tags, ["t1"]);
    assert_eq!(got.begin.labels.meta, [("k".to_string(), "v".to_string())]);

    // Every filesystem object is there with its metadata, and file bytes are exact.
    let mut fs = vec![];
    walk_fs(src.path(), Path::new(""), &mut fs);
    assert_eq!(got.entries.len(), fs.len() + 1, "entries: the tree root plus every object");
    for (rel, m) in &fs {
        let mut snap = b"tree/".to_vec();
        snap.extend_from_slice(rel);
        let e = got.entry(&snap);
        assert_eq!(e.mode, m.mode(), "{:?}", String::from_utf8_lossy(rel));
        assert_eq!((e.uid, e.gid), (m.uid(), m.gid()));
        assert_eq!(e.mtime_ns, m.mtime() * 1_000_000_000 + m.mtime_nsec());
        let full = src.path().join(OsStr::from_bytes(rel));
        if m.is_file() {
            assert_eq!(e.kind, EntryKind::File);
            assert_eq!(e.size, Some(m.len()));
            assert!(got.file(&snap) == std::fs::read(&full).unwrap(), "{:?} differs", String::from_utf8_lossy(rel));
        } else if m.is_symlink() {
            assert_eq!(e.kind, EntryKind::Symlink);
            assert_eq!(e.target, std::fs::read_link(&full).unwrap().as_os_str().as_bytes());
        } else {
            assert_eq!(e.kind, EntryKind::Dir);
        }
    }
    // Depth-first Path::cmp order (the decoder enforced it; check the tree really is nested).
    let paths: Vec<&Path> = got.entries.iter().map(|e| Path::new(OsStr::from_bytes(&e.path))).collect();
    assert!(paths.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(got.file(b"tree/empty/zero"), b"");
    assert_eq!(progress.bytes_done, got.data.iter().map(|d| d.len() as u64).sum::<u64>());
}

/// A batch of over ten thousand entries from every kind of source, added out of order, arrives
/// whole: every entry once, in depth-first `Path::cmp` order (which is not byte order: `x/y` comes
/// before `x-y`), missing parents added, each file's bytes exact.
#[test]
fn a_large_batch_arrives_whole_and_in_manifest_order() {
    let ring = 64 << 10;
    let src = tempfile::tempdir().unwrap();
    let mut expected: std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>> = Default::default();
    let mut file = |rel: String, data: Vec<u8>| {
        let p = src.path().join(&rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, &data).unwrap();
        let mut dir = Path::new(&rel).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            expected.insert(format!("tree/{}", d.display()).into_bytes(), None);
            dir = d.parent();
        }
        expected.insert(format!("tree/{rel}").into_bytes(), Some(data));
    };
    for i in 0..6_000usize {
        file(format!("d{:03}/s{}/f{i}", i % 150, i % 4), content(i, i % 40));
    }
    for name in ["x/y/z", "x-y", "x.y", "x0", "x/y-z"] {
        file(format!("order/{name}"), name.as_bytes().to_vec());
    }
    expected.insert(b"tree".to_vec(), None);
    for i in (0..1_500usize).rev() {
        expected.insert(format!("mem/{i}").into_bytes(), None);
        expected.insert(format!("mem/{i}/note").into_bytes(), Some(content(i, 7)));
    }
    expected.insert(b"mem".to_vec(), None);
    expected.insert(b"tree-stream".to_vec(), Some(content(1, 200_000)));
    expected.insert(b"single".to_vec(), None);
    expected.insert(b"single/x-y".to_vec(), Some(b"x-y".to_vec()));

    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut c = Segment::consumer(&seg, &opts(ring)).unwrap();
    let root = src.path().to_path_buf();
    let producer = producer(&seg, ring, move |ob| {
        let mut b = ob.batch();
        for i in (0..1_500usize).rev() {
            b.add_bytes(format!("mem/{i}/note"), content(i, 7)).unwrap();
        }
        b.add_reader("tree-stream", None, EntryMeta::default(), std::io::Cursor::new(content(1, 200_000))).unwrap();
        b.add_dir("tree", &root).unwrap();
        b.add_path("single/x-y", root.join("order/x-y")).unwrap();
        let added = b.len();
        b.commit().map(|t| (added, t.progress()))
    });
    let got = receive(&mut c, |_| {}).unwrap();
    let (added, progress) = producer.join().unwrap().unwrap();
    assert!(matches!(got.outcome, Outcome::Commit));

    let mut order: Vec<&Vec<u8>> = expected.keys().collect();
    order.sort_by(|a, b| Path::new(OsStr::from_bytes(a)).cmp(Path::new(OsStr::from_bytes(b))));
    let sent: Vec<&Vec<u8>> = got.entries.iter().map(|e| &e.path).collect();
    assert_eq!(sent.len(), order.len());
    assert!(sent == order, "the manifest is not every path once in depth-first order");
    let at = |p: &[u8]| sent.iter().position(|s| s.as_slice() == p).unwrap();
    assert!(at(b"tree/order/x/y/z") < at(b"tree/order/x-y"), "x's children come before x-y");
    assert_eq!(added, 1_500 + 2 + 1 + expected.keys().filter(|k| k.starts_with(b"tree/")).count());
    assert_eq!(progress.entries, expected.len() as u64);

    let files: Vec<&Vec<u8>> = got.entries.iter().filter(|e| e.kind == EntryKind::File).map(|e| &e.path).collect();
    assert_eq!(files.len(), got.data.len());
    for (path, data) in files.iter().zip(&got.data) {
        let want = expected[*path].as_ref().unwrap_or_else(|| panic!("{path:?} sent as a file"));
        assert!(data == want, "{:?} differs", String::from_utf8_lossy(path));
    }
    for e in got.entries.iter().filter(|e| expected[&e.path].is_none()) {
        assert_eq!(e.kind, EntryKind::Dir, "{:?}", String::from_utf8_lossy(&e.path));
    }
}

#[test]
fn readers_streams_and_bytes_with_synthesised_parents() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut c = Segment::consumer(&seg, &opts(64 << 10)).unwrap();
    let producer = producer(&seg, 64 << 10, |ob| {
        let mut b = ob.batch();
        // A stream of unknown size, several times the ring, like `pg_dump | shmback-send --stdin`.
        let dump = content(5, 300_000);
        b.add_reader("dumps/db.sql", None, EntryMeta::default(), std::io::Cursor::new(dump)).unwrap();
        b.add_reader("dumps/empty.sql", None, EntryMeta::default(), std::io::empty()).unwrap();
        let meta = EntryMeta { mode: 0o640, uid: 7, gid: 8, mtime_ns: 1_600_000_000_123_456_789 };
        b.add_reader("known.bin", Some(1000), meta, std::io::Cursor::new(content(6, 1000))).unwrap();
        b.add_bytes("a/b/c/note.txt", "hello").unwrap();
        b.commit().map(|t| t.seq())
    });
    let got = receive(&mut c, |_| {}).unwrap();
    producer.join().unwrap().unwrap();
    assert!(matches!(got.outcome, Outcome::Commit));
    assert_eq!(got.file(b"dumps/db.sql"), content(5, 300_000));
    assert_eq!(got.entry(b"dumps/db.sql").size, None);
    assert_eq!(got.file(b"dumps/empty.sql"), b"");
    assert_eq!(got.file(b"known.bin"), content(6, 1000));
    let k = got.entry(b"known.bin");
    assert_eq!((k.mode, k.uid, k.gid, k.mtime_ns), (0o100640, 7, 8, 1_600_000_000_123_456_789));
    assert_eq!(got.file(b"a/b/c/note.txt"), b"hello");
    // Parents nobody added are synthesised as directories.
    for d in [&b"a"[..], b"a/b", b"a/b/c", b"dumps"] {
        let e = got.entry(d);
        assert_eq!((e.kind, e.mode), (EntryKind::Dir, 0o40755));
    }
}

#[test]
fn bad_paths_are_refused_when_added() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut ob = outbox(&shm.path().join("seg"), 64 << 10);
    let mut b = ob.batch();
    for bad in [&b"/etc/passwd"[..], b"../up", b"a/../../b", b"a\0b", b"", b"a//b", b"./x"] {
        assert!(matches!(b.add_bytes(bad, "x"), Err(WriteError::InvalidPath { .. })), "{bad:?} accepted");
    }
    assert!(matches!(b.add_bytes(vec![b'x'; 300], "x"), Err(WriteError::InvalidPath { .. })));
    b.add_bytes("f", "x").unwrap();
    assert!(matches!(b.add_bytes("f", "y"), Err(WriteError::Duplicate { .. })));
    assert!(matches!(b.add_bytes("f/g", "y"), Err(WriteError::NotADirectory { .. })));
    b.add_bytes("d/g", "y").unwrap();
    assert!(matches!(b.add_bytes("d", "z"), Err(WriteError::NotADirectory { .. })));
    assert!(matches!(b.add_path("p", "/definitely/not/here"), Err(WriteError::Io { .. })));
    assert_eq!(b.len(), 2, "refused entries left no trace");
}

#[test]
fn sockets_and_fifos_are_skipped_and_reported() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("ok"), "ok").unwrap();
    let _l = std::os::unix::net::UnixListener::bind(src.path().join("sock")).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let mut ob = outbox(&shm.path().join("seg"), 64 << 10);
    let mut b = ob.batch();
    b.add_dir("", src.path()).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b.skipped().len(), 1);
    assert!(b.skipped()[0].0.ends_with("sock"));
}

#[test]
fn a_file_that_grows_shrinks_or_vanishes_after_the_manifest_aborts_the_batch_and_is_named() {
    type Change = fn(&Path);
    let changes: [(&str, Change, &str); 3] = [
        ("grows", |p| std::fs::OpenOptions::new().append(true).open(p).unwrap().write_all(b"more").unwrap(), "size"),
        ("shrinks", |p| std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(10).unwrap(), "size"),
        ("vanishes", |p| std::fs::remove_file(p).unwrap(), "deleted"),
    ];
    for (name, change, expect) in changes {
        let ring = 64 << 10;
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a-big"), content(1, ring * 4)).unwrap();
        std::fs::write(src.path().join("b-changes"), content(2, 1000)).unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let seg = shm.path().join("seg");
        let mut c = Segment::consumer(&seg, &opts(ring)).unwrap();
        let root = src.path().to_path_buf();
        let producer = producer(&seg, ring, move |ob| {
            let mut b = ob.batch();
            b.add_dir("", &root).unwrap();
            b.commit().map(|t| t.seq())
        });
        // The producer is blocked on a-big's data (4 rings' worth) while b changes after the manifest.
        let target = src.path().join("b-changes");
        let got = receive(&mut c, |_| change(&target)).unwrap();
        match &got.outcome {
            Outcome::Abort(reason) => assert!(reason.contains("b-changes"), "{name}: {reason}"),
            Outcome::Commit => panic!("{name}: a batch with a changed file was committed"),
        }
        match producer.join().unwrap() {
            Err(WriteError::SourceChanged { path, what }) => {
                assert!(path.ends_with("b-changes"), "{name}");
                assert!(what.contains(expect), "{name}: {what}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn backpressure_waits_then_times_out_while_the_uploader_lives() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let _c = Segment::consumer(&seg, &opts(64 << 10)).unwrap(); // alive, never reads
    let timeout = Duration::from_millis(300);
    let mut ob =
        Outbox::open(&seg, OutboxOptions { segment: opts(64 << 10), timeout, ..OutboxOptions::default() }).unwrap();
    let mut b = ob.batch();
    b.add_bytes("big", content(0, 1 << 20)).unwrap();
    let start = Instant::now();
    assert!(matches!(b.commit().map(|t| t.seq()), Err(WriteError::Timeout(t)) if t == timeout));
    assert!(start.elapsed() >= timeout);
}

#[test]
fn readers_that_lie_about_their_size_abort_the_batch() {
    for (declared, actual) in [(100u64, 60usize), (100, 140)] {
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let seg = shm.path().join("seg");
        let mut c = Segment::consumer(&seg, &opts(64 << 10)).unwrap();
        let producer = producer(&seg, 64 << 10, move |ob| {
            let mut b = ob.batch();
            b.add_reader("r", Some(declared), EntryMeta::default(), std::io::Cursor::new(vec![1u8; actual])).unwrap();
            b.commit().map(|t| t.seq())
        });
        let got = receive(&mut c, |_| {}).unwrap();
        assert!(matches!(got.outcome, Outcome::Abort(_)), "{declared} declared, {actual} given: {:?}", got.outcome);
        assert!(matches!(producer.join().unwrap(), Err(WriteError::SourceChanged { .. })));
    }
}

#[test]
fn uploader_death_mid_batch_is_prompt_and_a_resend_arrives_clean() {
    let ring = 64 << 10;
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("big"), content(3, ring * 8)).unwrap();
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let c = Segment::consumer(&seg, &opts(ring)).unwrap();
    let mut ob = outbox(&seg, ring);
    let (root, seg2) = (src.path().to_path_buf(), seg.clone());
    // The "uploader" reads nothing and dies while the writer waits for room.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        drop(c);
        Instant::now()
    });
    let mut b = ob.batch();
    b.add_dir("", &root).unwrap();
    let err = b.commit().map(|t| t.seq()).unwrap_err();
    let died = killer.join().unwrap();
    assert!(matches!(err, WriteError::UploaderGone), "{err}");
    assert!(died.elapsed() < Duration::from_secs(2), "UploaderGone took {:?}", died.elapsed());

    // The uploader comes back; the producer sends the batch again and it arrives whole (the torn
    // batch's leftovers in the ring are skipped by the decoder).
    let mut c = Segment::consumer(&seg2, &opts(ring)).unwrap();
    let reader = std::thread::spawn(move || {
        let got = receive(&mut c, |_| {}).unwrap();
        c.publish_durable(got.begin.seq, &[1; 32]);
        got
    });
    let mut b = ob.batch();
    b.add_dir("", &root).unwrap();
    let t = b.commit().unwrap();
    let seq = t.seq();
    assert_eq!(t.wait_durable(T).unwrap().0, [1; 32]);
    let got = reader.join().unwrap();
    assert_eq!(got.begin.seq, seq);
    assert_eq!(got.file(b"big"), content(3, ring * 8));
}

#[test]
fn a_rejected_batch_is_reported_to_the_ticket() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut c = Segment::consumer(&seg, &opts(64 << 10)).unwrap();
    let mut ob = Outbox::open(
        &seg,
        OutboxOptions {
            segment: opts(64 << 10),
            timeout: T,
            labels: Labels { host: Some("h1".into()), ..Labels::default() },
            ..OutboxOptions::default()
        },
    )
    .unwrap();
    let mut b = ob.batch();
    b.add_bytes("x", "1").unwrap();
    let t = b.commit().unwrap();
    let got = receive(&mut c, |_| {}).unwrap();
    assert_eq!(got.begin.labels.host.as_deref(), Some("h1"));
    c.publish_rejected(got.begin.seq, RejectCode::StorageFailed);
    assert!(matches!(t.wait_durable(T), Err(WriteError::Rejected { code: RejectCode::StorageFailed, .. })));
}

#[test]
fn metadata_older_than_a_second_is_read_again_at_commit_and_fresh_metadata_is_kept() {
    // A batch committed long after its directory was walked sends what is on disk at the commit
    // (the grown file's new size, its data); one committed at once keeps the walk's metadata, and
    // a file that changed in between is caught as it is read, not sent with a wrong size.
    for (wait, committed) in [(Duration::from_millis(1300), true), (Duration::ZERO, false)] {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("grows"), content(3, 1000)).unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let seg = shm.path().join("seg");
        let mut c = Segment::consumer(&seg, &opts(64 << 10)).unwrap();
        let root = src.path().to_path_buf();
        let producer = producer(&seg, 64 << 10, move |ob| {
            let mut b = ob.batch();
            b.add_dir("", &root).unwrap();
            std::thread::sleep(wait);
            std::fs::OpenOptions::new().append(true).open(root.join("grows")).unwrap().write_all(b"more").unwrap();
            b.commit().map(|t| t.seq())
        });
        let got = receive(&mut c, |_| {}).unwrap();
        let size = got.entries.iter().find(|e| e.path == b"grows").and_then(|e| e.size);
        if committed {
            assert!(matches!(got.outcome, Outcome::Commit), "waited {wait:?}: {:?}", got.outcome);
            assert_eq!(size, Some(1004), "the commit read the grown file's metadata again");
            assert_eq!(got.file(b"grows").len(), 1004);
            producer.join().unwrap().unwrap();
        } else {
            assert_eq!(size, Some(1000), "metadata read moments ago is sent as read");
            assert!(matches!(got.outcome, Outcome::Abort(_)), "{:?}", got.outcome);
            assert!(matches!(producer.join().unwrap(), Err(WriteError::SourceChanged { .. })));
        }
    }
}
