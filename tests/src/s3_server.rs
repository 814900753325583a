//! An S3 server on 127.0.0.1 for tests and benchmarks: `s3s` + `s3s-fs` serving a directory (each
//! subdirectory a bucket) over real HTTP, behind a layer that fails requests on demand
//! ([`Faults`]). The uploader's S3 tests and the benchmark's `shmback-s3-server` both use it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};

/// Faults to inject: the next `n` requests of a kind (whose key contains a needle) fail.
#[derive(Default)]
pub struct Faults {
    put_fail: AtomicU32,
    put_needle: Mutex<String>,
    get_fail: AtomicU32,
    injected: AtomicU32,
    parts: AtomicU32,
    refuse_checksums: AtomicBool,
    checksum_refused: AtomicU32,
    checksum_seen: AtomicU32,
}

impl Faults {
    /// The next `n` PUTs of keys containing `needle` answer 503 SlowDown (`u32::MAX`: all of them).
    pub fn fail_puts(&self, n: u32, needle: &str) {
        *self.put_needle.lock().unwrap_or_else(|p| p.into_inner()) = needle.to_string();
        self.put_fail.store(n, Ordering::SeqCst);
    }

    /// The next `n` GETs answer 500 InternalError.
    pub fn fail_gets(&self, n: u32) {
        self.get_fail.store(n, Ordering::SeqCst);
    }

    /// From now on (`true`), refuse every request that carries an `x-amz-checksum-*` header or
    /// `x-amz-trailer` as Backblaze B2's S3 endpoint once did: 400 InvalidArgument "Unsupported
    /// header 'x-amz-checksum-crc32'".
    pub fn refuse_checksums(&self, on: bool) {
        self.refuse_checksums.store(on, Ordering::SeqCst);
    }

    /// Requests refused for their checksum headers so far.
    pub fn checksum_refused(&self) -> u32 {
        self.checksum_refused.load(Ordering::SeqCst)
    }

    /// Write requests that carried a checksum header (`x-amz-checksum-*` or `x-amz-trailer`) so
    /// far, refused or not.
    pub fn checksum_seen(&self) -> u32 {
        self.checksum_seen.load(Ordering::SeqCst)
    }

    /// The checksum fault for a write request with `headers`.
    fn checksum_check<T>(&self, req: &S3Request<T>) -> S3Result<()> {
        let headers = &req.headers;
        let named = headers.keys().find(|k| k.as_str().starts_with("x-amz-checksum-") || k.as_str() == "x-amz-trailer");
        let Some(name) = named else { return Ok(()) };
        self.checksum_seen.fetch_add(1, Ordering::SeqCst);
        if !self.refuse_checksums.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.checksum_refused.fetch_add(1, Ordering::SeqCst);
        // B2 named the checksum header even when it came as a trailer.
        let header = match headers.get("x-amz-trailer").and_then(|v| v.to_str().ok()) {
            Some(trailer) => trailer.to_string(),
            None => name.as_str().to_string(),
        };
        Err(s3_error!(InvalidArgument, "Unsupported header '{header}' received for this API call."))
    }

    /// Failures injected so far.
    pub fn injected(&self) -> u32 {
        self.injected.load(Ordering::SeqCst)
    }

    /// Multipart parts uploaded so far.
    pub fn parts(&self) -> u32 {
        self.parts.load(Ordering::SeqCst)
    }

    fn take(&self, counter: &AtomicU32, key: &str, needle: &str) -> bool {
        if !key.contains(needle) {
            return false;
        }
        let hit = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if hit {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

/// `s3s-fs` behind a layer that fails requests on demand.
struct Faulty {
    fs: s3s_fs::FileSystem,
    faults: Arc<Faults>,
}

#[async_trait::async_trait]
impl S3 for Faulty {
    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let needle = self.faults.put_needle.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if self.faults.take(&self.faults.put_fail, &req.input.key, &needle) {
            return Err(s3_error!(SlowDown, "injected: slow down"));
        }
        self.faults.checksum_check(&req)?;
        self.fs.put_object(req).await
    }
    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        if self.faults.take(&self.faults.get_fail, &req.input.key, "") {
            return Err(s3_error!(InternalError, "injected: internal error"));
        }
        self.fs.get_object(req).await
    }
    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }
    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }
    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }
    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }
    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }
    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.faults.checksum_check(&req)?;
        self.fs.create_multipart_upload(req).await
    }
    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.faults.checksum_check(&req)?;
        self.faults.parts.fetch_add(1, Ordering::SeqCst);
        self.fs.upload_part(req).await
    }
    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.faults.checksum_check(&req)?;
        self.fs.complete_multipart_upload(req).await
    }
    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }
    // The rest of what s3s-fs serves, passed through unchanged: restic asks for the bucket's
    // location before anything else (the end-to-end benchmark runs restic against this server).
    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }
    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }
    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }
    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        self.fs.delete_objects(req).await
    }
    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.fs.delete_bucket(req).await
    }
    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        self.fs.copy_object(req).await
    }
    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        self.fs.upload_part_copy(req).await
    }
    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }
}

/// A running server; stopped on drop.
pub struct S3Server {
    addr: SocketAddr,
    faults: Arc<Faults>,
    rt: Option<tokio::runtime::Runtime>,
}

impl S3Server {
    /// Serves `root` on 127.0.0.1:`port` (0: any free port) to the one key `access_key`/`secret_key`.
    pub fn start(root: &Path, port: u16, access_key: &str, secret_key: &str) -> std::io::Result<S3Server> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let faults = Arc::new(Faults::default());
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| std::io::Error::other(format!("serving {}: {e:?}", root.display())))?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(Faulty { fs, faults: faults.clone() });
            b.set_auth(s3s::auth::SimpleAuth::from_single(access_key, secret_key));
            b.build()
        };
        let listener = rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))?;
        let addr = listener.local_addr()?;
        rt.spawn(async move {
            let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                let conn = http.serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone()).into_owned();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
        });
        Ok(S3Server { addr, faults, rt: Some(rt) })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its fault switches.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The restic location of `bucket_and_prefix` on this server (`s3:http://…/bucket/prefix`).
    pub fn location(&self, bucket_and_prefix: &str) -> String {
        format!("s3:http://{}/{bucket_and_prefix}", self.addr)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
