//! `Page`: the metadata of one frame (a host frame or a device page), as the kernel's
//! `struct page` keeps it: reference, map and pin counts, flags, memory kind, owner.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};

use hetmem_engine::Pfn;

use super::space::SpaceId;

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
    pub const LOCKED: u32 = 1 << 0;
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
    /// Someone sleeps waiting for the page lock (unlock must wake them).
    pub const WAITERS: u32 = 1 << 7;
}

/// One place a page is mapped: an address space and a virtual address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    /// The address space.
    pub space: SpaceId,
    /// The page-aligned virtual address.
    pub addr: u64,
}

/// Metadata of one frame.
#[derive(Debug)]
pub struct Page {
    pfn: Pfn,
    kind: MemoryKind,
    owner: u64,
    refcount: AtomicU32,
    pincount: AtomicU32,
    mapcount: AtomicI32,
    flags: AtomicU32,
    driver_data: AtomicU64,
    rmap: RmapCell,
}

/// The reverse map behind a spin lock: its critical sections are a few loads and stores, and
/// releasing it is one plain store (a mutex's release is another locked instruction, which
/// on a migration's path costs as much as the work it protects).
#[derive(Debug, Default)]
struct RmapCell {
    locked: AtomicBool,
    rmap: UnsafeCell<Rmap>,
}

// SAFETY: the rmap is only reached through `RmapCell::lock`, which gives one thread at a
// time exclusive access.
unsafe impl Sync for RmapCell {}

impl RmapCell {
    fn lock(&self) -> RmapGuard<'_> {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        RmapGuard { cell: self }
    }
}

struct RmapGuard<'a> {
    cell: &'a RmapCell,
}

impl std::ops::Deref for RmapGuard<'_> {
    type Target = Rmap;
    fn deref(&self) -> &Rmap {
        // SAFETY: the guard holds the lock, so no other thread touches the rmap.
        unsafe { &*self.cell.rmap.get() }
    }
}

impl std::ops::DerefMut for RmapGuard<'_> {
    fn deref_mut(&mut self) -> &mut Rmap {
        // SAFETY: as for `deref`; the guard is the only way in while it lives.
        unsafe { &mut *self.cell.rmap.get() }
    }
}

impl Drop for RmapGuard<'_> {
    fn drop(&mut self) {
        self.cell.locked.store(false, Ordering::Release);
    }
}

/// Where a page is mapped: the first mapping inline (the common case allocates nothing),
/// further ones (after fork) in a vector.
#[derive(Debug, Default)]
struct Rmap {
    first: Option<Mapping>,
    rest: Vec<Mapping>,
}

impl Rmap {
    fn push(&mut self, m: Mapping) {
        if self.first.is_none() {
            self.first = Some(m);
        } else {
            self.rest.push(m);
        }
    }
    fn remove(&mut self, m: Mapping) -> bool {
        if self.first == Some(m) {
            self.first = self.rest.pop();
            return true;
        }
        match self.rest.iter().position(|&x| x == m) {
            Some(i) => {
                self.rest.swap_remove(i);
                true
            }
            None => false,
        }
    }
    fn to_vec(&self) -> Vec<Mapping> {
        self.first.iter().chain(&self.rest).copied().collect()
    }
    fn clear(&mut self) {
        self.first = None;
        self.rest.clear();
    }
}

impl Page {
    pub(crate) fn new(pfn: Pfn, kind: MemoryKind, owner: u64) -> Page {
        Page {
            pfn,
            kind,
            owner,
            refcount: AtomicU32::new(0),
            pincount: AtomicU32::new(0),
            mapcount: AtomicI32::new(0),
            flags: AtomicU32::new(0),
            driver_data: AtomicU64::new(0),
            rmap: RmapCell::default(),
        }
    }

    /// The frame number.
    pub fn pfn(&self) -> Pfn {
        self.pfn
    }
    /// The memory kind.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// True for device-private and device-coherent pages.
    pub fn is_device(&self) -> bool {
        self.kind != MemoryKind::System
    }
    /// The owner of the device pagemap this page belongs to (0 for system pages).
    pub fn owner(&self) -> u64 {
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
        self.mapcount.load(Ordering::Acquire)
    }
    /// The flag word (see [`flags`]).
    pub fn flags(&self) -> u32 {
        self.flags.load(Ordering::Acquire)
    }
    /// True if all bits of `f` are set.
    pub fn test(&self, f: u32) -> bool {
        self.flags() & f == f
    }
    /// Sets flag bits.
    pub fn set(&self, f: u32) {
        self.flags.fetch_or(f, Ordering::AcqRel);
    }
    /// Clears flag bits.
    pub fn clear(&self, f: u32) {
        self.flags.fetch_and(!f, Ordering::AcqRel);
    }
    /// Clears flag bits, returning whether all were set.
    pub fn test_and_clear(&self, f: u32) -> bool {
        self.flags.fetch_and(!f, Ordering::AcqRel) & f == f
    }
    /// The driver's word for this page.
    pub fn driver_data(&self) -> u64 {
        self.driver_data.load(Ordering::Acquire)
    }
    /// Sets the driver's word.
    pub fn set_driver_data(&self, v: u64) {
        self.driver_data.store(v, Ordering::Release)
    }

    /// Takes a reference.
    pub fn get(&self) {
        self.refcount.fetch_add(1, Ordering::AcqRel);
    }
    /// Takes a reference unless the page is free (refcount zero).
    pub fn try_get(&self) -> bool {
        let mut c = self.refcount.load(Ordering::Acquire);
        loop {
            if c == 0 {
                return false;
            }
            match self
                .refcount
                .compare_exchange_weak(c, c + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => c = now,
            }
        }
    }
    /// Drops a reference; returns true if it was the last one (the caller frees the page).
    pub(crate) fn put_ref(&self) -> bool {
        let old = self.refcount.fetch_sub(1, Ordering::AcqRel);
        assert!(old > 0, "reference dropped on free page {}", self.pfn);
        old == 1
    }
    /// If the caller holds the page's lock and its only reference, drops both at once (one
    /// locked instruction instead of an unlock and a put) and returns true: the page is then
    /// free with clear flags, for [`crate::mm::PageMap`] to give back. Otherwise changes
    /// nothing and returns false.
    pub(crate) fn release_if_last(&self) -> bool {
        if self
            .refcount
            .compare_exchange(1, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Nobody else holds a reference, so nobody waits for the lock or changes the flags.
        debug_assert_eq!(self.mapcount(), 0, "releasing mapped page {}", self.pfn);
        self.flags.store(0, Ordering::Release);
        true
    }

    /// Makes a free page live with one reference and clean flags.
    pub(crate) fn init_allocated(&self, locked: bool) {
        self.flags
            .store(if locked { flags::LOCKED } else { 0 }, Ordering::Release);
        self.driver_data.store(0, Ordering::Release);
        self.pincount.store(0, Ordering::Release);
        let mut r = self.rmap.lock();
        r.clear();
        self.mapcount.store(0, Ordering::Release);
        drop(r);
        self.refcount.store(1, Ordering::Release);
    }

    /// Adds a pin (the caller holds a reference for it).
    pub fn add_pin(&self) {
        self.pincount.fetch_add(1, Ordering::AcqRel);
    }
    /// Removes a pin (the caller then drops its reference).
    pub fn remove_pin(&self) {
        self.pincount.fetch_sub(1, Ordering::AcqRel);
    }

    /// Records a mapping of the page.
    pub(crate) fn add_rmap(&self, m: Mapping) {
        let mut r = self.rmap.lock();
        r.push(m);
        // Every change of the map count happens under the rmap lock: no locked add needed.
        self.mapcount
            .store(self.mapcount.load(Ordering::Relaxed) + 1, Ordering::Release);
    }
    /// Forgets a mapping of the page; false if it was not recorded.
    pub(crate) fn remove_rmap(&self, m: Mapping) -> bool {
        let mut r = self.rmap.lock();
        let removed = r.remove(m);
        if removed {
            self.mapcount
                .store(self.mapcount.load(Ordering::Relaxed) - 1, Ordering::Release);
        }
        removed
    }
    /// Every place the page is mapped (or held by a migration entry).
    pub fn mappings(&self) -> Vec<Mapping> {
        self.rmap.lock().to_vec()
    }
    /// Forgets mapping `m` if it is the page's only one; false (and nothing changed) otherwise.
    pub(crate) fn take_sole_rmap(&self, m: Mapping) -> bool {
        let mut r = self.rmap.lock();
        if r.rest.is_empty() && r.first == Some(m) {
            r.first = None;
            self.mapcount
                .store(self.mapcount.load(Ordering::Relaxed) - 1, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// The page's mapping if it has exactly one.
    pub fn sole_mapping(&self) -> Option<Mapping> {
        let r = self.rmap.lock();
        if r.rest.is_empty() {
            r.first
        } else {
            None
        }
    }

    /// Tries to lock the page without waiting.
    pub fn trylock(&self) -> bool {
        self.flags.fetch_or(flags::LOCKED, Ordering::AcqRel) & flags::LOCKED == 0
    }

    /// Tries to lock the page and, for a system page, take it off the LRU, in one step:
    /// false (nothing changed) if it is locked, or is a system page off the LRU (isolated by
    /// someone else).
    pub(crate) fn trylock_isolate(&self) -> bool {
        let lru = if self.kind == MemoryKind::System {
            flags::LRU
        } else {
            0
        };
        let mut was = self.flags.load(Ordering::Relaxed);
        loop {
            if was & flags::LOCKED != 0 || was & lru != lru {
                return false;
            }
            match self.flags.compare_exchange_weak(
                was,
                (was | flags::LOCKED) & !lru,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => was = seen,
            }
        }
    }

    /// Locks the page, sleeping (not spinning) while another holder has it.
    pub fn lock(&self) {
        while !self.trylock() {
            self.park_while_locked();
        }
    }

    /// Sleeps until an unlock, unless the page is unlocked already. The waiter announces
    /// itself with `WAITERS` under the wait queue's lock, so `unlock` knows to wake it.
    fn park_while_locked(&self) {
        let key = self as *const Page as usize;
        // SAFETY: the key is this page's address, used only as a wait-queue key; the
        // validate callback runs under the queue's lock and re-checks the lock bit after
        // setting WAITERS, so a wake-up between our check and parking is not lost.
        unsafe {
            parking_lot_core::park(
                key,
                || self.flags.fetch_or(flags::WAITERS, Ordering::AcqRel) & flags::LOCKED != 0,
                || {},
                |_, _| {},
                parking_lot_core::DEFAULT_PARK_TOKEN,
                None,
            );
        }
    }

    /// Unlocks the page and wakes every waiter (only if some announced themselves).
    pub fn unlock(&self) {
        let was = self
            .flags
            .fetch_and(!(flags::LOCKED | flags::WAITERS), Ordering::AcqRel);
        debug_assert!(
            was & flags::LOCKED != 0,
            "unlock of unlocked page {}",
            self.pfn
        );
        if was & flags::WAITERS != 0 {
            let key = self as *const Page as usize;
            // SAFETY: waking threads parked on this page's key has no other effect.
            unsafe { parking_lot_core::unpark_all(key, parking_lot_core::DEFAULT_UNPARK_TOKEN) };
        }
    }

    /// Sets flag bits and unlocks the page in one step, waking every waiter (as
    /// [`Page::unlock`]).
    pub fn unlock_with(&self, f: u32) {
        let mut was = self.flags.load(Ordering::Relaxed);
        loop {
            let now = (was | f) & !(flags::LOCKED | flags::WAITERS);
            match self
                .flags
                .compare_exchange_weak(was, now, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => was = seen,
            }
        }
        debug_assert!(
            was & flags::LOCKED != 0,
            "unlock of unlocked page {}",
            self.pfn
        );
        if was & flags::WAITERS != 0 {
            let key = self as *const Page as usize;
            // SAFETY: waking threads parked on this page's key has no other effect.
            unsafe { parking_lot_core::unpark_all(key, parking_lot_core::DEFAULT_UNPARK_TOKEN) };
        }
    }

    /// Waits until the page is unlocked (without taking the lock).
    pub fn wait_unlocked(&self) {
        if self.test(flags::LOCKED) {
            self.park_while_locked();
        }
    }
}
