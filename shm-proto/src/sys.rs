//! The operating-system pieces: shared (not private) futex wait/wake, open-file-description locks
//! that mark a side alive for its whole life, and process start times.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::sync::AtomicU32;

/// Sleeps while `*word == expected`, at most `timeout`. Spurious returns are fine: callers loop.
///
/// Uses `FUTEX_WAIT` without `FUTEX_PRIVATE_FLAG`: the word lives in memory shared between
/// processes, where a private futex would never be woken by the other process.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned 4-byte atomic for the duration of the call; the kernel
    // only reads it (compare with `expected`) and queues us; `ts` outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every sleeper on `word` (in any process that maps it).
pub(crate) fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned 4-byte atomic; FUTEX_WAKE does not access it.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32);
    }
}

fn flock(kind: libc::c_short, byte: u64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// Takes an exclusive open-file-description lock on one byte of `file` without waiting.
/// `Ok(false)`: somebody else holds it. OFD locks belong to this open file, are released by the
/// kernel when the process dies, and conflict even between two opens in one process.
pub(crate) fn try_lock_byte(file: &File, byte: u64) -> io::Result<bool> {
    let fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: valid fd; `fl` is a valid flock that outlives the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl as *const libc::flock) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(err),
    }
}

/// Whether some other open file description holds a lock on `byte` of `file`.
pub(crate) fn byte_locked_by_other(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: valid fd; `fl` is a valid flock the kernel fills in.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the filesystem holding `path` is tmpfs: memory, not disk.
pub(crate) fn is_memory_fs(path: &std::path::Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
        Err(_) => false,
    }
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether `gid` is this process's effective group or one of its supplementary groups.
pub(crate) fn in_group(gid: u32) -> bool {
    // SAFETY: getegid has no preconditions and cannot fail.
    if unsafe { libc::getegid() } == gid {
        return true;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    loop {
        // SAFETY: `groups` has room for `groups.len()` entries, which is the size passed.
        let n = unsafe { libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr()) };
        if n >= 0 {
            return groups[..n as usize].contains(&gid);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) || groups.len() >= 1 << 16 {
            return false;
        }
        // More supplementary groups than room: grow and ask again.
        groups.resize(groups.len() * 4, 0);
    }
}

/// Gives the allocator's free memory back to the system. glibc keeps freed heap pages (in every
/// thread's arena) for reuse, so a daemon that once held a large batch would keep that peak for
/// its whole life. A no-op where the C library is not glibc. (Here because all of the project's
/// `unsafe` lives in this crate.)
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointer from us; it walks the allocator's own arenas under
    // their locks and may be called from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
