//! Ticket retirement: the batches in flight on one queue, in the order of their timeline
//! values, and their retirement once the timeline passes them (host readbacks, recycling).
//!
//! Protocol: a batch's timeline value is chosen *and* the batch is tracked under one lock,
//! so the queue of batches is always in value order and no value is handed out before its
//! batch can be found. Retiring up to a value pops, under the same lock, every batch at or
//! below it; so when `retire(v)` returns, every batch up to `v` has been finished, by this
//! call or by an earlier one whose work the lock publishes. A waiter on a ticket therefore
//! sees its readbacks done whichever thread retired them.
//!
//! This file uses nothing else of the engine: the `hetmem-models` crate compiles it under
//! `--cfg loom`, where its lock is loom's, and checks the protocol with several submitters
//! and retirers (`models/tests/loom.rs`).

use std::collections::VecDeque;

#[cfg(not(loom))]
use parking_lot::{Mutex, MutexGuard};

#[cfg(loom)]
use loom::sync::{Mutex, MutexGuard};

/// Batches in flight on one queue, each with what it holds until it retires.
pub(crate) struct Retirement<T> {
    in_flight: Mutex<VecDeque<(u64, T)>>,
}

impl<T> Default for Retirement<T> {
    fn default() -> Self {
        Retirement {
            in_flight: Mutex::new(VecDeque::new()),
        }
    }
}

impl<T> Retirement<T> {
    #[cfg(not(loom))]
    fn locked(&self) -> MutexGuard<'_, VecDeque<(u64, T)>> {
        self.in_flight.lock()
    }

    #[cfg(loom)]
    fn locked(&self) -> MutexGuard<'_, VecDeque<(u64, T)>> {
        self.in_flight.lock().unwrap()
    }

    /// Submits a batch with `submit`, which hands it to the queue and returns its timeline
    /// value, and tracks `held` under that value; both under the lock (see the module docs).
    /// On failure nothing is tracked, and `held` comes back with the error.
    pub(crate) fn submit<E>(
        &self,
        held: T,
        submit: impl FnOnce() -> Result<u64, E>,
    ) -> Result<u64, (E, T)> {
        let mut in_flight = self.locked();
        match submit() {
            Ok(value) => {
                debug_assert!(
                    in_flight.back().is_none_or(|b| b.0 < value),
                    "timeline values increase"
                );
                in_flight.push_back((value, held));
                Ok(value)
            }
            Err(e) => Err((e, held)),
        }
    }

    /// Finishes, in value order and under the lock, every batch whose value is at most
    /// `upto` (the caller saw the timeline reach it), passing each to `finish`.
    pub(crate) fn retire(&self, upto: u64, mut finish: impl FnMut(u64, T)) {
        let mut in_flight = self.locked();
        while in_flight.front().is_some_and(|b| b.0 <= upto) {
            let (value, held) = in_flight.pop_front().expect("checked above");
            finish(value, held);
        }
    }
}
