//! The HTTP transport (PROTOCOL.md, "Over HTTP"): a batch pushed as the body of
//! `POST /v1/batches`, written by the same send pipeline as the ring, streamed through a pipe to
//! the HTTP client on its own thread (no whole-batch buffer), and sent again — files read again —
//! after a dropped connection, 408, 429 or 503, with backoff, until the deadline.

use std::io::{BufWriter, PipeReader, Read};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shmback_proto::{Labels, stream};

use crate::entry_list::Manifest;
use crate::error::WriteError;
use crate::progress::Progress;
use crate::send::{Failure, StreamSink, pipeline};
use crate::ticket::{SnapshotId, Ticket};

/// Who the producer is to the uploader, and the token it shows. See [`crate::Outbox::http`].
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// The uploader's token (`Authorization: Bearer`), or `None` when it has none.
    pub token: Option<String>,
    /// The producer's name (`Shmback-Producer`, 1–128 of `[A-Za-z0-9._-]`): the uploader keeps
    /// one sequence per name, so two producers must not share one.
    pub producer: String,
}

impl HttpOptions {
    /// The options `shmback-send` uses: the token from `SHMBACK_TOKEN` or `SHMBACK_TOKEN_FILE`
    /// ([`token_from_env`]), the producer from `SHMBACK_PRODUCER`, else the host name.
    pub fn from_env() -> Result<HttpOptions, WriteError> {
        let producer = match std::env::var("SHMBACK_PRODUCER") {
            Ok(p) if !p.is_empty() => p,
            _ => default_producer(),
        };
        Ok(HttpOptions { token: token_from_env()?, producer })
    }
}

/// The token from `SHMBACK_TOKEN`, or the content of the file `SHMBACK_TOKEN_FILE` names (its
/// trailing newline trimmed); `None` when neither is set. Both set is an error.
pub fn token_from_env() -> Result<Option<String>, WriteError> {
    let var = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    let token = match (var("SHMBACK_TOKEN"), var("SHMBACK_TOKEN_FILE")) {
        (Some(_), Some(_)) => {
            return Err(WriteError::Config {
                what: "both SHMBACK_TOKEN and SHMBACK_TOKEN_FILE are set: set only one".into(),
            });
        }
        (Some(t), None) => t.into_string().map_err(|_| WriteError::Config {
            what: "SHMBACK_TOKEN is not UTF-8: use a token of printable ASCII".into(),
        })?,
        (None, Some(f)) => {
            let text = std::fs::read_to_string(&f).map_err(|e| WriteError::Config {
                what: format!(
                    "SHMBACK_TOKEN_FILE {}: {e}: point it at a readable file holding the token",
                    Path::new(&f).display()
                ),
            })?;
            text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text).to_string()
        }
        (None, None) => return Ok(None),
    };
    check_token(&token)?;
    Ok(Some(token))
}

fn check_token(token: &str) -> Result<(), WriteError> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WriteError::Config {
            what: "the token is empty or holds spaces, control or non-ASCII characters: use printable ASCII".into(),
        });
    }
    Ok(())
}

/// The host name (from `/proc/sys/kernel/hostname`), as a valid producer name; `producer` when
/// it cannot be read.
pub fn default_producer() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .take(stream::MAX_PRODUCER_LEN)
        .collect();
    if name.is_empty() { "producer".into() } else { name }
}

/// A settled batch, as the uploader reports it: the body of a push's answer, and of
/// `POST /v1/outcome` in pull mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored: the durable ack.
    Stored {
        /// The batch's sequence.
        seq: u64,
        /// The snapshot it was stored as.
        snapshot: SnapshotId,
    },
    /// No snapshot was made.
    Refused {
        /// The batch's sequence (0 when no valid BEGIN arrived).
        seq: u64,
        /// `malformed`, `aborted`, `too-large`, `storage-failed`, `shutting-down`, `idle`, …
        code: String,
        /// The uploader's reason.
        reason: String,
    },
}

impl Outcome {
    /// Parses `{"seq":N,"snapshot":"<64 hex>"}` or `{"seq":N,"code":"…","reason":"…"}`.
    pub fn parse(body: &[u8]) -> Option<Outcome> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let seq = v.get("seq").map_or(Some(0), serde_json::Value::as_u64)?;
        if let Some(s) = v.get("snapshot") {
            return Some(Outcome::Stored { seq, snapshot: parse_id(s.as_str()?)? });
        }
        let code = v.get("code")?.as_str()?.to_string();
        let reason = v.get("reason").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
        Some(Outcome::Refused { seq, code, reason })
    }

    /// The JSON form.
    pub fn to_json(&self) -> String {
        match self {
            Outcome::Stored { seq, snapshot } => serde_json::json!({ "seq": seq, "snapshot": snapshot.to_string() }),
            Outcome::Refused { seq, code, reason } => serde_json::json!({ "seq": seq, "code": code, "reason": reason }),
        }
        .to_string()
    }
}

fn parse_id(hex: &str) -> Option<SnapshotId> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut id = [0u8; 32];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(SnapshotId(id))
}

/// A sequence for a new batch: the milliseconds since the Unix epoch, bumped past `last`.
pub(crate) fn next_seq(last: &mut u64) -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    *last = now.max(*last + 1);
    *last
}

/// The outbox's HTTP client: where batches go and who sends them.
pub(crate) struct HttpClient {
    agent: ureq::Agent,
    /// `base` + [`stream::PUSH_PATH`].
    url: String,
    auth: Option<String>,
    producer: String,
    /// Sequence of the last batch.
    pub(crate) last_seq: u64,
    /// Longest wait for one step (connecting, a stalled write) and the retry budget of a commit.
    timeout: Duration,
}

impl HttpClient {
    pub(crate) fn new(base_url: &str, opts: HttpOptions, timeout: Duration) -> Result<HttpClient, WriteError> {
        let base = base_url.trim_end_matches('/');
        let scheme_ok = base.starts_with("http://") || (cfg!(feature = "tls") && base.starts_with("https://"));
        if !scheme_ok || base.len() <= "http://".len() {
            let what = if base.starts_with("https://") {
                format!(
                    "{base_url:?}: HTTPS needs shmback-writer built with the `tls` feature; use http:// on an internal network"
                )
            } else {
                format!("{base_url:?} is not an http:// URL: give the uploader's address, e.g. http://backup:8700")
            };
            return Err(WriteError::Config { what });
        }
        if !stream::valid_producer_name(&opts.producer) {
            return Err(WriteError::Config {
                what: format!(
                    "producer name {:?} is not 1-128 of [A-Za-z0-9._-]: set SHMBACK_PRODUCER (--producer) to such a name",
                    opts.producer
                ),
            });
        }
        if let Some(t) = &opts.token {
            check_token(t)?;
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(timeout))
            .timeout_send_request(Some(timeout))
            .timeout_per_write(Some(timeout))
            // The answer comes once the batch is stored, which takes as long as the backup.
            .timeout_recv_response(None)
            .timeout_recv_body(Some(timeout))
            .build()
            .into();
        Ok(HttpClient {
            agent,
            url: format!("{base}{}", stream::PUSH_PATH),
            auth: opts.token.map(|t| format!("Bearer {t}")),
            producer: opts.producer,
            last_seq: 0,
            timeout,
        })
    }

    /// Starts one request. The thread reports [`Event::BodyWanted`] when the HTTP client first
    /// reads the body (connected, headers accepted), then the answer.
    fn start(&self) -> Result<(std::io::PipeWriter, Receiver<Event>), WriteError> {
        let (reader, writer) = std::io::pipe().map_err(|e| WriteError::Connection { what: format!("pipe: {e}") })?;
        let (tx, rx) = mpsc::sync_channel(2);
        let body = Body { pipe: reader, wanted: Some(tx.clone()) };
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", stream::CONTENT_TYPE)
            .header(stream::PRODUCER_HEADER, &self.producer)
            // The uploader answers 401, 415 or 429 before the body, so none of it is read for
            // nothing (a stream such as stdin stays unread for the resend).
            .header("Expect", "100-continue");
        if let Some(a) = &self.auth {
            req = req.header("Authorization", a);
        }
        std::thread::Builder::new()
            .name("shmback-http".into())
            .spawn(move || {
                let reply = match req.send(ureq::SendBody::from_owned_reader(body)) {
                    Ok(mut resp) => {
                        let status = resp.status().as_u16();
                        let retry_after = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map(Duration::from_secs);
                        let body = resp.body_mut().with_config().limit(64 << 10).read_to_vec().unwrap_or_default();
                        Reply::Answer { status, body, retry_after }
                    }
                    Err(e) => Reply::Failed { retry: retryable(&e), what: e.to_string() },
                };
                let _ = tx.send(Event::Reply(reply));
            })
            .map_err(|e| WriteError::Connection { what: format!("thread: {e}") })?;
        Ok((writer, rx))
    }
}

fn retryable(e: &ureq::Error) -> bool {
    use ureq::Error as E;
    matches!(e, E::Io(_) | E::Timeout(_) | E::HostNotFound | E::ConnectionFailed | E::Protocol(_) | E::BodyStalled)
}

/// The request body: the read end of the pipe the pipeline writes into.
struct Body {
    pipe: PipeReader,
    /// Told once, at the first read.
    wanted: Option<SyncSender<Event>>,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(tx) = self.wanted.take() {
            let _ = tx.send(Event::BodyWanted);
        }
        self.pipe.read(buf)
    }
}

enum Event {
    /// The HTTP client reads the body: the pipeline may start.
    BodyWanted,
    /// The request ended.
    Reply(Reply),
}

enum Reply {
    Answer { status: u16, body: Vec<u8>, retry_after: Option<Duration> },
    Failed { what: String, retry: bool },
}

enum Step {
    Done(SnapshotId),
    Retry { after: Option<Duration>, why: String },
    Fail(WriteError),
}

fn settle(seq: u64, reply: Reply, url: &str) -> Step {
    let (status, body, retry_after) = match reply {
        Reply::Failed { what, retry: true } => return Step::Retry { after: None, why: what },
        Reply::Failed { what, retry: false } => {
            return Step::Fail(WriteError::Config { what: format!("{url}: {what}: check the URL (SHMBACK_TO)") });
        }
        Reply::Answer { status, body, retry_after } => (status, body, retry_after),
    };
    let outcome = Outcome::parse(&body);
    let (code, reason) = match &outcome {
        Some(Outcome::Refused { code, reason, .. }) => (code.clone(), reason.clone()),
        _ => (String::new(), String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_string()),
    };
    let refused =
        |fix| Step::Fail(WriteError::Refused { seq, status, code: code.clone(), reason: reason.clone(), fix });
    match status {
        200 => match outcome {
            Some(Outcome::Stored { snapshot, .. }) => Step::Done(snapshot),
            _ => refused("the answer carries no snapshot id: is the URL a shmback uploader (`shmback run --listen`)?"),
        },
        401 => Step::Fail(WriteError::Unauthorized),
        400 => refused(
            "run the producer and the uploader from the same shmback release (the uploader's log has the frame)",
        ),
        409 => refused("the batch was aborted; send it again once its sources are stable"),
        413 => refused("split the batch or raise the uploader's limits"),
        415 => refused("run the producer and the uploader from the same shmback release"),
        408 | 429 | 502 | 503 | 504 => {
            Step::Retry { after: retry_after, why: format!("{status} {code} {reason}").trim_end().to_string() }
        }
        _ => refused("is the URL a shmback uploader (`shmback run --listen`)?"),
    }
}

/// Delays between attempts: 200 ms doubling to 5 s, or the uploader's `Retry-After` (at most 30 s).
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: Duration::from_millis(200) }
    }

    /// Sleeps before the next attempt; false when that would pass `deadline`.
    fn sleep(&mut self, retry_after: Option<Duration>, deadline: Instant) -> bool {
        let delay = retry_after.map_or(self.next, |d| d.min(Duration::from_secs(30)));
        self.next = (self.next * 2).min(Duration::from_secs(5));
        if Instant::now() + delay >= deadline {
            return false;
        }
        std::thread::sleep(delay);
        true
    }
}

/// A committed batch over HTTP: what a resend needs, and where its answer arrives.
pub(crate) struct Pending<'o> {
    client: &'o mut HttpClient,
    manifest: Manifest<'o>,
    labels: Labels,
    frame_size: usize,
    seq: u64,
    state: State,
}

enum State {
    /// Not sent yet, or to be sent again.
    Unsent,
    /// The body went out; the answer comes on this channel.
    Waiting(Receiver<Event>),
    /// Answered 200.
    Done(SnapshotId),
}

/// Pushes `manifest` as one batch: returns once its body is sent (or it was refused, or no
/// attempt got through within the client's timeout).
pub(crate) fn send_http<'o>(
    client: &'o mut HttpClient,
    frame_size: usize,
    labels: Labels,
    manifest: Manifest<'o>,
    mut progress: impl FnMut(&Progress),
    start: Instant,
) -> Result<Ticket<'o>, WriteError> {
    let seq = next_seq(&mut client.last_seq);
    let mut pending = Pending { client, manifest, labels, frame_size, seq, state: State::Unsent };
    let sent = pending.send(None, &mut progress)?;
    Ok(Ticket::http(pending, seq, sent, start.elapsed()))
}

impl Pending<'_> {
    /// Sends the batch until one attempt's body is complete (state `Waiting`) or it is answered.
    /// Without a `deadline`, attempts stop the client's timeout after the first failure.
    fn send(&mut self, deadline: Option<Instant>, progress: &mut dyn FnMut(&Progress)) -> Result<Progress, WriteError> {
        let timeout = self.client.timeout;
        let mut backoff = Backoff::new();
        let mut deadline = deadline;
        let started = Instant::now();
        loop {
            if let Some(path) = self.manifest.spent_reader() {
                return Err(WriteError::NotResendable { path });
            }
            self.manifest.refresh_metadata()?;
            let (writer, rx) = self.client.start()?;
            let step = match recv(&rx, timeout + Duration::from_secs(5)) {
                Some(Event::BodyWanted) => {
                    let mut sink = StreamSink::new(BufWriter::with_capacity(64 << 10, writer), self.frame_size);
                    let res = pipeline(
                        &mut sink,
                        self.seq,
                        &self.labels,
                        &mut self.manifest,
                        self.frame_size,
                        true,
                        progress,
                    );
                    // Dropping the writer ends the body (or breaks it, after a failure).
                    drop(sink.into_inner().into_parts().0);
                    match res {
                        Ok(sent) => {
                            self.state = State::Waiting(rx);
                            return Ok(sent);
                        }
                        Err(Failure::Source(e)) => return Err(e),
                        Err(Failure::Sink(WriteError::Connection { .. })) => match recv(&rx, timeout) {
                            Some(Event::Reply(r)) => settle(self.seq, r, &self.client.url),
                            _ => Step::Retry { after: None, why: "the connection dropped mid-body".into() },
                        },
                        Err(Failure::Sink(e)) => return Err(e),
                    }
                }
                Some(Event::Reply(r)) => settle(self.seq, r, &self.client.url),
                None => Step::Retry { after: None, why: "no answer from the HTTP client".into() },
            };
            match step {
                Step::Done(id) => {
                    self.state = State::Done(id);
                    return Ok(self.totals());
                }
                Step::Fail(e) => return Err(e),
                Step::Retry { after, why } => {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                    if !backoff.sleep(after, d) {
                        let url = self.client.url.clone();
                        return Err(WriteError::Unreachable { url, waited: started.elapsed(), last: why });
                    }
                }
            }
        }
    }

    fn totals(&self) -> Progress {
        Progress {
            entries: self.manifest.len() as u64,
            files_total: self.manifest.file_count(),
            files_done: self.manifest.file_count(),
            bytes_total: self.manifest.file_bytes(),
            bytes_done: self.manifest.file_bytes(),
            ..Progress::default()
        }
    }

    /// Waits for the answer, sending the batch again after a dropped connection, 408, 429, 503.
    pub(crate) fn wait(mut self, timeout: Duration) -> Result<SnapshotId, WriteError> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new();
        loop {
            let rx = match std::mem::replace(&mut self.state, State::Unsent) {
                State::Done(id) => return Ok(id),
                State::Waiting(rx) => rx,
                State::Unsent => {
                    self.send(Some(deadline), &mut |_| {})?;
                    continue;
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = loop {
                match rx.recv_timeout(left) {
                    Ok(Event::Reply(r)) => break r,
                    Ok(Event::BodyWanted) => continue,
                    Err(RecvTimeoutError::Timeout) => return Err(WriteError::Timeout(timeout)),
                    Err(RecvTimeoutError::Disconnected) => {
                        break Reply::Failed { what: "the HTTP client stopped".into(), retry: true };
                    }
                }
            };
            match settle(self.seq, reply, &self.client.url) {
                Step::Done(id) => return Ok(id),
                Step::Fail(e) => return Err(e),
                Step::Retry { after, why } => {
                    if !backoff.sleep(after, deadline) {
                        let url = self.client.url.clone();
                        return Err(WriteError::Unreachable { url, waited: timeout, last: why });
                    }
                }
            }
        }
    }
}

fn recv(rx: &Receiver<Event>, timeout: Duration) -> Option<Event> {
    rx.recv_timeout(timeout).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_round_trip_through_json() {
        let stored = Outcome::Stored { seq: 7, snapshot: SnapshotId([0xab; 32]) };
        assert_eq!(Outcome::parse(stored.to_json().as_bytes()), Some(stored));
        let refused = Outcome::Refused { seq: 0, code: "malformed".into(), reason: "bad \"frame\"".into() };
        assert_eq!(Outcome::parse(refused.to_json().as_bytes()), Some(refused));
        assert_eq!(Outcome::parse(br#"{"seq":1,"snapshot":"xyz"}"#), None);
        assert_eq!(Outcome::parse(b"not json"), None);
    }

    #[test]
    fn sequences_increase_even_within_a_millisecond() {
        let mut last = 0;
        let a = next_seq(&mut last);
        let b = next_seq(&mut last);
        assert!(a > 1_600_000_000_000, "milliseconds since the epoch");
        assert!(b > a);
        let mut future = u64::MAX / 2;
        assert_eq!(next_seq(&mut future), u64::MAX / 2 + 1);
    }

    #[test]
    fn statuses_map_to_final_errors_or_resends() {
        let answer = |status, body: &str| Reply::Answer { status, body: body.as_bytes().to_vec(), retry_after: None };
        assert!(matches!(settle(1, answer(401, ""), "u"), Step::Fail(WriteError::Unauthorized)));
        let e = match settle(1, answer(413, r#"{"seq":1,"code":"too-large","reason":"frame"}"#), "u") {
            Step::Fail(e) => e.to_string(),
            _ => panic!("413 is final"),
        };
        assert!(e.contains("too-large") && e.contains("split the batch"), "{e}");
        for s in [408, 429, 503] {
            assert!(matches!(settle(1, answer(s, "{}"), "u"), Step::Retry { .. }), "{s}");
        }
        let ok = format!(r#"{{"seq":1,"snapshot":"{}"}}"#, "01".repeat(32));
        assert!(matches!(settle(1, answer(200, &ok), "u"), Step::Done(id) if id == SnapshotId([1; 32])));
        assert!(matches!(settle(1, answer(404, "nope"), "u"), Step::Fail(WriteError::Refused { status: 404, .. })));
    }

    #[test]
    fn producer_names_and_urls_are_checked() {
        let opts = |p: &str| HttpOptions { token: None, producer: p.into() };
        let t = Duration::from_secs(1);
        assert!(HttpClient::new("http://backup:8700/", opts("app"), t).is_ok());
        let e = HttpClient::new("http://backup:8700", opts("a b"), t).err().unwrap().to_string();
        assert!(e.contains("SHMBACK_PRODUCER"), "{e}");
        let e = HttpClient::new("backup:8700", opts("app"), t).err().unwrap().to_string();
        assert!(e.contains("http://"), "{e}");
        let bad_token = HttpOptions { token: Some("a\r\nX: y".into()), producer: "app".into() };
        assert!(HttpClient::new("http://backup:8700", bad_token, t).is_err());
        assert!(stream::valid_producer_name(&default_producer()));
    }
}
