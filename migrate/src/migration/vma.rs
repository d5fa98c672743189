//! `migrate_vma_setup`, `migrate_vma_pages`, `migrate_vma_finalize`: migrating the pages of
//! one range of one mapping, over `src`/`dst` arrays of migrate pfn words.
//!
//! Stages, and what holds between them:
//! - setup: every `src` entry with `MIGRATE` is a hole, or a page that is referenced, locked
//!   and unmapped (its entries are migration entries); every other entry is 0.
//! - the driver: fills `dst` with locked destination pages and copies.
//! - pages: entries without a destination lose `MIGRATE`; holes get their new page mapped;
//!   page state moves to the destination.
//! - finalize: migrated entries point at the destination, the rest are restored; all pages
//!   are unlocked and the migration's references dropped.
//!
//! From setup to finalize the migration holds the address space's map lock shared (see
//! [`migrate_vma_setup`]): the range's mappings and protection cannot change under it.

use std::sync::Arc;

use hetmem_engine::Pfn;

use super::dst::{forget_foreign_dst, take_dst, MOVED_FLAGS};
use super::finalize::{finalize, resolve};
use super::hole::insert_page;
use super::pfn::*;
use super::unmap::{entry_for, migration_entry, restore_page, unmap_page, Unmapped};
use crate::error::{Error, Result};
use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::{flags, Mapping, MemoryKind, Page, COLLECTED};
use crate::mm::pagemap::PageCursor;
use crate::mm::pte::{LeafGuard, Pte};
use crate::mm::space::{check_aligned, find_vma, leaf_index, AddressSpace, MapHold, Vma, PAGE};
use crate::mm::{Owner, PageMap, VirtAddr};

/// The arguments and results of one migration (the kernel's `struct migrate_vma`).
pub struct MigrateVma<'a> {
    /// The address space.
    pub space: &'a AddressSpace,
    /// First address (page-aligned).
    pub start: VirtAddr,
    /// One past the last address (page-aligned).
    pub end: VirtAddr,
    /// Source words, one per page; written by setup.
    pub src: &'a mut [u64],
    /// Destination words, one per page; written by the driver.
    pub dst: &'a mut [u64],
    /// Device pages are collected only if their pagemap has this owner.
    pub pgmap_owner: Owner,
    /// `MIGRATE_VMA_SELECT_*` bits.
    pub flags: u32,
    /// The device-private page a CPU fault is migrating; the caller holds it locked and
    /// referenced.
    pub fault_page: Option<Pfn>,
    /// Entries with `MIGRATE` after setup (holes included).
    pub cpages: usize,
    /// Pages in the range.
    pub npages: usize,
    pub(crate) held: Held<'a>,
}

/// What a migration holds between its stages: the address space's map lock (shared), so no
/// munmap, mremap, mprotect or fork of the space runs until finalize; the mapping setup
/// found; and how far it got.
#[derive(Default)]
pub(crate) struct Held<'a> {
    /// The map lock (`None` where the caller keeps it: the typestate wrapper).
    #[allow(dead_code, reason = "held for its drop, which releases the map lock")]
    pub(crate) map: Option<MapHold<'a>>,
    pub(crate) vma: Option<Arc<Vma>>,
    pub(crate) stage: Stage,
    /// The pages setup collected, by entry (see [`Collect`]).
    pub(crate) src_pages: Vec<Option<&'a Page>>,
    /// The destinations the pages stage accepted, by entry (empty before it ran).
    pub(crate) dst_pages: Vec<Option<&'a Page>>,
    /// Where setup ran: the space, the range's start and the fault page. The later stages
    /// use these, not the public fields a driver could change meanwhile.
    pub(crate) at: Option<(&'a AddressSpace, VirtAddr, Option<Pfn>)>,
}

/// The pages setup collected, by entry: `Some` exactly where `src` names a page with
/// `MIGRATE` (locked, isolated and unmapped). Later stages work on these pages rather than
/// looking the frames up again: a migration's pages are the ones it locked, whatever the
/// driver does to the words' frame numbers meanwhile (it may clear `MIGRATE`, nothing
/// else).
pub(crate) type Collect<'p> = Vec<Option<&'p Page>>;

/// How far a migration got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Not set up, or finalized.
    #[default]
    Idle,
    /// Setup ran: pages are collected, locked and unmapped.
    SetUp,
    /// The pages stage ran.
    Paged,
}

impl Drop for MigrateVma<'_> {
    /// A migration dropped between setup and finalize is finalized: before the pages stage
    /// nothing migrates (every page is restored, destinations are released); after it, the
    /// migration completes.
    fn drop(&mut self) {
        migrate_vma_finalize(self);
    }
}

impl<'a> MigrateVma<'a> {
    /// A migration of `[start, end)` of `space` into the given arrays; set `pgmap_owner`,
    /// `flags` and `fault_page` before setup.
    pub fn new(
        space: &'a AddressSpace,
        start: VirtAddr,
        end: VirtAddr,
        src: &'a mut [u64],
        dst: &'a mut [u64],
    ) -> Self {
        MigrateVma {
            space,
            start,
            end,
            src,
            dst,
            pgmap_owner: Owner::NONE,
            flags: 0,
            fault_page: None,
            cpages: 0,
            npages: 0,
            held: Held::default(),
        }
    }

    /// The mapping setup found (`None` before setup).
    pub fn vma(&self) -> Option<Arc<Vma>> {
        self.held.vma.clone()
    }

    /// The address of entry `i`.
    pub fn addr(&self, i: usize) -> VirtAddr {
        self.start + i as u64 * PAGE
    }
}

/// Checks the arguments against the mapping tree `map`; nothing is changed on error.
fn validate(m: &MigrateVma<'_>, map: &MapHold<'_>) -> Result<Arc<Vma>> {
    if m.held.stage != Stage::Idle {
        return Err(Error::InvalidArgument(
            "setup of a migration already set up",
        ));
    }
    check_aligned(m.start.get())?;
    check_aligned(m.end.get())?;
    if m.start >= m.end {
        return Err(Error::EmptyRange);
    }
    let npages = ((m.end - m.start) / PAGE) as usize;
    if m.src.len() < npages {
        return Err(Error::ShortArray {
            which: "src",
            needed: npages,
            got: m.src.len(),
        });
    }
    if m.dst.len() < npages {
        return Err(Error::ShortArray {
            which: "dst",
            needed: npages,
            got: m.dst.len(),
        });
    }
    let vma = find_vma(map, m.start).ok_or(Error::NotMapped(m.start))?;
    if vma.end < m.end {
        return Err(Error::AcrossVmas {
            start: m.start,
            end: m.end,
        });
    }
    if !vma.prot.read && !vma.prot.write {
        return Err(Error::NoAccess(m.start));
    }
    if let Some(fp) = m.fault_page {
        let p = m.space.pagemap().page_or_err(fp)?;
        if p.kind() != MemoryKind::DevicePrivate || !p.test(flags::LOCKED) {
            return Err(Error::BadFaultPage(fp));
        }
    }
    Ok(vma)
}

/// Stage 1: collects and unmaps the pages of the range (see the module docs for what holds
/// on return). Migration is best effort: a page that is busy is left where it is.
///
/// From here until [`migrate_vma_finalize`] (or the drop of `m`) the migration holds the
/// address space's map lock shared, as the kernel's drivers hold the mmap lock: munmap,
/// mremap, mprotect and fork of the space wait for it (on this thread they fail with
/// [`Error::MigrationInProgress`]), so the range keeps its mapping and protection until its
/// entries are final. Mirrors are invalidated once for the whole range, before the walk and
/// with no page-table lock held; the invalidation ends when setup returns, and no mirror can
/// map the range's pages again meanwhile (they are locked behind migration entries).
pub fn migrate_vma_setup(m: &mut MigrateVma<'_>) -> Result<()> {
    let space = m.space;
    let (map, vma, src_pages) = setup_holding(m, space, false)?;
    m.held = Held {
        map: Some(map),
        vma: Some(vma),
        stage: Stage::SetUp,
        src_pages,
        dst_pages: Vec::new(),
        at: Some((space, m.start, m.fault_page)),
    };
    Ok(())
}

/// Setup proper: returns the map lock it took from `space` (which is `m.space`, borrowed for
/// as long as the caller keeps the lock), the mapping and the collected pages. A mapping for
/// CPU pointers is
/// refused unless `homed` (the crate's own migrations, which keep that mapping in step): a
/// caller outside the crate would move a page out of its home frame under a live view.
pub(crate) fn setup_holding<'s>(
    m: &mut MigrateVma<'_>,
    space: &'s AddressSpace,
    homed: bool,
) -> Result<(MapHold<'s>, Arc<Vma>, Collect<'s>)> {
    debug_assert!(std::ptr::eq(space, m.space));
    let map = space.map_read()?;
    let vma = validate(m, &map)?;
    if !homed && vma.home.is_some() {
        return Err(Error::InvalidArgument(
            "the range is mapped for CPU pointers: use its buffer",
        ));
    }
    m.npages = ((m.end - m.start) / PAGE) as usize;
    m.src[..m.npages].fill(0);
    m.dst[..m.npages].fill(0);
    m.cpages = 0;
    let mut pages: Collect<'s> = vec![None; m.npages];
    {
        let _inv = space.invalidate(NotifyRange {
            start: m.start,
            end: m.end,
            event: NotifyEvent::Migrate,
            owner: m.pgmap_owner,
        });
        let elsewhere = {
            let _vt = crate::mm::locks::acquire(crate::mm::locks::Rank::Vma);
            let _v = vma.lock.lock();
            migrate_vma_collect(m, space.pagemap(), &vma, &mut pages)
        };
        migrate_vma_unmap(m, &elsewhere, &mut pages);
    }
    Ok((map, vma, pages))
}

/// Whether a device page of `kind` and `owner` is selected by the migration's flags.
fn selected(m: &MigrateVma<'_>, kind: MemoryKind, owner: Owner) -> bool {
    match kind {
        MemoryKind::System => m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0,
        MemoryKind::DevicePrivate => {
            m.flags & MIGRATE_VMA_SELECT_DEVICE_PRIVATE != 0 && owner == m.pgmap_owner
        }
        MemoryKind::DeviceCoherent => {
            m.flags & MIGRATE_VMA_SELECT_DEVICE_COHERENT != 0 && owner == m.pgmap_owner
        }
    }
}

/// Walks the range leaf by leaf under the VMA lock: holes are marked; selected pages are
/// try-locked, taken off the LRU and replaced by migration entries; then, still under the
/// leaf lock, a page mapped only here
/// is checked for other references (and put back if it has some). Records each collected
/// page in `pages`; returns the entries whose pages are mapped elsewhere too, for
/// [`migrate_vma_unmap`].
fn migrate_vma_collect<'p>(
    m: &mut MigrateVma<'_>,
    pm: &'p PageMap,
    vma: &Vma,
    pages: &mut [Option<&'p Page>],
) -> Vec<usize> {
    let anonymous = !vma.shared;
    let mut elsewhere = Vec::new();
    let mut cursor = pm.cursor();
    let mut i = 0;
    while i < m.npages {
        let leaf_start = m.addr(i);
        let leaf = m.space.leaf(leaf_start, true).expect("created");
        let g = leaf.lock();
        let first = i;
        loop {
            let addr = m.addr(i);
            let li = leaf_index(addr);
            let (w, page) = collect_one(m, &mut cursor, anonymous, &g, li);
            m.src[i] = w;
            pages[i] = page;
            if w & MIGRATE_PFN_MIGRATE != 0 {
                m.cpages += 1;
            }
            i += 1;
            if i == m.npages || leaf_index(m.addr(i)) == 0 {
                break;
            }
        }
        for (k, slot) in pages.iter_mut().enumerate().take(i).skip(first) {
            let Some(page) = *slot else {
                continue;
            };
            // This leaf's entry maps the page, so a map count of one says it is the page's
            // only mapping (no path lets the count fall below the entries that map a page).
            if page.mapcount() != 1 {
                elsewhere.push(k);
                continue;
            }
            let addr = m.addr(k);
            let is_fault_page = m.fault_page == Some(page.pfn());
            if page.refcount() == if is_fault_page { 2 } else { 1 } {
                continue;
            }
            // Held by someone else (a pin, a transient reference): put it back.
            let li = leaf_index(addr);
            if let Pte::Migration {
                kind, young, dirty, ..
            } = g.get(li)
            {
                g.set(li, entry_for(page, kind, young, dirty));
            }
            if page.kind() == MemoryKind::System {
                page.set(flags::LRU);
            }
            if !is_fault_page {
                page.unlock();
            }
            m.src[k] = 0;
            *slot = None;
            m.cpages -= 1;
        }
        drop(g);
    }
    elsewhere
}

/// Collects one entry: its `src` word, and its page if it was locked, isolated and replaced
/// by a migration entry.
fn collect_one<'p>(
    m: &MigrateVma<'_>,
    pm: &mut PageCursor<'p>,
    anonymous: bool,
    g: &LeafGuard<'_>,
    li: usize,
) -> (u64, Option<&'p Page>) {
    let pte = g.get(li);
    let (pfn, writable) = match pte {
        Pte::None => return (if anonymous { MIGRATE_PFN_MIGRATE } else { 0 }, None),
        Pte::Present { pfn, write, .. } => (pfn, write),
        Pte::DevicePrivate { pfn, write } => (pfn, write),
        Pte::Migration { .. } | Pte::Swap { .. } => return (0, None),
    };
    let Some(page) = pm.page(pfn) else {
        return (0, None);
    };
    if page.test(flags::ZERO) {
        let hole = anonymous && m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0;
        return (if hole { MIGRATE_PFN_MIGRATE } else { 0 }, None);
    }
    if !anonymous || !selected(m, page.kind(), page.owner()) || page.mapcount() == 0 {
        return (0, None);
    }
    // The mapping's reference keeps the page alive while the leaf lock is held, and passes
    // to the migration with the entry: no reference is taken or dropped here. The fault
    // page is locked by the caller (and, being device-private, on no LRU).
    let is_fault_page = m.fault_page == Some(pfn);
    if is_fault_page {
        // Locked by the caller; its unlock ends the mark.
        page.set(COLLECTED);
    } else if !page.trylock_isolate() {
        return (0, None);
    }
    // A pinned anon-exclusive page cannot become shared by a migration entry: leave it.
    if page.test(flags::ANON_EXCLUSIVE) && page.pincount() > 0 {
        if !is_fault_page {
            if page.kind() == MemoryKind::System {
                page.set(flags::LRU);
            }
            page.unlock();
        }
        return (0, None);
    }
    if page.test(flags::SWAPCACHE) {
        page.clear(flags::SWAPCACHE);
    }
    g.set(li, migration_entry(pte, page));
    let w = migrate_pfn(pfn) | MIGRATE_PFN_MIGRATE | if writable { MIGRATE_PFN_WRITE } else { 0 };
    (w, Some(page))
}

/// Replaces the other mappings of collected pages mapped elsewhere too, then checks that no
/// reference but the migration's is left. Pages that fail are restored and their entries
/// cleared.
fn migrate_vma_unmap(m: &mut MigrateVma<'_>, elsewhere: &[usize], pages: &mut [Option<&Page>]) {
    let pm = m.space.pagemap().clone();
    for &i in elsewhere {
        let Some(page) = pages[i] else {
            continue;
        };
        let is_fault_page = m.fault_page == Some(page.pfn());
        let addr = m.addr(i);
        let own = Mapping {
            space: m.space.id(),
            addr,
        };
        let expected = if is_fault_page { 2 } else { 1 };
        match unmap_page(&pm, page, expected, Some(own), true) {
            Unmapped::Ready => {}
            Unmapped::Busy => {
                restore_page(&pm, page, !is_fault_page, Some((m.space, addr)));
                m.src[i] = 0;
                pages[i] = None;
                m.cpages -= 1;
            }
        }
    }
}

/// Stage 2: entries without a destination stop migrating; holes get their new page mapped
/// (unless the address was populated meanwhile); page state moves to the destinations.
/// A bad `dst` entry (unknown, free, mapped, unlocked or repeated page) fails the call with
/// nothing changed.
pub fn migrate_vma_pages(m: &mut MigrateVma<'_>) -> Result<()> {
    let space = m.space;
    let src_pages = std::mem::take(&mut m.held.src_pages);
    let done = pages_stage(m, space, &src_pages);
    m.held.src_pages = src_pages;
    m.held.dst_pages = done?;
    Ok(())
}

/// The pages stage over the pages setup collected (`src_pages`); returns the destinations
/// it took, by entry.
pub(crate) fn pages_stage<'s>(
    m: &mut MigrateVma<'_>,
    space: &'s AddressSpace,
    src_pages: &[Option<&'s Page>],
) -> Result<Collect<'s>> {
    if m.held.stage != Stage::SetUp {
        return Err(Error::InvalidArgument(
            "migrate_vma_pages runs once, between setup and finalize",
        ));
    }
    // `npages`, the arrays and the range are public: the entries are the ones setup
    // collected, in the space and at the addresses it collected them.
    if m.npages != src_pages.len() || m.src.len() < m.npages || m.dst.len() < m.npages {
        return Err(Error::InvalidArgument(
            "npages or the arrays changed between setup and the pages stage",
        ));
    }
    match m.held.at {
        Some((s, start, _)) if std::ptr::eq(s, m.space) && start == m.start => {}
        _ => {
            return Err(Error::InvalidArgument(
                "the space or range changed between setup and the pages stage",
            ))
        }
    }
    let pm = space.pagemap();
    let src = &m.src[..m.npages];
    let dst = take_dst(pm, src, &m.dst[..m.npages], |i| match src_pages[i] {
        Some(old) if src[i] & MIGRATE_PFN_MIGRATE != 0 => Some(old.flags() & MOVED_FLAGS),
        _ => None,
    })?;
    // `take_dst` moved the state of each page that migrates; holes get their new page here.
    let vma = m.held.vma.clone().expect("set up");
    for i in 0..m.npages {
        if m.src[i] & MIGRATE_PFN_MIGRATE == 0 {
            continue;
        }
        let Some(new) = dst[i] else {
            m.src[i] &= !MIGRATE_PFN_MIGRATE;
            continue;
        };
        // Setup marks holes only in anonymous memory, and takes the zero page as a hole only
        // with SELECT_SYSTEM: MIGRATE a driver set anywhere else inserts nothing.
        let zero_ok = m.flags & MIGRATE_VMA_SELECT_SYSTEM != 0;
        if src_pages[i].is_none()
            && (vma.shared || !insert_page(space, &vma, m.addr(i), new, zero_ok))
        {
            m.src[i] &= !MIGRATE_PFN_MIGRATE;
        }
    }
    m.held.stage = Stage::Paged;
    Ok(dst)
}

/// Stage 3: every migration entry of a migrated page now maps its destination; every other
/// page is restored; all pages are unlocked and the migration's references dropped (freeing
/// old pages and unused destinations).
///
/// Finalizing a migration that is not set up (never, or already finalized) does nothing; one
/// whose pages stage did not run restores every page and releases the destinations the
/// driver named (live, locked, unmapped pages that no guard holds and no other migration's
/// pages stage took; anything else in `dst` is not touched).
/// Returns with the map lock released.
pub fn migrate_vma_finalize(m: &mut MigrateVma<'_>) {
    let stage = m.held.stage;
    if stage == Stage::Idle {
        return;
    }
    let held = std::mem::take(&mut m.held);
    let (space, start, fault_page) = held.at.unwrap_or((m.space, m.start, m.fault_page));
    let pm = space.pagemap();
    // Every entry setup collected is finished, whatever the driver did to the public
    // `npages` or arrays since; entries past the end of an array it shortened read as 0.
    let n = held.src_pages.len();
    let (mut src_copy, mut dst_copy): (Vec<u64>, Vec<u64>);
    let (src, dst): (&mut [u64], &mut [u64]) = if m.src.len() >= n && m.dst.len() >= n {
        (&mut m.src[..n], &mut m.dst[..n])
    } else {
        let padded = |w: &[u64]| (0..n).map(|i| w.get(i).copied().unwrap_or(0)).collect();
        (src_copy, dst_copy) = (padded(m.src), padded(m.dst));
        (&mut src_copy[..], &mut dst_copy[..])
    };
    let dst_pages = match stage {
        Stage::SetUp => {
            abandon(pm, src, dst);
            resolve(pm, dst)
        }
        _ => held.dst_pages,
    };
    finalize(
        pm,
        src,
        &held.src_pages,
        &dst_pages,
        fault_page,
        Some((space, start)),
    );
    // The map lock goes last, with `held.map`.
    drop(held.map);
}

/// Makes a migration whose pages stage did not run migrate nothing: `MIGRATE` is cleared,
/// and destinations that are not the driver's to hand over (see [`forget_foreign_dst`]) are
/// forgotten.
pub(crate) fn abandon(pm: &PageMap, src: &mut [u64], dst: &mut [u64]) {
    for s in src.iter_mut() {
        *s &= !MIGRATE_PFN_MIGRATE;
    }
    // No pages stage of this migration took a destination: one marked taken is another's.
    forget_foreign_dst(pm, dst, |_| false);
}
