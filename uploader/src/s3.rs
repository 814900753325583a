//! The S3 backend: a rustic_core `WriteBackend` on `aws-sdk-s3`, for AWS, R2, B2, MinIO and Sia
//! renterd/s3d. Layout and addressing follow restic (`config`, `keys/`, `snapshots/`, `index/`,
//! `data/xx/<id>` under the prefix), so restic reads what this writes.
//!
//! rustic_core's backend traits are synchronous: the backend owns a small tokio runtime and blocks
//! on it. Pack uploads are pipelined (up to `inflight` at once) behind a **barrier**: any other
//! write (index, snapshot, key, config) first waits for every earlier pack upload and fails if one
//! failed, so an index or snapshot never references data that is not stored. Every request is
//! retried with exponential backoff and full jitter on 5xx, throttling (429, SlowDown), timeouts
//! and dropped connections — each retry is logged — and never on 4xx, where retrying cannot help.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration};
use bytes::{Bytes, BytesMut};
use rustic_core::{BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::location::S3Location;

/// Which S3 implementation is behind the endpoint, where providers differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// Decide from the endpoint: AWS for `*.amazonaws.com`, otherwise generic.
    #[default]
    Auto,
    /// Amazon S3: virtual-host addressing, checksums.
    Aws,
    /// Any other S3 server (MinIO, R2, B2, Ceph, …): path-style addressing, checksums.
    Generic,
    /// Sia renterd's S3 gateway or s3d: path-style, no checksum headers, no suffix ranges or
    /// presigned URLs (this backend uses neither), bucket created explicitly.
    Renterd,
}

/// S3 settings beyond the location.
#[derive(Clone, Debug)]
pub struct S3Options {
    /// Provider profile.
    pub provider: Provider,
    /// Region (default: the AWS chain's, else `us-east-1`).
    pub region: Option<String>,
    /// Path-style (`true`) or virtual-host (`false`) addressing; `None`: path-style for any
    /// endpoint but AWS.
    pub path_style: Option<bool>,
    /// Storage class for new objects (e.g. `STANDARD_IA`).
    pub storage_class: Option<String>,
    /// Pack uploads kept in flight at once.
    pub inflight: usize,
    /// Objects at least this large are uploaded with multipart.
    pub multipart_threshold: usize,
    /// Part size of multipart uploads.
    pub part_size: usize,
    /// Attempts per request (the first included).
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt (full jitter), capped at `max_backoff`.
    pub base_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// `create()` (called by `init`) creates a missing bucket instead of failing.
    pub create_bucket: bool,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            provider: Provider::Auto,
            region: None,
            path_style: None,
            storage_class: None,
            inflight: 4,
            multipart_threshold: 64 << 20,
            part_size: 16 << 20,
            max_attempts: 8,
            base_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
            create_bucket: false,
        }
    }
}

/// Why an S3 request failed, with the fix where there is one. `shmback` exits with
/// [`S3Error::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// 403 on credentials.
    #[error(
        "the S3 endpoint {endpoint} refused the credentials ({code}): check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and that the key may use bucket `{bucket}`"
    )]
    Credentials {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// S3 error code (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied, …).
        code: String,
    },
    /// The bucket does not exist.
    #[error(
        "bucket `{bucket}` does not exist at {endpoint}: create it with the provider's tools, or run \
         `shmback init --create-bucket` where the provider allows creating buckets"
    )]
    NoSuchBucket {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
    },
    /// No connection.
    #[error("cannot reach the S3 endpoint {endpoint}: {cause}; check the address, the port and the network")]
    Unreachable {
        /// Endpoint.
        endpoint: String,
        /// What the connector said.
        cause: String,
    },
    /// TLS failed.
    #[error(
        "TLS with the S3 endpoint {endpoint} failed: {cause}; for a server without TLS write \
         s3:http://…, for a private CA add it to the system's trust store"
    )]
    Tls {
        /// Endpoint.
        endpoint: String,
        /// What the TLS layer said.
        cause: String,
    },
    /// 404 on an object.
    #[error("S3 object `{key}` not found")]
    NotFound {
        /// Key.
        key: String,
    },
    /// Anything else.
    #[error("S3 {op} `{key}` failed: {cause}")]
    Other {
        /// Operation.
        op: &'static str,
        /// Key.
        key: String,
        /// Status, code, message.
        cause: String,
    },
}

impl S3Error {
    /// The process exit status for this error (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            S3Error::Credentials { .. } => 10,
            S3Error::NoSuchBucket { .. } => 11,
            S3Error::Unreachable { .. } => 12,
            S3Error::Tls { .. } => 13,
            S3Error::NotFound { .. } | S3Error::Other { .. } => 1,
        }
    }
}

/// A failed attempt: the error, and whether another attempt may succeed.
struct Failure {
    error: S3Error,
    retry: bool,
}

/// A pack upload in flight: its key and its task.
type Upload = (String, JoinHandle<Result<(), S3Error>>);

/// The backend.
pub struct S3Backend {
    rt: tokio::runtime::Runtime,
    /// What requests need; shared with the spawned pack uploads.
    ctx: Arc<Ctx>,
    /// `""` or `"some/prefix/"`.
    prefix: String,
    location: String,
    /// Pack uploads in flight, oldest first.
    inflight: Mutex<VecDeque<Upload>>,
}

impl fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Backend").field("location", &self.location).finish_non_exhaustive()
    }
}

impl S3Backend {
    /// Connects (lazily: nothing is sent until the first request) to `loc`.
    pub fn new(loc: &S3Location, opts: S3Options) -> anyhow::Result<Self> {
        let rt =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("s3").enable_all().build()?;
        let provider = match opts.provider {
            Provider::Auto if loc.is_aws() => Provider::Aws,
            Provider::Auto => Provider::Generic,
            p => p,
        };
        let path_style = opts.path_style.unwrap_or(provider != Provider::Aws);
        // A regional AWS host names its region.
        let host_region = loc
            .host
            .strip_prefix("s3.")
            .and_then(|h| h.strip_suffix(".amazonaws.com"))
            .filter(|r| !r.is_empty())
            .map(str::to_string);
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(r) = opts.region.clone().or(host_region) {
            loader = loader.region(Region::new(r));
        }
        let shared = rt.block_on(loader.load());
        let region = shared.region().cloned().unwrap_or_else(|| Region::new("us-east-1"));
        let mut conf = aws_sdk_s3::config::Builder::from(&shared)
            .region(region)
            .force_path_style(path_style)
            // Our own retry loop classifies, backs off and logs; the SDK's would hide retries.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .read_timeout(Duration::from_secs(120))
                    .build(),
            )
            .request_checksum_calculation(if provider == Provider::Renterd {
                RequestChecksumCalculation::WhenRequired
            } else {
                RequestChecksumCalculation::WhenSupported
            });
        if !(provider == Provider::Aws && loc.host == "s3.amazonaws.com") {
            conf = conf.endpoint_url(loc.endpoint());
        }
        let client = Client::from_conf(conf.build());
        let prefix = if loc.prefix.is_empty() { String::new() } else { format!("{}/", loc.prefix) };
        let storage_class = opts.storage_class.as_deref().map(aws_sdk_s3::types::StorageClass::from);
        Ok(S3Backend {
            rt,
            ctx: Arc::new(Ctx { client, bucket: loc.bucket.clone(), endpoint: loc.endpoint(), opts, storage_class }),
            prefix,
            location: format!("s3:{}/{}/{}", loc.endpoint(), loc.bucket, loc.prefix),
            inflight: Mutex::new(VecDeque::new()),
        })
    }

    fn key(&self, tpe: FileType, id: &Id) -> String {
        let hex = id.to_hex();
        match tpe {
            FileType::Config => format!("{}config", self.prefix),
            FileType::Pack => format!("{}data/{}/{}", self.prefix, &hex.as_str()[..2], hex.as_str()),
            other => format!("{}{}/{}", self.prefix, other.dirname(), hex.as_str()),
        }
    }

    /// Waits for every pack upload in flight; the first failure is returned (all are awaited).
    fn barrier(&self) -> Result<(), S3Error> {
        let pending: Vec<_> = self.lock_inflight().drain(..).collect();
        let mut first = None;
        for upload in pending {
            if let Err(e) = self.join(upload) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Waits for one upload.
    fn join(&self, (key, h): Upload) -> Result<(), S3Error> {
        self.rt
            .block_on(h)
            .unwrap_or_else(|e| Err(S3Error::Other { op: "put", key, cause: format!("upload task failed: {e}") }))
    }

    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, VecDeque<Upload>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a request needs (the client, the bucket and the options).
struct Ctx {
    client: Client,
    bucket: String,
    endpoint: String,
    opts: S3Options,
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
}

impl Ctx {
    /// Classifies an SDK error.
    fn failure<E>(&self, op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = match &e {
            SdkError::ServiceError(s) => Some(s.raw().status().as_u16()),
            _ => None,
        };
        let code = e.code().unwrap_or_default().to_string();
        let text = DisplayErrorContext(&e).to_string();
        let other = |cause: String| S3Error::Other { op, key: key.to_string(), cause };
        match (&e, status) {
            (SdkError::ServiceError(_), Some(s)) => {
                let msg = e.message().unwrap_or_default().to_string();
                let cause = format!("HTTP {s} {code} {msg}").trim().to_string();
                match (s, code.as_str()) {
                    (404, "NoSuchBucket") => Failure {
                        error: S3Error::NoSuchBucket { endpoint: self.endpoint.clone(), bucket: self.bucket.clone() },
                        retry: false,
                    },
                    (404, _) => Failure { error: S3Error::NotFound { key: key.to_string() }, retry: false },
                    (401 | 403, _) => Failure {
                        error: S3Error::Credentials {
                            endpoint: self.endpoint.clone(),
                            bucket: self.bucket.clone(),
                            code: if code.is_empty() { format!("HTTP {s}") } else { code },
                        },
                        retry: false,
                    },
                    (429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                        Failure { error: other(cause), retry: true }
                    }
                    _ => Failure { error: other(cause), retry: false },
                }
            }
            (SdkError::DispatchFailure(d), _) => {
                let lower = text.to_lowercase();
                if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
                    Failure { error: S3Error::Tls { endpoint: self.endpoint.clone(), cause: text }, retry: false }
                } else if d.is_io() || d.is_timeout() || d.is_other() {
                    Failure {
                        error: S3Error::Unreachable { endpoint: self.endpoint.clone(), cause: text },
                        retry: true,
                    }
                } else {
                    Failure { error: other(text), retry: false }
                }
            }
            (SdkError::TimeoutError(_), _) => Failure {
                error: S3Error::Unreachable { endpoint: self.endpoint.clone(), cause: format!("timed out: {text}") },
                retry: true,
            },
            // The connection dropped mid-response, or the response was cut or garbled.
            (SdkError::ResponseError(_), _) => Failure { error: other(text), retry: true },
            _ => Failure { error: other(text), retry: false },
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or runs out of attempts.
    async fn retry<T, F, Fut>(&self, op: &'static str, key: &str, attempt: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure { error, retry: true }) if n < self.opts.max_attempts => {
                    let cap = self.opts.base_backoff.saturating_mul(1 << (n - 1).min(16)).min(self.opts.max_backoff);
                    let delay = cap.mul_f64(jitter());
                    warn!(
                        op,
                        key,
                        attempt = n,
                        of = self.opts.max_attempts,
                        ?delay,
                        "S3 request failed, retrying: {error}"
                    );
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                Err(f) => return Err(f.error),
            }
        }
    }

    async fn get(&self, key: &str, range: Option<String>) -> Result<Bytes, S3Error> {
        self.retry("get", key, move || {
            let range = range.clone();
            async move {
                let resp = self
                    .client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .set_range(range)
                    .send()
                    .await
                    .map_err(|e| self.failure("get", key, e))?;
                // A connection dropped while the body streams is worth another attempt.
                let body = resp.body.collect().await.map_err(|e| Failure {
                    error: S3Error::Other { op: "get", key: key.to_string(), cause: format!("reading the body: {e}") },
                    retry: true,
                })?;
                Ok(body.into_bytes())
            }
        })
        .await
    }

    async fn put(&self, key: String, body: Bytes) -> Result<(), S3Error> {
        debug!(key, bytes = body.len(), multipart = body.len() >= self.opts.multipart_threshold, "upload");
        if body.len() >= self.opts.multipart_threshold {
            return self.put_multipart(&key, body).await;
        }
        let key = key.as_str();
        self.retry("put", key, move || {
            let body = body.clone();
            async move {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .set_storage_class(self.storage_class.clone())
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.failure("put", key, e))
            }
        })
        .await
    }

    async fn put_multipart(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let upload = self
            .retry("create multipart upload", key, move || async move {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .set_storage_class(self.storage_class.clone())
                    .send()
                    .await
                    .map_err(|e| self.failure("create multipart upload", key, e))
            })
            .await?;
        let id = upload.upload_id().unwrap_or_default().to_string();
        let id = id.as_str();
        let result = async {
            let mut parts = Vec::new();
            for (i, chunk) in body.chunks(self.opts.part_size.max(5 << 20)).enumerate() {
                let number = i as i32 + 1;
                let part = body.slice_ref(chunk);
                let done = self
                    .retry("upload part", key, || {
                        let part = part.clone();
                        async move {
                            self.client
                                .upload_part()
                                .bucket(&self.bucket)
                                .key(key)
                                .upload_id(id)
                                .part_number(number)
                                .body(ByteStream::from(part))
                                .send()
                                .await
                                .map_err(|e| self.failure("upload part", key, e))
                        }
                    })
                    .await?;
                parts.push(
                    CompletedPart::builder().part_number(number).set_e_tag(done.e_tag().map(str::to_string)).build(),
                );
            }
            let parts = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
            self.retry("complete multipart upload", key, || {
                let parts = parts.clone();
                async move {
                    self.client
                        .complete_multipart_upload()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(id)
                        .multipart_upload(parts)
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| self.failure("complete multipart upload", key, e))
                }
            })
            .await
        }
        .await;
        if result.is_err() {
            // Leave no orphaned parts behind (best effort; the provider's lifecycle rules catch the rest).
            let _ = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(id).send().await;
        }
        result
    }
}

/// A factor in [0, 1) for full jitter; no cryptographic quality needed.
fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let seed = STATE.load(Ordering::Relaxed);
    let mut x = if seed == 0 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
            | 1
    } else {
        seed
    };
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Wraps an S3 error for rustic_core, keeping it as the source (`shmback` finds it in the error
/// chain for its message and exit status).
fn rustic_err(e: S3Error) -> Box<RusticError> {
    let kind = match e {
        S3Error::Credentials { .. } => ErrorKind::Credentials,
        S3Error::NoSuchBucket { .. } => ErrorKind::Configuration,
        _ => ErrorKind::Backend,
    };
    RusticError::with_source(kind, "S3 backend", e)
}

impl ReadBackend for S3Backend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        let ctx = &*self.ctx;
        if tpe == FileType::Config {
            let key = self.key(tpe, &Id::default());
            let (c, k) = (ctx, key.as_str());
            let head = self.rt.block_on(c.retry("head", k, move || async move {
                c.client.head_object().bucket(&c.bucket).key(k).send().await.map_err(|e| c.failure("head", k, e))
            }));
            return match head {
                Ok(h) => Ok(vec![(Id::default(), h.content_length().unwrap_or(0).try_into().unwrap_or(u32::MAX))]),
                Err(S3Error::NotFound { .. }) => Ok(vec![]),
                Err(e) => Err(rustic_err(e)),
            };
        }
        let dir = format!("{}{}/", self.prefix, tpe.dirname());
        let (c, d) = (ctx, dir.as_str());
        let result = self.rt.block_on(async move {
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let tok = token.clone();
                let page = c
                    .retry("list", d, move || {
                        let tok = tok.clone();
                        async move {
                            c.client
                                .list_objects_v2()
                                .bucket(&c.bucket)
                                .prefix(d)
                                .set_continuation_token(tok)
                                .send()
                                .await
                                .map_err(|e| c.failure("list", d, e))
                        }
                    })
                    .await?;
                for obj in page.contents() {
                    let Some(key) = obj.key() else { continue };
                    let name = key.rsplit('/').next().unwrap_or_default();
                    // Anything not named by an id (a stray file, a directory marker) is not ours.
                    match name.parse::<Id>() {
                        Ok(id) => out.push((id, obj.size().unwrap_or(0).try_into().unwrap_or(u32::MAX))),
                        Err(_) => debug!(key, "ignoring an object that is not named by an id"),
                    }
                }
                token = page.next_continuation_token().map(str::to_string);
                if token.is_none() || page.is_truncated() == Some(false) {
                    return Ok::<_, S3Error>(out);
                }
            }
        });
        result.map_err(rustic_err)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        let ctx = &*self.ctx;
        self.rt.block_on(ctx.get(&self.key(tpe, id), None)).map_err(rustic_err)
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        if length == 0 {
            return Ok(Bytes::new());
        }
        let ctx = &*self.ctx;
        // An explicit range: renterd/s3d refuse suffix ranges (`bytes=-N`).
        let range = format!("bytes={}-{}", offset, u64::from(offset) + u64::from(length) - 1);
        let got = self.rt.block_on(ctx.get(&self.key(tpe, id), Some(range))).map_err(rustic_err)?;
        if got.len() != length as usize {
            return Err(RusticError::new(
                ErrorKind::Backend,
                "S3 returned {got} bytes for a range of {want} in `{key}`",
            )
            .attach_context("got", got.len().to_string())
            .attach_context("want", length.to_string())
            .attach_context("key", self.key(tpe, id)));
        }
        Ok(got)
    }

    fn warmup_path(&self, tpe: FileType, id: &Id) -> String {
        self.key(tpe, id)
    }
}

impl WriteBackend for S3Backend {
    fn create(&self) -> RusticResult<()> {
        let ctx = &*self.ctx;
        let c = ctx;
        let head = self.rt.block_on(c.retry("head bucket", &c.bucket, move || async move {
            c.client.head_bucket().bucket(&c.bucket).send().await.map_err(|e| c.failure("head bucket", &c.bucket, e))
        }));
        let missing = matches!(head, Err(S3Error::NotFound { .. } | S3Error::NoSuchBucket { .. }));
        match head {
            Ok(_) => Ok(()),
            Err(_) if missing && ctx.opts.create_bucket => {
                let region = ctx.client.config().region().map(|r| r.to_string()).unwrap_or_default();
                let conf = (region != "us-east-1" && !region.is_empty()).then(|| {
                    CreateBucketConfiguration::builder()
                        .location_constraint(BucketLocationConstraint::from(region.as_str()))
                        .build()
                });
                self.rt
                    .block_on(c.retry("create bucket", &c.bucket, move || {
                        let conf = conf.clone();
                        async move {
                            c.client
                                .create_bucket()
                                .bucket(&c.bucket)
                                .set_create_bucket_configuration(conf)
                                .send()
                                .await
                                .map(|_| ())
                                .map_err(|e| c.failure("create bucket", &c.bucket, e))
                        }
                    }))
                    .map_err(rustic_err)
            }
            Err(_) if missing => {
                Err(rustic_err(S3Error::NoSuchBucket { endpoint: ctx.endpoint.clone(), bucket: ctx.bucket.clone() }))
            }
            Err(e) => Err(rustic_err(e)),
        }
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, _cacheable: bool, buf: BytesList) -> RusticResult<()> {
        let key = self.key(tpe, id);
        let parts = buf.into_vec();
        let body = if parts.len() == 1 {
            parts.into_iter().next().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            parts.iter().for_each(|p| b.extend_from_slice(p));
            b.freeze()
        };
        let ctx = &*self.ctx;
        if tpe == FileType::Pack {
            // Report a failed earlier upload now rather than at the barrier.
            let mut q = self.lock_inflight();
            while let Some((_, h)) = q.front() {
                if !h.is_finished() {
                    break;
                }
                let upload = q.pop_front().expect("front exists");
                self.join(upload).map_err(rustic_err)?;
            }
            let handle = self.rt.spawn({
                let (ctx, key) = (Arc::clone(&self.ctx), key.clone());
                async move { ctx.put(key, body).await }
            });
            q.push_back((key, handle));
            while q.len() > ctx.opts.inflight.max(1) {
                let upload = q.pop_front().expect("non-empty");
                drop(q);
                self.join(upload).map_err(rustic_err)?;
                q = self.lock_inflight();
            }
            return Ok(());
        }
        // Index, snapshot, key, config: only once every earlier pack is stored.
        self.barrier().map_err(rustic_err)?;
        self.rt.block_on(ctx.put(key, body)).map_err(rustic_err)
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let key = self.key(tpe, id);
        let ctx = &*self.ctx;
        let (c, k) = (ctx, key.as_str());
        self.rt
            .block_on(c.retry("delete", k, move || async move {
                c.client
                    .delete_object()
                    .bucket(&c.bucket)
                    .key(k)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| c.failure("delete", k, e))
            }))
            .map_err(rustic_err)
    }
}

impl Drop for S3Backend {
    fn drop(&mut self) {
        // Pack uploads still in flight finish (or fail) before the runtime goes away.
        if let Err(e) = self.barrier() {
            warn!("a pack upload failed while the S3 backend closed: {e}");
        }
    }
}
