//! What the daemon knows about its own health, for `/healthz` and `/readyz`: whether the
//! repository is open, which segments are attached, and how each scheduled job last ended.
//!
//! Process-wide on purpose: every part of `shmback run` (serving, the scheduler, hooks) reports
//! here without threading a handle through, and the metrics endpoint reads it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// How a job (a scheduled command, pull, check or prune) ended most recently.
#[derive(Clone, Debug)]
pub struct JobState {
    /// When it ended.
    pub at: SystemTime,
    /// Whether it succeeded.
    pub ok: bool,
    /// Failures in a row (0 after a success).
    pub failures_in_a_row: u32,
    /// The last error, if it failed.
    pub error: Option<String>,
}

/// A snapshot of the daemon's health.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The repository was opened (password right, location reachable) at least once.
    pub repository_open: bool,
    /// Segments currently attached and served.
    pub segments: Vec<PathBuf>,
    /// Each job's last end, by job name.
    pub jobs: BTreeMap<String, JobState>,
}

fn state() -> &'static Mutex<Health> {
    static STATE: OnceLock<Mutex<Health>> = OnceLock::new();
    STATE.get_or_init(Mutex::default)
}

fn with<T>(f: impl FnOnce(&mut Health) -> T) -> T {
    // A panic while holding this lock leaves plain data behind: keep serving it.
    let mut guard = state().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    f(&mut guard)
}

/// The repository has been opened.
pub fn repository_opened() {
    with(|h| h.repository_open = true);
}

/// `segment` is attached and served.
pub fn segment_attached(segment: &Path) {
    with(|h| {
        if !h.segments.iter().any(|s| s == segment) {
            h.segments.push(segment.to_path_buf());
        }
    });
}

/// `segment` is no longer served.
pub fn segment_detached(segment: &Path) {
    with(|h| h.segments.retain(|s| s != segment));
}

/// Job `name` ended; `error` is `None` on success.
pub fn job_finished(name: &str, error: Option<&str>) {
    with(|h| {
        let before = h.jobs.get(name).map_or(0, |j| j.failures_in_a_row);
        let failures_in_a_row = if error.is_some() { before + 1 } else { 0 };
        h.jobs.insert(
            name.to_string(),
            JobState {
                at: SystemTime::now(),
                ok: error.is_none(),
                failures_in_a_row,
                error: error.map(str::to_string),
            },
        );
    });
}

/// The current state.
pub fn current() -> Health {
    with(|h| h.clone())
}
