//! The driver's state ([`Inner`]) and what it does with it: migrations in pipelined chunks
//! in both directions (collect, allocate destinations, copy, finalize), and eviction of the
//! least recently used pages (the clock is in `evict`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hetmem_engine::{Device, Pfn, PAGE_SIZE};
use parking_lot::Mutex;

use super::evict::Resident;
use super::gpu::CHUNK_PAGES;
use super::ops::Ops;
use super::table::SpaceTable;
use crate::error::{Error, ErrorKind, Result};
use crate::migration::*;
use crate::mm::{AddressSpace, MemoryKind, Owner, PageMap, SpaceId, VirtAddr, PAGE};

/// The driver's counters, read by [`GpuDriver::stats`](super::GpuDriver::stats).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) to_device: AtomicU64,
    pub(crate) to_host: AtomicU64,
    pub(crate) faults: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) copy_ns: AtomicU64,
    pub(crate) book_ns: AtomicU64,
}

/// The driver's state, shared by its handles, its pins and launches, and (weakly) its
/// pagemap callbacks.
pub(crate) struct Inner {
    pub(crate) device: Device,
    pub(crate) pagemap: Arc<PageMap>,
    pub(crate) owner: Owner,
    pub(crate) kind: MemoryKind,
    pub(crate) fault_around: usize,
    pub(crate) budget_pages: usize,
    pub(crate) counters: Counters,
    pub(crate) resident: Resident,
    /// Device page tables, one per address space that launched a kernel.
    pub(crate) tables: Mutex<HashMap<SpaceId, Arc<SpaceTable>>>,
    /// The pagemap callbacks (they outlive the driver).
    pub(crate) ops: Arc<Ops>,
}

impl Inner {
    /// The state of a new driver of `device`'s pages (`owner`, `kind`) in `pagemap`, with
    /// its pagemap callbacks, not registered yet.
    pub(crate) fn new(
        device: Device,
        pagemap: &Arc<PageMap>,
        owner: Owner,
        kind: MemoryKind,
        fault_around: usize,
        budget_pages: usize,
    ) -> Arc<Inner> {
        Arc::new_cyclic(|me| Inner {
            device,
            pagemap: pagemap.clone(),
            owner,
            kind,
            fault_around,
            budget_pages,
            counters: Counters::default(),
            resident: Resident::default(),
            tables: Mutex::new(HashMap::new()),
            ops: Arc::new(Ops::new(me.clone())),
        })
    }
}

impl Inner {
    /// Migrates `npages` pages from `addr` to the device.
    pub(crate) fn migrate_range_to_device(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Outcome> {
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
    pub(crate) fn migrate(
        &self,
        space: &AddressSpace,
        start: VirtAddr,
        end: VirtAddr,
        flags: u32,
        fault_page: Option<Pfn>,
        to_device: bool,
    ) -> Result<Outcome> {
        let mut total = Outcome::default();
        let mut failed = 0;
        let mut pending: Option<(Migration<'_, InFlight>, Instant, u64)> = None;
        // With more than one chunk, the calling thread's time goes to the next chunk's
        // page-table work while the device copies; on lavapipe, queued batches go to the
        // engine's CPU copier, which the waiting thread helps (a 256 MiB round trip went from
        // 0.56x to 0.76-0.88x of two memcpys). A single chunk lets a CPU device share the copy
        // with the calling thread instead.
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
        start: VirtAddr,
        end: VirtAddr,
        flags: u32,
        fault_page: Option<Pfn>,
        to_device: bool,
        pipelined: bool,
    ) -> Result<(Migration<'s, InFlight>, Instant, u64)> {
        let t0 = Instant::now();
        // The driver's public calls refused ranges mapped for CPU pointers; the offload
        // layer's own migrations of them come through here.
        let mut m =
            Migration::setup_checked(space, start, end, flags, self.owner, fault_page, true)?;
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
        // SAFETY: the migration holds every page of the batch locked and unmapped (CPU
        // pointers included) until the copy settles.
        let m = m.submit(|pairs| unsafe { device.copy_owned(pairs, pipelined) });
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
        total: &mut Outcome,
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
        if outcome.device_lost {
            // Every page of the chunk stayed where it was; the caller hears why.
            return Err(lost(outcome.failed));
        }
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
        if let Err(e) = self.pagemap.alloc_system_at(&pfns, true) {
            let _ = frames.free_batch(&pfns);
            return Err(e);
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
        // Frames punched while their pages were on the device get memory again in runs.
        self.pagemap.frames().refill_punched(&got);
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
        // SAFETY: as above: the batch's pages are locked and unmapped until it settles.
        let m = m
            .submit(|pairs| unsafe { self.device.copy_owned(pairs, false) })
            .wait();
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
        if outcome.device_lost {
            return Err(lost(outcome.failed));
        }
        if outcome.failed > 0 {
            return Err(Error::FaultFailed {
                addr: VirtAddr(0),
                reason: format!(
                    "{} device pages could not be copied to host",
                    outcome.failed
                ),
            });
        }
        Ok(moved)
    }
}

/// The error of a migration whose copy was lost with the device.
fn lost(pages: usize) -> Error {
    Error::Engine(hetmem_engine::EngineError::DeviceLost(format!(
        "the copy of {pages} pages did not complete: every page stayed where it was"
    )))
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
