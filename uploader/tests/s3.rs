//! The S3 backend against an S3 server started by the test on 127.0.0.1 (`shmback_tests::s3_server`:
//! `s3s` + `s3s-fs` with a fault-injecting layer): ring → `shmback run` → repository on S3, restore byte-exact and
//! `check --read-data` clean; transient 500/503 answers retried (and logged) and the backup
//! completes; a pack upload that keeps failing leaves no snapshot; wrong credentials, a missing
//! bucket, TLS to a plain-HTTP server and an unreachable endpoint each get their message and exit
//! status; a server that refuses checksum headers (as B2 did) gets none from the generic provider,
//! and one that refuses them after `--s3-checksums always` makes the uploader fall back (logged
//! once) and the backup still lands.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::text;
use shmback_tests::s3_server::S3Server;
use shmback_writer::{Outbox, OutboxOptions, WriteError};

const T: Duration = Duration::from_secs(120);
use common::{S3_AK as AK, S3_SK as SK};

/// The shared in-process S3 server, with the test's key.
fn start_server(root: &Path) -> S3Server {
    S3Server::start(root, 0, AK, SK).unwrap()
}

fn shmback(repo: &str, args: &[&str], secret: &str) -> Command {
    common::shmback_s3(repo, args, secret)
}

fn out(c: &mut Command) -> Output {
    c.output().unwrap()
}

fn tree(root: &Path) {
    for i in 0..30u32 {
        let d = root.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("f{i}")), vec![i as u8; (i as usize * 7919) % 20000]).unwrap();
    }
    // Incompressible and large enough for several packs.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let big: Vec<u8> = (0..(24usize << 20) / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect();
    std::fs::write(root.join("big.bin"), big).unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("d0/f0", root.join("link")).unwrap();
}

/// `shmback run` on a fresh segment, its stderr in `log`; objects of 1 MiB or more go up in
/// multipart uploads (so packs exercise it).
fn uploader(repo: &str, seg: &Path, log: &Path) -> Child {
    uploader_with(repo, seg, log, &[])
}

/// [`uploader`] with more arguments.
fn uploader_with(repo: &str, seg: &Path, log: &Path, more: &[&str]) -> Child {
    let mut args = vec!["run", "--segment", seg.to_str().unwrap(), "--s3-multipart-mib", "1"];
    args.extend_from_slice(more);
    let child = shmback(repo, &args, SK)
        .env("RUST_LOG", "info,shmback_uploader::backends::s3=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !seg.exists() {
        assert!(t.elapsed() < T, "the uploader did not create its segment:\n{}", std::fs::read_to_string(log).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut child: Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > T {
            child.kill().unwrap();
            panic!("the uploader did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send(seg: &Path, src: &Path) -> Result<[u8; 32], WriteError> {
    let mut ob = Outbox::open(seg, OutboxOptions { timeout: T, ..OutboxOptions::default() })?;
    let mut b = ob.batch();
    b.add_dir("data", src)?;
    b.commit()?.wait_durable(T).map(|id| id.0)
}

#[test]
fn ring_to_s3_restores_byte_exact_through_transient_faults() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = start_server(root.path());
    let repo = server.location("bucket/akash/app");
    let o = out(&mut shmback(&repo, &["init"], SK));
    assert!(o.status.success(), "{}", text(&o));
    // restic's layout under the prefix.
    assert!(root.path().join("bucket/akash/app/config").is_file());
    assert!(root.path().join("bucket/akash/app/keys").is_dir());

    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("run.log");
    let up = uploader(&repo, &seg, &log);
    // The first pack uploads answer 503 SlowDown, reads answer 500: retried, and the batch lands.
    server.faults().fail_puts(3, "/data/");
    server.faults().fail_gets(2);
    send(&seg, src.path()).expect("the batch is stored despite the faults");
    // Unchanged: almost nothing new, and it is stored again as a snapshot.
    send(&seg, src.path()).expect("the second batch");
    stop(up);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(server.faults().injected() >= 3, "faults were injected");
    assert!(log.contains("S3 request failed, retrying"), "the retries show in the log:\n{log}");
    assert!(server.faults().parts() > 0, "packs of 1 MiB or more went up in multipart uploads:\n{log}");

    let o = out(&mut shmback(&repo, &["snapshots"], SK));
    assert!(text(&o).contains("2 snapshots"), "{}", text(&o));
    let o = out(&mut shmback(&repo, &["check", "--read-data"], SK));
    assert!(o.status.success(), "{}", text(&o));
    let dest = tempfile::tempdir().unwrap();
    let o = out(&mut shmback(&repo, &["restore", "latest", dest.path().to_str().unwrap()], SK));
    assert!(o.status.success(), "{}", text(&o));
    let (files, _) = shmback_uploader::demo::compare_trees(src.path(), &dest.path().join("data")).unwrap();
    assert_eq!(files, 32);
}

#[test]
fn a_pack_upload_that_keeps_failing_leaves_no_snapshot() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = start_server(root.path());
    let repo = server.location("bucket");
    assert!(out(&mut shmback(&repo, &["init"], SK)).status.success());
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("run.log");
    let up = uploader(&repo, &seg, &log);
    server.faults().fail_puts(u32::MAX, "data/");
    let got = send(&seg, src.path());
    assert!(matches!(got, Err(WriteError::Rejected { .. })), "{got:?}");
    // The uploader keeps serving: with the fault gone, the resend is stored.
    server.faults().fail_puts(0, "data/");
    send(&seg, src.path()).expect("the resend after the fault");
    stop(up);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("batch rejected") && log.contains("S3"), "the log names the storage failure:\n{log}");
    let o = out(&mut shmback(&repo, &["snapshots"], SK));
    assert!(text(&o).contains("1 snapshots"), "only the resend made a snapshot: {}", text(&o));
    let o = out(&mut shmback(&repo, &["check", "--read-data"], SK));
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn credentials_bucket_and_endpoint_errors_are_distinct() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = start_server(root.path());
    // Wrong secret.
    let o = out(&mut shmback(&server.location("bucket"), &["init"], "wrong-secret-0123456789abcdefghijklmnopq"));
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(text(&o).contains("refused the credentials"), "{}", text(&o));
    // Missing bucket, then created on request.
    let o = out(&mut shmback(&server.location("nobucket"), &["init"], SK));
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert!(text(&o).contains("--create-bucket"), "{}", text(&o));
    let o = out(&mut shmback(&server.location("nobucket"), &["init", "--create-bucket"], SK));
    assert!(o.status.success(), "{}", text(&o));
    assert!(root.path().join("nobucket/config").is_file());
    // TLS to a server that speaks plain HTTP: the handshake fails, and the message says how to fix it.
    let o =
        out(&mut shmback(&format!("s3:https://{}/bucket", server.addr()), &["snapshots", "--s3-attempts", "2"], SK));
    assert_eq!(o.status.code(), Some(13), "{}", text(&o));
    assert!(text(&o).contains("TLS") && text(&o).contains("s3:http://"), "{}", text(&o));
    // Nothing listens: unreachable (after bounded retries).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let o = out(&mut shmback(&format!("s3:http://{free}/bucket"), &["snapshots", "--s3-attempts", "3"], SK));
    assert_eq!(o.status.code(), Some(12), "{}", text(&o));
    assert!(text(&o).contains("cannot reach"), "{}", text(&o));
}

/// The warning a fallback from checksum headers logs.
const FALLBACK: &str = "refused checksum headers";

/// Backs `src` up through a ring to `repo` (two batches) with the extra uploader arguments, then
/// checks the repository and restores it byte-exact; returns the uploader's log.
fn backup_and_restore(repo: &str, src: &Path, more: &[&str]) -> String {
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("run.log");
    let up = uploader_with(repo, &seg, &log, more);
    send(&seg, src).expect("the first batch is stored");
    send(&seg, src).expect("the second batch is stored");
    stop(up);
    let log = std::fs::read_to_string(&log).unwrap();
    let o = out(&mut shmback(repo, &["snapshots"], SK));
    assert!(text(&o).contains("2 snapshots"), "{}", text(&o));
    let o = out(&mut shmback(repo, &["check", "--read-data"], SK));
    assert!(o.status.success(), "{}", text(&o));
    let dest = tempfile::tempdir().unwrap();
    let o = out(&mut shmback(repo, &["restore", "latest", dest.path().to_str().unwrap()], SK));
    assert!(o.status.success(), "{}", text(&o));
    let (files, _) = shmback_uploader::demo::compare_trees(src, &dest.path().join("data")).unwrap();
    assert_eq!(files, 32);
    log
}

#[test]
fn the_generic_provider_sends_no_checksum_headers_a_server_may_refuse() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = start_server(root.path());
    // Refuses x-amz-checksum-* and x-amz-trailer from the first request on, as B2 did.
    server.faults().refuse_checksums(true);
    let repo = server.location("bucket/generic");
    let o = out(&mut shmback(&repo, &["init"], SK));
    assert!(o.status.success(), "{}", text(&o));
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let log = backup_and_restore(&repo, src.path(), &[]);
    assert_eq!(server.faults().checksum_refused(), 0, "no request was refused");
    assert_eq!(server.faults().checksum_seen(), 0, "no upload carried a checksum header");
    assert!(server.faults().parts() > 0, "multipart uploads were among them:\n{log}");
    assert!(!log.contains(FALLBACK), "nothing to fall back from:\n{log}");
}

#[test]
fn checksums_opted_in_fall_back_once_when_the_server_refuses_them() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = start_server(root.path());
    let repo = server.location("bucket/always");
    // The control: a server that takes them gets checksum headers on every upload.
    let o = out(&mut shmback(&repo, &["init", "--s3-checksums", "always"], SK));
    assert!(o.status.success(), "{}", text(&o));
    assert!(server.faults().checksum_seen() > 0, "--s3-checksums always sends them");
    assert!(!text(&o).contains(FALLBACK), "{}", text(&o));

    server.faults().refuse_checksums(true);
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    let log = backup_and_restore(&repo, src.path(), &["--s3-checksums", "always"]);
    let refused = server.faults().checksum_refused();
    assert!(refused >= 1, "the server refused the first upload with checksums");
    // Several pack uploads run at once, so more than one may be refused before the switch; the
    // warning is logged once all the same, and every refused upload was retried without them.
    assert_eq!(log.matches(FALLBACK).count(), 1, "{refused} refused, logged once:\n{log}");
    assert!(log.contains("WARN") && log.contains("Unsupported header"), "{log}");
    assert!(server.faults().parts() > 0, "multipart uploads went on without checksums:\n{log}");
}
