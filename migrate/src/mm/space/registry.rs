//! Address spaces by id: the [`SpaceId`] that reverse mappings and notifier callbacks name a
//! space by, and the registry through which the page map finds the space (or, while it is
//! torn down, its page tables) that a mapping points into.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use super::{PageTables, SpaceInner};

/// Identifies an address space (for reverse mappings and notifier callbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceId(pub u64);

static NEXT_SPACE: AtomicU64 = AtomicU64::new(1);

impl SpaceId {
    /// An id no other space of the process has had.
    pub(crate) fn next() -> SpaceId {
        SpaceId(NEXT_SPACE.fetch_add(1, Ordering::Relaxed))
    }
}

/// An address space as the registry knows it: the space (while it lives) and its page
/// tables (until its teardown has cleared them).
type Registered = (Weak<SpaceInner>, Arc<PageTables>);

/// The address spaces over one page map, by id.
#[derive(Default)]
pub(crate) struct SpaceRegistry {
    spaces: RwLock<HashMap<SpaceId, Registered>>,
}

impl SpaceRegistry {
    /// Registers a new space and its page tables.
    pub(crate) fn add(&self, id: SpaceId, s: Weak<SpaceInner>, tables: Arc<PageTables>) {
        self.spaces.write().insert(id, (s, tables));
    }

    /// Forgets a space whose teardown has cleared its page tables.
    pub(crate) fn remove(&self, id: SpaceId) {
        self.spaces.write().remove(&id);
    }

    /// A live address space (not one being torn down).
    pub(crate) fn get(&self, id: SpaceId) -> Option<Arc<SpaceInner>> {
        self.spaces.read().get(&id)?.0.upgrade()
    }

    /// The page tables of an address space, live or being torn down (its teardown clears
    /// them under their leaves' locks before it leaves the registry).
    pub(crate) fn tables(&self, id: SpaceId) -> Option<Arc<PageTables>> {
        Some(self.spaces.read().get(&id)?.1.clone())
    }
}
