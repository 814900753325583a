//! The HTTP transport end to end between the two real programs: `shmback-send --to` pushing to
//! `shmback run --listen` (an uploader not up yet, an uploader SIGKILLed mid-body and started
//! again), and `shmback run --pull` fetching from `shmback-send --serve`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `shmback run ARGS` on `repo`, logging to `log`.
fn uploader(repo: &str, args: &[&str], log: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_shmback"))
        .arg("run")
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PW)
        .env("SHMBACK_TOKEN", "tok")
        .env_remove("SHMBACK_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn sender(args: &[&str]) -> Command {
    let mut c = Command::new(send_bin());
    c.args(args).env("SHMBACK_TOKEN", "tok").env_remove("SHMBACK_TOKEN_FILE").stdin(Stdio::null());
    c
}

/// A tree worth sending: a few MiB of noise and small text files.
fn tree(dir: &Path, big: usize) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("big.bin"), noise(11, big)).unwrap();
    for i in 0..20 {
        std::fs::write(src.join("sub").join(format!("f{i}.txt")), format!("file {i}\n").repeat(i + 1)).unwrap();
    }
    src
}

fn assert_restored_equal(dir: &Path, repo: &str, src: &Path, name: &str) {
    let dest = dir.join(name);
    let o = shmback_pw(repo, &["restore", "latest", dest.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let stored = dest.join(src.strip_prefix("/").unwrap());
    let d = Command::new("diff").args(["-r", "--no-dereference"]).arg(src).arg(&stored).output().unwrap();
    assert!(d.status.success(), "restore differs: {}", text(&d));
}

/// Waits (bounded) for `child` to exit; its status and what it printed on stdout.
fn exited(child: &mut Child) -> std::process::Output {
    let status = wait_exit(child, T * 3, || "the process did not exit".into());
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    }
    std::process::Output { status, stdout: out.into_bytes(), stderr: vec![] }
}

#[test]
fn shmback_send_to_waits_for_the_uploader_and_resends_after_it_was_killed_mid_body() {
    let (dir, repo) = fresh_repo();
    let src = tree(dir.path(), 96 << 20);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // The producer starts first: nobody listens yet; it keeps trying.
    let mut send = Reaped(
        sender(&["--to", &url, "--wait-durable", "--timeout", "180", src.to_str().unwrap()])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let log1 = dir.path().join("up1.log");
    let mut up = Reaped(uploader(&repo, &["--listen", &format!("127.0.0.1:{port}")], &log1));
    // Killed once the batch's data is flowing: no snapshot from this one.
    wait_for_log(&log1, "batch started");
    up.0.kill().unwrap();
    up.0.wait().unwrap();
    let first = std::fs::read_to_string(&log1).unwrap();
    assert!(!first.contains("batch stored"), "the batch finished before the kill; the test proves nothing:\n{first}");
    let log2 = dir.path().join("up2.log");
    let mut up = Reaped(uploader(&repo, &["--listen", &format!("127.0.0.1:{port}")], &log2));
    let out = exited(&mut send.0);
    assert!(out.status.success(), "shmback-send: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let id = said.rsplit("snapshot ").next().unwrap().trim().to_string();
    assert_eq!(id.len(), 64, "{said}");
    assert!(terminate(&mut up.0).success());
    let snaps = shmback_pw(&repo, &["snapshots", "--json"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&snaps.stdout).unwrap();
    assert_eq!(list.len(), 1, "one snapshot, from the resent body");
    assert_eq!(list[0]["id"].as_str(), Some(id.as_str()));
    assert_restored_equal(dir.path(), &repo, &src, "r");
}

#[test]
fn run_pull_fetches_a_batch_from_shmback_send_serve_and_tells_it_the_outcome() {
    let (dir, repo) = fresh_repo();
    let src = tree(dir.path(), 3 << 20);
    let port = free_port();
    let mut serve = Reaped(
        sender(&["--serve", &format!("127.0.0.1:{port}"), "--once", src.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = dir.path().join("up.log");
    let mut up =
        Reaped(uploader(&repo, &["--pull", &format!("http://127.0.0.1:{port}"), "--pull-interval", "3600"], &log));
    let out = exited(&mut serve.0);
    assert!(out.status.success(), "shmback-send --serve: {}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("stored as snapshot"), "{said}");
    assert!(terminate(&mut up.0).success());
    assert_restored_equal(dir.path(), &repo, &src, "r");
    // A wrong token: the puller says so and stores nothing more.
    let port = free_port();
    let serve = Reaped(
        sender(&["--serve", &format!("127.0.0.1:{port}"), src.to_str().unwrap()])
            .env("SHMBACK_TOKEN", "other")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = dir.path().join("up2.log");
    let mut up = Reaped(uploader(&repo, &["--pull", &format!("http://127.0.0.1:{port}")], &log));
    wait_for_log(&log, "refused the token");
    assert!(terminate(&mut up.0).success());
    drop(serve);
    let snaps = shmback_pw(&repo, &["snapshots", "--json"]);
    assert_eq!(serde_json::from_slice::<Vec<serde_json::Value>>(&snaps.stdout).unwrap().len(), 1);
}
