//! The `shmback` command line: password sources and their errors, `forget` (dry run, policy,
//! prune) on snapshots made by a running `shmback run`, and the help's examples.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shmback_writer::{Outbox, OutboxOptions};

const T: Duration = Duration::from_secs(60);

fn shmback(repo: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
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

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn password_sources_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let o = shmback(&repo, &["init"], &[("RESTIC_PASSWORD_COMMAND", "echo from-command")]);
    assert!(o.status.success(), "{}", text(&o));
    // The same password from a file opens it; a wrong one is named as the likely cause.
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "from-command\n").unwrap();
    let o = shmback(&repo, &["snapshots"], &[("RESTIC_PASSWORD_FILE", pwfile.to_str().unwrap())]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 snapshots"), "{}", text(&o));
    let o = shmback(&repo, &["snapshots"], &[("RESTIC_PASSWORD", "nope")]);
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong password"), "{}", text(&o));
    // The daemon says the same before it serves anything.
    let seg = dir.path().join("never-created-segment");
    let o = shmback(&repo, &["run", "--segment", seg.to_str().unwrap()], &[("RESTIC_PASSWORD", "nope")]);
    assert!(!o.status.success());
    assert!(text(&o).contains("wrong password"), "{}", text(&o));
    // No password at all; two sources that exclude each other; a failing command.
    let o = shmback(&repo, &["snapshots"], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("RESTIC_PASSWORD_FILE or RESTIC_PASSWORD_COMMAND"), "{}", text(&o));
    let o = shmback(
        &repo,
        &["snapshots"],
        &[("RESTIC_PASSWORD_FILE", pwfile.to_str().unwrap()), ("RESTIC_PASSWORD_COMMAND", "echo x")],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("keep one"), "{}", text(&o));
    let o = shmback(&repo, &["snapshots"], &[("RESTIC_PASSWORD_COMMAND", "exit 3")]);
    assert!(!o.status.success());
    assert!(text(&o).contains("password command `exit 3` failed"), "{}", text(&o));
    // No repository.
    let o =
        Command::new(env!("CARGO_BIN_EXE_shmback")).arg("snapshots").env_remove("RESTIC_REPOSITORY").output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("set RESTIC_REPOSITORY"), "{}", text(&o));
}

#[test]
fn forget_applies_the_policy_and_prune_keeps_the_rest_restorable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let pw = [("RESTIC_PASSWORD", "pw")];
    assert!(shmback(&repo, &["init"], &pw).status.success());
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let seg = shm.path().join("seg");
    let mut up = Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--segment", seg.to_str().unwrap()])
        .env("RESTIC_REPOSITORY", &repo)
        .env("RESTIC_PASSWORD", "pw")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ob = Outbox::open(&seg, OutboxOptions { timeout: T, ..OutboxOptions::default() }).unwrap();
    for i in 0..4u8 {
        let mut b = ob.batch();
        // Distinct data per batch, so pruning the old snapshots frees something.
        b.add_bytes("data/file", vec![i; 300_000]).unwrap();
        b.commit().unwrap().wait_durable(T).unwrap();
    }
    drop(ob);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t = Instant::now();
    while up.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < T, "the uploader did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }

    let o = shmback(&repo, &["forget"], &pw);
    assert!(!o.status.success(), "no policy must remove nothing and fail");
    assert!(text(&o).contains("--keep-"), "{}", text(&o));
    let o = shmback(&repo, &["forget", "--keep-last", "2", "--dry-run"], &pw);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("would remove 2 snapshots"), "{}", text(&o));
    assert_eq!(text(&o).matches("\n  remove ").count(), 2, "{}", text(&o));
    assert!(text(&shmback(&repo, &["snapshots"], &pw)).contains("4 snapshots"));

    let o = shmback(&repo, &["forget", "--keep-last", "2", "--prune", "--instant-delete"], &pw);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("removed 2 snapshots"), "{}", text(&o));
    assert!(text(&shmback(&repo, &["snapshots"], &pw)).contains("2 snapshots"));
    let o = shmback(&repo, &["check", "--read-data"], &pw);
    assert!(o.status.success(), "{}", text(&o));
    let dest = dir.path().join("restore");
    let o = shmback(&repo, &["restore", "latest", dest.to_str().unwrap()], &pw);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(dest.join("data/file")).unwrap(), vec![3u8; 300_000]);
}

#[test]
fn every_subcommand_help_has_examples() {
    for sub in ["init", "run", "snapshots", "restore", "check", "forget", "demo"] {
        let o = Command::new(env!("CARGO_BIN_EXE_shmback")).args([sub, "--help"]).output().unwrap();
        assert!(o.status.success());
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("Example") && help.contains(&format!("shmback {sub}")), "{sub}:\n{help}");
    }
}

#[test]
fn repository_locations_are_checked_before_anything_connects() {
    let dir = tempfile::tempdir().unwrap();
    let pw = [("RESTIC_PASSWORD", "pw")];
    // restic's local forms both work.
    let plain = dir.path().join("plain");
    assert!(shmback(&plain, &["init"], &pw).status.success());
    let local = format!("local:{}", plain.display());
    let o = shmback(Path::new(&local), &["snapshots"], &pw);
    assert!(o.status.success(), "{}", text(&o));
    // A malformed location names the problem and the forms; a missing credential names itself.
    let o = shmback(Path::new("s3:host"), &["snapshots"], &pw);
    assert!(!o.status.success());
    assert!(text(&o).contains("no bucket") && text(&o).contains("Forms:"), "{}", text(&o));
    let o = shmback(Path::new("gs:bucket:/p"), &["snapshots"], &pw);
    assert!(!o.status.success());
    assert!(text(&o).contains("GOOGLE_APPLICATION_CREDENTIALS or GOOGLE_ACCESS_TOKEN"), "{}", text(&o));
    let o = shmback(Path::new("sftp:me@host:repo"), &["snapshots"], &pw);
    assert!(!o.status.success());
    assert!(text(&o).contains("sftp:me@host:/home/<user>/repo"), "{}", text(&o));
    // An unreachable REST server is named at once (rustic's client alone retries for half a minute).
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let o = shmback(Path::new(&format!("rest:http://u:secret@{free}/repo")), &["snapshots"], &pw);
    assert!(!o.status.success());
    assert!(text(&o).contains("cannot connect") && text(&o).contains("u:***@"), "{}", text(&o));
    assert!(!text(&o).contains("secret"), "{}", text(&o));
}
