//! Notifiers: callbacks that a device mirror registers on an address space, run when a range
//! is invalidated (migrated, unmapped, protected, moved, copied on write). Every
//! `invalidate` is followed by its `invalidate_end`, on every path, success or failure; both
//! are called with no page-table lock held (a notifier may sleep, for example until a device
//! kernel that reads the range finishes), before the entries of the range change and after
//! they settle again. A mirror that builds its view between invalidations pairs
//! [`crate::mm::AddressSpace::read_begin`] with [`crate::mm::AddressSpace::read_retry`].

use super::space::SpaceId;
use crate::mm::{Owner, VirtAddr};

/// Why a range is being invalidated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifyEvent {
    /// A migration replaces the entries (the kernel's `MMU_NOTIFY_MIGRATE`).
    Migrate,
    /// The range is unmapped.
    Unmap,
    /// The range's protection changes (also fork's write-protection).
    Protect,
    /// The range moves to another address.
    Remap,
    /// The address space goes away.
    Release,
    /// A CPU write replaces a shared page (or the zero page) by a private copy (the kernel's
    /// `MMU_NOTIFY_CLEAR` around a copy-on-write).
    Clear,
}

/// The range and reason of an invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifyRange {
    /// First address.
    pub start: VirtAddr,
    /// One past the last address.
    pub end: VirtAddr,
    /// Why.
    pub event: NotifyEvent,
    /// For `Migrate`: the owner of the migration, so a driver can skip its own.
    pub owner: Owner,
}

/// A device mirror's callbacks.
pub trait Notifier: Send + Sync {
    /// Start of an invalidation: the mirror must stop using `range` of `space` before this
    /// returns. It may read and write memory mapped for CPU pointers (`Context::alloc_mapped`)
    /// outside every range being invalidated: such a fault waits only for invalidations of
    /// its own range. A load or store of a page that is not present and lies in a range being
    /// invalidated (this one or another thread's), or any such access while this thread
    /// holds the map lock exclusively (notifiers of mprotect, mremap and fork), cannot be
    /// served: the thread gets `SIGBUS` and the CPU mirror records `Error::Reentrant`.
    /// Notifiers of munmap run with the map lock held shared (the unmapped range already
    /// out of the space), so the rest of the space can be faulted from them. A notifier must
    /// not wait for *another* thread's access to a CPU-mapped page that is not present: the
    /// fault thread serves that access only once the invalidation ends (and, under the
    /// exclusive map lock of mprotect, mremap or fork, it cannot take the lock at all), so
    /// such a wait never ends (the kernel's notifiers have the same rule).
    fn invalidate(&self, space: SpaceId, range: &NotifyRange);
    /// End of an invalidation: the entries of `range` are settled again (a mirror may fault
    /// them in). Called once per operation, after every `invalidate` it made.
    fn invalidate_end(&self, space: SpaceId, range: &NotifyRange) {
        let _ = (space, range);
    }
}
