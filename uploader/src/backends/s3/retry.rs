//! Retrying S3 requests: exponential backoff with full jitter, each retry logged, and only for
//! failures another attempt may cure (the classification is [`super::error::classify`]'s).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tracing::warn;

use super::error::{Failure, S3Error};

/// How often and how patiently to retry.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// Attempts per request (the first included).
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, capped at `max`.
    pub base: Duration,
    /// Longest retry delay.
    pub max: Duration,
}

impl Backoff {
    /// The most the `n`th retry (from 1) waits: `base · 2ⁿ⁻¹`, at most `max`.
    fn cap(&self, n: u32) -> Duration {
        self.base.saturating_mul(1 << (n - 1).min(16)).min(self.max)
    }

    /// Runs `attempt` until it succeeds, fails for good, or runs out of attempts.
    pub async fn run<T, F, Fut>(&self, op: &'static str, key: &str, attempt: F) -> Result<T, S3Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut n = 1;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure { error, retry: true }) if n < self.max_attempts => {
                    let delay = self.cap(n).mul_f64(jitter());
                    metrics::counter!("shmback_backend_retries_total", "class" => error.class()).increment(1);
                    warn!(op, key, attempt = n, of = self.max_attempts, ?delay, "S3 request failed, retrying: {error}");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                Err(f) => {
                    // A missing object is an answer (rustic asks whether files exist), not a failure.
                    if !matches!(f.error, S3Error::NotFound { .. }) {
                        metrics::counter!("shmback_backend_errors_total", "class" => f.error.class()).increment(1);
                    }
                    return Err(f.error);
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_stays_below_one() {
        let b = Backoff { max_attempts: 8, base: Duration::from_millis(200), max: Duration::from_secs(20) };
        assert_eq!(b.cap(1), Duration::from_millis(200));
        assert_eq!(b.cap(3), Duration::from_millis(800));
        assert_eq!(b.cap(30), Duration::from_secs(20));
        assert!((0..1000).map(|_| jitter()).all(|j| (0.0..1.0).contains(&j)));
    }

    #[test]
    fn retries_only_what_may_succeed_and_stops_at_the_limit() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let b = Backoff { max_attempts: 3, base: Duration::from_millis(1), max: Duration::from_millis(2) };
        let calls = std::sync::atomic::AtomicU32::new(0);
        let other = || S3Error::Other { op: "get", key: "k".into(), cause: "500".into() };
        let got: Result<(), _> = rt.block_on(b.run("get", "k", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Failure { error: other(), retry: true }) }
        }));
        assert!(got.is_err());
        assert_eq!(calls.swap(0, Ordering::SeqCst), 3, "stops after max_attempts");
        let got: Result<(), _> = rt.block_on(b.run("get", "k", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Failure { error: S3Error::NotFound { key: "k".into() }, retry: false }) }
        }));
        assert!(matches!(got, Err(S3Error::NotFound { .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a 4xx is not retried");
    }

    #[test]
    fn retries_and_failures_are_counted_by_class_and_a_missing_object_is_no_failure() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let b = Backoff { max_attempts: 3, base: Duration::from_millis(1), max: Duration::from_millis(2) };
        let unreachable = || S3Error::Unreachable { endpoint: "http://127.0.0.1:1".into(), cause: "refused".into() };
        metrics::with_local_recorder(&recorder, || {
            let _ = rt
                .block_on(b.run("put", "k", || async { Err::<(), _>(Failure { error: unreachable(), retry: true }) }));
            let _ = rt.block_on(b.run("get", "k", || async {
                Err::<(), _>(Failure { error: S3Error::NotFound { key: "k".into() }, retry: false })
            }));
        });
        let text = handle.render();
        assert!(text.contains("shmback_backend_retries_total{class=\"unreachable\"} 2"), "{text}");
        assert!(text.contains("shmback_backend_errors_total{class=\"unreachable\"} 1"), "{text}");
        assert!(!text.contains("not_found"), "{text}");
    }
}
