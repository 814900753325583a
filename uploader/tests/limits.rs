//! Bandwidth limits: a backup through `shmback run --limit-upload` and a restore with
//! `--limit-download` complete and restore byte-exact, on a local repository and on S3 (the
//! in-process server); the limits also hold for `check --read-data` and `copy`, and a value that
//! is not a number is refused naming the flag. The rates achieved are measured by
//! `benches/limit.py`, not asserted here.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Reaped, fresh_repo, noise, shm_dir, text, wait_exit, wait_for};
use shmback_tests::s3_server::S3Server;
use shmback_writer::{Outbox, OutboxOptions};

const T: Duration = Duration::from_secs(120);
use common::{S3_AK as AK, S3_SK as SK};

/// `shmback ARGS` on `repo` with the test password and the S3 server's credentials (unused by a
/// local repository).
fn shmback(repo: &str, args: &[&str]) -> Command {
    common::shmback_s3(repo, args, SK)
}

fn out(c: &mut Command) -> Output {
    c.output().unwrap()
}

/// The tree backed up: a few small files and 3 MiB that does not compress.
fn tree(root: &Path) {
    for i in 0..20u32 {
        std::fs::write(root.join(format!("f{i}")), vec![i as u8; (i as usize * 4099) % 9000]).unwrap();
    }
    std::fs::write(root.join("big.bin"), noise(9, 3 << 20)).unwrap();
}

/// Backs `src` up through `shmback run` with `run_args`, then restores with `restore_args` and
/// compares; also checks with `check_args`.
fn limited_round_trip(repo: &str, src: &Path, run_args: &[&str], restore_args: &[&str], check_args: &[&str]) {
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("run.log");
    let mut args = vec!["run", "--segment", seg.to_str().unwrap()];
    args.extend_from_slice(run_args);
    let mut up = Reaped(
        shmback(repo, &args).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap(),
    );
    wait_for(&seg);
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    let mut b = ob.batch();
    b.add_dir("data", src).unwrap();
    b.commit().unwrap().wait_durable(T).unwrap();
    drop(ob);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status =
        wait_exit(&mut up.0, T, || format!("the uploader did not stop:\n{}", std::fs::read_to_string(&log).unwrap()));
    assert!(status.success(), "{}", std::fs::read_to_string(&log).unwrap());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("bandwidth limit"), "the limit is announced:\n{log}");

    let dest = tempfile::tempdir().unwrap();
    let mut args = vec!["restore", "latest", dest.path().to_str().unwrap()];
    args.extend_from_slice(restore_args);
    let o = out(&mut shmback(repo, &args));
    assert!(o.status.success(), "{}", text(&o));
    let (files, bytes) = shmback_uploader::demo::compare_trees(src, &dest.path().join("data")).unwrap();
    assert_eq!(files, 21);
    assert!(bytes > 3 << 20, "{bytes}");

    let mut args = vec!["check", "--read-data"];
    args.extend_from_slice(check_args);
    let o = out(&mut shmback(repo, &args));
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_limited_backup_and_restore_on_a_local_repository_are_byte_exact() {
    let (dir, repo) = fresh_repo();
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    // 4 MiB/s each way: about a second per direction for this tree.
    limited_round_trip(
        &repo,
        src.path(),
        &["--limit-upload", "4096"],
        &["--limit-download", "4096"],
        &["--limit-download", "8192"],
    );
    // The limits through their variables, and on both repositories of a copy.
    let target = dir.path().join("copy");
    let o = out(shmback(&repo, &["copy", "--to", target.to_str().unwrap(), "--init-target"])
        .env("SHMBACK_TO_PASSWORD", "pw2")
        .env("SHMBACK_LIMIT_UPLOAD", "4096")
        .env("SHMBACK_LIMIT_DOWNLOAD", "4096"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(", 1 copied"), "{}", text(&o));
    let dest = tempfile::tempdir().unwrap();
    let o = out(shmback(target.to_str().unwrap(), &["restore", "latest", dest.path().to_str().unwrap()])
        .env("RESTIC_PASSWORD", "pw2")
        .env("SHMBACK_LIMIT_DOWNLOAD", "4096"));
    assert!(o.status.success(), "{}", text(&o));
    shmback_uploader::demo::compare_trees(src.path(), &dest.path().join("data")).unwrap();
}

#[test]
fn a_limited_backup_and_restore_on_s3_are_byte_exact() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    let server = S3Server::start(root.path(), 0, AK, SK).unwrap();
    let repo = server.location("bucket/limited");
    let o = out(&mut shmback(&repo, &["init", "--limit-upload", "4096"]));
    assert!(o.status.success(), "{}", text(&o));
    let src = tempfile::tempdir().unwrap();
    tree(src.path());
    limited_round_trip(
        &repo,
        src.path(),
        &["--limit-upload", "4096", "--s3-multipart-mib", "1"],
        &["--limit-download", "4096"],
        &["--limit-download", "8192", "--limit-upload", "1"],
    );
}

#[test]
fn a_limit_that_is_not_a_number_is_refused_naming_the_flag() {
    let o = out(&mut shmback("/nonexistent", &["snapshots", "--limit-upload", "2M"]));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--limit-upload"), "{}", text(&o));
    let o = out(shmback("/nonexistent", &["snapshots"]).env("SHMBACK_LIMIT_DOWNLOAD", "fast"));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--limit-download"), "{}", text(&o));
}
