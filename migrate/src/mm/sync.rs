//! The few synchronisation primitives the page's lock protocols ([`super::page_lock`]) are
//! written against: the standard atomics and `parking_lot_core`'s wait queues in a normal
//! build, loom's checked atomics and a loom mutex and condition variable under `--cfg
//! loom`, where the `hetmem-models` crate compiles these two files (and nothing else of
//! hetmem) to run its models. The production path pays nothing for the indirection: every
//! name here is the standard item itself, or a function that inlines to one call.

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, Ordering};

/// Sleeps on wait queue `key` if `validate`, run under the queue's lock, returns true; a
/// later [`unpark_all`] of the key (which takes the same lock) wakes the sleeper. May return
/// early (a shared queue, a spurious wake-up): callers re-check their condition and loop.
#[cfg(not(loom))]
#[inline]
pub(crate) fn park(key: usize, validate: impl FnOnce() -> bool) {
    // SAFETY: the key is only a wait-queue name; the callbacks neither park nor panic.
    unsafe {
        parking_lot_core::park(
            key,
            validate,
            || {},
            |_, _| {},
            parking_lot_core::DEFAULT_PARK_TOKEN,
            None,
        );
    }
}

/// Wakes every thread parked on `key`.
#[cfg(not(loom))]
#[inline]
pub(crate) fn unpark_all(key: usize) {
    // SAFETY: waking the threads parked on a key has no other effect.
    unsafe { parking_lot_core::unpark_all(key, parking_lot_core::DEFAULT_UNPARK_TOKEN) };
}

/// One step of a spin-wait: a spin hint for the first `spins` rounds, then a yield.
#[cfg(not(loom))]
#[inline]
pub(crate) fn spin(spins: u32) {
    if spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(loom)]
loom::lazy_static! {
    /// Under loom, one wait queue for every key (as parking_lot's buckets may share one):
    /// a wake-up of one key wakes sleepers of any key, which re-check and park again.
    static ref QUEUE: (loom::sync::Mutex<()>, loom::sync::Condvar) =
        (loom::sync::Mutex::new(()), loom::sync::Condvar::new());
}

/// As the normal build's `park`: `validate` runs under the queue's mutex, and the sleep
/// releases it atomically, so an `unpark_all` after `validate` cannot be missed.
#[cfg(loom)]
pub(crate) fn park(_key: usize, validate: impl FnOnce() -> bool) {
    let (lock, sleepers) = &*QUEUE;
    let held = lock.lock().unwrap();
    if validate() {
        drop(sleepers.wait(held).unwrap());
    }
}

/// As the normal build's `unpark_all`, under the queue's mutex.
#[cfg(loom)]
pub(crate) fn unpark_all(_key: usize) {
    let (lock, sleepers) = &*QUEUE;
    let _held = lock.lock().unwrap();
    sleepers.notify_all();
}

/// Under loom every spin yields, so that the model explores the other threads.
#[cfg(loom)]
pub(crate) fn spin(_spins: u32) {
    loom::thread::yield_now();
}
