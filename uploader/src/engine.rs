//! The engine: serve one segment, turning each committed batch into exactly one snapshot and
//! publishing the durable ack once the snapshot file is stored.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;

use rustic_core::repofile::SnapshotFile;
use rustic_core::{BackupOptions, IndexedIdsStatus, Repository, SnapshotOptions};
use shmback_proto::batch::Event;
use shmback_proto::{BatchDecoder, Begin, Consumer, Entry, RejectCode, RingConfig, RingError, Segment, SegmentOptions};
use tracing::{error, info, warn};

use crate::config::RepositoryConfig;
use crate::gate::{Gate, GatedBackend};
use crate::repository::{self, Purpose};
use crate::source::{BatchEnd, BatchSource, Pump, Shared, Shutdown};

/// A repository opened for backups, with the snapshot gate in front of its backend.
pub struct Repo {
    repo: Option<Repository<IndexedIdsStatus>>,
    gate: Gate,
}

/// Opens (or, with `init`, creates) the repository `config` names, with the snapshot gate in
/// front of its backend.
pub fn open_repo(config: &RepositoryConfig, init: bool) -> anyhow::Result<Repo> {
    let gate = Gate::default();
    let purpose = if init { Purpose::Create } else { Purpose::Serve };
    let repo = repository::open(config, purpose, |be| Arc::new(GatedBackend::new(be, gate.clone())))?;
    Ok(Repo { repo: Some(repo.to_indexed_ids()?), gate })
}

/// What happened to one batch.
#[derive(Debug)]
pub enum BatchOutcome {
    /// Stored as this snapshot.
    Stored {
        /// Batch sequence.
        seq: u64,
        /// The snapshot.
        snapshot: Box<SnapshotFile>,
        /// Time from BEGIN to the stored snapshot.
        elapsed: Duration,
    },
    /// Rejected: no snapshot.
    Rejected {
        /// Batch sequence.
        seq: u64,
        /// Why.
        why: String,
        /// Code sent to the producer.
        code: RejectCode,
    },
}

/// Serving options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Host recorded when a batch names none.
    pub host: String,
    /// Ring liveness tick and wait granularity.
    pub tick: Duration,
    /// Segment options (ring size when the uploader creates the segment).
    pub segment: SegmentOptions,
    /// How long a batch in flight may still take after SIGTERM before it is abandoned (no
    /// snapshot; the producer gets `Rejected(ShuttingDown)` and resends later).
    pub grace: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        Self {
            host: if host.is_empty() { "shmback".into() } else { host },
            tick: Duration::from_millis(100),
            segment: SegmentOptions::default(),
            // Below Kubernetes' default terminationGracePeriodSeconds (30 s), so the uploader
            // abandons the batch itself, cleanly, before the kubelet's SIGKILL.
            grace: Duration::from_secs(20),
        }
    }
}

/// Serves the segment at `path` until `stop` is set, calling `on_batch` after each batch.
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
    serve_attached(repo, consumer, opts, stop, on_batch)
}

/// Creates or attaches the segment at `path` as its consumer.
pub fn attach(path: &Path, opts: &ServeOptions) -> anyhow::Result<Consumer<Segment>> {
    let seg_opts = SegmentOptions { ring: RingConfig { tick: opts.tick, ..opts.segment.ring }, ..opts.segment.clone() };
    Segment::consumer(path, &seg_opts).with_context(|| format!("serving segment {}", path.display()))
}

/// Serves several segments at once, one thread and one repository handle each, so a slow or
/// stalled producer never holds up the others. Every segment is attached before any is served (a
/// bad path fails at start-up). If one segment's loop fails, `stop` is set and the others wind
/// down (within the grace period); the first error is returned.
pub fn serve_all(
    config: &RepositoryConfig,
    paths: &[PathBuf],
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    on_batch: impl Fn(&Path, &BatchOutcome) + Sync,
) -> anyhow::Result<()> {
    let mut attached = Vec::with_capacity(paths.len());
    for path in paths {
        if attached.iter().any(|(p, _): &(&PathBuf, _)| *p == path) {
            anyhow::bail!("segment {} is named twice", path.display());
        }
        attached.push((path, attach(path, opts)?));
    }
    // Repository handles are opened in parallel (each derives the key once).
    let on_batch = &on_batch;
    let errors: Vec<anyhow::Error> = std::thread::scope(|scope| {
        let handles: Vec<_> = attached
            .into_iter()
            .map(|(path, consumer)| {
                let name = format!("segment {}", path.display());
                std::thread::Builder::new()
                    .name(format!("serve:{}", path.file_name().map_or("".into(), |n| n.to_string_lossy())))
                    .spawn_scoped(scope, move || {
                        let result = open_repo(config, false).and_then(|mut repo| {
                            info!(segment = %path.display(), "serving");
                            serve_attached(&mut repo, consumer, opts, stop, |o| on_batch(path, o))
                        });
                        if let Err(e) = &result {
                            error!(segment = %path.display(), "{e:#}; stopping the other segments");
                            stop.store(true, Ordering::Relaxed);
                        }
                        result.with_context(|| name)
                    })
                    .expect("spawning a serving thread")
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a serving thread panicked"))).err())
            .collect()
    });
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The serve loop over an attached segment.
pub fn serve_attached(
    repo: &mut Repo,
    mut consumer: Consumer<Segment>,
    opts: &ServeOptions,
    stop: &Arc<AtomicBool>,
    mut on_batch: impl FnMut(&BatchOutcome),
) -> anyhow::Result<()> {
    let mut decoder = BatchDecoder::new();
    let mut begun: Option<Manifest> = None;
    let mut shutdown = Shutdown::new(stop.clone(), opts.grace);
    loop {
        if stop.load(Ordering::Relaxed) && (begun.is_none() || shutdown.expired()) {
            if let Some(m) = begun.take() {
                reject(&mut consumer, m.begin.seq, shutdown.reason(), RejectCode::ShuttingDown, &mut on_batch);
            }
            return Ok(());
        }
        match consumer.wait(opts.tick) {
            Ok(()) => {}
            Err(RingError::Timeout { .. }) => continue,
            Err(RingError::PeerGone { .. }) => {
                if let Some(m) = begun.take() {
                    decoder.reset();
                    let why = "the producer died or left while sending the manifest".to_string();
                    reject(&mut consumer, m.begin.seq, why, RejectCode::Aborted, &mut on_batch);
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let Some(frame) = consumer.peek().ok().flatten() else {
            continue;
        };
        let event = match frame.decode() {
            Ok(f) => decoder.feed(f).map(Owned::from).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        frame.release();
        match event {
            Ok(Owned::Begin { begin, interrupted }) => {
                if let Some(seq) = interrupted {
                    let why = "torn: the producer began a new batch".to_string();
                    reject(&mut consumer, seq, why, RejectCode::Aborted, &mut on_batch);
                }
                if begin.seq <= consumer.last_durable_seq() {
                    info!(seq = begin.seq, "batch already stored; skipping its frames");
                    decoder.reset();
                    continue;
                }
                begun = Some(Manifest { begin, entries: Vec::new(), start: Instant::now() });
            }
            Ok(Owned::Entry(entry)) => {
                if let Some(m) = &mut begun {
                    m.entries.push(entry);
                }
            }
            Ok(Owned::EndOfManifest) => {
                let Some(manifest) = begun.take() else { continue };
                let (c, d, outcome) = run_batch(repo, consumer, decoder, &manifest, opts, shutdown.clone())?;
                consumer = c;
                decoder = d;
                match &outcome {
                    BatchOutcome::Stored { seq, snapshot, .. } => {
                        consumer.publish_durable(*seq, &snapshot_id_bytes(snapshot));
                    }
                    BatchOutcome::Rejected { seq, code, .. } => consumer.publish_rejected(*seq, *code),
                }
                on_batch(&outcome);
            }
            Ok(Owned::Abort { seq, reason }) => {
                begun = None;
                reject(
                    &mut consumer,
                    seq,
                    format!("the producer aborted it: {reason}"),
                    RejectCode::Aborted,
                    &mut on_batch,
                );
            }
            Ok(Owned::Skipped) => {}
            Ok(Owned::Other(what)) => warn!("unexpected {what} outside a batch's data"),
            Err(why) => {
                // A frame the codec refused never reached the decoder: leave the batch either way,
                // so its remaining frames are skipped up to the next BEGIN.
                decoder.reset();
                let seq = begun.take().map_or(decoder.seq(), |m| m.begin.seq);
                reject(&mut consumer, seq, why, RejectCode::Malformed, &mut on_batch);
            }
        }
    }
}

/// A batch whose manifest is being (or has been) received.
struct Manifest {
    begin: Begin,
    entries: Vec<Entry>,
    start: Instant,
}

/// The events the serve loop acts on, owned (the frame is released before acting).
enum Owned {
    Begin { begin: Begin, interrupted: Option<u64> },
    Entry(Entry),
    EndOfManifest,
    Abort { seq: u64, reason: String },
    Skipped,
    Other(String),
}

impl From<Event<'_>> for Owned {
    fn from(e: Event<'_>) -> Self {
        match e {
            Event::Begin { begin, interrupted } => Owned::Begin { begin, interrupted },
            Event::Entry { entry, .. } => Owned::Entry(entry),
            Event::EndOfManifest { .. } => Owned::EndOfManifest,
            Event::Abort { seq, reason, .. } => Owned::Abort { seq, reason },
            Event::Skipped(_) => Owned::Skipped,
            other => Owned::Other(format!("{other:?}").chars().take(80).collect()),
        }
    }
}

fn reject(
    consumer: &mut Consumer<Segment>,
    seq: u64,
    why: String,
    code: RejectCode,
    on_batch: &mut impl FnMut(&BatchOutcome),
) {
    warn!(seq, %why, "batch rejected, no snapshot");
    consumer.publish_rejected(seq, code);
    on_batch(&BatchOutcome::Rejected { seq, why, code });
}

/// Archives one batch whose manifest is complete; returns the consumer and decoder for the next.
fn run_batch(
    repo: &mut Repo,
    consumer: Consumer<Segment>,
    decoder: BatchDecoder,
    manifest: &Manifest,
    opts: &ServeOptions,
    shutdown: Shutdown,
) -> anyhow::Result<(Consumer<Segment>, BatchDecoder, BatchOutcome)> {
    let Manifest { begin, entries, start } = manifest;
    let seq = begin.seq;
    let declared: u64 = entries.iter().filter_map(|e| e.size).sum();
    let streams = entries.iter().filter(|e| e.kind == shmback_proto::EntryKind::File && e.size.is_none()).count();
    info!(seq, entries = entries.len(), bytes = declared, streams, host = ?begin.labels.host, "batch started");
    let shared = Shared::new(Pump::new(consumer, decoder, opts.tick, shutdown));
    let result = archive(repo, begin, entries, &shared, opts);
    let gated = repo.gate.disarm();
    let mut pump = shared.into_pump().ok_or_else(|| anyhow::anyhow!("a batch reader outlived its batch"))?;
    // If archive() stopped before the snapshot write, the rest of the batch is still in the ring.
    let end = gated.unwrap_or_else(|| pump.finish());
    if matches!(end, BatchEnd::Failed(..)) {
        // Whatever is left of a failed batch is skipped up to the next BEGIN.
        pump.decoder.reset();
    }
    let outcome = match (result, end) {
        (Ok(snapshot), BatchEnd::Committed) => {
            let elapsed = start.elapsed();
            let (files, bytes, new_bytes, stored) = snapshot.summary.as_ref().map_or((0, 0, 0, 0), |s| {
                (s.total_files_processed, s.total_bytes_processed, s.data_added_files, s.data_added_packed)
            });
            info!(
                seq, snapshot = %snapshot.id, files, bytes, new_bytes, stored_bytes = stored, ?elapsed,
                mb_per_s = format!("{:.1}", bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)),
                "batch stored"
            );
            BatchOutcome::Stored { seq, snapshot: Box::new(snapshot), elapsed }
        }
        (_, BatchEnd::Failed(why, code)) => {
            warn!(seq, %why, ?code, "batch rejected, no snapshot");
            BatchOutcome::Rejected { seq, why, code }
        }
        (Err(e), BatchEnd::Committed) => {
            let why = format!("storing the snapshot failed: {e:#}");
            warn!(seq, %why, "batch rejected, no snapshot");
            BatchOutcome::Rejected { seq, why, code: RejectCode::StorageFailed }
        }
    };
    // The next batch must see this one's blobs (dedup) and its snapshot (parent).
    let r = repo.repo.take().ok_or_else(|| anyhow::anyhow!("repository unavailable"))?;
    repo.repo = Some(r.drop_index().to_indexed_ids()?);
    Ok((pump.consumer, pump.decoder, outcome))
}

fn archive(
    repo: &mut Repo,
    begin: &Begin,
    entries: &[Entry],
    shared: &Arc<Shared>,
    opts: &ServeOptions,
) -> anyhow::Result<SnapshotFile> {
    let r = repo.repo.as_ref().ok_or_else(|| anyhow::anyhow!("repository unavailable"))?;
    let mut sopts = SnapshotOptions::default();
    sopts.host = Some(begin.labels.host.clone().unwrap_or_else(|| opts.host.clone()));
    let tags = begin.labels.tags.join(",");
    if !tags.is_empty() {
        sopts = sopts.add_tags(&tags)?;
    }
    let mut snap = sopts.to_snapshot()?;
    if !begin.labels.meta.is_empty() {
        let lines: Vec<String> = begin.labels.meta.iter().map(|(k, v)| format!("{k}={v}")).collect();
        snap.description = Some(lines.join("\n"));
    }
    let source = BatchSource::new(entries, shared)?;
    repo.gate.arm(shared.clone());
    Ok(r.archive(&BackupOptions::default(), &source, snap, &[PathBuf::from("/")])?)
}

/// The 32 bytes of a snapshot id.
pub fn snapshot_id_bytes(s: &SnapshotFile) -> [u8; 32] {
    let hex = s.id.to_hex();
    let hex = hex.as_str().as_bytes();
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        let nib = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        *b = nib(hex[2 * i]) << 4 | nib(hex[2 * i + 1]);
    }
    out
}
