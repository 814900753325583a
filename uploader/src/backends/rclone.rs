//! `rclone:remote:path`: rustic_backend starts `rclone serve restic` on the remote (which reads
//! its own configuration: `rclone config`, or `RCLONE_CONFIG_<NAME>_*` variables).

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context as _;
use rustic_backend::RcloneBackend;
use rustic_core::WriteBackend;

use super::env::Env;

/// Opens `remote` through rclone; `SHMBACK_RCLONE_COMMAND` replaces the `rclone` command.
pub fn open(remote: &str, env: &Env) -> anyhow::Result<Arc<dyn WriteBackend>> {
    let options: BTreeMap<String, String> =
        env.get("SHMBACK_RCLONE_COMMAND").map(|cmd| ("rclone-command".to_string(), cmd)).into_iter().collect();
    let backend = RcloneBackend::new(remote, options).with_context(|| {
        format!(
            "starting `rclone serve restic {remote}`: is rclone installed and the remote configured \
             (`rclone config`, or RCLONE_CONFIG_<NAME>_* variables)?"
        )
    })?;
    Ok(Arc::new(backend))
}
