//! `PageMap`: every frame number resolved to its [`Page`] in O(1), over registered ranges
//! (the host frame pool and each device pagemap), with what a device pagemap's driver
//! provides ([`PagemapOps`], the kernel keeps `dev_pagemap_ops` with `dev_pagemap` too). It
//! holds the registry of address spaces that reverse mappings point into
//! (`space::registry`, beside `SpaceId`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use hetmem_engine::{EngineError, HostFramePool, Pfn, PfnRange};

use super::page::{flags, MemoryKind, Page};
use super::released::Released;
use super::space::AddressSpace;
use super::space::SpaceRegistry;
use crate::error::{Error as MmError, Result};
use crate::mm::{Owner, VirtAddr};

/// Most ranges one page map holds (the host frame pool and the device pagemaps).
const MAX_RANGES: usize = 64;
/// Pages per lazily created block of `Page` structs.
const BLOCK: usize = 16_384;

/// What a device pagemap's driver provides (the kernel's `dev_pagemap_ops`).
pub trait PagemapOps: Send + Sync {
    /// The last reference to a device page was dropped: give it back to the device.
    fn page_free(&self, page: &Page);
    /// Several pages of this pagemap lost their last reference (a batch of `page_free`).
    fn pages_free(&self, pages: &[&Page]) {
        for p in pages {
            self.page_free(p);
        }
    }
    /// [`PagemapOps::pages_free`] with each page's frame number (`pfns[i]` is
    /// `pages[i].pfn()`), which the page map read as it gathered the pages: a driver that
    /// frees by frame number overrides this to skip reading every `Page` again (a large
    /// batch's structs are out of cache by then). The default calls `pages_free`.
    fn pfns_free(&self, pages: &[&Page], pfns: &[Pfn]) {
        let _ = pfns;
        self.pages_free(pages);
    }
    /// A CPU access hit a device-private entry: move the page (and, at the driver's choice,
    /// its neighbours) to system memory. The page is referenced and locked by the caller.
    fn migrate_to_ram(&self, fault: FaultContext<'_>) -> Result<()>;
}

/// The faulting access handed to [`PagemapOps::migrate_to_ram`].
pub struct FaultContext<'a> {
    /// The address space of the access.
    pub space: &'a AddressSpace,
    /// The page-aligned faulting address.
    pub addr: VirtAddr,
    /// True for a write access.
    pub write: bool,
    /// The device-private page that the entry maps; referenced and locked.
    pub page: &'a Page,
}

/// CPU access to the bytes of frames of a range that the CPU may touch.
pub trait FrameAccess: Send + Sync {
    /// Copies bytes out of frame `pfn` from `offset`.
    fn read(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<(), EngineError>;
    /// Copies bytes into frame `pfn` at `offset`.
    fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), EngineError>;
}

impl FrameAccess for HostFramePool {
    fn read(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<(), EngineError> {
        HostFramePool::read(self, pfn, offset, out)
    }
    fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), EngineError> {
        HostFramePool::write(self, pfn, offset, data)
    }
}

/// One registered range of frames.
pub(crate) struct Range {
    pub(crate) range: PfnRange,
    pub(crate) kind: MemoryKind,
    pub(crate) owner: Owner,
    blocks: Box<[OnceLock<Box<[Page]>>]>,
    pub(crate) access: Option<Arc<dyn FrameAccess>>,
    pub(crate) ops: Option<Arc<dyn PagemapOps>>,
}

impl Range {
    #[inline]
    fn page(&self, pfn: Pfn) -> Option<&Page> {
        let i = self.range.index_of(pfn)? as usize;
        let block = match self.blocks[i / BLOCK].get() {
            Some(b) => b,
            None => self.make_block(i / BLOCK),
        };
        Some(&block[i % BLOCK])
    }

    /// The block of pages that holds `pfn`, with the frame number of its first page.
    #[inline]
    fn block_of(&self, pfn: Pfn) -> Option<(u64, &[Page])> {
        let i = self.range.index_of(pfn)? as usize;
        let b = i / BLOCK;
        let block = match self.blocks[b].get() {
            Some(b) => b,
            None => self.make_block(b),
        };
        Some((self.range.start.0 + (b * BLOCK) as u64, block))
    }

    /// Creates the page structs of block `b` on first use.
    #[cold]
    #[inline(never)]
    fn make_block(&self, b: usize) -> &[Page] {
        self.blocks[b].get_or_init(|| {
            let first = self.range.start.add((b * BLOCK) as u64);
            let n = BLOCK.min(self.range.count as usize - b * BLOCK);
            (0..n)
                .map(|k| Page::new(first.add(k as u64), self.kind, self.owner))
                .collect()
        })
    }
}

/// Looks up pages, keeping the last block found (see [`PageMap::cursor`]).
pub(crate) struct PageCursor<'p> {
    pm: &'p PageMap,
    /// The frame number of `block[0]`.
    first: u64,
    block: &'p [Page],
}

impl<'p> PageCursor<'p> {
    /// The page of `pfn`, as [`PageMap::page`].
    #[inline]
    pub(crate) fn page(&mut self, pfn: Pfn) -> Option<&'p Page> {
        let off = pfn.0.wrapping_sub(self.first);
        if off < self.block.len() as u64 {
            return Some(&self.block[off as usize]);
        }
        self.miss(pfn)
    }

    /// The page of `pfn`, or `UnknownPfn`.
    #[inline]
    pub(crate) fn page_or_err(&mut self, pfn: Pfn) -> Result<&'p Page> {
        match self.page(pfn) {
            Some(p) => Ok(p),
            None => Err(MmError::UnknownPfn(pfn)),
        }
    }

    #[cold]
    fn miss(&mut self, pfn: Pfn) -> Option<&'p Page> {
        let (first, block) = self.pm.range_of(pfn)?.block_of(pfn)?;
        self.first = first;
        self.block = block;
        Some(&block[(pfn.0 - first) as usize])
    }
}

/// A device pagemap as registered: its range, kind, owner and operations.
#[derive(Clone)]
pub struct DevicePagemap {
    /// The frame numbers of the device's pages.
    pub range: PfnRange,
    /// Private or coherent.
    pub kind: MemoryKind,
    /// The owner cookie that selects this pagemap's pages in migrations.
    pub owner: Owner,
    index: usize,
}

impl DevicePagemap {
    /// The position of this pagemap in its page map.
    pub fn index(&self) -> usize {
        self.index
    }
}

/// The frames of one process: host frames and device pages, each with its [`Page`].
pub struct PageMap {
    frames: Arc<HostFramePool>,
    ranges: [OnceLock<Range>; MAX_RANGES],
    count: AtomicUsize,
    register: parking_lot::Mutex<()>,
    /// Serializes the public claims of a page the caller allocated (`claim_frame`,
    /// `claim_device_page`): each checks that the page is not live and makes it live, and two
    /// claims of one page must not both pass the check.
    pub(crate) claims: parking_lot::Mutex<()>,
    spaces: SpaceRegistry,
    zero: Pfn,
}

impl std::fmt::Debug for PageMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageMap")
            .field("ranges", &self.count.load(Ordering::Acquire))
            .finish()
    }
}

impl Drop for PageMap {
    /// Gives the zero page's frame back to the pool (every other frame went back with the
    /// last reference to its page).
    fn drop(&mut self) {
        // SAFETY: the zero page was adopted in `new`; with the page map gone nothing maps or
        // copies it.
        if let Err(e) = unsafe { self.frames.free_adopted(&[self.zero]) } {
            tracing::error!("freeing the zero page {}: {e}", self.zero);
        }
    }
}

impl PageMap {
    /// A page map over `frames`, with the shared zero page allocated from it.
    pub fn new(frames: Arc<HostFramePool>) -> Result<Arc<PageMap>, MmError> {
        let zero = frames.alloc(true)?;
        frames.adopt(&[zero])?;
        frames.seal(zero)?;
        let pm = PageMap {
            frames: frames.clone(),
            ranges: std::array::from_fn(|_| OnceLock::new()),
            count: AtomicUsize::new(0),
            register: parking_lot::Mutex::new(()),
            claims: parking_lot::Mutex::new(()),
            spaces: SpaceRegistry::default(),
            zero,
        };
        pm.add_range(
            frames.pfn_range(),
            MemoryKind::System,
            Owner::NONE,
            Some(frames.clone()),
            None,
        )?;
        let z = pm.page(zero).expect("zero page is in the frame pool");
        z.init_allocated(false);
        z.set(flags::ZERO);
        Ok(Arc::new(pm))
    }

    /// The host frame pool.
    pub fn frames(&self) -> &Arc<HostFramePool> {
        &self.frames
    }

    /// The shared zero page.
    pub fn zero_pfn(&self) -> Pfn {
        self.zero
    }

    fn add_range(
        &self,
        range: PfnRange,
        kind: MemoryKind,
        owner: Owner,
        access: Option<Arc<dyn FrameAccess>>,
        ops: Option<Arc<dyn PagemapOps>>,
    ) -> Result<usize, MmError> {
        // The range is the caller's: its end must not wrap, and its page table (one slot per
        // BLOCK frames) must be had without aborting the process.
        if range.count == 0 || range.start.0.checked_add(range.count).is_none() {
            return Err(MmError::InvalidArgument("empty or wrapping frame range"));
        }
        let nblocks = usize::try_from(range.count.div_ceil(BLOCK as u64))
            .map_err(|_| MmError::InvalidArgument("frame range too large"))?;
        let mut blocks = Vec::new();
        blocks
            .try_reserve_exact(nblocks)
            .map_err(|_| MmError::InvalidArgument("frame range too large"))?;
        blocks.resize_with(nblocks, OnceLock::new);
        let _g = self.register.lock();
        let n = self.count.load(Ordering::Acquire);
        for r in self.ranges[..n].iter().filter_map(OnceLock::get) {
            let overlap = range.start < r.range.end() && r.range.start < range.end();
            if overlap {
                return Err(MmError::RangeRegistered(range.start));
            }
        }
        if n == MAX_RANGES {
            return Err(MmError::TooManyRanges);
        }
        let _ = self.ranges[n].set(Range {
            range,
            kind,
            owner,
            blocks: blocks.into_boxed_slice(),
            access,
            ops,
        });
        self.count.store(n + 1, Ordering::Release);
        Ok(n)
    }

    /// Registers a device's pages. Coherent memory needs `access` (the CPU reads it in
    /// place). Fails if any frame of `range` is already registered.
    pub fn register_device(
        &self,
        range: PfnRange,
        kind: MemoryKind,
        owner: Owner,
        ops: Arc<dyn PagemapOps>,
        access: Option<Arc<dyn FrameAccess>>,
    ) -> Result<DevicePagemap, MmError> {
        match kind {
            MemoryKind::System => {
                return Err(MmError::InvalidArgument("device pagemap of kind System"))
            }
            MemoryKind::DeviceCoherent if access.is_none() => {
                return Err(MmError::InvalidArgument(
                    "coherent pagemap without CPU access",
                ))
            }
            _ => {}
        }
        if owner == Owner::NONE {
            return Err(MmError::InvalidArgument("pagemap owner 0 is reserved"));
        }
        let index = self.add_range(range, kind, owner, access, Some(ops))?;
        Ok(DevicePagemap {
            range,
            kind,
            owner,
            index,
        })
    }

    #[inline]
    pub(crate) fn range_of(&self, pfn: Pfn) -> Option<&Range> {
        let n = self.count.load(Ordering::Acquire);
        self.ranges[..n]
            .iter()
            .filter_map(OnceLock::get)
            .find(|r| r.range.contains(pfn))
    }

    /// The page of any registered frame.
    #[inline]
    pub fn page(&self, pfn: Pfn) -> Option<&Page> {
        self.range_of(pfn)?.page(pfn)
    }

    /// A cursor for looking up many frames in a row (a migration's entries): it keeps the
    /// block of `Page` structs its last lookup found, so that frames of one batch, which
    /// mostly share a block, cost a bounds check each.
    #[inline]
    pub(crate) fn cursor(&self) -> PageCursor<'_> {
        PageCursor {
            pm: self,
            first: 0,
            block: &[],
        }
    }

    /// The page, or `UnknownPfn`.
    #[inline]
    pub fn page_or_err(&self, pfn: Pfn) -> Result<&Page, MmError> {
        // A match, not `ok_or`: the error value would be built and dropped per page.
        match self.page(pfn) {
            Some(p) => Ok(p),
            None => Err(MmError::UnknownPfn(pfn)),
        }
    }

    /// CPU access to a frame's bytes, if the CPU may touch it in place.
    pub(crate) fn access(&self, pfn: Pfn) -> Option<&Arc<dyn FrameAccess>> {
        self.range_of(pfn)?.access.as_ref()
    }

    /// Copies bytes out of a CPU-accessible frame (system or device-coherent).
    pub fn read_frame(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<(), MmError> {
        Ok(self
            .access(pfn)
            .ok_or(MmError::UnknownPfn(pfn))?
            .read(pfn, offset, out)?)
    }

    /// Copies bytes into a CPU-accessible frame (system or device-coherent).
    pub fn write_frame(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), MmError> {
        Ok(self
            .access(pfn)
            .ok_or(MmError::UnknownPfn(pfn))?
            .write(pfn, offset, data)?)
    }

    /// [`read_frame`](Self::read_frame) for callers inside the crate that have checked the
    /// CPU mapping of a home frame (no view or pointer writes it meanwhile): home frames
    /// too.
    pub(crate) fn read_frame_owned(
        &self,
        pfn: Pfn,
        offset: usize,
        out: &mut [u8],
    ) -> Result<(), MmError> {
        if self.frames.contains(pfn) {
            // SAFETY: the caller has made sure no CPU mapping writes a home frame meanwhile.
            return Ok(unsafe { self.frames.read_owned(pfn, offset, out) }?);
        }
        self.read_frame(pfn, offset, out)
    }

    /// [`write_frame`](Self::write_frame) for callers inside the crate that have checked the
    /// CPU mapping of a home frame (nothing reaches it through a view or pointer meanwhile):
    /// home frames too.
    pub(crate) fn write_frame_owned(
        &self,
        pfn: Pfn,
        offset: usize,
        data: &[u8],
    ) -> Result<(), MmError> {
        if self.frames.contains(pfn) {
            // SAFETY: the caller has made sure no CPU mapping touches a home frame meanwhile.
            return Ok(unsafe { self.frames.write_owned(pfn, offset, data) }?);
        }
        self.write_frame(pfn, offset, data)
    }

    /// The operations of the device pagemap `pfn` belongs to.
    pub(crate) fn ops(&self, pfn: Pfn) -> Option<&Arc<dyn PagemapOps>> {
        self.range_of(pfn)?.ops.as_ref()
    }

    /// Allocates a system page: one reference, LRU, optionally zeroed and locked.
    pub(crate) fn alloc_system(&self, zeroed: bool, locked: bool) -> Result<&Page, MmError> {
        let pfn = self.frames.alloc(zeroed)?;
        self.frames
            .adopt(&[pfn])
            .expect("a frame just allocated is adopted once");
        let p = self
            .page(pfn)
            .expect("frames belong to the frame pool range");
        p.init_allocated(locked);
        Ok(p)
    }

    /// Claims home frame `pfn` (of a run reserved with
    /// [`HostFramePool::reserve_home`]) as a system page: one reference, LRU state as
    /// `alloc_system`, optionally zeroed and locked. Fails if the frame is in use.
    pub(crate) fn claim_home(
        &self,
        pfn: Pfn,
        zeroed: bool,
        locked: bool,
    ) -> Result<&Page, MmError> {
        let p = self.page_or_err(pfn)?;
        self.frames.claim_home(pfn, zeroed)?;
        p.init_allocated(locked);
        Ok(p)
    }

    /// Makes frames the caller took from the frame pool live pages, all or none: one
    /// reference each, optionally locked (for drivers that allocate frames in batches). The
    /// frames become the page map's ([`HostFramePool::adopt`]); a frame that is not allocated
    /// or is a page already fails the call.
    pub(crate) fn alloc_system_at(&self, pfns: &[Pfn], locked: bool) -> Result<(), MmError> {
        self.frames.adopt(pfns).map_err(|e| match e {
            EngineError::FrameOwned(p) => MmError::PageInUse(p),
            EngineError::FreedPfn(p) => MmError::PageFree(p),
            e => e.into(),
        })?;
        for &pfn in pfns {
            self.page(pfn)
                .expect("adopted frames are of the pool")
                .init_allocated(locked);
        }
        Ok(())
    }

    /// Makes a device page the engine just allocated live: one reference, optionally locked.
    pub(crate) fn init_device_page(&self, pfn: Pfn, locked: bool) -> Result<&Page, MmError> {
        let p = self.page_or_err(pfn)?;
        if !p.is_device() {
            return Err(MmError::InvalidArgument("not a device page"));
        }
        let _one_claim = self.claims.lock();
        if p.refcount() != 0 {
            return Err(MmError::PageInUse(pfn));
        }
        p.init_allocated(locked);
        Ok(p)
    }

    /// Drops a reference; the last one frees the page (to the frame pool, or through the
    /// device pagemap's `page_free`).
    pub(crate) fn put_page(&self, p: &Page) {
        if p.test(flags::ZERO) {
            return;
        }
        if p.put_ref() {
            self.free_page(p);
        }
    }

    /// Drops one reference on each page; the pages whose last reference goes are freed in
    /// batches (host frames in one call, device pages per pagemap).
    pub(crate) fn put_pages(&self, pages: &[&Page]) {
        let mut released: Vec<&Page> = Vec::new();
        for &p in pages {
            if p.test(flags::ZERO) || !p.put_ref() {
                continue;
            }
            debug_assert_eq!(p.mapcount(), 0, "freeing mapped page {}", p.pfn());
            p.clear_all();
            released.push(p);
        }
        self.free_released(&released);
    }

    /// Frees pages whose last reference is gone and whose flags are clear, in batches (host
    /// frames in one call, device pages per pagemap).
    pub(crate) fn free_released(&self, released: &[&Page]) {
        let mut gathered = Released::with_capacity(released.len());
        for &p in released {
            gathered.push(p);
        }
        self.free_gathered(&mut gathered);
    }

    fn free_page(&self, p: &Page) {
        debug_assert_eq!(p.mapcount(), 0, "freeing mapped page {}", p.pfn());
        p.clear_all();
        if p.is_device() {
            if let Some(ops) = self.ops(p.pfn()) {
                ops.page_free(p);
            }
            return;
        }
        // SAFETY: as in `free_released`: the last reference is gone, nothing maps the page.
        if let Err(e) = unsafe { self.frames.free_adopted(&[p.pfn()]) } {
            tracing::error!("freeing frame {}: {e}", p.pfn());
        }
    }

    /// The address spaces over this page map, which reverse mappings point into.
    pub(crate) fn spaces(&self) -> &SpaceRegistry {
        &self.spaces
    }
}
