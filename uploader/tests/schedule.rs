//! Scheduled work of `shmback run`, end to end: jobs that run `shmback-send` into the daemon's own
//! segment on `@every 2s` make snapshots and retention keeps what `--keep-last 2` says; a failing
//! job is logged and the daemon goes on; an overlapping run is skipped; a run missed while the
//! daemon was down runs once at the next start; and (in process, reading the metrics) scheduled
//! check and prune run and record `shmback_check_*` / `shmback_prune_*`.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::Parser;
use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use shmback_uploader::schedule::{ScheduleArgs, SchedulerOptions, SystemClock, plain, run_scheduler};

/// `shmback run --segment SEG --state-dir STATE ARGS` on `repo`, logging to `log`.
fn scheduled(repo: &str, seg: &Path, state: &Path, args: &[&str], log: &Path) -> Reaped {
    let child: Child = Command::new(env!("CARGO_BIN_EXE_shmback"))
        .args(["run", "--segment", seg.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PW)
        .env_remove("TZ")
        .env_remove("SHMBACK_TOKEN")
        .env_remove("SHMBACK_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Reaped(child)
}

fn log_text(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits (bounded) until `what` appears `n` times in the log.
fn wait_for_count(log: &Path, what: &str, n: usize) {
    let t = Instant::now();
    while log_text(log).matches(what).count() < n {
        assert!(t.elapsed() < T * 2, "the log never said {what:?} {n} times:\n{}", log_text(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn snapshot_count(repo: &str) -> usize {
    let o = shmback_pw(repo, &["snapshots", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice::<Vec<serde_json::Value>>(&o.stdout).unwrap().len()
}

#[test]
fn jobs_on_every_2s_send_into_the_daemons_segment_and_retention_keeps_the_last_2() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), "scheduled\n").unwrap();
    let log = dir.path().join("log");
    // No -s: the job's SHMBACK_SEGMENT is the daemon's segment.
    let job = format!("snap={} --wait-durable {}", send_bin().display(), data.display());
    let mut up = scheduled(
        &repo,
        &seg,
        &dir.path().join("state"),
        &["--schedule", "@every 2s", "--job", &job, "--keep-last", "2"],
        &log,
    );
    wait_for_count(&log, "job succeeded", 4);
    // Retention runs after each stored snapshot: the count settles at 2 between batches.
    let t = Instant::now();
    while snapshot_count(&repo) != 2 {
        assert!(t.elapsed() < T, "retention never brought the snapshots down to 2:\n{}", log_text(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    let text = log_text(&log);
    assert!(!text.contains("job failed"), "{text}");
    let restored = dir.path().join("restored");
    let o = shmback_pw(&repo, &["restore", "latest", restored.to_str().unwrap()]);
    assert!(o.status.success(), "{}", common::text(&o));
    let stored = restored.join(data.strip_prefix("/").unwrap()).join("a.txt");
    assert_eq!(std::fs::read_to_string(stored).unwrap(), "scheduled\n");
}

#[test]
fn a_failing_job_is_logged_with_its_status_and_stderr_and_the_daemon_goes_on() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let log = dir.path().join("log");
    let mut up = scheduled(
        &repo,
        &shm.path().join("seg"),
        &dir.path().join("state"),
        &["--schedule", "@every 1s", "--job", "bad=echo the-disk-is-gone >&2; exit 7"],
        &log,
    );
    wait_for_count(&log, "exited with status 7", 2);
    assert!(up.0.try_wait().unwrap().is_none(), "the daemon stopped:\n{}", log_text(&log));
    let text = log_text(&log);
    assert!(text.contains("the-disk-is-gone") && text.contains("job failed"), "{text}");
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
}

#[test]
fn with_json_logs_a_jobs_stderr_is_logged_as_json_too() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let log = dir.path().join("log");
    let mut up = scheduled(
        &repo,
        &shm.path().join("seg"),
        &dir.path().join("state"),
        &["--log-format", "json", "--schedule", "@every 1s", "--job", "talk=echo from-the-job >&2"],
        &log,
    );
    wait_for_count(&log, "from-the-job", 2);
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    let text = log_text(&log);
    let mut seen = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}\n{text}"));
        if v["fields"]["message"] == "from-the-job" {
            assert_eq!(v["fields"]["job"], "talk", "{line}");
            seen += 1;
        }
    }
    assert!(seen >= 2, "{text}");
}

#[test]
fn a_run_still_going_when_the_next_is_due_is_skipped() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let log = dir.path().join("log");
    let runs = dir.path().join("runs");
    let job = format!("slow=echo run >> {}; sleep 10", runs.display());
    let mut up = scheduled(
        &repo,
        &shm.path().join("seg"),
        &dir.path().join("state"),
        &["--schedule", "@every 1s", "--job", &job, "--grace", "1"],
        &log,
    );
    wait_for_count(&log, "the previous run is still going", 2);
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1, "one run at a time");
    // On SIGTERM the running job gets --grace (1 s), then is killed; the daemon exits.
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    assert!(log_text(&log).contains("still running after --grace"), "{}", log_text(&log));
}

#[test]
fn a_run_missed_while_the_daemon_was_down_runs_once_at_the_next_start() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let state = dir.path().join("state");
    let marker = dir.path().join("runs");
    let job = format!("m=echo run >> {}", marker.display());
    let args = ["--schedule", "@hourly", "--job", &job];
    let log = dir.path().join("log1");
    let mut up = scheduled(&repo, &shm.path().join("seg"), &state, &args, &log);
    wait_for_log(&log, "scheduled");
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    assert!(!marker.exists(), "not due yet");

    // The daemon was last up three hours ago.
    let file = std::fs::read_dir(&state).unwrap().next().unwrap().unwrap().path();
    let mut s: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let earlier = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(3);
    s["last_due"]["jobs"] = serde_json::Value::String(earlier.to_string());
    std::fs::write(&file, serde_json::to_vec(&s).unwrap()).unwrap();

    let log = dir.path().join("log2");
    let mut up = scheduled(&repo, &shm.path().join("seg"), &state, &args, &log);
    wait_for_log(&log, "job succeeded");
    assert!(log_text(&log).contains("running it once now"), "{}", log_text(&log));
    std::thread::sleep(Duration::from_millis(500));
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n", "once, not three times");

    // Started again at once: nothing was missed, nothing runs.
    let log = dir.path().join("log3");
    let mut up = scheduled(&repo, &shm.path().join("seg"), &state, &args, &log);
    wait_for_log(&log, "scheduled");
    std::thread::sleep(Duration::from_millis(500));
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "run\n");
}

#[test]
fn bad_schedule_flags_fail_at_start_naming_the_accepted_forms() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let log = dir.path().join("log");
    let mut up =
        scheduled(&repo, &shm.path().join("seg"), &dir.path().join("state"), &["--schedule", "every day"], &log);
    let status = wait_exit(&mut up.0, T, || "the daemon did not refuse a bad schedule".into());
    assert!(!status.success());
    let text = log_text(&log);
    assert!(text.contains("@every DURATION") && text.contains("5-field cron"), "{text}");
    let mut up =
        scheduled(&repo, &shm.path().join("seg"), &dir.path().join("state"), &["--prune-schedule", "@daily"], &log);
    let status = wait_exit(&mut up.0, T, || "the daemon did not refuse a prune without a policy".into());
    assert!(!status.success());
    assert!(log_text(&log).contains("--keep-"), "{}", log_text(&log));
}

/// The metrics this test binary records: a recorder installed once, and what it has seen summed
/// up (the recorder's snapshots drain counters and reset gauges; gauges keep their largest value).
fn metric(name: &str, labels: &[(&str, &str)]) -> f64 {
    static STATE: OnceLock<(Snapshotter, Mutex<HashMap<String, f64>>)> = OnceLock::new();
    let (snapshotter, seen) = STATE.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("no other recorder in this test binary");
        (snapshotter, Mutex::new(HashMap::new()))
    });
    let key = |name: &str, labels: &mut Vec<(String, String)>| {
        labels.sort();
        format!("{name}{labels:?}")
    };
    let mut seen = seen.lock().unwrap();
    for (ck, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut l: Vec<_> = ck.key().labels().map(|l| (l.key().to_string(), l.value().to_string())).collect();
        let k = key(ck.key().name(), &mut l);
        let entry = seen.entry(k).or_insert(0.0);
        match value {
            DebugValue::Counter(n) => *entry += n as f64,
            DebugValue::Gauge(g) => *entry = entry.max(g.into_inner()),
            DebugValue::Histogram(v) => *entry += v.len() as f64,
        }
    }
    let mut l: Vec<_> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    seen.get(&key(name, &mut l)).copied().unwrap_or(0.0)
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    args: ScheduleArgs,
}

#[test]
fn scheduled_check_and_prune_run_and_record_their_metrics() {
    metric("warm-up", &[]);
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let server = Server::start(&repo, &seg);
    for _ in 0..3 {
        good_batch(&seg, "data/f.txt").unwrap();
    }
    drop(server.stop());
    assert_eq!(snapshot_count(&repo), 3);

    let flags = Flags::try_parse_from([
        "t",
        "--check-schedule",
        "@every 1s",
        "--check-read-data-subset",
        "50%",
        "--prune-schedule",
        "@every 1s",
        "--keep-last",
        "1",
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ])
    .unwrap();
    flags.args.validate(false).unwrap();
    let config = cfg(&repo);
    let tasks = flags.args.tasks(&config, "host", &[], None).unwrap();
    let state = flags.args.state(&repo).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let opts = SchedulerOptions { tick: Duration::from_millis(50), ..flags.args.options(Duration::from_secs(5)) };
    let sched =
        std::thread::spawn(move || run_scheduler(tasks, Some(state), Arc::new(SystemClock), plain(), &opts, &s));
    let t = Instant::now();
    while metric("shmback_job_runs_total", &[("job", "check"), ("result", "success")]) < 1.0
        || metric("shmback_job_runs_total", &[("job", "prune"), ("result", "success")]) < 1.0
    {
        assert!(t.elapsed() < T * 2, "check and prune did not both succeed: {:?}", shmback_uploader::health::current());
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    sched.join().unwrap();
    assert_eq!(metric("shmback_check_success", &[]), 1.0);
    assert!(metric("shmback_check_last_timestamp_seconds", &[]) > 1.7e9);
    assert!(metric("shmback_prune_last_timestamp_seconds", &[]) > 1.7e9);
    assert_eq!(metric("shmback_forget_removed_snapshots_total", &[]), 2.0, "keep-last 1 of 3");
    assert_eq!(snapshot_count(&repo), 1);
    let health = shmback_uploader::health::current();
    assert!(health.jobs["check"].ok && health.jobs["prune"].ok, "{health:?}");
    let o = shmback_pw(&repo, &["check"]);
    assert!(o.status.success(), "the repository is sound after the scheduled prune: {}", text(&o));
}

#[test]
fn a_failing_scheduled_command_is_counted() {
    metric("warm-up", &[]);
    let dir = tempfile::tempdir().unwrap();
    let flags = Flags::try_parse_from(["t", "--schedule", "@every 1s", "--job", "countedfail=exit 4"]).unwrap();
    flags.args.validate(false).unwrap();
    let tasks = flags.args.tasks(&cfg("/nonexistent"), "host", &[], None).unwrap();
    let state = flags.args.state("/nonexistent").ok();
    drop(dir);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let opts = SchedulerOptions { tick: Duration::from_millis(50), ..flags.args.options(Duration::from_secs(5)) };
    let sched = std::thread::spawn(move || run_scheduler(tasks, state, Arc::new(SystemClock), plain(), &opts, &s));
    let t = Instant::now();
    while metric("shmback_job_runs_total", &[("job", "countedfail"), ("result", "failure")]) < 2.0 {
        assert!(t.elapsed() < T, "the failures were not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    sched.join().unwrap();
    assert!(metric("shmback_job_duration_seconds", &[("job", "countedfail")]) >= 2.0, "a duration per run");
    let h = shmback_uploader::health::current();
    let j = &h.jobs["countedfail"];
    assert!(!j.ok && j.failures_in_a_row >= 2 && j.error.as_deref().unwrap_or("").contains("status 4"), "{j:?}");
}

#[test]
fn with_a_schedule_the_pull_is_a_job_run_on_it() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("p.txt"), "pulled\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _serve = Reaped(
        Command::new(send_bin())
            .args(["--serve", &format!("127.0.0.1:{port}"), data.to_str().unwrap()])
            .env_remove("SHMBACK_TOKEN")
            .env_remove("SHMBACK_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let log = dir.path().join("log");
    let url = format!("http://127.0.0.1:{port}");
    let mut up = scheduled(
        &repo,
        &shm.path().join("seg"),
        &dir.path().join("state"),
        &["--pull", &url, "--schedule", "@every 1s", "--pull-interval", "3600"],
        &log,
    );
    // Two pulls within seconds although --pull-interval says an hour: the schedule decides.
    wait_for_count(&log, "job succeeded job=pull", 2);
    assert!(terminate(&mut up.0).success(), "{}", log_text(&log));
    assert!(snapshot_count(&repo) >= 2);
}

#[test]
fn missed_and_skipped_runs_are_counted_by_reason() {
    metric("warm-up", &[]);
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    let flags = Flags::try_parse_from([
        "t",
        "--schedule",
        "@every 1s",
        "--job",
        "countedslow=sleep 3",
        "--state-dir",
        state_dir.to_str().unwrap(),
    ])
    .unwrap();
    // Last due a minute ago: about 60 runs of `@every 1s` were missed while "down".
    let mut state = flags.args.state("repo").unwrap();
    state.set_last_due("jobs", jiff::Timestamp::now() - jiff::SignedDuration::from_secs(60)).unwrap();
    let tasks = flags.args.tasks(&cfg("/nonexistent"), "host", &[], None).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let opts = SchedulerOptions { tick: Duration::from_millis(50), ..flags.args.options(Duration::from_secs(1)) };
    let sched =
        std::thread::spawn(move || run_scheduler(tasks, Some(state), Arc::new(SystemClock), plain(), &opts, &s));
    let t = Instant::now();
    while metric("shmback_job_missed_total", &[("job", "countedslow"), ("reason", "overlap")]) < 1.0 {
        assert!(t.elapsed() < T, "the skipped run was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    sched.join().unwrap();
    let downtime = metric("shmback_job_missed_total", &[("job", "countedslow"), ("reason", "downtime")]);
    // 60 while down; a loaded machine may add a few runs the scheduler woke up too late for.
    assert!((59.0..70.0).contains(&downtime), "{downtime} runs counted as missed during a minute down");
    // The missed run ran once at start (and was killed at shutdown after its grace period).
    let runs = metric("shmback_job_runs_total", &[("job", "countedslow"), ("result", "failure")])
        + metric("shmback_job_runs_total", &[("job", "countedslow"), ("result", "success")]);
    assert_eq!(runs, 1.0);
}

#[test]
fn as_pid_1_supervising_an_app_the_jobs_statuses_are_still_read() {
    let (dir, repo) = fresh_repo();
    let shm = shm_dir();
    let log = dir.path().join("log");
    let done = dir.path().join("done");
    // The app waits (bounded) until a job failed and one succeeded, then exits; shmback then exits
    // with its status. As PID 1 shmback reaps every child: the jobs' statuses must still reach
    // their runner, or a good job would be reported failed and a failing one unread.
    let app = format!("i=0; until [ -e {d} ] || [ $i -gt 600 ]; do i=$((i+1)); sleep 0.05; done", d = done.display());
    let mut child = Reaped(
        Command::new("unshare")
            .args(["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"])
            .arg(env!("CARGO_BIN_EXE_shmback"))
            .args(["run", "--segment", shm.path().join("seg").to_str().unwrap()])
            .args(["--state-dir", dir.path().join("state").to_str().unwrap()])
            .args(["--schedule", "@every 1s", "--job", "good=true", "--job", "bad=exit 5"])
            .args(["--", "sh", "-c", &app])
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", PW)
            .env_remove("TZ")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("running unshare (util-linux)"),
    );
    wait_for_count(&log, "job succeeded job=good", 3);
    wait_for_count(&log, "exited with status 5", 3);
    std::fs::write(&done, "").unwrap();
    let status = wait_exit(&mut child.0, T, || format!("shmback did not exit with its app:\n{}", log_text(&log)));
    assert!(status.success(), "{}", log_text(&log));
    let text = log_text(&log);
    assert!(!text.contains("could not be read"), "{text}");
    assert!(!text.contains("job failed job=good"), "{text}");
}
