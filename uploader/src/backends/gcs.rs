//! Google Cloud Storage (`gs:bucket:/prefix`) through OpenDAL.
//!
//! Credentials, the first that is set wins:
//! 1. `GOOGLE_ACCESS_TOKEN`: an OAuth access token (restic's variable; it is not renewed).
//! 2. `GOOGLE_APPLICATION_CREDENTIALS`: a service-account JSON file path (restic), or the JSON
//!    itself (as Kubernetes secrets often hand it over).
//! 3. `SHMBACK_GCS_ANONYMOUS=true`: no credentials, unsigned requests; only together with an
//!    emulator endpoint.
//! 4. Application default credentials: `gcloud auth application-default login`'s file, else the
//!    metadata server (a GCE VM's service account, or GKE Workload Identity), whose tokens OpenDAL
//!    renews before they expire. The metadata server is asked once before anything else so that
//!    a pod without any credential fails at start with the fix, not at its first upload.
//!
//! `SHMBACK_GCS_ENDPOINT` (or Google's `STORAGE_EMULATOR_HOST`) points the backend at an emulator
//! such as fake-gcs-server; `GCE_METADATA_HOST` at another metadata server (Google's variable,
//! read by OpenDAL from the process environment too). restic also reads GOOGLE_PROJECT_ID, which
//! only creating a bucket needs; shmback never creates one, so it is not read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustic_core::WriteBackend;

use super::env::Env;
use super::failure::{BackendError, FailureKind};

/// The metadata server's name on GCE and GKE.
const METADATA_HOST: &str = "metadata.google.internal";
/// The scope OpenDAL asks tokens for.
const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// How GCS requests are authorised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GcsCredential {
    /// `GOOGLE_ACCESS_TOKEN`: an OAuth access token.
    Token(String),
    /// `GOOGLE_APPLICATION_CREDENTIALS` holding the JSON itself.
    Json(String),
    /// `GOOGLE_APPLICATION_CREDENTIALS` naming a JSON file.
    Path(String),
    /// `SHMBACK_GCS_ANONYMOUS`: unsigned requests (emulators).
    Anonymous,
    /// None of the variables: the application-default file or the metadata server.
    ApplicationDefault,
}

/// What the GCS backend takes from the location and the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct GcsConfig {
    bucket: String,
    prefix: String,
    endpoint: Option<String>,
    credential: GcsCredential,
}

impl GcsConfig {
    /// Reads the endpoint and credential variables (an access token wins over a service account).
    /// Application default credentials are only chosen here; [`check_application_default`]
    /// checks that one of their sources answers.
    pub fn from_env(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Self> {
        let endpoint = match (env.get("SHMBACK_GCS_ENDPOINT"), env.get("STORAGE_EMULATOR_HOST")) {
            (Some(e), _) => Some(e),
            // Google's libraries take a bare host:port here and speak plain HTTP to it.
            (None, Some(h)) if h.contains("://") => Some(h),
            (None, Some(h)) => Some(format!("http://{h}")),
            (None, None) => None,
        }
        .map(|e| e.trim_end_matches('/').to_string());
        if let Some(e) = &endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(BackendError::msg(
                FailureKind::Configuration,
                format!("SHMBACK_GCS_ENDPOINT is `{e}`: write an http:// or https:// URL"),
            )
            .into());
        }
        let anonymous = match env.get("SHMBACK_GCS_ANONYMOUS").as_deref() {
            None | Some("0" | "false" | "no") => false,
            Some("1" | "true" | "yes") => true,
            Some(other) => {
                return Err(BackendError::msg(
                    FailureKind::Configuration,
                    format!("SHMBACK_GCS_ANONYMOUS is `{other}`: write true or false"),
                )
                .into());
            }
        };
        let credential = if let Some(token) = env.get("GOOGLE_ACCESS_TOKEN") {
            GcsCredential::Token(token)
        } else if let Some(creds) = env.get("GOOGLE_APPLICATION_CREDENTIALS") {
            if creds.trim_start().starts_with('{') {
                GcsCredential::Json(creds.trim().to_string())
            } else {
                std::fs::metadata(&creds).map_err(|e| {
                    BackendError::msg(
                        FailureKind::Configuration,
                        format!("GOOGLE_APPLICATION_CREDENTIALS names {creds}, which cannot be read ({e})"),
                    )
                })?;
                GcsCredential::Path(creds)
            }
        } else if anonymous {
            if endpoint.is_none() {
                return Err(BackendError::msg(
                    FailureKind::Configuration,
                    "SHMBACK_GCS_ANONYMOUS is for emulators: set SHMBACK_GCS_ENDPOINT (or STORAGE_EMULATOR_HOST) \
                     to the emulator's URL, or unset SHMBACK_GCS_ANONYMOUS and give credentials",
                )
                .into());
            }
            GcsCredential::Anonymous
        } else {
            GcsCredential::ApplicationDefault
        };
        Ok(GcsConfig { bucket: bucket.to_string(), prefix: prefix.to_string(), endpoint, credential })
    }

    /// The credential chosen.
    pub fn credential(&self) -> &GcsCredential {
        &self.credential
    }

    /// OpenDAL's `gcs` options (secrets: never log them).
    pub fn options(&self) -> BTreeMap<String, String> {
        let mut o: BTreeMap<String, String> = [("bucket", self.bucket.clone()), ("root", format!("/{}", self.prefix))]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        if let Some(e) = &self.endpoint {
            o.insert("endpoint".into(), e.clone());
        }
        let credential = match &self.credential {
            GcsCredential::Token(t) => Some(("token", t.clone())),
            GcsCredential::Json(j) => Some(("credential", base64::engine::general_purpose::STANDARD.encode(j))),
            GcsCredential::Path(p) => Some(("credential_path", p.clone())),
            GcsCredential::Anonymous => Some(("skip_signature", "true".to_string())),
            // OpenDAL's own chain: the well-known file, then the metadata server.
            GcsCredential::ApplicationDefault => None,
        };
        if let Some((k, v)) = credential {
            o.insert(k.into(), v);
        }
        o
    }
}

/// Where application default credentials come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplicationDefault {
    /// `gcloud auth application-default login`'s file.
    File(PathBuf),
    /// The metadata server at this host answered with a token.
    MetadataServer(String),
}

/// The file `gcloud auth application-default login` writes, where OpenDAL looks for it.
fn well_known_file(env: &Env) -> Option<PathBuf> {
    let dir = match (env.get("XDG_CONFIG_HOME"), env.get("HOME")) {
        (Some(x), _) => PathBuf::from(x),
        (None, Some(h)) => PathBuf::from(h).join(".config"),
        (None, None) => return None,
    };
    Some(dir.join("gcloud/application_default_credentials.json"))
}

/// Finds a source of application default credentials: the well-known file, else the metadata
/// server (asked for a token of the default service account, as OpenDAL will). Neither: the error
/// names every source tried and how to provide one.
pub fn check_application_default(env: &Env) -> Result<ApplicationDefault, BackendError> {
    let file = well_known_file(env);
    if let Some(f) = file.as_ref().filter(|f| f.is_file()) {
        return Ok(ApplicationDefault::File(f.clone()));
    }
    let host = env.get("GCE_METADATA_HOST").unwrap_or_else(|| METADATA_HOST.to_string());
    let why = match metadata_token(&host) {
        Ok(()) => return Ok(ApplicationDefault::MetadataServer(host)),
        Err(why) => why,
    };
    let file = file.map_or_else(|| "no HOME to look in".to_string(), |f| format!("{} does not exist", f.display()));
    Err(BackendError::msg(
        FailureKind::Configuration,
        format!(
            "gs repositories need credentials and none was found: GOOGLE_ACCESS_TOKEN and \
             GOOGLE_APPLICATION_CREDENTIALS are unset, the application-default credentials file is \
             missing ({file}), and the metadata server at {host} gave no token ({why}). Fix: set \
             GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (or its JSON), or run where the \
             metadata server serves one (a GCE VM with a service account; on GKE, Workload Identity \
             binding the pod's Kubernetes service account to a Google service account)"
        ),
    ))
}

/// Asks the metadata server at `host` for a token; `Err` says why there is none.
fn metadata_token(host: &str) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Token {
        access_token: String,
    }
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        // A proxy cannot reach a link-local metadata server.
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let url = format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token?scopes={SCOPE}");
    let resp = client.get(&url).header("Metadata-Flavor", "Google").send().map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text = format!("{text}: {s}");
            source = s.source();
        }
        text
    })?;
    let status = resp.status();
    if !status.is_success() {
        let body: String = resp.text().unwrap_or_default().chars().take(200).collect();
        return Err(format!("HTTP {status} {}", body.trim()));
    }
    match resp.json::<Token>() {
        Ok(t) if !t.access_token.is_empty() => Ok(()),
        Ok(_) => Err("an empty token".into()),
        Err(e) => Err(format!("an answer that is not a token: {e}")),
    }
}

/// Opens `gs:bucket:/prefix`.
pub fn open(bucket: &str, prefix: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let config = GcsConfig::from_env(bucket, prefix, env)?;
    if config.credential == GcsCredential::ApplicationDefault {
        let source = check_application_default(env)?;
        tracing::info!(?source, "GCS: application default credentials");
    }
    Ok(Arc::new(super::dal::open("gcs", config.options(), &format!("gs:{bucket}:/{prefix}"), env)?))
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn gcs_options_from_path_or_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.json");
        std::fs::write(&path, "{}").unwrap();
        let p = path.to_str().unwrap();
        let env = Env::from_pairs([("GOOGLE_PROJECT_ID", "proj"), ("GOOGLE_APPLICATION_CREDENTIALS", p)]);
        let o = GcsConfig::from_env("bkt", "a/b", &env).unwrap().options();
        assert_eq!(o["bucket"], "bkt");
        assert_eq!(o["root"], "/a/b");
        assert_eq!(o["credential_path"], p);
        assert!(!o.contains_key("endpoint"), "Google's endpoint unless told");

        let env = Env::from_pairs([("GOOGLE_APPLICATION_CREDENTIALS", " {\"type\":\"service_account\"}\n")]);
        let o = GcsConfig::from_env("bkt", "a/b", &env).unwrap().options();
        assert_eq!(o["credential"], "eyJ0eXBlIjoic2VydmljZV9hY2NvdW50In0=");
        assert!(!o.contains_key("credential_path"));

        let env = Env::from_pairs([("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json")]);
        let err = GcsConfig::from_env("bkt", "a/b", &env).err().unwrap().to_string();
        assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS names /nonexistent/sa.json"), "{err}");
    }

    #[test]
    fn no_variable_means_application_default_credentials() {
        let c = GcsConfig::from_env("b", "p", &Env::from_pairs([("GOOGLE_PROJECT_ID", "p")])).unwrap();
        assert_eq!(c.credential(), &GcsCredential::ApplicationDefault);
        let o = c.options();
        for k in ["token", "credential", "credential_path", "skip_signature", "disable_vm_metadata"] {
            assert!(!o.contains_key(k), "{k}: OpenDAL's default chain (file, metadata server) decides");
        }
        let o = GcsConfig::from_env("b", "p", &Env::from_pairs([("GOOGLE_ACCESS_TOKEN", "t")])).unwrap().options();
        assert_eq!(o["token"], "t");
    }

    #[test]
    fn emulator_endpoint_and_anonymous_access() {
        let env = Env::from_pairs([("SHMBACK_GCS_ENDPOINT", "http://127.0.0.1:4443/"), ("GOOGLE_ACCESS_TOKEN", "t")]);
        let o = GcsConfig::from_env("b", "p", &env).unwrap().options();
        assert_eq!(o["endpoint"], "http://127.0.0.1:4443");
        assert_eq!(o["token"], "t");
        // Google's emulator variable, a bare host:port as its libraries take it.
        let env = Env::from_pairs([("STORAGE_EMULATOR_HOST", "127.0.0.1:4443"), ("SHMBACK_GCS_ANONYMOUS", "true")]);
        let o = GcsConfig::from_env("b", "p", &env).unwrap().options();
        assert_eq!(o["endpoint"], "http://127.0.0.1:4443");
        assert_eq!(o["skip_signature"], "true");
        // Anonymous only where an emulator is named; a malformed value is named.
        let e = GcsConfig::from_env("b", "p", &Env::from_pairs([("SHMBACK_GCS_ANONYMOUS", "true")])).err().unwrap();
        assert!(e.to_string().contains("SHMBACK_GCS_ANONYMOUS is for emulators"), "{e}");
        let env = Env::from_pairs([("SHMBACK_GCS_ENDPOINT", "http://h:1"), ("SHMBACK_GCS_ANONYMOUS", "maybe")]);
        let e = GcsConfig::from_env("b", "p", &env).err().unwrap();
        assert!(e.to_string().contains("write true or false"), "{e}");
        let env = Env::from_pairs([("SHMBACK_GCS_ENDPOINT", "h:1")]);
        let e = GcsConfig::from_env("b", "p", &env).err().unwrap();
        assert!(e.to_string().contains("http:// or https://"), "{e}");
    }

    /// A metadata server on 127.0.0.1 that answers `n` requests with `status` and `body`; the
    /// request lines and headers it got come back from the join handle.
    fn metadata_stub(status: &str, body: &str, n: usize) -> (String, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let (status, body) = (status.to_string(), body.to_string());
        let handle = std::thread::spawn(move || {
            let mut got = Vec::new();
            for _ in 0..n {
                let (mut s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let k = s.read(&mut chunk).unwrap();
                    assert!(k > 0, "the client closed before the end of its headers");
                    buf.extend_from_slice(&chunk[..k]);
                }
                got.push(String::from_utf8_lossy(&buf).into_owned());
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(reply.as_bytes()).unwrap();
            }
            got
        });
        (host, handle)
    }

    #[test]
    fn the_metadata_server_is_a_source_of_credentials() {
        let home = tempfile::tempdir().unwrap();
        let (host, stub) = metadata_stub("200 OK", r#"{"access_token":"ya29.t","expires_in":3599}"#, 1);
        let env = Env::from_pairs([("HOME", home.path().to_str().unwrap()), ("GCE_METADATA_HOST", host.as_str())]);
        assert_eq!(check_application_default(&env).unwrap(), ApplicationDefault::MetadataServer(host));
        let got = stub.join().unwrap();
        assert!(got[0].starts_with("GET /computeMetadata/v1/instance/service-accounts/default/token?"), "{got:?}");
        assert!(got[0].to_lowercase().contains("metadata-flavor: google"), "{got:?}");
        // The application-default file wins without asking the metadata server.
        let file = home.path().join(".config/gcloud/application_default_credentials.json");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "{}").unwrap();
        assert_eq!(check_application_default(&env).unwrap(), ApplicationDefault::File(file));
    }

    #[test]
    fn no_source_at_all_names_every_source_and_the_fix() {
        let home = tempfile::tempdir().unwrap();
        let (host, stub) = metadata_stub("404 Not Found", "not a GCE VM", 1);
        let env = Env::from_pairs([("HOME", home.path().to_str().unwrap()), ("GCE_METADATA_HOST", host.as_str())]);
        let e = check_application_default(&env).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Configuration);
        let text = e.to_string();
        for part in [
            "GOOGLE_ACCESS_TOKEN and GOOGLE_APPLICATION_CREDENTIALS are unset",
            "application_default_credentials.json does not exist",
            &format!("the metadata server at {host} gave no token (HTTP 404 Not Found not a GCE VM)"),
            "Workload Identity",
        ] {
            assert!(text.contains(part), "{part}: {text}");
        }
        stub.join().unwrap();
        // Nothing listens at all.
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let env = Env::from_pairs([("HOME", home.path().to_str().unwrap()), ("GCE_METADATA_HOST", free.as_str())]);
        let text = check_application_default(&env).unwrap_err().to_string();
        assert!(text.contains(&format!("the metadata server at {free} gave no token (")), "{text}");
    }
}
