//! `shmback run --pull URL`: the uploader asks a producer running `shmback-send --serve` for a
//! batch (`GET /v1/batch`), at start and then every interval, serves the body like a pushed one,
//! and posts the outcome back (`POST /v1/outcome`) so the producer learns of the durable ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use shmback_proto::stream::{CONTENT_TYPE as FRAMES, OUTCOME_PATH, PRODUCER_HEADER, PULL_PATH, valid_producer_name};
use tracing::{info, warn};

use super::reply::Reply;
use super::{Bodies, HttpOptions, OnBatch};
use crate::backends::failure::error_chain;
use crate::config::RepositoryConfig;
use crate::serve::options::ServeOptions;

/// First wait after a failed pull; doubled up to the interval.
const RETRY_FIRST: Duration = Duration::from_secs(10);

/// Pulls a batch from `url` at start and every `interval` until `stop` is set.
pub fn pull(
    config: &RepositoryConfig,
    url: &str,
    interval: Duration,
    http: &HttpOptions,
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_batch: OnBatch,
) -> anyhow::Result<()> {
    let puller = Puller::new(config, url, http, opts, stop, on_batch)?;
    info!(url = %puller.base, ?interval, "pulling batches");
    let mut retry = RETRY_FIRST;
    loop {
        let started = Instant::now();
        let wait = match puller.once() {
            Ok(()) => {
                retry = RETRY_FIRST;
                interval.saturating_sub(started.elapsed())
            }
            Err(why) => {
                warn!(url = %puller.base, "pulling a batch failed: {why}; trying again in {retry:?}");
                let wait = retry.min(interval);
                retry = (retry * 2).min(interval);
                wait
            }
        };
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
    }
}

/// Pulls one batch at a time from a producer running `shmback-send --serve`: what `--pull`
/// repeats every `--pull-interval`, and what a scheduled pull (`--pull` with `--schedule`) runs.
pub struct Puller {
    base: String,
    token: Option<String>,
    fallback_name: String,
    client: reqwest::Client,
    bodies: Arc<Bodies>,
    // Declared last: dropped after the bodies and the client that run on it.
    runtime: tokio::runtime::Runtime,
}

impl Puller {
    /// Checks `url` and the token, and prepares the HTTP client; pulls nothing yet.
    pub fn new(
        config: &RepositoryConfig,
        url: &str,
        http: &HttpOptions,
        opts: &ServeOptions,
        stop: &Arc<AtomicBool>,
        on_batch: OnBatch,
    ) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_string();
        let parsed: reqwest::Url =
            base.parse().with_context(|| format!("--pull {url}: not a URL (expected e.g. http://app:8701)"))?;
        anyhow::ensure!(matches!(parsed.scheme(), "http" | "https"), "--pull {url}: the scheme must be http or https");
        let fallback_name = parsed.host_str().filter(|h| valid_producer_name(h)).unwrap_or("producer").to_string();
        let token = match &http.token {
            Some(t) => {
                Some(String::from_utf8(t.clone()).context("the token must be text (it goes into an HTTP header)")?)
            }
            None => None,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shmback-pull")
            .enable_all()
            .build()
            .context("starting the puller's runtime")?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let bodies = Bodies::new(config, opts, http, stop, on_batch, runtime.handle().clone())?;
        Ok(Puller { base, token, fallback_name, client, bodies, runtime })
    }

    /// The producer's URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Pulls one batch and serves it; the error says why no snapshot was stored.
    pub fn once(&self) -> Result<(), String> {
        self.runtime.block_on(pull_once(
            &self.bodies,
            &self.client,
            &self.base,
            self.token.as_deref(),
            &self.fallback_name,
        ))
    }
}

async fn pull_once(
    bodies: &Arc<Bodies>,
    client: &reqwest::Client,
    base: &str,
    token: Option<&str>,
    fallback_name: &str,
) -> Result<(), String> {
    let mut request = client.get(format!("{base}{PULL_PATH}"));
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    let mut response = request.send().await.map_err(|e| format!("cannot reach the producer: {}", error_chain(&e)))?;
    match response.status().as_u16() {
        200 => {}
        401 => {
            return Err("the producer refused the token (401): set SHMBACK_TOKEN or SHMBACK_TOKEN_FILE to the \
                        producer's token"
                .into());
        }
        429 => return Err("the producer is busy sending a batch (to another uploader?)".into()),
        status => return Err(format!("the producer answered {status} to GET {PULL_PATH}")),
    }
    let content_type = response.headers().get(reqwest::header::CONTENT_TYPE).map(|v| v.as_bytes().to_vec());
    if content_type.as_deref() != Some(FRAMES.as_bytes()) {
        return Err(format!(
            "the producer's answer is not {FRAMES}: is {base} a producer running `shmback-send --serve` of this release?"
        ));
    }
    let name = response
        .headers()
        .get(PRODUCER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|n| valid_producer_name(n))
        .unwrap_or(fallback_name)
        .to_string();
    let (chunks, mut answer) = bodies.start(&name).map_err(|r| r.body)?;
    let reply = loop {
        tokio::select! {
            biased;
            reply = &mut answer => break reply.ok(),
            chunk = response.chunk() => match chunk {
                Ok(Some(bytes)) => {
                    tokio::select! {
                        biased;
                        reply = &mut answer => break reply.ok(),
                        _ = chunks.send(Ok(bytes)) => {}
                    }
                }
                Ok(None) => {
                    drop(chunks);
                    break answer.await.ok();
                }
                Err(e) => {
                    let _ = chunks.send(Err(format!("the connection failed mid-body: {e}"))).await;
                    drop(chunks);
                    break answer.await.ok();
                }
            },
        }
    };
    drop(response);
    let Some(reply) = reply else { return Err("the batch's worker stopped without an answer".into()) };
    post_outcome(client, base, token, &reply).await;
    match reply.status {
        200 => Ok(()),
        _ => Err(format!("the batch was not stored: {}", reply.body)),
    }
}

/// Tells the producer how its batch ended. Failing to tell it loses nothing (the snapshot is
/// stored or not either way); it is logged.
async fn post_outcome(client: &reqwest::Client, base: &str, token: Option<&str>, reply: &Reply) {
    let mut request = client
        .post(format!("{base}{OUTCOME_PATH}"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .timeout(Duration::from_secs(30))
        .body(reply.body.clone());
    if let Some(t) = token {
        request = request.bearer_auth(t);
    }
    match request.send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => warn!(url = %base, status = r.status().as_u16(), "the producer did not take the batch's outcome"),
        Err(e) => warn!(url = %base, "could not tell the producer the batch's outcome: {e}"),
    }
}
