//! `shmback-send --serve ADDR PATHS...`: pull mode (PROTOCOL.md, "Over HTTP"). Each
//! `GET /v1/batch` is answered with a new batch of PATHS streamed as the body; the uploader
//! reports the outcome with `POST /v1/outcome`.
//!
//! A small HTTP/1.1 server of our own rather than a library's: the request head is read under a
//! size cap (16 KiB) and a deadline (10 s), and connections are capped, so a slow or hostile
//! client cannot hold a thread or memory for long. One request per connection.

use std::collections::HashSet;
use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{SigSet, Signal};
use shmback_proto::stream;
use shmback_writer::{Outbox, Outcome, WriteError};

/// Largest request head.
const MAX_HEAD: usize = 16 << 10;
/// Longest time to receive a request head (or an outcome body).
const HEAD_TIME: Duration = Duration::from_secs(10);
/// Largest outcome body.
const MAX_OUTCOME: usize = 64 << 10;
/// Connections handled at once; more are closed at once.
const MAX_CONNECTIONS: usize = 16;

/// Adds the served PATHs to a new batch.
pub type Fill = Box<dyn Fn(&mut shmback_writer::Batch<'_>) -> Result<(), WriteError> + Send + Sync>;

/// What the server needs.
pub struct Serve {
    /// Address to listen on.
    pub addr: String,
    /// `Authorization: Bearer` token required, if any.
    pub token: Option<String>,
    /// Name sent as `Shmback-Producer`.
    pub producer: String,
    /// Exit after the first settled outcome.
    pub once: bool,
    /// Socket write timeout while a batch is sent.
    pub timeout: Duration,
    /// Builds one batch into the outbox's new batch.
    pub fill: Fill,
    /// Detached outbox the batches are made from (its labels, its sequence).
    pub outbox: Outbox,
}

enum Event {
    Signal(Signal),
    Outcome(Outcome),
    /// A send has ended (sent or not): outcomes that arrived while it was ending can be settled.
    SendEnded,
}

/// Outcomes kept while a send ends: the uploader may post a batch's outcome as soon as it has the
/// last chunk, before the sending thread has recorded the batch as sent.
const PENDING_OUTCOMES: usize = 16;

struct Shared {
    token: Option<String>,
    producer: String,
    timeout: Duration,
    fill: Fill,
    outbox: Mutex<Outbox>,
    busy: AtomicBool,
    connections: AtomicUsize,
    /// Sequences of batches sent whole.
    sent: Mutex<HashSet<u64>>,
    /// The exit status and message of the last batch a source failure aborted.
    aborted: Mutex<Option<(u8, String)>>,
    events: Sender<Event>,
}

/// Runs the server until SIGTERM/SIGINT (exit 0) or, with `once`, the first settled outcome
/// (its exit status). Errors before serving (bind, signals) are `Err`.
pub fn run(cfg: Serve) -> Result<u8, String> {
    // Blocked before any thread starts, so every thread inherits the mask and the signal thread
    // alone receives them (sigwait: no handler, no unsafe).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(|e| format!("cannot block SIGTERM/SIGINT: {e}"))?;
    let listener = TcpListener::bind(&cfg.addr)
        .map_err(|e| format!("cannot listen on {}: {e}: give a free local address, e.g. 0.0.0.0:8701", cfg.addr))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel();
    let sig_tx = tx.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = signals.wait() {
            let _ = sig_tx.send(Event::Signal(sig));
        }
    });
    let shared = Arc::new(Shared {
        token: cfg.token,
        producer: cfg.producer,
        timeout: cfg.timeout,
        fill: cfg.fill,
        outbox: Mutex::new(cfg.outbox),
        busy: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        sent: Mutex::new(HashSet::new()),
        aborted: Mutex::new(None),
        events: tx,
    });
    let accept = Arc::clone(&shared);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            if accept.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                accept.connections.fetch_sub(1, Ordering::AcqRel);
                continue; // dropped: closed at once
            }
            let shared = Arc::clone(&accept);
            std::thread::spawn(move || {
                handle(&shared, conn);
                shared.connections.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    eprintln!("shmback-send: serving batches on http://{addr}{} (pull mode)", stream::PULL_PATH);
    let mut pending: Vec<Outcome> = Vec::new();
    for ev in rx {
        let outcomes = match ev {
            Event::Signal(sig) => {
                eprintln!("shmback-send: {sig}: stopping");
                return Ok(0);
            }
            // For a batch not recorded as sent while a send is going on: kept until it ends.
            Event::Outcome(o)
                if shared.busy.load(Ordering::Acquire)
                    && !shared.sent.lock().expect("sent").contains(&outcome_seq(&o)) =>
            {
                if pending.len() < PENDING_OUTCOMES {
                    pending.push(o);
                }
                continue;
            }
            Event::Outcome(o) => vec![o],
            Event::SendEnded => std::mem::take(&mut pending),
        };
        for o in outcomes {
            if let Some(status) = settle(&shared, &o)
                && cfg.once
            {
                return Ok(status);
            }
        }
    }
    Ok(1)
}

/// The batch an outcome is about.
fn outcome_seq(o: &Outcome) -> u64 {
    match o {
        Outcome::Stored { seq, .. } | Outcome::Refused { seq, .. } => *seq,
    }
}

/// Logs an outcome; its exit status when it settles the batch.
fn settle(shared: &Shared, o: &Outcome) -> Option<u8> {
    match o {
        Outcome::Stored { seq, snapshot } => {
            if !shared.sent.lock().expect("sent").contains(seq) {
                eprintln!("shmback-send: outcome for batch {seq}, which this process did not send: ignored");
                return None;
            }
            println!("batch {seq} stored as snapshot {snapshot}");
            Some(0)
        }
        Outcome::Refused { seq, code, reason } => {
            eprintln!("shmback-send: batch {seq} rejected: {code}: {reason}");
            match code.as_str() {
                // Not settled: the uploader pulls again.
                "storage-failed" | "shutting-down" | "idle" | "busy" => None,
                "aborted" => Some(shared.aborted.lock().expect("aborted").take().map_or(5, |(status, why)| {
                    eprintln!("shmback-send: {why}");
                    status
                })),
                _ => Some(5),
            }
        }
    }
}

/// A request head.
struct Head {
    method: String,
    path: String,
    authorization: Option<Vec<u8>>,
    content_length: Option<usize>,
    expect_continue: bool,
    /// Body bytes read along with the head.
    rest: Vec<u8>,
}

enum HeadError {
    /// Closed, timed out or unreadable: drop the connection silently.
    Gone,
    TooLarge,
    Malformed,
}

fn read_head(conn: &mut TcpStream) -> Result<Head, HeadError> {
    let start = Instant::now();
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let left = HEAD_TIME.checked_sub(start.elapsed()).ok_or(HeadError::Gone)?;
        conn.set_read_timeout(Some(left.max(Duration::from_millis(1)))).map_err(|_| HeadError::Gone)?;
        let n = conn.read(&mut chunk).map_err(|_| HeadError::Gone)?;
        if n == 0 {
            return Err(HeadError::Gone);
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let find = |name: &str| req.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
                let content_length = match find("content-length") {
                    Some(v) => Some(
                        std::str::from_utf8(v).ok().and_then(|v| v.trim().parse().ok()).ok_or(HeadError::Malformed)?,
                    ),
                    None => None,
                };
                if find("transfer-encoding").is_some() {
                    return Err(HeadError::Malformed); // outcomes are small: Content-Length only
                }
                return Ok(Head {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    authorization: find("authorization").map(<[u8]>::to_vec),
                    content_length,
                    expect_continue: find("expect").is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue")),
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err(HeadError::TooLarge),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let ctype = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\n{ctype}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.flush();
}

fn json(code: &str, reason: &str) -> String {
    serde_json::json!({ "code": code, "reason": reason }).to_string()
}

fn authorized(shared: &Shared, head: &Head) -> bool {
    let Some(token) = &shared.token else { return true };
    let given = head.authorization.as_deref().and_then(|v| v.strip_prefix(b"Bearer ")).unwrap_or(b"");
    stream::token_matches(token.as_bytes(), given)
}

fn handle(shared: &Shared, mut conn: TcpStream) {
    let head = match read_head(&mut conn) {
        Ok(h) => h,
        Err(HeadError::Gone) => return,
        Err(HeadError::TooLarge) => {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "",
                &json("too-large", "request head over 16 KiB"),
            );
        }
        Err(HeadError::Malformed) => {
            return respond(&mut conn, "400 Bad Request", "", &json("malformed", "unreadable request head"));
        }
    };
    if !authorized(shared, &head) {
        return respond(&mut conn, "401 Unauthorized", "", "");
    }
    let _ = conn.set_write_timeout(Some(shared.timeout));
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", stream::PULL_PATH) => send_batch(shared, conn),
        ("POST", stream::OUTCOME_PATH) => outcome(shared, conn, head),
        _ => respond(&mut conn, "404 Not Found", "", ""),
    }
}

fn send_batch(shared: &Shared, mut conn: TcpStream) {
    if shared.busy.swap(true, Ordering::AcqRel) {
        let busy = json("busy", "a batch is being sent: ask again once it is done");
        return respond(&mut conn, "429 Too Many Requests", "Retry-After: 5\r\n", &busy);
    }
    let mut outbox = shared.outbox.lock().expect("outbox");
    let mut batch = outbox.batch();
    if let Err(e) = (shared.fill)(&mut batch) {
        drop(batch);
        drop(outbox);
        shared.busy.store(false, Ordering::Release);
        eprintln!("shmback-send: cannot build a batch: {e}");
        let why = json("source-error", &format!("{e}"));
        return respond(&mut conn, "503 Service Unavailable", "Retry-After: 60\r\n", &why);
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\n{}: {}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        stream::CONTENT_TYPE,
        "Shmback-Producer",
        shared.producer
    );
    let mut body = Chunked(BufWriter::with_capacity(64 << 10, &conn));
    let res = body.0.write_all(head.as_bytes()).map_err(|e| WriteError::Connection { what: e.to_string() });
    let res = res.and_then(|()| batch.write_to(&mut body));
    let res =
        res.and_then(|sent| body.finish().map(|()| sent).map_err(|e| WriteError::Connection { what: e.to_string() }));
    drop(body);
    drop(outbox);
    match res {
        Ok((seq, p)) => {
            shared.sent.lock().expect("sent").insert(seq);
            eprintln!(
                "shmback-send: batch {seq} sent: {} entries, {} files, {} bytes",
                p.entries, p.files_total, p.bytes_done
            );
        }
        Err(e @ (WriteError::SourceChanged { .. } | WriteError::Io { .. })) => {
            eprintln!("shmback-send: batch aborted: {e}");
            *shared.aborted.lock().expect("aborted") = Some((6, e.to_string()));
            let _ = Chunked(&conn).finish();
        }
        Err(e) => eprintln!("shmback-send: batch not sent: {e}"),
    }
    shared.busy.store(false, Ordering::Release);
    let _ = shared.events.send(Event::SendEnded);
}

fn outcome(shared: &Shared, mut conn: TcpStream, head: Head) {
    let Some(len) = head.content_length else {
        return respond(
            &mut conn,
            "411 Length Required",
            "",
            &json("malformed", "send the outcome with Content-Length"),
        );
    };
    if len > MAX_OUTCOME {
        return respond(&mut conn, "413 Content Too Large", "", &json("too-large", "outcome over 64 KiB"));
    }
    if head.expect_continue && head.rest.len() < len {
        let _ = conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    let mut body = head.rest;
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    while body.len() < len {
        let Some(left) = HEAD_TIME.checked_sub(start.elapsed()) else { return };
        if conn.set_read_timeout(Some(left.max(Duration::from_millis(1)))).is_err() {
            return;
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(len);
    match Outcome::parse(&body) {
        Some(o) => {
            respond(&mut conn, "204 No Content", "", "");
            let _ = shared.events.send(Event::Outcome(o));
        }
        None => respond(
            &mut conn,
            "400 Bad Request",
            "",
            &json("malformed", r#"expected {"seq":N,"snapshot":"<64 hex>"} or {"seq":N,"code":"…","reason":"…"}"#),
        ),
    }
}

/// Chunked transfer coding over a writer (one chunk per write).
struct Chunked<W: Write>(W);

impl<W: Write> Chunked<W> {
    fn finish(&mut self) -> std::io::Result<()> {
        self.0.write_all(b"0\r\n\r\n")?;
        self.0.flush()
    }
}

impl<W: Write> Write for Chunked<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        write!(self.0, "{:x}\r\n", buf.len())?;
        self.0.write_all(buf)?;
        self.0.write_all(b"\r\n")?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}
