//! The driver proper: registration, migrations in both directions, the fault handler.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hetmem_engine::{Device, EngineError, Pfn, PAGE_SIZE};

use std::collections::HashMap;

use hetmem_engine::Kernel;
use parking_lot::Mutex;

use super::evict::Resident;
use super::table::{DevicePin, Launch, SpaceTable};
use crate::error::{Error, ErrorKind, Result};
use crate::migration::*;
use crate::mm::{
    AddressSpace, DevicePagemap, FaultContext, FrameAccess, MemoryKind, Page, PageMap, PagemapOps,
    Pte, SpaceId, PAGE,
};

/// How to set a driver up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Private or coherent; `None` picks coherent where the device's memory is host-visible
    /// and coherent, private elsewhere.
    pub kind: Option<MemoryKind>,
    /// Pages brought back per CPU fault (an aligned window around the faulting page; 1 to
    /// [`MAX_FAULT_AROUND`], values outside are clamped).
    pub fault_around: usize,
    /// Device pages the driver keeps before it evicts (at most the device's budget).
    pub budget_pages: Option<usize>,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            kind: Some(MemoryKind::DevicePrivate),
            fault_around: 16,
            budget_pages: None,
        }
    }
}

/// The largest fault-around window, in pages (one chunk).
pub const MAX_FAULT_AROUND: usize = CHUNK_PAGES;

/// Counters of a driver's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Bytes copied host -> device.
    pub bytes_to_device: u64,
    /// Bytes copied device -> host.
    pub bytes_to_host: u64,
    /// CPU faults served.
    pub faults: u64,
    /// Pages evicted to make room.
    pub evictions: u64,
    /// Nanoseconds spent waiting for copies.
    pub copy_ns: u64,
    /// Nanoseconds spent in migration bookkeeping (setup, pages, finalize, allocation).
    pub bookkeeping_ns: u64,
}

#[derive(Default)]
struct Counters {
    to_device: AtomicU64,
    to_host: AtomicU64,
    faults: AtomicU64,
    evictions: AtomicU64,
    copy_ns: AtomicU64,
    book_ns: AtomicU64,
}

/// What one migration did: the migration layer's [`Outcome`], summed over chunks.
pub type Moved = Outcome;

pub(crate) struct Inner {
    pub(crate) device: Device,
    pub(crate) pagemap: Arc<PageMap>,
    pub(crate) owner: u64,
    kind: MemoryKind,
    fault_around: usize,
    pub(crate) budget_pages: usize,
    counters: Counters,
    pub(crate) resident: Resident,
    /// Device page tables, one per address space that launched a kernel.
    pub(crate) tables: Mutex<HashMap<SpaceId, Arc<SpaceTable>>>,
    /// The pagemap callbacks (they outlive the driver).
    ops: Arc<Ops>,
}

/// The driver's pagemap callbacks. Once the driver is gone, a device that still holds pages
/// (its teardown could not bring them all home: no host frames) stays here, so that a fault
/// can still copy a page home and a freed page still goes back to the device.
struct Ops {
    driver: std::sync::Weak<Inner>,
    orphan: Mutex<Option<(Device, u64)>>,
}

impl Ops {
    /// The device to free pages into: the driver's, or the orphaned one.
    fn device(&self) -> Option<Device> {
        match self.driver.upgrade() {
            Some(d) => Some(d.device.clone()),
            None => self.orphan.lock().as_ref().map(|(d, _)| d.clone()),
        }
    }
}

impl PagemapOps for Ops {
    fn page_free(&self, page: &Page) {
        if let Some(d) = self.device() {
            if let Err(e) = d.free_page(page.pfn()) {
                tracing::error!("page_free {}: {e}", page.pfn());
            }
        }
    }

    fn pages_free(&self, pages: &[&Page]) {
        if let Some(d) = self.device() {
            let pfns: Vec<Pfn> = pages.iter().map(|p| p.pfn()).collect();
            if let Err(e) = d.free_pages(&pfns) {
                tracing::error!("pages_free of {} pages: {e}", pfns.len());
            }
        }
    }

    fn migrate_to_ram(&self, f: FaultContext<'_>) -> Result<()> {
        let Some(d) = self.driver.upgrade() else {
            let orphan = self.orphan.lock().clone();
            return match orphan {
                Some((device, owner)) => bring_home(&device, owner, &f),
                None => Err(Error::Engine(EngineError::DeviceLost(
                    "the page's driver was dropped".into(),
                ))),
            };
        };
        d.counters.faults.fetch_add(1, Ordering::Relaxed);
        // An aligned window around the fault, clipped to the mapping.
        let vma = f.space.vma(f.addr).ok_or(Error::NotMapped(f.addr))?;
        let span = d.fault_around as u64 * PAGE;
        let start = (f.addr / span * span).max(vma.start);
        let end = start.saturating_add(span).min(vma.end);
        let flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
        let fault_page = Some(f.page.pfn());
        let moved = match d.migrate(f.space, start, end, flags, fault_page, false) {
            // Short of host frames for the window: the faulting page alone may still fit.
            Err(e) if e.kind() == ErrorKind::OutOfMemory && end - start > PAGE => {
                d.migrate(f.space, f.addr, f.addr + PAGE, flags, fault_page, false)?
            }
            other => other?,
        };
        // A fault whose page could not be copied back fails (it would fault forever).
        let stayed =
            matches!(f.space.pte(f.addr), Pte::DevicePrivate { pfn, .. } if pfn == f.page.pfn());
        if moved.failed > 0 && stayed {
            return Err(Error::FaultFailed {
                addr: f.addr,
                reason: format!("the copy of device page {} to host failed", f.page.pfn()),
            });
        }
        Ok(())
    }
}

/// Pages per chunk of a pipelined migration (64 MiB): on lavapipe, 16 MiB chunks measured
/// 152 ms per 256 MiB round trip, 64 MiB chunks 83 ms, one 256 MiB batch 74-87 ms.
pub const CHUNK_PAGES: usize = 16384;

/// The driver. Cloning gives another handle.
#[derive(Clone)]
pub struct GpuDriver {
    pub(crate) inner: Arc<Inner>,
    pgmap: DevicePagemap,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(0x4745_5500);

impl GpuDriver {
    /// Registers `device`'s memory in `pagemap`.
    pub fn new(device: Device, pagemap: &Arc<PageMap>, config: DriverConfig) -> Result<GpuDriver> {
        let kind = config.kind.unwrap_or(if device.info().host_visible_memory {
            MemoryKind::DeviceCoherent
        } else {
            MemoryKind::DevicePrivate
        });
        let budget = config
            .budget_pages
            .unwrap_or(usize::MAX)
            .min(device.budget_pages());
        if budget == 0 {
            return Err(Error::InvalidArgument("driver budget of 0 pages"));
        }
        let owner = NEXT_OWNER.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new_cyclic(|me| Inner {
            device: device.clone(),
            pagemap: pagemap.clone(),
            owner,
            kind,
            fault_around: config.fault_around.clamp(1, MAX_FAULT_AROUND),
            budget_pages: budget,
            counters: Counters::default(),
            resident: Resident::default(),
            tables: Mutex::new(HashMap::new()),
            ops: Arc::new(Ops {
                driver: me.clone(),
                orphan: Mutex::new(None),
            }),
        });
        let access: Option<Arc<dyn FrameAccess>> =
            (kind == MemoryKind::DeviceCoherent).then(|| Arc::new(device.clone()) as _);
        let ops = inner.ops.clone();
        let pgmap = pagemap.register_device(device.pfn_range(), kind, owner, ops, access)?;
        Ok(GpuDriver { inner, pgmap })
    }

    /// The engine device.
    pub fn device(&self) -> &Device {
        &self.inner.device
    }
    /// The page map.
    pub fn pagemap(&self) -> &Arc<PageMap> {
        &self.inner.pagemap
    }
    /// The registered pagemap (range, kind, owner).
    pub fn pgmap(&self) -> &DevicePagemap {
        &self.pgmap
    }
    /// The owner cookie of this driver's pages.
    pub fn owner(&self) -> u64 {
        self.inner.owner
    }
    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.inner.kind
    }

    /// Marks the device pages behind `npages` pages from `addr` as recently used, so that
    /// eviction passes them over once. Counts past the top of the address space stop there;
    /// only mapped pages are visited.
    pub fn touch(&self, space: &AddressSpace, addr: u64, npages: usize) {
        let end = (npages as u64)
            .checked_mul(PAGE)
            .and_then(|b| addr.checked_add(b))
            .unwrap_or(u64::MAX);
        space.for_each_entry(addr, end, |_, pte| {
            if let Some(p) = pte.pfn().and_then(|pfn| self.inner.pagemap.page(pfn)) {
                if p.owner() == self.inner.owner {
                    p.set_driver_data(p.driver_data() | super::evict::YOUNG);
                }
            }
        });
    }

    /// Pages brought back per CPU fault.
    pub(crate) fn fault_around(&self) -> usize {
        self.inner.fault_around
    }

    /// Device pages the driver may hold.
    pub fn budget_pages(&self) -> usize {
        self.inner.budget_pages
    }
    /// Entries of the eviction queue (bounded by about twice the pages in use).
    pub fn eviction_queue_len(&self) -> usize {
        self.inner.resident.len()
    }
    /// Device pages in use now.
    pub fn resident_pages(&self) -> usize {
        self.inner.device.pages_in_use()
    }

    /// Counters so far.
    pub fn stats(&self) -> DriverStats {
        let c = &self.inner.counters;
        DriverStats {
            bytes_to_device: c.to_device.load(Ordering::Relaxed),
            bytes_to_host: c.to_host.load(Ordering::Relaxed),
            faults: c.faults.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            copy_ns: c.copy_ns.load(Ordering::Relaxed),
            bookkeeping_ns: c.book_ns.load(Ordering::Relaxed),
        }
    }

    /// Migrates `npages` pages from `addr` to the device, evicting least recently used pages
    /// first if the budget requires.
    pub fn migrate_to_device(
        &self,
        space: &AddressSpace,
        addr: u64,
        npages: usize,
    ) -> Result<Moved> {
        self.inner.migrate_range_to_device(space, addr, npages)
    }

    /// Migrates this driver's pages among `npages` pages from `addr` back to host memory.
    pub fn migrate_to_host(&self, space: &AddressSpace, addr: u64, npages: usize) -> Result<Moved> {
        let flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT;
        let end = crate::mm::space::pages_end(addr, npages)?;
        self.inner.migrate(space, addr, end, flags, None, false)
    }

    /// Brings `npages` pages from `addr` to the device and holds them there (no eviction, no
    /// migration) until the guard drops, writable by a device kernel. Pages already on the
    /// device are pinned first, so bringing in the rest cannot evict them. A page shared
    /// after fork is copied first (as a CPU write would copy it); a read-only mapping fails
    /// with [`Error::WriteDenied`]. A range mapped for CPU pointers is refused with
    /// [`Error::InvalidArgument`]: only its buffer knows its views (`Buffer::pin_on_device`).
    pub fn pin_on_device(
        &self,
        space: &AddressSpace,
        addr: u64,
        npages: usize,
    ) -> Result<DevicePin> {
        space.refuse_homed(addr, npages.saturating_mul(PAGE_SIZE))?;
        self.inner.pin_on_device(space, addr, npages)
    }

    /// `pin_on_device` of any range, for a caller that has checked its buffer's views.
    pub(crate) fn pin_on_device_unchecked(
        &self,
        space: &AddressSpace,
        addr: u64,
        npages: usize,
    ) -> Result<DevicePin> {
        self.inner.pin_on_device(space, addr, npages)
    }

    /// Runs `kernel` (see [`hetmem_engine::Device::compile_kernel`]) over `groups`
    /// workgroups on the pages of `ranges` (address, pages) of `space`: they are brought to
    /// the device and pinned, the space's device page table is brought up to date, and
    /// bound buffer `i` of the kernel (`hm_ptr(i, offset)` in WGSL) is `ranges[i]`; `args`
    /// are its `hm_arg` words. The pins hold until the launch is waited on or dropped.
    /// Ranges mapped for CPU pointers are refused with [`Error::InvalidArgument`]: only their
    /// buffers know their views (`Context::launch`).
    pub fn launch(
        &self,
        space: &AddressSpace,
        kernel: &Kernel,
        ranges: &[(u64, usize)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        for &(addr, n) in ranges {
            space.refuse_homed(addr, n.saturating_mul(PAGE_SIZE))?;
        }
        self.inner.launch(space, kernel, ranges, args, groups)
    }

    /// `launch` over any ranges, for a caller that has checked their buffers' views.
    pub(crate) fn launch_unchecked(
        &self,
        space: &AddressSpace,
        kernel: &Kernel,
        ranges: &[(u64, usize)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        self.inner.launch(space, kernel, ranges, args, groups)
    }

    /// The device page behind `addr` in `space`'s device page table, if the table maps it
    /// (what a kernel would use).
    pub fn table_entry(&self, space: &AddressSpace, addr: u64) -> Option<Pfn> {
        let t = self.inner.tables.lock().get(&space.id()).cloned()?;
        t.entry(addr)
    }

    /// Evicts up to `npages` least recently used device pages to host; returns how many moved.
    pub fn evict(&self, npages: usize) -> Result<usize> {
        self.inner.evict(npages)
    }

    /// Evicts every device page (device removal, shutdown).
    pub fn evict_all(&self) -> Result<usize> {
        self.inner.evict(usize::MAX)
    }
}

impl Inner {
    /// Migrates `npages` pages from `addr` to the device.
    pub(crate) fn migrate_range_to_device(
        &self,
        space: &AddressSpace,
        addr: u64,
        npages: usize,
    ) -> Result<Moved> {
        let end = crate::mm::space::pages_end(addr, npages)?;
        self.migrate(space, addr, end, MIGRATE_VMA_SELECT_SYSTEM, None, true)
    }

    /// Migrates `[start, end)` in chunks of at most [`CHUNK_PAGES`] inside one mapping each,
    /// pipelined: while the copy of
    /// one chunk runs, the next chunk is collected and its copy submitted; then the first
    /// finishes (pages, finalize). `to_device` selects the direction.
    ///
    /// Every chunk is a [`Migration`], which owns its pages from setup to finalize: an error
    /// anywhere (no destinations, a bad destination) drops the chunks in hand, which waits
    /// for their copies and restores their pages. Destinations that cannot be had are an
    /// error ([`ErrorKind::OutOfMemory`](crate::ErrorKind)) unless the device budget merely
    /// leaves room for fewer pages, which migrates what fits.
    fn migrate(
        &self,
        space: &AddressSpace,
        start: u64,
        end: u64,
        flags: u32,
        fault_page: Option<Pfn>,
        to_device: bool,
    ) -> Result<Moved> {
        let mut total = Moved::default();
        let mut failed = 0;
        let mut pending: Option<(Migration<'_, InFlight>, Instant, u64)> = None;
        // With more than one chunk, the calling thread's time goes to the next chunk's
        // page-table work while the device copies (on lavapipe: 0.64x -> 0.75x of two memcpys
        // for a 256 MiB round trip); a single chunk lets a CPU device share the copy instead.
        let pipelined = end - start > CHUNK_PAGES as u64 * PAGE;
        let mut at = start;
        while at < end {
            // A chunk stays inside one mapping (a range may span several, after an mprotect
            // or munmap of part of it): a gap is an error.
            let vma_end = match space.vma(at) {
                Some(v) => v.end,
                None if pending.is_none() => return Err(Error::NotMapped(at)),
                None => {
                    if let Some(done) = pending.take() {
                        let _ = self.complete(space, done, to_device, &mut total);
                    }
                    return Err(Error::NotMapped(at));
                }
            };
            let stop = end.min(at + CHUNK_PAGES as u64 * PAGE).min(vma_end);
            let next = match self.begin(space, at, stop, flags, fault_page, to_device, pipelined) {
                Ok(next) => next,
                Err(e) => {
                    // The chunk in flight still completes: what it moved stays moved.
                    if let Some(done) = pending.take() {
                        let _ = self.complete(space, done, to_device, &mut total);
                    }
                    return Err(e);
                }
            };
            if let Some(done) = pending.replace(next) {
                failed += self.complete(space, done, to_device, &mut total)?;
            }
            at = stop;
        }
        if let Some(done) = pending {
            failed += self.complete(space, done, to_device, &mut total)?;
        }
        total.failed = failed;
        Ok(total)
    }

    /// Collects a chunk, gives it destinations and submits its copy; returns it with the
    /// submission time and the space's invalidation sequence after setup.
    #[allow(clippy::too_many_arguments)]
    fn begin<'s>(
        &self,
        space: &'s AddressSpace,
        start: u64,
        end: u64,
        flags: u32,
        fault_page: Option<Pfn>,
        to_device: bool,
        pipelined: bool,
    ) -> Result<(Migration<'s, InFlight>, Instant, u64)> {
        let t0 = Instant::now();
        let mut m = Migration::setup(space, start, end, flags, self.owner, fault_page)?;
        let seq = space.invalidate_seq();
        let want: Vec<(usize, bool)> = m.collected().map(|(i, s)| (i, s.is_none())).collect();
        let holes = want.iter().filter(|(_, hole)| *hole).count();
        let home = space.vma(start).and_then(|v| v.home).filter(|_| !to_device);
        if let Some(home) = home {
            // Pages of a range mapped for CPU pointers come back to their own frames.
            let dsts = self.home_pages(home, &m, &want)?;
            let dst = m.dst_mut();
            for (&(i, _), d) in want.iter().zip(dsts) {
                dst[i] = migrate_pfn(d);
            }
        }
        let dsts = if home.is_some() {
            Vec::new()
        } else if to_device {
            self.device_pages(want.len(), holes)?
        } else {
            self.host_pages(want.len(), holes)?
        };
        // Holes first in the allocation (they were asked zeroed), then copied pages.
        let skip = holes.min(dsts.len());
        let mut hole_dsts = dsts[..skip].iter();
        let mut copy_dsts = dsts[skip..].iter();
        let dst = m.dst_mut();
        for &(i, hole) in &want {
            let d = if hole {
                hole_dsts.next()
            } else {
                copy_dsts.next()
            };
            if let Some(&d) = d {
                dst[i] = migrate_pfn(d);
            }
        }
        // Destinations the budget left no room for (fewer pages than entries) go back.
        let unused: Vec<Pfn> = hole_dsts.chain(copy_dsts).copied().collect();
        for pfn in unused {
            if let Some(p) = self.pagemap.page(pfn) {
                p.unlock();
                self.pagemap.put_page(p);
            }
        }
        let submitted = Instant::now();
        let device = &self.device;
        let m = m.submit(|pairs| {
            if pipelined {
                device.copy_queued(pairs)
            } else {
                device.copy(pairs)
            }
        });
        self.counters
            .book_ns
            .fetch_add((submitted - t0).as_nanos() as u64, Ordering::Relaxed);
        Ok((m, submitted, seq))
    }

    /// Waits for a chunk's copy, then runs pages and finalize; pages whose copy failed stay
    /// behind. Returns how many did.
    fn complete(
        &self,
        space: &AddressSpace,
        (m, submitted, seq): (Migration<'_, InFlight>, Instant, u64),
        to_device: bool,
        total: &mut Moved,
    ) -> Result<usize> {
        let m = m.wait();
        let t1 = Instant::now();
        self.counters
            .copy_ns
            .fetch_add((t1 - submitted).as_nanos() as u64, Ordering::Relaxed);
        let m = m?;
        let table = if to_device {
            self.tables.lock().get(&space.id()).cloned()
        } else {
            None
        };
        let mut entries = Vec::new();
        if to_device {
            let moving: Vec<(usize, Pfn)> = m.moving().collect();
            self.resident.add_all(
                &self.pagemap,
                moving.iter().map(|&(_, pfn)| pfn),
                self.device.pages_in_use(),
            );
            if table.is_some() {
                entries.extend(moving.iter().map(|&(i, pfn)| (m.addr(i), pfn)));
            }
        }
        // The new pages are still locked: nobody can move them before their entries exist.
        if let Some(t) = table {
            t.migrated(space, seq, &entries);
        }
        // Bytes copied: holes moved without a copy.
        let copied = m
            .moving()
            .filter(|&(i, _)| m.src()[i] & MIGRATE_PFN_VALID != 0)
            .count();
        let outcome = m.finalize();
        let bytes = (copied * PAGE_SIZE) as u64;
        if to_device {
            self.counters.to_device.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.counters.to_host.fetch_add(bytes, Ordering::Relaxed);
        }
        self.counters
            .book_ns
            .fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
        total.cpages += outcome.cpages;
        total.migrated += outcome.migrated;
        Ok(outcome.failed)
    }

    /// Up to `n` locked device pages (fewer, maybe none, where the budget leaves no more
    /// room after eviction: what does not fit stays behind), the first `zeroed` of them
    /// reading as zeros (for holes), the rest holding whatever they held (copies overwrite
    /// them). Fails if the device's allocator does.
    fn device_pages(&self, n: usize, zeroed: usize) -> Result<Vec<Pfn>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let in_use = self.device.pages_in_use();
        let room = self.budget_pages.saturating_sub(in_use);
        let mut evicted = Ok(0);
        if room < n {
            evicted = self.evict(n - room);
            if let Err(e) = &evicted {
                tracing::warn!("eviction failed: {e}");
            }
        }
        let room = self
            .budget_pages
            .saturating_sub(self.device.pages_in_use())
            .min(n);
        if room == 0 {
            // No room, and eviction could not make any for want of memory: say so.
            if let Err(e) = evicted {
                if e.kind() == ErrorKind::OutOfMemory {
                    return Err(e);
                }
            }
        }
        let zeroed = zeroed.min(room);
        let allocated = self.device.alloc_pages(zeroed, true).and_then(|mut z| {
            match self.device.alloc_pages(room - zeroed, false) {
                Ok(rest) => {
                    z.extend(rest);
                    Ok(z)
                }
                Err(e) => {
                    let _ = self.device.free_pages(&z);
                    Err(e)
                }
            }
        });
        let pfns = match allocated {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("device allocation of {room} pages failed: {e}");
                return Err(e.into());
            }
        };
        for &p in &pfns {
            self.pagemap
                .init_device_page(p, true)
                .expect("fresh device page");
        }
        Ok(pfns)
    }

    /// `n` locked host pages, the first `zeroed` of them reading as zeros (for holes: a page
    /// that reaches an owner unwritten must never show an earlier owner's bytes); all or
    /// none.
    fn host_pages(&self, n: usize, zeroed: usize) -> Result<Vec<Pfn>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let frames = self.pagemap.frames();
        let mut pfns = frames.alloc_batch(zeroed, true)?;
        match frames.alloc_batch(n - zeroed, false) {
            Ok(rest) => pfns.extend(rest),
            Err(e) => {
                let _ = frames.free_batch(&pfns);
                return Err(e.into());
            }
        }
        for &p in &pfns {
            self.pagemap.alloc_system_at(p, true);
        }
        Ok(pfns)
    }

    /// Locked host pages for the collected entries `want` (index, hole) of `m`, in order:
    /// each entry's home frame, or (if that is still in use) any frame; all or none.
    fn home_pages(
        &self,
        home: crate::mm::Home,
        m: &Migration<'_, crate::migration::Collected>,
        want: &[(usize, bool)],
    ) -> Result<Vec<Pfn>> {
        let mut got: Vec<Pfn> = Vec::with_capacity(want.len());
        for &(i, hole) in want {
            let at = home.of(m.addr(i));
            let page = match self.pagemap.claim_home(at, hole, true) {
                Ok(p) => Ok(p),
                Err(_) => self.pagemap.alloc_system(hole, true),
            };
            match page {
                Ok(p) => got.push(p.pfn()),
                Err(e) => {
                    for &pfn in &got {
                        if let Some(p) = self.pagemap.page(pfn) {
                            p.unlock();
                            self.pagemap.put_page(p);
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(got)
    }

    /// Evicts up to `n` device pages, least recently used first, as one
    /// [`DeviceMigration`]; pinned or busy pages are skipped. Host frames that cannot be had
    /// are an error, with every page left on the device.
    pub(crate) fn evict(&self, n: usize) -> Result<usize> {
        let victims = self.resident.victims(&self.pagemap, n);
        if victims.is_empty() {
            return Ok(0);
        }
        let t0 = Instant::now();
        let m = DeviceMigration::pfns(&self.pagemap, &victims);
        let mut m = match m {
            Ok(m) => m,
            Err(e) => {
                self.resident.restore(&victims);
                return Err(e);
            }
        };
        let want: Vec<usize> = m.collected().map(|(i, _)| i).collect();
        let hosts = match self.host_pages(want.len(), 0) {
            Ok(h) => h,
            Err(e) => {
                drop(m);
                self.resident.restore(&victims);
                return Err(e);
            }
        };
        let dst = m.dst_mut();
        for (&i, &h) in want.iter().zip(&hosts) {
            dst[i] = migrate_pfn(h);
        }
        let t1 = Instant::now();
        let m = m.submit(|pairs| self.device.copy(pairs)).wait();
        let t2 = Instant::now();
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                self.resident.restore(&victims);
                return Err(e);
            }
        };
        let moving: std::collections::HashSet<usize> = m.moving().map(|(i, _)| i).collect();
        let stayed: Vec<Pfn> = victims
            .iter()
            .enumerate()
            .filter(|(i, _)| !moving.contains(i))
            .map(|(_, &v)| v)
            .collect();
        let outcome = m.finalize();
        self.resident.restore(&stayed);
        let moved = outcome.migrated;
        let c = &self.counters;
        c.evictions.fetch_add(moved as u64, Ordering::Relaxed);
        c.to_host
            .fetch_add((moved * PAGE_SIZE) as u64, Ordering::Relaxed);
        c.copy_ns
            .fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
        c.book_ns.fetch_add(
            ((t1 - t0) + t2.elapsed()).as_nanos() as u64,
            Ordering::Relaxed,
        );
        if outcome.failed > 0 {
            return Err(Error::FaultFailed {
                addr: 0,
                reason: format!(
                    "{} device pages could not be copied to host",
                    outcome.failed
                ),
            });
        }
        Ok(moved)
    }
}

impl Drop for Inner {
    /// Brings every page home before the device goes: nothing on it is lost, and a later
    /// CPU access to those addresses finds host pages. (Pinned pages cannot be here: a pin
    /// holds the driver.) The pagemap callbacks hold the device meanwhile, so the evicted
    /// pages go back to it; if some cannot come home (no host frames), they keep holding it,
    /// and a later fault brings each page home then.
    fn drop(&mut self) {
        *self.ops.orphan.lock() = Some((self.device.clone(), self.owner));
        loop {
            match self.evict(usize::MAX) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("driver teardown: evicting its pages failed: {e}");
                    break;
                }
            }
        }
        self.resident.clear();
        if self.device.pages_in_use() == 0 {
            *self.ops.orphan.lock() = None;
        }
    }
}

/// A fault on a page of a driver that is gone: the page alone comes home through the device
/// the driver left behind.
fn bring_home(device: &Device, owner: u64, f: &FaultContext<'_>) -> Result<()> {
    let pm = f.space.pagemap();
    let mut m = Migration::setup(
        f.space,
        f.addr,
        f.addr + PAGE,
        MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
        owner,
        Some(f.page.pfn()),
    )?;
    let want: Vec<usize> = m.collected().map(|(i, _)| i).collect();
    if want.is_empty() {
        return Ok(());
    }
    let frames = pm.frames().alloc_batch(want.len(), false)?;
    for (&i, &h) in want.iter().zip(&frames) {
        pm.alloc_system_at(h, true);
        m.dst_mut()[i] = migrate_pfn(h);
    }
    let out = m.submit(|pairs| device.copy(pairs)).wait()?.finalize();
    if out.failed > 0 {
        return Err(Error::FaultFailed {
            addr: f.addr,
            reason: format!("the copy of device page {} to host failed", f.page.pfn()),
        });
    }
    Ok(())
}
