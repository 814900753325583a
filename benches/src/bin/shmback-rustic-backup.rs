//! Baseline (b) of the end-to-end benchmark: rustic_core's own local-path backup of a directory
//! (the engine shmback uses, fed from the filesystem instead of the ring).
//!
//! `RESTIC_PASSWORD=… shmback-rustic-backup REPO DIR [--init]` prints the snapshot's summary as
//! one JSON line.

use rustic_core::{
    BackupOptions, ConfigOptions, Credentials, KeyOptions, PathList, Repository, RepositoryOptions, SnapshotOptions,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(repo), Some(dir)) = (args.first(), args.get(1)) else {
        return Err("usage: RESTIC_PASSWORD=… shmback-rustic-backup REPO DIR [--init]".into());
    };
    let password = std::env::var("RESTIC_PASSWORD").map_err(|_| "set RESTIC_PASSWORD")?;
    let backends = rustic_backend::BackendOptions::default().repository(repo).to_backends()?;
    let repo = Repository::new(&RepositoryOptions::default(), &backends)?;
    let creds = Credentials::password(password);
    let repo = if args.iter().any(|a| a == "--init") {
        repo.init(&creds, &KeyOptions::default(), &ConfigOptions::default())?
    } else {
        repo.open(&creds)?
    };
    let repo = repo.to_indexed_ids()?;
    let snap = SnapshotOptions::default().to_snapshot()?;
    let paths = PathList::from_string(dir)?.sanitize()?;
    let snap = repo.backup(&BackupOptions::default(), &paths, snap)?;
    let s = snap.summary.unwrap_or_default();
    println!(
        "{{\"files\":{},\"bytes\":{},\"data_added\":{},\"data_added_packed\":{}}}",
        s.total_files_processed, s.total_bytes_processed, s.data_added, s.data_added_packed
    );
    Ok(())
}
