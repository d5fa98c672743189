//! What code outside hetmem may hold of a page: owned guards that keep the page's
//! invariants. A page's counts, flags and lock are crate-private; a driver allocates its
//! destination pages as [`NewPage`]s (one reference, optionally locked, given back on
//! drop or handed to a migration with [`NewPage::into_pfn`]), and may hold a live page's
//! lock with a [`LockedPage`]. No sequence of these calls frees a page that is still
//! reachable: a page is freed only by its last reference, and every reference a guard holds
//! is its own.
//!
//! A guard marks its page (a crate-private flag bit, one per kind of guard, so that one
//! guard's drop never clears another's mark) until it is dropped or given up, so a
//! migration refuses a destination that a guard still holds ([`Error::PageInUse`]): the
//! guard would otherwise release, after the migration, a reference that went with the
//! page to the migration.
//!
//! Raw reference and flag operations are not callable outside the crate:
//!
//! ```compile_fail,E0624
//! fn put(pm: &hetmem::mm::PageMap, p: &hetmem::mm::Page) {
//!     pm.put_page(p);
//! }
//! ```
//! ```compile_fail,E0624
//! fn reference(p: &hetmem::mm::Page) {
//!     p.get();
//! }
//! ```
//! ```compile_fail,E0624
//! fn unlock(p: &hetmem::mm::Page) {
//!     p.unlock();
//! }
//! ```
//! ```compile_fail,E0624
//! fn set_locked(p: &hetmem::mm::Page) {
//!     p.set(hetmem::mm::flags::LOCKED);
//! }
//! ```
//! ```compile_fail,E0624
//! fn unpin(p: &hetmem::mm::Page) {
//!     p.remove_pin();
//! }
//! ```
//! ```compile_fail,E0624
//! fn revive(pm: &hetmem::mm::PageMap, pfn: hetmem::engine::Pfn) {
//!     let _ = pm.alloc_system_at(pfn, true);
//! }
//! ```

use hetmem_engine::Pfn;

use super::page::{flags, Page, GUARDED, LOCK_GUARDED};
use super::pagemap::PageMap;
use crate::error::{Error, Result};

/// A page the caller allocated: one reference, locked if asked for. Dropping it unlocks
/// the page (if locked) and drops the reference, which frees it; [`NewPage::into_pfn`]
/// hands both to the migration whose `dst` names the page instead.
#[must_use = "the page is freed when the guard drops"]
pub struct NewPage<'a> {
    pm: &'a PageMap,
    page: &'a Page,
    locked: bool,
}

impl<'a> NewPage<'a> {
    fn new(pm: &'a PageMap, page: &'a Page, locked: bool) -> NewPage<'a> {
        page.set(GUARDED);
        NewPage { pm, page, locked }
    }

    /// The page's frame number.
    pub fn pfn(&self) -> Pfn {
        self.page.pfn()
    }

    /// The page, to observe (counts, flags).
    pub fn page(&self) -> &Page {
        self.page
    }

    /// Gives the guard up: the page's reference (and lock, if held) go with the returned
    /// frame number, for a migration's `dst` (`migrate_pfn(new.into_pfn())`), whose
    /// finalize unlocks and releases it. A frame never handed on stays allocated: a leak,
    /// never a free.
    pub fn into_pfn(self) -> Pfn {
        let pfn = self.page.pfn();
        self.page.clear(GUARDED);
        std::mem::forget(self);
        pfn
    }
}

impl std::fmt::Debug for NewPage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewPage")
            .field("pfn", &self.page.pfn())
            .field("locked", &self.locked)
            .finish()
    }
}

impl Drop for NewPage<'_> {
    fn drop(&mut self) {
        self.page.clear(GUARDED);
        if self.locked {
            self.page.unlock();
        }
        self.pm.put_page(self.page);
    }
}

/// The lock of a live page, and a reference that keeps it live while the lock is held.
/// Dropping it unlocks the page and drops the reference.
#[must_use = "the page is unlocked when the guard drops"]
pub struct LockedPage<'a> {
    pm: &'a PageMap,
    page: &'a Page,
}

impl LockedPage<'_> {
    /// The page's frame number.
    pub fn pfn(&self) -> Pfn {
        self.page.pfn()
    }

    /// The page, to observe (counts, flags).
    pub fn page(&self) -> &Page {
        self.page
    }
}

impl std::fmt::Debug for LockedPage<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockedPage")
            .field("pfn", &self.page.pfn())
            .finish()
    }
}

impl Drop for LockedPage<'_> {
    fn drop(&mut self) {
        self.page.clear(LOCK_GUARDED);
        self.page.unlock();
        self.pm.put_page(self.page);
    }
}

impl PageMap {
    /// Allocates a system page (zeroed if asked), with one reference, locked if asked: a
    /// migration's destination, say.
    pub fn alloc_page(&self, zeroed: bool, locked: bool) -> Result<NewPage<'_>> {
        let page = self.alloc_system(zeroed, locked)?;
        Ok(NewPage::new(self, page, locked))
    }

    /// Makes a frame the caller took from the host frame pool (for drivers that allocate
    /// frames in batches) a live page: one reference, locked if asked. Refuses a frame the
    /// pool has not handed out ([`Error::PageFree`]), a frame whose page is live already
    /// ([`Error::PageInUse`]) and a frame of no pool ([`Error::UnknownPfn`]).
    pub fn claim_frame(&self, pfn: Pfn, locked: bool) -> Result<NewPage<'_>> {
        let page = self.page_or_err(pfn)?;
        if page.is_device() {
            return Err(Error::InvalidArgument("not a host frame"));
        }
        if !self.frames().is_allocated(pfn) {
            return Err(Error::PageFree(pfn));
        }
        let _one_claim = self.claims.lock();
        if page.refcount() != 0 {
            return Err(Error::PageInUse(pfn));
        }
        self.alloc_system_at(&[pfn], locked)?;
        Ok(NewPage::new(self, page, locked))
    }

    /// Makes a device page the engine just allocated a live page: one reference, locked if
    /// asked. Refuses a page that is live already ([`Error::PageInUse`]) or not a device
    /// page.
    pub fn claim_device_page(&self, pfn: Pfn, locked: bool) -> Result<NewPage<'_>> {
        let page = self.init_device_page(pfn, locked)?;
        Ok(NewPage::new(self, page, locked))
    }

    /// Locks the live page `pfn`, sleeping while another holder has it, and keeps a
    /// reference while the lock is held. Fails with [`Error::PageFree`] on a free page and
    /// [`Error::InvalidArgument`] on the shared zero page.
    ///
    /// The reference makes the page look pinned to a migration, which then leaves it
    /// alone. A thread must not lock a page that its own migration holds (it would wait
    /// for itself).
    pub fn lock_page(&self, pfn: Pfn) -> Result<LockedPage<'_>> {
        let page = self.page_or_err(pfn)?;
        if page.test(flags::ZERO) {
            return Err(Error::InvalidArgument(
                "the shared zero page is never locked",
            ));
        }
        if !page.try_get() {
            return Err(Error::PageFree(pfn));
        }
        page.lock();
        page.set(LOCK_GUARDED);
        Ok(LockedPage { pm: self, page })
    }
}
