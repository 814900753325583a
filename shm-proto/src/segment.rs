//! The segment: one file under /dev/shm holding the header, the ring and the reverse area.
//!
//! Creation is atomic: the creator builds and initialises the file unnamed (`O_TMPFILE`, or a
//! private temporary name where that is unsupported), publishes READY, and only then links it at
//! the agreed path; if the other side linked first, the creator drops its copy and attaches. So no
//! one can open a half-initialised segment. Attach validates everything before trusting it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use memmap2::{MmapOptions, MmapRaw};

use crate::layout::{
    FLAG_GROUP_SHARED, HEADER_SIZE, Header, LAYOUT_VERSION, MAGIC, RingShared, STATE_INITIALISING, STATE_READY,
};
use crate::ring::{Consumer, Memory, Producer, RingConfig, Role};
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
    /// Smaller than a header.
    #[error("{path} is {size} bytes, smaller than a segment header ({HEADER_SIZE}): not a shmback segment; remove it")]
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
    /// File shorter than the header says.
    #[error(
        "segment {path} is {found} bytes but its header says {expected}: truncated; remove it while both sides are stopped"
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
    /// Header never became READY.
    #[error(
        "segment {path} was not ready after {waited:?} (state {state}): its creator died while initialising \
         it, or a reset is in progress; remove it while both sides are stopped"
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
    map: MmapRaw,
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

impl Segment {
    /// Creates (if allowed and missing) or attaches to the segment at `path` as `role`.
    pub fn open(path: impl AsRef<Path>, role: Role, opts: &SegmentOptions) -> Result<Segment, SegmentError> {
        let path = path.as_ref();
        check_options(opts)?;
        // A reset or a racing creator can replace the file between open and lock: retry a few times.
        for _ in 0..8 {
            let file = match open_existing(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !opts.create {
                        return Err(SegmentError::NotFound { path: path.into() });
                    }
                    create(path, opts)?;
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
            // Map and validate first, then lock and register at once: a peer that sees the lock
            // held must also see the new epoch (a slow attach between the two made a producer
            // record the old epoch and later take the new one for "consumer replaced").
            let seg = Segment::map(file, path, role, opts)?;
            if !sys::try_lock_byte(&seg.file, lock_byte(role)).map_err(io_err("locking segment", path))? {
                let pid = seg.peer_record(role).pid.load(Ordering::Relaxed);
                return Err(SegmentError::RoleTaken { path: path.into(), role, pid });
            }
            seg.register();
            // Still the file at `path`, and still the geometry we validated? (A reset may have
            // re-initialised or replaced it before we locked; it cannot while we hold the lock.)
            let same_file =
                matches!(std::fs::metadata(path), Ok(now) if now.ino() == meta.ino() && now.dev() == meta.dev());
            if !same_file || !seg.same_generation() {
                continue;
            }
            if !sys::is_memory_fs(path.parent().unwrap_or(Path::new("/"))) {
                tracing::warn!(
                    path = %path.display(),
                    "segment is not on tmpfs: the ring will be backed by disk pages; use /dev/shm"
                );
            }
            return Ok(seg);
        }
        Err(io_err("opening segment", path)(io::Error::other("the file kept being replaced while attaching")))
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

    fn map(file: File, path: &Path, role: Role, opts: &SegmentOptions) -> Result<Segment, SegmentError> {
        let size = file.metadata().map_err(io_err("inspecting segment", path))?.len();
        if size < HEADER_SIZE {
            return Err(SegmentError::TooSmall { path: path.into(), size });
        }
        let len = usize::try_from(size).map_err(|_| SegmentError::BadGeometry {
            path: path.into(),
            what: format!("file of {size} bytes cannot be mapped"),
        })?;
        let mut mo = MmapOptions::new();
        mo.len(len);
        if opts.prefault {
            mo.populate();
        }
        let map = mo.map_raw(&file).map_err(io_err("mapping segment", path))?;
        let mut seg = Segment { map, file, path: path.into(), role, capacity: 0, reverse_capacity: 0, generation: 0 };
        let id = &seg.header().ident;
        let start = Instant::now();
        loop {
            let state = id.state.load(Ordering::Acquire);
            if state == STATE_READY {
                break;
            }
            if start.elapsed() >= opts.ready_timeout {
                return Err(SegmentError::NotReady { path: path.into(), state, waited: start.elapsed() });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let magic = id.magic.load(Ordering::Relaxed);
        if magic != MAGIC {
            return Err(SegmentError::BadMagic { path: path.into(), found: magic });
        }
        let version = id.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(SegmentError::Version { path: path.into(), found: version, expected: LAYOUT_VERSION });
        }
        let bad = |what: String| SegmentError::BadGeometry { path: path.into(), what };
        let header_size = id.header_size.load(Ordering::Relaxed);
        if header_size as u64 != HEADER_SIZE {
            return Err(bad(format!("header size {header_size}, expected {HEADER_SIZE}")));
        }
        let cap = id.ring_capacity.load(Ordering::Relaxed);
        if !cap.is_power_of_two() || cap < MIN_CAPACITY as u64 || cap > MAX_CAPACITY as u64 {
            return Err(bad(format!("ring capacity {cap} is not a power of two in {MIN_CAPACITY}..={MAX_CAPACITY}")));
        }
        let rev = id.reverse_capacity.load(Ordering::Relaxed);
        if rev > MAX_REVERSE_CAPACITY as u64 || !rev.is_multiple_of(8) {
            return Err(bad(format!("reverse capacity {rev} is not a multiple of 8 up to {MAX_REVERSE_CAPACITY}")));
        }
        let expected = HEADER_SIZE + cap + rev;
        if size < expected {
            return Err(SegmentError::Truncated { path: path.into(), expected, found: size });
        }
        if size > expected {
            return Err(bad(format!("file is {size} bytes, header says {expected}")));
        }
        if let Some(wanted) = opts.capacity
            && wanted as u64 != cap
        {
            return Err(SegmentError::CapacityMismatch { path: path.into(), found: cap as usize, wanted });
        }
        let generation = id.generation.load(Ordering::Relaxed);
        seg.capacity = cap as usize;
        seg.reverse_capacity = rev as usize;
        seg.generation = generation;
        Ok(seg)
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
        // SAFETY: the mapping is at least HEADER_SIZE bytes (checked in `map` before this is
        // called), page aligned (so aligned for `Header`), and lives as long as `self`. Every
        // field of `Header` is an integer atomic, so any bytes are a valid value, and all shared
        // accesses go through atomic operations.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    fn ring_ptr(&self) -> *mut u8 {
        // SAFETY: HEADER_SIZE < mapping length (checked in `map`), so the offset is in bounds.
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
        for role in [Role::Producer, Role::Consumer] {
            if !sys::try_lock_byte(&file, lock_byte(role)).map_err(io_err("locking segment", path))? {
                return Err(SegmentError::InUse { path: path.into(), role, pid: peek_pid(&file, role) });
            }
        }
        let old_generation = peek_generation(&file).unwrap_or(0);
        let capacity = opts.capacity.unwrap_or(DEFAULT_CAPACITY);
        let size = HEADER_SIZE + capacity as u64 + opts.reverse_capacity as u64;
        {
            let map = MmapOptions::new().len(HEADER_SIZE as usize).map_raw(&file);
            if let Ok(map) = map {
                // SAFETY: the first HEADER_SIZE bytes are mapped (the file has at least that many,
                // or mapping failed); every Header field is an integer atomic.
                let h = unsafe { &*(map.as_ptr() as *const Header) };
                h.ident.state.store(STATE_INITIALISING, Ordering::Release);
            }
        }
        file.set_len(0).map_err(io_err("truncating segment", path))?;
        allocate(&file, path, size)?;
        init_header(&file, path, capacity, opts, old_generation + 1)?;
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

/// Pid recorded for `role`, read through a temporary header mapping (0 if unreadable).
fn peek_pid(file: &File, role: Role) -> u32 {
    with_header(file, |h| match role {
        Role::Producer => h.ring.producer.pid.load(Ordering::Relaxed),
        Role::Consumer => h.ring.consumer.pid.load(Ordering::Relaxed),
    })
    .unwrap_or(0)
}

fn peek_generation(file: &File) -> Option<u64> {
    with_header(file, |h| {
        (h.ident.magic.load(Ordering::Relaxed) == MAGIC).then(|| h.ident.generation.load(Ordering::Relaxed))
    })
    .flatten()
}

fn with_header<T>(file: &File, f: impl FnOnce(&Header) -> T) -> Option<T> {
    if file.metadata().ok()?.len() < HEADER_SIZE {
        return None;
    }
    let map = MmapOptions::new().len(HEADER_SIZE as usize).map_raw_read_only(file).ok()?;
    // SAFETY: HEADER_SIZE bytes are mapped (file size checked above); every Header field is an
    // integer atomic, so any content is valid; the mapping outlives `f`.
    Some(f(unsafe { &*(map.as_ptr() as *const Header) }))
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
        init_header(&file, path, capacity, opts, 1)
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
    opts: &SegmentOptions,
    generation: u64,
) -> Result<(), SegmentError> {
    let map = MmapOptions::new().len(HEADER_SIZE as usize).map_raw(file).map_err(io_err("mapping segment", path))?;
    // SAFETY: the file was just allocated with at least HEADER_SIZE bytes; the mapping is page
    // aligned and outlives `h`; every Header field is an integer atomic.
    let h = unsafe { &*(map.as_ptr() as *const Header) };
    let id = &h.ident;
    id.state.store(STATE_INITIALISING, Ordering::Release);
    zero_ring_shared(&h.ring);
    id.magic.store(MAGIC, Ordering::Relaxed);
    id.version.store(LAYOUT_VERSION, Ordering::Relaxed);
    id.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
    id.flags.store(if opts.group_shared { FLAG_GROUP_SHARED } else { 0 }, Ordering::Relaxed);
    id.ring_capacity.store(capacity as u64, Ordering::Relaxed);
    id.reverse_capacity.store(opts.reverse_capacity as u64, Ordering::Relaxed);
    id.generation.store(generation, Ordering::Relaxed);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    id.created_unix_ns.store(now, Ordering::Relaxed);
    // Release: every field above is visible to whoever acquires READY.
    id.state.store(STATE_READY, Ordering::Release);
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
    z32(&sh.batch.want_state);
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
}
