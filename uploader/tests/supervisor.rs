//! `shmback run ... -- APP`: the uploader as its app's supervisor in one container. APP starts
//! once its segment is served, its exit status passes through, signals are passed on (SIGKILL
//! after the grace period), a failing repository stops it, and as PID 1 shmback reaps orphans.
//! `--restore-if-empty` brings an empty directory back from the latest snapshot before APP
//! starts, leaves a full one alone, starts APP on an empty repository, and keeps APP from
//! starting when the restore cannot be done.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use common::{
    PW, T, cfg, daemon, fresh_repo, good_batch, noise, send_batches, shm_dir, stalled_producer, terminate, wait_exit,
    wait_for, wait_for_log,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use shmback_proto::RejectCode;
use shmback_uploader::commands::{check, snapshots};
use shmback_writer::WriteError;

/// Waits (bounded) for `child` to exit by itself.
fn wait_for_exit(child: &mut Child, log: &Path) -> ExitStatus {
    wait_exit(child, T, || format!("shmback did not exit:\n{}", read(log)))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `shmback run --segment SEG ARGS -- sh -c SCRIPT sh DIR`: the script gets DIR as `$1`.
fn supervised(repo: &str, seg: &Path, args: &[&str], script: &str, dir: &Path, log: &Path) -> Child {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--", "sh", "-c", script, "sh", dir.to_str().unwrap()]);
    daemon(repo, seg, &all, log)
}

/// A bounded wait inside an app script: `until CONDITION` for at most 60 s.
fn until(condition: &str) -> String {
    format!("i=0; until {condition}; do i=$((i+1)); [ $i -gt 1200 ] && exit 99; sleep 0.05; done")
}

#[test]
fn the_apps_exit_status_passes_through() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    // USR1 is signal 10: a shell reports an app it killed as 138.
    for (script, status, says) in [
        ("exit 0", 0, "the app exited with status 0"),
        ("exit 3", 3, "the app exited with status 3"),
        ("kill -s USR1 $$", 138, "the app was killed by SIGUSR1 (status 138)"),
    ] {
        let mut child = supervised(&loc, &seg, &[], script, work.path(), &log);
        let got = wait_for_exit(&mut child, &log);
        assert_eq!(got.code(), Some(status), "{script}:\n{}", read(&log));
        assert!(read(&log).contains(says), "{script}: the log says how the app ended:\n{}", read(&log));
    }
}

#[test]
fn the_app_starts_once_its_segment_is_served() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    // The app checks its segment is there (a file with the ring in it) before anything else,
    // then runs until the test says it is done.
    let script = format!(
        "test -s {seg} || exit 42; echo started > \"$1/started\"; {}; exit 7",
        until("[ -e \"$1/done\" ]"),
        seg = seg.display()
    );
    let mut child = supervised(&loc, &seg, &[], &script, work.path(), &log);
    wait_for(&work.path().join("started"));
    // The segment the app found is served while it runs.
    good_batch(&seg, "sent while the app runs").expect("a batch stored while the app runs");
    std::fs::write(work.path().join("done"), "").unwrap();
    let got = wait_for_exit(&mut child, &log);
    assert_eq!(got.code(), Some(7), "{}", read(&log));
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), 1);
}

#[test]
fn signals_are_passed_on_and_a_batch_in_flight_is_settled_cleanly() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let script = format!(
        "trap 'echo > \"$1/got-hup\"' HUP; trap 'echo > \"$1/got-term\"; exit 0' TERM; echo > \"$1/ready\"; {}; exit 9",
        until("false")
    );
    let mut child = supervised(&loc, &seg, &["--grace", "1"], &script, work.path(), &log);
    wait_for(&work.path().join("ready"));
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGHUP).unwrap();
    wait_for(&work.path().join("got-hup"));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP is only passed on: shmback serves on");

    let (stalled, release, slow) = stalled_producer(&seg);
    stalled.recv_timeout(T).expect("the producer started");
    wait_for_log(&log, "batch started");
    let status = terminate(&mut child);
    assert!(work.path().join("got-term").exists(), "the app got SIGTERM:\n{}", read(&log));
    assert_eq!(status.code(), Some(0), "shmback exits with the app's status:\n{}", read(&log));
    release.send(()).unwrap();
    let got = slow.join().unwrap();
    let stored = match got {
        Ok(_) => 1,
        Err(WriteError::UploaderGone) | Err(WriteError::Rejected { code: RejectCode::ShuttingDown, .. }) => 0,
        other => panic!("the batch in flight was neither stored nor cleanly rejected: {other:?}"),
    };
    assert_eq!(snapshots(&cfg(&loc)).unwrap().len(), stored, "a snapshot only of a batch that was acknowledged");
    check(&cfg(&loc), true).unwrap();
}

#[test]
fn an_app_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let script = format!("trap '' TERM; echo > \"$1/ready\"; {}; exit 0", until("false"));
    let mut child = supervised(&loc, &seg, &["--grace", "1"], &script, work.path(), &log);
    wait_for(&work.path().join("ready"));
    let status = terminate(&mut child);
    assert_eq!(status.code(), Some(128 + 9), "killed by SIGKILL:\n{}", read(&log));
    assert!(read(&log).contains("did not exit within"), "{}", read(&log));
}

#[test]
fn a_failing_repository_stops_the_app_and_shmback_exits_with_the_error() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let script = format!("trap 'echo > \"$1/got-term\"; exit 0' TERM; echo > \"$1/ready\"; {}; exit 9", until("false"));
    let mut child = supervised(&loc, &seg, &[], &script, work.path(), &log);
    wait_for(&work.path().join("ready"));
    // A damaged index file: loading the index for the next batch fails, which stops serving
    // (every segment shares the repository).
    std::fs::write(Path::new(&loc).join("index").join("ab".repeat(32)), "not an index").unwrap();
    let got = good_batch(&seg, "x");
    assert!(matches!(got, Err(WriteError::Rejected { code: RejectCode::StorageFailed, .. })), "{got:?}");
    let status = wait_for_exit(&mut child, &log);
    assert!(work.path().join("got-term").exists(), "the app got SIGTERM:\n{}", read(&log));
    assert_eq!(status.code(), Some(1), "{}", read(&log));
    let log = read(&log);
    assert!(log.contains("the repository failed while serving"), "the error is shmback's, not the app's:\n{log}");
}

#[test]
fn as_pid_1_it_reaps_orphaned_processes() {
    let (work, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    // Inside the PID namespace shmback is PID 1. The app leaves an orphan (a subshell whose
    // parent exits at once) that waits for a file, checks it was handed to PID 1, lets it exit,
    // and then waits for it to disappear from /proc: a zombie nobody reaps would stay there.
    let script = r#"[ "$(cat /proc/1/comm)" = shmback ] || { echo "PID 1 is $(cat /proc/1/comm)" >&2; exit 40; }
sh -c '(i=0; until [ -e "$0/go" ] || [ $i -gt 1200 ]; do i=$((i+1)); sleep 0.05; done) & echo $! > "$0/orphan"' "$1"
o=$(cat "$1/orphan")
ppid=$(cut -d' ' -f4 /proc/$o/stat)
[ "$ppid" = 1 ] || { echo "the orphan's parent is $ppid" >&2; exit 41; }
echo > "$1/go"
i=0
while [ -e /proc/$o ]; do
  i=$((i+1)); [ $i -gt 400 ] && { echo "the orphan was not reaped: $(cat /proc/$o/stat)" >&2; exit 44; }; sleep 0.05
done
for s in /proc/[0-9]*/stat; do
  [ "$(cut -d' ' -f3 "$s" 2>/dev/null)" = Z ] && { echo "a zombie is left: $(cat "$s")" >&2; exit 43; }
done
exit 0"#;
    let mut child = Command::new("unshare")
        .args(["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"])
        .arg(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--segment", seg.to_str().unwrap(), "--", "sh", "-c", script, "sh"])
        .arg(work.path())
        .env("RESTIC_REPOSITORY", &loc)
        .env("RESTIC_PASSWORD", PW)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("running unshare (util-linux)");
    let status = wait_for_exit(&mut child, &log);
    assert_eq!(status.code(), Some(0), "{}", read(&log));
    assert!(work.path().join("go").exists(), "the orphan was made and let go:\n{}", read(&log));
}

/// The directory's files, relative paths and contents, sorted (symlinks not followed).
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A path as `shmback-send` stores it: without its leading `/`.
fn stored(p: &Path) -> String {
    p.to_str().unwrap().trim_start_matches('/').to_string()
}

#[test]
fn empty_directories_are_restored_before_the_app_starts_and_full_ones_left_alone() {
    let (work, loc) = fresh_repo();
    let data = work.path().join("data");
    let elsewhere = work.path().join("sent-as-elsewhere");
    let big = noise(7, 700_000);
    let (d, e) = (stored(&data), stored(&elsewhere));
    let (d2, e2, b) = (d.clone(), e.clone(), big.clone());
    send_batches(
        &loc,
        vec![Box::new(move |batch| {
            let (d, e) = (d2, e2);
            batch.add_bytes(format!("{d}/a.txt"), "file a").unwrap();
            batch.add_bytes(format!("{d}/sub/b.bin"), b).unwrap();
            batch.add_bytes(format!("{e}/c.txt"), "file c").unwrap();
        })],
    );
    let id = snapshots(&cfg(&loc)).unwrap()[0].id.to_hex().to_string();

    // Empty as a fresh volume is (lost+found), with what an interrupted restore left.
    std::fs::create_dir_all(data.join("lost+found")).unwrap();
    std::fs::create_dir_all(data.join(".shmback-restore-in-progress/half")).unwrap();
    // Missing, restored from another snapshot path.
    let fresh = work.path().join("fresh/dir");
    // Full: left alone.
    let full = work.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();

    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let specs = [data.display().to_string(), format!("{}:{e}", fresh.display()), format!("{}:{d}", full.display())];
    let mut args = vec![];
    for s in &specs {
        args.extend(["--restore-if-empty", s.as_str()]);
    }
    // The app sees the data when it starts.
    let script = "test -f \"$1/data/sub/b.bin\" && test -f \"$1/fresh/dir/c.txt\" || exit 50";
    let mut child = supervised(&loc, &seg, &args, script, work.path(), &log);
    let status = wait_for_exit(&mut child, &log);
    assert_eq!(status.code(), Some(0), "{}", read(&log));

    assert_eq!(
        tree(&data),
        vec![(PathBuf::from("a.txt"), b"file a".to_vec()), (PathBuf::from("sub/b.bin"), big)],
        "restored byte-exact, at DIR/x (not DIR/data/x), nothing left of the staging directory"
    );
    assert!(data.join("lost+found").is_dir(), "the volume's lost+found stays");
    assert_eq!(tree(&fresh), vec![(PathBuf::from("c.txt"), b"file c".to_vec())]);
    assert_eq!(tree(&full), vec![(PathBuf::from("keep.txt"), b"mine".to_vec())], "a full directory is left alone");
    let log = read(&log);
    assert!(log.contains(&id[..8]) && log.contains("2 files, 700006 bytes"), "the log says what was restored:\n{log}");
    assert!(log.contains("left alone"), "{log}");
}

#[test]
fn on_an_empty_repository_the_app_starts_with_nothing_restored() {
    let (work, loc) = fresh_repo();
    let data = work.path().join("data");
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let spec = data.display().to_string();
    let mut child = supervised(&loc, &seg, &["--restore-if-empty", &spec], "echo > \"$1/started\"", work.path(), &log);
    let status = wait_for_exit(&mut child, &log);
    assert_eq!(status.code(), Some(0), "{}", read(&log));
    assert!(work.path().join("started").exists(), "the app was started");
    assert!(read(&log).contains("nothing to restore: the repository has no snapshot"), "{}", read(&log));
    assert!(!data.exists() || std::fs::read_dir(&data).unwrap().next().is_none(), "nothing restored");
}

#[test]
fn a_restore_that_cannot_be_done_keeps_the_app_from_starting() {
    let (work, loc) = fresh_repo();
    send_batches(&loc, vec![Box::new(|b| b.add_bytes("somewhere/else.txt", "x").unwrap())]);
    let data = work.path().join("data");
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let log = work.path().join("log");
    let spec = data.display().to_string();
    let mut child = supervised(&loc, &seg, &["--restore-if-empty", &spec], "echo > \"$1/started\"", work.path(), &log);
    let status = wait_for_exit(&mut child, &log);
    assert_eq!(status.code(), Some(1), "{}", read(&log));
    assert!(!work.path().join("started").exists(), "the app was not started");
    assert!(!seg.exists(), "nothing was served either");
    let log = read(&log);
    assert!(
        log.contains(&format!("has no `{}`", stored(&data))) && log.contains("the app was not started"),
        "the message names the cause:\n{log}"
    );
    assert!(log.contains(":SNAPSHOT-PATH"), "and the fix:\n{log}");
}
