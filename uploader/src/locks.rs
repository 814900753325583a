//! restic-format repository locks: shmback writes them while it changes a repository, and honours
//! those of restic (and of other shmback processes).
//!
//! rustic_core takes no locks. Without them a `restic prune` run while `shmback run` writes could
//! delete packs shmback uploaded but has not indexed yet. restic's rules (its
//! `internal/repository/lock.go`), which this module follows:
//! - a lock is `locks/<id>`: an encrypted JSON document (`time`, `exclusive`, `hostname`,
//!   `username`, `pid`, `uid`, `gid`) stored under the SHA-256 of its bytes;
//! - an exclusive lock (prune, forget, repair, check) conflicts with every other lock, a
//!   non-exclusive one (backup, restore, snapshots) only with exclusive ones;
//! - a lock is checked for conflicts before it is written and again after (two processes racing
//!   both see each other and back off), and conflicts are retried with a growing pause for up to
//!   `--retry-lock`;
//! - the holder writes a fresh lock every 5 minutes (then removes the old one); a lock older than
//!   30 minutes, or one written on this host by a process that is gone, is stale.
//!
//! One difference, on purpose: restic refuses to start while any conflicting lock exists, stale or
//! not, until `restic unlock` removes it; shmback ignores stale locks (logging each one once, with
//! `shmback unlock` as the fix), so a crashed process does not stop the daemon's backups.
//!
//! The daemon holds a non-exclusive lock only while a batch is in flight (from loading the index to
//! the snapshot stored), none while idle, so a prune can run between batches. Within one process a
//! [`ProcessGate`] per repository orders the two sides: batches take it shared, an exclusive
//! command (a prune run by the daemon itself) takes it exclusive, so that prune never runs while a
//! batch is in flight and never sees this process's own lock file as a conflict.
//!
//! A lock that can no longer be refreshed (the backend failing for longer than the stale time less
//! a margin) must not leave its holder writing unprotected: the [`Fence`] in front of the backend
//! then refuses every write but a lock's, so the batch (or command) fails instead.

use std::collections::HashSet;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use jiff::{SignedDuration, Timestamp};
use rustic_core::repofile::{RepoFile, RepoId};
use rustic_core::{
    BytesList, ErrorKind, FileType, Id, OpenStatus, ReadBackend, Repository, RusticError, RusticResult, WriteBackend,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// restic's refresh interval: a fresh lock file is written this often.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
/// restic's stale time: a lock file older than this is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);
/// The default of `--retry-lock`.
pub const DEFAULT_RETRY_LOCK: &str = "5m";

/// The lock document, in restic's JSON format (`internal/repository/lock_file.go`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockFile {
    /// When it was written (restic writes it again every 5 minutes).
    pub time: Timestamp,
    /// Whether it excludes every other lock.
    pub exclusive: bool,
    /// The holder's host name.
    #[serde(default)]
    pub hostname: String,
    /// The holder's user name.
    #[serde(default)]
    pub username: String,
    /// The holder's process id.
    #[serde(default)]
    pub pid: i64,
    /// The holder's user id (omitted when 0, as Go's `omitempty` does).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uid: u32,
    /// The holder's group id (omitted when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gid: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// The id of a lock file (the hash of its stored bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockId(Id);

impl Deref for LockId {
    type Target = Id;
    fn deref(&self) -> &Id {
        &self.0
    }
}

impl From<Id> for LockId {
    fn from(id: Id) -> Self {
        LockId(id)
    }
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // restic's `Str()`: the first 8 hex digits name a lock in messages.
        f.write_str(&self.0.to_hex().as_str()[..8])
    }
}

impl RepoId for LockId {
    const TYPE: FileType = FileType::Lock;
}

impl RepoFile for LockFile {
    const TYPE: FileType = FileType::Lock;
    type Id = LockId;
}

impl LockFile {
    /// A lock of this process, written now.
    pub fn for_this_process(exclusive: bool) -> Self {
        let uid = nix::unistd::getuid();
        let username = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_default();
        LockFile {
            time: Timestamp::now(),
            exclusive,
            hostname: this_host(),
            username,
            pid: i64::from(std::process::id()),
            uid: uid.as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        }
    }

    /// Whether the lock is stale at `now`: older than [`STALE_AFTER`], or written on this host
    /// (`host`) by a process that no longer exists. A lock from another host is stale only by age.
    pub fn is_stale(&self, now: Timestamp, host: &str) -> bool {
        let age = now.duration_since(self.time);
        if age > SignedDuration::try_from(STALE_AFTER).unwrap_or(SignedDuration::MAX) {
            return true;
        }
        self.hostname == host && !process_exists(self.pid)
    }

    /// "exclusive lock" or "lock", for messages.
    fn kind(&self) -> &'static str {
        if self.exclusive { "exclusive lock" } else { "lock" }
    }
}

impl fmt::Display for LockFile {
    /// Who holds it and since when, as restic describes a lock.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let age = Timestamp::now().duration_since(self.time);
        let age = Duration::try_from(age).map_or_else(|_| "in the future".into(), |a| format!("{} ago", secs(a)));
        write!(
            f,
            "PID {} on {} by {} (UID {}, GID {}), created at {} ({age})",
            self.pid,
            self.hostname,
            self.username,
            self.uid,
            self.gid,
            self.time.strftime("%Y-%m-%d %H:%M:%S UTC"),
        )
    }
}

fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 { format!("{}m{}s", s / 60, s % 60) } else { format!("{:.1}s", d.as_secs_f64()) }
}

/// This host's name, as Go's `os.Hostname` finds it (the kernel's, else /etc/hostname).
pub fn this_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_default()
}

/// Whether process `pid` exists on this host. restic asks by sending SIGHUP; signal 0 asks
/// without disturbing it. A pid that cannot name a single process (0, negative, too large) is
/// no live holder.
fn process_exists(pid: i64) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if raw <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) => true,
        // It exists, owned by someone else.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// How long to wait for a conflicting lock, and restic's timings (shortened by tests only).
#[derive(Clone, Debug)]
pub struct LockOptions {
    /// How long to wait for conflicting locks before giving up (restic's `--retry-lock`).
    pub retry: Duration,
    /// Between refreshes of a held lock.
    pub refresh: Duration,
    /// A held lock not refreshed for this long is given up (writes are refused): restic's stale
    /// time less 1.5 refresh intervals, a margin for clock drift between hosts.
    pub refreshable_for: Duration,
    /// Pause after writing a lock before checking again for conflicting ones (lets a racing
    /// process's lock become visible).
    pub settle: Duration,
    /// First pause between attempts; it doubles up to a minute.
    pub first_pause: Duration,
}

impl Default for LockOptions {
    fn default() -> Self {
        LockOptions {
            retry: Duration::from_secs(5 * 60),
            refresh: REFRESH_INTERVAL,
            refreshable_for: STALE_AFTER - REFRESH_INTERVAL * 3 / 2,
            settle: Duration::from_millis(200),
            first_pause: Duration::from_secs(5),
        }
    }
}

/// The command-line flag of every command that uses the repository.
#[derive(clap::Args, Clone, Debug)]
pub struct LockArgs {
    /// How long to wait for another process's conflicting repository lock (a `restic prune`, a
    /// running backup…) before failing, e.g. 30s, 5m, 1h; 0 fails at once. `shmback run` fails
    /// only the batch (the producer resends it); a command exits with an error naming the lock.
    #[arg(long, global = true, value_name = "DURATION", env = "SHMBACK_RETRY_LOCK", default_value = DEFAULT_RETRY_LOCK, value_parser = parse_duration)]
    pub retry_lock: Duration,
}

impl LockArgs {
    /// The lock options these flags give.
    pub fn options(&self) -> LockOptions {
        LockOptions { retry: self.retry_lock, ..LockOptions::default() }
    }
}

/// Parses a duration as restic takes it (`90s`, `5m`, `1h30m`) or in jiff's friendly format
/// (`2 minutes`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let d: SignedDuration = s.parse().map_err(|e| format!("expected a duration such as 30s, 5m or 1h30m: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("expected a duration that is not negative, found {s}"))
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Other processes hold conflicting locks, and still did after the wait.
    #[error(
        "repository is already locked{} (waited {}, --retry-lock {}):\n{}\nwait for it to finish, or give it more \
         time with --retry-lock; if that process is gone, `shmback unlock` removes stale locks (those over 30 \
         minutes old, or from a dead process on this host), and `shmback unlock --remove-all` every lock (only \
         when nothing else uses the repository)",
        if .others.iter().any(|o| o.1.as_ref().is_some_and(|l| l.exclusive)) { " exclusively" } else { "" },
        secs(*.waited),
        secs(*.retry),
        .others.iter().map(describe).collect::<Vec<_>>().join("\n")
    )]
    Locked {
        /// The conflicting locks (`None`: a lock file that could not be read).
        others: Vec<(LockId, Option<LockFile>)>,
        /// How long it waited.
        waited: Duration,
        /// The bound it waited for.
        retry: Duration,
    },
    /// A conflicting use of the repository in this same process lasted longer than the wait.
    #[error(
        "{what} in this process still held the repository after {} (--retry-lock): try again later, or give it \
         more time with --retry-lock",
        secs(*.waited)
    )]
    Busy {
        /// What held it.
        what: &'static str,
        /// How long it waited.
        waited: Duration,
    },
    /// The process is shutting down.
    #[error("gave up waiting for the repository lock: shutting down")]
    Cancelled,
    /// The backend failed while locks were listed, read or written.
    #[error("repository lock: {0}")]
    Backend(#[from] Box<RusticError>),
}

fn describe((id, lock): &(LockId, Option<LockFile>)) -> String {
    match lock {
        Some(l) => format!("  {} {id} held by {l}", l.kind()),
        None => format!(
            "  lock {id} cannot be read (damaged, or written with a key this repository no longer has); if no \
             other process uses the repository, `shmback unlock --remove-all` removes it"
        ),
    }
}

/// One repository's side of this process: batches in flight (shared) against an exclusive command.
/// Writer-preferring: once an exclusive taker waits, new shared takers wait behind it, so a
/// steady stream of batches cannot keep a prune out for ever.
#[derive(Default)]
pub struct ProcessGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    shared: usize,
    exclusive: bool,
    exclusive_waiting: usize,
}

/// A place held in a [`ProcessGate`]; released on drop.
pub struct ProcessGuard {
    gate: Arc<ProcessGate>,
    exclusive: bool,
}

impl ProcessGate {
    /// The gate of the repository at `location` (one per location, for the process's life).
    pub fn of(location: &str) -> Arc<ProcessGate> {
        static GATES: OnceLock<Mutex<std::collections::HashMap<String, Arc<ProcessGate>>>> = OnceLock::new();
        let mut gates = GATES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        gates.entry(location.to_string()).or_default().clone()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the gate's `exclusive` or shared side, waiting up to `wait` (checking `cancelled`).
    pub fn enter(
        self: &Arc<Self>,
        exclusive: bool,
        wait: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<ProcessGuard, LockError> {
        let start = Instant::now();
        let mut st = self.lock();
        if exclusive {
            st.exclusive_waiting += 1;
        }
        loop {
            let free =
                if exclusive { st.shared == 0 && !st.exclusive } else { !st.exclusive && st.exclusive_waiting == 0 };
            if free {
                if exclusive {
                    st.exclusive_waiting -= 1;
                    st.exclusive = true;
                } else {
                    st.shared += 1;
                }
                return Ok(ProcessGuard { gate: self.clone(), exclusive });
            }
            let waited = start.elapsed();
            if waited >= wait || cancelled() {
                if exclusive {
                    st.exclusive_waiting -= 1;
                    self.changed.notify_all();
                }
                if cancelled() {
                    return Err(LockError::Cancelled);
                }
                let what =
                    if exclusive && st.shared > 0 { "a batch in flight" } else { "an exclusive command (prune)" };
                return Err(LockError::Busy { what, waited });
            }
            let step = (wait - waited).min(Duration::from_millis(200));
            st = self.changed.wait_timeout(st, step).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        if self.exclusive {
            st.exclusive = false;
        } else {
            st.shared -= 1;
        }
        self.gate.changed.notify_all();
    }
}

/// A backend wrapper that refuses every write (and removal) but a lock file's unless its process
/// holds a valid lock: none taken, or one that could not be refreshed in time, and nothing is
/// changed unprotected.
#[derive(Clone, Default)]
pub struct Fence(Arc<FenceState>);

#[derive(Default)]
struct FenceState {
    held: Mutex<Option<Arc<Held>>>,
    /// The backend behind the fence: lock files are listed with their sizes from it.
    backend: OnceLock<Arc<dyn WriteBackend>>,
}

impl Fence {
    /// Puts this fence in front of `inner`.
    pub fn wrap(&self, inner: Arc<dyn WriteBackend>) -> Arc<dyn WriteBackend> {
        let _ = self.0.backend.set(inner.clone());
        Arc::new(FencedBackend { inner, fence: self.clone() })
    }

    fn set(&self, held: Option<Arc<Held>>) {
        *self.0.held.lock().unwrap_or_else(|p| p.into_inner()) = held;
    }

    /// The lock files with their sizes (restic skips empty ones), from the backend behind the
    /// fence; from `repo`, without sizes, if the fence wraps none.
    fn list_locks(&self, repo: &Repository<OpenStatus>) -> RusticResult<Vec<(LockId, u32)>> {
        match self.0.backend.get() {
            Some(be) => Ok(be.list_with_size(FileType::Lock)?.into_iter().map(|(id, n)| (LockId(id), n)).collect()),
            None => Ok(repo.list::<LockId>()?.map(|id| (id, u32::MAX)).collect()),
        }
    }

    /// Why a write must be refused now, if it must.
    fn refusal(&self) -> Option<String> {
        let held = self.0.held.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(held) = held else {
            return Some("this process holds no lock on the repository".into());
        };
        let written = held.current().1.time;
        let age = Duration::try_from(Timestamp::now().duration_since(written)).unwrap_or_default();
        if held.lost.load(Ordering::Acquire) || age > held.opts.refreshable_for {
            return Some(format!(
                "its lock could not be refreshed for {} (the backend failed): another process may already \
                 consider it stale and prune the repository",
                secs(age)
            ));
        }
        None
    }
}

struct FencedBackend {
    inner: Arc<dyn WriteBackend>,
    fence: Fence,
}

impl FencedBackend {
    fn check(&self, what: &str, tpe: FileType, id: &Id) -> RusticResult<()> {
        if tpe == FileType::Lock {
            return Ok(());
        }
        match self.fence.refusal() {
            None => Ok(()),
            Some(why) => Err(RusticError::new(
                ErrorKind::Repository,
                "refused to {what} {tpe} {id} without a valid repository lock: {why}. Nothing more is written; \
                 the batch or command fails and can be run again.",
            )
            .attach_context("what", what)
            .attach_context("tpe", tpe.to_string())
            .attach_context("id", id.to_hex().to_string())
            .attach_context("why", why)),
        }
    }
}

crate::backends::forward_read_backend!(FencedBackend);

impl WriteBackend for FencedBackend {
    fn create(&self) -> RusticResult<()> {
        self.inner.create()
    }
    fn write_bytes(&self, tpe: FileType, id: &Id, cacheable: bool, buf: BytesList) -> RusticResult<()> {
        self.check("write", tpe, id)?;
        self.inner.write_bytes(tpe, id, cacheable, buf)
    }
    fn remove(&self, tpe: FileType, id: &Id, cacheable: bool) -> RusticResult<()> {
        self.check("remove", tpe, id)?;
        self.inner.remove(tpe, id, cacheable)
    }
}

/// What the holder and its refresh thread share.
struct Held {
    repo: Repository<OpenStatus>,
    current: Mutex<(LockId, LockFile)>,
    /// Set when the holder lets go: the refresh thread ends.
    released: Mutex<bool>,
    wake: Condvar,
    /// Set when the lock could not be refreshed in time.
    lost: AtomicBool,
    opts: LockOptions,
}

impl Held {
    fn current(&self) -> (LockId, LockFile) {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Writes a fresh lock, then removes the one it replaces (restic's `refresh`).
    fn refresh(&self) -> RusticResult<()> {
        let (old, mut lock) = self.current();
        lock.time = Timestamp::now();
        let id = self.repo.save_file(&lock)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = (id, lock);
        if let Err(e) = self.repo.remove_file(&old) {
            warn!("the replaced repository lock {old} could not be removed (it goes stale in 30 minutes): {e}");
        }
        Ok(())
    }

    /// The refresh thread: every `refresh`, a fresh lock; a lock that could not be refreshed for
    /// `refreshable_for` is lost (the fence then refuses writes).
    fn refresh_loop(&self) {
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // The flag is checked before waiting too: a release that came before this thread
            // first waited must not be slept through.
            released = self
                .wake
                .wait_timeout_while(released, self.opts.refresh, |released| !*released)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if *released {
                return;
            }
            drop(released);
            match self.refresh() {
                Ok(()) => {}
                Err(e) => {
                    let written = self.current().1.time;
                    let age = Duration::try_from(Timestamp::now().duration_since(written)).unwrap_or_default();
                    if age > self.opts.refreshable_for {
                        self.lost.store(true, Ordering::Release);
                        warn!(
                            "the repository lock could not be refreshed for {}: writing stops (the batch or command \
                             fails) rather than going on unprotected: {e}",
                            secs(age)
                        );
                    } else {
                        warn!("refreshing the repository lock failed (retried in {}): {e}", secs(self.opts.refresh));
                    }
                }
            }
            released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// A repository lock held by this process: a lock file refreshed by a thread, and this process's
/// side of the repository's [`ProcessGate`]. Dropping it stops the refresh and removes the file.
pub struct RepoLock {
    held: Arc<Held>,
    fence: Fence,
    refresher: Option<JoinHandle<()>>,
    _gate: ProcessGuard,
}

impl RepoLock {
    /// Takes a lock on `repo` (exclusive or not), waiting up to `opts.retry` for conflicting locks
    /// of other processes (and, in this process, for the other side of the [`ProcessGate`]).
    /// `fence` (the one in front of `repo`'s backend) lets writes through while the lock is valid.
    /// `cancelled` is checked while waiting.
    pub fn acquire(
        repo: &Repository<OpenStatus>,
        exclusive: bool,
        opts: &LockOptions,
        fence: &Fence,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<RepoLock, LockError> {
        Self::acquire_settling(repo, exclusive, opts, fence, cancelled, &mut || {})
    }

    /// [`Self::acquire`], running `settling` while restic's protocol waits after writing the lock
    /// file (before it checks for conflicting locks again): the pause becomes at least as long as
    /// `settling`, no longer. It runs once per lock file written (again after a race backs off),
    /// under a lock not yet confirmed: what it reads must be checked again once the lock is held
    /// (`serve::batch` re-lists the index files it loaded).
    pub fn acquire_settling(
        repo: &Repository<OpenStatus>,
        exclusive: bool,
        opts: &LockOptions,
        fence: &Fence,
        cancelled: &dyn Fn() -> bool,
        settling: &mut dyn FnMut(),
    ) -> Result<RepoLock, LockError> {
        let start = Instant::now();
        let gate = ProcessGate::of(&gate_key(repo));
        let guard = gate.enter(exclusive, opts.retry, cancelled)?;
        let (id, lock) = acquire_file(fence, repo, exclusive, opts, start, cancelled, settling)?;
        let waited = start.elapsed();
        metrics::histogram!("shmback_lock_wait_seconds").record(waited.as_secs_f64());
        metrics::gauge!("shmback_locks_held", "kind" => kind_label(exclusive)).increment(1.0);
        let held = Arc::new(Held {
            repo: repo.clone(),
            current: Mutex::new((id, lock)),
            released: Mutex::new(false),
            wake: Condvar::new(),
            lost: AtomicBool::new(false),
            opts: opts.clone(),
        });
        fence.set(Some(held.clone()));
        let refresher = {
            let held = held.clone();
            std::thread::Builder::new().name("lock-refresh".into()).spawn(move || held.refresh_loop())
        };
        let refresher = match refresher {
            Ok(handle) => Some(handle),
            Err(e) => {
                let lock = RepoLock { held, fence: fence.clone(), refresher: None, _gate: guard };
                drop(lock);
                return Err(LockError::Backend(RusticError::with_source(
                    ErrorKind::Internal,
                    "could not start the thread refreshing the repository lock",
                    e,
                )));
            }
        };
        Ok(RepoLock { held, fence: fence.clone(), refresher, _gate: guard })
    }

    /// The id of the lock file held now (it changes at each refresh).
    pub fn id(&self) -> LockId {
        self.held.current().0
    }
}

impl Drop for RepoLock {
    fn drop(&mut self) {
        *self.held.released.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.held.wake.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        self.fence.set(None);
        let (id, lock) = self.held.current();
        if let Err(e) = self.held.repo.remove_file(&id) {
            warn!(
                "the repository lock {id} could not be removed ({e}); it goes stale 30 minutes after {}, or \
                 `shmback unlock` removes it once this process has ended",
                lock.time
            );
        }
        metrics::gauge!("shmback_locks_held", "kind" => kind_label(lock.exclusive)).decrement(1.0);
    }
}

fn kind_label(exclusive: bool) -> &'static str {
    if exclusive { "exclusive" } else { "shared" }
}

/// The key of a repository's [`ProcessGate`]: its config id, the repository's identity (the same
/// repository reached under two spellings of its location shares one gate).
fn gate_key(repo: &Repository<OpenStatus>) -> String {
    repo.config().id.to_hex().to_string()
}

/// Writes this process's lock file once no conflicting lock is left (restic's `newLock` inside
/// its retry loop), waiting until `start + opts.retry`.
fn acquire_file(
    fence: &Fence,
    repo: &Repository<OpenStatus>,
    exclusive: bool,
    opts: &LockOptions,
    start: Instant,
    cancelled: &dyn Fn() -> bool,
    settling: &mut dyn FnMut(),
) -> Result<(LockId, LockFile), LockError> {
    let host = this_host();
    let mut pause = opts.first_pause;
    let mut told = false;
    loop {
        let mut others = conflicts(fence, repo, exclusive, None, &host)?;
        if others.is_empty() {
            let lock = LockFile::for_this_process(exclusive);
            let id = repo.save_file(&lock)?;
            let written = Instant::now();
            settling();
            std::thread::sleep(opts.settle.saturating_sub(written.elapsed()));
            match conflicts(fence, repo, exclusive, Some(id), &host) {
                Ok(found) if found.is_empty() => return Ok((id, lock)),
                Ok(found) => {
                    // Raced with another process: both back off, and try again after a pause.
                    others = found;
                    if let Err(e) = repo.remove_file(&id) {
                        warn!("could not remove the repository lock {id} just written: {e}");
                    }
                }
                Err(e) => {
                    let _ = repo.remove_file(&id);
                    return Err(e.into());
                }
            }
        }
        let waited = start.elapsed();
        if waited >= opts.retry || cancelled() {
            metrics::histogram!("shmback_lock_wait_seconds").record(waited.as_secs_f64());
            if cancelled() {
                return Err(LockError::Cancelled);
            }
            return Err(LockError::Locked { others, waited, retry: opts.retry });
        }
        if !told {
            told = true;
            let list: Vec<String> = others.iter().map(describe).collect();
            info!(
                "repository already locked, waiting up to {} (--retry-lock) for:\n{}",
                secs(opts.retry),
                list.join("\n")
            );
        }
        // Sleep in short steps so a shutdown is noticed.
        let until = Instant::now() + pause.min(opts.retry - waited);
        while Instant::now() < until && !cancelled() {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(100)));
        }
        pause = (pause * 2).min(Duration::from_secs(60));
    }
}

/// The other processes' locks that conflict with a lock of kind `exclusive` (all of them for an
/// exclusive one, exclusive ones otherwise), ignoring `own`, empty files (an interrupted upload
/// on a backend without atomic writes, as restic does) and stale locks (logged once each).
fn conflicts(
    fence: &Fence,
    repo: &Repository<OpenStatus>,
    exclusive: bool,
    own: Option<LockId>,
    host: &str,
) -> RusticResult<Vec<(LockId, Option<LockFile>)>> {
    let listed = fence.list_locks(repo)?;
    let now = Timestamp::now();
    let mut found = Vec::new();
    for (id, size) in listed {
        if Some(id) == own || size == 0 {
            continue;
        }
        match repo.get_file::<LockFile>(&id) {
            Ok(lock) if lock.is_stale(now, host) => log_stale_once(id, &lock),
            Ok(lock) if exclusive || lock.exclusive => found.push((id, Some(lock))),
            Ok(_) => {}
            // Removed since it was listed (its holder let go): no conflict.
            Err(_) if !still_listed(fence, repo, id)? => {}
            Err(e) => {
                warn!("repository lock {id} cannot be read: {e}");
                found.push((id, None));
            }
        }
    }
    Ok(found)
}

fn still_listed(fence: &Fence, repo: &Repository<OpenStatus>, id: LockId) -> RusticResult<bool> {
    Ok(fence.list_locks(repo)?.iter().any(|(i, _)| *i == id))
}

fn log_stale_once(id: LockId, lock: &LockFile) {
    static LOGGED: OnceLock<Mutex<HashSet<LockId>>> = OnceLock::new();
    if LOGGED.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
        warn!(
            "ignoring the stale repository {} {id} of {lock} (restic would refuse to start until it is removed): \
             `shmback unlock` removes stale locks",
            lock.kind()
        );
    }
}

/// What `unlock` removed.
#[derive(Debug, Default)]
pub struct UnlockReport {
    /// The locks removed, with what they said (`None`: unreadable, removed by `remove_all`).
    pub removed: Vec<(LockId, Option<LockFile>)>,
    /// Locks left in place because they are not stale.
    pub kept: Vec<(LockId, LockFile)>,
}

/// Removes stale locks (restic's `unlock`); with `remove_all`, every lock (`unlock --remove-all`:
/// only when nothing else uses the repository). Unreadable locks are left alone unless `remove_all`.
pub fn unlock(repo: &Repository<OpenStatus>, remove_all: bool) -> RusticResult<UnlockReport> {
    let host = this_host();
    let now = Timestamp::now();
    let mut report = UnlockReport::default();
    for id in repo.list::<LockId>()? {
        let lock = repo.get_file::<LockFile>(&id).ok();
        let remove = remove_all || lock.as_ref().is_some_and(|l| l.is_stale(now, &host));
        if remove {
            repo.remove_file(&id)?;
            report.removed.push((id, lock));
        } else if let Some(l) = lock {
            report.kept.push((id, l));
        }
    }
    Ok(report)
}

/// Describes a lock for `shmback unlock`'s output.
pub fn describe_lock(id: LockId, lock: Option<&LockFile>) -> String {
    describe(&(id, lock.cloned())).trim_start().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restic_json_round_trips_and_reads_go_times() {
        let go = r#"{"time":"2026-11-30T22:01:02.123456789+01:00","exclusive":true,"hostname":"h","username":"u","pid":42,"uid":1000,"gid":1000}"#;
        let l: LockFile = serde_json::from_str(go).unwrap();
        assert_eq!(l.time, "2026-11-30T21:01:02.123456789Z".parse::<Timestamp>().unwrap());
        assert!(l.exclusive);
        assert_eq!((l.hostname.as_str(), l.username.as_str(), l.pid, l.uid, l.gid), ("h", "u", 42, 1000, 1000));
        let root = LockFile { uid: 0, gid: 0, ..l };
        let v: serde_json::Value = serde_json::to_value(&root).unwrap();
        assert!(v.get("uid").is_none() && v.get("gid").is_none(), "omitempty as Go writes them: {v}");
        for key in ["time", "exclusive", "hostname", "username", "pid"] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
    }

    #[test]
    fn staleness_follows_restics_rules() {
        let host = this_host();
        let now = Timestamp::now();
        let mine = LockFile::for_this_process(false);
        assert!(!mine.is_stale(now, &host), "a live process's fresh lock");
        let old = LockFile { time: now - SignedDuration::from_mins(31), ..mine.clone() };
        assert!(old.is_stale(now, &host), "over 30 minutes old");
        // A pid that no process has (beyond pid_max) on this host: stale at once.
        let dead = LockFile { pid: 1 << 23, ..mine.clone() };
        assert!(dead.is_stale(now, &host));
        // The same pid on another host: only age makes it stale.
        let elsewhere = LockFile { hostname: format!("{host}-other"), ..dead };
        assert!(!elsewhere.is_stale(now, &host));
    }

    #[test]
    fn durations_parse_as_restic_writes_them() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("soon").unwrap_err().contains("expected a duration"));
    }

    #[test]
    fn process_gate_orders_batches_and_an_exclusive_command() {
        let gate = ProcessGate::of("gate-test");
        let never = || false;
        let a = gate.enter(false, Duration::ZERO, &never).unwrap();
        let b = gate.enter(false, Duration::ZERO, &never).unwrap();
        let e = gate.enter(true, Duration::from_millis(50), &never).err().unwrap();
        assert!(e.to_string().contains("a batch in flight"), "{e}");
        drop((a, b));
        let x = gate.enter(true, Duration::ZERO, &never).unwrap();
        let e = gate.enter(false, Duration::from_millis(50), &never).err().unwrap();
        assert!(e.to_string().contains("exclusive command"), "{e}");
        drop(x);
        let waiter = {
            let gate = gate.clone();
            let a = gate.enter(false, Duration::ZERO, &never).unwrap();
            let t = std::thread::spawn(move || gate.enter(true, Duration::from_secs(10), &|| false).map(|_| ()));
            std::thread::sleep(Duration::from_millis(100));
            drop(a);
            t
        };
        waiter.join().unwrap().unwrap();
    }
}
