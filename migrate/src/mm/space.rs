//! `AddressSpace` and `Vma`: mappings, their page tables, and the operations that change
//! them (map, unmap, protect, remap, fork).
//!
//! Lock order, outermost first: the map lock (the VMA tree) -> a VMA's lock -> a page's lock
//! -> a page-table leaf's lock. Under a leaf lock a page lock is only ever *tried*.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetmem_engine::{Pfn, PAGE_SIZE};
use parking_lot::{Mutex, RwLock, RwLockReadGuard};

use super::notifier::{Notifier, NotifyEvent, NotifyRange};
use super::page::{flags, Mapping, Page};
use super::pagemap::PageMap;
use super::pte::{Leaf, LeafGuard, MigrationKind, Pte, PTRS_PER_LEAF};
use crate::error::{Error, Result};

/// Bytes in a page, as a `u64` for address arithmetic.
pub const PAGE: u64 = PAGE_SIZE as u64;
const LEAF_SPAN: u64 = PAGE * PTRS_PER_LEAF as u64;
/// Where `mmap` without an address starts looking.
const MMAP_BASE: u64 = 0x7f00_0000_0000;

/// Pages whose references an unmap drops in one batch.
const ZAP_BATCH: usize = 4096;

/// Identifies an address space (for reverse mappings and notifier callbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpaceId(pub u64);

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// No access.
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
}

/// One mapping: an anonymous range, private (copy-on-write after fork) or shared.
#[derive(Debug)]
pub struct Vma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Allowed access.
    pub prot: Prot,
    /// Shared between forked spaces (no copy-on-write).
    pub shared: bool,
    /// Taken by migration walks, so that no fault populates the range behind them.
    pub(crate) lock: Mutex<()>,
}

impl Vma {
    fn new(start: u64, end: u64, prot: Prot, shared: bool) -> Arc<Vma> {
        Arc::new(Vma {
            start,
            end,
            prot,
            shared,
            lock: Mutex::new(()),
        })
    }
    /// True if the mapping is anonymous (every mapping hetmem makes is).
    pub fn is_anonymous(&self) -> bool {
        true
    }
}

/// The VMA tree, keyed by start address.
pub(crate) type VmaTree = BTreeMap<u64, Arc<Vma>>;

static NEXT_SPACE: AtomicU64 = AtomicU64::new(1);

/// Hashes leaf numbers (already well spread) with one multiplication.
#[derive(Default, Clone, Copy)]
pub(crate) struct LeafHasher(u64);

impl std::hash::Hasher for LeafHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type LeafTable = HashMap<u64, Arc<Leaf>, std::hash::BuildHasherDefault<LeafHasher>>;

pub(crate) struct SpaceInner {
    pub(crate) id: SpaceId,
    pub(crate) pagemap: Arc<PageMap>,
    pub(crate) map: RwLock<VmaTree>,
    tables: RwLock<LeafTable>,
    notifiers: RwLock<Vec<Arc<dyn Notifier>>>,
    seq: AtomicU64,
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

pub(crate) fn check_aligned(addr: u64) -> Result<()> {
    if !addr.is_multiple_of(PAGE) {
        Err(Error::Unaligned(addr))
    } else {
        Ok(())
    }
}

impl AddressSpace {
    /// An empty address space over `pagemap`.
    pub fn new(pagemap: &Arc<PageMap>) -> AddressSpace {
        let id = SpaceId(NEXT_SPACE.fetch_add(1, Ordering::Relaxed));
        let inner = Arc::new(SpaceInner {
            id,
            pagemap: pagemap.clone(),
            map: RwLock::new(BTreeMap::new()),
            tables: RwLock::new(LeafTable::default()),
            notifiers: RwLock::new(Vec::new()),
            seq: AtomicU64::new(0),
            next_addr: AtomicU64::new(MMAP_BASE),
        });
        pagemap.add_space(id, Arc::downgrade(&inner));
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

    /// Registers a notifier for every invalidation of this space.
    pub fn register_notifier(&self, n: Arc<dyn Notifier>) {
        self.inner.notifiers.write().push(n);
    }

    /// The invalidation sequence number: it changes whenever any range is invalidated, so a
    /// mirror that read it before a snapshot can tell whether to retry.
    pub fn invalidate_seq(&self) -> u64 {
        self.inner.seq.load(Ordering::Acquire)
    }

    /// Runs the notifiers for `range`.
    pub(crate) fn notify(&self, range: NotifyRange) {
        self.inner.seq.fetch_add(1, Ordering::AcqRel);
        for n in self.inner.notifiers.read().iter() {
            n.invalidate(self.inner.id, &range);
        }
    }

    /// Ends an invalidation started with `notify`.
    pub(crate) fn notify_end(&self, range: NotifyRange) {
        for n in self.inner.notifiers.read().iter() {
            n.invalidate_end(self.inner.id, &range);
        }
    }

    /// The map lock, shared (faults, migrations, CPU access).
    pub(crate) fn map_read(&self) -> RwLockReadGuard<'_, VmaTree> {
        self.inner.map.read_recursive()
    }

    /// The mapping that covers `addr`.
    pub fn vma(&self, addr: u64) -> Option<Arc<Vma>> {
        find_vma(&self.map_read(), addr)
    }

    /// Fails unless `[addr, addr + len)` is page-aligned, non-empty and mapped without gaps.
    pub fn check_range(&self, addr: u64, len: u64) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        covered(&self.map_read(), start, end)
    }

    /// The leaf holding `addr`'s entry, created if `create`.
    pub(crate) fn leaf(&self, addr: u64, create: bool) -> Option<Arc<Leaf>> {
        let key = addr / LEAF_SPAN;
        if let Some(l) = self.inner.tables.read().get(&key) {
            return Some(l.clone());
        }
        if !create {
            return None;
        }
        Some(self.inner.tables.write().entry(key).or_default().clone())
    }

    /// The entry for `addr`, read atomically.
    pub fn pte(&self, addr: u64) -> Pte {
        self.leaf(addr, false)
            .map_or(Pte::None, |l| l.get(leaf_index(addr)))
    }

    /// Maps `len` bytes of anonymous memory at `addr` (or where there is room), and returns
    /// the address.
    pub fn mmap(&self, addr: Option<u64>, len: u64, prot: Prot, shared: bool) -> Result<u64> {
        if len == 0 {
            return Err(Error::EmptyRange);
        }
        check_aligned(len)?;
        let mut map = self.inner.map.write();
        let start = match addr {
            Some(a) => {
                check_aligned(a)?;
                a
            }
            None => self
                .inner
                .next_addr
                .fetch_add(len + PAGE, Ordering::Relaxed),
        };
        let end = start
            .checked_add(len)
            .ok_or(Error::InvalidArgument("range wraps"))?;
        if map
            .range(..end)
            .next_back()
            .is_some_and(|(_, v)| v.end > start)
        {
            return Err(Error::AlreadyMapped(start));
        }
        map.insert(start, Vma::new(start, end, prot, shared));
        Ok(start)
    }

    /// Unmaps `[addr, addr + len)`, splitting mappings at its edges; pages of every state are
    /// released (device pages through their pagemap's `page_free`).
    pub fn munmap(&self, addr: u64, len: u64) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        let mut map = self.inner.map.write();
        split_at(&mut map, start);
        split_at(&mut map, end);
        let doomed: Vec<u64> = map.range(start..end).map(|(&k, _)| k).collect();
        let range = NotifyRange {
            start,
            end,
            event: NotifyEvent::Unmap,
            owner: 0,
        };
        self.notify(range);
        for k in doomed {
            let v = map.remove(&k).expect("listed above");
            self.zap_range(v.start, v.end);
        }
        self.notify_end(range);
        Ok(())
    }

    /// Changes the protection of `[addr, addr + len)`; every part must be mapped. Entries of
    /// a range made read-only lose their write bit.
    pub fn mprotect(&self, addr: u64, len: u64, prot: Prot) -> Result<()> {
        let (start, end) = range_of(addr, len)?;
        let mut map = self.inner.map.write();
        covered(&map, start, end)?;
        split_at(&mut map, start);
        split_at(&mut map, end);
        let keys: Vec<u64> = map.range(start..end).map(|(&k, _)| k).collect();
        let range = NotifyRange {
            start,
            end,
            event: NotifyEvent::Protect,
            owner: 0,
        };
        self.notify(range);
        for k in keys {
            let old = map.get(&k).expect("listed above").clone();
            map.insert(k, Vma::new(old.start, old.end, prot, old.shared));
            if !prot.write {
                self.write_protect(old.start, old.end);
            }
        }
        self.notify_end(range);
        Ok(())
    }

    /// Moves the mapping `[old, old + len)` to `new` (which must be unmapped), with its
    /// entries in whatever state they are.
    pub fn mremap(&self, old: u64, len: u64, new: u64) -> Result<()> {
        let (start, end) = range_of(old, len)?;
        check_aligned(new)?;
        let mut map = self.inner.map.write();
        covered(&map, start, end)?;
        let new_end = new
            .checked_add(len)
            .ok_or(Error::InvalidArgument("range wraps"))?;
        if map
            .range(..new_end)
            .next_back()
            .is_some_and(|(_, v)| v.end > new)
        {
            return Err(Error::AlreadyMapped(new));
        }
        split_at(&mut map, start);
        split_at(&mut map, end);
        let range = NotifyRange {
            start,
            end,
            event: NotifyEvent::Remap,
            owner: 0,
        };
        self.notify(range);
        let keys: Vec<u64> = map.range(start..end).map(|(&k, _)| k).collect();
        for k in keys {
            let v = map.remove(&k).expect("listed above");
            let to = new + (v.start - start);
            map.insert(to, Vma::new(to, to + (v.end - v.start), v.prot, v.shared));
        }
        let mut addr = start;
        while addr < end {
            let to = new + (addr - start);
            if let Some(src) = self.leaf(addr, false) {
                // The page's reverse map gains the new address before the entry moves and
                // loses the old one after: its map count never undercounts the entries that
                // map it (a migration finishing elsewhere trusts a count of one).
                let g = src.lock();
                let pte = g.get(leaf_index(addr));
                let page = self.mapped_page(pte);
                if pte != Pte::None {
                    if let Some(p) = page {
                        p.add_rmap(Mapping {
                            space: self.id(),
                            addr: to,
                        });
                    }
                    g.set(leaf_index(addr), Pte::None);
                    drop(g);
                    let dst = self.leaf(to, true).expect("created");
                    dst.lock().set(leaf_index(to), pte);
                    if let Some(p) = page {
                        p.remove_rmap(Mapping {
                            space: self.id(),
                            addr,
                        });
                    }
                }
            }
            addr += PAGE;
        }
        self.notify_end(range);
        Ok(())
    }

    /// A copy of this space: private anonymous pages are shared copy-on-write (both sides
    /// read-only, no longer anon-exclusive) except pinned ones, which the child gets a copy
    /// of; shared mappings stay shared; device-private entries are shared read-only.
    pub fn fork(&self) -> Result<AddressSpace> {
        let child = AddressSpace::new(self.pagemap());
        let map = self.inner.map.write();
        let mut cmap = child.inner.map.write();
        for (&k, v) in map.iter() {
            cmap.insert(k, Vma::new(v.start, v.end, v.prot, v.shared));
            let range = NotifyRange {
                start: v.start,
                end: v.end,
                event: NotifyEvent::Protect,
                owner: 0,
            };
            self.notify(range);
            let mut addr = v.start;
            let mut done = Ok(());
            while addr < v.end && done.is_ok() {
                done = self.fork_one(&child, v, addr);
                addr += PAGE;
            }
            self.notify_end(range);
            done?;
        }
        drop(cmap);
        Ok(child)
    }

    fn fork_one(&self, child: &AddressSpace, v: &Vma, addr: u64) -> Result<()> {
        let Some(leaf) = self.leaf(addr, false) else {
            return Ok(());
        };
        let i = leaf_index(addr);
        let g = leaf.lock();
        let pte = g.get(i);
        let cleaf = child.leaf(addr, true).expect("created");
        let cg = cleaf.lock();
        let pm = self.pagemap();
        match pte {
            Pte::None | Pte::Swap { .. } => {}
            Pte::Migration {
                pfn,
                kind,
                young,
                dirty,
            } => {
                // A page under migration is shared like a mapped one: the child gets the
                // entry too (read-only if private), recorded in the reverse map so that
                // finalize points it at the destination or restores it. Migration entries
                // hold no reference: the migration holds its own.
                let page = pm.page_or_err(pfn)?;
                let kind = if v.shared {
                    kind
                } else {
                    page.clear(flags::ANON_EXCLUSIVE);
                    MigrationKind::Read
                };
                let entry = Pte::Migration {
                    pfn,
                    kind,
                    young,
                    dirty,
                };
                g.set(i, entry);
                page.add_rmap(Mapping {
                    space: child.id(),
                    addr,
                });
                cg.set(i, entry);
            }
            Pte::Present {
                pfn,
                write,
                dirty,
                young,
            } => {
                let page = pm.page_or_err(pfn)?;
                if page.test(flags::ZERO) {
                    cg.set(i, pte);
                } else if !v.shared && page.pincount() > 0 {
                    // A pinned page cannot be shared: the child gets its own copy.
                    let copy = pm.alloc_system(false, false)?;
                    copy_frame(pm, pfn, copy.pfn())?;
                    copy.set(
                        flags::ANON_EXCLUSIVE | flags::LRU | if dirty { flags::DIRTY } else { 0 },
                    );
                    child.install(
                        &cg,
                        i,
                        addr,
                        Pte::Present {
                            pfn: copy.pfn(),
                            write,
                            dirty,
                            young,
                        },
                        copy,
                        false,
                    );
                } else {
                    let cow = !v.shared;
                    if cow {
                        page.clear(flags::ANON_EXCLUSIVE);
                        g.set(
                            i,
                            Pte::Present {
                                pfn,
                                write: false,
                                dirty,
                                young,
                            },
                        );
                    }
                    if dirty {
                        page.set(flags::DIRTY);
                    }
                    child.install(
                        &cg,
                        i,
                        addr,
                        Pte::Present {
                            pfn,
                            write: write && !cow,
                            dirty,
                            young,
                        },
                        page,
                        true,
                    );
                }
            }
            Pte::DevicePrivate { pfn, write } => {
                let page = pm.page_or_err(pfn)?;
                let cow = !v.shared;
                if cow {
                    page.clear(flags::ANON_EXCLUSIVE);
                    g.set(i, Pte::DevicePrivate { pfn, write: false });
                }
                child.install(
                    &cg,
                    i,
                    addr,
                    Pte::DevicePrivate {
                        pfn,
                        write: write && !cow,
                    },
                    page,
                    true,
                );
            }
        }
        Ok(())
    }

    /// The page an entry maps and holds in its reverse map (not the zero page).
    pub(crate) fn mapped_page(&self, pte: Pte) -> Option<&Page> {
        let p = self.pagemap().page(pte.pfn()?)?;
        (!p.test(flags::ZERO)).then_some(p)
    }

    /// Sets entry `i` of a locked leaf to map `page` at `addr`: records the mapping and,
    /// with `take_ref`, a reference (an allocation's own reference is otherwise handed over).
    pub(crate) fn install(
        &self,
        g: &LeafGuard<'_>,
        i: usize,
        addr: u64,
        pte: Pte,
        page: &Page,
        take_ref: bool,
    ) {
        if take_ref {
            page.get();
        }
        page.add_rmap(Mapping {
            space: self.id(),
            addr,
        });
        g.set(i, pte);
    }

    /// Clears every entry of `[start, end)`, releasing what they map.
    fn zap_range(&self, start: u64, end: u64) {
        // References are dropped in batches: frames go back to the pool together, in an
        // order that later page-by-page allocations take as ascending runs.
        let pm = self.pagemap().clone();
        let mut released: Vec<&Page> = Vec::new();
        let mut addr = start;
        while addr < end {
            if let Some(leaf) = self.leaf(addr, false) {
                let g = leaf.lock();
                let i = leaf_index(addr);
                let pte = g.get(i);
                g.set(i, Pte::None);
                drop(g);
                if let Some(p) = self.mapped_page(pte) {
                    p.remove_rmap(Mapping {
                        space: self.id(),
                        addr,
                    });
                    // A migration entry holds no reference: the migration holds its own.
                    if !matches!(pte, Pte::Migration { .. }) {
                        released.push(p);
                        if released.len() == ZAP_BATCH {
                            pm.put_pages(&released);
                            released.clear();
                        }
                    }
                }
            }
            addr += PAGE;
        }
        pm.put_pages(&released);
    }

    fn write_protect(&self, start: u64, end: u64) {
        let mut addr = start;
        while addr < end {
            if let Some(leaf) = self.leaf(addr, false) {
                let g = leaf.lock();
                let i = leaf_index(addr);
                match g.get(i) {
                    Pte::Present {
                        pfn, dirty, young, ..
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
                    Pte::DevicePrivate { pfn, .. } => {
                        g.set(i, Pte::DevicePrivate { pfn, write: false })
                    }
                    _ => {}
                }
            }
            addr += PAGE;
        }
    }
}

impl Drop for SpaceInner {
    /// Releases every entry: mirrors are told, pages lose this space's mappings.
    fn drop(&mut self) {
        for v in self.map.get_mut().values() {
            let range = NotifyRange {
                start: v.start,
                end: v.end,
                event: NotifyEvent::Release,
                owner: 0,
            };
            for n in self.notifiers.get_mut().iter() {
                n.invalidate(self.id, &range);
            }
        }
        let pm = self.pagemap.clone();
        let mut released: Vec<&Page> = Vec::with_capacity(PTRS_PER_LEAF);
        for (&key, leaf) in self.tables.get_mut().iter() {
            // One batch per leaf (see `zap_range`).
            pm.put_pages(&released);
            released.clear();
            for i in 0..PTRS_PER_LEAF {
                let pte = leaf.get(i);
                let Some(pfn) = pte.pfn() else { continue };
                let Some(p) = pm.page(pfn) else {
                    continue;
                };
                if p.test(flags::ZERO) {
                    continue;
                }
                p.remove_rmap(Mapping {
                    space: self.id,
                    addr: key * LEAF_SPAN + i as u64 * PAGE,
                });
                if !matches!(pte, Pte::Migration { .. }) {
                    released.push(p);
                }
            }
        }
        pm.put_pages(&released);
        drop(released);
        self.pagemap.remove_space(self.id);
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

/// The index of `addr`'s entry in its leaf.
pub(crate) fn leaf_index(addr: u64) -> usize {
    ((addr / PAGE) % PTRS_PER_LEAF as u64) as usize
}

/// The mapping covering `addr`.
pub(crate) fn find_vma(map: &VmaTree, addr: u64) -> Option<Arc<Vma>> {
    map.range(..=addr)
        .next_back()
        .filter(|(_, v)| addr < v.end)
        .map(|(_, v)| v.clone())
}

fn range_of(addr: u64, len: u64) -> Result<(u64, u64)> {
    check_aligned(addr)?;
    check_aligned(len)?;
    if len == 0 {
        return Err(Error::EmptyRange);
    }
    Ok((
        addr,
        addr.checked_add(len)
            .ok_or(Error::InvalidArgument("range wraps"))?,
    ))
}

/// Fails unless `[start, end)` is mapped without gaps.
fn covered(map: &VmaTree, start: u64, end: u64) -> Result<()> {
    let mut at = start;
    while at < end {
        let v = find_vma(map, at).ok_or(Error::NotMapped(at))?;
        at = v.end;
    }
    Ok(())
}

/// Splits the mapping that straddles `addr`, if one does.
fn split_at(map: &mut VmaTree, addr: u64) {
    if let Some(v) = find_vma(map, addr) {
        if v.start < addr {
            map.insert(v.start, Vma::new(v.start, addr, v.prot, v.shared));
            map.insert(addr, Vma::new(addr, v.end, v.prot, v.shared));
        }
    }
}
