//! Invalidations and the notifiers that hear them: every start has its end (a guard), the
//! sequence number a mirror checks (`read_begin` / `read_retry`), registration and removal.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{AddressSpace, SpaceInner};
use crate::mm::notifier::{Notifier, NotifyRange};

/// The registered notifiers, replaced whole on (un)registration so that an invalidation
/// takes them with one reference count and calls them with no lock held.
pub(super) type Notifiers = Arc<[(NotifierId, Arc<dyn Notifier>)]>;

/// Names a registered notifier, for [`AddressSpace::unregister_notifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

static NEXT_NOTIFIER: AtomicU64 = AtomicU64::new(1);

/// An invalidation in progress: its notifiers were told it started, and they are told it
/// ended when this drops, on every path.
pub(crate) struct Invalidation<'a> {
    space: &'a SpaceInner,
    range: NotifyRange,
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.space.invalidate_end(&self.range);
    }
}

impl SpaceInner {
    pub(super) fn invalidate_start(&self, range: &NotifyRange) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.seq.fetch_add(1, Ordering::AcqRel);
        let ns = self.notifiers.read().clone();
        for (_, n) in ns.iter() {
            n.invalidate(self.id, range);
        }
    }

    pub(super) fn invalidate_end(&self, range: &NotifyRange) {
        let ns = self.notifiers.read().clone();
        for (_, n) in ns.iter() {
            n.invalidate_end(self.id, range);
        }
        if self.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _g = self.idle_lock.lock();
            self.idle.notify_all();
        }
    }
}

impl AddressSpace {
    /// Registers a notifier for every invalidation of this space; the id unregisters it.
    pub fn register_notifier(&self, n: Arc<dyn Notifier>) -> NotifierId {
        let id = NotifierId(NEXT_NOTIFIER.fetch_add(1, Ordering::Relaxed));
        let mut ns = self.inner.notifiers.write();
        let mut v: Vec<_> = ns.iter().cloned().collect();
        v.push((id, n));
        *ns = v.into();
        id
    }

    /// Unregisters a notifier: it sees no invalidation that starts after this returns (one
    /// already running may still end on it). False if `id` was not registered here.
    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        let mut ns = self.inner.notifiers.write();
        let v: Vec<_> = ns.iter().filter(|(k, _)| *k != id).cloned().collect();
        let found = v.len() != ns.len();
        *ns = v.into();
        found
    }

    /// The invalidation sequence number: it changes whenever an invalidation of any range
    /// starts, so a mirror that read it before a snapshot can tell whether to retry.
    pub fn invalidate_seq(&self) -> u64 {
        self.inner.seq.load(Ordering::Acquire)
    }

    /// Starts a mirror's read (the kernel's `mmu_interval_read_begin`): waits until no
    /// invalidation of the space is in progress, then returns the sequence number to hand to
    /// [`AddressSpace::read_retry`] once the mirror has built its view (for example with
    /// [`crate::mm::hmm_range_fault`]) and before it commits it. Must not be called from a
    /// notifier callback (it would wait for its own invalidation).
    pub fn read_begin(&self) -> u64 {
        loop {
            let seq = self.inner.seq.load(Ordering::Acquire);
            if self.inner.active.load(Ordering::Acquire) == 0 {
                return seq;
            }
            let mut g = self.inner.idle_lock.lock();
            if self.inner.active.load(Ordering::Acquire) != 0 {
                self.inner.idle.wait(&mut g);
            }
        }
    }

    /// True if an invalidation started since [`AddressSpace::read_begin`] returned `seq`
    /// (or is running now): the mirror's view may be stale and must be rebuilt.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.inner.seq.load(Ordering::Acquire) != seq
            || self.inner.active.load(Ordering::Acquire) != 0
    }

    /// Starts an invalidation of `range`: notifiers are told now, and again (its end) when
    /// the returned guard drops. Never called under a leaf lock: a notifier may sleep.
    pub(crate) fn invalidate(&self, range: NotifyRange) -> Invalidation<'_> {
        self.inner.invalidate_start(&range);
        Invalidation {
            space: &self.inner,
            range,
        }
    }
}
