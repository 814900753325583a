//! Monitoring `shmback run`: Prometheus metrics on `/metrics`, liveness on `/healthz`, readiness
//! on `/readyz` (`--metrics-addr`, docs/metrics.md).
//!
//! Every module records through the `metrics` crate's macros (`metrics::counter!` and the like);
//! [`install`] puts the Prometheus recorder behind them, and until it does (no `--metrics-addr`)
//! those calls cost next to nothing and record nothing. Readiness is read from
//! [`crate::health`], which serving and the jobs keep up to date.
//!
//! - `http.rs`: the small HTTP/1.1 server of the three endpoints.
//! - `record.rs`: what serving records (a batch's outcome, a ring's fill), in one place so the
//!   serve loop calls one function.

mod http;
mod record;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::health::Health;

pub use http::MetricsServer;
pub(crate) use record::{RingSampler, batch_outcome, snapshots, source_started};

/// `shmback run`'s monitoring flags.
#[derive(clap::Args, Clone, Debug)]
pub struct MonitorArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics, liveness on /healthz and readiness on
    /// /readyz (e.g. 0.0.0.0:8702). Off by default; keep the port off the internet (it needs no
    /// token).
    #[arg(long, value_name = "ADDR", env = "SHMBACK_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// /readyz answers 503 once a scheduled job has failed this many times in a row (0: never,
    /// for this reason).
    #[arg(long, value_name = "N", env = "SHMBACK_READY_JOB_FAILURES", default_value_t = 3)]
    pub ready_job_failures: u32,
    /// /readyz answers 503 once a scheduled job has kept failing for this many seconds since its
    /// first failure in a row (0: never, for this reason).
    #[arg(long, value_name = "SECONDS", env = "SHMBACK_READY_JOB_FAILING_FOR", default_value_t = 21_600)]
    pub ready_job_failing_for: u64,
}

/// The `--help` examples of these flags, for the `run` subcommand's.
pub const MONITOR_EXAMPLES: &str = "  # Prometheus metrics, /healthz and /readyz on port 8702:
  shmback run --segment /dev/shm/app --metrics-addr 0.0.0.0:8702
  # Unready after 2 failed runs of a job in a row, or after 1 h of failing:
  shmback run --metrics-addr 127.0.0.1:8702 --ready-job-failures 2 \\
    --ready-job-failing-for 3600";

/// When `/readyz` says the daemon is ready.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// Every one of these segments must be attached.
    pub segments: Vec<PathBuf>,
    /// A job that failed this many times in a row makes the daemon unready (0: never).
    pub job_failures: u32,
    /// A job failing for longer than this makes the daemon unready (zero: never).
    pub job_failing_for: Duration,
}

impl Readiness {
    /// The readiness `args` ask for, with `segments` as the segments `shmback run` serves.
    pub fn new(args: &MonitorArgs, segments: &[PathBuf]) -> Self {
        Readiness {
            segments: segments.to_vec(),
            job_failures: args.ready_job_failures,
            job_failing_for: Duration::from_secs(args.ready_job_failing_for),
        }
    }

    /// `Ok` when `health` (at `now`) is ready; otherwise why not, one short line a person reads
    /// from `curl` or a probe's event.
    pub fn check(&self, health: &Health, now: SystemTime) -> Result<(), String> {
        if !health.repository_open {
            return Err("the repository is not open yet (opening it, or it failed: see the log)".into());
        }
        let missing: Vec<String> =
            self.segments.iter().filter(|s| !health.segments.contains(s)).map(|s| s.display().to_string()).collect();
        if !missing.is_empty() {
            return Err(format!("segments not attached: {}", missing.join(", ")));
        }
        for (name, job) in &health.jobs {
            if job.ok {
                continue;
            }
            let error = job.error.as_deref().unwrap_or("no error recorded");
            if self.job_failures > 0 && job.failures_in_a_row >= self.job_failures {
                return Err(format!(
                    "job {name} failed {} times in a row (--ready-job-failures {}); last error: {error}",
                    job.failures_in_a_row, self.job_failures
                ));
            }
            let failing = job.failing_since.and_then(|since| now.duration_since(since).ok()).unwrap_or_default();
            if !self.job_failing_for.is_zero() && failing > self.job_failing_for {
                return Err(format!(
                    "job {name} has been failing for {} s (--ready-job-failing-for {}); last error: {error}",
                    failing.as_secs(),
                    self.job_failing_for.as_secs()
                ));
            }
        }
        Ok(())
    }
}

/// Buckets of every `_seconds` histogram: from a small batch or a request (10 ms) to a large
/// backup or a prune (over an hour).
const SECONDS_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0];

/// Installs the Prometheus recorder as the process's metrics recorder and returns the handle
/// that renders it. Once per process: a second call fails (another recorder is installed).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("configuring the histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|_| anyhow::anyhow!("a metrics recorder is installed already; install it once per process"))?;
    record::describe();
    record::started();
    Ok(handle)
}

/// With `--metrics-addr`: installs the recorder and starts serving the endpoints (the address is
/// bound here, so a port in use fails at start-up). The server lives as long as the returned
/// value; `None` without the flag.
pub fn start(args: &MonitorArgs, segments: &[PathBuf]) -> anyhow::Result<Option<MetricsServer>> {
    let Some(addr) = args.metrics_addr else { return Ok(None) };
    let listener = std::net::TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot serve metrics on {addr} (--metrics-addr, SHMBACK_METRICS_ADDR): is another process using the \
             port, or is the address not this host's?"
        )
    })?;
    let handle = install()?;
    MetricsServer::start(listener, handle, Readiness::new(args, segments)).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::JobState;

    fn ready() -> Readiness {
        Readiness { segments: vec!["/dev/shm/a".into()], job_failures: 3, job_failing_for: Duration::from_secs(3600) }
    }

    fn healthy() -> Health {
        Health { repository_open: true, segments: vec!["/dev/shm/a".into()], ..Health::default() }
    }

    fn failed(n: u32, since: SystemTime) -> JobState {
        JobState {
            at: SystemTime::now(),
            ok: false,
            failures_in_a_row: n,
            failing_since: Some(since),
            error: Some("boom".into()),
        }
    }

    #[test]
    fn unready_until_the_repository_is_open_and_every_segment_attached() {
        let now = SystemTime::now();
        let r = ready();
        let mut h = Health::default();
        assert!(r.check(&h, now).unwrap_err().contains("repository is not open"));
        h.repository_open = true;
        assert_eq!(r.check(&h, now).unwrap_err(), "segments not attached: /dev/shm/a");
        h.segments.push("/dev/shm/a".into());
        assert_eq!(r.check(&h, now), Ok(()));
    }

    #[test]
    fn a_job_failing_too_often_or_too_long_makes_it_unready() {
        let now = SystemTime::now();
        let r = ready();
        let mut h = healthy();
        h.jobs.insert("check".into(), failed(2, now));
        assert_eq!(r.check(&h, now), Ok(()), "two failures are below the limit of three");
        h.jobs.insert("check".into(), failed(3, now));
        let why = r.check(&h, now).unwrap_err();
        assert!(why.contains("job check failed 3 times in a row") && why.contains("boom"), "{why}");
        h.jobs.insert("check".into(), failed(1, now - Duration::from_secs(3601)));
        assert!(r.check(&h, now).unwrap_err().contains("failing for 3601 s"));
        let off = Readiness { job_failures: 0, job_failing_for: Duration::ZERO, ..ready() };
        h.jobs.insert("check".into(), failed(99, now - Duration::from_secs(1 << 20)));
        assert_eq!(off.check(&h, now), Ok(()), "both limits off");
        let mut ok = failed(0, now);
        ok.ok = true;
        ok.failing_since = None;
        h.jobs.insert("check".into(), ok);
        assert_eq!(r.check(&h, now), Ok(()));
    }

    #[test]
    fn job_finished_counts_failures_in_a_row_and_since_when() {
        // The process-wide state, under a job name no other test uses.
        let name = "monitor-test-job";
        crate::health::job_finished(name, Some("first"));
        let first = crate::health::current().jobs[name].clone();
        assert_eq!((first.failures_in_a_row, first.ok), (1, false));
        crate::health::job_finished(name, Some("second"));
        let second = crate::health::current().jobs[name].clone();
        assert_eq!(second.failures_in_a_row, 2);
        assert_eq!(second.failing_since, first.failing_since, "failing since the first failure");
        assert_eq!(second.error.as_deref(), Some("second"));
        let r = Readiness { segments: vec![], job_failures: 2, job_failing_for: Duration::ZERO };
        let mut h = crate::health::current();
        h.repository_open = true;
        h.segments.clear();
        h.jobs.retain(|job, _| job == name);
        assert!(r.check(&h, SystemTime::now()).unwrap_err().contains("monitor-test-job failed 2 times"));
        crate::health::job_finished(name, None);
        let ok = crate::health::current().jobs[name].clone();
        assert_eq!((ok.failures_in_a_row, ok.failing_since, ok.ok), (0, None, true));
    }
}
