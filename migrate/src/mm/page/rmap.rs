//! The reverse map: where a page is mapped (its `Mapping`s), the lock over it that shares
//! the map count's word, and the walk bit that keeps migration entries in place while the
//! page's lock holder walks them. A child of `page` so that it reaches the page's fields.

use std::sync::atomic::Ordering;

use super::{page_lock, Page};
use crate::mm::space::SpaceId;
use crate::mm::VirtAddr;

/// One place a page is mapped: an address space and a virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The address space.
    pub space: SpaceId,
    /// The page-aligned virtual address.
    pub addr: VirtAddr,
}

/// Flag bit (crate-private, beside [`flags`](super::flags)): the lock holder is walking the page's
/// reverse map (restoring or replacing its migration entries), so no migration entry of the
/// page may move or be copied until the walk ends (mremap and fork wait for it). The kernel
/// keeps rmap walks and mremap apart with the anon_vma lock in the same way.
pub(crate) const RMAP_WALK: u32 = 1 << 8;

impl Page {
    /// Locks the reverse map. The lock shares the map count's word: taking it is one
    /// compare-exchange, and releasing it is one plain store that also publishes the new
    /// count (critical sections are a few loads and stores; a mutex's release would be
    /// another locked instruction, which on a migration's path costs as much as the work it
    /// protects).
    pub(super) fn rmap_lock(&self) -> RmapGuard<'_> {
        RmapGuard {
            page: self,
            count: page_lock::rmap_lock(&self.map_count),
        }
    }

    /// Records a mapping of the page.
    pub(crate) fn add_rmap(&self, m: Mapping) {
        let mut r = self.rmap_lock();
        r.push(m);
        r.count += 1;
    }
    /// Forgets a mapping of the page; false if it was not recorded.
    pub(crate) fn remove_rmap(&self, m: Mapping) -> bool {
        let mut r = self.rmap_lock();
        let removed = r.remove(m);
        if removed {
            r.count -= 1;
        }
        removed
    }
    /// Every place the page is mapped (or held by a migration entry). Crate-private, as is
    /// every way into the reverse map: its users hold the page's lock, a reference to it or
    /// an entry that maps it, which [`Page::release_replaced`] relies on.
    pub(crate) fn mappings(&self) -> Vec<Mapping> {
        self.rmap_lock().to_vec()
    }
    /// Forgets mapping `m` if it is the page's only one; false (and nothing changed) otherwise.
    pub(crate) fn take_sole_rmap(&self, m: Mapping) -> bool {
        let mut r = self.rmap_lock();
        if r.sole() == Some(m) {
            r.clear();
            r.count -= 1;
            true
        } else {
            false
        }
    }

    /// Starts a walk of the reverse map (see [`RMAP_WALK`]): returns the mappings, which no
    /// migration entry can join or leave by a move until [`Page::end_walk`] (an unmap may
    /// still drop one). The caller holds the page's lock.
    pub(crate) fn begin_walk(&self) -> Vec<Mapping> {
        let r = self.rmap_lock();
        self.flags.fetch_or(RMAP_WALK, Ordering::AcqRel);
        r.to_vec()
    }

    /// Ends a walk started by [`Page::begin_walk`].
    pub(crate) fn end_walk(&self) {
        self.flags.fetch_and(!RMAP_WALK, Ordering::AcqRel);
    }

    /// For mremap and fork, under the leaf lock(s) of the entry: records mapping `to` (and
    /// forgets `from`) unless a walk of the reverse map is running, in which case nothing
    /// changes and the caller waits for [`Page::walking`] to clear, then retries.
    pub(crate) fn move_rmap_unless_walked(&self, from: Option<Mapping>, to: Mapping) -> bool {
        let mut r = self.rmap_lock();
        if self.flags.load(Ordering::Acquire) & RMAP_WALK != 0 {
            return false;
        }
        r.push(to);
        r.count += 1;
        if let Some(f) = from {
            if r.remove(f) {
                r.count -= 1;
            }
        }
        true
    }

    /// True while a reverse-map walk of the page runs.
    pub(crate) fn walking(&self) -> bool {
        self.flags.load(Ordering::Acquire) & RMAP_WALK != 0
    }

    /// The page's mapping if it has exactly one.
    pub(crate) fn sole_mapping(&self) -> Option<Mapping> {
        self.rmap_lock().sole()
    }
}

/// The locked rmap, with the map count to publish on release.
pub(super) struct RmapGuard<'a> {
    page: &'a Page,
    pub(super) count: u32,
}

impl std::ops::Deref for RmapGuard<'_> {
    type Target = Rmap;
    fn deref(&self) -> &Rmap {
        // SAFETY: the guard holds the lock, so no other thread touches the rmap.
        unsafe { &*self.page.rmap.get() }
    }
}

impl std::ops::DerefMut for RmapGuard<'_> {
    fn deref_mut(&mut self) -> &mut Rmap {
        // SAFETY: as for `deref`; the guard is the only way in while it lives.
        unsafe { &mut *self.page.rmap.get() }
    }
}

impl Drop for RmapGuard<'_> {
    fn drop(&mut self) {
        page_lock::rmap_unlock(&self.page.map_count, self.count);
    }
}

/// Where a page is mapped: the first mapping inline (the common case allocates nothing;
/// space id 0, which no address space has, marks it empty), further ones (after fork) in a
/// vector behind one pointer.
#[derive(Default)]
pub(super) struct Rmap {
    first: (u64, u64),
    #[allow(
        clippy::box_collection,
        reason = "one pointer (a Vec is three words) keeps Page at 64 bytes"
    )]
    rest: Option<Box<Vec<Mapping>>>,
}

impl Rmap {
    fn first(&self) -> Option<Mapping> {
        (self.first.0 != 0).then_some(Mapping {
            space: SpaceId(self.first.0),
            addr: VirtAddr(self.first.1),
        })
    }
    fn set_first(&mut self, m: Option<Mapping>) {
        self.first = m.map_or((0, 0), |m| (m.space.0, m.addr.get()));
    }
    fn rest(&self) -> &[Mapping] {
        self.rest.as_deref().map_or(&[], |v| v.as_slice())
    }
    fn push(&mut self, m: Mapping) {
        debug_assert_ne!(m.space.0, 0, "space id 0 marks an empty rmap slot");
        if self.first.0 == 0 {
            self.set_first(Some(m));
        } else {
            self.rest.get_or_insert_default().push(m);
        }
    }
    fn remove(&mut self, m: Mapping) -> bool {
        if self.first() == Some(m) {
            let next = self.rest.as_mut().and_then(|v| v.pop());
            self.set_first(next);
            return true;
        }
        let Some(rest) = self.rest.as_mut() else {
            return false;
        };
        match rest.iter().position(|&x| x == m) {
            Some(i) => {
                rest.swap_remove(i);
                true
            }
            None => false,
        }
    }
    fn to_vec(&self) -> Vec<Mapping> {
        self.first().iter().chain(self.rest()).copied().collect()
    }
    fn sole(&self) -> Option<Mapping> {
        if self.rest().is_empty() {
            self.first()
        } else {
            None
        }
    }
    pub(super) fn clear(&mut self) {
        self.first = (0, 0);
        self.rest = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MemoryKind, Owner};
    use hetmem_engine::Pfn;

    fn at(space: u64, addr: u64) -> Mapping {
        Mapping {
            space: SpaceId(space),
            addr: VirtAddr(addr),
        }
    }

    #[test]
    fn rmap_keeps_every_mapping_and_the_count_in_step() {
        let p = Page::new(Pfn(1), MemoryKind::System, Owner(0));
        p.init_allocated(false);
        assert_eq!((p.mapcount(), p.sole_mapping()), (0, None));
        p.add_rmap(at(1, 0x1000));
        assert_eq!((p.mapcount(), p.sole_mapping()), (1, Some(at(1, 0x1000))));
        p.add_rmap(at(2, 0x1000));
        p.add_rmap(at(3, 0x5000));
        assert_eq!(p.mapcount(), 3);
        assert_eq!(p.sole_mapping(), None);
        assert!(!p.take_sole_rmap(at(1, 0x1000)), "not the only mapping");
        assert!(!p.remove_rmap(at(4, 0x1000)), "never recorded");
        // Removing the inline one moves a later one inline.
        assert!(p.remove_rmap(at(1, 0x1000)));
        let mut left = p.mappings();
        left.sort_by_key(|m| m.space);
        assert_eq!(left, vec![at(2, 0x1000), at(3, 0x5000)]);
        assert!(p.remove_rmap(at(3, 0x5000)));
        assert_eq!((p.mapcount(), p.sole_mapping()), (1, Some(at(2, 0x1000))));
        assert!(p.take_sole_rmap(at(2, 0x1000)));
        assert_eq!((p.mapcount(), p.mappings()), (0, vec![]));
        // Reallocation starts from an empty map.
        p.add_rmap(at(5, 0));
        p.add_rmap(at(6, 0));
        p.init_allocated(true);
        assert_eq!((p.mapcount(), p.mappings()), (0, vec![]));
    }
}
