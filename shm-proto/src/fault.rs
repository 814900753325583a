//! The table of segment mappings the SIGBUS guard protects.
//!
//! A producer may truncate its own segment file (it has write access to it); a later access to
//! a page past the new end of file raises SIGBUS in every process that maps it. The guard (see
//! `sigbus` in this crate) looks the faulting address up here, maps anonymous zero pages over the
//! whole mapping (so the access retries and succeeds) and sets that mapping's `truncated` flag,
//! which every ring operation then reports as an error instead of continuing on zero pages.
//! This is how compositors protect themselves from their clients' shm pools (Weston's
//! `wl_shm_buffer_begin_access`, wlroots).
//!
//! The handler runs inside a signal: it may not allocate or take a lock, so the table is a fixed
//! array of slots made of atomics only. Each slot has one state word, `ACTIVE | CLAIMED | busy`,
//! and every party changes it with a read-modify-write, so all changes are totally ordered:
//! - register: claim a free slot (`0 → CLAIMED`), write the range, then set `ACTIVE` (Release);
//! - the handler: `busy += 1` (Acquire); if `ACTIVE` was set, the range it reads is the
//!   registered one; work; `busy -= 1` (Release);
//! - unregister: clear `ACTIVE`, then wait until `busy == 0` (Acquire), then free the slot.
//!   A handler whose increment comes after the clear skips the slot; one whose increment comes
//!   before it is waited for. So once unregister returns, no handler touches the range again and
//!   the caller may unmap it (a late `MAP_FIXED` over a range reused by another mapping would
//!   destroy that mapping).
//!
//! The table is generic over its size so that the loom models (`tests/loom.rs`) can run it with
//! two slots and loom atomics; production uses one static table of [`SLOTS`].

use crate::sync::{AtomicU32, AtomicU64, Ordering, yield_now};

/// Mappings one process can protect at once (each attached segment holds one slot).
pub const SLOTS: usize = 256;

const ACTIVE: u32 = 1 << 31;
const CLAIMED: u32 = 1 << 30;
const BUSY: u32 = CLAIMED - 1;

/// One registered mapping.
#[derive(Debug)]
struct Slot {
    /// `ACTIVE | CLAIMED | handlers in progress`.
    word: AtomicU32,
    /// Set (Release) by the handler after it replaced the mapping with zero pages.
    truncated: AtomicU32,
    start: AtomicU64,
    len: AtomicU64,
}

impl Slot {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self { word: AtomicU32::new(0), truncated: AtomicU32::new(0), start: AtomicU64::new(0), len: AtomicU64::new(0) }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self { word: AtomicU32::new(0), truncated: AtomicU32::new(0), start: AtomicU64::new(0), len: AtomicU64::new(0) }
    }
}

/// A fixed-size, lock-free table of address ranges, each with a "truncated" flag.
#[derive(Debug)]
pub struct FaultTable<const N: usize> {
    slots: [Slot; N],
}

#[cfg(not(loom))]
impl<const N: usize> FaultTable<N> {
    /// An empty table (usable in a `static`).
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self { slots: [const { Slot::new() }; N] }
    }
}

#[cfg(loom)]
impl<const N: usize> FaultTable<N> {
    /// An empty table.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Self { slots: std::array::from_fn(|_| Slot::new()) }
    }
}

impl<const N: usize> FaultTable<N> {
    /// Registers `[start, start + len)`; returns its slot, or `None` when every slot is taken.
    pub fn register(&self, start: usize, len: usize) -> Option<usize> {
        for (i, s) in self.slots.iter().enumerate() {
            // A handler passing over a free slot makes its word briefly non-zero: then this slot
            // is skipped, which is harmless (the next one is tried).
            if s.word.compare_exchange(0, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                s.start.store(start as u64, Ordering::Relaxed);
                s.len.store(len as u64, Ordering::Relaxed);
                s.truncated.store(0, Ordering::Relaxed);
                // Release: a handler that sees ACTIVE sees the range above.
                s.word.fetch_or(ACTIVE, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// Whether the mapping in `slot` was found truncated and replaced by zero pages.
    pub fn truncated(&self, slot: usize) -> bool {
        self.slots[slot].truncated.load(Ordering::Acquire) != 0
    }

    /// Removes the mapping in `slot`. On return no fault handler uses the range any more, so the
    /// caller may unmap it.
    pub fn unregister(&self, slot: usize) {
        let s = &self.slots[slot];
        s.word.fetch_and(!ACTIVE, Ordering::AcqRel);
        // A handler in progress finishes with one system call; it never waits for us.
        while s.word.load(Ordering::Acquire) & BUSY != 0 {
            yield_now();
        }
        s.start.store(0, Ordering::Relaxed);
        s.len.store(0, Ordering::Relaxed);
        s.truncated.store(0, Ordering::Relaxed);
        s.word.fetch_and(!CLAIMED, Ordering::Release);
    }

    /// The fault handler's part: if `addr` lies in a registered range, calls `remap(start, len)`
    /// on it and, if that succeeded, sets its truncated flag. Returns whether the fault was ours
    /// and handled. Async-signal-safe: atomics only, no allocation, no lock, no waiting.
    pub fn on_fault(&self, addr: usize, remap: impl Fn(usize, usize) -> bool) -> bool {
        let addr = addr as u64;
        for s in &self.slots {
            if s.word.load(Ordering::Relaxed) & ACTIVE == 0 {
                continue;
            }
            let w = s.word.fetch_add(1, Ordering::Acquire);
            let mut handled = None;
            if w & ACTIVE != 0 {
                let start = s.start.load(Ordering::Relaxed);
                let len = s.len.load(Ordering::Relaxed);
                if addr >= start && addr - start < len {
                    let ok = remap(start as usize, len as usize);
                    if ok {
                        s.truncated.store(1, Ordering::Release);
                    }
                    handled = Some(ok);
                }
            }
            s.word.fetch_sub(1, Ordering::Release);
            if let Some(ok) = handled {
                return ok;
            }
        }
        false
    }
}
