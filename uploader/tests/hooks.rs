//! Hooks, pings, the webhook and JSON logs: `Hooks::around` and `Hooks::batch` in-process against
//! a local HTTP receiver, and `shmback run` with them end to end (a stored and a rejected batch, a
//! receiver that is down).

mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser as _;
use common::*;
use shmback_proto::RejectCode;
use shmback_proto::frame::FrameKind;
use shmback_uploader::BatchOutcome;
use shmback_uploader::hooks::{HookArgs, Hooks};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("the webhook's body is not JSON ({e}): {}", self.body))
    }
}

/// An HTTP receiver on 127.0.0.1 recording every request; it answers with the statuses of
/// `script` in order, then 200.
struct Receiver {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<Request>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script = Arc::new(Mutex::new(script.to_vec()));
        let (seen, stopping) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (seen, script) = (seen.clone(), script.clone());
                        std::thread::spawn(move || serve_one(conn, &seen, &script));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("the test receiver's accept failed: {e}"),
                }
            }
        });
        Receiver { addr, requests, stop, thread: Some(thread) }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits (bounded) until `n` requests have come; returns them in order of arrival.
    fn wait_for(&self, n: usize) -> Vec<Request> {
        let t = Instant::now();
        loop {
            let got = self.requests.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(t.elapsed() < T, "the receiver got {} requests, not {n}: {got:#?}", got.len());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one HTTP/1.1 request from `conn`, records it and answers with the script's next status.
fn serve_one(conn: TcpStream, seen: &Mutex<Vec<Request>>, script: &Mutex<Vec<u16>>) {
    conn.set_nonblocking(false).unwrap();
    conn.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').expect("a header line without a colon");
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let length: usize =
        headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    seen.lock().unwrap().push(Request { method, path, headers, body: String::from_utf8(body).unwrap() });
    let status = {
        let mut script = script.lock().unwrap();
        if script.is_empty() { 200 } else { script.remove(0) }
    };
    let mut conn = conn;
    let _ = write!(conn, "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
}

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    hooks: HookArgs,
}

/// Hooks from command-line flags (as `shmback run` takes them), retrying after 50 ms.
fn hooks(flags: &[&str]) -> Hooks {
    let args = Args::try_parse_from(std::iter::once("shmback").chain(flags.iter().copied())).unwrap();
    Hooks::with_retry_wait(&args.hooks, "testhost", Duration::from_millis(50)).unwrap()
}

/// The `KEY=VALUE` lines of an env dump, as pairs.
fn env_file(path: &Path) -> Vec<(String, String)> {
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < T, "the post hook never wrote {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    // Written by `env > tmp; mv tmp path`: complete once it exists.
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A post hook writing its SHMBACK_ environment to DIR/NAME, where NAME is built by `name`
/// (shell words, e.g. `$SHMBACK_JOB`).
fn dump_env_hook(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!("env | grep ^SHMBACK_ > {d}/.tmp.$$ && mv {d}/.tmp.$$ {d}/{name}")
}

#[test]
fn a_job_pings_start_then_success_with_a_summary() {
    let rx = Receiver::start(&[]);
    let h = hooks(&["--ping-url", &rx.url("/ping/abc")]);
    let mut ran = false;
    h.around("check", &mut || {
        ran = true;
        Ok(())
    })
    .unwrap();
    assert!(ran);
    let got = rx.wait_for(2);
    assert_eq!((got[0].method.as_str(), got[0].path.as_str()), ("POST", "/ping/abc/start"));
    assert!(got[0].body.contains("job check started on testhost"), "{}", got[0].body);
    assert_eq!(got[1].path, "/ping/abc");
    assert!(got[1].body.contains("job check succeeded on testhost"), "{}", got[1].body);
    h.finish(T);
}

#[test]
fn a_failed_job_pings_fail_with_the_error_and_calls_the_webhook() {
    let (pings, hook) = (Receiver::start(&[]), Receiver::start(&[]));
    let h = hooks(&["--ping-url", &pings.url("/p/"), "--webhook-url", &hook.url("/hook")]);
    // On failures only (the default): the successful job calls no webhook.
    h.around("prune", &mut || Ok(())).unwrap();
    let e = h.around("check", &mut || Err(anyhow::anyhow!("pack 1234 is damaged"))).unwrap_err();
    assert!(e.to_string().contains("pack 1234 is damaged"));
    let got = pings.wait_for(4);
    let paths: Vec<_> = got.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(paths, ["/p/start", "/p/", "/p/start", "/p/fail"]);
    assert!(got[3].body.contains("job check failed on testhost: pack 1234 is damaged"), "{}", got[3].body);
    let calls = hook.wait_for(1);
    h.finish(T);
    let calls_after = hook.requests.lock().unwrap().clone();
    assert_eq!(calls_after.len(), 1, "only the failure goes to the webhook: {calls_after:#?}");
    assert_eq!(calls[0].path, "/hook");
    assert_eq!(calls[0].header("content-type"), Some("application/json"));
    let j = calls[0].json();
    assert_eq!(j["schema"], 1);
    assert_eq!(j["event"], "job");
    assert_eq!(j["job"], "check");
    assert_eq!(j["result"], "failure");
    assert_eq!(j["error"], "pack 1234 is damaged");
    assert_eq!(j["host"], "testhost");
    // Every key is present, null where it does not apply.
    for key in ["source", "snapshot", "seq", "files", "bytes", "added_bytes"] {
        assert!(j[key].is_null() && j.as_object().unwrap().contains_key(key), "{key} in {j}");
    }
    assert!(j["duration_seconds"].as_f64().is_some(), "{j}");
    j["time"].as_str().unwrap().parse::<jiff::Timestamp>().unwrap();
}

#[test]
fn a_failing_pre_hook_fails_the_job_which_is_not_run_and_the_post_hook_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let pings = Receiver::start(&[]);
    let post = dump_env_hook(dir.path(), "$SHMBACK_JOB");
    let h = hooks(&[
        "--pre-hook",
        "echo locking the database; exit 3",
        "--post-hook",
        &post,
        "--ping-url",
        &pings.url("/p"),
    ]);
    let mut ran = false;
    let e = h
        .around("backup", &mut || {
            ran = true;
            Ok(())
        })
        .unwrap_err();
    assert!(!ran, "the job ran although its pre hook failed");
    let msg = format!("{e:#}");
    assert!(msg.contains("job backup was not run: its pre hook failed"), "{msg}");
    assert!(msg.contains("exit status: 3"), "{msg}");
    let env = env_file(&dir.path().join("backup"));
    assert_eq!(get(&env, "SHMBACK_RESULT"), Some("failure"));
    assert!(get(&env, "SHMBACK_ERROR").unwrap().contains("pre hook"), "{env:?}");
    let got = pings.wait_for(2);
    assert_eq!(got[1].path, "/p/fail");
    h.finish(T);
}

#[test]
fn the_post_hook_sees_the_outcome_of_jobs_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let post = dump_env_hook(dir.path(), "${SHMBACK_JOB}-${SHMBACK_RESULT}");
    let pre = format!("echo \"$SHMBACK_HOOK $SHMBACK_JOB\" > {}/pre", dir.path().display());
    let h = hooks(&["--pre-hook", &pre, "--post-hook", &post]);
    h.around("forget", &mut || Ok(())).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("pre")).unwrap(), "pre forget\n");
    let env = env_file(&dir.path().join("forget-success"));
    assert_eq!(get(&env, "SHMBACK_HOOK"), Some("post"));
    assert_eq!(get(&env, "SHMBACK_EVENT"), Some("job"));
    assert_eq!(get(&env, "SHMBACK_JOB"), Some("forget"));
    assert_eq!(get(&env, "SHMBACK_ERROR"), Some(""));
    assert_eq!(get(&env, "SHMBACK_HOST"), Some("testhost"));
    let secs: f64 = get(&env, "SHMBACK_DURATION_SECONDS").unwrap().parse().unwrap();
    assert!(secs >= 0.0);

    h.around("check", &mut || Err(anyhow::anyhow!("the repository is locked"))).unwrap_err();
    let env = env_file(&dir.path().join("check-failure"));
    assert_eq!(get(&env, "SHMBACK_ERROR"), Some("the repository is locked"));

    // A batch's post hook runs on the hook worker, off the caller's thread.
    let rejected =
        BatchOutcome::Rejected { seq: 7, why: "torn: the producer died".into(), code: RejectCode::Malformed };
    h.batch("/dev/shm/app", &rejected);
    let env = env_file(&dir.path().join("batch-failure"));
    assert_eq!(get(&env, "SHMBACK_EVENT"), Some("batch"));
    assert_eq!(get(&env, "SHMBACK_SOURCE"), Some("/dev/shm/app"));
    assert_eq!(get(&env, "SHMBACK_SEQ"), Some("7"));
    assert!(get(&env, "SHMBACK_ERROR").unwrap().contains("torn: the producer died"), "{env:?}");
    assert_eq!(get(&env, "SHMBACK_SNAPSHOT"), None);
    h.finish(T);
}

/// Whether process `pid` has ended (gone, or a zombie waiting for its reaper).
fn ended(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_hung_hook_is_killed_with_its_process_group_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    // The shell starts a child of its own and waits for it: both must go.
    let pre = format!("sleep 600 & echo $! > {}; echo started; wait", pidfile.display());
    let h = hooks(&["--pre-hook", &pre, "--hook-timeout", "1"]);
    let mut ran = false;
    let e = h
        .around("backup", &mut || {
            ran = true;
            Ok(())
        })
        .unwrap_err();
    assert!(!ran);
    let msg = format!("{e:#}");
    assert!(msg.contains("was still running after 1s and was killed"), "{msg}");
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let t = Instant::now();
    while !ended(pid) {
        assert!(t.elapsed() < T, "the hook's child {pid} (sleep 600) outlived the hook's timeout");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_receiver_answering_500_is_retried_until_it_takes_the_call() {
    let hook = Receiver::start(&[500, 503, 200]);
    let h = hooks(&["--webhook-url", &hook.url("/h"), "--webhook-on", "always"]);
    h.around("check", &mut || Ok(())).unwrap();
    let got = hook.wait_for(3);
    assert!(got.iter().all(|r| r.body == got[0].body), "the retries carry the same event: {got:#?}");
    assert_eq!(got[0].json()["result"], "success");
    h.finish(T);
}

#[test]
fn a_4xx_answer_is_not_retried() {
    let hook = Receiver::start(&[404]);
    let h = hooks(&["--webhook-url", &hook.url("/h"), "--webhook-on", "always"]);
    h.around("first", &mut || Ok(())).unwrap();
    h.around("second", &mut || Ok(())).unwrap();
    let got = hook.wait_for(2);
    assert_eq!(got[0].json()["job"], "first");
    assert_eq!(got[1].json()["job"], "second", "the 404 was retried instead of moving on");
    h.finish(T);
}

#[test]
fn the_webhook_carries_the_bearer_token_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let hook = Receiver::start(&[]);
    let h = hooks(&["--webhook-url", &hook.url("/h"), "--webhook-token-file", token.to_str().unwrap()]);
    let rejected = BatchOutcome::Rejected { seq: 2, why: "aborted".into(), code: RejectCode::Aborted };
    h.batch("http:app", &rejected);
    let got = hook.wait_for(1);
    assert_eq!(got[0].header("authorization"), Some("Bearer s3cret"));
    let j = got[0].json();
    assert_eq!(
        (j["event"].as_str(), j["source"].as_str(), j["seq"].as_u64()),
        (Some("batch"), Some("http:app"), Some(2))
    );
    h.finish(T);
}

#[test]
fn bad_settings_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let args = |flags: &[&str]| Args::try_parse_from(std::iter::once("shmback").chain(flags.iter().copied())).unwrap();
    let e =
        Hooks::new(&args(&["--webhook-url", "http://x/h", "--webhook-token-file", empty.to_str().unwrap()]).hooks, "h");
    assert!(e.err().unwrap().to_string().contains("is empty: put the token in it"));
    let e = Hooks::new(&args(&["--ping-url", "ftp://hc/abc"]).hooks, "h");
    assert!(e.err().unwrap().to_string().contains("must be http:// or https://"));
    assert!(Args::try_parse_from(["shmback", "--webhook-on", "sometimes"]).is_err());
}

/// Every line of `log` is a JSON object with a level and a message; returns them.
fn json_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}\nlog:\n{log}"));
            assert!(v["level"].is_string(), "no level: {l}");
            assert!(v["fields"]["message"].is_string(), "no fields.message: {l}");
            v
        })
        .collect()
}

#[test]
fn shmback_run_notifies_each_batch_and_logs_json() {
    let (dir, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    let (pings, hook) = (Receiver::start(&[]), Receiver::start(&[]));
    let envs = dir.path().join("envs");
    std::fs::create_dir(&envs).unwrap();
    let post = dump_env_hook(&envs, "${SHMBACK_SEQ}-${SHMBACK_RESULT}");
    let log = dir.path().join("log");
    let args = [
        "--log-format",
        "json",
        "--post-hook",
        &post,
        "--ping-url",
        &pings.url("/p"),
        "--webhook-url",
        &hook.url("/h"),
        "--webhook-on",
        "always",
    ];
    let mut child = Reaped(daemon(&loc, &seg, &args, &log));
    wait_for(&seg);
    let id = good_batch(&seg, "a.txt").unwrap();
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    send_raw(&seg, &[(FrameKind::Entry, vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])]);

    let calls = hook.wait_for(2);
    let (stored, rejected) = (calls[0].json(), calls[1].json());
    assert_eq!(stored["event"], "batch");
    assert_eq!(stored["result"], "success");
    assert_eq!(stored["snapshot"], id.as_str());
    assert_eq!(stored["source"], seg.to_str().unwrap());
    assert_eq!(stored["files"], 1);
    assert!(stored["error"].is_null());
    assert_eq!(rejected["result"], "failure");
    assert!(rejected["snapshot"].is_null());
    assert!(rejected["error"].as_str().unwrap().contains("batch rejected"), "{rejected}");
    let got = pings.wait_for(2);
    assert_eq!((got[0].path.as_str(), got[1].path.as_str()), ("/p", "/p/fail"));
    assert!(got[0].body.contains(&format!("stored as snapshot {}", &id[..8])), "{}", got[0].body);
    let seq = stored["seq"].as_u64().unwrap();
    let env = env_file(&envs.join(format!("{seq}-success")));
    assert_eq!(get(&env, "SHMBACK_SNAPSHOT"), Some(id.as_str()));
    assert_eq!(get(&env, "SHMBACK_FILES"), Some("1"));
    env_file(&envs.join(format!("{}-failure", rejected["seq"].as_u64().unwrap())));

    assert!(terminate(&mut child.0).success());
    let lines = json_lines(&std::fs::read_to_string(&log).unwrap());
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "batch stored" && l["fields"]["snapshot"].is_string()),
        "no `batch stored` line with its fields: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l["level"] == "WARN"), "the rejection was not logged: {lines:#?}");
}

#[test]
fn receivers_that_are_down_do_not_stop_serving() {
    let (dir, loc) = fresh_repo();
    let shm = shm_dir();
    let seg = shm.path().join("seg");
    // A port nobody listens on: every call is refused.
    let down = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/x", l.local_addr().unwrap())
    };
    let log = dir.path().join("log");
    let args = ["--ping-url", &down, "--webhook-url", &down, "--webhook-on", "always", "--notify-attempts", "2"];
    let mut child = Reaped(daemon(&loc, &seg, &args, &log));
    wait_for(&seg);
    for i in 0..3 {
        good_batch(&seg, &format!("f{i}")).unwrap();
    }
    wait_for_log(&log, "not delivered");
    assert!(terminate(&mut child.0).success(), "{}", std::fs::read_to_string(&log).unwrap());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("ping to 127.0.0.1 not delivered"), "{log}");
    assert!(log.contains("(after 2 attempts)"), "{log}");
    let listed = shmback_pw(&loc, &["snapshots"]);
    assert!(text(&listed).contains("3 snapshots"), "{}", text(&listed));
}
