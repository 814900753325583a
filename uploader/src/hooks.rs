//! Hooks, pings and a webhook around every job and every batch `shmback run` settles.
//!
//! - **Hooks** (`--pre-hook`, `--post-hook`): shell commands run with `sh -c`. The pre hook runs
//!   before a job and a failing one fails the job (which is then not run); the post hook runs after
//!   every job, whatever its result, and after every batch, with the outcome in its environment
//!   (`SHMBACK_RESULT`, `SHMBACK_ERROR`, …; see `docs/hooks.md`). Each hook runs in its own process
//!   group, which is killed once `--hook-timeout` has passed; its output goes to the log under the
//!   hook's name.
//! - **Pings** (`--ping-url`, healthchecks.io's protocol): `URL/start` before a job, `URL` on
//!   success and `URL/fail` on failure, with a short body; batches ping success or failure.
//! - **Webhook** (`--webhook-url`): a JSON object per event ([`Event`]), on failures only or on
//!   every event (`--webhook-on`), with an optional bearer token.
//!
//! Nothing here holds up serving: a batch's post hook, pings and webhook calls are queued to
//! worker threads (one per kind, so a receiver that is down delays no hook and no other receiver),
//! each with a bounded queue of [`QUEUE`] events. When a queue is full the new event is dropped
//! for that kind, logged (rate-limited) and counted in `shmback_hook_events_dropped_total{lane}`:
//! a backup is never slowed down by its notifications. HTTP deliveries are retried with backoff
//! on connection errors, 408, 429 and 5xx answers, a bounded number of times; a delivery that
//! still fails is logged (rate-limited) and counted in `shmback_ping_failures_total{target}`.

use std::io::{BufRead as _, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::backends::failure::error_chain;
use crate::serve::BatchOutcome;

/// Events a worker may have waiting; a new one beyond this is dropped (see the module's docs).
pub const QUEUE: usize = 256;
/// Most bytes of a ping's body (healthchecks.io keeps the first 100 kB; an error rarely needs more).
const PING_BODY_MAX: usize = 10_000;
/// Time one HTTP request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// First wait before a delivery is tried again; doubled after each attempt, up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of one delivery.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Failures logged in full per [`LOG_INTERVAL`] and lane; the rest are counted in one line.
const LOG_FULL: u32 = 3;
/// How often a lane's count of failures not logged in full is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Longest line of a hook's output logged as is; the rest of a longer line is cut.
const HOOK_LINE_MAX: usize = 4096;

/// Examples for `shmback run --help`.
pub const HOOK_EXAMPLES: &str = "Hooks, pings and webhook (docs/hooks.md):
  shmback run --post-hook 'logger -t shmback \"$SHMBACK_JOB $SHMBACK_RESULT $SHMBACK_ERROR\"'
  SHMBACK_PING_URL=https://hc-ping.com/UUID shmback run     # healthchecks.io: success/fail
  SHMBACK_WEBHOOK_TOKEN_FILE=/run/secrets/hook shmback run \\
      --webhook-url https://hooks.example/backup --webhook-on always
  shmback run --log-format json                             # one JSON object per log line";

/// When the webhook is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WebhookOn {
    /// Only for failed jobs and rejected batches.
    Failure,
    /// For every job and batch.
    Always,
}

/// The command line of hooks, pings and the webhook (flattened into `shmback run`).
#[derive(Clone, Debug, clap::Args)]
pub struct HookArgs {
    /// Shell command (`sh -c`) run before every scheduled job (batches have none: their producer
    /// starts them); if it fails (non-zero, or past --hook-timeout) the job fails without running.
    #[arg(long, value_name = "CMD", env = "SHMBACK_PRE_HOOK")]
    pub pre_hook: Option<String>,
    /// Shell command run after every job and every batch, successful or not, with the outcome in
    /// its environment (SHMBACK_JOB, SHMBACK_RESULT=success|failure, SHMBACK_ERROR,
    /// SHMBACK_DURATION_SECONDS; for batches also SHMBACK_SOURCE, SHMBACK_SNAPSHOT, SHMBACK_FILES,
    /// SHMBACK_BYTES).
    #[arg(long, value_name = "CMD", env = "SHMBACK_POST_HOOK")]
    pub post_hook: Option<String>,
    /// Seconds a hook may run; then its process group is killed and the hook counts as failed.
    #[arg(long, value_name = "SECONDS", env = "SHMBACK_HOOK_TIMEOUT", default_value_t = 30)]
    pub hook_timeout: u64,
    /// healthchecks.io-style ping URL: URL/start before a job, URL on success, URL/fail on
    /// failure (jobs and batches), each with a short body.
    // Its value is hidden in the help: a ping URL is a credential of its own.
    #[arg(long, value_name = "URL", env = "SHMBACK_PING_URL", hide_env_values = true)]
    pub ping_url: Option<String>,
    /// POST a JSON object per event (job or batch) to this URL (schema in docs/hooks.md); with a
    /// bearer token from SHMBACK_WEBHOOK_TOKEN or --webhook-token-file.
    #[arg(long, value_name = "URL", env = "SHMBACK_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,
    /// Which events go to the webhook: failure (failed jobs, rejected batches) or always.
    #[arg(long, value_enum, env = "SHMBACK_WEBHOOK_ON", default_value_t = WebhookOn::Failure)]
    pub webhook_on: WebhookOn,
    /// File holding the webhook's bearer token (else the SHMBACK_WEBHOOK_TOKEN variable; no flag
    /// for the token itself, it would show in `ps`).
    #[arg(long, value_name = "FILE", env = "SHMBACK_WEBHOOK_TOKEN_FILE")]
    pub webhook_token_file: Option<PathBuf>,
    /// Attempts per ping or webhook call (connection errors, 408, 429 and 5xx are retried, with
    /// a wait of 1 s doubling up to 30 s between them).
    #[arg(long, value_name = "N", env = "SHMBACK_NOTIFY_ATTEMPTS", default_value_t = 5)]
    pub notify_attempts: u32,
}

/// Whether a job or batch succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The job succeeded / the batch was stored.
    Success,
    /// The job failed / the batch was rejected.
    Failure,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

/// One settled job or batch: the webhook's JSON body, and the post hook's environment.
///
/// Every key is always present (`null` where it does not apply), so a receiver can rely on the
/// shape; `schema` changes if a key ever changes meaning.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// Version of this shape (1).
    pub schema: u32,
    /// `job` or `batch`.
    pub event: &'static str,
    /// The job's name (jobs), or `batch`.
    pub job: String,
    /// Where a batch came from: a segment's path, `http:PRODUCER` (batches only).
    pub source: Option<String>,
    /// `success` or `failure` (a rejected batch is a failure).
    pub result: Outcome,
    /// What went wrong (failures only).
    pub error: Option<String>,
    /// The stored snapshot's id, in hex (stored batches only).
    pub snapshot: Option<String>,
    /// The batch's sequence number (batches only).
    pub seq: Option<u64>,
    /// Files in the snapshot (stored batches only).
    pub files: Option<u64>,
    /// Bytes of those files (stored batches only).
    pub bytes: Option<u64>,
    /// Bytes of data new to the repository, before compression (stored batches only).
    pub added_bytes: Option<u64>,
    /// Seconds the job took (hooks included), or from BEGIN to the stored snapshot; `null` for a
    /// rejected batch.
    pub duration_seconds: Option<f64>,
    /// The host name snapshots are recorded under.
    pub host: String,
    /// When it ended (RFC 3339, UTC).
    pub time: String,
}

impl Event {
    /// The event of job `job` ending with `result` after `took`.
    pub fn job(job: &str, result: &anyhow::Result<()>, took: Duration, host: &str) -> Event {
        Event {
            schema: 1,
            event: "job",
            job: job.to_string(),
            source: None,
            result: if result.is_ok() { Outcome::Success } else { Outcome::Failure },
            error: result.as_ref().err().map(|e| format!("{e:#}")),
            snapshot: None,
            seq: None,
            files: None,
            bytes: None,
            added_bytes: None,
            duration_seconds: Some(took.as_secs_f64()),
            host: host.to_string(),
            time: now(),
        }
    }

    /// The event of a batch from `source` settled as `outcome`.
    pub fn batch(source: &str, outcome: &BatchOutcome, host: &str) -> Event {
        let mut e = Event {
            schema: 1,
            event: "batch",
            job: "batch".to_string(),
            source: Some(source.to_string()),
            result: Outcome::Failure,
            error: None,
            snapshot: None,
            seq: None,
            files: None,
            bytes: None,
            added_bytes: None,
            duration_seconds: None,
            host: host.to_string(),
            time: now(),
        };
        match outcome {
            BatchOutcome::Stored { seq, snapshot, elapsed } => {
                e.result = Outcome::Success;
                e.seq = Some(*seq);
                e.snapshot = Some(snapshot.id.to_hex().to_string());
                e.duration_seconds = Some(elapsed.as_secs_f64());
                if let Some(s) = &snapshot.summary {
                    e.files = Some(s.total_files_processed);
                    e.bytes = Some(s.total_bytes_processed);
                    e.added_bytes = Some(s.data_added);
                }
            }
            BatchOutcome::Rejected { seq, why, code } => {
                e.seq = Some(*seq);
                e.error = Some(format!("batch rejected ({code}), no snapshot: {why}"));
            }
        }
        e
    }

    /// The environment a post hook gets for this event (keys absent where the event has no value).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("SHMBACK_HOOK".to_string(), "post".to_string()),
            ("SHMBACK_EVENT".to_string(), self.event.to_string()),
            ("SHMBACK_JOB".to_string(), self.job.clone()),
            ("SHMBACK_RESULT".to_string(), self.result.as_str().to_string()),
            ("SHMBACK_ERROR".to_string(), self.error.clone().unwrap_or_default()),
            ("SHMBACK_HOST".to_string(), self.host.clone()),
        ];
        let optional = [
            ("SHMBACK_DURATION_SECONDS", self.duration_seconds.map(|d| format!("{d:.3}"))),
            ("SHMBACK_SOURCE", self.source.clone()),
            ("SHMBACK_SEQ", self.seq.map(|n| n.to_string())),
            ("SHMBACK_SNAPSHOT", self.snapshot.clone()),
            ("SHMBACK_FILES", self.files.map(|n| n.to_string())),
            ("SHMBACK_BYTES", self.bytes.map(|n| n.to_string())),
            ("SHMBACK_ADDED_BYTES", self.added_bytes.map(|n| n.to_string())),
        ];
        env.extend(optional.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))));
        env
    }

    /// One line for a ping's body: the error of a failure, a summary of a success.
    pub fn summary(&self) -> String {
        if let Some(error) = &self.error {
            return format!("{} failed on {}: {error}", self.what(), self.host);
        }
        let took = self.duration_seconds.map(|d| format!(" in {d:.1} s")).unwrap_or_default();
        match (&self.snapshot, self.files, self.bytes, self.added_bytes) {
            (Some(id), Some(files), Some(bytes), Some(added)) => format!(
                "{} stored as snapshot {} on {}: {files} files, {bytes} bytes ({added} new){took}",
                self.what(),
                &id[..id.len().min(8)],
                self.host
            ),
            (Some(id), ..) => {
                format!("{} stored as snapshot {} on {}{took}", self.what(), &id[..id.len().min(8)], self.host)
            }
            _ => format!("{} succeeded on {}{took}", self.what(), self.host),
        }
    }

    fn what(&self) -> String {
        match (&self.source, self.seq) {
            (Some(source), Some(seq)) => format!("batch {seq} from {source}"),
            (Some(source), None) => format!("batch from {source}"),
            _ => format!("job {}", self.job),
        }
    }
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// `sh` could not be started.
    #[error("the {hook} hook could not be started (`sh -c {command:?}`): {source}; is /bin/sh in the image?")]
    Spawn {
        /// pre or post.
        hook: &'static str,
        /// The command.
        command: String,
        /// The error.
        source: std::io::Error,
    },
    /// It ended with a failure status.
    #[error("the {hook} hook `{command}` failed ({status}); its output is in the log under hook={hook}")]
    Failed {
        /// pre or post.
        hook: &'static str,
        /// The command.
        command: String,
        /// How it ended.
        status: ExitStatus,
    },
    /// It ran past its timeout and was killed.
    #[error(
        "the {hook} hook `{command}` was still running after {timeout:?} and was killed (with its process group); \
         make it faster or raise --hook-timeout"
    )]
    TimedOut {
        /// pre or post.
        hook: &'static str,
        /// The command.
        command: String,
        /// The timeout it ran past.
        timeout: Duration,
    },
    /// Its shell was reaped by another waiter and its status line never came.
    #[error(
        "the {hook} hook `{command}` ended, but its exit status is unknown: its shell was reaped by another \
         waiter and its status line was not read within 5 s; count it as failed and look at its output in the log"
    )]
    Lost {
        /// pre or post.
        hook: &'static str,
        /// The command.
        command: String,
    },
    /// Waiting for it failed.
    #[error("waiting for the {hook} hook `{command}` failed: {source}")]
    Wait {
        /// pre or post.
        hook: &'static str,
        /// The command.
        command: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Runs `command` with `sh -c` in its own process group, with `env` added, its output logged
/// line by line under `hook`; kills the group once `timeout` has passed.
///
/// The hook runs in an inner shell whose status the outer one prints last, behind a marker, on
/// the stdout pipe: as PID 1 (`shmback run -- APP` in a container) shmback reaps every child, so
/// the reaper may collect the outer shell's status before this function does, and the marker is
/// then how the hook's status is known.
pub fn run_hook(
    hook: &'static str,
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
) -> Result<(), HookError> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let marker = format!("shmback-hook-status-{}-{nanos:x}", std::process::id());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("sh -c \"$0\"; s=$?; printf '{marker} %d\\n' \"$s\"; exit \"$s\""))
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so a timeout kills what it started too (`sh -c 'a | b'`, background jobs).
        .process_group(0)
        .spawn()
        .map_err(|source| HookError::Spawn { hook, command: command.to_string(), source })?;
    // Readers are not joined: a process the hook left running may hold the pipes open for longer
    // than the hook; its lines are still logged as they come, and the reader ends with the pipe.
    let (status_tx, status_rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        log_lines(hook, "stdout", out, Some((marker, status_tx)));
    }
    if let Some(err) = child.stderr.take() {
        log_lines(hook, "stderr", err, None);
    }
    let started = Instant::now();
    let failed = |status: ExitStatus| HookError::Failed { hook, command: command.to_string(), status };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() >= timeout => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                // The group may be gone already (ESRCH); the child is reaped below either way.
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait();
                return Err(HookError::TimedOut { hook, command: command.to_string(), timeout });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ECHILD as i32) => {
                // Reaped by someone else (see above): the shell printed the status before it ended.
                let code = status_rx
                    .recv_timeout(STATUS_WAIT)
                    .map_err(|_| HookError::Lost { hook, command: command.to_string() })?;
                break <ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw((code & 0xff) << 8);
            }
            Err(source) => return Err(HookError::Wait { hook, command: command.to_string(), source }),
        }
    };
    if status.success() { Ok(()) } else { Err(failed(status)) }
}

/// How long the status line of a hook whose shell someone else reaped may take to be read.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// Logs what `pipe` carries, line by line, from a thread of its own; with `status`, the code
/// printed behind its marker is sent instead of logged.
fn log_lines(
    hook: &'static str,
    stream: &'static str,
    pipe: impl Read + Send + 'static,
    status: Option<(String, std::sync::mpsc::Sender<i32>)>,
) {
    let spawned = std::thread::Builder::new().name(format!("shmback-hook-{hook}")).spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let mut text = text.trim_end_matches(['\n', '\r']);
                    if let Some((marker, tx)) = &status
                        && let Some((before, code)) = text.rsplit_once(marker.as_str())
                    {
                        let _ = tx.send(code.trim().parse().unwrap_or(-1));
                        text = before;
                        if text.is_empty() {
                            continue;
                        }
                    }
                    let cut = floor_char_boundary(text, HOOK_LINE_MAX);
                    info!(hook, stream, "{}", &text[..cut]);
                }
            }
        }
    });
    if let Err(e) = spawned {
        warn!(hook, "could not start a thread to log the hook's {stream} ({e}); that output is lost");
    }
}

/// The largest index at most `max` that is a char boundary of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// Logs at most [`LOG_FULL`] failures per [`LOG_INTERVAL`] in full, then a count.
struct Limiter {
    since: Instant,
    logged: u32,
    unlogged: u64,
}

impl Limiter {
    fn new() -> Self {
        Limiter { since: Instant::now(), logged: 0, unlogged: 0 }
    }

    /// Whether to log this one in full; also logs the count of an interval that has ended.
    fn allow(&mut self, lane: &str) -> bool {
        if self.since.elapsed() >= LOG_INTERVAL {
            if self.unlogged > 0 {
                warn!(
                    lane,
                    count = self.unlogged,
                    "{} more notification failures in the last {:.0?}",
                    self.unlogged,
                    self.since.elapsed()
                );
            }
            *self = Limiter::new();
        }
        if self.logged < LOG_FULL {
            self.logged += 1;
            true
        } else {
            self.unlogged += 1;
            false
        }
    }
}

/// A worker thread with a bounded queue: events pushed beyond it are dropped, never waited for.
struct Lane<T> {
    name: &'static str,
    tx: Mutex<Option<SyncSender<T>>>,
    /// Events queued or being handled.
    pending: Arc<AtomicUsize>,
    handle: Mutex<Option<JoinHandle<()>>>,
    drops: Mutex<Limiter>,
}

impl<T: Send + 'static> Lane<T> {
    fn spawn(
        name: &'static str,
        capacity: usize,
        mut handle: impl FnMut(T) + Send + 'static,
    ) -> anyhow::Result<Lane<T>> {
        let (tx, rx): (SyncSender<T>, Receiver<T>) = sync_channel(capacity);
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shmback-{name}"))
            .spawn(move || {
                for item in rx {
                    handle(item);
                    left.fetch_sub(1, Ordering::Relaxed);
                }
            })
            .with_context(|| format!("starting the {name} worker thread"))?;
        Ok(Lane {
            name,
            tx: Mutex::new(Some(tx)),
            pending,
            handle: Mutex::new(Some(thread)),
            drops: Mutex::new(Limiter::new()),
        })
    }

    /// Queues `item`, or drops it (counted, logged rate-limited) if the queue is full.
    fn push(&self, item: T) {
        let tx = self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else { return };
        self.pending.fetch_add(1, Ordering::Relaxed);
        let why = match tx.try_send(item) {
            Ok(()) => return,
            Err(TrySendError::Full(_)) => "its queue is full (the receiver or hook is slower than events come)",
            Err(TrySendError::Disconnected(_)) => "its worker has stopped",
        };
        self.pending.fetch_sub(1, Ordering::Relaxed);
        metrics::counter!("shmback_hook_events_dropped_total", "lane" => self.name).increment(1);
        if self.drops.lock().unwrap_or_else(std::sync::PoisonError::into_inner).allow(self.name) {
            warn!(lane = self.name, "an event was dropped for the {}: {why}; serving goes on", self.name);
        }
    }

    /// Stops taking events and waits until `deadline` for the queued ones to be handled; returns
    /// how many were left.
    fn finish(&self, deadline: Instant) -> usize {
        drop(self.tx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take());
        let handle = self.handle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(handle) = handle else { return 0 };
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if handle.is_finished() {
            let _ = handle.join();
            0
        } else {
            self.pending.load(Ordering::Relaxed)
        }
    }
}

/// One HTTP call to make, retried.
struct Delivery {
    url: reqwest::Url,
    content_type: &'static str,
    body: String,
    token: Option<String>,
}

/// Sends `d`, trying again on connection errors, 408, 429 and 5xx, `attempts` times at most.
fn deliver(
    client: &reqwest::blocking::Client,
    d: &Delivery,
    attempts: u32,
    first_wait: Duration,
) -> Result<(), String> {
    let mut wait = first_wait;
    let mut last = String::new();
    for attempt in 1..=attempts.max(1) {
        let mut request = client.post(d.url.clone()).header("content-type", d.content_type).body(d.body.clone());
        if let Some(token) = &d.token {
            request = request.bearer_auth(token);
        }
        match request.send() {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => {
                let status = r.status();
                last = format!("answered {status}");
                let retry = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                if !retry {
                    return Err(format!("{last} (not retried: check the URL and the token)"));
                }
            }
            Err(e) => last = error_chain(&e),
        }
        if attempt < attempts {
            std::thread::sleep(wait);
            wait = (wait * 2).min(RETRY_MAX);
        }
    }
    Err(format!("{last} (after {} attempts)", attempts.max(1)))
}

/// The HTTP lane of one target (`ping` or `webhook`): delivers, counts and logs failures.
fn http_lane(
    target: &'static str,
    client: reqwest::blocking::Client,
    attempts: u32,
    first_wait: Duration,
) -> anyhow::Result<Lane<Delivery>> {
    let mut log = Limiter::new();
    Lane::spawn(target, QUEUE, move |d: Delivery| {
        if let Err(why) = deliver(&client, &d, attempts, first_wait) {
            metrics::counter!("shmback_ping_failures_total", "target" => target).increment(1);
            if log.allow(target) {
                // The URL is not logged: a ping URL is a credential; its host is enough to find it.
                let host = d.url.host_str().unwrap_or("?");
                warn!(target, host, "{target} to {host} not delivered: {why}");
            }
        }
    })
}

/// Hooks, pings and the webhook of `shmback run`, built from [`HookArgs`].
///
/// Cheap to share (`Arc<Hooks>`): [`Hooks::batch`] only queues; [`Hooks::around`] runs the job's
/// hooks on the caller's thread (a job's own thread, never a serving one).
pub struct Hooks {
    pre: Option<String>,
    post: Option<String>,
    timeout: Duration,
    host: String,
    ping_url: Option<reqwest::Url>,
    webhook_on: WebhookOn,
    post_lane: Option<Lane<Event>>,
    ping_lane: Option<Lane<Delivery>>,
    webhook: Option<(reqwest::Url, Option<String>, Lane<Delivery>)>,
}

impl Hooks {
    /// Hooks as `args` ask for them; `host` is the name events carry. Fails on a URL that is not
    /// http(s) and on an unreadable or empty token file.
    pub fn new(args: &HookArgs, host: &str) -> anyhow::Result<Hooks> {
        Self::with_retry_wait(args, host, RETRY_FIRST)
    }

    /// As [`Hooks::new`], with `first_wait` before the first retry of a delivery (tests use a
    /// short one).
    pub fn with_retry_wait(args: &HookArgs, host: &str, first_wait: Duration) -> anyhow::Result<Hooks> {
        let token = match &args.webhook_token_file {
            Some(file) => {
                let t = std::fs::read_to_string(file)
                    .with_context(|| format!("reading the webhook token file {}", file.display()))?;
                let t = t.trim().to_string();
                anyhow::ensure!(
                    !t.is_empty(),
                    "the webhook token file {} is empty: put the token in it",
                    file.display()
                );
                Some(t)
            }
            None => std::env::var("SHMBACK_WEBHOOK_TOKEN").ok().filter(|t| !t.is_empty()),
        };
        let ping_url = args.ping_url.as_deref().map(|u| http_url("--ping-url", u)).transpose()?;
        let webhook_url = args.webhook_url.as_deref().map(|u| http_url("--webhook-url", u)).transpose()?;
        let client = || {
            reqwest::blocking::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .connect_timeout(REQUEST_TIMEOUT)
                .user_agent(concat!("shmback/", env!("CARGO_PKG_VERSION")))
                .build()
                .context("building the HTTP client for pings and the webhook")
        };
        let attempts = args.notify_attempts.max(1);
        let timeout = Duration::from_secs(args.hook_timeout.max(1));
        let post_lane = match &args.post_hook {
            Some(cmd) => {
                let cmd = cmd.clone();
                Some(Lane::spawn("post-hook", QUEUE, move |e: Event| {
                    if let Err(why) = run_hook("post", &cmd, &e.env(), timeout) {
                        metrics::counter!("shmback_hook_failures_total", "hook" => "post").increment(1);
                        error!(hook = "post", source = e.source.as_deref().unwrap_or(""), "{why}");
                    }
                })?)
            }
            None => None,
        };
        let ping_lane = match &ping_url {
            Some(_) => Some(http_lane("ping", client()?, attempts, first_wait)?),
            None => None,
        };
        let webhook = match webhook_url {
            Some(url) => Some((url, token, http_lane("webhook", client()?, attempts, first_wait)?)),
            None => None,
        };
        Ok(Hooks {
            pre: args.pre_hook.clone(),
            post: args.post_hook.clone(),
            timeout,
            host: host.to_string(),
            ping_url,
            webhook_on: args.webhook_on,
            post_lane,
            ping_lane,
            webhook,
        })
    }

    /// Runs job `job` (`f`) between the hooks: pings `/start`, runs the pre hook (if it fails,
    /// `f` is not run and the job fails), runs `f`, runs the post hook with the outcome (whatever
    /// it was; a failing post hook is logged and counted but leaves the job's result as it was),
    /// then queues the ping and webhook of the outcome. Returns the job's result.
    pub fn around(&self, job: &str, f: &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
        let started = Instant::now();
        self.ping(Some("start"), format!("job {job} started on {}", self.host));
        let env = |hook: &str| {
            vec![
                ("SHMBACK_HOOK".to_string(), hook.to_string()),
                ("SHMBACK_EVENT".to_string(), "job".to_string()),
                ("SHMBACK_JOB".to_string(), job.to_string()),
                ("SHMBACK_HOST".to_string(), self.host.clone()),
            ]
        };
        let pre = match &self.pre {
            Some(cmd) => run_hook("pre", cmd, &env("pre"), self.timeout).map_err(|e| {
                metrics::counter!("shmback_hook_failures_total", "hook" => "pre").increment(1);
                anyhow::Error::new(e).context(format!("job {job} was not run: its pre hook failed"))
            }),
            None => Ok(()),
        };
        let result = pre.and_then(|()| f());
        if let Some(cmd) = &self.post {
            // The post hook's duration counts: it is part of the job as the operator sees it.
            let env = Event::job(job, &result, started.elapsed(), &self.host).env();
            if let Err(why) = run_hook("post", cmd, &env, self.timeout) {
                metrics::counter!("shmback_hook_failures_total", "hook" => "post").increment(1);
                error!(hook = "post", job, "{why}");
            }
        }
        self.notify(Event::job(job, &result, started.elapsed(), &self.host));
        result
    }

    /// [`Hooks::around`] in the shape the scheduler takes.
    #[allow(clippy::type_complexity)]
    pub fn wrapper(
        self: Arc<Self>,
    ) -> Arc<dyn Fn(&str, &mut dyn FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> + Send + Sync> {
        Arc::new(move |job: &str, f: &mut dyn FnMut() -> anyhow::Result<()>| self.around(job, f))
    }

    /// A batch from `source` was settled as `outcome`: queues its post hook, ping and webhook
    /// call (never waits; see the module's docs for a full queue).
    pub fn batch(&self, source: &str, outcome: &BatchOutcome) {
        if self.post_lane.is_none() && self.ping_lane.is_none() && self.webhook.is_none() {
            return;
        }
        let event = Event::batch(source, outcome, &self.host);
        if let Some(lane) = &self.post_lane {
            lane.push(event.clone());
        }
        self.notify(event);
    }

    /// Whether any hook, ping or webhook is configured.
    pub fn is_empty(&self) -> bool {
        self.pre.is_none() && self.post.is_none() && self.ping_lane.is_none() && self.webhook.is_none()
    }

    /// Stops taking events and gives those queued until `within` to be delivered (on shutdown);
    /// what is left then is logged and abandoned.
    pub fn finish(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let lanes = [
            self.post_lane.as_ref().map(|l| (l.name, l.finish(deadline))),
            self.ping_lane.as_ref().map(|l| (l.name, l.finish(deadline))),
            self.webhook.as_ref().map(|(_, _, l)| (l.name, l.finish(deadline))),
        ];
        for (lane, left) in lanes.into_iter().flatten() {
            if left > 0 {
                warn!(
                    lane,
                    left,
                    "shutting down with {left} {lane} events not yet delivered after {within:?}; they are dropped"
                );
            }
        }
    }

    /// Queues the ping and the webhook call of `event`.
    fn notify(&self, event: Event) {
        let suffix = match event.result {
            Outcome::Success => None,
            Outcome::Failure => Some("fail"),
        };
        self.ping(suffix, event.summary());
        if let Some((url, token, lane)) = &self.webhook
            && (self.webhook_on == WebhookOn::Always || event.result == Outcome::Failure)
        {
            match serde_json::to_string(&event) {
                Ok(body) => lane.push(Delivery {
                    url: url.clone(),
                    content_type: "application/json",
                    body,
                    token: token.clone(),
                }),
                Err(e) => error!("the webhook's JSON could not be made: {e}"),
            }
        }
    }

    /// Queues a ping to the ping URL with `suffix` (`start`, `fail`, or none for success).
    fn ping(&self, suffix: Option<&'static str>, body: String) {
        let (Some(base), Some(lane)) = (&self.ping_url, &self.ping_lane) else { return };
        let mut body = body;
        body.truncate(floor_char_boundary(&body, PING_BODY_MAX));
        lane.push(Delivery {
            url: ping_url(base, suffix),
            content_type: "text/plain; charset=utf-8",
            body,
            token: None,
        });
    }
}

/// `base` with `suffix` as one more path segment (a trailing `/` and any query kept in place).
fn ping_url(base: &reqwest::Url, suffix: Option<&str>) -> reqwest::Url {
    let mut url = base.clone();
    if let Some(s) = suffix
        && let Ok(mut path) = url.path_segments_mut()
    {
        path.pop_if_empty().push(s);
    }
    url
}

/// `url` parsed, if it is http or https.
fn http_url(flag: &str, url: &str) -> anyhow::Result<reqwest::Url> {
    let parsed: reqwest::Url =
        url.parse().with_context(|| format!("{flag} {url:?}: not a URL (expected e.g. https://hc-ping.com/UUID)"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some(),
        "{flag}: the URL must be http:// or https:// with a host (got scheme {:?})",
        parsed.scheme()
    );
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full queue drops the new event at once (the caller never waits) and counts it.
    #[test]
    fn full_queue_drops_without_waiting() {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let handled = Arc::new(Mutex::new(Vec::new()));
        let seen = handled.clone();
        let lane = Lane::spawn("test", 1, move |n: u32| {
            started_tx.send(n).unwrap();
            let _ = release_rx.recv();
            seen.lock().unwrap().push(n);
        })
        .unwrap();
        lane.push(1);
        // The worker holds 1; the queue (capacity 1) takes 2; 3 and 4 find it full.
        assert_eq!(started_rx.recv_timeout(Duration::from_secs(60)).unwrap(), 1);
        lane.push(2);
        lane.push(3);
        lane.push(4);
        assert_eq!(lane.pending.load(Ordering::Relaxed), 2, "1 handled and 2 queued; 3 and 4 dropped");
        drop(release_tx);
        assert_eq!(lane.finish(Instant::now() + Duration::from_secs(60)), 0);
        assert_eq!(*handled.lock().unwrap(), vec![1, 2]);
    }

    #[test]
    fn ping_body_is_cut_on_a_char_boundary() {
        let s = "é".repeat(10);
        assert_eq!(floor_char_boundary(&s, 5), 4);
        assert_eq!(floor_char_boundary(&s, 100), s.len());
    }

    #[test]
    fn ping_suffixes_go_into_the_path() {
        let url = |u: &str, s| ping_url(&u.parse().unwrap(), s).to_string();
        assert_eq!(url("https://hc-ping.com/abc", Some("start")), "https://hc-ping.com/abc/start");
        assert_eq!(url("https://hc-ping.com/abc/", Some("fail")), "https://hc-ping.com/abc/fail");
        assert_eq!(url("https://hc/ping/key/slug?create=1", Some("fail")), "https://hc/ping/key/slug/fail?create=1");
        assert_eq!(url("https://hc-ping.com/abc?rid=1", None), "https://hc-ping.com/abc?rid=1");
    }

    #[test]
    fn only_http_urls_are_taken() {
        assert!(http_url("--ping-url", "https://hc-ping.com/abc").is_ok());
        let e = http_url("--ping-url", "file:///etc/passwd").unwrap_err().to_string();
        assert!(e.contains("http:// or https://"), "{e}");
        assert!(http_url("--webhook-url", "not a url").is_err());
    }
}
