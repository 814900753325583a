//! Bandwidth limits (`--limit-upload`, `--limit-download`, in KiB/s as restic takes them) for
//! every backend: [`LimitedBackend`] wraps any rustic_core backend and takes the bytes it writes
//! (`write_bytes`) and reads (`read_full`, `read_partial`) from one token bucket per direction.
//!
//! The buckets are [`Limiter`]s made once per process (by the command line) and shared through
//! `Arc`s by every repository handle and thread: several segments served at once, or the two
//! repositories of `shmback copy`, share one budget, as restic's limit is one per process.
//!
//! The bucket is governor's GCRA (a lock-free token bucket), counted in KiB cells (a byte cell
//! would round the replenish interval to whole nanoseconds, several percent off at 100 MiB/s);
//! sub-KiB remainders are carried over, so many small files are charged exactly what they sum to.
//! A large object is charged in chunks of at most a tenth of a second's worth, each waited for
//! in turn, so the bucket never lets a long burst through after idling and no single wait is
//! long. The backends take whole buffers, though: a write is paced *before* it is handed over
//! (the object then leaves at line speed, in one piece), a read of known length before it is
//! asked for, and a whole-file read after it arrived. The rate is therefore held on average over
//! any span of a few objects, while on the wire each object is one burst: with 32 MiB packs (the
//! engine's default size for data) at 1 MiB/s, 32 s of silence, then one pack at full speed
//! (docs/bandwidth.md).

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use rustic_core::{BytesList, FileType, Id, ReadBackend, RusticResult, WriteBackend};

/// The command-line flags of the limits (global: every command that touches a repository).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LimitArgs {
    /// Most KiB per second written to the repository's backend, all threads together (0 or
    /// unset: no limit). As restic's --limit-upload.
    #[arg(long, global = true, value_name = "KiB/s", env = "SHMBACK_LIMIT_UPLOAD")]
    pub limit_upload: Option<u32>,
    /// Most KiB per second read from the repository's backend, all threads together (0 or
    /// unset: no limit). As restic's --limit-download.
    #[arg(long, global = true, value_name = "KiB/s", env = "SHMBACK_LIMIT_DOWNLOAD")]
    pub limit_download: Option<u32>,
}

/// Examples of the limits for `--help`.
pub const LIMIT_EXAMPLES: &str = "Bandwidth (any backend, any command):
  shmback run --limit-upload 2048                    # at most 2 MiB/s to the repository
  SHMBACK_LIMIT_DOWNLOAD=10240 shmback restore latest /data   # at most 10 MiB/s from it";

impl LimitArgs {
    /// The buckets these flags ask for; call once per process and share the result.
    pub fn bandwidth(&self) -> Bandwidth {
        Bandwidth::new(self.limit_upload, self.limit_download)
    }
}

/// Which way bytes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// To the backend.
    Upload,
    /// From the backend.
    Download,
}

impl Direction {
    /// The label value of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Direction::Upload => "upload",
            Direction::Download => "download",
        }
    }
}

/// A token bucket of one direction, counted in KiB, on clock `C` (a fake one in tests).
pub struct Limiter<C: Clock = DefaultClock> {
    direction: Direction,
    kib_per_second: NonZeroU32,
    /// The most KiB taken at once (and the burst after idling): a tenth of a second's worth.
    chunk: NonZeroU32,
    gcra: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
    /// Bytes charged so far, for the sub-KiB carry.
    bytes: AtomicU64,
}

impl<C: Clock> fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Limiter({} {} KiB/s)", self.direction.label(), self.kib_per_second)
    }
}

impl Limiter {
    /// A bucket of `kib_per_second` on the real clock.
    pub fn new(direction: Direction, kib_per_second: NonZeroU32) -> Self {
        Self::with_clock(direction, kib_per_second, DefaultClock::default())
    }

    /// Takes `bytes` from the bucket, sleeping as long as needed, and counts the wait in
    /// the `shmback_throttled_seconds{direction}` histogram (its `_sum` is the total wait).
    pub fn throttle(&self, bytes: u64) {
        let waited = self.take(bytes, std::thread::sleep);
        if !waited.is_zero() {
            // A histogram: its `_sum` counts the seconds with their fractions (the metrics
            // facade's counters are integers), its `_count` the waits.
            metrics::histogram!("shmback_throttled_seconds", "direction" => self.direction.label())
                .record(waited.as_secs_f64());
        }
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// A bucket of `kib_per_second` on `clock`; it starts full (one chunk).
    pub fn with_clock(direction: Direction, kib_per_second: NonZeroU32, clock: C) -> Self {
        let chunk = NonZeroU32::new((kib_per_second.get() / 10).clamp(1, 16 * 1024)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(kib_per_second).allow_burst(chunk);
        let gcra = RateLimiter::direct_with_clock(quota, clock.clone());
        Limiter { direction, kib_per_second, chunk, gcra, clock, bytes: AtomicU64::new(0) }
    }

    /// The limit, in bytes per second.
    pub fn bytes_per_second(&self) -> u64 {
        u64::from(self.kib_per_second.get()) * 1024
    }

    /// Which way this bucket limits.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    /// Bytes charged to this bucket so far.
    pub fn bytes_charged(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Takes `bytes` from the bucket, a chunk at a time, calling `sleep` with each wait (the
    /// real one sleeps; a test advances its fake clock); returns the total waited.
    pub fn take(&self, bytes: u64, mut sleep: impl FnMut(Duration)) -> Duration {
        let before = self.bytes.fetch_add(bytes, Ordering::Relaxed);
        // Whole KiB crossed by this call: sub-KiB remainders add up across calls and threads.
        let mut kib = (before + bytes) / 1024 - before / 1024;
        let mut waited = Duration::ZERO;
        while kib > 0 {
            let n = u32::try_from(kib).unwrap_or(u32::MAX).min(self.chunk.get());
            let Some(cells) = NonZeroU32::new(n) else { break };
            loop {
                match self.gcra.check_n(cells) {
                    Ok(Ok(())) => break,
                    Ok(Err(until)) => {
                        let wait = until.wait_time_from(self.clock.now());
                        sleep(wait);
                        waited += wait;
                    }
                    // `cells` never exceeds the burst (both are `chunk` at most).
                    Err(_) => break,
                }
            }
            kib -= u64::from(n);
        }
        waited
    }
}

/// The buckets of a process: none, one or both directions. Cloning shares them.
#[derive(Clone, Debug, Default)]
pub struct Bandwidth {
    upload: Option<Arc<Limiter>>,
    download: Option<Arc<Limiter>>,
}

impl Bandwidth {
    /// Buckets for the limits in KiB/s (`None` or 0: unlimited). Sets
    /// `shmback_upload_limit_bytes_per_second` and `shmback_download_limit_bytes_per_second`
    /// (0 when unlimited).
    pub fn new(upload_kib: Option<u32>, download_kib: Option<u32>) -> Self {
        let make =
            |kib: Option<u32>, direction| kib.and_then(NonZeroU32::new).map(|k| Arc::new(Limiter::new(direction, k)));
        let bw = Bandwidth {
            upload: make(upload_kib, Direction::Upload),
            download: make(download_kib, Direction::Download),
        };
        let rate = |l: &Option<Arc<Limiter>>| l.as_ref().map_or(0.0, |l| l.bytes_per_second() as f64);
        metrics::gauge!("shmback_upload_limit_bytes_per_second").set(rate(&bw.upload));
        metrics::gauge!("shmback_download_limit_bytes_per_second").set(rate(&bw.download));
        if !bw.is_unlimited() {
            let show =
                |kib: Option<u32>| kib.filter(|k| *k > 0).map_or("unlimited".to_string(), |k| format!("{k} KiB/s"));
            tracing::info!(upload = %show(upload_kib), download = %show(download_kib), "bandwidth limit of this process");
        }
        bw
    }

    /// No limit in either direction.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// Whether neither direction is limited.
    pub fn is_unlimited(&self) -> bool {
        self.upload.is_none() && self.download.is_none()
    }

    /// The upload bucket, if limited.
    pub fn upload(&self) -> Option<&Arc<Limiter>> {
        self.upload.as_ref()
    }

    /// The download bucket, if limited.
    pub fn download(&self) -> Option<&Arc<Limiter>> {
        self.download.as_ref()
    }

    /// `inner` behind these limits (itself when unlimited).
    pub fn wrap(&self, inner: Arc<dyn WriteBackend>) -> Arc<dyn WriteBackend> {
        if self.is_unlimited() {
            return inner;
        }
        Arc::new(LimitedBackend { inner, limits: self.clone() })
    }
}

/// A backend whose reads and writes are paced by the process's buckets.
pub struct LimitedBackend {
    inner: Arc<dyn WriteBackend>,
    limits: Bandwidth,
}

impl LimitedBackend {
    fn up(&self, bytes: usize) {
        if let Some(l) = &self.limits.upload {
            l.throttle(bytes as u64);
        }
    }

    fn down(&self, bytes: usize) {
        if let Some(l) = &self.limits.download {
            l.throttle(bytes as u64);
        }
    }
}

impl ReadBackend for LimitedBackend {
    super::forward_read_meta!();

    fn read_full(&self, tpe: FileType, id: &Id) -> RusticResult<Bytes> {
        // The size is known only once read: charged after, so the next read waits for it.
        let data = self.inner.read_full(tpe, id)?;
        self.down(data.len());
        Ok(data)
    }

    fn read_partial(&self, tpe: FileType, id: &Id, cacheable: bool, offset: u32, length: u32) -> RusticResult<Bytes> {
        self.down(length as usize);
        self.inner.read_partial(tpe, id, cacheable, offset, length)
    }
}

impl WriteBackend for LimitedBackend {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }

    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, buf: BytesList) -> RusticResult<()> {
        // Paced before it is handed over: the backends take whole buffers.
        self.up(buf.size());
        self.inner.write_bytes(tpe, id, cacheable, buf)
    }

    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.inner.remove(tpe, id, cacheable)
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn kib(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// A bucket on a fake clock, and a `sleep` that advances it and records each wait.
    fn fake(kib_per_second: u32) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (Limiter::with_clock(Direction::Upload, kib(kib_per_second), clock.clone()), clock)
    }

    fn take(
        l: &Limiter<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        bytes: u64,
        sleeps: &mut Vec<Duration>,
    ) -> Duration {
        l.take(bytes, |d| {
            clock.advance(d);
            sleeps.push(d);
        })
    }

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(1)
    }

    #[test]
    fn a_large_object_takes_size_over_rate_in_short_steps() {
        // 100 KiB/s: a burst of 10 KiB, then 10 ms per KiB.
        let (l, clock) = fake(100);
        let mut sleeps = vec![];
        let waited = take(&l, &clock, 1000 * 1024, &mut sleeps);
        assert!(close(waited, Duration::from_millis(9900)), "{waited:?}");
        // Paced: many short waits of at most a chunk's worth (0.1 s), never one long sleep.
        assert!(sleeps.len() >= 99, "{} waits", sleeps.len());
        assert!(sleeps.iter().all(|d| *d <= Duration::from_millis(100)), "{sleeps:?}");
        assert_eq!(l.bytes_charged(), 1000 * 1024);
    }

    #[test]
    fn idling_refills_only_one_burst() {
        let (l, clock) = fake(100);
        let mut sleeps = vec![];
        assert_eq!(take(&l, &clock, 10 * 1024, &mut sleeps), Duration::ZERO, "the bucket starts with one burst");
        // A minute of silence earns a burst (10 KiB), not a minute's worth.
        clock.advance(Duration::from_secs(60));
        assert_eq!(take(&l, &clock, 10 * 1024, &mut sleeps), Duration::ZERO);
        let waited = take(&l, &clock, 50 * 1024, &mut sleeps);
        assert!(close(waited, Duration::from_millis(500)), "{waited:?}");
    }

    #[test]
    fn small_writes_are_charged_what_they_add_up_to() {
        let (l, clock) = fake(100);
        let mut sleeps = vec![];
        // Empty the bucket.
        take(&l, &clock, 10 * 1024, &mut sleeps);
        // 512 bytes: no whole KiB yet, no wait; the next 512 complete one: 10 ms.
        assert_eq!(take(&l, &clock, 512, &mut sleeps), Duration::ZERO);
        assert!(close(take(&l, &clock, 512, &mut sleeps), Duration::from_millis(10)));
        // 2048 one-byte writes cost 2 KiB, not 2048 rounded-up KiB.
        let total: Duration = (0..2048).map(|_| take(&l, &clock, 1, &mut sleeps)).sum();
        assert!(close(total, Duration::from_millis(20)), "{total:?}");
    }

    #[test]
    fn the_rate_holds_at_high_limits() {
        // 100 MiB/s: a byte-cell bucket would round 9.54 ns per byte to 9 (6 % fast); KiB cells
        // keep it exact to the nanosecond per KiB.
        let (l, clock) = fake(100 * 1024);
        let mut sleeps = vec![];
        let waited = take(&l, &clock, 1000 * 1024 * 1024, &mut sleeps);
        let expected = Duration::from_secs(10) - Duration::from_millis(100); // one burst free
        assert!(waited.abs_diff(expected) < Duration::from_millis(10), "{waited:?}");
        assert!(sleeps.iter().all(|d| *d <= Duration::from_millis(100)));
    }

    #[test]
    fn shared_handles_share_one_budget() {
        let clock = FakeRelativeClock::default();
        let l = Arc::new(Limiter::with_clock(Direction::Download, kib(100), clock.clone()));
        let (a, b) = (l.clone(), l);
        let mut sleeps = vec![];
        take(&a, &clock, 10 * 1024, &mut sleeps);
        // What one handle took, the other waits for.
        let waited = take(&b, &clock, 10 * 1024, &mut sleeps);
        assert!(close(waited, Duration::from_millis(100)), "{waited:?}");
        assert_eq!(a.bytes_charged(), 20 * 1024);
    }

    #[test]
    fn the_wrapper_charges_writes_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn WriteBackend> = Arc::new(super::super::local::LocalBackend::new(dir.path()).unwrap());
        // Limits high enough that nothing waits in this test; it checks what is charged.
        let bw = Bandwidth::new(Some(1024 * 1024), Some(1024 * 1024));
        let be = bw.wrap(local);
        be.create().unwrap();
        let id = Id::default();
        let mut list = BytesList::default();
        list.add(Bytes::from(vec![1u8; 3000]));
        list.add(Bytes::from(vec![2u8; 1000]));
        be.write_bytes(FileType::Pack, &id, false, list).unwrap();
        assert_eq!(bw.upload().unwrap().bytes_charged(), 4000);
        assert_eq!(be.read_full(FileType::Pack, &id).unwrap().len(), 4000);
        assert_eq!(be.read_partial(FileType::Pack, &id, false, 100, 500).unwrap().len(), 500);
        assert_eq!(bw.download().unwrap().bytes_charged(), 4500);
        assert_eq!(bw.upload().unwrap().bytes_charged(), 4000, "reads are not uploads");
        // Unlimited: the backend is passed through as it is.
        let inner: Arc<dyn WriteBackend> = Arc::new(super::super::local::LocalBackend::new(dir.path()).unwrap());
        assert!(Arc::ptr_eq(&Bandwidth::unlimited().wrap(inner.clone()), &inner));
        assert!(Bandwidth::new(Some(0), None).is_unlimited(), "0 means no limit, as in restic");
    }
}
