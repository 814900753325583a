//! The `shmback` command line: password sources and their errors (restic's resolution, empty
//! passwords refused), `forget` (dry run, policy, prune) on snapshots made by a running
//! `shmback run`, the help's examples and what it must not show, exit statuses of backend failures
//! (REST, local), restic's modes for local repositories, clean error and log output.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{shmback, text};
use shmback_writer::{Outbox, OutboxOptions};

const T: Duration = Duration::from_secs(60);

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
    // gs: without a key variable tries the application-default sources (none here: an empty HOME,
    // a metadata server that does not listen) and names them all.
    let no_metadata = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let gs_env = [pw[0], ("HOME", dir.path().to_str().unwrap()), ("GCE_METADATA_HOST", no_metadata.as_str())];
    let o = shmback(Path::new("gs:bucket:/p"), &["snapshots"], &gs_env);
    assert_eq!(o.status.code(), Some(14), "{}", text(&o));
    assert!(text(&o).contains("GOOGLE_ACCESS_TOKEN and GOOGLE_APPLICATION_CREDENTIALS are unset"), "{}", text(&o));
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

/// An HTTP server on 127.0.0.1 answering every request with `status` (at most `n` requests).
fn answering(status: &'static str, n: usize) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        for stream in listener.incoming().take(n) {
            let mut s = stream.unwrap();
            let mut buf = [0u8; 8192];
            let _ = s.read(&mut buf);
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
        }
    });
    (addr, server)
}

#[test]
fn backend_failures_exit_with_their_status_whichever_backend() {
    let dir = tempfile::tempdir().unwrap();
    let pw = [("RESTIC_PASSWORD", "pw")];
    // A REST server refusing the login: 10, as for S3.
    let (addr, server) = answering("401 Unauthorized", 1);
    let o = shmback(Path::new(&format!("rest:http://u:wrong@{addr}/repo")), &["snapshots"], &pw);
    server.join().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(text(&o).contains("refused the credentials (HTTP 401)"), "{}", text(&o));
    // Nothing listens: 12.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let o = shmback(Path::new(&format!("rest:http://{free}/repo")), &["snapshots"], &pw);
    assert_eq!(o.status.code(), Some(12), "{}", text(&o));
    // No repository at a local path: 11, with the fix.
    let o = shmback(&dir.path().join("nothing-here"), &["snapshots"], &pw);
    assert_eq!(o.status.code(), Some(11), "{}", text(&o));
    assert!(text(&o).contains("shmback init"), "{}", text(&o));
    // A missing variable: 14.
    let o = shmback(Path::new("azure:c:/p"), &["snapshots"], &pw);
    assert_eq!(o.status.code(), Some(14), "{}", text(&o));
    assert!(text(&o).contains("AZURE_ACCOUNT_NAME"), "{}", text(&o));
}

#[test]
fn a_local_directory_the_user_may_not_write_is_access_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    let repo = locked.join("repo");
    let mut c = Command::new(env!("CARGO_BIN_EXE_shmback"));
    c.arg("init").env("RESTIC_REPOSITORY", &repo).env("RESTIC_PASSWORD", "pw").stdin(Stdio::null());
    // root may write anywhere: run as nobody then.
    let euid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap());
    if euid == 0 {
        c.uid(65534).gid(65534);
    }
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(text(&o).contains("permission denied") || text(&o).contains("Permission denied"), "{}", text(&o));
    assert!(!repo.exists());
}

#[test]
fn new_local_repositories_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    assert!(shmback(&repo, &["init"], &[("RESTIC_PASSWORD", "pw")]).status.success());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&repo), 0o700);
    assert_eq!(mode(&repo.join("data/ab")), 0o700);
    assert_eq!(mode(&repo.join("config")), 0o400);
    let key = std::fs::read_dir(repo.join("keys")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(mode(&key), 0o400, "keys are nobody else's business");
}

#[test]
fn empty_passwords_are_refused_and_a_broken_source_is_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let empty_file = dir.path().join("empty");
    std::fs::write(&empty_file, "\n").unwrap();
    let missing_file = dir.path().join("missing");
    for (env, names) in [
        (vec![("RESTIC_PASSWORD", "")], "RESTIC_PASSWORD"),
        (vec![("RESTIC_PASSWORD_FILE", empty_file.to_str().unwrap())], empty_file.to_str().unwrap()),
        (vec![("RESTIC_PASSWORD_COMMAND", "true")], "`true`"),
    ] {
        let o = shmback(&repo, &["init"], &env);
        assert!(!o.status.success(), "{env:?}: {}", text(&o));
        assert!(text(&o).contains("an empty password is not a password") && text(&o).contains(names), "{}", text(&o));
        assert!(!repo.exists(), "{env:?} created a repository");
    }
    // restic fails when the file it is told to read is missing, whatever RESTIC_PASSWORD says.
    let o = shmback(
        &repo,
        &["init"],
        &[("RESTIC_PASSWORD", "pw"), ("RESTIC_PASSWORD_FILE", missing_file.to_str().unwrap())],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(missing_file.to_str().unwrap()), "{}", text(&o));
    assert!(!repo.exists());
    // The whole file, trimmed, is the password (as restic reads it).
    let two_lines = dir.path().join("two");
    std::fs::write(&two_lines, "a\nb\n").unwrap();
    assert!(shmback(&repo, &["init"], &[("RESTIC_PASSWORD_FILE", two_lines.to_str().unwrap())]).status.success());
    assert!(shmback(&repo, &["snapshots"], &[("RESTIC_PASSWORD", "a\nb")]).status.success());
}

#[test]
fn secrets_stay_off_the_command_line_and_out_of_the_help() {
    let o = Command::new(env!("CARGO_BIN_EXE_shmback"))
        .arg("--help")
        .env("RESTIC_REPOSITORY", "rest:https://u:rest-url-secret@host:8000/r")
        .env("RESTIC_PASSWORD_COMMAND", "echo command-secret")
        .env("RESTIC_PASSWORD", "password-secret")
        .output()
        .unwrap();
    assert!(o.status.success());
    let help = text(&o);
    for secret in ["rest-url-secret", "command-secret", "password-secret"] {
        assert!(!help.contains(secret), "{secret} in the help:\n{help}");
    }
    assert!(help.contains("Exit status") && help.contains("13  TLS"), "{help}");
    // No flag carries the password (it would show in `ps`).
    let o = Command::new(env!("CARGO_BIN_EXE_shmback")).args(["snapshots", "--password", "x"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("unexpected argument '--password'"), "{}", text(&o));
}

#[test]
fn errors_end_cleanly_and_piped_logs_carry_no_colour() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    assert!(shmback(&repo, &["init"], &[("RESTIC_PASSWORD", "pw")]).status.success());
    // Backtraces off (the default outside a test harness): rustic_core's placeholder section goes.
    let o = shmback(&repo, &["snapshots"], &[("RESTIC_PASSWORD", "nope"), ("RUST_BACKTRACE", "0")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wrong password"), "{err}");
    assert!(!err.contains("Backtrace"), "an empty backtrace section:\n{err}");
    // A failing daemon, its stderr piped: log lines (a segment off tmpfs is warned about, then a
    // second segment cannot be attached), and not one escape code. (A wrong password no longer
    // gets as far as a segment: the repository is opened first.)
    let (seg, missing) = (dir.path().join("seg"), dir.path().join("no/such/dir/seg"));
    let args = ["run", "--segment", seg.to_str().unwrap(), "--segment", missing.to_str().unwrap()];
    let o = shmback(&repo, &args, &[("RESTIC_PASSWORD", "pw")]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(" WARN ") && err.contains("not on tmpfs"), "the log is there:\n{err}");
    assert!(!err.contains('\x1b'), "escape codes in a piped log:\n{err}");
}
