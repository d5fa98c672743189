//! `Page`: the metadata of one frame (a host frame or a device page), as the kernel's
//! `struct page` keeps it: reference, map and pin counts, flags, memory kind, owner.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hetmem_engine::Pfn;

use super::page_lock::{self, PageLock};

mod rmap;
use crate::mm::Owner;
pub use rmap::Mapping;
use rmap::Rmap;
#[allow(unused_imports, reason = "the path `migration`'s docs link to")]
pub(crate) use rmap::RMAP_WALK;

/// What memory a page is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MemoryKind {
    /// A host frame: CPU-accessible, migratable to a device.
    System,
    /// Device memory the CPU cannot access: a CPU access faults it back to host.
    DevicePrivate,
    /// Device memory the CPU can access in place (coherent, e.g. resizable BAR).
    DeviceCoherent,
}

/// Page flag bits (see [`Page::flags`]).
pub mod flags {
    /// The page is locked (migration, fault handling).
    pub const LOCKED: u32 = super::page_lock::LOCKED;
    /// The contents differ from any backing copy.
    pub const DIRTY: u32 = 1 << 1;
    /// Accessed since the bit was last cleared.
    pub const YOUNG: u32 = 1 << 2;
    /// An anonymous page mapped by exactly one address space, writable without COW.
    pub const ANON_EXCLUSIVE: u32 = 1 << 3;
    /// A copy of the page sits in the swap cache.
    pub const SWAPCACHE: u32 = 1 << 4;
    /// The page is on the LRU list (not isolated).
    pub const LRU: u32 = 1 << 5;
    /// The page is the shared zero page.
    pub const ZERO: u32 = 1 << 6;
}

/// Metadata of one frame: 64 bytes on a cache line of its own, so that walking a batch of
/// pages touches one line per page.
#[repr(C, align(64))]
pub struct Page {
    /// The frame number, with the memory kind in the top two bits.
    pfn_kind: u64,
    owner: Owner,
    driver_data: AtomicU64,
    refcount: AtomicU32,
    pincount: AtomicU32,
    flags: AtomicU32,
    /// The map count, and in its top bit the lock of `rmap` (see [`Page::rmap_lock`]).
    map_count: AtomicU32,
    rmap: UnsafeCell<Rmap>,
}

// SAFETY: every field but `rmap` is atomic or immutable, and `rmap` is only reached through
// `Page::rmap_lock`, which gives one thread at a time exclusive access.
unsafe impl Sync for Page {}

// The layout promise of the doc comment.
const _: () = assert!(std::mem::size_of::<Page>() == 64);

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Page")
            .field("pfn", &self.pfn())
            .field("kind", &self.kind())
            .field("owner", &self.owner)
            .field("refcount", &self.refcount())
            .field("mapcount", &self.mapcount())
            .field("pincount", &self.pincount())
            .field("flags", &format_args!("{:#x}", self.flags()))
            .finish()
    }
}

/// Flag bit (crate-private): a guard outside the crate ([`super::page_guard`]) holds the
/// page's reference, so no migration may take the page as a destination.
pub(crate) const GUARDED: u32 = 1 << 9;

/// Flag bit (crate-private): a [`super::page_guard::LockedPage`] holds the page's lock and a
/// reference. Its own bit, not [`GUARDED`]: a `NewPage` of the same page may come and go
/// while the `LockedPage` lives, and its drop must not clear the `LockedPage`'s mark.
pub(crate) const LOCK_GUARDED: u32 = 1 << 10;

/// Either guard's mark.
pub(crate) const ANY_GUARD: u32 = GUARDED | LOCK_GUARDED;

/// Flag bit (crate-private): a migration's pages stage took the page as a destination; it
/// is that migration's until its finalize unlocks it (which clears the bit), and no other
/// migration may take it.
pub(crate) const TAKEN_AS_DST: u32 = 1 << 11;

/// Flag bit (crate-private): a migration collected the page as a source and holds its lock;
/// the unlock that ends the migration's hold clears it in the same atomic step. No pages
/// stage takes such a page as a destination, and no finalize releases one as a driver's
/// destination: a source may be mapped nowhere (a device migration's, after a munmap of its
/// range) and then pass every other check on a destination.
pub(crate) const COLLECTED: u32 = 1 << 12;

/// Bit position of the memory kind in `Page::pfn_kind`.
const KIND_SHIFT: u32 = 62;

/// The lock bit of `Page::map_count` (the other bits are the map count).
const RMAP_LOCKED: u32 = page_lock::RMAP_LOCKED;

impl Page {
    /// The page lock in the flag word, with the page's address as its wait-queue key.
    #[inline]
    fn lock_word(&self) -> PageLock<'_> {
        PageLock::new(&self.flags, self as *const Page as usize)
    }
}

impl Page {
    pub(crate) fn new(pfn: Pfn, kind: MemoryKind, owner: Owner) -> Page {
        assert!(pfn.0 >> KIND_SHIFT == 0, "pfn {pfn} too large for a page");
        let k = match kind {
            MemoryKind::System => 0,
            MemoryKind::DevicePrivate => 1,
            MemoryKind::DeviceCoherent => 2,
        };
        Page {
            pfn_kind: pfn.0 | k << KIND_SHIFT,
            owner,
            driver_data: AtomicU64::new(0),
            refcount: AtomicU32::new(0),
            pincount: AtomicU32::new(0),
            flags: AtomicU32::new(0),
            map_count: AtomicU32::new(0),
            rmap: UnsafeCell::new(Rmap::default()),
        }
    }

    /// The frame number.
    #[inline]
    pub fn pfn(&self) -> Pfn {
        Pfn(self.pfn_kind & ((1 << KIND_SHIFT) - 1))
    }
    /// The memory kind.
    #[inline]
    pub fn kind(&self) -> MemoryKind {
        match self.pfn_kind >> KIND_SHIFT {
            0 => MemoryKind::System,
            1 => MemoryKind::DevicePrivate,
            _ => MemoryKind::DeviceCoherent,
        }
    }
    /// True for device-private and device-coherent pages.
    pub fn is_device(&self) -> bool {
        self.pfn_kind >> KIND_SHIFT != 0
    }
    /// The owner of the device pagemap this page belongs to ([`Owner::NONE`] for system
    /// pages).
    pub fn owner(&self) -> Owner {
        self.owner
    }
    /// References held on the page (mappings, pins, transient holders).
    pub fn refcount(&self) -> u32 {
        self.refcount.load(Ordering::Acquire)
    }
    /// Pins held on the page.
    pub fn pincount(&self) -> u32 {
        self.pincount.load(Ordering::Acquire)
    }
    /// Page-table entries that map the page.
    pub fn mapcount(&self) -> i32 {
        (self.map_count.load(Ordering::Acquire) & !RMAP_LOCKED) as i32
    }
    /// The flag word (see [`flags`]).
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }
    /// True while the page is locked.
    pub fn is_locked(&self) -> bool {
        self.test(flags::LOCKED)
    }
    /// True if all bits of `f` are set.
    pub fn test(&self, f: u32) -> bool {
        self.flags() & f == f
    }
    /// Sets flag bits.
    pub(crate) fn set(&self, f: u32) {
        self.flags.fetch_or(f, Ordering::AcqRel);
    }
    /// Clears flag bits.
    pub(crate) fn clear(&self, f: u32) {
        self.flags.fetch_and(!f, Ordering::AcqRel);
    }
    /// Marks the page taken as a migration's destination ([`TAKEN_AS_DST`]) and sets flag bits
    /// `f`, in one atomic step with the check that it may be one: locked, held by no guard,
    /// collected by no migration as a source, and taken by no pages stage (nor by a finalize
    /// releasing a destination no pages stage took). Returns the flag word before, or `None`
    /// (nothing changed). The mark goes with the unlock that maps or releases the page.
    pub(crate) fn take_as_dst(&self, f: u32) -> Option<u32> {
        let mut was = self.flags.load(Ordering::Relaxed);
        loop {
            if was & (TAKEN_AS_DST | ANY_GUARD | COLLECTED) != 0 || was & flags::LOCKED == 0 {
                return None;
            }
            match self.flags.compare_exchange_weak(
                was,
                was | TAKEN_AS_DST | f,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(was),
                Err(seen) => was = seen,
            }
        }
    }
    /// Clears flag bits, returning whether all were set.
    pub(crate) fn test_and_clear(&self, f: u32) -> bool {
        self.flags.fetch_and(!f, Ordering::AcqRel) & f == f
    }
    /// The driver's word for this page.
    pub fn driver_data(&self) -> u64 {
        self.driver_data.load(Ordering::Acquire)
    }
    /// Sets the driver's word.
    pub(crate) fn set_driver_data(&self, v: u64) {
        self.driver_data.store(v, Ordering::Release)
    }

    /// Takes a reference.
    pub(crate) fn get(&self) {
        page_lock::get(&self.refcount);
    }
    /// Takes a reference unless the page is free (refcount zero).
    pub(crate) fn try_get(&self) -> bool {
        page_lock::try_get(&self.refcount)
    }
    /// Drops a reference; returns true if it was the last one (the caller frees the page).
    pub(crate) fn put_ref(&self) -> bool {
        let old = page_lock::put(&self.refcount);
        assert!(old > 0, "reference dropped on free page {}", self.pfn());
        old == 1
    }
    /// If the caller holds the page's lock and its only reference, drops both at once (one
    /// locked instruction instead of an unlock and a put) and returns true: the page is then
    /// free with clear flags, for [`crate::mm::PageMap`] to give back. Otherwise changes
    /// nothing and returns false.
    pub(crate) fn release_if_last(&self) -> bool {
        if !self.drop_only_ref() {
            return false;
        }
        debug_assert_eq!(self.mapcount(), 0, "releasing mapped page {}", self.pfn());
        self.clear_all();
        true
    }

    /// Clears every flag (the page is free), waking threads that wait for its lock: waiters
    /// hold no reference, so a page may be released under them.
    pub(crate) fn clear_all(&self) {
        self.lock_word().clear_all();
    }

    /// Drops the caller's reference if it is the only one (1 -> 0); false, with nothing
    /// changed, if anyone else holds one.
    fn drop_only_ref(&self) -> bool {
        page_lock::drop_only_ref(&self.refcount)
    }

    /// As [`Page::release_if_last`], for a page whose one mapping the caller has just replaced
    /// (under that mapping's leaf lock, having seen a map count of one there): on success the
    /// mapping is forgotten too, without taking the rmap lock.
    pub(crate) fn release_replaced(&self) -> bool {
        if !self.drop_only_ref() {
            return false;
        }
        debug_assert_eq!(
            self.map_count.load(Ordering::Acquire),
            1,
            "page {} mapped elsewhere or its rmap locked",
            self.pfn()
        );
        // SAFETY: the reverse map is crate-private, and each of its users holds the page's
        // lock, a reference to it, or an entry that maps it (under that entry's leaf lock, or
        // just after clearing it, with the count still counting it). The caller holds the
        // lock, the reference count is now zero, and the caller replaced the one entry the
        // count of one stood for: no other thread can reach this rmap.
        unsafe { (*self.rmap.get()).clear() };
        self.map_count.store(0, Ordering::Release);
        self.clear_all();
        true
    }

    /// Makes a free page live with one reference and clean flags.
    pub(crate) fn init_allocated(&self, locked: bool) {
        self.flags
            .store(if locked { flags::LOCKED } else { 0 }, Ordering::Release);
        self.driver_data.store(0, Ordering::Release);
        self.pincount.store(0, Ordering::Release);
        let mut r = self.rmap_lock();
        r.clear();
        r.count = 0;
        drop(r);
        self.refcount.store(1, Ordering::Release);
    }

    /// Adds a pin (the caller holds a reference for it).
    pub(crate) fn add_pin(&self) {
        self.pincount.fetch_add(1, Ordering::AcqRel);
    }
    /// Removes a pin (the caller then drops its reference).
    pub(crate) fn remove_pin(&self) {
        self.pincount.fetch_sub(1, Ordering::AcqRel);
    }

    /// Tries to lock the page without waiting.
    pub(crate) fn trylock(&self) -> bool {
        self.lock_word().trylock()
    }

    /// Tries to lock the page for a migration that collects it as a source and, for a
    /// system page, take it off the LRU, in one step that also marks it [`COLLECTED`]: false
    /// (nothing changed) if it is locked, or is a system page off the LRU (isolated by
    /// someone else).
    pub(crate) fn trylock_isolate(&self) -> bool {
        let lru = if self.kind() == MemoryKind::System {
            flags::LRU
        } else {
            0
        };
        self.lock_word().trylock_taking(lru, COLLECTED)
    }

    /// Locks the page, sleeping (not spinning) while another holder has it.
    pub(crate) fn lock(&self) {
        self.lock_word().lock();
    }

    /// Unlocks the page and wakes every waiter (only if some announced themselves).
    /// A destination's unlock (by its migration's finalize) also ends its being taken, and a
    /// source's its being collected ([`COLLECTED`]), in the same atomic step.
    pub(crate) fn unlock(&self) {
        let was = self.lock_word().unlock_clearing(TAKEN_AS_DST | COLLECTED);
        debug_assert!(
            was & flags::LOCKED != 0,
            "unlock of unlocked page {}",
            self.pfn()
        );
    }

    /// Sets flag bits and unlocks the page in one step, waking every waiter (as
    /// [`Page::unlock`]).
    pub(crate) fn unlock_with(&self, f: u32) {
        let was = self
            .lock_word()
            .unlock_with_clearing(f, TAKEN_AS_DST | COLLECTED);
        debug_assert!(
            was & flags::LOCKED != 0,
            "unlock of unlocked page {}",
            self.pfn()
        );
    }

    /// Waits until the page is unlocked (without taking the lock). The caller need not hold
    /// a reference: a page released while locked wakes its waiters too.
    pub(crate) fn wait_unlocked(&self) {
        self.lock_word().wait_unlocked();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_and_pfn_share_a_word_and_the_page_fills_one_line() {
        for kind in [
            MemoryKind::System,
            MemoryKind::DevicePrivate,
            MemoryKind::DeviceCoherent,
        ] {
            let p = Page::new(Pfn(0x3_1234_5678), kind, Owner(7));
            assert_eq!(
                (p.pfn(), p.kind(), p.owner()),
                (Pfn(0x3_1234_5678), kind, Owner(7))
            );
            assert_eq!(p.is_device(), kind != MemoryKind::System);
        }
        assert_eq!(std::mem::align_of::<Page>(), 64);
    }

    #[test]
    fn unlock_with_sets_flags_and_wakes_a_waiter() {
        let p = std::sync::Arc::new(Page::new(Pfn(2), MemoryKind::System, Owner(0)));
        p.init_allocated(true);
        let q = p.clone();
        let waiter = std::thread::spawn(move || {
            q.lock();
            let f = q.flags();
            q.unlock();
            f
        });
        // Let the waiter park (it announces itself with WAITERS).
        while !p.test(super::super::page_lock::WAITERS) {
            std::thread::yield_now();
        }
        p.unlock_with(flags::DIRTY | flags::LRU);
        let seen = waiter.join().unwrap();
        assert_eq!(
            seen & (flags::DIRTY | flags::LRU),
            flags::DIRTY | flags::LRU
        );
        assert!(!p.test(flags::LOCKED));
    }

    #[test]
    fn trylock_isolate_takes_a_system_page_off_the_lru_or_changes_nothing() {
        let p = Page::new(Pfn(3), MemoryKind::System, Owner(0));
        p.init_allocated(false);
        assert!(!p.trylock_isolate(), "off the LRU: isolated elsewhere");
        assert_eq!(p.flags(), 0);
        p.set(flags::LRU);
        assert!(p.trylock_isolate());
        assert_eq!(p.flags(), flags::LOCKED | COLLECTED);
        p.set(flags::LRU);
        assert!(!p.trylock_isolate(), "locked");
        assert_eq!(p.flags(), flags::LOCKED | COLLECTED | flags::LRU);
        let d = Page::new(Pfn(4), MemoryKind::DevicePrivate, Owner(1));
        d.init_allocated(false);
        assert!(d.trylock_isolate(), "device pages are on no LRU");
        assert_eq!(d.flags(), flags::LOCKED | COLLECTED);
        d.unlock();
        assert_eq!(d.flags(), 0, "the unlock ends the collection");
    }
}
