//! The segment: one file under /dev/shm holding the header, the ring and the reverse area.
//!
//! Creation is atomic: the creator builds and initialises the file unnamed (`O_TMPFILE`, or a
//! private temporary name where that is unsupported), publishes READY, and only then links it at
//! the agreed path; if the other side linked first, the creator drops its copy and attaches. So no
//! one can open a half-initialised segment. Attach checks owner and mode, reads and validates the
//! header with `pread` before mapping anything, maps under the SIGBUS guard (`crate::sigbus`),
//! and, as consumer, re-initialises a segment its producer damaged once that producer is gone.
//!
//! One cohesive thing despite its length: the segment's life cycle (create, attach, validate,
//! repair, reset), in the order PROTOCOL.md describes it, sharing one set of invariants.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::os::unix::fs::FileExt;

use crate::layout::{
    FLAG_GROUP_SHARED, HEADER_SIZE, Header, LAYOUT_VERSION, MAGIC, RingShared, STATE_INITIALISING, STATE_READY,
};
use crate::ring::{Consumer, Memory, Producer, RingConfig, Role};
use crate::sigbus::GuardedMap;
use crate::sync::{AtomicU32, Ordering};
use crate::sys;

/// Smallest ring a segment accepts.
pub const MIN_CAPACITY: usize = 4096;
/// Largest ring a segment accepts.
pub const MAX_CAPACITY: usize = 1 << 30;
/// Largest reverse area a segment accepts.
pub const MAX_REVERSE_CAPACITY: usize = 64 << 20;
/// Ring size used when the creator does not choose one (see BENCHMARKS.md for why).
pub const DEFAULT_CAPACITY: usize = 4 << 20;
/// Reverse area used when the creator does not choose one: a want-list bitmap for 512 Ki entries.
pub const DEFAULT_REVERSE_CAPACITY: usize = 64 << 10;

/// Byte of the segment file each role locks for its whole life (an OFD lock, see `sys`).
fn lock_byte(role: Role) -> u64 {
    match role {
        Role::Producer => 0,
        Role::Consumer => 1,
    }
}

/// How to open a segment.
#[derive(Clone, Debug)]
pub struct SegmentOptions {
    /// Ring bytes. When creating: the size (default [`DEFAULT_CAPACITY`]). When attaching:
    /// `Some` makes a segment of another size an error, `None` accepts what the creator chose.
    pub capacity: Option<usize>,
    /// Reverse-area bytes when creating.
    pub reverse_capacity: usize,
    /// Create the segment if it does not exist.
    pub create: bool,
    /// Create it mode 0660 instead of 0600 (producer and uploader run as different users of one
    /// group).
    pub group_shared: bool,
    /// Map with every page populated, so the hot path takes no page faults.
    pub prefault: bool,
    /// How long to wait for a segment being (re)initialised by someone else to become READY.
    pub ready_timeout: Duration,
    /// How the ring publishes and waits.
    pub ring: RingConfig,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        Self {
            capacity: None,
            reverse_capacity: DEFAULT_REVERSE_CAPACITY,
            create: true,
            group_shared: false,
            prefault: true,
            ready_timeout: Duration::from_secs(2),
            ring: RingConfig::default(),
        }
    }
}

/// Why a segment could not be created or attached. Every message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// No segment at the path and creation was not allowed.
    #[error("segment {path} does not exist: start the side that creates it first, or allow creation")]
    NotFound {
        /// Segment path.
        path: PathBuf,
    },
    /// Not enough room in the filesystem for the segment.
    #[error(
        "not enough room in {dir} for a {need}-byte segment ({avail} bytes free): enlarge the shared-memory \
         volume (Akash `class: ram` storage size, Kubernetes emptyDir `sizeLimit`, docker `--shm-size`) or \
         choose a smaller ring"
    )]
    NoSpace {
        /// Directory of the segment.
        dir: PathBuf,
        /// Bytes needed.
        need: u64,
        /// Bytes free.
        avail: u64,
    },
    /// The file belongs to someone else.
    #[error(
        "permission denied opening segment {path}: run producer and uploader as the same user, or create \
         the segment group-shared and put both users in its group"
    )]
    PermissionDenied {
        /// Segment path.
        path: PathBuf,
    },
    /// Not a regular file.
    #[error("{path} is not a regular file: point the segment path at a file under /dev/shm")]
    NotRegular {
        /// Segment path.
        path: PathBuf,
    },
    /// Smaller than its header: truncated by its producer (found by a producer attaching; a
    /// consumer re-initialises such a segment instead).
    #[error(
        "segment {path} is {size} bytes, smaller than a segment header ({HEADER_SIZE}): it was truncated; \
         start the uploader, which re-initialises it when it attaches, or remove it while both sides are stopped"
    )]
    TooSmall {
        /// Segment path.
        path: PathBuf,
        /// File size.
        size: u64,
    },
    /// Wrong magic number.
    #[error("{path} is not a shmback segment (magic {found:#018x}): check the path, or remove the file")]
    BadMagic {
        /// Segment path.
        path: PathBuf,
        /// Magic found.
        found: u64,
    },
    /// Another layout version.
    #[error(
        "segment {path} has layout version {found}, this build speaks {expected}: run producer and uploader \
         from the same shmback release, or remove the segment while both are stopped"
    )]
    Version {
        /// Segment path.
        path: PathBuf,
        /// Version found.
        found: u32,
        /// Version expected.
        expected: u32,
    },
    /// Header geometry is invalid.
    #[error(
        "segment {path} has an invalid header ({what}): the file is corrupt; remove it while both sides are stopped"
    )]
    BadGeometry {
        /// Segment path.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// File size differs from what the header says: truncated or extended by its producer (found
    /// by a producer attaching; a consumer re-initialises such a segment instead).
    #[error(
        "segment {path} is {found} bytes but its header says {expected}: it was truncated or resized; start the \
         uploader, which re-initialises it when it attaches, or remove it while both sides are stopped"
    )]
    Truncated {
        /// Segment path.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// File size.
        found: u64,
    },
    /// Ring size differs from the one asked for.
    #[error(
        "segment {path} has a {found}-byte ring, {wanted} was asked for: use the same ring size on both sides, \
         or omit it on the attaching side"
    )]
    CapacityMismatch {
        /// Segment path.
        path: PathBuf,
        /// Capacity found.
        found: usize,
        /// Capacity asked for.
        wanted: usize,
    },
    /// Header not READY: zeroed (truncated and re-grown), or a re-initialisation died or is still
    /// running after the wait. A consumer re-initialises such a segment when no producer holds it.
    #[error(
        "segment {path} was not ready after {waited:?} (state {state}): its header was zeroed or a \
         re-initialisation died or is still running; start the uploader, which re-initialises it when it \
         attaches, or remove it while both sides are stopped"
    )]
    NotReady {
        /// Segment path.
        path: PathBuf,
        /// State word found.
        state: u32,
        /// How long we waited.
        waited: Duration,
    },
    /// The role is held by a live process.
    #[error(
        "another {role} (pid {pid}) is attached to segment {path}: a segment has one {role}; use one segment per producer"
    )]
    RoleTaken {
        /// Segment path.
        path: PathBuf,
        /// Role asked for.
        role: Role,
        /// Pid recorded in the header (0 if unknown).
        pid: u32,
    },
    /// A consumer found the segment damaged (truncated, resized, zeroed or not READY) while a live
    /// producer still holds it, so it cannot be re-initialised under that producer.
    #[error(
        "segment {path} is damaged ({what}) and its producer (pid {pid}) is still attached: restart or stop \
         that producer; the segment is re-initialised on the uploader's next attach (nothing in it was \
         acknowledged, so the producer resends)"
    )]
    DamagedInUse {
        /// Segment path.
        path: PathBuf,
        /// What was found.
        what: String,
        /// Pid recorded for the producer (0 if unreadable).
        pid: u32,
    },
    /// The file grants permissions to "other" users: anyone on the host could read the data or
    /// forge frames.
    #[error(
        "segment {path} has mode {mode:04o} (owner uid {uid}), which lets other users read or write it: \
         remove {path}; it is re-created mode 0600 (0660 with --group-shared)"
    )]
    InsecureMode {
        /// Segment path.
        path: PathBuf,
        /// Permission bits found.
        mode: u32,
        /// Owner found.
        uid: u32,
    },
    /// The file belongs to another user and is not shared with one of our groups (a segment
    /// pre-created by someone else in the world-writable /dev/shm).
    #[error(
        "segment {path} is owned by uid {uid} (gid {gid}, mode {mode:04o}), not by this process's uid {euid}, \
         and is not group-shared with one of its groups: remove {path}; it is re-created mode 0600 by the side \
         that starts first, or create it with --group-shared (mode 0660) and run both sides in its group"
    )]
    ForeignOwner {
        /// Segment path.
        path: PathBuf,
        /// Owner found.
        uid: u32,
        /// Group found.
        gid: u32,
        /// Permission bits found.
        mode: u32,
        /// This process's effective uid.
        euid: u32,
    },
    /// Reset refused because a side is attached.
    #[error("segment {path} is in use by a live {role} (pid {pid}): stop it before resetting the segment")]
    InUse {
        /// Segment path.
        path: PathBuf,
        /// Role in use.
        role: Role,
        /// Its pid.
        pid: u32,
    },
    /// Options out of range.
    #[error("invalid segment options: {0}")]
    InvalidOptions(String),
    /// Any other system call failure, with what was being done.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// Path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SegmentError + 'a {
    move |source| SegmentError::Io { op, path: path.to_path_buf(), source }
}

/// An attached segment: the mapping, the open file whose OFD lock marks this side alive, and the
/// role. Implements [`Memory`] for the ring protocol.
pub struct Segment {
    map: GuardedMap,
    file: File,
    path: PathBuf,
    role: Role,
    capacity: usize,
    reverse_capacity: usize,
    generation: u64,
}

/// A snapshot of a segment's header, for diagnostics (`inspect`).
#[derive(Clone, Debug)]
pub struct SegmentInfo {
    /// Ring bytes.
    pub capacity: usize,
    /// Reverse area bytes.
    pub reverse_capacity: usize,
    /// Initialisation generation.
    pub generation: u64,
    /// Producer position.
    pub head: u64,
    /// Consumer position.
    pub tail: u64,
    /// Producer pid (0 if none ever attached), epoch, and whether it is alive now.
    pub producer: (u32, u64, bool),
    /// Consumer pid, epoch, alive.
    pub consumer: (u32, u64, bool),
    /// Last BEGIN sequence.
    pub begun_seq: u64,
    /// Last durable sequence.
    pub durable_seq: u64,
    /// Last rejected sequence.
    pub rejected_seq: u64,
}

/// The header fields attach checks, read with `pread` before anything is mapped (so a hostile
/// file costs one 4 KiB read, not a mapping populated to whatever size it claims).
#[derive(Clone, Copy, Debug, Default)]
struct Fields {
    magic: u64,
    version: u32,
    header_size: u32,
    state: u32,
    flags: u32,
    ring_capacity: u64,
    reverse_capacity: u64,
    generation: u64,
    producer_pid: u32,
    consumer_pid: u32,
}

/// Geometry of a segment whose header passed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    capacity: u64,
    reverse_capacity: u64,
    generation: u64,
    size: u64,
}

/// How a segment file is damaged: the states a producer can leave its segment in (truncating or
/// resizing it, zeroing its header) or a re-initialisation that died. A consumer re-initialises
/// such a segment when no producer holds it; nothing in it was acknowledged.
#[derive(Clone, Debug)]
enum Damage {
    Empty,
    Small { size: u64 },
    Zeroed,
    NotReady { state: u32 },
    Geometry(String),
    Size { expected: u64, found: u64 },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Empty => f.write_str("the file is empty"),
            Damage::Small { size } => write!(f, "the file is {size} bytes, smaller than its {HEADER_SIZE}-byte header"),
            Damage::Zeroed => f.write_str("its header is zeroed"),
            Damage::NotReady { state } => write!(f, "its header is not ready (state {state})"),
            Damage::Geometry(what) => write!(f, "invalid header: {what}"),
            Damage::Size { expected, found } => write!(f, "the file is {found} bytes but its header says {expected}"),
        }
    }
}

impl Damage {
    /// The error a producer gets for it (a producer never re-initialises a segment).
    fn into_error(self, path: &Path, waited: Duration) -> SegmentError {
        let path = path.to_path_buf();
        match self {
            Damage::Empty => SegmentError::TooSmall { path, size: 0 },
            Damage::Small { size } => SegmentError::TooSmall { path, size },
            Damage::Zeroed => SegmentError::NotReady { path, state: 0, waited },
            Damage::NotReady { state } => SegmentError::NotReady { path, state, waited },
            Damage::Geometry(what) => SegmentError::BadGeometry { path, what },
            Damage::Size { expected, found } => SegmentError::Truncated { path, expected, found },
        }
    }
}

enum Verdict {
    Valid(Geometry),
    Damaged(Damage),
}

/// Attach attempts that found the file replaced, or repaired it, before giving up.
const ATTACH_ATTEMPTS: usize = 8;

impl Segment {
    /// Creates (if allowed and missing) or attaches to the segment at `path` as `role`.
    ///
    /// In order: the file must be a regular file owned by this user (or group-shared with one of
    /// its groups) with no permission for others; its header is read with `pread` and validated
    /// (magic, version, state, geometry, file size) before anything is mapped; then it is mapped
    /// (populated), locked for `role` and registered. A consumer that finds the segment damaged
    /// (truncated, resized, zeroed, not READY) while no producer holds it re-initialises it
    /// (generation + 1) and logs a warning; a producer gets an error naming the fix.
    pub fn open(path: impl AsRef<Path>, role: Role, opts: &SegmentOptions) -> Result<Segment, SegmentError> {
        let path = path.as_ref();
        check_options(opts)?;
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            if attempts >= ATTACH_ATTEMPTS {
                return Err(io_err("opening segment", path)(io::Error::other(
                    "the file kept being replaced or damaged while attaching",
                )));
            }
            let file = match open_existing(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !opts.create {
                        return Err(SegmentError::NotFound { path: path.into() });
                    }
                    create(path, opts)?;
                    attempts += 1;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                    return Err(SegmentError::PermissionDenied { path: path.into() });
                }
                Err(e) => return Err(io_err("opening segment", path)(e)),
            };
            let meta = file.metadata().map_err(io_err("inspecting segment", path))?;
            if !meta.file_type().is_file() || meta.file_type().is_fifo() {
                return Err(SegmentError::NotRegular { path: path.into() });
            }
            let (size, fields) = read_fields(&file).map_err(io_err("reading segment header", path))?;
            check_owner(path, &meta, (fields.magic == MAGIC).then_some(fields.flags))?;
            let damage = match validate(path, size, &fields, opts)? {
                Verdict::Valid(geo) => {
                    if let Some(seg) = Segment::attach(file, &meta, path, role, opts, geo)? {
                        return Ok(seg);
                    }
                    attempts += 1;
                    continue;
                }
                Verdict::Damaged(d) => d,
            };
            let held =
                |role| sys::byte_locked_by_other(&file, lock_byte(role)).map_err(io_err("locking segment", path));
            let (producer_held, consumer_held) = (held(Role::Producer)?, held(Role::Consumer)?);
            if producer_held && consumer_held && start.elapsed() < opts.ready_timeout {
                // Both role locks held: a reset, which holds both while it re-initialises, may be
                // in progress. Give it the ready timeout.
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            match role {
                Role::Producer => return Err(damage.into_error(path, start.elapsed())),
                Role::Consumer if producer_held => {
                    return Err(SegmentError::DamagedInUse {
                        path: path.into(),
                        what: damage.to_string(),
                        pid: fields.producer_pid,
                    });
                }
                Role::Consumer if consumer_held => {
                    return Err(SegmentError::RoleTaken { path: path.into(), role, pid: fields.consumer_pid });
                }
                Role::Consumer => {
                    repair(&file, path, &meta, opts, &damage)?;
                    attempts += 1;
                }
            }
        }
    }

    /// Attaches as producer and returns the ring's producing half.
    pub fn producer(path: impl AsRef<Path>, opts: &SegmentOptions) -> Result<Producer<Segment>, SegmentError> {
        let seg = Segment::open(path, Role::Producer, opts)?;
        Ok(Producer::new(seg, opts.ring))
    }

    /// Attaches as consumer and returns the ring's consuming half.
    pub fn consumer(path: impl AsRef<Path>, opts: &SegmentOptions) -> Result<Consumer<Segment>, SegmentError> {
        let seg = Segment::open(path, Role::Consumer, opts)?;
        Ok(Consumer::new(seg, opts.ring))
    }

    /// Maps a validated segment, checks the mapping still says what was validated, then locks
    /// `role` and registers. `Ok(None)`: the file changed in between (a reset, or its producer):
    /// look again.
    fn attach(
        file: File,
        meta: &std::fs::Metadata,
        path: &Path,
        role: Role,
        opts: &SegmentOptions,
        geo: Geometry,
    ) -> Result<Option<Segment>, SegmentError> {
        let len = usize::try_from(geo.size).map_err(|_| SegmentError::BadGeometry {
            path: path.into(),
            what: format!("file of {} bytes cannot be mapped", geo.size),
        })?;
        // The length is the validated geometry (at most 1 GiB + 64 MiB + 4 KiB), never the size
        // the file claims.
        let map = GuardedMap::new(&file, len, opts.prefault).map_err(io_err("mapping segment", path))?;
        let seg = Segment {
            map,
            file,
            path: path.into(),
            role,
            capacity: geo.capacity as usize,
            reverse_capacity: geo.reverse_capacity as usize,
            generation: geo.generation,
        };
        let id = &seg.header().ident;
        // Acquire: pairs with the creator's Release of READY; every field read after it is the
        // initialised one. A file truncated since the pread reads zeros here (the guard).
        let unchanged = id.state.load(Ordering::Acquire) == STATE_READY
            && id.magic.load(Ordering::Relaxed) == MAGIC
            && id.ring_capacity.load(Ordering::Relaxed) == geo.capacity
            && id.reverse_capacity.load(Ordering::Relaxed) == geo.reverse_capacity
            && id.generation.load(Ordering::Relaxed) == geo.generation
            && seg.file.metadata().is_ok_and(|m| m.len() == geo.size)
            && !seg.map.truncated();
        if !unchanged {
            return Ok(None);
        }
        // Lock and register at once, after the slow part (mapping): a peer that sees the lock held
        // must also see the new epoch (a slow attach between the two made a producer record the
        // old epoch and later take the new one for "consumer replaced").
        if !sys::try_lock_byte(&seg.file, lock_byte(role)).map_err(io_err("locking segment", path))? {
            let pid = seg.peer_record(role).pid.load(Ordering::Relaxed);
            return Err(SegmentError::RoleTaken { path: path.into(), role, pid });
        }
        seg.register();
        // Still the file at `path`, and still the generation we validated? (A reset may have
        // re-initialised or replaced it before we locked; it cannot while we hold the lock.)
        let same_file =
            matches!(std::fs::metadata(path), Ok(now) if now.ino() == meta.ino() && now.dev() == meta.dev());
        if !same_file || !seg.same_generation() {
            return Ok(None);
        }
        if !sys::is_memory_fs(path.parent().unwrap_or(Path::new("/"))) {
            tracing::warn!(
                path = %path.display(),
                "segment is not on tmpfs: the ring will be backed by disk pages; use /dev/shm"
            );
        }
        Ok(Some(seg))
    }

    fn register(&self) {
        let peer = self.peer_record(self.role);
        let pid = std::process::id();
        // The epoch first: it is what a peer compares to notice a replacement.
        peer.epoch.fetch_add(1, Ordering::AcqRel);
        peer.pid.store(pid, Ordering::Relaxed);
        peer.start_ticks.store(sys::process_start_ticks(pid).unwrap_or(0), Ordering::Relaxed);
        // Wake a sleeper on the other side: it may be waiting for us to appear.
        let other = self.peer_record(self.role.peer());
        other.wake.fetch_add(2, Ordering::AcqRel);
        sys::futex_wake(&other.wake);
    }

    fn peer_record(&self, role: Role) -> &crate::layout::Peer {
        let sh = &self.header().ring;
        match role {
            Role::Producer => &sh.producer,
            Role::Consumer => &sh.consumer,
        }
    }

    fn header(&self) -> &Header {
        // SAFETY: the mapping is at least HEADER_SIZE bytes (the validated geometry it was made
        // with), page aligned (so aligned for `Header`), and lives as long as `self`. Every
        // field of `Header` is an integer atomic, so any bytes are a valid value, and all shared
        // accesses go through atomic operations.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn ring_ptr(&self) -> *mut u8 {
        // SAFETY: HEADER_SIZE < mapping length (the validated geometry), so the offset is in bounds.
        unsafe { self.map.as_mut_ptr().add(HEADER_SIZE as usize) }
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Initialisation generation seen at attach.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the header's generation still matches the one seen at attach.
    pub fn same_generation(&self) -> bool {
        self.header().ident.generation.load(Ordering::Acquire) == self.generation
    }

    /// Whether this side found the file truncated under its mapping (the SIGBUS guard replaced
    /// the mapping with zero pages). Every ring operation then fails with
    /// [`crate::RingError::SegmentDamaged`]; drop the segment and attach again.
    pub fn truncated(&self) -> bool {
        self.map.truncated()
    }

    /// Reverse-area bytes.
    pub fn reverse_capacity(&self) -> usize {
        self.reverse_capacity
    }

    /// A snapshot of the header for diagnostics.
    pub fn info(&self) -> SegmentInfo {
        let h = self.header();
        let sh = &h.ring;
        let side = |p: &crate::layout::Peer, role: Role| {
            (p.pid.load(Ordering::Relaxed), p.epoch.load(Ordering::Relaxed), role == self.role || self.peer_alive(role))
        };
        SegmentInfo {
            capacity: self.capacity,
            reverse_capacity: self.reverse_capacity,
            generation: h.ident.generation.load(Ordering::Relaxed),
            head: sh.head.load(Ordering::Acquire),
            tail: sh.tail.load(Ordering::Acquire),
            producer: side(&sh.producer, Role::Producer),
            consumer: side(&sh.consumer, Role::Consumer),
            begun_seq: sh.batch.begun_seq.load(Ordering::Relaxed),
            durable_seq: sh.reverse.durable_seq.load(Ordering::Relaxed),
            rejected_seq: sh.reverse.rejected_seq.load(Ordering::Relaxed),
        }
    }

    /// Re-initialises the segment at `path` in place with `opts`' geometry: a fresh ring, the
    /// generation bumped. Refused while either side is attached. Frames in the ring are dropped
    /// (any batch in it was not acknowledged, so its producer still owns the data).
    pub fn reset(path: impl AsRef<Path>, opts: &SegmentOptions) -> Result<u64, SegmentError> {
        let path = path.as_ref();
        check_options(opts)?;
        let file = match open_existing(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(SegmentError::NotFound { path: path.into() }),
            Err(e) => return Err(io_err("opening segment", path)(e)),
        };
        let meta = file.metadata().map_err(io_err("inspecting segment", path))?;
        let (_, fields) = read_fields(&file).map_err(io_err("reading segment header", path))?;
        check_owner(path, &meta, (fields.magic == MAGIC).then_some(fields.flags))?;
        if let Some(role) = take_both_role_locks(&file, path)? {
            let pid = match role {
                Role::Producer => fields.producer_pid,
                Role::Consumer => fields.consumer_pid,
            };
            return Err(SegmentError::InUse { path: path.into(), role, pid });
        }
        let old_generation = if fields.magic == MAGIC { fields.generation } else { 0 };
        let capacity = opts.capacity.unwrap_or(DEFAULT_CAPACITY);
        reinit(&file, path, capacity, opts.reverse_capacity, opts.group_shared, old_generation + 1)?;
        Ok(old_generation + 1)
    }
}

fn check_options(opts: &SegmentOptions) -> Result<(), SegmentError> {
    if let Some(c) = opts.capacity
        && (!c.is_power_of_two() || !(MIN_CAPACITY..=MAX_CAPACITY).contains(&c))
    {
        return Err(SegmentError::InvalidOptions(format!(
            "ring size {c} must be a power of two between {MIN_CAPACITY} and {MAX_CAPACITY} bytes"
        )));
    }
    if opts.reverse_capacity > MAX_REVERSE_CAPACITY || !opts.reverse_capacity.is_multiple_of(8) {
        return Err(SegmentError::InvalidOptions(format!(
            "reverse area {} must be a multiple of 8 up to {MAX_REVERSE_CAPACITY} bytes",
            opts.reverse_capacity
        )));
    }
    Ok(())
}

fn open_existing(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path)
}

/// Byte offset of a header field, from the layout's own definition.
macro_rules! at {
    (ident . $f:ident) => {
        std::mem::offset_of!(Header, ident) + std::mem::offset_of!(crate::layout::Ident, $f)
    };
    (ring . $side:ident . $f:ident) => {
        std::mem::offset_of!(Header, ring)
            + std::mem::offset_of!(RingShared, $side)
            + std::mem::offset_of!(crate::layout::Peer, $f)
    };
}

/// The file's size and its header fields, read with `pread` (no mapping). A file shorter than
/// the header reads as zeros past its end.
fn read_fields(file: &File) -> io::Result<(u64, Fields)> {
    let size = file.metadata()?.len();
    let mut buf = [0u8; HEADER_SIZE as usize];
    let want = size.min(HEADER_SIZE) as usize;
    let mut got = 0;
    while got < want {
        match file.read_at(&mut buf[got..want], got as u64) {
            // Shrunk since the stat: the rest reads as zeros, which validation reports.
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let u64_at = |off: usize| u64::from_le_bytes(buf[off..off + 8].try_into().expect("8 bytes"));
    let u32_at = |off: usize| u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"));
    Ok((
        size,
        Fields {
            magic: u64_at(at!(ident.magic)),
            version: u32_at(at!(ident.version)),
            header_size: u32_at(at!(ident.header_size)),
            state: u32_at(at!(ident.state)),
            flags: u32_at(at!(ident.flags)),
            ring_capacity: u64_at(at!(ident.ring_capacity)),
            reverse_capacity: u64_at(at!(ident.reverse_capacity)),
            generation: u64_at(at!(ident.generation)),
            producer_pid: u32_at(at!(ring.producer.pid)),
            consumer_pid: u32_at(at!(ring.consumer.pid)),
        },
    ))
}

/// Validates a header read with [`read_fields`] against the file size. `Err`: not a segment this
/// build can use (another file, another version, another ring size asked for); `Damaged`: one of
/// ours that its producer (or a dead re-initialisation) left unusable.
fn validate(path: &Path, size: u64, h: &Fields, opts: &SegmentOptions) -> Result<Verdict, SegmentError> {
    if size == 0 {
        return Ok(Verdict::Damaged(Damage::Empty));
    }
    if h.magic == 0 {
        return Ok(Verdict::Damaged(Damage::Zeroed));
    }
    if h.magic != MAGIC {
        return Err(SegmentError::BadMagic { path: path.into(), found: h.magic });
    }
    if size < HEADER_SIZE {
        return Ok(Verdict::Damaged(Damage::Small { size }));
    }
    if h.version != LAYOUT_VERSION {
        return Err(SegmentError::Version { path: path.into(), found: h.version, expected: LAYOUT_VERSION });
    }
    if h.state != STATE_READY {
        return Ok(Verdict::Damaged(Damage::NotReady { state: h.state }));
    }
    let bad = |what: String| Ok(Verdict::Damaged(Damage::Geometry(what)));
    if h.header_size as u64 != HEADER_SIZE {
        return bad(format!("header size {}, expected {HEADER_SIZE}", h.header_size));
    }
    let cap = h.ring_capacity;
    if !cap.is_power_of_two() || cap < MIN_CAPACITY as u64 || cap > MAX_CAPACITY as u64 {
        return bad(format!("ring capacity {cap} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}"));
    }
    let rev = h.reverse_capacity;
    if rev > MAX_REVERSE_CAPACITY as u64 || !rev.is_multiple_of(8) {
        return bad(format!("reverse capacity {rev} is not a multiple of 8 up to {MAX_REVERSE_CAPACITY}"));
    }
    let expected = HEADER_SIZE + cap + rev;
    if size != expected {
        return Ok(Verdict::Damaged(Damage::Size { expected, found: size }));
    }
    if let Some(wanted) = opts.capacity
        && wanted as u64 != cap
    {
        return Err(SegmentError::CapacityMismatch { path: path.into(), found: cap as usize, wanted });
    }
    Ok(Verdict::Valid(Geometry { capacity: cap, reverse_capacity: rev, generation: h.generation, size }))
}

/// Owner and mode: /dev/shm is world-writable (1777), so anyone can pre-create the path. The file
/// must give "other" users nothing, and be ours, or be group-shared on purpose: the header says
/// so (`group_flags`, `None` when the header is unreadable), the mode has group read and write,
/// and the file's group is one of ours.
fn check_owner(path: &Path, meta: &std::fs::Metadata, group_flags: Option<u32>) -> Result<(), SegmentError> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(SegmentError::InsecureMode { path: path.into(), mode, uid: meta.uid() });
    }
    let euid = sys::effective_uid();
    if meta.uid() == euid {
        return Ok(());
    }
    let group_shared =
        group_flags.is_some_and(|f| f & FLAG_GROUP_SHARED != 0) && mode & 0o060 == 0o060 && sys::in_group(meta.gid());
    if group_shared {
        return Ok(());
    }
    Err(SegmentError::ForeignOwner { path: path.into(), uid: meta.uid(), gid: meta.gid(), mode, euid })
}

/// Takes both role locks (what a reset and a repair need: nobody attached while the segment is
/// re-initialised); returns the first role another process holds, if one does.
fn take_both_role_locks(file: &File, path: &Path) -> Result<Option<Role>, SegmentError> {
    for role in [Role::Producer, Role::Consumer] {
        if !sys::try_lock_byte(file, lock_byte(role)).map_err(io_err("locking segment", path))? {
            return Ok(Some(role));
        }
    }
    Ok(None)
}

/// A consumer's repair of a damaged segment no producer holds: under both role locks, look again
/// (someone may have repaired it meanwhile), then re-initialise it in place, generation + 1.
/// Nothing in a damaged ring was acknowledged, so nothing is lost: its producer resends.
fn repair(
    file: &File,
    path: &Path,
    meta: &std::fs::Metadata,
    opts: &SegmentOptions,
    damage: &Damage,
) -> Result<(), SegmentError> {
    if let Some(role) = take_both_role_locks(file, path)? {
        let (_, fields) = read_fields(file).unwrap_or_default();
        return Err(match role {
            Role::Producer => {
                SegmentError::DamagedInUse { path: path.into(), what: damage.to_string(), pid: fields.producer_pid }
            }
            Role::Consumer => SegmentError::RoleTaken { path: path.into(), role, pid: fields.consumer_pid },
        });
    }
    let (size, fields) = read_fields(file).map_err(io_err("reading segment header", path))?;
    let damage = match validate(path, size, &fields, opts) {
        Ok(Verdict::Damaged(d)) => d,
        // Repaired or replaced meanwhile: the caller looks again.
        _ => return Ok(()),
    };
    let known = fields.magic == MAGIC;
    let old_generation = if known { fields.generation } else { 0 };
    let header_capacity = usize::try_from(fields.ring_capacity)
        .ok()
        .filter(|c| known && c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(c));
    let capacity = opts.capacity.or(header_capacity).unwrap_or(DEFAULT_CAPACITY);
    // The file keeps its inode, owner and mode; the header's flag follows the mode.
    let group_shared = opts.group_shared || meta.mode() & 0o060 == 0o060;
    tracing::warn!(
        path = %path.display(),
        found = %damage,
        generation = old_generation + 1,
        "segment damaged (truncated or overwritten by its producer?), no producer attached: re-initialising it; \
         nothing in it was acknowledged, the producer resends its batch"
    );
    reinit(file, path, capacity, opts.reverse_capacity, group_shared, old_generation + 1)
}

/// Re-initialises the segment in `file` in place (the caller holds both role locks): marks it
/// INITIALISING, truncates it, reallocates every byte, writes a fresh header with `generation`.
fn reinit(
    file: &File,
    path: &Path,
    capacity: usize,
    reverse_capacity: usize,
    group_shared: bool,
    generation: u64,
) -> Result<(), SegmentError> {
    if file.metadata().map_err(io_err("inspecting segment", path))?.len() >= HEADER_SIZE {
        let map = GuardedMap::new(file, HEADER_SIZE as usize, false).map_err(io_err("mapping segment", path))?;
        // SAFETY: the file has at least HEADER_SIZE bytes and that many are mapped (a file
        // truncated meanwhile reads zero pages, the guard); every Header field is an integer atomic.
        let h = unsafe { &*(map.as_ptr() as *const Header) };
        // An attacher that read the old header sees this before the truncation and waits.
        h.ident.state.store(STATE_INITIALISING, Ordering::Release);
    }
    let size = HEADER_SIZE + capacity as u64 + reverse_capacity as u64;
    file.set_len(0).map_err(io_err("truncating segment", path))?;
    allocate(file, path, size)?;
    init_header(file, path, capacity, reverse_capacity, group_shared, generation)
}

fn mode(opts: &SegmentOptions) -> u32 {
    if opts.group_shared { 0o660 } else { 0o600 }
}

/// Creates and initialises a segment unnamed, then links it at `path` unless someone else did.
fn create(path: &Path, opts: &SegmentOptions) -> Result<(), SegmentError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let capacity = opts.capacity.unwrap_or(DEFAULT_CAPACITY);
    let size = HEADER_SIZE + capacity as u64 + opts.reverse_capacity as u64;
    let tmpfile = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .mode(mode(opts))
        .open(dir);
    let (file, named) = match tmpfile {
        Ok(f) => (f, None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL)) => {
            let name = format!(
                ".{}.{}.init",
                path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                std::process::id()
            );
            let tmp = dir.join(name);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_CLOEXEC)
                .mode(mode(opts))
                .open(&tmp)
                .map_err(io_err("creating segment", &tmp))?;
            (f, Some(tmp))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(io_err("creating segment in", dir)(io::Error::other(
                "directory does not exist (is /dev/shm mounted?)",
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(SegmentError::PermissionDenied { path: path.into() });
        }
        Err(e) => return Err(io_err("creating segment in", dir)(e)),
    };
    let cleanup = |named: &Option<PathBuf>| {
        if let Some(t) = named {
            let _ = std::fs::remove_file(t);
        }
    };
    let init = (|| {
        // umask may have narrowed the mode; the mode is a decision, not a suggestion.
        file.set_permissions(std::fs::Permissions::from_mode(mode(opts)))
            .map_err(io_err("setting segment mode", path))?;
        allocate(&file, path, size)?;
        init_header(&file, path, capacity, opts.reverse_capacity, opts.group_shared, 1)
    })();
    if let Err(e) = init {
        cleanup(&named);
        return Err(e);
    }
    let linked = match &named {
        None => {
            let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file));
            nix::unistd::linkat(
                nix::fcntl::AT_FDCWD,
                fd_path.as_str(),
                nix::fcntl::AT_FDCWD,
                path,
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            )
            .map_err(io::Error::from)
        }
        Some(tmp) => std::fs::hard_link(tmp, path),
    };
    cleanup(&named);
    match linked {
        Ok(()) => Ok(()),
        // The other side created it first: attach to theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("publishing segment at", path)(e)),
    }
}

/// Reserves every byte of the segment now, so a full /dev/shm is an error here and not a SIGBUS
/// on first write later.
fn allocate(file: &File, path: &Path, size: u64) -> Result<(), SegmentError> {
    match nix::fcntl::posix_fallocate(file, 0, size as libc::off_t) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::ENOSPC) => {
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            let avail = nix::sys::statvfs::statvfs(&dir).map(|s| s.blocks_available() * s.fragment_size()).unwrap_or(0);
            Err(SegmentError::NoSpace { dir, need: size, avail })
        }
        Err(e) => Err(io_err("allocating segment", path)(e.into())),
    }
}

fn init_header(
    file: &File,
    path: &Path,
    capacity: usize,
    reverse_capacity: usize,
    group_shared: bool,
    generation: u64,
) -> Result<(), SegmentError> {
    let map = GuardedMap::new(file, HEADER_SIZE as usize, false).map_err(io_err("mapping segment", path))?;
    // SAFETY: the file was just allocated with at least HEADER_SIZE bytes and HEADER_SIZE bytes
    // are mapped; the mapping is page aligned and outlives `h`; every Header field is an integer
    // atomic. (A file truncated meanwhile reads and writes zero pages: the guard, checked below.)
    let h = unsafe { &*(map.as_ptr() as *const Header) };
    let id = &h.ident;
    id.state.store(STATE_INITIALISING, Ordering::Release);
    zero_ring_shared(&h.ring);
    id.magic.store(MAGIC, Ordering::Relaxed);
    id.version.store(LAYOUT_VERSION, Ordering::Relaxed);
    id.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
    id.flags.store(if group_shared { FLAG_GROUP_SHARED } else { 0 }, Ordering::Relaxed);
    id.ring_capacity.store(capacity as u64, Ordering::Relaxed);
    id.reverse_capacity.store(reverse_capacity as u64, Ordering::Relaxed);
    id.generation.store(generation, Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    id.created_unix_ns.store(now, Ordering::Relaxed);
    // Release: every field above is visible to whoever acquires READY.
    id.state.store(STATE_READY, Ordering::Release);
    if map.truncated() {
        return Err(io_err("initialising segment", path)(io::Error::other(
            "the file was truncated by another process while it was being initialised",
        )));
    }
    Ok(())
}

fn zero_ring_shared(sh: &RingShared) {
    let z64 = |a: &crate::sync::AtomicU64| a.store(0, Ordering::Relaxed);
    let z32 = |a: &AtomicU32| a.store(0, Ordering::Relaxed);
    z64(&sh.head);
    z64(&sh.tail);
    for p in [&sh.producer, &sh.consumer] {
        z32(&p.wake);
        z32(&p.pid);
        z64(&p.start_ticks);
        z64(&p.epoch);
    }
    z64(&sh.reverse.durable_seq);
    sh.reverse.durable_id.iter().for_each(z64);
    z64(&sh.reverse.rejected_seq);
    z32(&sh.reverse.rejected_code);
    z64(&sh.batch.begun_seq);
    z64(&sh.batch.want_seq);
    z64(&sh.batch.want_len);
    z32(&sh.batch.consumer_codec);
    z64(&sh.batch.codec_epoch);
}

/// Ring bytes in the mapping.
pub struct SegRead<'a>(&'a [u8]);
impl std::ops::Deref for SegRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0
    }
}

// SAFETY: `shared()` points into the mapping, which lives as long as `self`; the ring region is
// `capacity` bytes after the header (validated in `map`: file size == header + capacity +
// reverse); `futex_wait` returns within its timeout.
unsafe impl Memory for Segment {
    type Read<'a> = SegRead<'a>;
    type Write<'a> = &'a mut [u8];

    fn shared(&self) -> &RingShared {
        &self.header().ring
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    unsafe fn write(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(off + len <= self.capacity);
        // SAFETY: the caller guarantees the range is inside the ring and owned exclusively by
        // this side per the protocol; the mapping is writable shared memory that outlives `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ring_ptr().add(off), len) }
    }

    unsafe fn read(&self, off: usize, len: usize) -> SegRead<'_> {
        debug_assert!(off + len <= self.capacity);
        // SAFETY: the caller guarantees the range is inside the ring and published, not released.
        SegRead(unsafe { std::slice::from_raw_parts(self.ring_ptr().add(off), len) })
    }

    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        sys::futex_wait(word, expected, timeout);
    }

    fn wake(&self, word: &AtomicU32) {
        sys::futex_wake(word);
    }

    fn peer_alive(&self, role: Role) -> bool {
        // An error here (it should not happen) counts as alive: never report a live peer dead.
        sys::byte_locked_by_other(&self.file, lock_byte(role)).unwrap_or(true)
    }

    fn truncated(&self) -> Option<String> {
        self.map.truncated().then(|| self.path.display().to_string())
    }

    fn reverse(&self) -> &[crate::sync::AtomicU64] {
        // SAFETY: the reverse area starts right after the ring, at HEADER_SIZE + capacity: 8-byte
        // aligned (the mapping is page aligned, both terms are multiples of 4096), and its
        // `reverse_capacity` bytes (a multiple of 8) end exactly at the end of the mapping (the
        // validated file size), which lives as long as `self`. Any bytes are a valid AtomicU64,
        // and every access to the area goes through atomic operations.
        unsafe {
            std::slice::from_raw_parts(
                self.ring_ptr().add(self.capacity) as *const crate::sync::AtomicU64,
                self.reverse_capacity / 8,
            )
        }
    }
}
