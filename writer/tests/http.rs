//! The HTTP transport against an in-process stand-in uploader (a small HTTP server thread that
//! decodes bodies with `FrameAssembler` + `BatchDecoder` and answers per PROTOCOL.md), and pull
//! mode against the built `shmback-send --serve`.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use shmback_proto::stream::{self, FrameAssembler};
use shmback_proto::{BatchDecoder, Entry, EntryKind, Event, frame};
use shmback_writer::{EntryMeta, HttpOptions, Outbox, OutboxOptions, WriteError};

const TOKEN: &str = "right-token";
const ID: [u8; 32] = [0x5a; 32];

/// What the stand-in does with one connection.
#[derive(Clone, Copy)]
enum Act {
    /// 100 Continue, decode the body, answer 200 with the snapshot id.
    Store,
    /// 100 Continue, read a little of the body, close the connection.
    DropMidBody,
    /// Answer this status before the body (no 100 Continue).
    Status(u16),
}

/// One batch as the stand-in decoded it.
#[derive(Debug, Default)]
struct Got {
    producer: String,
    authorized: bool,
    seq: u64,
    entries: Vec<Entry>,
    data: Vec<Vec<u8>>,
    committed: bool,
}

impl Got {
    fn file(&self, path: &str) -> &[u8] {
        let i = self.entries.iter().filter(|e| e.kind == EntryKind::File).position(|e| e.path == path.as_bytes());
        &self.data[i.unwrap_or_else(|| panic!("no file {path}"))]
    }
}

/// Reads a request or response head; returns its lines (first line included).
fn head(r: &mut impl BufRead) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end().to_string();
        if line.is_empty() {
            return lines;
        }
        lines.push(line);
    }
}

fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

/// Decodes a chunked body as frames into `got`; stops early after `limit` bytes (None: whole).
fn decode_chunked(r: &mut impl BufRead, got: &mut Got, limit: Option<usize>) {
    let mut asm = FrameAssembler::new(stream::DEFAULT_MAX_FRAME);
    let mut dec = BatchDecoder::new();
    let mut read = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let n = usize::from_str_radix(line.trim().split(';').next().unwrap(), 16).unwrap();
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk).unwrap();
        if n == 0 {
            break;
        }
        read += n;
        asm.push(&chunk[..n]);
        while let Some((kind, payload)) = asm.peek().unwrap() {
            match dec.feed(frame::decode(kind, payload).unwrap()).unwrap() {
                Event::Begin { begin, .. } => got.seq = begin.seq,
                Event::Entry { entry, .. } => {
                    if entry.kind == EntryKind::File {
                        got.data.push(Vec::new());
                    }
                    got.entries.push(entry);
                }
                Event::Data { file, bytes, .. } => got.data[file as usize].extend_from_slice(bytes),
                Event::Commit { .. } => got.committed = true,
                _ => {}
            }
            asm.release();
        }
        if limit.is_some_and(|l| read >= l) {
            return;
        }
    }
    asm.finish().unwrap();
}

/// A stand-in uploader acting `script` on its connections, one each, then returning what it got.
fn stand_in(script: Vec<Act>) -> (String, JoinHandle<Vec<Got>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        let mut all = Vec::new();
        for act in script {
            let (conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut w = conn;
            let lines = head(&mut r);
            assert!(lines[0].starts_with(&format!("POST {} ", stream::PUSH_PATH)), "{lines:?}");
            assert_eq!(header(&lines, "content-type"), Some(stream::CONTENT_TYPE));
            let mut got = Got {
                producer: header(&lines, stream::PRODUCER_HEADER).unwrap_or_default().to_string(),
                authorized: header(&lines, "authorization") == Some(&format!("Bearer {TOKEN}")),
                ..Got::default()
            };
            let reply = |w: &mut TcpStream, status: &str, extra: &str, body: &str| {
                let ok = write!(
                    w,
                    "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                ok.and_then(|()| w.flush()).unwrap();
            };
            if !got.authorized {
                reply(&mut w, "401 Unauthorized", "", "");
                all.push(got);
                continue;
            }
            match act {
                Act::Status(s) => {
                    let body = format!(r#"{{"seq":0,"code":"storage-failed","reason":"stand-in said {s}"}}"#);
                    reply(&mut w, &format!("{s} Nope"), "retry-after: 0\r\n", &body);
                }
                Act::DropMidBody => {
                    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    decode_chunked(&mut r, &mut got, Some(1));
                    w.shutdown(Shutdown::Both).unwrap();
                }
                Act::Store => {
                    w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
                    decode_chunked(&mut r, &mut got, None);
                    let hex: String = ID.iter().map(|b| format!("{b:02x}")).collect();
                    reply(&mut w, "200 OK", "", &format!(r#"{{"seq":{},"snapshot":"{hex}"}}"#, got.seq));
                }
            }
            all.push(got);
        }
        all
    });
    (url, h)
}

fn outbox(url: &str, token: &str) -> Outbox {
    let http = HttpOptions { token: Some(token.into()), producer: "app-1".into() };
    let opts = OutboxOptions { timeout: Duration::from_secs(30), frame_size: 64 << 10, ..OutboxOptions::default() };
    Outbox::http(url, http, opts).unwrap()
}

fn sample_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("a.txt"), "hello\n").unwrap();
    // Over the socket buffers, so a drop mid-body breaks the writer's send.
    let big: Vec<u8> = (0..6u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.path().join("sub/big.bin"), big).unwrap();
    dir
}

#[test]
fn a_pushed_batch_arrives_whole_with_files_and_a_stream() {
    let (url, uploader) = stand_in(vec![Act::Store]);
    let dir = sample_dir();
    let mut ob = outbox(&url, TOKEN);
    let mut batch = ob.batch();
    batch.add_dir("data", dir.path()).unwrap();
    let dump = std::io::Cursor::new(b"CREATE TABLE t (id int);\n".repeat(10_000));
    batch.add_reader("dump.sql", None, EntryMeta::default(), dump).unwrap();
    let ticket = batch.commit().unwrap();
    let seq = ticket.seq();
    assert_eq!(ticket.wait_durable(Duration::from_secs(60)).unwrap().0, ID);

    let got = uploader.join().unwrap();
    assert_eq!(got.len(), 1);
    let got = &got[0];
    assert!(got.committed);
    assert_eq!(got.producer, "app-1");
    assert_eq!(got.seq, seq);
    assert!(seq > 1_600_000_000_000, "milliseconds since the epoch: {seq}");
    let paths: Vec<_> = got.entries.iter().map(|e| String::from_utf8_lossy(&e.path).into_owned()).collect();
    assert_eq!(paths, ["data", "data/a.txt", "data/sub", "data/sub/big.bin", "dump.sql"]);
    assert_eq!(got.file("data/a.txt"), b"hello\n");
    assert_eq!(got.file("data/sub/big.bin"), std::fs::read(dir.path().join("sub/big.bin")).unwrap());
    assert_eq!(got.file("dump.sql"), b"CREATE TABLE t (id int);\n".repeat(10_000));
}

#[test]
fn a_connection_dropped_mid_body_is_answered_by_a_resend() {
    let (url, uploader) = stand_in(vec![Act::DropMidBody, Act::Store]);
    let dir = sample_dir();
    let mut ob = outbox(&url, TOKEN);
    let mut batch = ob.batch();
    batch.add_dir("data", dir.path()).unwrap();
    let id = batch.commit().and_then(|t| t.wait_durable(Duration::from_secs(60))).unwrap();
    assert_eq!(id.0, ID);
    let got = uploader.join().unwrap();
    assert_eq!(got.len(), 2);
    assert!(!got[0].committed, "the first body was cut");
    assert!(got[1].committed);
    assert_eq!(got[0].seq, got[1].seq, "a resend keeps the sequence (the uploader deduplicates by it)");
    assert_eq!(got[1].file("data/sub/big.bin"), std::fs::read(dir.path().join("sub/big.bin")).unwrap());
}

#[test]
fn a_wrong_token_is_final_and_names_the_fix() {
    let (url, uploader) = stand_in(vec![Act::Store]);
    let mut ob = outbox(&url, "wrong-token");
    let mut batch = ob.batch();
    batch.add_bytes("x", "1").unwrap();
    let err = batch.commit().and_then(|t| t.wait_durable(Duration::from_secs(60))).unwrap_err();
    assert!(matches!(err, WriteError::Unauthorized), "{err}");
    assert!(err.to_string().contains("SHMBACK_TOKEN"), "{err}");
    let got = uploader.join().unwrap();
    assert_eq!(got.len(), 1, "no resend after 401");
    assert!(got[0].entries.is_empty(), "no body was sent");
}

#[test]
fn a_503_is_followed_by_a_resend() {
    let (url, uploader) = stand_in(vec![Act::Status(503), Act::Status(429), Act::Store]);
    let mut ob = outbox(&url, TOKEN);
    let mut batch = ob.batch();
    batch.add_bytes("x", "1").unwrap();
    let id = batch.commit().and_then(|t| t.wait_durable(Duration::from_secs(60))).unwrap();
    assert_eq!(id.0, ID);
    let got = uploader.join().unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].file("x"), b"1");
}

#[test]
fn a_refused_batch_is_final() {
    let (url, uploader) = stand_in(vec![Act::Status(413)]);
    let mut ob = outbox(&url, TOKEN);
    let mut batch = ob.batch();
    batch.add_bytes("x", "1").unwrap();
    let err = batch.commit().and_then(|t| t.wait_durable(Duration::from_secs(60))).unwrap_err();
    assert!(matches!(err, WriteError::Refused { status: 413, .. }), "{err}");
    assert_eq!(uploader.join().unwrap().len(), 1);
}

/// A request to the `--serve` process; returns the response head lines and a reader at its body.
fn request(addr: &str, req: &str) -> (Vec<String>, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let lines = head(&mut r);
    (lines, r)
}

fn wait_listening(addr: &str) {
    for _ in 0..600 {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("shmback-send --serve did not listen on {addr}");
}

#[test]
fn pull_mode_serves_a_batch_and_exits_on_its_outcome() {
    let dir = sample_dir();
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let child = Command::new(env!("CARGO_BIN_EXE_shmback-send"))
        .args(["--serve", &addr, "--once", "--producer", "pulled"])
        .arg(dir.path().join("a.txt"))
        .env("SHMBACK_TOKEN", TOKEN)
        .env_remove("SHMBACK_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&addr);

    let get =
        |token: &str| format!("GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n", stream::PULL_PATH);
    let (lines, _) = request(&addr, &get("wrong"));
    assert!(lines[0].starts_with("HTTP/1.1 401"), "{lines:?}");
    let (lines, _) = request(&addr, &format!("GET /elsewhere HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"));
    assert!(lines[0].starts_with("HTTP/1.1 404"), "{lines:?}");

    let (lines, mut body) = request(&addr, &get(TOKEN));
    assert!(lines[0].starts_with("HTTP/1.1 200"), "{lines:?}");
    assert_eq!(header(&lines, "content-type"), Some(stream::CONTENT_TYPE));
    assert_eq!(header(&lines, stream::PRODUCER_HEADER), Some("pulled"));
    let mut got = Got::default();
    decode_chunked(&mut body, &mut got, None);
    assert!(got.committed);
    let snap = Path::new(&dir.path().join("a.txt")).strip_prefix("/").unwrap().to_string_lossy().into_owned();
    assert_eq!(got.file(&snap), b"hello\n");

    let outcome = format!(r#"{{"seq":{},"snapshot":"{}"}}"#, got.seq, "5a".repeat(32));
    let post = format!(
        "POST {} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{outcome}",
        stream::OUTCOME_PATH,
        outcome.len()
    );
    let (lines, _) = request(&addr, &post);
    assert!(lines[0].starts_with("HTTP/1.1 204"), "{lines:?}");

    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("batch {} stored as snapshot {}", got.seq, "5a".repeat(32))), "{stdout}");
}

fn send_to(url: &str, token: &str, path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shmback-send"))
        .args(["--to", url, "--wait-durable", "--producer", "cli"])
        .arg(path)
        .env("SHMBACK_TOKEN", token)
        .env_remove("SHMBACK_TOKEN_FILE")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn shmback_send_pushes_with_to_and_exits_7_on_a_refused_token() {
    let dir = sample_dir();
    let (url, uploader) = stand_in(vec![Act::Store]);
    let (code, stdout, stderr) = send_to(&url, TOKEN, &dir.path().join("a.txt"));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains(&format!("stored as snapshot {}", "5a".repeat(32))), "{stdout}");
    let got = uploader.join().unwrap();
    assert_eq!(got[0].producer, "cli");
    assert!(got[0].committed);

    let (url, uploader) = stand_in(vec![Act::Store]);
    let (code, _, stderr) = send_to(&url, "wrong-token", &dir.path().join("a.txt"));
    assert_eq!(code, Some(7), "{stderr}");
    assert!(stderr.contains("SHMBACK_TOKEN/SHMBACK_TOKEN_FILE"), "{stderr}");
    assert_eq!(uploader.join().unwrap().len(), 1);
}

#[test]
fn a_token_from_both_variables_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_shmback-send"))
        .args(["--to", "http://127.0.0.1:9", "/etc/hostname"])
        .env("SHMBACK_TOKEN", "a")
        .env("SHMBACK_TOKEN_FILE", "/etc/hostname")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("set only one"));
}

#[test]
fn a_stream_already_read_is_not_sent_twice() {
    let (url, uploader) = stand_in(vec![Act::DropMidBody]);
    let mut ob = outbox(&url, TOKEN);
    let mut batch = ob.batch();
    let dump = std::io::Cursor::new(vec![b'x'; 6 << 20]);
    batch.add_reader("dump.sql", None, EntryMeta::default(), dump).unwrap();
    let err = batch.commit().and_then(|t| t.wait_durable(Duration::from_secs(60))).unwrap_err();
    assert!(matches!(err, WriteError::NotResendable { .. }), "{err}");
    assert!(err.to_string().contains("run the producer again"), "{err}");
    assert_eq!(uploader.join().unwrap().len(), 1);
}

#[test]
fn a_subdirectory_the_sender_may_not_read_is_stored_empty_and_named() {
    // A volume's root-only `lost+found`, met by a producer that does not run as root. As root
    // (CI) the sender runs as `nobody` through setpriv; otherwise the directory is made
    // unreadable to its owner.
    let uid = std::fs::read_to_string("/proc/self/status").unwrap();
    let root = uid.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(data.join("lost+found")).unwrap();
    std::fs::write(data.join("lost+found/#12"), "orphan").unwrap();
    std::fs::write(data.join("app.db"), "rows").unwrap();
    use std::os::unix::fs::PermissionsExt;
    for (p, mode) in [
        (dir.path(), 0o755),
        (&data, 0o755),
        (&data.join("app.db"), 0o644),
        (&data.join("lost+found"), if root { 0o700 } else { 0 }),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let (url, uploader) = stand_in(vec![Act::Store]);
    let mut send = if root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_shmback-send")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_shmback-send"))
    };
    let out = send
        .args(["--to", &url, "--wait-durable", "--producer", "cli"])
        .arg(&data)
        .env("SHMBACK_TOKEN", TOKEN)
        .env_remove("SHMBACK_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("lost+found") && stderr.contains("not readable"), "{stderr}");
    let got = uploader.join().unwrap();
    let prefix = data.strip_prefix("/").unwrap().to_str().unwrap();
    assert_eq!(got[0].file(&format!("{prefix}/app.db")), b"rows");
    let paths: Vec<String> = got[0].entries.iter().map(|e| String::from_utf8_lossy(&e.path).into_owned()).collect();
    assert!(paths.contains(&format!("{prefix}/lost+found")), "{paths:?}");
    assert!(!paths.iter().any(|p| p.contains("#12")), "{paths:?}");
    std::fs::set_permissions(data.join("lost+found"), std::fs::Permissions::from_mode(0o700)).unwrap();
}
