//! A device: one GPU (or the built-in host device), its memory as numbered pages, and batched
//! page copies between it and the host frame pool.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backend::Backend;
use crate::config::{DeviceConfig, DeviceInfo};
use crate::copy::{plan_batch, CopyPlan, Place};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::inject::Injections;
use crate::inspect::KernelLimits;
use crate::kernel::{Kernel, KernelHost, PageTable};
use crate::pagemap::DevicePages;
use crate::pfn::{Pfn, PfnRange, PAGE_SIZE};

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
        self.pages.lock().range()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
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
        tracing::info!(
            device = %info.name,
            kind = ?info.kind,
            reason = %info.reason,
            "hetmem device chosen"
        );
        Ok(Device {
            shared: Arc::new(Shared {
                info,
                frames,
                pages: Mutex::new(pages),
                counters: Counters::default(),
                injections: Mutex::new(Injections::default()),
                backend,
            }),
        })
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
        if zeroed {
            let dirty: Vec<usize> = grant
                .slots
                .iter()
                .map(|&s| s as usize)
                .filter(|&s| pages.is_dirty(s))
                .collect();
            if !dirty.is_empty() {
                let locs: Vec<Place> = dirty.iter().map(|&s| pages.location(s)).collect();
                if let Err(e) = self.shared.backend.zero_pages(&locs) {
                    pages.untake(&grant.slots);
                    return Err(e);
                }
                for s in dirty {
                    pages.mark_clean(s);
                }
            }
        }
        Ok(grant.slots.iter().map(|&s| pages.pfn(s)).collect())
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
        self.resolve_plan(pairs)
    }

    /// Resolves and coalesces a batch: frame numbers to places, runs to regions.
    fn resolve_plan(&self, pairs: &[(Pfn, Pfn)]) -> Result<CopyPlan> {
        let pages = self.shared.pages.lock();
        let frames = self.shared.frames.locator();
        plan_batch(pairs, |p| {
            if frames.owns(p) {
                frames.locate(p)
            } else {
                pages.resolve(p)
            }
        })
    }

    /// Copies each `(source, destination)` page pair, in any direction between host frames and
    /// this device's pages, as one submission. Returns with a ticket to wait on (on a CPU
    /// Vulkan device, after the calling thread copied its share of a large batch).
    /// On error nothing was submitted.
    pub fn copy(&self, pairs: &[(Pfn, Pfn)]) -> Result<Ticket> {
        self.copy_inner(pairs, false)
    }

    /// Like [`Device::copy`], but the calling thread never copies: for callers that overlap
    /// their own work (the next batch's page-table work) with the copy.
    pub fn copy_queued(&self, pairs: &[(Pfn, Pfn)]) -> Result<Ticket> {
        self.copy_inner(pairs, true)
    }

    fn copy_inner(&self, pairs: &[(Pfn, Pfn)], queue_only: bool) -> Result<Ticket> {
        let (plan, failed, lost) = self.plan_with_injections(pairs)?;
        let sub = self.shared.backend.submit(&plan, queue_only)?;
        let c = &self.shared.counters;
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.pages.fetch_add(plan.pages as u64, Ordering::Relaxed);
        c.regions
            .fetch_add(plan.region_count() as u64, Ordering::Relaxed);
        c.gathered
            .fetch_add(sub.gathered_pages as u64, Ordering::Relaxed);
        Ok(Ticket {
            shared: self.shared.clone(),
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
    ) -> Result<(CopyPlan, Vec<usize>, Option<String>)> {
        let mut injections = self.shared.injections.lock();
        if injections.is_empty() {
            return Ok((self.resolve_plan(pairs)?, Vec::new(), None));
        }
        // Validate the whole batch first, so that bad input is refused as usual.
        self.resolve_plan(pairs)?;
        let fate = injections.apply(pairs, &self.shared.frames);
        let kept: Vec<(Pfn, Pfn)> = fate.kept.iter().map(|&i| pairs[i]).collect();
        Ok((self.resolve_plan(&kept)?, fate.failed, fate.lost))
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

    /// Reads bytes of an allocated device page, synchronously.
    pub fn read_page(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<()> {
        let mut at = self.locate_span(pfn, offset, out.len())?;
        at.offset += offset as u64;
        self.shared.backend.read(at, out)
    }

    /// Writes bytes into an allocated device page, synchronously.
    pub fn write_page(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<()> {
        let mut at = self.locate_span(pfn, offset, data.len())?;
        at.offset += offset as u64;
        self.shared.backend.write(at, data)
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

/// Kernels: compiling, page tables, dispatch.
impl Device {
    /// Chunks a kernel binds on this device, once kernels are possible here.
    fn kernel_chunks(&self) -> Result<(u32, u32)> {
        self.kernel_layout().map(|(c, p, _)| (c, p))
    }

    /// Chunks a kernel binds on this device, their pages, and the device's kernel limits.
    fn kernel_layout(&self) -> Result<(u32, u32, KernelLimits)> {
        let limits = self.shared.backend.kernel_limits()?;
        let (limit, max_bytes) = (limits.max_chunks, limits.max_binding_bytes);
        let (chunks, chunk_pages) = {
            let p = self.shared.pages.lock();
            (p.max_chunks() as u32, p.chunk_pages() as u32)
        };
        if chunks > limit {
            return Err(EngineError::Unsupported(format!(
                "a kernel would bind {chunks} chunks of device memory, the device allows {limit}: use larger chunks or a smaller budget"
            )));
        }
        if chunk_pages as u64 * PAGE_SIZE as u64 > max_bytes {
            return Err(EngineError::Unsupported(format!(
                "chunks of {} bytes exceed the largest storage binding of {max_bytes} bytes",
                chunk_pages as u64 * PAGE_SIZE as u64
            )));
        }
        Ok((chunks, chunk_pages, limits))
    }

    /// Whether kernels can run on this device (the Vulkan backend): `Err` says why not.
    pub fn kernel_support(&self) -> Result<()> {
        self.kernel_chunks().map(|_| ())
    }

    /// Compiles a WGSL kernel whose compute entry point is `entry`. The source is compiled
    /// after hetmem's helper ([`crate::KERNEL_HELPER`]), so it can translate managed
    /// addresses with `hm_ptr`, `hm_load`, `hm_store`, and read its arguments with `hm_arg`.
    ///
    /// Before any pipeline is made, the kernel is checked against hetmem's layout and the
    /// device: one that declares resources of its own, uses the helper's bindings or
    /// internal (`hm__`) functions directly, or exceeds the device's workgroup memory or
    /// workgroup size is refused with [`EngineError::KernelRejected`]. Compile errors name
    /// lines of `wgsl` itself.
    pub fn compile_kernel(&self, wgsl: &str, entry: &str) -> Result<Kernel> {
        let (chunks, chunk_pages, limits) = self.kernel_layout()?;
        let spirv = crate::kernel::compile(wgsl, entry, chunks, chunk_pages, &limits)?;
        let id = self.shared.backend.create_kernel(&spirv, entry, chunks)?;
        Ok(Kernel::new(self.shared.clone(), id, entry))
    }

    /// A page table of `entries` entries, all empty, in memory this device's kernels read.
    pub fn page_table(&self, entries: usize) -> Result<PageTable> {
        self.kernel_chunks()?;
        if entries > u32::MAX as usize - crate::kernel::TABLE_HEADER_WORDS {
            return Err(EngineError::InvalidConfig(format!(
                "page table of {entries} entries"
            )));
        }
        let (id, words) = self
            .shared
            .backend
            .alloc_table(crate::kernel::TABLE_HEADER_WORDS + entries)?;
        Ok(PageTable::new(self.shared.clone(), id, words, entries))
    }

    /// Dispatches `kernel` over `groups` workgroups, translating through `table`. `buffers`
    /// are the ranges of table entries (virtual pages) the kernel's buffers cover, in the
    /// order it names them; `args` its argument words. The kernel's reads and writes land in
    /// device pages, and only in those of its buffers' ranges: an access outside them, or to
    /// a page the table does not map, reads zeros, writes nothing and is counted in the
    /// table (see [`PageTable::faults`]).
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        table: &PageTable,
        buffers: &[std::ops::Range<u32>],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Ticket> {
        if !self.is_host_of(&kernel.host) || !self.is_host_of(&table.host) {
            return Err(EngineError::InvalidConfig(
                "kernel or page table of another device".into(),
            ));
        }
        if groups.iter().any(|&g| g == 0 || g > 65_535) {
            return Err(EngineError::InvalidConfig(format!(
                "workgroup counts {groups:?} must each be 1..=65535"
            )));
        }
        if let Some(r) = buffers
            .iter()
            .find(|r| r.start > r.end || r.end as usize > table.len())
        {
            return Err(EngineError::InvalidConfig(format!(
                "buffer range {r:?} outside a page table of {} entries",
                table.len()
            )));
        }
        let (chunks, _) = self.kernel_chunks()?;
        let mut meta = Vec::with_capacity(1 + 2 * buffers.len() + args.len());
        meta.push(buffers.len() as u32);
        for r in buffers {
            meta.extend([r.start, r.end - r.start]);
        }
        meta.extend_from_slice(args);
        let value = self
            .shared
            .backend
            .dispatch(kernel.id, table.id, chunks, &meta, groups)?;
        Ok(Ticket {
            shared: self.shared.clone(),
            value,
            settled: AtomicBool::new(false),
            pairs: 0,
            failed: Vec::new(),
            lost: None,
        })
    }

    /// Kernels, page tables and chunks dropped while a submission that used them had not
    /// completed, and not destroyed yet: they go once the device's timeline passes that
    /// submission (noticed when any wait or poll of the device retires work). Dropping a
    /// kernel or a table never waits for the device.
    pub fn deferred_destroys(&self) -> usize {
        self.shared.backend.deferred_destroys()
    }

    /// Whether `host` (a kernel's or a page table's) is this device.
    fn is_host_of(&self, host: &Arc<dyn KernelHost>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(host), Arc::as_ptr(&self.shared))
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
        self.shared
            .backend
            .wait(self.value)
            .map_err(|e| self.all_failed(e))?;
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
        }
    }
}
