//! The scheduler's memory across restarts: when each scheduled task was last due, so a run the
//! daemon missed while it was down is noticed (and run once) at the next start.
//!
//! One small JSON file per repository in the state directory (`schedule-<hash>.json`, the hash
//! of the repository's location, so daemons of different repositories can share a directory),
//! replaced atomically (written beside it, synced, renamed) on every change.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    /// Per task: the last time it was due (and run, or skipped).
    #[serde(default)]
    last_due: BTreeMap<String, Timestamp>,
}

/// The state file of one repository's scheduler.
#[derive(Debug)]
pub struct State {
    path: PathBuf,
    file: File,
    /// False for a state kept in memory only ([`State::in_memory`]).
    persist: bool,
}

impl State {
    /// Loads the state of the repository at `location` from `dir` (created if missing); a file
    /// that does not parse is logged and started afresh (the cost: one missed run not noticed).
    pub fn load(dir: &Path, location: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the state directory {} (--state-dir / SHMBACK_STATE_DIR): give a writable directory",
                dir.display()
            )
        })?;
        let path = dir.join(format!("schedule-{:016x}.json", hash(location)));
        let file = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(
                    file = %path.display(),
                    "the scheduler's state file is not valid ({e}); starting afresh (a run missed while the \
                     daemon was down may go unnoticed once)"
                );
                File::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(e).with_context(|| format!("reading the scheduler's state file {}", path.display())),
        };
        Ok(State { path, file, persist: true })
    }

    /// A state that is not saved: runs missed while the daemon was down go unnoticed.
    pub fn in_memory() -> Self {
        State { path: PathBuf::new(), file: File::default(), persist: false }
    }

    /// Where the state is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When `task` was last due, if ever.
    pub fn last_due(&self, task: &str) -> Option<Timestamp> {
        self.file.last_due.get(task).copied()
    }

    /// Records that `task` was due at `at`, and saves the file.
    pub fn set_last_due(&mut self, task: &str, at: Timestamp) -> anyhow::Result<()> {
        self.file.last_due.insert(task.to_string(), at);
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        if !self.persist {
            return Ok(());
        }
        let tmp = self.path.with_extension("json.new");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec_pretty(&self.file)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        };
        write().with_context(|| format!("saving the scheduler's state to {}", self.path.display()))
    }
}

/// FNV-1a of the location: stable across releases (it names a file that must be found again).
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The default state directory: `$STATE_DIRECTORY` (systemd's `StateDirectory=`), else
/// `$XDG_STATE_HOME/shmback`, else `$HOME/.local/state/shmback`, else `/var/lib/shmback`.
pub fn default_dir() -> PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(d) = var("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; the first is ours.
        let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(d) = var("XDG_STATE_HOME") {
        return d.join("shmback");
    }
    if let Some(h) = var("HOME") {
        return h.join(".local/state/shmback");
    }
    PathBuf::from("/var/lib/shmback")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_due_times_survive_a_reload_per_repository() {
        let dir = tempfile::tempdir().unwrap();
        let t: Timestamp = "2026-11-30T21:00:00Z".parse().unwrap();
        let mut s = State::load(dir.path(), "/backups/a").unwrap();
        assert_eq!(s.last_due("jobs"), None);
        s.set_last_due("jobs", t).unwrap();
        assert_eq!(State::load(dir.path(), "/backups/a").unwrap().last_due("jobs"), Some(t));
        assert_eq!(State::load(dir.path(), "/backups/b").unwrap().last_due("jobs"), None, "another repository");
    }

    #[test]
    fn a_damaged_file_starts_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::load(dir.path(), "r").unwrap();
        std::fs::write(s.path(), b"{not json").unwrap();
        let mut s = State::load(dir.path(), "r").unwrap();
        assert_eq!(s.last_due("jobs"), None);
        s.set_last_due("jobs", Timestamp::UNIX_EPOCH).unwrap();
        assert_eq!(State::load(dir.path(), "r").unwrap().last_due("jobs"), Some(Timestamp::UNIX_EPOCH));
    }
}
