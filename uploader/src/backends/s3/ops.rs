//! The S3 backend's operations: rustic_core's `ReadBackend`/`WriteBackend` on the SDK client.
//!
//! rustic_core's backend traits are synchronous: the backend owns a small tokio runtime and blocks
//! on it. Pack uploads are pipelined (up to `inflight` at once) behind a **barrier**: any other
//! write (index, snapshot, key, config) first waits for every earlier pack upload and fails if one
//! failed, so an index or snapshot never references data that is not stored. Every request takes
//! one shape ([`Ctx::call`]): build and send, classify a failure, retry with backoff (logged).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration};
use bytes::{Bytes, BytesMut};
use rustic_core::{BytesList, ErrorKind, FileType, Id, ReadBackend, RusticError, RusticResult, WriteBackend};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::config::{S3Options, client, without_checksums};
use super::error::{Failure, S3Error, Target, classify, rustic_err};
use super::retry::Backoff;
use crate::backends::location::S3Location;

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
        let client = client(&rt, loc, &opts);
        let fallback = opts.checksums_for(loc).then(|| without_checksums(&client));
        let prefix = if loc.prefix.is_empty() { String::new() } else { format!("{}/", loc.prefix) };
        let storage_class = opts.storage_class.as_deref().map(aws_sdk_s3::types::StorageClass::from);
        let ctx = Ctx {
            client,
            fallback,
            checksums_off: AtomicBool::new(false),
            bucket: loc.bucket.clone(),
            endpoint: loc.endpoint(),
            backoff: opts.backoff(),
            opts,
            storage_class,
        };
        Ok(S3Backend {
            rt,
            ctx: Arc::new(ctx),
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
    /// `client` without checksum headers, when `client` sends them on every upload: used once a
    /// server refused them (`checksums_off`).
    fallback: Option<Client>,
    checksums_off: AtomicBool,
    bucket: String,
    endpoint: String,
    opts: S3Options,
    backoff: Backoff,
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
}

impl Ctx {
    /// One attempt: `request` builds the request on the client and sends it; a failure is
    /// classified (which error, and whether to retry).
    async fn attempt<T, E, Fut>(
        &self,
        op: &'static str,
        key: &str,
        request: impl FnOnce(&Client) -> Fut,
    ) -> Result<T, Failure>
    where
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let target = Target { endpoint: &self.endpoint, bucket: &self.bucket };
        request(self.client()).await.map_err(|e| classify(&target, op, key, e))
    }

    /// The client requests go out with: without checksum headers once a server refused them.
    fn client(&self) -> &Client {
        match &self.fallback {
            Some(f) if self.checksums_off.load(Ordering::Relaxed) => f,
            _ => &self.client,
        }
    }

    /// After `refused`: switches the process to checksums only where required (logged once);
    /// `false` when it already sends none, so there is nothing to fall back to.
    fn fall_back(&self, refused: &S3Error, was_off: bool) -> bool {
        if self.fallback.is_none() || was_off {
            return false;
        }
        if !self.checksums_off.swap(true, Ordering::SeqCst) {
            warn!(
                "the S3 endpoint {} refused checksum headers ({refused}); uploads go on without them, \
                 integrity stays checked by the repository's hashes",
                self.endpoint
            );
        }
        true
    }

    /// The shape of every S3 call: attempts of `request` with backoff, each retry logged.
    async fn call<T, E, Fut>(&self, op: &'static str, key: &str, request: impl Fn(&Client) -> Fut) -> Result<T, S3Error>
    where
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        debug!(op, key, "S3 request");
        self.backoff.run(op, key, || self.attempt(op, key, &request)).await
    }

    async fn get(&self, key: &str, range: Option<String>) -> Result<Bytes, S3Error> {
        debug!(op = "get", key, "S3 request");
        // The body is read inside the attempt: a connection dropped while it streams is retried.
        self.backoff
            .run("get", key, || async {
                let req = |c: &Client| c.get_object().bucket(&self.bucket).key(key).set_range(range.clone()).send();
                let resp = self.attempt("get", key, req).await?;
                let body = resp.body.collect().await.map_err(|e| Failure {
                    error: S3Error::Other { op: "get", key: key.to_string(), cause: format!("reading the body: {e}") },
                    retry: true,
                })?;
                Ok(body.into_bytes())
            })
            .await
    }

    /// Uploads `body` to `key`; refused for its checksum headers, retried once without them.
    async fn put(&self, key: String, body: Bytes) -> Result<(), S3Error> {
        let was_off = self.checksums_off.load(Ordering::SeqCst);
        let first = match self.put_once(&key, body.clone()).await {
            Err(e @ S3Error::ChecksumRefused { .. }) if self.fall_back(&e, was_off) => self.put_once(&key, body).await,
            other => other,
        };
        first.map_err(|e| match e {
            // Refused without the optional headers too: nothing this process can leave out.
            S3Error::ChecksumRefused { op, key, cause, .. } => S3Error::Other { op, key, cause },
            e => e,
        })
    }

    async fn put_once(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let multipart = body.len() >= self.opts.multipart_threshold;
        debug!(key, bytes = body.len(), multipart, "upload");
        if multipart {
            return self.put_multipart(key, body).await;
        }
        let (b, k) = (&self.bucket, key);
        self.call("put", k, |c| {
            let req = c.put_object().bucket(b).key(k).set_storage_class(self.storage_class.clone());
            req.body(ByteStream::from(body.clone())).send()
        })
        .await
        .map(|_| ())
    }

    async fn put_multipart(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        let b = &self.bucket;
        let upload = self
            .call("create multipart upload", key, |c| {
                c.create_multipart_upload().bucket(b).key(key).set_storage_class(self.storage_class.clone()).send()
            })
            .await?;
        let id = upload.upload_id().unwrap_or_default();
        let result = async {
            let mut parts = Vec::new();
            for (i, chunk) in body.chunks(self.opts.part_size.max(5 << 20)).enumerate() {
                let number = i as i32 + 1;
                let part = body.slice_ref(chunk);
                let done = self
                    .call("upload part", key, |c| {
                        let req = c.upload_part().bucket(b).key(key).upload_id(id).part_number(number);
                        req.body(ByteStream::from(part.clone())).send()
                    })
                    .await?;
                let etag = done.e_tag().map(str::to_string);
                parts.push(CompletedPart::builder().part_number(number).set_e_tag(etag).build());
            }
            let parts = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
            self.call("complete multipart upload", key, |c| {
                let req = c.complete_multipart_upload().bucket(b).key(key).upload_id(id);
                req.multipart_upload(parts.clone()).send()
            })
            .await
            .map(|_| ())
        }
        .await;
        if result.is_err() {
            // Leave no orphaned parts behind (best effort; the provider's lifecycle rules catch the rest).
            let _ = self.client().abort_multipart_upload().bucket(b).key(key).upload_id(id).send().await;
        }
        result
    }

    async fn list(&self, dir: &str) -> Result<Vec<(Id, u32)>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("list", dir, |c| {
                    c.list_objects_v2().bucket(&self.bucket).prefix(dir).set_continuation_token(token.clone()).send()
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
                return Ok(out);
            }
        }
    }

    /// `create()`: the bucket must exist, or is created with `create_bucket`.
    async fn ensure_bucket(&self) -> Result<(), S3Error> {
        let b = &self.bucket;
        let head = self.call("head bucket", b, |c| c.head_bucket().bucket(b).send()).await;
        match head {
            Ok(_) => Ok(()),
            Err(S3Error::NotFound { .. } | S3Error::NoSuchBucket { .. }) if self.opts.create_bucket => {
                let region = self.client.config().region().map(|r| r.to_string()).unwrap_or_default();
                let conf = (region != "us-east-1" && !region.is_empty()).then(|| {
                    let constraint = BucketLocationConstraint::from(region.as_str());
                    CreateBucketConfiguration::builder().location_constraint(constraint).build()
                });
                self.call("create bucket", b, |c| {
                    c.create_bucket().bucket(b).set_create_bucket_configuration(conf.clone()).send()
                })
                .await
                .map(|_| ())
            }
            Err(S3Error::NotFound { .. } | S3Error::NoSuchBucket { .. }) => {
                Err(S3Error::NoSuchBucket { endpoint: self.endpoint.clone(), bucket: b.clone() })
            }
            Err(e) => Err(e),
        }
    }
}

impl ReadBackend for S3Backend {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn list_with_size(&self, tpe: FileType) -> RusticResult<Vec<(Id, u32)>> {
        let ctx = &*self.ctx;
        if tpe == FileType::Config {
            let key = self.key(tpe, &Id::default());
            let k = key.as_str();
            let head = self.rt.block_on(ctx.call("head", k, |c| c.head_object().bucket(&ctx.bucket).key(k).send()));
            return match head {
                Ok(h) => Ok(vec![(Id::default(), h.content_length().unwrap_or(0).try_into().unwrap_or(u32::MAX))]),
                Err(S3Error::NotFound { .. }) => Ok(vec![]),
                Err(e) => Err(rustic_err(e)),
            };
        }
        let dir = format!("{}{}/", self.prefix, tpe.dirname());
        self.rt.block_on(ctx.list(&dir)).map_err(rustic_err)
    }

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        self.rt.block_on(self.ctx.get(&self.key(tpe, id), None)).map_err(rustic_err)
    }

    fn read_partial(&self, tpe: FileType, id: &Id, _cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        if length == 0 {
            return Ok(Bytes::new());
        }
        // An explicit range: renterd/s3d refuse suffix ranges (`bytes=-N`).
        let range = format!("bytes={}-{}", offset, u64::from(offset) + u64::from(length) - 1);
        let got = self.rt.block_on(self.ctx.get(&self.key(tpe, id), Some(range))).map_err(rustic_err)?;
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
        self.rt.block_on(self.ctx.ensure_bucket()).map_err(rustic_err)
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
            while q.len() > self.ctx.opts.inflight.max(1) {
                let upload = q.pop_front().expect("non-empty");
                drop(q);
                self.join(upload).map_err(rustic_err)?;
                q = self.lock_inflight();
            }
            return Ok(());
        }
        // Index, snapshot, key, config: only once every earlier pack is stored.
        self.barrier().map_err(rustic_err)?;
        self.rt.block_on(self.ctx.put(key, body)).map_err(rustic_err)
    }

    fn remove(&self, tpe: FileType, id: &Id, _cacheable: bool) -> RusticResult<()> {
        let key = self.key(tpe, id);
        let (ctx, k) = (&*self.ctx, key.as_str());
        self.rt
            .block_on(ctx.call("delete", k, |c| c.delete_object().bucket(&ctx.bucket).key(k).send()))
            .map(|_| ())
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
