//! Invalidations and the notifiers that hear them: every start has its end (a guard), the
//! sequence number a mirror checks (`read_begin` / `read_retry` for the whole space,
//! `read_begin_range` / `read_retry_range` for one range, as the kernel's interval notifiers
//! do), which thread runs which invalidation, registration and removal.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{AddressSpace, SpaceInner};
use crate::mm::notifier::{Notifier, NotifyRange};
use crate::mm::VirtAddr;

/// The registered notifiers, replaced whole on (un)registration so that an invalidation
/// takes them with one reference count and calls them with no lock held.
pub(super) type Notifiers = Arc<[(NotifierId, Arc<dyn Notifier>)]>;

/// Names a registered notifier, for [`AddressSpace::unregister_notifier`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifierId(u64);

static NEXT_NOTIFIER: AtomicU64 = AtomicU64::new(1);

/// Starts remembered for [`AddressSpace::read_retry_range`]: a mirror whose read spans more
/// starts than this retries (it cannot tell whether one of the forgotten ones overlapped).
const STARTS_KEPT: usize = 256;

/// One invalidation that started and has not ended.
#[derive(Clone, Copy, Debug)]
struct Running {
    /// The sequence number its start took.
    seq: u64,
    start: VirtAddr,
    end: VirtAddr,
    /// The kernel's id of the thread that runs it (and its notifiers).
    tid: u32,
    /// Whether that thread holds the space's map lock exclusively meanwhile.
    exclusive: bool,
}

/// The invalidations of a space: which run now, and the ranges of the latest starts.
#[derive(Default)]
pub(super) struct InvalState {
    running: Vec<Running>,
    /// (sequence number, start, end) of the last [`STARTS_KEPT`] starts, oldest first.
    starts: VecDeque<(u64, VirtAddr, VirtAddr)>,
}

/// What a space keeps of its invalidations, for mirrors that read between them.
#[derive(Default)]
pub(super) struct Invalidations {
    /// Bumped when an invalidation starts (under `state`'s lock).
    seq: AtomicU64,
    /// Invalidations started and not yet ended (under `state`'s lock).
    active: AtomicU64,
    state: Mutex<InvalState>,
    /// Signalled whenever an invalidation ends.
    ended: Condvar,
}

/// The range a mirror's read covers: an inverted one (`end` below `start`, as wrapping
/// arithmetic at the top of the space makes) counts as the whole space, so that it is never
/// a range that no invalidation overlaps.
fn read_span(start: VirtAddr, end: VirtAddr) -> (VirtAddr, VirtAddr) {
    if end < start {
        (VirtAddr(0), VirtAddr(u64::MAX))
    } else {
        (start, end)
    }
}

fn overlaps(r: &Running, start: VirtAddr, end: VirtAddr) -> bool {
    r.start < end && start < r.end
}

/// The calling thread's id as the kernel numbers threads (what a userfaultfd message names).
pub(crate) fn current_tid() -> u32 {
    thread_local! {
        static TID: u32 = {
            // SAFETY: gettid takes no argument and cannot fail.
            unsafe { libc::syscall(libc::SYS_gettid) as u32 }
        };
    }
    TID.with(|t| *t)
}

/// An invalidation in progress: its notifiers were told it started, and they are told it
/// ended when this drops, on every path.
pub(crate) struct Invalidation<'a> {
    space: &'a SpaceInner,
    range: NotifyRange,
    seq: u64,
}

impl Drop for Invalidation<'_> {
    fn drop(&mut self) {
        self.space.invalidate_end(&self.range, self.seq);
    }
}

impl SpaceInner {
    /// Records the start of an invalidation of `range` by this thread, then tells the
    /// notifiers. Returns its sequence number, for [`SpaceInner::invalidate_end`].
    pub(super) fn invalidate_start(&self, range: &NotifyRange, exclusive: bool) -> u64 {
        let seq = {
            let mut st = self.inval.state.lock();
            let seq = self.inval.seq.fetch_add(1, Ordering::AcqRel) + 1;
            self.inval.active.fetch_add(1, Ordering::AcqRel);
            st.running.push(Running {
                seq,
                start: range.start,
                end: range.end,
                tid: current_tid(),
                exclusive,
            });
            if st.starts.len() == STARTS_KEPT {
                st.starts.pop_front();
            }
            st.starts.push_back((seq, range.start, range.end));
            seq
        };
        let ns = self.notifiers.read().clone();
        for (_, n) in ns.iter() {
            n.invalidate(self.id, range);
        }
        seq
    }

    pub(super) fn invalidate_end(&self, range: &NotifyRange, seq: u64) {
        let ns = self.notifiers.read().clone();
        for (_, n) in ns.iter() {
            n.invalidate_end(self.id, range);
        }
        let mut st = self.inval.state.lock();
        if let Some(i) = st.running.iter().position(|r| r.seq == seq) {
            st.running.swap_remove(i);
        }
        self.inval.active.fetch_sub(1, Ordering::AcqRel);
        drop(st);
        self.inval.ended.notify_all();
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
    /// starts. It says whether one *started* since it was read, not whether one that started
    /// before is still running: a mirror that builds a view starts with
    /// [`AddressSpace::read_begin`] or [`AddressSpace::read_begin_range`] (which wait for
    /// running invalidations) and checks with the matching `read_retry`, never with this
    /// number alone.
    pub fn invalidate_seq(&self) -> u64 {
        self.inner.inval.seq.load(Ordering::Acquire)
    }

    /// Starts a mirror's read of the whole space: waits until no invalidation of the space
    /// is in progress, then returns the sequence number to hand to
    /// [`AddressSpace::read_retry`] once the mirror has built its view (for example with
    /// [`crate::mm::hmm_range_fault`]) and before it commits it. Must not be called from a
    /// notifier callback (it would wait for its own invalidation). A mirror of part of the
    /// space waits for less with [`AddressSpace::read_begin_range`].
    pub fn read_begin(&self) -> u64 {
        let inv = &self.inner.inval;
        let mut st = inv.state.lock();
        while !st.running.is_empty() {
            inv.ended.wait(&mut st);
        }
        inv.seq.load(Ordering::Acquire)
    }

    /// True if an invalidation started since [`AddressSpace::read_begin`] returned `seq`
    /// (or is running now): the mirror's view may be stale and must be rebuilt.
    pub fn read_retry(&self, seq: u64) -> bool {
        let inv = &self.inner.inval;
        inv.seq.load(Ordering::Acquire) != seq || inv.active.load(Ordering::Acquire) != 0
    }

    /// Starts a mirror's read of `[start, end)` (the kernel's `mmu_interval_read_begin` for
    /// one interval): waits only while an invalidation that overlaps the range is in
    /// progress, so invalidations elsewhere never hold it up; returns the sequence number to
    /// hand to [`AddressSpace::read_retry_range`] with the same range. Must not be called
    /// from a notifier callback for an overlapping range (it would wait for itself).
    pub fn read_begin_range(&self, start: VirtAddr, end: VirtAddr) -> u64 {
        let (start, end) = read_span(start, end);
        let inv = &self.inner.inval;
        let mut st = inv.state.lock();
        while st.running.iter().any(|r| overlaps(r, start, end)) {
            inv.ended.wait(&mut st);
        }
        inv.seq.load(Ordering::Acquire)
    }

    /// [`AddressSpace::read_begin_range`] without waiting: `None` while an overlapping
    /// invalidation is in progress.
    pub fn try_read_begin_range(&self, start: VirtAddr, end: VirtAddr) -> Option<u64> {
        let (start, end) = read_span(start, end);
        let inv = &self.inner.inval;
        let st = inv.state.lock();
        if st.running.iter().any(|r| overlaps(r, start, end)) {
            return None;
        }
        Some(inv.seq.load(Ordering::Acquire))
    }

    /// True if an invalidation overlapping `[start, end)` started since
    /// [`AddressSpace::read_begin_range`] returned `seq` for that range, or runs now: the
    /// mirror's view of the range may be stale. Invalidations of other ranges do not count
    /// (unless so many started meanwhile that the space no longer knows their ranges: then
    /// it says retry). A range whose `end` lies below its `start` counts as the whole space.
    pub fn read_retry_range(&self, seq: u64, start: VirtAddr, end: VirtAddr) -> bool {
        let (start, end) = read_span(start, end);
        let inv = &self.inner.inval;
        let st = inv.state.lock();
        if st.running.iter().any(|r| overlaps(r, start, end)) {
            return true;
        }
        if inv.seq.load(Ordering::Acquire) == seq {
            return false;
        }
        match st.starts.front() {
            Some(&(oldest, _, _)) if oldest <= seq + 1 => st
                .starts
                .iter()
                .any(|&(s, a, b)| s > seq && a < end && start < b),
            _ => true,
        }
    }

    /// Whether a fault at `[start, end)` by thread `tid` (the kernel's id) comes from inside
    /// an invalidation of this space that cannot let it through: `tid` runs an invalidation
    /// now (its notifiers, typically) and either the range overlaps an invalidation in
    /// progress (its own or another's: waiting for it could wait for the faulting thread
    /// itself) or `tid` holds the map lock exclusively (which every fault needs shared).
    pub(crate) fn fault_inside_invalidation(
        &self,
        tid: u32,
        start: VirtAddr,
        end: VirtAddr,
    ) -> bool {
        let st = self.inner.inval.state.lock();
        let mut own = st.running.iter().filter(|r| r.tid == tid).peekable();
        if own.peek().is_none() {
            return false;
        }
        own.any(|r| r.exclusive) || st.running.iter().any(|r| overlaps(r, start, end))
    }

    /// Starts an invalidation of `range`: notifiers are told now, and again (its end) when
    /// the returned guard drops. Never called under a leaf lock: a notifier may sleep.
    pub(crate) fn invalidate(&self, range: NotifyRange) -> Invalidation<'_> {
        let exclusive = self.holds_map_exclusively();
        let seq = self.inner.invalidate_start(&range, exclusive);
        Invalidation {
            space: &self.inner,
            range,
            seq,
        }
    }
}
