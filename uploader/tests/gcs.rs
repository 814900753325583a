//! GCS without a key variable (a GCE VM's service account, GKE Workload Identity): the token comes
//! from the metadata server. A stand-in on 127.0.0.1 plays both the metadata server
//! (`GCE_METADATA_HOST`) and GCS (`SHMBACK_GCS_ENDPOINT`): the test asserts that shmback asks the
//! metadata server for a token the way Google's libraries do and sends that token to GCS as
//! `Authorization: Bearer`. The full backup through an emulator is tests/backends/run.sh's.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{shmback, text};

const TOKEN: &str = "ya29.stand-in-metadata-token";

/// One request as the stand-in saw it: its request line and its headers, lower-cased names.
struct Seen {
    line: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Serves at most 64 requests on a thread: metadata token requests get [`TOKEN`], everything else
/// a GCS-style 404 (no object). Returns the address and what it saw.
fn stand_in() -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for _ in 0..64 {
            let Ok((mut s, _)) = listener.accept() else { return };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let mut lines = head.split("\r\n");
            let line = lines.next().unwrap_or_default().to_string();
            let headers = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                .collect();
            let (status, body) = if line.contains("/computeMetadata/v1/instance/service-accounts/default/token") {
                ("200 OK", format!(r#"{{"access_token":"{TOKEN}","expires_in":3599,"token_type":"Bearer"}}"#))
            } else {
                ("404 Not Found", r#"{"error":{"code":404,"message":"No such object"}}"#.to_string())
            };
            log.lock().unwrap().push(Seen { line, headers });
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (addr, seen)
}

#[test]
fn the_metadata_servers_token_is_sent_to_gcs() {
    let (addr, seen) = stand_in();
    let home = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{addr}");
    let o = shmback(
        std::path::Path::new("gs:bkt:/akash/app"),
        &["snapshots"],
        &[
            ("RESTIC_PASSWORD", "pw"),
            // No key variable, no gcloud file: only the metadata server can give credentials.
            ("HOME", home.path().to_str().unwrap()),
            ("XDG_CONFIG_HOME", home.path().to_str().unwrap()),
            ("GOOGLE_APPLICATION_CREDENTIALS", ""),
            ("GOOGLE_ACCESS_TOKEN", ""),
            ("GCE_METADATA_HOST", addr.as_str()),
            ("SHMBACK_GCS_ENDPOINT", endpoint.as_str()),
        ],
    );
    // The stand-in has no repository: what matters is what it was asked.
    assert!(!o.status.success(), "{}", text(&o));
    let seen = seen.lock().unwrap();
    let tokens: Vec<&Seen> = seen.iter().filter(|s| s.line.contains("/computeMetadata/")).collect();
    assert!(!tokens.is_empty(), "the metadata server was asked for a token: {}", text(&o));
    for t in &tokens {
        assert!(t.line.starts_with("GET /computeMetadata/v1/instance/service-accounts/default/token?scopes="));
        assert_eq!(t.header("metadata-flavor"), Some("Google"), "{}", t.line);
    }
    let gcs: Vec<&Seen> = seen.iter().filter(|s| s.line.contains("/storage/v1/b/bkt/")).collect();
    assert!(!gcs.is_empty(), "GCS was asked for the repository: {}", text(&o));
    let bearer = format!("Bearer {TOKEN}");
    for g in &gcs {
        assert_eq!(g.header("authorization"), Some(bearer.as_str()), "{}", g.line);
    }
    assert!(!text(&o).contains(TOKEN), "the token is never shown: {}", text(&o));
}

#[test]
fn a_metadata_server_that_refuses_is_named_with_the_fix() {
    let home = tempfile::tempdir().unwrap();
    // A metadata server that answers 403 (Workload Identity not bound, say).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = "unable to generate access token; IAM returned 403 Forbidden";
            let reply =
                format!("HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = s.write_all(reply.as_bytes());
        }
    });
    let o = shmback(
        std::path::Path::new("gs:bkt:/akash/app"),
        &["snapshots"],
        &[
            ("RESTIC_PASSWORD", "pw"),
            ("HOME", home.path().to_str().unwrap()),
            ("XDG_CONFIG_HOME", home.path().to_str().unwrap()),
            ("GCE_METADATA_HOST", addr.as_str()),
        ],
    );
    assert_eq!(o.status.code(), Some(14), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains(&format!("the metadata server at {addr} gave no token (HTTP 403 Forbidden unable to generate")),
        "{t}"
    );
    assert!(t.contains("Workload Identity") && t.contains("GOOGLE_APPLICATION_CREDENTIALS"), "{t}");
}
