//! `shmback-send` end to end: standard input as a stream, paths stored as restic stores them,
//! the durable ack, and each documented exit status.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Outcome, opts, receive};
use shmback_proto::{EntryKind, RejectCode, Segment};

const SEND: &str = env!("CARGO_BIN_EXE_shmback-send");

#[test]
fn stdin_and_paths_in_one_snapshot_with_the_durable_ack() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut c = Segment::consumer(&seg, &opts(64 << 10)).unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("etc")).unwrap();
    std::fs::write(src.path().join("etc/app.conf"), "x=1\n").unwrap();

    let mut child = Command::new(SEND)
        .args(["--segment", seg.to_str().unwrap(), "--stdin", "dumps/db.sql", "--tag", "nightly", "--wait-durable"])
        .arg(src.path().join("etc"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dump: Vec<u8> = (0..500_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut stdin = child.stdin.take().unwrap();
    let d2 = dump.clone();
    let feeder = std::thread::spawn(move || stdin.write_all(&d2).unwrap());
    let got = receive(&mut c, |_| {}).unwrap();
    feeder.join().unwrap();
    c.publish_durable(got.begin.seq, &[0xab; 32]);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("batch {}:", got.begin.seq)), "{stdout}");
    assert!(stdout.contains(&format!("stored as snapshot {}", "ab".repeat(32))), "{stdout}");
    assert!(matches!(got.outcome, Outcome::Commit));
    assert_eq!(got.begin.labels.tags, ["nightly"]);
    assert_eq!(got.file(b"dumps/db.sql"), &dump[..]);
    assert_eq!(got.entry(b"dumps/db.sql").size, None, "stdin is a stream of unknown size");
    // The directory is stored under its absolute path, without the leading '/'.
    let abs = src.path().join("etc/app.conf");
    let snap = abs.to_str().unwrap().trim_start_matches('/');
    assert_eq!(got.file(snap.as_bytes()), b"x=1\n");
    let first = abs.strip_prefix("/").unwrap().components().next().unwrap();
    assert_eq!(got.entry(first.as_os_str().as_encoded_bytes()).kind, EntryKind::Dir);
}

fn run(args: &[&str], seg: &Path) -> (i32, String) {
    let out = Command::new(SEND).arg("--segment").arg(seg).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn exit_statuses_name_the_cause() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");

    let (code, err) = run(&[], &seg);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nothing to send"), "{err}");

    let (code, err) = run(&["/no/such/path"], &seg);
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("/no/such/path"), "{err}");

    // No uploader attached within the timeout: named as such, nothing sent.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), "x").unwrap();
    let (code, err) = run(&["--wait-durable", "--timeout", "1", src.path().to_str().unwrap()], &seg);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no uploader attached") && err.contains("shmback run --segment"), "{err}");

    // A rejection is exit status 5.
    // The CLI created the segment (default size): attach to whatever size it has.
    let any_size = shmback_proto::SegmentOptions { capacity: None, ..opts(64 << 10) };
    let mut c = Segment::consumer(&seg, &any_size).unwrap();
    let seg2 = seg.clone();
    let path = src.path().to_path_buf();
    let child = std::thread::spawn(move || run(&["--wait-durable", path.to_str().unwrap()], &seg2));
    let got = receive(&mut c, |_| {}).unwrap();
    c.publish_rejected(got.begin.seq, RejectCode::Malformed);
    let (code, err) = child.join().unwrap();
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("rejected"), "{err}");
}

#[test]
fn a_sender_started_before_the_uploader_waits_for_it() {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let src = tempfile::tempdir().unwrap();
    // More than the ring holds, so the sender must wait for the uploader to drain.
    std::fs::write(src.path().join("big"), vec![7u8; 10 << 20]).unwrap();
    let child = Command::new(SEND)
        .args(["--segment", seg.to_str().unwrap(), "--wait-durable", "--timeout", "30"])
        .arg(src.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    while !seg.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let any_size = shmback_proto::SegmentOptions { capacity: None, ..opts(64 << 10) };
    let mut c = Segment::consumer(&seg, &any_size).unwrap();
    let got = receive(&mut c, |_| {}).unwrap();
    c.publish_durable(got.begin.seq, &[3; 32]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let abs = src.path().join("big");
    assert_eq!(got.file(abs.to_str().unwrap().trim_start_matches('/').as_bytes()).len(), 10 << 20);
}
