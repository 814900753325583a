//! The monitoring endpoints over HTTP/1.1: `GET /metrics` (Prometheus text exposition),
//! `GET /healthz` and `GET /readyz`.
//!
//! Small on purpose: its own thread and single-threaded runtime (serving batches never waits on
//! it, nor it on them), a few connections at once, a header timeout against clients that never
//! finish a request, and nothing read from a request but its method and path.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::Readiness;

/// Connections served at once; more are closed at once. Prometheus and a kubelet's probes need
/// a handful.
const MAX_CONNECTIONS: usize = 16;
/// A request's headers must arrive within this (an idle kept-alive connection is closed after
/// it too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The Prometheus text exposition format's content type.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The running endpoints; they are served for as long as this value lives.
pub struct MetricsServer {
    local: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct State {
    handle: PrometheusHandle,
    readiness: Readiness,
}

impl MetricsServer {
    /// Serves `listener` on a thread of its own.
    pub fn start(
        listener: std::net::TcpListener,
        handle: PrometheusHandle,
        readiness: Readiness,
    ) -> anyhow::Result<Self> {
        listener.set_nonblocking(true).context("setting the metrics listener non-blocking")?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the metrics endpoint's runtime")?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let state = Arc::new(State { handle, readiness });
        let thread = std::thread::Builder::new()
            .name("shmback-metrics".into())
            .spawn(move || {
                if let Err(e) = runtime.block_on(accept_loop(listener, state, stopped)) {
                    warn!("the metrics endpoint stopped: {e:#}");
                }
            })
            .context("starting the metrics endpoint's thread")?;
        info!(%local, "serving /metrics, /healthz and /readyz");
        Ok(MetricsServer { local, stop: Some(stop), thread: Some(thread) })
    }

    /// The address served (the port the system picked, for `:0`).
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept_loop(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stopped => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait rather than spin.
                Err(e) => {
                    warn!("accepting a connection to the metrics endpoint failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!(%peer, "metrics endpoint: connection limit reached; closing");
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&req, &state)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 << 10)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                debug!(%peer, "metrics connection ended: {e}");
            }
            drop(permit);
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn plain(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut body = body.into();
    body.push('\n');
    text(status, "text/plain; charset=utf-8", body)
}

fn answer(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return plain(StatusCode::NOT_FOUND, "not found: this port serves /metrics, /healthz and /readyz");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, format!("{path} answers GET and HEAD only"));
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => {
            state.handle.run_upkeep();
            text(StatusCode::OK, EXPOSITION, state.handle.render())
        }
        "/healthz" => plain(StatusCode::OK, "ok"),
        _ => match state.readiness.check(&crate::health::current(), SystemTime::now()) {
            Ok(()) => plain(StatusCode::OK, "ready"),
            Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
        },
    }
}
