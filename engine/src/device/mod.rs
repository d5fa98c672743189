//! A device: one GPU (or the built-in host device), its memory as numbered pages, and batched
//! page copies between it and the host frame pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::config::{DeviceConfig, DeviceInfo, DeviceType, HostAccess};
use crate::copy::{plan_batch, CopyPlan, Place};
use crate::error::{EngineError, Result};
use crate::frames::{HostFramePool, Settle};
use crate::inject::Injections;
use crate::kernel::KernelHost;
use crate::pagemap::DevicePages;
use crate::pfn::{Pfn, PfnRange, PAGE_SIZE};

mod holds;
mod kernels;

use crate::bitmap::{bit_words, AtomicBitmap};
use holds::Hold;

/// Counters of a device's copy work since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Batches submitted.
    pub batches: u64,
    /// Pages copied.
    pub pages: u64,
    /// Copy regions recorded (after coalescing).
    pub regions: u64,
    /// Pages that went through the gather kernel.
    pub gathered_pages: u64,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    pages: AtomicU64,
    regions: AtomicU64,
    gathered: AtomicU64,
}

struct Shared {
    info: DeviceInfo,
    frames: Arc<HostFramePool>,
    pages: Mutex<DevicePages>,
    /// One bit lock per device page, held while `read_page`, `write_page` or zeroing touch its
    /// bytes, and by a copy from its submission until it has completed (the frames' bits are
    /// the pool's): no two accesses race on a page's bytes.
    held: AtomicBitmap,
    /// The frame numbers of the device's pages (fixed at open).
    page_range: PfnRange,
    /// Batches in flight and the frame and page bits each holds, in submission order.
    holds: Mutex<Vec<Hold>>,
    counters: Counters,
    injections: Mutex<Injections>,
    backend: Box<dyn Backend>,
}

impl KernelHost for Shared {
    fn destroy_kernel(&self, id: u64) {
        self.backend.destroy_kernel(id);
    }

    fn free_table(&self, id: u64) {
        self.backend.free_table(id);
    }

    fn pfn_range(&self) -> PfnRange {
        self.page_range
    }

    fn wait_for(&self, value: u64) {
        if let Err(e) = self.backend.wait(value) {
            tracing::debug!("waiting for dispatch {value}: {e}");
            self.give_up(value);
        }
        self.settle();
    }

    fn completed(&self, value: u64) -> bool {
        self.finished(value)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Every ticket is gone, and each waited for its batch: what is left unlocks now.
        for h in std::mem::take(self.holds.get_mut()) {
            self.release(&h);
        }
        let chunks = self.pages.get_mut().chunks();
        for c in 0..chunks {
            self.backend.free_chunk(c);
        }
    }
}

/// An open device. Cloning gives another handle to the same device.
#[derive(Clone)]
pub struct Device {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("info", &self.shared.info)
            .finish()
    }
}

impl Device {
    /// Opens the device that `config` selects (see [`DeviceConfig`]), and logs which and why.
    pub fn open(config: DeviceConfig) -> Result<Device> {
        let pages = DevicePages::new(config.budget_bytes, config.chunk_bytes)?;
        let frames = config
            .frames
            .clone()
            .unwrap_or_else(|| HostFramePool::global().clone());
        let (info, backend) = crate::select::open_backend(&config, &frames)?;
        if info.host_access == HostAccess::Import && info.device_type != DeviceType::Cpu {
            // A GPU pins the host frames it imports: a frame punched out of the pool's file
            // afterwards would no longer be the page it copies into (see `frames/holes.rs`).
            frames.forbid_home_punching();
        }
        tracing::info!(
            device = %info.name,
            kind = ?info.kind,
            reason = %info.reason,
            "hetmem device chosen"
        );
        let page_range = pages.range();
        let held = AtomicBitmap::new(page_range.count as usize);
        let shared = Arc::new(Shared {
            info,
            frames: frames.clone(),
            pages: Mutex::new(pages),
            held,
            page_range,
            holds: Mutex::new(Vec::new()),
            counters: Counters::default(),
            injections: Mutex::new(Injections::default()),
            backend,
        });
        let weak: std::sync::Weak<dyn Settle> = Arc::downgrade(&shared) as _;
        frames.add_device(weak);
        Ok(Device { shared })
    }

    /// Which device this is, and why it was chosen.
    pub fn info(&self) -> &DeviceInfo {
        &self.shared.info
    }

    /// The host frame pool this device copies to and from.
    pub fn frames(&self) -> &Arc<HostFramePool> {
        &self.shared.frames
    }

    /// The frame numbers of this device's pages.
    pub fn pfn_range(&self) -> PfnRange {
        KernelHost::pfn_range(&*self.shared)
    }

    /// True if `pfn` is one of this device's pages (allocated or not).
    pub fn owns(&self, pfn: Pfn) -> bool {
        self.pfn_range().contains(pfn)
    }

    /// True if `pfn` is one of this device's pages and is allocated.
    pub fn is_allocated(&self, pfn: Pfn) -> bool {
        self.shared.pages.lock().is_allocated(pfn)
    }

    /// The budget in pages.
    pub fn budget_pages(&self) -> usize {
        self.shared.pages.lock().budget_pages()
    }

    /// Device pages currently allocated.
    pub fn pages_in_use(&self) -> usize {
        self.shared.pages.lock().in_use()
    }

    /// Device pages that can still be allocated within the budget.
    pub fn pages_available(&self) -> usize {
        self.shared.pages.lock().available()
    }

    /// Bytes of device memory reserved in chunks (never more than the budget).
    pub fn reserved_bytes(&self) -> u64 {
        let p = self.shared.pages.lock();
        (0..p.chunks()).map(|c| p.chunk_bytes(c)).sum()
    }

    /// Allocates one device page.
    pub fn alloc_page(&self, zeroed: bool) -> Result<Pfn> {
        Ok(self.alloc_pages(1, zeroed)?[0])
    }

    /// Allocates `n` device pages, all or none, in ascending order. With `zeroed`, every page
    /// reads as zeros, whatever it held before.
    pub fn alloc_pages(&self, n: usize, zeroed: bool) -> Result<Vec<Pfn>> {
        let mut pages = self.shared.pages.lock();
        let grant = pages.take(n)?;
        for c in grant.new_chunks.clone() {
            if let Err(e) = self.shared.backend.alloc_chunk(c, pages.chunk_bytes(c)) {
                pages.untake(&grant.slots);
                return Err(e);
            }
            pages.chunks_created(c + 1);
        }
        let pfns: Vec<Pfn> = grant.slots.iter().map(|&s| pages.pfn(s)).collect();
        if !zeroed {
            return Ok(pfns);
        }
        let dirty: Vec<usize> = grant
            .slots
            .iter()
            .map(|&s| s as usize)
            .filter(|&s| pages.is_dirty(s))
            .collect();
        if dirty.is_empty() {
            return Ok(pfns);
        }
        let locs: Vec<Place> = dirty.iter().map(|&s| pages.location(s)).collect();
        // Zeroing holds the pages' bits (so no read of them sees it half done), and waits for
        // them without the pages' lock, which a holder may need before it lets go.
        drop(pages);
        let sh = &self.shared;
        let held = sh
            .held
            .lock_words(bit_words(dirty.iter().copied()), &mut || sh.settle())
            .keep();
        let zeroed = sh.backend.zero_pages(&locs);
        sh.held.unlock_words(&held);
        let mut pages = sh.pages.lock();
        if let Err(e) = zeroed {
            pages.untake(&grant.slots);
            return Err(e);
        }
        for s in dirty {
            pages.mark_clean(s);
        }
        Ok(pfns)
    }

    /// Frees one device page.
    pub fn free_page(&self, pfn: Pfn) -> Result<()> {
        self.free_pages(&[pfn])
    }

    /// Frees device pages, all or none (an unknown or already free page fails the call).
    pub fn free_pages(&self, pfns: &[Pfn]) -> Result<()> {
        self.shared.pages.lock().put_all(pfns)
    }

    /// Resolves and coalesces a batch without running it: the plan `copy` would execute
    /// (the `testing` feature; see [`crate::testing`]).
    #[cfg(feature = "testing")]
    pub fn plan(&self, pairs: &[(Pfn, Pfn)]) -> Result<CopyPlan> {
        self.resolve_plan(pairs, false)
    }

    /// Resolves and coalesces a batch: frame numbers to places, runs to regions. Claimed home
    /// frames only if `home`.
    fn resolve_plan(&self, pairs: &[(Pfn, Pfn)], home: bool) -> Result<CopyPlan> {
        let pages = self.shared.pages.lock();
        let frames = self.shared.frames.locator();
        plan_batch(pairs, |p| {
            if frames.owns(p) {
                frames.locate(p, home)
            } else {
                pages.resolve(p)
            }
        })
    }

    /// Copies each `(source, destination)` page pair, in any direction between host frames and
    /// this device's pages, as one submission. Returns with a ticket to wait on (on a CPU
    /// Vulkan device, after the calling thread copied its share of a large batch).
    /// On error nothing was submitted.
    ///
    /// A claimed home frame (one a CPU mapping may show) is refused with
    /// [`EngineError::FrameOwned`]; its page map copies it with
    /// [`copy_owned`](Self::copy_owned). The batch holds the bit lock of each frame and
    /// device page it names from before it is planned until it has completed (it waits for
    /// a [`HostFramePool::read`] or a [`Device::read_page`] of them that is running, and
    /// those wait for it), so no two accesses to a page's bytes ever overlap.
    pub fn copy(&self, pairs: &[(Pfn, Pfn)]) -> Result<Ticket> {
        self.copy_inner(pairs, false, false)
    }

    /// Like [`Device::copy`], but the calling thread never copies: for callers that overlap
    /// their own work (the next batch's page-table work) with the copy.
    pub fn copy_queued(&self, pairs: &[(Pfn, Pfn)]) -> Result<Ticket> {
        self.copy_inner(pairs, true, false)
    }

    /// [`Device::copy`] (or with `queued`, [`Device::copy_queued`]) for a page map's
    /// driver, home frames included.
    ///
    /// # Safety
    /// No CPU mapping of a home frame in `pairs` is accessed until the ticket settles: each
    /// such page is unmapped from CPU pointers (or not yet mapped) and locked by the caller's
    /// migration for the copy's duration.
    pub unsafe fn copy_owned(&self, pairs: &[(Pfn, Pfn)], queued: bool) -> Result<Ticket> {
        self.copy_inner(pairs, queued, true)
    }

    fn copy_inner(&self, pairs: &[(Pfn, Pfn)], queue_only: bool, home: bool) -> Result<Ticket> {
        let sh = &self.shared;
        sh.settle();
        // Every frame and page of the batch is locked from here until the batch completes
        // (frames before pages, each in ascending order: the one order every holder uses).
        let both = || pairs.iter().flat_map(|&(s, d)| [s, d]);
        let hold = Hold {
            value: 0,
            frames: sh.frames.hold_frames(both()),
            pages: sh.hold_pages(both()),
        };
        let writable = if home {
            Ok(())
        } else {
            sh.frames.check_writable(pairs.iter().map(|&(_, d)| d))
        };
        let submitted = writable
            .and_then(|()| self.plan_with_injections(pairs, home))
            .and_then(|(plan, failed, lost)| {
                Ok((sh.backend.submit(&plan, queue_only)?, plan, failed, lost))
            });
        let (sub, plan, failed, lost) = match submitted {
            Ok(x) => x,
            Err(e) => {
                sh.release(&hold);
                return Err(e);
            }
        };
        sh.keep(Hold {
            value: sub.value,
            ..hold
        });
        let c = &sh.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.pages.fetch_add(plan.pages as u64, Ordering::Relaxed);
        c.regions
            .fetch_add(plan.region_count() as u64, Ordering::Relaxed);
        c.gathered
            .fetch_add(sub.gathered_pages as u64, Ordering::Relaxed);
        Ok(Ticket {
            shared: sh.clone(),
            value: sub.value,
            settled: AtomicBool::new(false),
            pairs: pairs.len(),
            failed,
            lost,
        })
    }

    /// Copies and waits: `copy(pairs)?.wait()`.
    pub fn copy_sync(&self, pairs: &[(Pfn, Pfn)]) -> Result<()> {
        self.copy(pairs)?.wait()
    }

    /// The batch's plan as the injected faults leave it, the pairs that fail, and the error
    /// of a batch lost mid-way.
    fn plan_with_injections(
        &self,
        pairs: &[(Pfn, Pfn)],
        home: bool,
    ) -> Result<(CopyPlan, Vec<usize>, Option<String>)> {
        let mut injections = self.shared.injections.lock();
        if injections.is_empty() {
            return Ok((self.resolve_plan(pairs, home)?, Vec::new(), None));
        }
        // Validate the whole batch first, so that bad input is refused as usual.
        self.resolve_plan(pairs, home)?;
        let fate = injections.apply(pairs, &self.shared.frames);
        let kept: Vec<(Pfn, Pfn)> = fate.kept.iter().map(|&i| pairs[i]).collect();
        Ok((self.resolve_plan(&kept, home)?, fate.failed, fate.lost))
    }

    /// Test hook (the `testing` feature): copies whose destination is one of `pfns` fail
    /// (their pairs are reported by [`Ticket::wait`] as failed and their destination keeps
    /// its bytes). Empty clears it.
    #[cfg(feature = "testing")]
    pub fn inject_copy_failures(&self, pfns: &[Pfn]) {
        self.shared.injections.lock().fail_dst = pfns.iter().copied().collect();
    }

    /// Test hook (the `testing` feature): the next `batches` copy batches (of at least one
    /// pair) are lost mid-way, as a device that goes away loses them: the first half of
    /// their pairs is copied, the rest is not, and [`Ticket::wait`] fails with
    /// [`EngineError::DeviceLost`] for the whole batch (the device itself keeps working).
    /// With `spare_home`, batches that write a home frame are left alone (a CPU fault through
    /// a pointer that meets a lost device is `SIGBUS` by contract). Zero disarms it.
    #[cfg(feature = "testing")]
    pub fn inject_device_loss(&self, batches: usize, spare_home: bool) {
        self.shared.injections.lock().lose(batches, spare_home);
    }

    /// Test hook (the `testing` feature): how many batches [`Device::inject_device_loss`]
    /// has lost so far.
    #[cfg(feature = "testing")]
    pub fn lost_batches(&self) -> u64 {
        self.shared.injections.lock().lost()
    }

    /// Reads bytes of an allocated device page, synchronously. It waits for a copy in flight
    /// that uses the page, and excludes other reads and writes of it.
    pub fn read_page(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_page(pfn, offset, out.len(), |at| {
            self.shared.backend.read(at, out)
        })
    }

    /// Writes bytes into an allocated device page, synchronously; as [`Device::read_page`],
    /// it waits for copies of the page in flight and excludes other accesses.
    pub fn write_page(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<()> {
        self.with_page(pfn, offset, data.len(), |at| {
            self.shared.backend.write(at, data)
        })
    }

    /// Runs `f` on the location of `offset` in page `pfn`, holding the page's bit.
    fn with_page(
        &self,
        pfn: Pfn,
        offset: usize,
        len: usize,
        f: impl FnOnce(Place) -> Result<()>,
    ) -> Result<()> {
        let sh = &self.shared;
        let held = sh.hold_pages([pfn]);
        let r = self.locate_span(pfn, offset, len).and_then(|mut at| {
            at.offset += offset as u64;
            f(at)
        });
        sh.held.unlock_words(&held);
        r
    }

    fn locate_span(&self, pfn: Pfn, offset: usize, len: usize) -> Result<Place> {
        if offset.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(EngineError::InvalidConfig(format!(
                "span {offset}+{len} does not fit in a page"
            )));
        }
        self.shared.pages.lock().resolve(pfn)
    }

    /// Counters of the copy work done so far.
    pub fn stats(&self) -> CopyStats {
        let c = &self.shared.counters;
        CopyStats {
            batches: c.batches.load(Ordering::Relaxed),
            pages: c.pages.load(Ordering::Relaxed),
            regions: c.regions.load(Ordering::Relaxed),
            gathered_pages: c.gathered.load(Ordering::Relaxed),
        }
    }
}

/// A submitted copy batch (or kernel dispatch). Dropping it does not cancel the work: it
/// waits for it, unless a wait or poll saw it complete already, so that nothing of the
/// batch happens after its ticket is gone (a readback through staging lands in its host
/// frames when the batch retires: without the wait it could land after the caller freed a
/// frame and the pool gave it to a new owner).
#[must_use = "a copy is only known to be done once its ticket is waited on"]
pub struct Ticket {
    shared: Arc<Shared>,
    value: u64,
    /// A wait or poll saw the batch complete (and retired it): dropping need not wait.
    settled: AtomicBool,
    pairs: usize,
    failed: Vec<usize>,
    /// Lost mid-way by an injected device loss: the error its wait reports.
    lost: Option<String>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("value", &self.value)
            .field("pairs", &self.pairs)
            .finish()
    }
}

impl Ticket {
    /// Blocks until the batch has completed. Fails with [`EngineError::CopyFailed`], naming
    /// the pairs that did not complete, if any did not.
    pub fn wait(&self) -> Result<()> {
        let waited = self.shared.backend.wait(self.value);
        if waited.is_err() {
            self.shared.give_up(self.value);
        }
        self.shared.settle();
        waited.map_err(|e| self.all_failed(e))?;
        self.settled.store(true, Ordering::Relaxed);
        self.outcome()
    }

    /// True once the batch has completed (successfully or not); does not block.
    pub fn is_done(&self) -> Result<bool> {
        let done = self
            .shared
            .backend
            .poll(self.value)
            .map_err(|e| self.all_failed(e))?;
        if done {
            self.shared.settle();
            self.settled.store(true, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// The completion value of this batch on its device's timeline.
    pub fn value(&self) -> u64 {
        self.value
    }

    fn outcome(&self) -> Result<()> {
        if let Some(lost) = &self.lost {
            return Err(EngineError::DeviceLost(lost.clone()));
        }
        if self.failed.is_empty() {
            Ok(())
        } else {
            Err(EngineError::CopyFailed {
                failed: self.failed.clone(),
                reason: "injected copy failure".into(),
            })
        }
    }

    fn all_failed(&self, e: EngineError) -> EngineError {
        match e {
            EngineError::DeviceLost(_) => e,
            // A dispatch (no pairs) reports the backend's error as it is.
            other if self.pairs == 0 => other,
            other => EngineError::CopyFailed {
                failed: (0..self.pairs).collect(),
                reason: other.to_string(),
            },
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Relaxed) {
            return;
        }
        // Its outcome has no one to go to; a device lost meanwhile finishes nothing anyway.
        if let Err(e) = self.shared.backend.wait(self.value) {
            tracing::debug!("a dropped ticket's batch {}: {e}", self.value);
            self.shared.give_up(self.value);
        }
        self.shared.settle();
    }
}
