//! Notifiers: callbacks that a device mirror registers on an address space, run when a range
//! is invalidated (migrated, unmapped, protected, moved), before the page-table lock drops.

use super::space::SpaceId;

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
}

/// The range and reason of an invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NotifyRange {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Why.
    pub event: NotifyEvent,
    /// For `Migrate`: the owner of the migration, so a driver can skip its own.
    pub owner: u64,
}

/// A device mirror's callbacks.
pub trait Notifier: Send + Sync {
    /// Start of an invalidation: the mirror must stop using `range` of `space` before this
    /// returns.
    fn invalidate(&self, space: SpaceId, range: &NotifyRange);
    /// End of an invalidation: the entries of `range` are settled again (a mirror may fault
    /// them in). Called once per operation, after every `invalidate` it made.
    fn invalidate_end(&self, space: SpaceId, range: &NotifyRange) {
        let _ = (space, range);
    }
}
