//! The map lock as threads hold it: shared by migrations (setup to finalize) and faults,
//! exclusive for the operations that change mappings, with a per-thread record of what each
//! thread holds so that a request that would wait for the thread itself fails instead.

use parking_lot::{RwLockReadGuard, RwLockWriteGuard};

use super::{AddressSpace, SpaceId, VmaTree};
use crate::error::{Error, Result};

thread_local! {
    /// The address spaces whose map lock this thread holds, and whether exclusively: an
    /// operation that needs the lock exclusively while this thread holds it at all, or a
    /// shared hold while this thread holds it exclusively (a notifier calling back into the
    /// space it is told about), would wait forever.
    static HELD: std::cell::RefCell<Vec<(SpaceId, bool)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// The address spaces whose mappings this thread is changing under a shared hold (a
    /// munmap past its detach, see [`MapWrite::downgrade`]): a change of mappings asked for
    /// from there is a callback into the change, not a migration that holds the lock.
    static CHANGING: std::cell::RefCell<Vec<SpaceId>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether this thread is changing `id`'s mappings under a downgraded hold.
fn changing_here(id: SpaceId) -> bool {
    CHANGING.with(|c| c.borrow().contains(&id))
}

/// Whether this thread holds `id`'s map lock: `None` if not, else whether exclusively.
fn held_here(id: SpaceId) -> Option<bool> {
    HELD.with(|h| {
        let h = h.borrow();
        let mut found = None;
        for &(_, excl) in h.iter().filter(|(s, _)| *s == id) {
            found = Some(found.unwrap_or(false) || excl);
        }
        found
    })
}

fn unhold(id: SpaceId, exclusive: bool) {
    HELD.with(|h| {
        let mut h = h.borrow_mut();
        if let Some(i) = h.iter().rposition(|&x| x == (id, exclusive)) {
            h.swap_remove(i);
        }
    });
}

/// The map lock held exclusively (see [`AddressSpace::map_write`]).
pub(crate) struct MapWrite<'a> {
    /// Always `Some` but in [`MapWrite::downgrade`], which takes it.
    map: Option<RwLockWriteGuard<'a, VmaTree>>,
    id: SpaceId,
    _track: Option<crate::mm::locks::Held>,
    _here: std::marker::PhantomData<*const ()>,
}

impl std::ops::Deref for MapWrite<'_> {
    type Target = VmaTree;
    fn deref(&self) -> &VmaTree {
        self.map.as_ref().expect("held until dropped or downgraded")
    }
}

impl std::ops::DerefMut for MapWrite<'_> {
    fn deref_mut(&mut self) -> &mut VmaTree {
        self.map.as_mut().expect("held until dropped or downgraded")
    }
}

impl Drop for MapWrite<'_> {
    fn drop(&mut self) {
        if self.map.is_some() {
            unhold(self.id, true);
        }
    }
}

impl<'a> MapWrite<'a> {
    /// Turns the exclusive hold into a shared one without letting go of the lock: no other
    /// change of mappings can slip in between, while faults and migrations elsewhere in the
    /// space may run again (munmap does this once the doomed VMAs are out of the tree).
    pub(super) fn downgrade(mut self) -> MapHold<'a> {
        let map = self.map.take().expect("held until dropped or downgraded");
        let track = self._track.take().expect("taken only here");
        unhold(self.id, true);
        HELD.with(|h| h.borrow_mut().push((self.id, false)));
        CHANGING.with(|c| c.borrow_mut().push(self.id));
        MapHold {
            map: RwLockWriteGuard::downgrade(map),
            id: self.id,
            changing: true,
            _track: track,
            _here: std::marker::PhantomData,
        }
    }
}

/// The map lock held shared: no mapping of the space changes (no munmap, mremap, mprotect or
/// fork) while it lives. Migrations hold it from setup to finalize, as the kernel's drivers
/// hold the mmap lock, and faults hold it while they resolve an entry.
pub(crate) struct MapHold<'a> {
    map: RwLockReadGuard<'a, VmaTree>,
    id: SpaceId,
    /// Made by [`MapWrite::downgrade`]: its thread is still changing the mappings.
    changing: bool,
    _track: crate::mm::locks::Held,
    /// Never sent to another thread: the hold is recorded in this thread's `HELD` (whatever
    /// features the lock's crate was built with).
    _here: std::marker::PhantomData<*const ()>,
}

impl std::ops::Deref for MapHold<'_> {
    type Target = VmaTree;
    fn deref(&self) -> &VmaTree {
        &self.map
    }
}

impl Drop for MapHold<'_> {
    fn drop(&mut self) {
        unhold(self.id, false);
        if self.changing {
            CHANGING.with(|c| {
                let mut c = c.borrow_mut();
                if let Some(i) = c.iter().rposition(|&x| x == self.id) {
                    c.swap_remove(i);
                }
            });
        }
    }
}

impl AddressSpace {
    /// The map lock, shared (faults, migrations, CPU access). Fails with
    /// [`Error::Reentrant`] on a thread that holds it exclusively (a notifier called from
    /// munmap, mprotect, mremap or fork that calls back into the space).
    pub(crate) fn map_read(&self) -> Result<MapHold<'_>> {
        if held_here(self.inner.id) == Some(true) {
            return Err(Error::Reentrant);
        }
        let track = crate::mm::locks::acquire(crate::mm::locks::Rank::Map);
        let map = self.inner.map.read_recursive();
        HELD.with(|h| h.borrow_mut().push((self.inner.id, false)));
        Ok(MapHold {
            map,
            id: self.inner.id,
            changing: false,
            _track: track,
            _here: std::marker::PhantomData,
        })
    }

    /// The map lock, exclusive (mmap, munmap, mprotect, mremap, fork): waits for every
    /// migration and fault in the space. Fails instead of waiting forever when this thread
    /// itself holds the lock (a migration it has not finalized, a fault callback, a
    /// notifier of another change).
    pub(super) fn map_write(&self) -> Result<MapWrite<'_>> {
        match held_here(self.inner.id) {
            // A notifier of a munmap (which runs them under a shared hold) is reentrant.
            Some(false) if changing_here(self.inner.id) => return Err(Error::Reentrant),
            Some(false) => return Err(Error::MigrationInProgress),
            Some(true) => return Err(Error::Reentrant),
            None => {}
        }
        let track = crate::mm::locks::acquire(crate::mm::locks::Rank::Map);
        let map = self.inner.map.write();
        HELD.with(|h| h.borrow_mut().push((self.inner.id, true)));
        Ok(MapWrite {
            map: Some(map),
            id: self.inner.id,
            _track: Some(track),
            _here: std::marker::PhantomData,
        })
    }

    /// True if this thread holds the space's map lock exclusively (a change of mappings).
    pub(crate) fn holds_map_exclusively(&self) -> bool {
        held_here(self.inner.id) == Some(true)
    }

    /// True if this thread holds the space's map lock (a migration between its stages, a
    /// fault in progress, a change of the mappings).
    pub(crate) fn held_by_this_thread(&self) -> bool {
        held_here(self.inner.id).is_some()
    }
}
