//! Serving segments: one, or several at once (one thread and one repository handle each, so a
//! slow or stalled producer never holds up the others).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use shmback_proto::{Consumer, RingConfig, Segment, SegmentOptions};
use tracing::{error, info};

use super::batch::{Repo, open_repo};
use super::options::{BatchOutcome, ServeOptions};
use super::segment::{SegmentStop, serve_segment};
use crate::config::RepositoryConfig;

/// Serves the segment at `path` (created if missing) until `stop` is set, calling `on_batch`
/// after each batch.
///
/// Once `stop` is set, a batch in flight gets `opts.grace` to finish; after that it is abandoned
/// (no snapshot, the producer is told `ShuttingDown`) and `serve` returns.
pub fn serve(
    repo: &mut Repo,
    path: &Path,
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_batch: impl FnMut(&BatchOutcome),
) -> anyhow::Result<()> {
    let consumer = attach(path, opts)?;
    serve_segment(repo, path, consumer, opts, stop.clone(), on_batch).map_err(|e| stopped(path, e))
}

/// Creates or attaches the segment at `path` as its consumer.
fn attach(path: &Path, opts: &ServeOptions) -> anyhow::Result<Consumer<Segment>> {
    let seg_opts = SegmentOptions { ring: RingConfig { tick: opts.tick, ..opts.segment.ring }, ..opts.segment.clone() };
    Segment::consumer(path, &seg_opts).with_context(|| format!("serving segment {}", path.display()))
}

fn stopped(path: &Path, stop: SegmentStop) -> anyhow::Error {
    match stop {
        SegmentStop::Ring(e) => anyhow::Error::new(e).context(format!(
            "segment {} can no longer be read; the uploader stopped serving it: check its producer, remove \
             the segment file while both sides are stopped, and restart",
            path.display()
        )),
        SegmentStop::Repository(e) => e.context(format!("the repository failed while serving {}", path.display())),
    }
}

/// Serves several segments at once, one thread and one repository handle each.
///
/// The repository is opened first (a wrong password or an unreachable backend fails before any
/// segment file is created), then every segment is attached before any is served (a bad path
/// fails at start-up, and segments this call created are removed again). A segment whose ring
/// fails stops alone, with the error logged; a repository failure sets `stop`, and the other
/// segments wind down within the grace period. The first error is returned once all have stopped.
pub fn serve_all(
    config: &RepositoryConfig,
    paths: &[PathBuf],
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_batch: impl Fn(&Path, &BatchOutcome) + Sync,
) -> anyhow::Result<()> {
    for (i, path) in paths.iter().enumerate() {
        if paths[..i].contains(path) {
            anyhow::bail!("segment {} is named twice", path.display());
        }
    }
    // In parallel: each handle derives the key once.
    let repos: Vec<Repo> = std::thread::scope(|scope| {
        let opening: Vec<_> = paths.iter().map(|_| scope.spawn(|| open_repo(config, false))).collect();
        opening
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("opening the repository panicked"))))
            .collect::<anyhow::Result<_>>()
    })?;
    let attached = attach_all(paths, opts)?;
    let on_batch = &on_batch;
    let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
        let threads: Vec<_> = paths
            .iter()
            .zip(repos)
            .zip(attached)
            .map(|((path, mut repo), consumer)| {
                std::thread::Builder::new()
                    .name(format!("serve:{}", path.file_name().map_or("".into(), |n| n.to_string_lossy())))
                    .spawn_scoped(scope, move || {
                        info!(segment = %path.display(), "serving");
                        let result =
                            serve_segment(&mut repo, path, consumer, opts, stop.clone(), |o| on_batch(path, o));
                        result.map_err(|e| {
                            if matches!(e, SegmentStop::Repository(_)) {
                                stop.store(true, Ordering::Relaxed);
                            }
                            let e = stopped(path, e);
                            error!("{e:#}");
                            e
                        })
                    })
                    .expect("spawning a serving thread")
            })
            .collect();
        threads
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked"))).err())
            .collect()
    });
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Attaches every segment, or none: on a failure, segment files this call created are removed.
fn attach_all(paths: &[PathBuf], opts: &ServeOptions) -> anyhow::Result<Vec<Consumer<Segment>>> {
    let mut attached = Vec::with_capacity(paths.len());
    let mut created = Vec::new();
    for path in paths {
        let existed = path.symlink_metadata().is_ok();
        match attach(path, opts) {
            Ok(consumer) => {
                attached.push(consumer);
                if !existed {
                    created.push(path);
                }
            }
            Err(e) => {
                drop(attached);
                for path in created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        }
    }
    Ok(attached)
}
