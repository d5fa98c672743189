//! `AddressSpace` and `Vma`: mappings, their page tables, and the operations that change
//! them (map, unmap, protect, remap, fork).
//!
//! Lock order, outermost first: the map lock (the VMA tree) -> a VMA's lock -> a page's lock
//! -> a page-table leaf's lock. Under a leaf lock a page lock is only ever *tried*.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetmem_engine::{Pfn, PAGE_SIZE};
use parking_lot::RwLock;

use super::notifier::{NotifyEvent, NotifyRange};
use super::page::{flags, Mapping, Page};
use super::page_addrs;
use super::pagemap::PageMap;
use super::pte::{Leaf, LeafGuard, MigrationKind, Pte, PTRS_PER_LEAF};
use crate::error::{Error, Result};
use crate::mm::{Owner, VirtAddr};

mod fork;
mod invalidate;
mod lock;
mod registry;
mod remap;
mod tables;
mod tree;
mod vma;

pub use invalidate::NotifierId;
use invalidate::Notifiers;
pub(crate) use lock::MapHold;
pub use registry::SpaceId;
pub(crate) use registry::SpaceRegistry;
pub use remap::MremapFlags;
use tables::{leaf_end, LeafTable, LEAF_SPAN};
pub(crate) use tables::{leaf_index, PageTables};
use tree::{any_homed, covered, free_range, overlaps, range_of, split_range};
pub(crate) use tree::{find_vma, pages_end, VmaTree};
pub use vma::{Home, Prot, Vma};

/// Bytes in a page, as a `u64` for address arithmetic.
pub const PAGE: u64 = PAGE_SIZE as u64;
/// Where `mmap` without an address starts looking: above every address the kernel hands
/// this process unasked (48-bit user space on x86-64 and arm64; higher only on request), so
/// a range the space picks never covers one the process maps itself, such as the view of a
/// range mapped for CPU pointers (`Context::alloc_mapped`), which must sit at the same
/// address in both.
const MMAP_BASE: VirtAddr = VirtAddr(1 << 48);
/// One past the highest address a mapping may reach (a 56-bit address space).
const MMAP_TOP: VirtAddr = VirtAddr(1 << 56);

/// Pages whose references an unmap drops in one batch.
const ZAP_BATCH: usize = 4096;

pub(crate) struct SpaceInner {
    pub(crate) id: SpaceId,
    pub(crate) pagemap: Arc<PageMap>,
    pub(crate) map: RwLock<VmaTree>,
    pub(crate) tables: Arc<PageTables>,
    notifiers: RwLock<Notifiers>,
    /// The invalidations running and the latest started (see [`AddressSpace::read_begin`]).
    inval: invalidate::Invalidations,
    /// Where the next `mmap` without an address starts looking.
    next_addr: AtomicU64,
}

/// An address space: mappings, page tables, notifiers. Cloning gives another handle.
#[derive(Clone)]
pub struct AddressSpace {
    pub(crate) inner: Arc<SpaceInner>,
}

impl std::fmt::Debug for AddressSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AddressSpace({})", self.inner.id.0)
    }
}

/// Fails unless `value` (an address or a length) is a whole number of pages.
pub(crate) fn check_aligned(value: u64) -> Result<()> {
    if !value.is_multiple_of(PAGE) {
        Err(Error::Unaligned(value))
    } else {
        Ok(())
    }
}

impl AddressSpace {
    /// An empty address space over `pagemap`.
    pub fn new(pagemap: &Arc<PageMap>) -> AddressSpace {
        let id = SpaceId::next();
        let inner = Arc::new(SpaceInner {
            id,
            pagemap: pagemap.clone(),
            map: RwLock::new(BTreeMap::new()),
            tables: Arc::new(PageTables {
                id,
                leaves: RwLock::new(LeafTable::default()),
            }),
            notifiers: RwLock::new(Arc::new([])),
            inval: invalidate::Invalidations::default(),
            next_addr: AtomicU64::new(MMAP_BASE.get()),
        });
        pagemap
            .spaces()
            .add(id, Arc::downgrade(&inner), inner.tables.clone());
        AddressSpace { inner }
    }

    pub(crate) fn from_inner(inner: Arc<SpaceInner>) -> AddressSpace {
        AddressSpace { inner }
    }

    /// This space's id.
    pub fn id(&self) -> SpaceId {
        self.inner.id
    }

    /// The page map the space's frames come from.
    pub fn pagemap(&self) -> &Arc<PageMap> {
        &self.inner.pagemap
    }

    /// The mapping that covers `addr`.
    ///
    /// `None` also from a notifier called while this thread changes the space's mappings
    /// (the tree is mid-change).
    pub fn vma(&self, addr: VirtAddr) -> Option<Arc<Vma>> {
        let map = self.map_read().ok()?;
        find_vma(&map, addr)
    }

    /// Fails unless `[addr, addr + len)` is page-aligned, non-empty and mapped without gaps.
    pub fn check_range(&self, addr: VirtAddr, len: u64) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        let map = self.map_read()?;
        covered(&map, start, end)
    }

    /// The leaf holding `addr`'s entry, created if `create`.
    pub(crate) fn leaf(&self, addr: VirtAddr, create: bool) -> Option<Arc<Leaf>> {
        self.inner.tables.leaf(addr, create)
    }

    /// Calls `f` with the address and entry of every page of `[start, end)` that is mapped and
    /// has a page-table leaf (cost follows what is mapped and touched, not the range's size).
    pub(crate) fn for_each_entry(
        &self,
        start: VirtAddr,
        end: VirtAddr,
        mut f: impl FnMut(VirtAddr, Pte),
    ) {
        let spans: Vec<(VirtAddr, VirtAddr)> = match self.map_read() {
            Ok(map) => map
                .range(..end)
                .filter(|(_, v)| v.end > start)
                .map(|(_, v)| (v.start.max(start), v.end.min(end)))
                .collect(),
            Err(_) => return,
        };
        for (s, e) in spans {
            let mut a = s;
            while a < e {
                let stop = leaf_end(a).min(e);
                if let Some(leaf) = self.leaf(a, false) {
                    for x in page_addrs(a, stop) {
                        f(x, leaf.get(leaf_index(x)));
                    }
                }
                a = stop;
            }
        }
    }

    /// The entry for `addr`, read atomically.
    pub fn pte(&self, addr: VirtAddr) -> Pte {
        self.leaf(addr, false)
            .map_or(Pte::None, |l| l.get(leaf_index(addr)))
    }

    /// Maps `len` bytes of anonymous memory at `addr` (or, with `None`, at a free range
    /// with a guard page after it), and returns the address.
    pub fn mmap(
        &self,
        addr: Option<VirtAddr>,
        len: u64,
        prot: Prot,
        shared: bool,
    ) -> Result<VirtAddr> {
        if len == 0 {
            return Err(Error::EmptyRange);
        }
        check_aligned(len)?;
        let mut map = self.map_write()?;
        let start =
            match addr {
                Some(a) => {
                    check_aligned(a.get())?;
                    let end = a.checked_add(len).filter(|&e| e <= MMAP_TOP).ok_or(
                        Error::InvalidArgument("range past the top of the address space"),
                    )?;
                    if overlaps(&map, a, end) {
                        return Err(Error::AlreadyMapped(a));
                    }
                    a
                }
                None => {
                    let hint = VirtAddr(self.inner.next_addr.load(Ordering::Relaxed));
                    let a = free_range(&map, hint, len)
                        .or_else(|| free_range(&map, MMAP_BASE, len))
                        .ok_or(Error::NoAddressSpace(len))?;
                    self.inner
                        .next_addr
                        .store((a + len).get().saturating_add(PAGE), Ordering::Relaxed);
                    a
                }
            };
        map.insert(start, Vma::new(start, start + len, prot, shared));
        Ok(start)
    }

    /// Maps `[addr, addr + len)` (private, read-write) as a range whose pages live in fixed
    /// host frames while in host memory, `home` for `addr` onwards: the frames the process's
    /// own mapping of the range shows. Such a mapping is not inherited by [`fork`](Self::fork)
    /// and cannot be moved by `mremap`.
    pub(crate) fn mmap_homed(&self, addr: VirtAddr, len: u64, home: Pfn) -> Result<()> {
        if len == 0 {
            return Err(Error::EmptyRange);
        }
        check_aligned(addr.get())?;
        check_aligned(len)?;
        let end =
            addr.checked_add(len)
                .filter(|&e| e <= MMAP_TOP)
                .ok_or(Error::InvalidArgument(
                    "range past the top of the address space",
                ))?;
        let mut map = self.map_write()?;
        if overlaps(&map, addr, end) {
            return Err(Error::AlreadyMapped(addr));
        }
        let home = Home { addr, pfn: home };
        map.insert(addr, Vma::with_home(addr, end, Prot::RW, false, Some(home)));
        Ok(())
    }

    /// Unmaps `[addr, addr + len)`, splitting mappings at its edges; pages of every state are
    /// released (device pages through their pagemap's `page_free`). Waits for migrations and
    /// faults in the space to finish; a migration entry of a device-side migration (eviction)
    /// is simply dropped, and that migration finds nothing to put back there.
    ///
    /// A range mapped for CPU pointers (`Context::alloc_mapped`) is refused: it goes with its
    /// buffer.
    pub fn munmap(&self, addr: VirtAddr, len: u64) -> Result<()> {
        self.munmap_checked(addr, len, false)
    }

    /// `munmap`, of CPU-mapped ranges too if `homed`.
    pub(crate) fn munmap_checked(&self, addr: VirtAddr, len: u64, homed: bool) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        let mut map = self.map_write()?;
        if !homed && any_homed(&map, start, end) {
            return Err(Error::InvalidArgument(
                "the range is mapped for CPU pointers: free its buffer instead",
            ));
        }
        // As the kernel's munmap does: the doomed VMAs leave the tree under the exclusive
        // lock (no fault or migration finds them from here on), and the notifiers and the
        // zap run under the lock held shared. So a notifier of this unmap that touches
        // CPU-mapped memory elsewhere in the space can be served (the fault path takes the
        // lock shared), while no other change of mappings reuses the range before it is clear.
        let doomed: Vec<Arc<Vma>> = split_range(&mut map, start, end)
            .into_iter()
            .map(|k| map.remove(&k).expect("listed by split_range"))
            .collect();
        let _hold = map.downgrade();
        let _inv = self.invalidate(NotifyRange {
            start,
            end,
            event: NotifyEvent::Unmap,
            owner: Owner::NONE,
        });
        for v in doomed {
            self.zap_range(v.start, v.end);
        }
        Ok(())
    }

    /// `munmap` under the exclusive map lock.
    fn unmap_locked(&self, map: &mut VmaTree, start: VirtAddr, end: VirtAddr) {
        let doomed = split_range(map, start, end);
        let _inv = self.invalidate(NotifyRange {
            start,
            end,
            event: NotifyEvent::Unmap,
            owner: Owner::NONE,
        });
        for k in doomed {
            let v = map.remove(&k).expect("listed above");
            self.zap_range(v.start, v.end);
        }
    }

    /// Changes the protection of `[addr, addr + len)`; every part must be mapped. Entries of
    /// a range made read-only lose their write bit, migration entries included (so a page
    /// that a device-side migration restores or replaces comes back read-only).
    ///
    /// A range mapped for CPU pointers is refused (`Buffer::set_read_only` changes one).
    pub fn mprotect(&self, addr: VirtAddr, len: u64, prot: Prot) -> Result<()> {
        self.mprotect_checked(addr, len, prot, false)
    }

    /// `mprotect`, of CPU-mapped ranges too if `homed`.
    pub(crate) fn mprotect_checked(
        &self,
        addr: VirtAddr,
        len: u64,
        prot: Prot,
        homed: bool,
    ) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        let mut map = self.map_write()?;
        covered(&map, start, end)?;
        if !homed && any_homed(&map, start, end) {
            return Err(Error::InvalidArgument(
                "the range is mapped for CPU pointers: use its buffer",
            ));
        }
        let keys = split_range(&mut map, start, end);
        let _inv = self.invalidate(NotifyRange {
            start,
            end,
            event: NotifyEvent::Protect,
            owner: Owner::NONE,
        });
        for k in keys {
            let old = map.get(&k).expect("listed above").clone();
            map.insert(k, old.part(old.start, old.end, prot));
            if !prot.write {
                self.write_protect(old.start, old.end, old.shared);
            }
        }
        Ok(())
    }

    /// The page an entry maps and holds in its reverse map (not the zero page).
    pub(crate) fn mapped_page(&self, pte: Pte) -> Option<&Page> {
        let p = self.pagemap().page(pte.pfn()?)?;
        (!p.test(flags::ZERO)).then_some(p)
    }

    /// [`PageTables::install`] in this space's tables.
    pub(crate) fn install(
        &self,
        g: &LeafGuard<'_>,
        i: usize,
        addr: VirtAddr,
        pte: Pte,
        page: &Page,
        take_ref: bool,
    ) {
        self.inner.tables.install(g, i, addr, pte, page, take_ref)
    }

    /// Clears every entry of `[start, end)`, releasing what they map. Each entry and its
    /// page's reverse mapping go together under the leaf's lock; references are dropped after.
    fn zap_range(&self, start: VirtAddr, end: VirtAddr) {
        // References are dropped in batches: frames go back to the pool together, in an
        // order that later page-by-page allocations take as ascending runs.
        let pm = self.pagemap().clone();
        let mut released: Vec<&Page> = Vec::new();
        let mut addr = start;
        while addr < end {
            let stop = leaf_end(addr).min(end);
            if let Some(leaf) = self.leaf(addr, false) {
                let g = leaf.lock();
                for a in page_addrs(addr, stop) {
                    let i = leaf_index(a);
                    let pte = g.get(i);
                    if pte == Pte::None {
                        continue;
                    }
                    g.set(i, Pte::None);
                    if let Some(p) = self.mapped_page(pte) {
                        p.remove_rmap(Mapping {
                            space: self.id(),
                            addr: a,
                        });
                        // A migration entry holds no reference: the migration holds its own.
                        if !matches!(pte, Pte::Migration { .. }) {
                            released.push(p);
                        }
                    }
                }
            }
            if released.len() >= ZAP_BATCH {
                pm.put_pages(&released);
                released.clear();
            }
            addr = stop;
        }
        pm.put_pages(&released);
    }

    /// Takes the write bit from every entry of `[start, end)`; a writable migration entry
    /// becomes a read-only one (exclusive in a private mapping, where writable meant
    /// exclusive).
    fn write_protect(&self, start: VirtAddr, end: VirtAddr, shared: bool) {
        let mut addr = start;
        while addr < end {
            let stop = leaf_end(addr).min(end);
            if let Some(leaf) = self.leaf(addr, false) {
                let g = leaf.lock();
                for a in page_addrs(addr, stop) {
                    let i = leaf_index(a);
                    match g.get(i) {
                        Pte::Present {
                            pfn,
                            write: true,
                            dirty,
                            young,
                        } => {
                            if dirty {
                                if let Some(p) = self.mapped_page(g.get(i)) {
                                    p.set(flags::DIRTY);
                                }
                            }
                            g.set(
                                i,
                                Pte::Present {
                                    pfn,
                                    write: false,
                                    dirty,
                                    young,
                                },
                            )
                        }
                        Pte::DevicePrivate { pfn, write: true } => {
                            g.set(i, Pte::DevicePrivate { pfn, write: false })
                        }
                        Pte::Migration {
                            pfn,
                            kind: MigrationKind::Write,
                            young,
                            dirty,
                        } => g.set(
                            i,
                            Pte::Migration {
                                pfn,
                                kind: if shared {
                                    MigrationKind::Read
                                } else {
                                    MigrationKind::ReadExclusive
                                },
                                young,
                                dirty,
                            },
                        ),
                        _ => {}
                    }
                }
            }
            addr = stop;
        }
    }
}

impl Drop for SpaceInner {
    /// Releases every entry: mirrors are told, pages lose this space's mappings. Entries are
    /// cleared under their leaves' locks: until this space leaves the page map's registry, a
    /// migration's reverse-map walk may still reach them through [`PageTables`] (restoring
    /// or replacing a migration entry here before the teardown clears it).
    fn drop(&mut self) {
        let ranges: Vec<NotifyRange> = self
            .map
            .get_mut()
            .values()
            .map(|v| NotifyRange {
                start: v.start,
                end: v.end,
                event: NotifyEvent::Release,
                owner: Owner::NONE,
            })
            .collect();
        for range in ranges {
            let seq = self.invalidate_start(&range, false);
            self.invalidate_end(&range, seq);
        }
        let pm = self.pagemap.clone();
        let leaves: Vec<(u64, Arc<Leaf>)> = self
            .tables
            .leaves
            .read()
            .iter()
            .map(|(&k, l)| (k, l.clone()))
            .collect();
        let mut released: Vec<&Page> = Vec::with_capacity(PTRS_PER_LEAF);
        for (key, leaf) in leaves {
            let g = leaf.lock();
            for i in 0..PTRS_PER_LEAF {
                let pte = g.get(i);
                let Some(pfn) = pte.pfn() else { continue };
                g.set(i, Pte::None);
                let Some(p) = pm.page(pfn) else {
                    continue;
                };
                if p.test(flags::ZERO) {
                    continue;
                }
                p.remove_rmap(Mapping {
                    space: self.id,
                    addr: VirtAddr(key * LEAF_SPAN + i as u64 * PAGE),
                });
                if !matches!(pte, Pte::Migration { .. }) {
                    released.push(p);
                }
            }
            drop(g);
            // One batch per leaf (see `zap_range`).
            pm.put_pages(&released);
            released.clear();
        }
        drop(released);
        self.pagemap.spaces().remove(self.id);
    }
}

/// Copies one frame's bytes to another (both CPU-accessible).
pub(crate) fn copy_frame(pm: &PageMap, from: Pfn, to: Pfn) -> Result<()> {
    let mut buf = vec![0u8; PAGE_SIZE];
    pm.access(from)
        .ok_or(Error::UnknownPfn(from))?
        .read(from, 0, &mut buf)?;
    pm.access(to)
        .ok_or(Error::UnknownPfn(to))?
        .write(to, 0, &buf)?;
    Ok(())
}
