//! [`HeapMemory`]: the ring's [`Memory`] on the heap, for loom models, miri and property tests.
//!
//! It runs the same `Producer`/`Consumer` code as the segment. Futex wait/wake is modelled with a
//! mutex and condvar (the value check and the sleep are atomic with respect to `wake`, as with a
//! futex). Under loom, every access to ring bytes is tracked per 8-byte slot with
//! `loom::cell::UnsafeCell`, so a read of bytes the other side may still be writing is reported as
//! a causality violation; and a sleep has no timeout, so a lost wake-up is reported as a deadlock.

use std::cell::UnsafeCell;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use crate::layout::RingShared;
use crate::ring::{Memory, Role};
use crate::sync::{AtomicU32, Condvar, Mutex, Ordering};

#[cfg(loom)]
type Alive = loom::sync::atomic::AtomicBool;
#[cfg(not(loom))]
type Alive = std::sync::atomic::AtomicBool;

/// Ring memory on the heap, shared by a producer and a consumer in one process (wrap in `Arc`).
pub struct HeapMemory {
    shared: RingShared,
    /// The ring bytes: a leaked `Box<[UnsafeCell<u8>]>` (freed in `Drop`). Every slice is made
    /// from this raw pointer and covers only its range: re-borrowing the whole buffer on each
    /// access would overlap the other side's live slice (miri's Stacked Borrows rejects that).
    base: *mut u8,
    capacity: usize,
    #[cfg(loom)]
    slots: Box<[loom::cell::UnsafeCell<()>]>,
    lock: Mutex<()>,
    cond: Condvar,
    alive: [Alive; 2],
    /// The reverse area (want-lists), as words.
    reverse: Box<[crate::sync::AtomicU64]>,
}

// SAFETY: the byte cells are only accessed through `Memory::read`/`write`, whose callers (the ring
// protocol) guarantee that no range is written by one side while the other accesses it; all other
// state is atomics, a mutex and a condvar.
unsafe impl Sync for HeapMemory {}
// SAFETY: as above; nothing in it is tied to a thread.
unsafe impl Send for HeapMemory {}

impl HeapMemory {
    /// A zeroed ring of `capacity` bytes (a power of two, at least 64), both sides alive, with a
    /// reverse area of 2 words (want-lists of up to 128 files).
    pub fn new(capacity: usize) -> Self {
        Self::with_reverse(capacity, 2)
    }

    /// As [`HeapMemory::new`], with a reverse area of `words` 64-bit words.
    pub fn with_reverse(capacity: usize, words: usize) -> Self {
        assert!(capacity.is_power_of_two() && capacity >= 64, "capacity must be a power of two >= 64");
        Self {
            shared: RingShared::default(),
            base: UnsafeCell::raw_get(Box::into_raw((0..capacity).map(|_| UnsafeCell::new(0u8)).collect::<Box<[_]>>())
                as *const UnsafeCell<u8>),
            capacity,
            #[cfg(loom)]
            slots: (0..capacity / 8).map(|_| loom::cell::UnsafeCell::new(())).collect(),
            lock: Mutex::new(()),
            cond: Condvar::new(),
            alive: [Alive::new(true), Alive::new(true)],
            reverse: (0..words).map(|_| crate::sync::AtomicU64::new(0)).collect(),
        }
    }

    /// Marks `role` dead (its lock released) and wakes every sleeper, as the sleepers' next tick
    /// would notice in production.
    pub fn kill(&self, role: Role) {
        self.alive[role as usize].store(false, Ordering::SeqCst);
        let _g = self.lock.lock().unwrap();
        self.cond.notify_all();
    }

    /// Marks `role` alive again (a restarted process attached).
    pub fn revive(&self, role: Role) {
        self.alive[role as usize].store(true, Ordering::SeqCst);
    }

    /// The shared protocol words, for tests that play a restarted side.
    pub fn shared_words(&self) -> &RingShared {
        &self.shared
    }

    fn ptr(&self, off: usize) -> *mut u8 {
        // SAFETY: callers check `off <= capacity`; the allocation is `capacity` bytes.
        unsafe { self.base.add(off) }
    }

    #[cfg(loom)]
    fn slot_range(off: usize, len: usize) -> std::ops::Range<usize> {
        off / 8..(off + len).div_ceil(8)
    }
}

impl Drop for HeapMemory {
    fn drop(&mut self) {
        let cells = std::ptr::slice_from_raw_parts_mut(self.base as *mut UnsafeCell<u8>, self.capacity);
        // SAFETY: `base` and `capacity` come from `Box::into_raw` of exactly this slice in `new`,
        // and nothing borrows the bytes any more (`&mut self`).
        drop(unsafe { Box::from_raw(cells) });
    }
}

/// Readable ring bytes (plus, under loom, the tracked slot borrows).
pub struct HeapRead<'a> {
    bytes: &'a [u8],
    #[cfg(loom)]
    _slots: Vec<loom::cell::ConstPtr<()>>,
}

impl Deref for HeapRead<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

/// Writable ring bytes (plus, under loom, the tracked slot borrows).
pub struct HeapWrite<'a> {
    bytes: &'a mut [u8],
    #[cfg(loom)]
    _slots: Vec<loom::cell::MutPtr<()>>,
}

impl Deref for HeapWrite<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes
    }
}

impl DerefMut for HeapWrite<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes
    }
}

// SAFETY: `shared` lives as long as `self`; `bytes` has `capacity()` cells; `wait` returns within
// `timeout` outside loom (condvar wait_timeout) and blocks until woken under loom, which is what
// lets loom report a lost wake-up as a deadlock.
unsafe impl Memory for HeapMemory {
    type Read<'a> = HeapRead<'a>;
    type Write<'a> = HeapWrite<'a>;

    fn shared(&self) -> &RingShared {
        &self.shared
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    unsafe fn write(&self, off: usize, len: usize) -> HeapWrite<'_> {
        assert!(off + len <= self.capacity);
        // SAFETY: in bounds (checked above); the caller guarantees exclusive use of the range, and
        // the cells are `UnsafeCell`, so writing through a shared reference is allowed.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.ptr(off), len) };
        HeapWrite {
            bytes,
            #[cfg(loom)]
            _slots: Self::slot_range(off, len).map(|i| self.slots[i].get_mut()).collect(),
        }
    }

    unsafe fn read(&self, off: usize, len: usize) -> HeapRead<'_> {
        assert!(off + len <= self.capacity);
        // SAFETY: in bounds (checked above); the caller guarantees nobody writes the range now.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr(off), len) };
        HeapRead {
            bytes,
            #[cfg(loom)]
            _slots: Self::slot_range(off, len).map(|i| self.slots[i].get()).collect(),
        }
    }

    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        let guard = self.lock.lock().unwrap();
        // A dead side ends every sleep: production sleepers notice at their next tick.
        let anyone_dead = !self.alive.iter().all(|a| a.load(Ordering::SeqCst));
        if word.load(Ordering::SeqCst) != expected || anyone_dead {
            return;
        }
        #[cfg(loom)]
        {
            let _ = timeout;
            drop(self.cond.wait(guard).unwrap());
        }
        #[cfg(not(loom))]
        drop(self.cond.wait_timeout(guard, timeout).unwrap());
    }

    fn wake(&self, _word: &AtomicU32) {
        let _g = self.lock.lock().unwrap();
        self.cond.notify_all();
    }

    fn peer_alive(&self, role: Role) -> bool {
        self.alive[role as usize].load(Ordering::SeqCst)
    }

    fn reverse(&self) -> &[crate::sync::AtomicU64] {
        &self.reverse
    }
}
