//! `shmback run --listen ADDR`: batches pushed over HTTP (`POST /v1/batches`).
//!
//! hyper parses HTTP/1.1 (chunked or sized bodies, header limits and a header timeout against
//! slow clients); each body's bytes go to its batch's thread through a bounded channel, and the
//! answer is sent only once the batch is settled. A body that stalls is rejected by the serve
//! loop's idle limit, which counts whole frames, so trickling bytes does not keep it alive.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use shmback_proto::stream::{CONTENT_TYPE as FRAMES, PRODUCER_HEADER, PUSH_PATH, valid_producer_name};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::reply::Reply;
use super::{Bodies, HttpOptions, OnBatch, authorized};
use crate::config::RepositoryConfig;
use crate::serve::options::ServeOptions;

/// Binds `--listen ADDR`, so a port in use fails at start-up with a message saying so.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot listen on {addr} (--listen): is another process using the port, or is the address not this host's?"
        )
    })
}

/// Serves batches pushed to `listener` (see [`bind`]) until `stop` is set; batches in flight
/// then get the grace period, and the call returns once they are answered.
///
/// The repository is opened before anything is served: a wrong password or an unreachable
/// backend fails at start-up.
pub fn listen(
    config: &RepositoryConfig,
    std_listener: std::net::TcpListener,
    http: &HttpOptions,
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_batch: OnBatch,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("shmback-http")
        .enable_all()
        .build()
        .context("starting the HTTP listener's runtime")?;
    std_listener.set_nonblocking(true)?;
    let bodies = Bodies::new(config, opts, http, stop, on_batch, runtime.handle().clone())?;
    let local = std_listener.local_addr()?;
    info!(%local, token = http.token.is_some(), "listening for batches over HTTP");
    if http.token.is_none() {
        warn!(
            %local,
            "no token set (SHMBACK_TOKEN / SHMBACK_TOKEN_FILE): anyone who can reach this address can send batches"
        );
    }
    runtime.block_on(accept_loop(std_listener, bodies.clone(), http.clone(), stop.clone()))?;
    // Batches in flight were told to stop (same flag): give them the grace period and a margin
    // for the snapshot write.
    let deadline = Instant::now() + opts.grace + Duration::from_secs(10);
    while bodies.active() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

async fn accept_loop(
    listener: std::net::TcpListener,
    bodies: Arc<Bodies>,
    http: HttpOptions,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let connections = Arc::new(Semaphore::new(http.max_connections));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    // Out of file descriptors and the like: wait rather than spin.
                    Err(e) => {
                        warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    debug!(%peer, "connection limit reached; closing");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let bodies = bodies.clone();
                let header_timeout = http.header_timeout;
                let token = http.token.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, peer, bodies.clone(), token.clone()));
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(header_timeout)
                        .max_buf_size(64 << 10)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        debug!(%peer, "connection ended: {e}");
                    }
                    drop(permit);
                });
            }
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
        }
    }
}

fn response(reply: Reply) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(reply.body.clone())));
    *r.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if !reply.body.is_empty() {
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    if let Some(secs) = reply.retry_after {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if reply.status == 401 {
        r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    bodies: Arc<Bodies>,
    token: Option<Vec<u8>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match (req.method(), req.uri().path()) {
        (&Method::POST, PUSH_PATH) => push(req, peer, &bodies, token.as_deref()).await,
        (_, PUSH_PATH) => Reply::method_not_allowed(),
        _ => Reply::not_found(),
    };
    Ok(response(reply))
}

async fn push(req: Request<Incoming>, peer: SocketAddr, bodies: &Arc<Bodies>, token: Option<&[u8]>) -> Reply {
    let headers = req.headers();
    if !authorized(token, headers.get(AUTHORIZATION).map(|v| v.as_bytes())) {
        debug!(%peer, "refused a batch: missing or wrong token");
        return Reply::unauthorized();
    }
    let content_type = headers.get(CONTENT_TYPE).map(|v| v.as_bytes());
    if content_type != Some(FRAMES.as_bytes()) {
        return Reply::protocol(&format!(
            "expected Content-Type {FRAMES} (shmback frames of codec version 1; the want-list frames of \
             version 2 are for rings only); this client speaks another protocol or version: run shmback-send \
             from the same release as the uploader"
        ));
    }
    let producer = match headers.get(PRODUCER_HEADER).and_then(|v| v.to_str().ok()) {
        Some(name) if valid_producer_name(name) => name.to_string(),
        _ => {
            return Reply::bad_request(&format!(
                "missing or invalid {PRODUCER_HEADER} header: 1 to 128 of A-Z a-z 0-9 . _ - naming the producer"
            ));
        }
    };
    let (chunks, mut answer) = match bodies.start(&producer) {
        Ok(started) => started,
        Err(reply) => return reply,
    };
    debug!(%peer, producer, "batch over HTTP started");
    let mut body = req.into_body();
    loop {
        tokio::select! {
            // The answer can come before the body's end (a rejection): send it at once.
            biased;
            reply = &mut answer => return reply.unwrap_or_else(|_| gone()),
            frame = body.frame() => match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else { continue };
                    tokio::select! {
                        biased;
                        reply = &mut answer => return reply.unwrap_or_else(|_| gone()),
                        // A closed channel means the batch's thread stopped reading: its
                        // answer is on the way.
                        _ = chunks.send(Ok(data)) => {}
                    }
                }
                Some(Err(e)) => {
                    let _ = chunks.send(Err(format!("the connection failed mid-body: {e}"))).await;
                    break;
                }
                None => break,
            },
        }
    }
    drop(chunks);
    answer.await.unwrap_or_else(|_| gone())
}

/// The batch's thread ended without an answer (it cannot, short of a panic).
fn gone() -> Reply {
    Reply::storage_failed(0, "the batch's worker stopped without an answer (see the uploader's log); resend it")
}
