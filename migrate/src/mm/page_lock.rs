//! The lock protocols of a [`super::Page`], as functions of the atomic words they live in:
//! the page lock (`LOCKED`, with `WAITERS` and parking), the reverse map's bit lock in the
//! map-count word, and the reference count. `Page` keeps its words and calls these.
//!
//! They sit apart from `Page` so that loom can run them: this file and [`super::sync`] use
//! nothing else of hetmem, and the `hetmem-models` crate compiles both (with `#[path]`)
//! under `--cfg loom`, where `sync` is loom's checked atomics and a modelled wait queue. The
//! models (`models/tests/loom.rs`) therefore check this code, not a copy of it. In a normal
//! build every function here inlines into `Page`'s methods.

use super::sync::{self, AtomicU32, Ordering};

/// The page is locked (the bit of `Page::flags`, see `flags::LOCKED`).
pub(crate) const LOCKED: u32 = 1 << 0;
/// Someone sleeps waiting for the page lock (see `flags::WAITERS`).
pub(crate) const WAITERS: u32 = 1 << 7;
/// The lock bit of the map-count word (the other bits are the map count).
pub(crate) const RMAP_LOCKED: u32 = 1 << 31;

/// A page's flag word seen as its lock. `key` names the page's wait queue (its address).
///
/// Protocol: the lock is the `LOCKED` bit. A thread that must wait sets `WAITERS` *under
/// the wait queue's lock*, in one atomic step with a re-check that `LOCKED` is still set,
/// and sleeps only if it was; an unlock clears both bits in one step and, if `WAITERS`
/// was set, wakes the queue (taking its lock). So a waiter either sees the unlock before it
/// sleeps, or its `WAITERS` is seen by the unlock, which then wakes it.
#[derive(Clone, Copy)]
pub(crate) struct PageLock<'a> {
    flags: &'a AtomicU32,
    key: usize,
}

impl<'a> PageLock<'a> {
    /// The lock in `flags`, waited for on queue `key`.
    #[inline]
    pub(crate) fn new(flags: &'a AtomicU32, key: usize) -> PageLock<'a> {
        PageLock { flags, key }
    }

    /// Tries to lock without waiting.
    #[inline]
    pub(crate) fn trylock(self) -> bool {
        self.flags.fetch_or(LOCKED, Ordering::AcqRel) & LOCKED == 0
    }

    /// Tries to lock, clear the bits `taken` and set the bits `mark` in one step: false
    /// (nothing changed) if the page is locked or any bit of `taken` is clear (a migration's
    /// isolation from the LRU, and its mark on the pages it collects).
    #[inline]
    pub(crate) fn trylock_taking(self, taken: u32, mark: u32) -> bool {
        let mut was = self.flags.load(Ordering::Relaxed);
        loop {
            if was & LOCKED != 0 || was & taken != taken {
                return false;
            }
            match self.flags.compare_exchange_weak(
                was,
                (was | LOCKED | mark) & !taken,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => was = seen,
            }
        }
    }

    /// Locks, sleeping (not spinning) while another holder has the lock.
    pub(crate) fn lock(self) {
        while !self.trylock() {
            self.park_while_locked();
        }
    }

    /// Waits until the page is unlocked, without taking the lock.
    pub(crate) fn wait_unlocked(self) {
        if self.flags.load(Ordering::Acquire) & LOCKED != 0 {
            self.park_while_locked();
        }
    }

    /// Sleeps until an unlock, unless the page is unlocked already (see the type's docs).
    /// `WAITERS` is set only on a word that is still locked, so a waiter that arrives just
    /// after an unlock (or the page's free) leaves no stale bit behind: a free page's flags
    /// stay clear, and the next unlock does not wake an empty queue.
    fn park_while_locked(self) {
        let flags = self.flags;
        sync::park(self.key, || {
            let mut was = flags.load(Ordering::Acquire);
            loop {
                if was & LOCKED == 0 {
                    return false;
                }
                match flags.compare_exchange_weak(
                    was,
                    was | WAITERS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return true,
                    Err(seen) => was = seen,
                }
            }
        });
    }

    /// Unlocks, waking every waiter if any announced itself; returns the word before.
    #[inline]
    #[cfg_attr(not(loom), allow(dead_code))] // the page's own unlocks clear TAKEN_AS_DST too
    pub(crate) fn unlock(self) -> u32 {
        self.unlock_clearing(0)
    }

    /// Unlocks and clears bits `clear` in the same step, as [`PageLock::unlock`].
    #[inline]
    pub(crate) fn unlock_clearing(self, clear: u32) -> u32 {
        let was = self
            .flags
            .fetch_and(!(LOCKED | WAITERS | clear), Ordering::AcqRel);
        if was & WAITERS != 0 {
            self.wake_all();
        }
        was
    }

    /// Sets bits `f` and unlocks in one step, as [`PageLock::unlock`]; returns the word
    /// before.
    #[inline]
    #[cfg_attr(not(loom), allow(dead_code))] // as `unlock`
    pub(crate) fn unlock_with(self, f: u32) -> u32 {
        self.unlock_with_clearing(f, 0)
    }

    /// Sets bits `f`, clears bits `clear` and unlocks in one step, as
    /// [`PageLock::unlock_with`].
    #[inline]
    pub(crate) fn unlock_with_clearing(self, f: u32, clear: u32) -> u32 {
        let mut was = self.flags.load(Ordering::Relaxed);
        loop {
            let now = (was | f) & !(LOCKED | WAITERS | clear);
            match self
                .flags
                .compare_exchange_weak(was, now, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => was = seen,
            }
        }
        if was & WAITERS != 0 {
            self.wake_all();
        }
        was
    }

    /// Clears every flag (the page is free), waking waiters: they hold no reference, so a
    /// page may be freed while they wait, and the free is their wake-up.
    #[inline]
    pub(crate) fn clear_all(self) {
        if self.flags.swap(0, Ordering::AcqRel) & WAITERS != 0 {
            self.wake_all();
        }
    }

    fn wake_all(self) {
        sync::unpark_all(self.key);
    }
}

/// Takes the bit lock of a map-count word and returns the count. Taking it is one
/// compare-exchange (Acquire); [`rmap_unlock`] is one Release store of the new count, which
/// publishes the critical section's writes to the next holder.
#[inline]
pub(crate) fn rmap_lock(word: &AtomicU32) -> u32 {
    let mut spins = 0u32;
    loop {
        let c = word.load(Ordering::Relaxed);
        if c & RMAP_LOCKED == 0
            && word
                .compare_exchange_weak(c, c | RMAP_LOCKED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            return c;
        }
        spins += 1;
        sync::spin(spins);
    }
}

/// Releases the bit lock taken by [`rmap_lock`], storing map count `count`.
#[inline]
pub(crate) fn rmap_unlock(word: &AtomicU32, count: u32) {
    debug_assert_eq!(count & RMAP_LOCKED, 0, "map count overflows its word");
    word.store(count, Ordering::Release);
}

/// Takes a reference.
#[inline]
pub(crate) fn get(refcount: &AtomicU32) {
    refcount.fetch_add(1, Ordering::AcqRel);
}

/// Takes a reference unless the count is zero (the page is free).
#[inline]
pub(crate) fn try_get(refcount: &AtomicU32) -> bool {
    let mut c = refcount.load(Ordering::Acquire);
    loop {
        if c == 0 {
            return false;
        }
        match refcount.compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => c = now,
        }
    }
}

/// Drops a reference; returns the count before (1: it was the last one; 0: a bug, the
/// page was free, which the caller reports).
#[inline]
pub(crate) fn put(refcount: &AtomicU32) -> u32 {
    refcount.fetch_sub(1, Ordering::AcqRel)
}

/// Drops the caller's reference if it is the only one (1 -> 0); false, with nothing changed,
/// if anyone else holds one.
#[inline]
pub(crate) fn drop_only_ref(refcount: &AtomicU32) -> bool {
    refcount
        .compare_exchange(1, 0, Ordering::AcqRel, Ordering::Relaxed)
        .is_ok()
}
