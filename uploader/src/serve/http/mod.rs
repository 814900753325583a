//! Batches over HTTP, between services that share no `/dev/shm` (shm-proto/PROTOCOL.md, "Over
//! HTTP"): pushed by producers to `shmback run --listen` (`listen.rs`), or pulled by `shmback run
//! --pull` from a producer running `shmback-send --serve` (`pull.rs`).
//!
//! Either way a body becomes a [`Source::Body`](super::source::Source) served by the same loop,
//! decoder and snapshot gate as a segment, on its own thread with a repository handle from a
//! small pool (`Bodies` here); its outcome is the HTTP answer (`reply.rs`).

pub(crate) mod body;
mod listen;
mod producers;
mod pull;
mod reply;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

pub use listen::{bind, listen};
pub use pull::{Puller, pull};

use self::body::{BodySource, Chunk};
use self::producers::Producers;
use self::reply::Reply;
use super::batch::{Repo, open_repo};
use super::options::{BatchOutcome, ServeOptions};
use super::segment::{SegmentStop, serve_source};
use super::source::Source;
use crate::backends::failure::without_empty_backtraces;
use crate::config::RepositoryConfig;

/// Called with each batch's source label (`http:PRODUCER`) and outcome.
pub type OnBatch = Arc<dyn Fn(&str, &BatchOutcome) + Send + Sync>;

/// The HTTP side's settings (`--listen`, `--pull` and their limits).
#[derive(Clone, Debug)]
pub struct HttpOptions {
    /// The bearer token clients must present (and the puller presents); `None` accepts anyone.
    pub token: Option<Vec<u8>>,
    /// Batches archived at once over HTTP, all producers together (each holds a repository
    /// handle and the engine's working memory).
    pub max_batches: usize,
    /// Largest frame payload a body may carry.
    pub max_frame: usize,
    /// Most connections open at once (a connection beyond is closed at once).
    pub max_connections: usize,
    /// How long a client may take to send a request's headers.
    pub header_timeout: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            token: None,
            max_batches: 4,
            max_frame: shmback_proto::stream::DEFAULT_MAX_FRAME,
            max_connections: 256,
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// The bodies being served, and what they share: repository handles, the per-producer record,
/// the concurrency limit.
pub(crate) struct Bodies {
    config: RepositoryConfig,
    opts: ServeOptions,
    http: HttpOptions,
    stop: Arc<AtomicBool>,
    on_batch: OnBatch,
    runtime: Handle,
    pool: Mutex<Vec<Repo>>,
    producers: Arc<Producers>,
    active: AtomicUsize,
}

/// Holds a concurrency slot, given back on drop. (The producer's in-flight mark is cleared by
/// the answer, so a producer can send its next batch at once.)
struct Slot {
    bodies: Arc<Bodies>,
    producer: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.bodies.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Bodies {
    /// Opens one repository handle first: a wrong password or an unreachable backend fails at
    /// start-up, not at the first batch.
    pub(crate) fn new(
        config: &RepositoryConfig,
        opts: &ServeOptions,
        http: &HttpOptions,
        stop: &Arc<AtomicBool>,
        on_batch: OnBatch,
        runtime: Handle,
    ) -> anyhow::Result<Arc<Self>> {
        let first = open_repo(config, false)?;
        Ok(Arc::new(Bodies {
            config: config.clone(),
            opts: opts.clone(),
            http: http.clone(),
            stop: stop.clone(),
            on_batch,
            runtime,
            pool: Mutex::new(vec![first]),
            producers: Arc::new(Producers::default()),
            active: AtomicUsize::new(0),
        }))
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Batches being served now.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Starts serving one body of `producer` on its own thread: returns where to send its
    /// chunks, and where its answer comes; or the answer at once (busy, shutting down).
    pub(crate) fn start(
        self: &Arc<Self>,
        producer: &str,
    ) -> Result<(mpsc::Sender<Chunk>, oneshot::Receiver<Reply>), Reply> {
        if self.stopping() {
            return Err(Reply::shutting_down(0));
        }
        if !self.producers.try_begin(producer) {
            return Err(Reply::busy(&format!(
                "producer {producer} already has a batch in flight: one at a time per producer; retry once it is answered"
            )));
        }
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.http.max_batches {
            self.active.fetch_sub(1, Ordering::AcqRel);
            self.producers.end(producer);
            return Err(Reply::busy(&format!(
                "the uploader is archiving {} batches already (--listen-max-batches); retry shortly",
                self.http.max_batches
            )));
        }
        let slot = Slot { bodies: self.clone(), producer: producer.to_string() };
        // A few chunks in flight: memory stays bounded, and TCP slows a sender the archiver
        // cannot keep up with.
        let (chunks_tx, chunks_rx) = mpsc::channel(8);
        let (answer_tx, answer_rx) = oneshot::channel();
        let producers = self.producers.clone();
        let answering = producer.to_string();
        let source = BodySource::new(
            chunks_rx,
            self.runtime.clone(),
            self.http.max_frame,
            producer.to_string(),
            self.producers.clone(),
            Box::new(move |reply| {
                producers.end(&answering);
                let _ = answer_tx.send(reply);
            }),
            self.stop.clone(),
        );
        let name = format!("http:{producer}");
        let bodies = self.clone();
        let spawned =
            std::thread::Builder::new().name(name.chars().take(15).collect()).spawn(move || bodies.serve(slot, source));
        if let Err(e) = spawned {
            // The source and its answer went down with the closure: the client sees the
            // connection close and resends.
            error!("could not start a thread for a batch over HTTP: {e}");
            self.producers.end(producer);
        }
        Ok((chunks_tx, answer_rx))
    }

    fn take_repo(&self) -> anyhow::Result<Repo> {
        match self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            Some(repo) => Ok(repo),
            None => open_repo(&self.config, false),
        }
    }

    fn serve(&self, slot: Slot, source: BodySource) {
        let label = format!("http:{}", slot.producer);
        let mut source = Box::new(source);
        let mut repo = match self.take_repo() {
            Ok(repo) => repo,
            Err(e) => {
                let why = without_empty_backtraces(&format!("opening the repository failed: {e:#}"));
                error!(from = %label, "{why}");
                source.publish(&BatchOutcome::Rejected {
                    seq: source.unanswered_seq().unwrap_or(0),
                    why,
                    code: shmback_proto::RejectCode::StorageFailed,
                });
                return;
            }
        };
        let on_batch = self.on_batch.clone();
        let result = serve_source(&mut repo, &label, Source::Body(source), &self.opts, self.stop.clone(), |o| {
            on_batch(&label, o)
        });
        match result {
            Ok(()) | Err(SegmentStop::Ring(_)) | Err(SegmentStop::Attach(_)) => {
                self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(repo);
            }
            // The handle is dropped; the next body opens a fresh one.
            Err(SegmentStop::Repository(e)) => {
                warn!(from = %label, "{}", without_empty_backtraces(&format!("the repository failed: {e:#}")))
            }
        }
        drop(slot);
    }
}

/// Whether `given` (an `Authorization` header value) carries `token`.
pub(crate) fn authorized(token: Option<&[u8]>, given: Option<&[u8]>) -> bool {
    let Some(token) = token else { return true };
    let Some(bearer) = given.and_then(|g| g.strip_prefix(b"Bearer ")) else { return false };
    shmback_proto::stream::token_matches(token, bearer)
}

/// Reads the token from `SHMBACK_TOKEN` or `SHMBACK_TOKEN_FILE` (trailing newline trimmed).
pub fn token_from(value: Option<String>, file: Option<&std::path::Path>) -> anyhow::Result<Option<Vec<u8>>> {
    use anyhow::Context as _;
    let token = match (value, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("both SHMBACK_TOKEN and SHMBACK_TOKEN_FILE are set: keep one")
        }
        (Some(v), None) => v.into_bytes(),
        (None, Some(f)) => {
            let mut v = std::fs::read(f).with_context(|| format!("reading the token file {}", f.display()))?;
            while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                v.pop();
            }
            v
        }
        (None, None) => return Ok(None),
    };
    anyhow::ensure!(!token.is_empty(), "the token is empty: set SHMBACK_TOKEN (or its file) to a secret, or unset it");
    Ok(Some(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens() {
        assert!(authorized(None, None));
        assert!(authorized(Some(b"s3cret"), Some(b"Bearer s3cret")));
        assert!(!authorized(Some(b"s3cret"), Some(b"Bearer s3cre")));
        assert!(!authorized(Some(b"s3cret"), Some(b"bearer s3cret")));
        assert!(!authorized(Some(b"s3cret"), Some(b"s3cret")));
        assert!(!authorized(Some(b"s3cret"), None));
    }

    #[test]
    fn token_sources() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "abc\n").unwrap();
        assert_eq!(token_from(None, Some(&f)).unwrap(), Some(b"abc".to_vec()));
        assert_eq!(token_from(Some("x".into()), None).unwrap(), Some(b"x".to_vec()));
        assert_eq!(token_from(None, None).unwrap(), None);
        assert!(token_from(Some("x".into()), Some(&f)).unwrap_err().to_string().contains("keep one"));
        std::fs::write(&f, "\n").unwrap();
        assert!(token_from(None, Some(&f)).unwrap_err().to_string().contains("empty"));
    }
}
