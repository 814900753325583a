//! The restic backends other than local directories and S3: REST server, rclone, and (through
//! OpenDAL, as rustic does) Google Cloud Storage, Azure Blob, OpenStack Swift, Backblaze B2 and
//! SFTP — configured with restic's URL forms and restic's environment variables.
//!
//! What rustic_backend / OpenDAL do not do and restic users expect is done here:
//! - Swift: OpenDAL takes a storage URL and a token only. Keystone v2/v3 (password or application
//!   credential) and v1 (`ST_AUTH`) authentication happen here, and the backend re-authenticates
//!   before the token expires (a daemon outlives any token).
//! - B2: OpenDAL needs the bucket *id*; restic users name the bucket. It is looked up once with
//!   `b2_authorize_account` + `b2_list_buckets`.
//! - GCS: the service-account JSON may be given as a path (restic) or as the JSON itself (as
//!   Kubernetes secrets often hand it over).
//! - REST: `RESTIC_REST_USERNAME`/`RESTIC_REST_PASSWORD`, `RESTIC_CACERT`, `RESTIC_TLS_CLIENT_CERT`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use rustic_backend::{OpenDALBackend, RcloneBackend, RestBackend};
use rustic_core::{BytesList, FileType, Id, ReadBackend, RusticResult, WriteBackend};
use serde::Deserialize;

use crate::location::{Location, credentials};

/// Looks up an environment variable; empty counts as unset.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// Opens the backend for a location that is neither local nor S3.
pub fn open(location: &Location, env: Env<'_>) -> anyhow::Result<Arc<dyn WriteBackend>> {
    // Names the first missing variable before anything connects.
    credentials(location, env)?;
    let backend: Arc<dyn WriteBackend> = match location {
        Location::Rest { url } => {
            let url = rest_url(url, env)?;
            let options = rest_options(env);
            rest_preflight(&url, &options)?;
            Arc::new(RestBackend::new(&url, options).with_context(|| format!("REST server {}", redact(&url)))?)
        }
        Location::Rclone { remote } => {
            let mut options = BTreeMap::new();
            if let Some(cmd) = env("SHMBACK_RCLONE_COMMAND") {
                options.insert("rclone-command".to_string(), cmd);
            }
            Arc::new(RcloneBackend::new(remote, options).with_context(|| {
                format!(
                    "starting `rclone serve restic {remote}`: is rclone installed and the remote configured \
                     (`rclone config`, or RCLONE_CONFIG_<NAME>_* variables)?"
                )
            })?)
        }
        Location::Sftp { .. } | Location::Gcs { .. } | Location::Azure { .. } | Location::B2 { .. } => {
            let (service, options) = opendal_options(location, env)?;
            Arc::new(opendal(service, options, location)?)
        }
        Location::Swift { container, prefix } => Arc::new(SwiftBackend::new(container, prefix, env)?),
        Location::Local(_) | Location::S3(_) => bail!("{location} is not opened by remote::open"),
    };
    Ok(backend)
}

fn opendal(service: &str, options: BTreeMap<String, String>, location: &Location) -> anyhow::Result<OpenDALBackend> {
    OpenDALBackend::new(service, options).with_context(|| format!("configuring the {service} backend for {location}"))
}

/// The REST URL with `RESTIC_REST_USERNAME`/`RESTIC_REST_PASSWORD` filled in when the URL has no
/// user of its own (restic's behaviour).
pub fn rest_url(url: &str, env: Env<'_>) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).with_context(|| format!("`{}` is not a URL", redact(url)))?;
    if parsed.username().is_empty()
        && let Some(user) = env("RESTIC_REST_USERNAME")
    {
        let bad = || anyhow::anyhow!("cannot put RESTIC_REST_USERNAME into the URL {}", redact(url));
        parsed.set_username(&user).map_err(|()| bad())?;
        parsed.set_password(env("RESTIC_REST_PASSWORD").as_deref()).map_err(|()| bad())?;
    }
    Ok(parsed.to_string())
}

/// One `HEAD config` before the REST backend is used (with the TLS `options` it gets): rustic's client reads a refused `HEAD` as
/// "no repository here" and retries an unreachable server for half a minute; this names the cause.
fn rest_preflight(url: &str, options: &BTreeMap<String, String>) -> anyhow::Result<()> {
    let mut client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30));
    if let Some(path) = options.get("cacert") {
        let pem = std::fs::read(path).with_context(|| format!("RESTIC_CACERT: cannot read {path}"))?;
        client = client.add_root_certificate(
            reqwest::Certificate::from_pem(&pem)
                .with_context(|| format!("RESTIC_CACERT: {path} is not a PEM certificate"))?,
        );
    }
    if let Some(path) = options.get("tls-client-cert") {
        let pem = std::fs::read(path).with_context(|| format!("RESTIC_TLS_CLIENT_CERT: cannot read {path}"))?;
        client = client.identity(
            reqwest::Identity::from_pem(&pem)
                .with_context(|| format!("RESTIC_TLS_CLIENT_CERT: {path} is not a PEM key and certificate"))?,
        );
    }
    let config = format!("{}/config", url.trim_end_matches('/'));
    let shown = redact(url);
    let resp = client.build()?.head(&config).send().map_err(|e| {
        let why = if e.is_connect() {
            "cannot connect"
        } else if e.is_timeout() {
            "timed out"
        } else {
            "request failed"
        };
        anyhow::anyhow!("REST server {shown}: {why} ({e}); is the server running and the URL right?")
    })?;
    match resp.status().as_u16() {
        401 | 403 => bail!(
            "REST server {shown} refused the credentials (HTTP {}): check RESTIC_REST_USERNAME / \
             RESTIC_REST_PASSWORD, or the user:password in the URL",
            resp.status().as_u16()
        ),
        _ => Ok(()),
    }
}

fn rest_options(env: Env<'_>) -> BTreeMap<String, String> {
    let mut options = BTreeMap::new();
    for (var, option) in [("RESTIC_CACERT", "cacert"), ("RESTIC_TLS_CLIENT_CERT", "tls-client-cert")] {
        if let Some(v) = env(var) {
            options.insert(option.to_string(), v);
        }
    }
    options
}

/// A URL with its password replaced, for messages.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// The OpenDAL service and options for GCS, Azure, B2 and SFTP locations (values may be secrets:
/// never log the map). For B2 this asks B2's API for the bucket id (network).
pub fn opendal_options(location: &Location, env: Env<'_>) -> anyhow::Result<(&'static str, BTreeMap<String, String>)> {
    let mut o = BTreeMap::new();
    let mut set = |k: &str, v: String| {
        o.insert(k.to_string(), v);
    };
    let service = match location {
        Location::Gcs { bucket, prefix } => {
            set("bucket", bucket.clone());
            set("root", format!("/{prefix}"));
            if let Some(token) = env("GOOGLE_ACCESS_TOKEN") {
                set("token", token);
            } else if let Some(creds) = env("GOOGLE_APPLICATION_CREDENTIALS") {
                // A path (restic) or the JSON itself (a Kubernetes secret put in a variable).
                if creds.trim_start().starts_with('{') {
                    use base64::Engine as _;
                    set("credential", base64::engine::general_purpose::STANDARD.encode(creds.trim()));
                } else {
                    std::fs::metadata(&creds).with_context(|| {
                        format!("GOOGLE_APPLICATION_CREDENTIALS names {creds}, which cannot be read")
                    })?;
                    set("credential_path", creds);
                }
            }
            "gcs"
        }
        Location::Azure { container, prefix } => {
            let account = env("AZURE_ACCOUNT_NAME").context("AZURE_ACCOUNT_NAME is not set")?;
            let endpoint = match env("SHMBACK_AZURE_ENDPOINT") {
                Some(e) => e,
                None => {
                    let suffix = env("AZURE_ENDPOINT_SUFFIX").unwrap_or_else(|| "core.windows.net".into());
                    format!("https://{account}.blob.{suffix}")
                }
            };
            set("endpoint", endpoint);
            set("container", container.clone());
            set("root", format!("/{prefix}"));
            set("account_name", account);
            if let Some(key) = env("AZURE_ACCOUNT_KEY") {
                set("account_key", key);
            } else if let Some(sas) = env("AZURE_ACCOUNT_SAS") {
                set("sas_token", sas.trim_start_matches('?').to_string());
            }
            "azblob"
        }
        Location::B2 { bucket, prefix } => {
            let key_id = env("B2_ACCOUNT_ID").context("B2_ACCOUNT_ID is not set")?;
            let key = env("B2_ACCOUNT_KEY").context("B2_ACCOUNT_KEY is not set")?;
            let id = b2_bucket_id(B2_API, &key_id, &key, bucket)?;
            set("bucket", bucket.clone());
            set("bucket_id", id);
            set("root", format!("/{prefix}"));
            set("application_key_id", key_id);
            set("application_key", key);
            "b2"
        }
        Location::Sftp { user, host, port, path } => {
            let user_part = user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
            if !path.starts_with('/') {
                bail!(
                    "{location}: the SFTP path `{path}` is relative; give it from the root (e.g. sftp:{user_part}{host}:/home/<user>/{path}) — \
                     shmback's SFTP client does not resolve paths against the login's home as restic's does"
                );
            }
            set("endpoint", format!("ssh://{user_part}{host}:{}", port.unwrap_or(22)));
            set("root", path.clone());
            if let Some(u) = user {
                set("user", u.clone());
            }
            if let Some(key) = env("SHMBACK_SFTP_KEY") {
                set("key", key);
            }
            let known = env("SHMBACK_SFTP_KNOWN_HOSTS").unwrap_or_else(|| "strict".into());
            if !["strict", "add", "accept"].contains(&known.as_str()) {
                bail!("SHMBACK_SFTP_KNOWN_HOSTS is `{known}`: use strict (default), add or accept");
            }
            set("known_hosts_strategy", known);
            "sftp"
        }
        other => bail!("{other} is not an OpenDAL location"),
    };
    Ok((service, o))
}

const B2_API: &str = "https://api.backblazeb2.com";

/// The HTTP client of the logins shmback does itself (B2's bucket look-up, Swift/Keystone).
fn login_client() -> reqwest::Result<reqwest::blocking::Client> {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Auth {
    account_id: String,
    authorization_token: String,
    api_url: String,
    #[serde(default)]
    allowed: Option<B2Allowed>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Allowed {
    bucket_id: Option<String>,
    bucket_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Buckets {
    buckets: Vec<B2Bucket>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct B2Bucket {
    bucket_id: String,
    bucket_name: String,
}

/// The id of the B2 bucket named `bucket` (OpenDAL's B2 service needs it; restic users give names).
pub fn b2_bucket_id(api: &str, key_id: &str, key: &str, bucket: &str) -> anyhow::Result<String> {
    let client = login_client()?;
    let resp = client
        .get(format!("{api}/b2api/v2/b2_authorize_account"))
        .basic_auth(key_id, Some(key))
        .send()
        .with_context(|| format!("B2: cannot reach {api}"))?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "B2 refused the application key (B2_ACCOUNT_ID / B2_ACCOUNT_KEY): check both, and that the key is not deleted"
        );
    }
    let auth: B2Auth = resp.error_for_status().context("B2: b2_authorize_account failed")?.json()?;
    if let Some(B2Allowed { bucket_id: Some(id), bucket_name: Some(name) }) = &auth.allowed {
        if name == bucket {
            return Ok(id.clone());
        }
        bail!("B2: the application key is restricted to bucket `{name}`, not `{bucket}`");
    }
    let resp = client
        .post(format!("{}/b2api/v2/b2_list_buckets", auth.api_url))
        .header("Authorization", &auth.authorization_token)
        .json(&serde_json::json!({ "accountId": auth.account_id, "bucketName": bucket }))
        .send()
        .context("B2: b2_list_buckets failed")?;
    let list: B2Buckets = resp.error_for_status().context("B2: b2_list_buckets failed")?.json()?;
    b2_pick(&list, bucket)
}

fn b2_pick(list: &B2Buckets, bucket: &str) -> anyhow::Result<String> {
    list.buckets.iter().find(|b| b.bucket_name == bucket).map(|b| b.bucket_id.clone()).ok_or_else(|| {
        anyhow::anyhow!(
            "B2: no bucket named `{bucket}` in this account: create it (B2 web console or `b2 bucket create`)"
        )
    })
}

/// A Swift storage URL and token, and when to fetch a new one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwiftSession {
    /// The account's storage URL (`…/v1/AUTH_<project>`).
    pub storage_url: String,
    /// `X-Auth-Token`.
    pub token: String,
    /// Seconds the token is valid for, if the server said; `None` for a token given by the user.
    pub valid_for: Option<Duration>,
}

/// How to get a Swift token, from the environment (restic's variables).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwiftAuth {
    /// `OS_STORAGE_URL` + `OS_AUTH_TOKEN`: used as given, never renewed.
    Static { storage_url: String, token: String },
    /// `ST_AUTH` + `ST_USER` + `ST_KEY`.
    V1 { url: String, user: String, key: String },
    /// Keystone v2 (`OS_AUTH_URL` ending in /v2.0).
    V2 { url: String, body: serde_json::Value, region: Option<String>, interface: String },
    /// Keystone v3.
    V3 { url: String, body: serde_json::Value, region: Option<String>, interface: String },
}

impl SwiftAuth {
    /// Reads restic's Swift variables (after [`credentials`] checked the required ones).
    pub fn from_env(env: Env<'_>) -> anyhow::Result<Self> {
        if let (Some(storage_url), Some(token)) = (env("OS_STORAGE_URL"), env("OS_AUTH_TOKEN")) {
            return Ok(SwiftAuth::Static { storage_url, token });
        }
        if let Some(url) = env("ST_AUTH") {
            let user = env("ST_USER").context("ST_USER is not set")?;
            let key = env("ST_KEY").context("ST_KEY is not set")?;
            return Ok(SwiftAuth::V1 { url, user, key });
        }
        let url = env("OS_AUTH_URL").context("OS_AUTH_URL is not set")?;
        let url = url.trim_end_matches('/').to_string();
        let region = env("OS_REGION_NAME");
        let interface = env("OS_INTERFACE").unwrap_or_else(|| "public".into()).trim_end_matches("URL").to_string();
        let v2 = url.ends_with("/v2.0") || env("OS_IDENTITY_API_VERSION").is_some_and(|v| v.starts_with('2'));
        if v2 {
            let mut auth = serde_json::json!({ "passwordCredentials": {
                "username": env("OS_USERNAME").context("OS_USERNAME is not set")?,
                "password": env("OS_PASSWORD").context("OS_PASSWORD is not set")?,
            }});
            if let Some(t) = env("OS_TENANT_NAME").or_else(|| env("OS_PROJECT_NAME")) {
                auth["tenantName"] = t.into();
            } else if let Some(t) = env("OS_TENANT_ID").or_else(|| env("OS_PROJECT_ID")) {
                auth["tenantId"] = t.into();
            }
            let url = format!("{url}/tokens");
            return Ok(SwiftAuth::V2 { url, body: serde_json::json!({ "auth": auth }), region, interface });
        }
        let url = if url.ends_with("/v3") { format!("{url}/auth/tokens") } else { format!("{url}/v3/auth/tokens") };
        if let (Some(id), Some(secret)) = (env("OS_APPLICATION_CREDENTIAL_ID"), env("OS_APPLICATION_CREDENTIAL_SECRET"))
        {
            // Application credentials carry their own scope.
            let body = serde_json::json!({ "auth": { "identity": {
                "methods": ["application_credential"],
                "application_credential": { "id": id, "secret": secret },
            }}});
            return Ok(SwiftAuth::V3 { url, body, region, interface });
        }
        let mut user = serde_json::json!({ "password": env("OS_PASSWORD").context("OS_PASSWORD is not set")? });
        if let Some(id) = env("OS_USER_ID") {
            user["id"] = id.into();
        } else {
            user["name"] = env("OS_USERNAME").context("OS_USERNAME or OS_USER_ID is not set")?.into();
            user["domain"] = domain(env("OS_USER_DOMAIN_ID"), env("OS_USER_DOMAIN_NAME"));
        }
        let identity = serde_json::json!({ "methods": ["password"], "password": { "user": user } });
        let mut auth = serde_json::json!({ "identity": identity });
        if let Some(id) = env("OS_PROJECT_ID").or_else(|| env("OS_TENANT_ID")) {
            auth["scope"] = serde_json::json!({ "project": { "id": id } });
        } else if let Some(name) = env("OS_PROJECT_NAME").or_else(|| env("OS_TENANT_NAME")) {
            let d = domain(env("OS_PROJECT_DOMAIN_ID"), env("OS_PROJECT_DOMAIN_NAME"));
            auth["scope"] = serde_json::json!({ "project": { "name": name, "domain": d } });
        }
        Ok(SwiftAuth::V3 { url, body: serde_json::json!({ "auth": auth }), region, interface })
    }

    /// Authenticates (no network for [`SwiftAuth::Static`]).
    pub fn login(&self) -> anyhow::Result<SwiftSession> {
        match self {
            SwiftAuth::Static { storage_url, token } => {
                Ok(SwiftSession { storage_url: storage_url.clone(), token: token.clone(), valid_for: None })
            }
            SwiftAuth::V1 { url, user, key } => {
                let resp = login_client()?
                    .get(url)
                    .header("X-Auth-User", user)
                    .header("X-Auth-Key", key)
                    .send()
                    .with_context(|| format!("Swift v1 authentication: cannot reach ST_AUTH {url}"))?;
                let resp = auth_status(resp, "ST_USER / ST_KEY")?;
                let h = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
                Ok(SwiftSession {
                    storage_url: h("x-storage-url").context("Swift v1: no X-Storage-Url in the answer")?,
                    token: h("x-auth-token").context("Swift v1: no X-Auth-Token in the answer")?,
                    valid_for: h("x-auth-token-expires").and_then(|s| s.parse().ok()).map(Duration::from_secs),
                })
            }
            SwiftAuth::V2 { url, body, region, interface } => {
                let resp = login_client()?
                    .post(url)
                    .json(body)
                    .send()
                    .with_context(|| format!("Keystone v2: cannot reach OS_AUTH_URL {url}"))?;
                let answer: serde_json::Value =
                    auth_status(resp, "OS_USERNAME / OS_PASSWORD / OS_TENANT_NAME")?.json()?;
                keystone_v2_session(&answer, region.as_deref(), interface)
            }
            SwiftAuth::V3 { url, body, region, interface } => {
                let resp = login_client()?
                    .post(url)
                    .json(body)
                    .send()
                    .with_context(|| format!("Keystone v3: cannot reach OS_AUTH_URL {url}"))?;
                let resp = auth_status(resp, "the OS_* credentials")?;
                let token = resp
                    .headers()
                    .get("x-subject-token")
                    .and_then(|v| v.to_str().ok())
                    .context("Keystone v3: no X-Subject-Token in the answer")?
                    .to_string();
                let answer: serde_json::Value = resp.json()?;
                keystone_v3_session(token, &answer, region.as_deref(), interface)
            }
        }
    }
}

fn domain(id: Option<String>, name: Option<String>) -> serde_json::Value {
    match (id, name) {
        (Some(id), _) => serde_json::json!({ "id": id }),
        (None, Some(name)) => serde_json::json!({ "name": name }),
        (None, None) => serde_json::json!({ "id": "default" }),
    }
}

fn auth_status(resp: reqwest::blocking::Response, what: &str) -> anyhow::Result<reqwest::blocking::Response> {
    let status = resp.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        bail!("Swift authentication refused ({status}): check {what}");
    }
    resp.error_for_status().context("Swift authentication failed")
}

fn pick_endpoint<'a>(
    endpoints: impl Iterator<Item = &'a serde_json::Value>,
    region: Option<&str>,
    url_of: impl Fn(&'a serde_json::Value) -> Option<&'a str>,
) -> Option<String> {
    endpoints
        .filter(|e| region.is_none_or(|r| e["region"].as_str() == Some(r) || e["region_id"].as_str() == Some(r)))
        .find_map(url_of)
        .map(str::to_string)
}

fn object_store(catalog: &serde_json::Value) -> anyhow::Result<&serde_json::Value> {
    catalog
        .as_array()
        .and_then(|c| c.iter().find(|s| s["type"] == "object-store"))
        .context("Keystone: the service catalog has no object-store (Swift) service for this project")
}

/// A Keystone v2 token answer → session.
pub fn keystone_v2_session(
    answer: &serde_json::Value,
    region: Option<&str>,
    interface: &str,
) -> anyhow::Result<SwiftSession> {
    let access = &answer["access"];
    let token = access["token"]["id"].as_str().context("Keystone v2: no access.token.id")?.to_string();
    let service = object_store(&access["serviceCatalog"])?;
    let key = format!("{interface}URL");
    let storage_url =
        pick_endpoint(service["endpoints"].as_array().into_iter().flatten(), region, |e| e[&key].as_str())
            .with_context(|| format!("Keystone v2: no {interface} object-store endpoint{}", in_region(region)))?;
    Ok(SwiftSession { storage_url, token, valid_for: valid_for(access["token"]["expires"].as_str()) })
}

/// A Keystone v3 token answer (body; the token is the `X-Subject-Token` header) → session.
pub fn keystone_v3_session(
    token: String,
    answer: &serde_json::Value,
    region: Option<&str>,
    interface: &str,
) -> anyhow::Result<SwiftSession> {
    let t = &answer["token"];
    let service = object_store(&t["catalog"])?;
    let storage_url = pick_endpoint(
        service["endpoints"].as_array().into_iter().flatten().filter(|e| e["interface"] == interface),
        region,
        |e| e["url"].as_str(),
    )
    .with_context(|| format!("Keystone v3: no {interface} object-store endpoint{}", in_region(region)))?;
    Ok(SwiftSession { storage_url, token, valid_for: valid_for(t["expires_at"].as_str()) })
}

fn in_region(region: Option<&str>) -> String {
    region.map(|r| format!(" in region {r} (OS_REGION_NAME)")).unwrap_or_default()
}

fn valid_for(expires: Option<&str>) -> Option<Duration> {
    let at: jiff::Timestamp = expires?.parse().ok()?;
    let left = at.duration_since(jiff::Timestamp::now());
    Some(Duration::try_from(left).unwrap_or(Duration::ZERO))
}

/// Swift through OpenDAL, re-authenticating before the token runs out.
pub struct SwiftBackend {
    auth: SwiftAuth,
    container: String,
    prefix: String,
    current: RwLock<(Arc<OpenDALBackend>, Option<Instant>)>,
}

/// Renew this long before the token's end (and at least this often when the end is unknown for
/// a token we fetched).
const RENEW_MARGIN: Duration = Duration::from_secs(300);
const RENEW_UNKNOWN: Duration = Duration::from_secs(50 * 60);

impl SwiftBackend {
    fn new(container: &str, prefix: &str, env: Env<'_>) -> anyhow::Result<Self> {
        let auth = SwiftAuth::from_env(env)?;
        let current = RwLock::new(session(&auth, container, prefix)?);
        Ok(Self { auth, container: container.to_string(), prefix: prefix.to_string(), current })
    }

    /// The current OpenDAL backend, after a new login if the token is due for renewal (one
    /// thread logs in; the others wait for its token).
    fn backend(&self) -> RusticResult<Arc<OpenDALBackend>> {
        let due = |renew_at: Option<Instant>| renew_at.is_some_and(|t| Instant::now() >= t);
        {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            if !due(current.1) {
                return Ok(current.0.clone());
            }
        }
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if due(current.1) {
            *current = session(&self.auth, &self.container, &self.prefix).map_err(|e| {
                rustic_core::RusticError::new(rustic_core::ErrorKind::Backend, "renewing the Swift token failed: {why}")
                    .attach_context("why", format!("{e:#}"))
            })?;
            tracing::info!("Swift token renewed (the previous one expires within 5 minutes)");
        }
        Ok(current.0.clone())
    }
}

/// Logs in and builds the OpenDAL backend for the session; `Some(when)` to renew.
fn session(auth: &SwiftAuth, container: &str, prefix: &str) -> anyhow::Result<(Arc<OpenDALBackend>, Option<Instant>)> {
    let s = auth.login()?;
    let backend = Arc::new(opendal_swift(container, prefix, &s.storage_url, &s.token)?);
    let renew_at = match (auth, s.valid_for) {
        (SwiftAuth::Static { .. }, _) => None,
        (_, Some(d)) => Some(Instant::now() + d.saturating_sub(RENEW_MARGIN).min(RENEW_UNKNOWN * 24)),
        (_, None) => Some(Instant::now() + RENEW_UNKNOWN),
    };
    tracing::debug!(storage_url = %s.storage_url, "Swift token obtained");
    Ok((backend, renew_at))
}

fn opendal_swift(container: &str, prefix: &str, storage_url: &str, token: &str) -> anyhow::Result<OpenDALBackend> {
    let options = BTreeMap::from(
        [
            ("endpoint", storage_url.to_string()),
            ("container", container.to_string()),
            ("root", format!("/{prefix}")),
            ("token", token.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    OpenDALBackend::new("swift", options).context("configuring the Swift backend")
}

impl ReadBackend for SwiftBackend {
    fn location(&self) -> String {
        format!("swift:{}:/{}", self.container, self.prefix)
    }
    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        self.backend()?.list_with_size(tpe)
    }
    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.backend()?.read_full(tpe, id)
    }
    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.backend()?.read_partial(tpe, id, cacheable, offset, length)
    }
    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone();
        current.warmup_path(tpe, id)
    }
}

impl WriteBackend for SwiftBackend {
    fn create(&self) -> RusticResult<()> {
        self.backend()?.create()
    }
    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, buf: BytesList) -> RusticResult<()> {
        self.backend()?.write_bytes(tpe, id, cacheable, buf)
    }
    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.backend()?.remove(tpe, id, cacheable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn rest_url_takes_restic_user_and_password() {
        let env = env_of(&[("RESTIC_REST_USERNAME", "backup"), ("RESTIC_REST_PASSWORD", "p@ss:w/rd")]);
        let url = rest_url("http://127.0.0.1:8000/repo", &env).unwrap();
        assert_eq!(url, "http://backup:p%40ss%3Aw%2Frd@127.0.0.1:8000/repo");
        // A user in the URL wins.
        assert_eq!(rest_url("https://me:x@host/r", &env).unwrap(), "https://me:x@host/r");
        assert_eq!(redact("https://me:secret@host/r"), "https://me:***@host/r");
    }

    #[test]
    fn gcs_options_from_path_or_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.json");
        std::fs::write(&path, "{}").unwrap();
        let p = path.to_str().unwrap().to_string();
        let env = move |k: &str| match k {
            "GOOGLE_PROJECT_ID" => Some("proj".to_string()),
            "GOOGLE_APPLICATION_CREDENTIALS" => Some(p.clone()),
            _ => None,
        };
        let loc: Location = "gs:bkt:/a/b".parse().unwrap();
        let (service, o) = opendal_options(&loc, &env).unwrap();
        assert_eq!(service, "gcs");
        assert_eq!(o["bucket"], "bkt");
        assert_eq!(o["root"], "/a/b");
        assert_eq!(o["credential_path"], path.to_str().unwrap());

        let env = env_of(&[("GOOGLE_APPLICATION_CREDENTIALS", " {\"type\":\"service_account\"}\n")]);
        let (_, o) = opendal_options(&loc, &env).unwrap();
        assert_eq!(o["credential"], "eyJ0eXBlIjoic2VydmljZV9hY2NvdW50In0=");
        assert!(!o.contains_key("credential_path"));

        let env = env_of(&[("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/sa.json")]);
        let err = opendal_options(&loc, &env).unwrap_err().to_string();
        assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS names /nonexistent/sa.json"), "{err}");
    }

    #[test]
    fn azure_options() {
        let loc: Location = "azure:backups:/akash/app".parse().unwrap();
        let env = env_of(&[("AZURE_ACCOUNT_NAME", "acct"), ("AZURE_ACCOUNT_SAS", "?sv=2024&sig=x")]);
        let (service, o) = opendal_options(&loc, &env).unwrap();
        assert_eq!(service, "azblob");
        assert_eq!(o["endpoint"], "https://acct.blob.core.windows.net");
        assert_eq!(o["container"], "backups");
        assert_eq!(o["root"], "/akash/app");
        assert_eq!(o["sas_token"], "sv=2024&sig=x");
        let env = env_of(&[
            ("AZURE_ACCOUNT_NAME", "acct"),
            ("AZURE_ACCOUNT_KEY", "k"),
            ("AZURE_ENDPOINT_SUFFIX", "core.chinacloudapi.cn"),
        ]);
        let (_, o) = opendal_options(&loc, &env).unwrap();
        assert_eq!(o["endpoint"], "https://acct.blob.core.chinacloudapi.cn");
        assert_eq!(o["account_key"], "k");
    }

    #[test]
    fn sftp_options_and_relative_paths() {
        let env = env_of(&[]);
        let loc: Location = "sftp://bk@host:2222//srv/repo".parse().unwrap();
        let (service, o) = opendal_options(&loc, &env).unwrap();
        assert_eq!(service, "sftp");
        assert_eq!(o["endpoint"], "ssh://bk@host:2222");
        assert_eq!(o["root"], "/srv/repo");
        assert_eq!(o["user"], "bk");
        assert_eq!(o["known_hosts_strategy"], "strict");
        let loc: Location = "sftp:bk@host:repo".parse().unwrap();
        let err = opendal_options(&loc, &env).unwrap_err().to_string();
        assert!(err.contains("relative") && err.contains("sftp:bk@host:/home/<user>/repo"), "{err}");
        let env = env_of(&[("SHMBACK_SFTP_KNOWN_HOSTS", "yes")]);
        let loc: Location = "sftp:host:/r".parse().unwrap();
        assert!(opendal_options(&loc, &env).unwrap_err().to_string().contains("strict (default), add or accept"));
    }

    #[test]
    fn b2_bucket_is_picked_by_name() {
        let list: B2Buckets = serde_json::from_str(
            r#"{"buckets":[{"bucketId":"id1","bucketName":"one","bucketType":"allPrivate"},
                           {"bucketId":"id2","bucketName":"two"}]}"#,
        )
        .unwrap();
        assert_eq!(b2_pick(&list, "two").unwrap(), "id2");
        assert!(b2_pick(&list, "three").unwrap_err().to_string().contains("no bucket named `three`"));
    }

    #[test]
    fn swift_auth_forms() {
        let env = env_of(&[("OS_STORAGE_URL", "https://s/v1/AUTH_x"), ("OS_AUTH_TOKEN", "t")]);
        assert_eq!(
            SwiftAuth::from_env(&env).unwrap(),
            SwiftAuth::Static { storage_url: "https://s/v1/AUTH_x".into(), token: "t".into() }
        );
        let env = env_of(&[("ST_AUTH", "https://s/auth/v1.0"), ("ST_USER", "u"), ("ST_KEY", "k")]);
        assert!(matches!(SwiftAuth::from_env(&env).unwrap(), SwiftAuth::V1 { .. }));

        let env = env_of(&[
            ("OS_AUTH_URL", "https://ks:5000/v2.0/"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_TENANT_NAME", "t"),
            ("OS_REGION_NAME", "RegionOne"),
        ]);
        let SwiftAuth::V2 { url, body, region, interface } = SwiftAuth::from_env(&env).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v2.0/tokens");
        assert_eq!(
            body,
            serde_json::json!({"auth": {"passwordCredentials": {"username": "u", "password": "p"}, "tenantName": "t"}})
        );
        assert_eq!((region.as_deref(), interface.as_str()), (Some("RegionOne"), "public"));

        let env = env_of(&[
            ("OS_AUTH_URL", "https://ks:5000/v3"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_NAME", "proj"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
        ]);
        let SwiftAuth::V3 { url, body, .. } = SwiftAuth::from_env(&env).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v3/auth/tokens");
        assert_eq!(
            body,
            serde_json::json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {"name": "u", "password": "p", "domain": {"name": "Default"}}}},
                "scope": {"project": {"name": "proj", "domain": {"id": "default"}}}
            }})
        );

        let env = env_of(&[
            ("OS_AUTH_URL", "https://ks:5000"),
            ("OS_APPLICATION_CREDENTIAL_ID", "aid"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "sec"),
        ]);
        let SwiftAuth::V3 { url, body, .. } = SwiftAuth::from_env(&env).unwrap() else { panic!() };
        assert_eq!(url, "https://ks:5000/v3/auth/tokens");
        assert_eq!(
            body["auth"]["identity"]["application_credential"],
            serde_json::json!({"id": "aid", "secret": "sec"})
        );
    }

    #[test]
    fn keystone_catalogs() {
        // Shapes from the Keystone API reference.
        let v3 = serde_json::json!({"token": {
        "expires_at": "2999-01-01T00:00:00.000000Z",
        "catalog": [
            {"type": "identity", "endpoints": [{"interface": "public", "region": "RegionOne", "url": "https://ks"}]},
            {"type": "object-store", "endpoints": [
                {"interface": "internal", "region": "RegionOne", "url": "http://10.0.0.1/v1/AUTH_p"},
                {"interface": "public", "region": "RegionTwo", "url": "https://two/v1/AUTH_p"},
                {"interface": "public", "region": "RegionOne", "url": "https://one/v1/AUTH_p"}
            ]}
        ]}});
        let s = keystone_v3_session("tok".into(), &v3, Some("RegionOne"), "public").unwrap();
        assert_eq!((s.storage_url.as_str(), s.token.as_str()), ("https://one/v1/AUTH_p", "tok"));
        assert!(s.valid_for.unwrap() > Duration::from_secs(3600));
        let s = keystone_v3_session("tok".into(), &v3, None, "internal").unwrap();
        assert_eq!(s.storage_url, "http://10.0.0.1/v1/AUTH_p");
        let err = keystone_v3_session("t".into(), &v3, Some("RegionX"), "public").unwrap_err().to_string();
        assert!(err.contains("no public object-store endpoint in region RegionX"), "{err}");

        let v2 = serde_json::json!({"access": {
        "token": {"id": "tok2", "expires": "2999-01-01T00:00:00Z"},
        "serviceCatalog": [{"type": "object-store", "endpoints": [
            {"region": "RegionOne", "publicURL": "https://one/v1/AUTH_t", "internalURL": "http://i/v1/AUTH_t"}
        ]}]}});
        let s = keystone_v2_session(&v2, Some("RegionOne"), "public").unwrap();
        assert_eq!((s.storage_url.as_str(), s.token.as_str()), ("https://one/v1/AUTH_t", "tok2"));
        let none = serde_json::json!({"access": {"token": {"id": "t"}, "serviceCatalog": []}});
        assert!(keystone_v2_session(&none, None, "public").unwrap_err().to_string().contains("no object-store"));
    }
}
