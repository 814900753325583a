//! `shmback demo`: the whole product on an embedded default. A fresh local repository (with a
//! generated password it prints), a fresh segment in /dev/shm, the uploader serving it, and
//! `shmback-send` in a second process sending a directory twice (the second time shows
//! deduplication); then a restore, compared byte for byte with the source.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::commands::restore;
use crate::config::RepositoryConfig;
use crate::serve::{BatchOutcome, ServeOptions, open_repo, serve};

/// A password from the kernel's random source, hex-encoded.
fn generated_password() -> anyhow::Result<String> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `shmback-send`, next to this executable.
pub fn find_sender() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.with_file_name("shmback-send");
    if p.exists() {
        return Ok(p);
    }
    bail!("{} not found next to shmback: build it too (`cargo build --release`)", p.display())
}

/// Runs the demo on `dir`, keeping the repository under `work`.
pub fn demo(dir: &Path, work: &Path) -> anyhow::Result<()> {
    let dir = dir.canonicalize().with_context(|| format!("{}", dir.display()))?;
    let sender = find_sender()?;
    let repo_dir = work.join("repo");
    let restore_dir = work.join("restore");
    std::fs::create_dir_all(work)?;
    let password = generated_password()?;
    let location = repo_dir.to_str().context("non-UTF-8 work directory")?.to_string();
    let config = RepositoryConfig::new(&location, &password)?;
    open_repo(&config, true)?;
    let pw_file = work.join("password");
    std::fs::write(&pw_file, format!("{password}\n"))?;
    std::fs::set_permissions(&pw_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    println!("repository  {location}");
    println!(
        "password    {password}   (also in {}; try: restic -r {location} --password-file {} snapshots)",
        pw_file.display(),
        pw_file.display()
    );
    let segment = PathBuf::from(format!("/dev/shm/shmback-demo-{}", std::process::id()));
    println!("segment     {}", segment.display());
    println!("sending     {}", dir.display());

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let server = {
        let (stop, segment, config) = (stop.clone(), segment.clone(), config.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut repo = open_repo(&config, false)?;
            serve(&mut repo, &segment, &ServeOptions::default(), &stop, |o| {
                let msg = match o {
                    BatchOutcome::Stored { .. } => summary(o).ok_or_else(|| "stored, without a summary".to_string()),
                    BatchOutcome::Rejected { why, .. } => Err(why.clone()),
                };
                let _ = tx.send(msg);
            })
        })
    };
    for _ in 0..500 {
        if segment.exists() || server.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let result = (|| -> anyhow::Result<()> {
        for round in 1..=2 {
            let status = Command::new(&sender)
                .args(["--segment", segment.to_str().unwrap_or_default(), "--wait-durable", "--tag", "demo"])
                .arg(&dir)
                .status()
                .with_context(|| format!("running {}", sender.display()))?;
            if !status.success() {
                bail!("shmback-send failed ({status})");
            }
            let s = rx.recv_timeout(Duration::from_secs(3600)).context("no outcome from the uploader")?;
            let s = s.map_err(|e| anyhow::anyhow!("batch not stored: {e}"))?;
            let label = if round == 1 { "first send " } else { "same again " };
            println!("{label} {s}");
        }
        Ok(())
    })();
    let peak = std::fs::metadata(&segment).map(|m| m.blocks() * 512).unwrap_or(0);
    stop.store(true, Ordering::Relaxed);
    server.join().map_err(|_| anyhow::anyhow!("uploader thread panicked"))??;
    let _ = std::fs::remove_file(&segment);
    result?;
    println!(
        "handoff     peak /dev/shm use {:.1} MiB (the segment), whatever the size of the data",
        peak as f64 / 1048576.0
    );

    restore(&config, "latest", &restore_dir)?;
    let rel = dir.strip_prefix("/").unwrap_or(&dir);
    let (files, bytes) = compare_trees(&dir, &restore_dir.join(rel))?;
    println!("restored    {} and verified {files} files, {bytes} bytes: identical", restore_dir.display());
    Ok(())
}

/// Files, bytes, new bytes, dedup ratio, MB/s of a stored batch.
fn summary(o: &BatchOutcome) -> Option<String> {
    let BatchOutcome::Stored { snapshot, elapsed, .. } = o else { return None };
    let s = snapshot.summary.as_ref()?;
    let secs = elapsed.as_secs_f64().max(1e-9);
    let ratio = match s.total_bytes_processed.checked_div(s.data_added_packed) {
        Some(r) if r < 1000 => format!("{:.1}×", s.total_bytes_processed as f64 / s.data_added_packed as f64),
        _ => "over 1000× (unchanged files are taken from the parent snapshot)".into(),
    };
    Some(format!(
        "snapshot {}: {} files, {:.1} MB, {:.1} MB new ({:.1} MB stored), dedup+compression {ratio}, {:.0} MB/s",
        &snapshot.id.to_hex().as_str()[..8],
        s.total_files_processed,
        s.total_bytes_processed as f64 / 1e6,
        s.data_added as f64 / 1e6,
        s.data_added_packed as f64 / 1e6,
        s.total_bytes_processed as f64 / 1e6 / secs,
    ))
}

/// Compares every file and symlink under `a` with `b`; returns files and bytes compared.
pub fn compare_trees(a: &Path, b: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut files, mut bytes) = (0, 0);
    let mut names = 0usize;
    for e in std::fs::read_dir(a).with_context(|| format!("{}", a.display()))? {
        let e = e?;
        names += 1;
        let (pa, pb) = (e.path(), b.join(e.file_name()));
        let m = std::fs::symlink_metadata(&pa)?;
        let mb =
            std::fs::symlink_metadata(&pb).with_context(|| format!("{} is missing after restore", pb.display()))?;
        if m.file_type() != mb.file_type() {
            bail!("{} is another kind of file after restore", pb.display());
        }
        if !m.is_symlink() && m.mode() & 0o7777 != mb.mode() & 0o7777 {
            bail!("{} has mode {:o} after restore, {:o} before", pb.display(), mb.mode() & 0o7777, m.mode() & 0o7777);
        }
        if m.is_dir() {
            let (f, n) = compare_trees(&pa, &pb)?;
            files += f;
            bytes += n;
        } else if m.is_symlink() {
            if std::fs::read_link(&pa)? != std::fs::read_link(&pb)? {
                bail!("symlink {} differs after restore", pb.display());
            }
            files += 1;
        } else if m.is_file() {
            if (m.mtime(), m.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
                bail!("{} has another mtime after restore", pb.display());
            }
            let (x, y) = (std::fs::read(&pa)?, std::fs::read(&pb)?);
            if x != y {
                bail!("{} differs after restore", pb.display());
            }
            files += 1;
            bytes += x.len() as u64;
        }
    }
    let restored = std::fs::read_dir(b).with_context(|| format!("{}", b.display()))?.count();
    if restored != names {
        bail!("{} has {restored} entries after restore, {names} before", b.display());
    }
    Ok((files, bytes))
}
