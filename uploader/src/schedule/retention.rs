//! Retention after each stored snapshot (`run --keep-*`): a worker thread that applies the policy
//! (forget, no prune) whenever a batch was stored, on a repository handle it keeps open.
//!
//! Off the batch's path: the batch's producer has its durable ack before retention starts, and a
//! failing forget is logged and counted (`shmback_job_runs_total{job="forget",result="failure"}`)
//! but never fails a batch. Snapshots stored while a forget runs are coalesced into one more run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustic_core::{KeepOptions, OpenStatus, Repository, SnapshotGroupCriterion};
use tracing::{error, info};

use crate::backends::failure::without_empty_backtraces;
use crate::config::RepositoryConfig;
use crate::locks::{Fence, RepoLock};
use crate::repository::{self, Purpose};

/// The job name retention reports under (metrics, health).
pub const JOB: &str = "forget";

/// The retention worker; [`Retention::stored`] after each stored snapshot.
pub struct Retention {
    wake: SyncSender<()>,
    thread: Option<JoinHandle<()>>,
}

impl Retention {
    /// Starts the worker: it runs until `stop` is set, and is joined by [`Retention::join`].
    pub fn start(
        config: RepositoryConfig,
        keep: KeepOptions,
        group_by: SnapshotGroupCriterion,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Self> {
        // One pending wake-up is enough: a run looks at every snapshot there is by then.
        let (wake, woken) = sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || worker(&config, &keep, group_by, &woken, &stop))?;
        Ok(Retention { wake, thread: Some(thread) })
    }

    /// A snapshot was stored: apply the policy (soon, on the worker).
    pub fn stored(&self) {
        wake(&self.wake);
    }

    /// A handle for the batch callbacks (cheap to clone, `Send + Sync`).
    pub fn notifier(&self) -> Notifier {
        Notifier(self.wake.clone())
    }

    /// Waits for the worker to end (after `stop` was set).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wakes the retention worker; see [`Retention::notifier`].
#[derive(Clone)]
pub struct Notifier(SyncSender<()>);

impl Notifier {
    /// A snapshot was stored.
    pub fn stored(&self) {
        wake(&self.0);
    }
}

fn wake(wake: &SyncSender<()>) {
    match wake.try_send(()) {
        // Full: a run is pending already and will see this snapshot. Disconnected: the worker
        // has stopped with the daemon.
        Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
    }
}

fn worker(
    config: &RepositoryConfig,
    keep: &KeepOptions,
    group_by: SnapshotGroupCriterion,
    woken: &Receiver<()>,
    stop: &AtomicBool,
) {
    let mut repo: Option<(Repository<OpenStatus>, Fence)> = None;
    loop {
        match woken.recv_timeout(Duration::from_millis(200)) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        let started = Instant::now();
        let result = apply(config, &mut repo, keep, group_by, stop);
        let elapsed = started.elapsed();
        metrics::histogram!("shmback_job_duration_seconds", "job" => JOB).record(elapsed.as_secs_f64());
        match result {
            Ok(removed) => {
                if removed > 0 {
                    info!(removed, ?elapsed, "retention: snapshots the policy no longer keeps were removed");
                }
                metrics::counter!("shmback_forget_removed_snapshots_total").increment(removed as u64);
                metrics::counter!("shmback_job_runs_total", "job" => JOB, "result" => "success").increment(1);
                metrics::gauge!("shmback_job_last_success_timestamp_seconds", "job" => JOB)
                    .set(jiff::Timestamp::now().as_millisecond() as f64 / 1000.0);
                crate::health::job_finished(JOB, None);
            }
            Err(e) => {
                // Opened again next time: the handle may be what failed.
                repo = None;
                let text = without_empty_backtraces(&format!("{e:#}"));
                error!(
                    "retention (--keep-*) failed: {text}; the batch is stored all the same, and the policy is \
                     applied again after the next one (or run `shmback forget` by hand)"
                );
                metrics::counter!("shmback_job_runs_total", "job" => JOB, "result" => "failure").increment(1);
                crate::health::job_finished(JOB, Some(&text));
            }
        }
    }
}

/// Applies the policy once, under an exclusive repository lock as restic's `forget` takes (in
/// this process it waits for the batches in flight, and new ones wait for it); the number of
/// snapshots removed.
fn apply(
    config: &RepositoryConfig,
    repo: &mut Option<(Repository<OpenStatus>, Fence)>,
    keep: &KeepOptions,
    group_by: SnapshotGroupCriterion,
    stop: &AtomicBool,
) -> anyhow::Result<usize> {
    let (open, fence) = match repo.take() {
        Some(r) => r,
        None => {
            let fence = Fence::default();
            (repository::open(config, Purpose::Serve, |b| fence.wrap(b))?, fence)
        }
    };
    let report = {
        let _lock = RepoLock::acquire(&open, true, &config.locks, &fence, &|| stop.load(Ordering::Relaxed))?;
        crate::commands::forget_in(&open, keep, group_by, None, false)?
    };
    *repo = Some((open, fence));
    Ok(report.removed)
}
