//! The process-wide SIGBUS guard over segment mappings (see [`crate::fault`] for the table and
//! why the technique is sound).
//!
//! Installed once, at the first segment mapping of the process. A SIGBUS whose faulting address
//! lies in a registered mapping replaces that mapping with anonymous zero pages (`MAP_FIXED`),
//! flags it truncated and returns, so the faulting access retries and reads zeros; the ring
//! operations then report [`crate::RingError::SegmentDamaged`]. Any other SIGBUS goes to the
//! handler that was installed before ours (Rust's own stack-overflow handler, or the default
//! action, which kills the process as it would have without us).

use std::fs::File;
use std::io;
use std::sync::OnceLock;

use memmap2::{MmapOptions, MmapRaw};

use crate::fault::{FaultTable, SLOTS};

static TABLE: FaultTable<SLOTS> = FaultTable::new();
/// The SIGBUS disposition found when ours was installed; faults outside our mappings go there.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// A shared, writable mapping of a segment file, registered with the SIGBUS guard for its whole
/// life. Dropping it unregisters it first (waiting out a handler in progress), then unmaps it.
pub(crate) struct GuardedMap {
    map: MmapRaw,
    slot: usize,
}

impl GuardedMap {
    /// Maps the first `len` bytes of `file` (populated if `populate`) and registers the mapping.
    pub(crate) fn new(file: &File, len: usize, populate: bool) -> io::Result<GuardedMap> {
        install()?;
        let mut mo = MmapOptions::new();
        mo.len(len);
        if populate {
            mo.populate();
        }
        let map = mo.map_raw(file)?;
        let slot = TABLE.register(map.as_ptr() as usize, map.len()).ok_or_else(|| {
            io::Error::other(format!(
                "more than {SLOTS} segment mappings are open in this process; close some segments"
            ))
        })?;
        Ok(GuardedMap { map, slot })
    }

    /// Start of the mapping.
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }

    /// Start of the mapping, writable.
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether an access found the file truncated and the mapping now holds zero pages.
    pub(crate) fn truncated(&self) -> bool {
        TABLE.truncated(self.slot)
    }
}

impl Drop for GuardedMap {
    fn drop(&mut self) {
        // Before `map` is dropped (unmapped): no handler may remap the range once it is reused.
        TABLE.unregister(self.slot);
    }
}

/// Installs the handler once per process; later calls return the first outcome.
fn install() -> io::Result<()> {
    static OUTCOME: OnceLock<Result<(), i32>> = OnceLock::new();
    OUTCOME.get_or_init(install_once).map_err(io::Error::from_raw_os_error)
}

fn install_once() -> Result<(), i32> {
    let mut old = zeroed_sigaction();
    // SAFETY: a null new action only queries the current one into `old`, a valid sigaction.
    if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
        return Err(last_errno());
    }
    // Recorded before ours is installed, so the handler always finds it.
    let _ = PREVIOUS.set(old);
    let mut sa = zeroed_sigaction();
    sa.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    // SA_ONSTACK: a fault on a thread whose stack is nearly exhausted still gets a stack.
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: `sa.sa_mask` is a valid sigset_t to initialise; `sa` is a complete sigaction whose
    // handler has the SA_SIGINFO signature.
    let rc = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
    };
    if rc != 0 { Err(last_errno()) } else { Ok(()) }
}

fn zeroed_sigaction() -> libc::sigaction {
    // SAFETY: sigaction is a plain C struct; all-zero is a valid (empty, SIG_DFL) value.
    unsafe { std::mem::zeroed() }
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL)
}

/// The signal handler. Async-signal-safe: atomics, `mmap` and `sigaction` system calls only.
extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; its location is valid for the life of the thread. Saved and
    // restored so the interrupted code never sees our system calls' errno.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: installed with SA_SIGINFO, so the kernel passes a valid siginfo_t; for SIGBUS
    // `si_addr` is the faulting address.
    let addr = unsafe { (*info).si_addr() } as usize;
    if !TABLE.on_fault(addr, zero_fill) {
        chain(sig, info, ctx);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Replaces `[start, start + len)` with private anonymous zero pages.
fn zero_fill(start: usize, len: usize) -> bool {
    // SAFETY: the range is a mapping this crate made and registered, and it is still mapped: the
    // table's unregister waits for this handler before the owner unmaps it. MAP_FIXED replaces
    // exactly those pages, with the same protection, so every pointer into the range stays valid
    // (reading zeros from now on). mmap is a plain system call on Linux (Weston's and wlroots'
    // SIGBUS handlers rely on the same).
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

/// Hands a fault outside our mappings to the previous disposition.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let prev = PREVIOUS.get();
    let handler = prev.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: valid siginfo_t (see `on_sigbus`). si_code <= 0: sent by kill/raise/sigqueue,
        // not raised by a faulting access.
        let sent = unsafe { (*info).si_code } <= 0;
        if handler == libc::SIG_IGN && sent {
            return;
        }
        // A fault cannot be ignored (returning would re-fault forever): the default action,
        // death by SIGBUS, as without us.
        let dfl = zeroed_sigaction();
        // SAFETY: `dfl` is a valid sigaction (SIG_DFL). raise() leaves the signal pending until
        // this handler returns (SIGBUS is blocked while it runs); a fault re-executes and
        // re-faults. Either way the default action then ends the process.
        unsafe {
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            if sent {
                libc::raise(sig);
            }
        }
        return;
    }
    let Some(prev) = prev else { return };
    if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous action was installed with SA_SIGINFO, so its handler has this
        // signature; we pass it the arguments the kernel gave us.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        f(sig, info, ctx);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        f(sig);
    }
}
