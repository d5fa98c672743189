//! `GpuDriver`, the driver's public face: its configuration, registration of the device's
//! memory, and the calls runtimes make (migrations, pins, launches, eviction, statistics).
//! Its state and migrations are in `migrate`, its pagemap callbacks in `ops`, device page
//! tables and launches in `table`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hetmem_engine::{Device, Kernel, Pfn, PAGE_SIZE};

use super::migrate::Inner;
use super::table::{DevicePin, Launch};
use crate::error::{Error, Result};
use crate::migration::*;
use crate::mm::{AddressSpace, DevicePagemap, FrameAccess, MemoryKind, Owner, PageMap, VirtAddr};

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
        let owner = Owner(NEXT_OWNER.fetch_add(1, Ordering::Relaxed));
        let fault_around = config.fault_around.clamp(1, MAX_FAULT_AROUND);
        let inner = Inner::new(device.clone(), pagemap, owner, kind, fault_around, budget);
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
    pub fn owner(&self) -> Owner {
        self.inner.owner
    }
    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.inner.kind
    }

    /// Marks the device pages behind `npages` pages from `addr` as recently used, so that
    /// eviction passes them over once. Counts past the top of the address space stop there;
    /// only mapped pages are visited.
    pub fn touch(&self, space: &AddressSpace, addr: VirtAddr, npages: usize) {
        let end = addr
            .checked_add_pages(npages as u64)
            .unwrap_or(VirtAddr(u64::MAX));
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
    /// first if the budget requires. The [`Outcome`] is summed over the migration's chunks.
    /// A range mapped for CPU pointers is refused with [`Error::InvalidArgument`]: only its
    /// buffer knows its views (`Buffer::prefetch`).
    pub fn migrate_to_device(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Outcome> {
        space.refuse_homed(addr, npages.saturating_mul(PAGE_SIZE))?;
        self.migrate_to_device_unchecked(space, addr, npages)
    }

    /// `migrate_to_device` of any range, for a caller that has checked its buffer's views.
    pub(crate) fn migrate_to_device_unchecked(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Outcome> {
        self.inner.migrate_range_to_device(space, addr, npages)
    }

    /// Migrates this driver's pages among `npages` pages from `addr` back to host memory. The
    /// [`Outcome`] is summed over the migration's chunks. A range mapped for CPU pointers is
    /// refused with [`Error::InvalidArgument`]: only its buffer knows its views
    /// (`Buffer::evict`).
    pub fn migrate_to_host(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Outcome> {
        space.refuse_homed(addr, npages.saturating_mul(PAGE_SIZE))?;
        self.migrate_to_host_unchecked(space, addr, npages)
    }

    /// `migrate_to_host` of any range, for a caller that has checked its buffer's views.
    pub(crate) fn migrate_to_host_unchecked(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Outcome> {
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
        addr: VirtAddr,
        npages: usize,
    ) -> Result<DevicePin> {
        space.refuse_homed(addr, npages.saturating_mul(PAGE_SIZE))?;
        DevicePin::acquire(&self.inner, space, addr, npages)
    }

    /// `pin_on_device` of any range, for a caller that has checked its buffer's views.
    pub(crate) fn pin_on_device_unchecked(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<DevicePin> {
        DevicePin::acquire(&self.inner, space, addr, npages)
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
        ranges: &[(VirtAddr, usize)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        for &(addr, n) in ranges {
            space.refuse_homed(addr, n.saturating_mul(PAGE_SIZE))?;
        }
        Launch::start(&self.inner, space, kernel, ranges, args, groups)
    }

    /// `launch` over any ranges, for a caller that has checked their buffers' views.
    pub(crate) fn launch_unchecked(
        &self,
        space: &AddressSpace,
        kernel: &Kernel,
        ranges: &[(VirtAddr, usize)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        Launch::start(&self.inner, space, kernel, ranges, args, groups)
    }

    /// The device page behind `addr` in `space`'s device page table, if the table maps it
    /// (what a kernel would use).
    pub fn table_entry(&self, space: &AddressSpace, addr: VirtAddr) -> Option<Pfn> {
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
