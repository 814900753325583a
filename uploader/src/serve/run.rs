//! Serving segments: one, or several at once (one thread and one repository handle each, so a
//! slow or stalled producer never holds up the others).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use shmback_proto::{Consumer, RingConfig, RingError, Segment, SegmentError, SegmentOptions};
use tracing::{error, info, warn};

use super::batch::{Repo, open_repo};
use super::options::{BatchOutcome, ServeOptions};
use super::segment::{SegmentStop, serve_segment};
use crate::backends::failure::without_empty_backtraces;
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
    serve_attached(repo, path, consumer, opts, stop, on_batch).map_err(|e| stopped(path, e))
}

/// Creates or attaches the segment at `path` as its consumer.
fn attach(path: &Path, opts: &ServeOptions) -> anyhow::Result<Consumer<Segment>> {
    Segment::consumer(path, &segment_options(opts)).with_context(|| format!("serving segment {}", path.display()))
}

/// Serves the segment, attaching it again whenever its file turns out damaged (truncated or
/// replaced by its producer under the mapping): the batch in flight is rejected, and once that
/// producer has let go, attaching re-initialises the segment.
fn serve_attached(
    repo: &mut Repo,
    path: &Path,
    mut consumer: Consumer<Segment>,
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    mut on_batch: impl FnMut(&BatchOutcome),
) -> Result<(), SegmentStop> {
    loop {
        crate::health::segment_attached(path);
        let served = serve_segment(repo, path, consumer, opts, stop.clone(), &mut on_batch);
        crate::health::segment_detached(path);
        match served {
            Err(SegmentStop::Ring(e @ RingError::SegmentDamaged { .. })) => {
                warn!(segment = %path.display(), "{e}; attaching it again once its producer has let go");
                match reattach(path, opts, stop)? {
                    Some(again) => consumer = again,
                    None => return Ok(()),
                }
            }
            other => return other,
        }
    }
}

/// Attaches a damaged segment again, waiting (a tick at a time) while its producer still holds
/// it; `None` if the daemon stops meanwhile.
fn reattach(path: &Path, opts: &ServeOptions, stop: &AtomicBool) -> Result<Option<Consumer<Segment>>, SegmentStop> {
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        match Segment::consumer(path, &segment_options(opts)) {
            Ok(consumer) => return Ok(Some(consumer)),
            Err(SegmentError::DamagedInUse { .. }) => std::thread::sleep(opts.tick),
            Err(e) => return Err(SegmentStop::Attach(e)),
        }
    }
}

fn segment_options(opts: &ServeOptions) -> SegmentOptions {
    SegmentOptions { ring: RingConfig { tick: opts.tick, ..opts.segment.ring }, ..opts.segment.clone() }
}

fn stopped(path: &Path, stop: SegmentStop) -> anyhow::Error {
    match stop {
        SegmentStop::Attach(e) => anyhow::Error::new(e).context(format!(
            "segment {} was damaged and could not be attached again; the uploader stopped serving it",
            path.display()
        )),
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
/// `on_attached` is called once every segment is attached, before serving starts (a supervised
/// app is started there, so it finds its segment); it is not called if opening or attaching fails.
pub fn serve_all(
    config: &RepositoryConfig,
    paths: &[PathBuf],
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_attached: impl FnOnce(),
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
    on_attached();
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
                        let result = serve_attached(&mut repo, path, consumer, opts, stop, |o| on_batch(path, o));
                        result.map_err(|e| {
                            if matches!(e, SegmentStop::Repository(_)) {
                                stop.store(true, Ordering::Relaxed);
                            }
                            let e = stopped(path, e);
                            error!("{}", without_empty_backtraces(&format!("{e:#}")));
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
