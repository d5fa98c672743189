//! The process's own page table as one more mirror of an address space: ranges that code
//! reaches through plain CPU pointers (the kernel's view of a process, kept by hetmem's rules).
//!
//! Long: about 670 lines (the deferred faults and the notifier rule added to it); its split
//! (the fault path apart from the view's bookkeeping) is left until the frame-ownership
//! changes to this file land, so the two do not collide.
//!
//! # Design
//!
//! The host frame pool is a memfd. A range mapped for CPU pointers reserves a run of *home*
//! frames, one per page, and the process maps that run of the file a second time (shared, at
//! an address of the kernel's choosing); hetmem's address space maps the range at the same
//! address, with every page living in its home frame while it is in host memory (faults,
//! copy-on-write and migrations back from the device allocate it there; a page that came
//! back elsewhere, for example through an eviction by frame number, is moved home on its
//! next CPU fault). So the bytes a plain load sees are the bytes in hetmem's frame, and the
//! device copies read and write those frames in place, with no copy in between.
//!
//! The process's page table may map a page only while hetmem's entry for it is a present
//! host page in its home frame, and writable only while that entry is writable:
//! - every invalidation of the space (a migration, an unmap, a protection change, a remap, a
//!   copy-on-write) first drops the process's entries of the range (`MADV_DONTNEED` on the
//!   view: the page cache keeps the frames), under the mirror lock;
//! - an access to a page the process does not map is a userfaultfd fault (missing or minor),
//!   served on the mirror's own thread: hetmem's fault path resolves the entry (bringing a
//!   device page back through its owner's `migrate_to_ram`, populating a hole with a zeroed
//!   home frame), then, under the mirror lock and only if no invalidation started since,
//!   `UFFDIO_CONTINUE` maps the home frames of the faulting window (write-protected where
//!   hetmem's entry is read-only; a write there is a write-protect fault, served the same
//!   way).
//!
//! The fault thread waits for no invalidation: a fault whose window an invalidation is
//! changing is put aside and tried again after the others (`Step::Defer`), and the entries
//! are checked for the window alone (`read_begin_range` / `read_retry_range`). So a notifier
//! that reads CPU-mapped memory elsewhere while its invalidation runs is served; one that
//! reads a page of a range being invalidated, or reads while its thread holds the map lock
//! exclusively, gets `SIGBUS` with `Error::Reentrant` recorded, since serving it would wait
//! for the faulting thread itself. A notifier that runs on the fault thread itself (told of
//! a migration the fault path makes) must not touch CPU-mapped pages that are not present:
//! no thread is left to serve that fault.
//!
//! A fault that cannot be served (the range was unmapped, the device is lost, host frames are
//! exhausted, a write to a read-only range) is not retried forever and is never served with
//! zeros: the faulting thread gets `SIGBUS`, and the error is kept until the mirror's owner
//! takes it (the offload layer's `Context::take_cpu_fault_error`).
//!
//! The alternative, anonymous memory filled with `UFFDIO_COPY` on each fault, would keep a
//! second copy of every CPU-resident page and copy on each fault; this design copies nothing
//! on the CPU side at all (the bench `cpu_pointers` measures both).

mod ahead;
mod uffd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use hetmem_engine::{PfnRange, PAGE_SIZE};
use parking_lot::{Mutex, RwLock};

pub use uffd::FaultScope;
use uffd::{Fault, Uffd, FAULT_WP, FAULT_WRITE};

use crate::error::{Error, Result};
use crate::migration::{
    migrate_pfn, Migration, MIGRATE_VMA_SELECT_DEVICE_COHERENT, MIGRATE_VMA_SELECT_SYSTEM,
};
use crate::mm::{AddressSpace, Notifier, NotifierId, NotifyRange, Owner, SpaceId, VirtAddr, PAGE};

/// Most pages one fault maps (and, for a sequential scan, brings back) at once.
pub const MAX_WINDOW: usize = 2048;
/// Runs of at least this many writable pages are mapped through the kernel's fault path
/// (`Uffd::map_bulk`) rather than page by page.
const BULK_PAGES: u64 = 256;
/// Attempts a fault makes before it gives up with the last error (each waits a little when
/// the page is busy: pinned by a device kernel, or under migration).
const SERVE_TRIES: u32 = 20_000;

/// Why a CPU access through a pointer could not be served; the faulting thread got `SIGBUS`.
#[derive(Debug)]
pub struct CpuFaultError {
    /// The faulting address.
    pub addr: u64,
    /// What went wrong.
    pub error: Error,
}

/// One range mapped for CPU pointers.
#[derive(Clone, Copy, Debug)]
struct Region {
    len: u64,
    home: PfnRange,
}

/// What the fault thread and the notifier share.
struct Shared {
    uffd: Uffd,
    space: AddressSpace,
    /// The owner of the context's device pages (for bringing coherent pages home).
    owner: Owner,
    regions: RwLock<BTreeMap<u64, Region>>,
    /// Held while the view's entries change: mapping (fault thread) and dropping (notifier).
    lock: Mutex<()>,
    stop: AtomicBool,
    last_error: Mutex<Option<CpuFaultError>>,
    served: AtomicU64,
    /// The last window mapped (start, end, pages), to grow windows on sequential scans.
    stream: Mutex<(u64, u64, usize)>,
    /// Pages per window when faults are not sequential.
    base_window: usize,
    /// Brings the device pages of `npages` pages from an address back to host memory.
    bring: Bring,
    /// What the read-ahead of a sequential scan does.
    ahead: ahead::Mode,
}

/// How the mirror asks the driver to bring a window of pages back to host memory.
pub(crate) type Bring = Box<dyn Fn(u64, usize) -> Result<()> + Send + Sync>;

/// The CPU mirror of one address space: its userfaultfd, fault thread and regions.
pub(crate) struct CpuMirror {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    notifier: NotifierId,
}

/// The notifier the space calls; weak, so the space does not keep the mirror alive.
struct ViewNotifier(Weak<Shared>);

impl Notifier for ViewNotifier {
    fn invalidate(&self, _space: SpaceId, range: &NotifyRange) {
        if let Some(s) = self.0.upgrade() {
            s.drop_view(range.start.get(), range.end.get());
        }
    }
}

impl CpuMirror {
    /// Opens a userfaultfd and starts the fault thread for `space`. Fails (with the reason)
    /// where userfaultfd cannot be had.
    pub(crate) fn new(
        space: &AddressSpace,
        owner: Owner,
        base_window: usize,
        bring: Bring,
    ) -> Result<CpuMirror> {
        let uffd = Uffd::open().map_err(|e| Error::PointersUnavailable(why(&e)))?;
        let shared = Arc::new(Shared {
            uffd,
            space: space.clone(),
            owner,
            regions: RwLock::new(BTreeMap::new()),
            lock: Mutex::new(()),
            stop: AtomicBool::new(false),
            last_error: Mutex::new(None),
            served: AtomicU64::new(0),
            stream: Mutex::new((0, 0, 0)),
            base_window: base_window.clamp(1, MAX_WINDOW),
            bring,
            ahead: ahead::Mode::from_env(),
        });
        let notifier = space.register_notifier(Arc::new(ViewNotifier(Arc::downgrade(&shared))));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("hetmem-cpu-faults".into())
            .spawn(move || s.run())
            .map_err(|e| Error::Engine(e.into()))?;
        Ok(CpuMirror {
            shared,
            thread: Some(thread),
            notifier,
        })
    }

    /// Which faults the mirror serves (all, or user-mode accesses only).
    pub(crate) fn scope(&self) -> FaultScope {
        self.shared.uffd.scope()
    }

    /// Faults served so far.
    pub(crate) fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// The last fault that could not be served, taken.
    pub(crate) fn take_error(&self) -> Option<CpuFaultError> {
        self.shared.last_error.lock().take()
    }

    /// Maps `len` bytes (whole pages) for CPU pointers: reserves home frames, maps them in
    /// the process, registers them for faults and maps the range in the space at the same
    /// address. Returns the address.
    pub(crate) fn map(&self, len: u64) -> Result<u64> {
        let s = &self.shared;
        let pm = s.space.pagemap();
        let frames = pm.frames();
        let home = frames.reserve_home((len / PAGE) as usize)?;
        let undo_home = |e: Error| {
            if let Err(r) = frames.release_home(home) {
                tracing::error!("releasing home frames {home:?}: {r}");
            }
            e
        };
        let Some((fd, offset)) = frames.home_file(home.start) else {
            return Err(undo_home(Error::PointersUnavailable(
                "the host frame pool is not a memfd (memfd_create failed)".into(),
            )));
        };
        let view = map_view(fd, offset, len).map_err(|e| undo_home(Error::Engine(e.into())))?;
        let undo_view = |e: Error| {
            unmap_view(view, len);
            undo_home(e)
        };
        s.uffd
            .register(view, len)
            .map_err(|e| undo_view(Error::PointersUnavailable(why(&e))))?;
        s.regions.write().insert(view, Region { len, home });
        if let Err(e) = s.space.mmap_homed(VirtAddr(view), len, home.start) {
            s.regions.write().remove(&view);
            let _ = s.uffd.unregister(view, len);
            return Err(undo_view(e));
        }
        Ok(view)
    }

    /// Unmaps a range made by [`CpuMirror::map`]: from the space (its pages are released),
    /// then from the process; its home frames go back to the pool.
    pub(crate) fn unmap(&self, addr: u64) -> Result<()> {
        let s = &self.shared;
        let va = VirtAddr(addr);
        let region = *s.regions.read().get(&addr).ok_or(Error::NotMapped(va))?;
        let r = s.space.munmap_checked(va, region.len, true);
        s.regions.write().remove(&addr);
        if let Err(e) = s.uffd.unregister(addr, region.len) {
            tracing::error!("unregistering {addr:#x}: {e}");
        }
        unmap_view(addr, region.len);
        if let Err(e) = s.space.pagemap().frames().release_home(region.home) {
            // A page of the range is still referenced (a long-term pin that outlived the
            // range): its run stays reserved.
            tracing::warn!("home frames {:?} kept: {e}", region.home);
        }
        r
    }
}

impl Drop for CpuMirror {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.space.unregister_notifier(self.notifier);
        let left: Vec<u64> = self.shared.regions.read().keys().copied().collect();
        for addr in left {
            if let Err(e) = self.unmap(addr) {
                tracing::error!("unmapping CPU-mapped range {addr:#x}: {e}");
            }
        }
    }
}

/// What one attempt at a fault came to.
enum Step {
    Done,
    Retry,
    /// The page is present but not in its home frame.
    Rehome,
    /// An invalidation of the window is in progress: the fault is put aside (its thread
    /// keeps waiting) and tried again after the others, so the fault thread never sleeps
    /// on an invalidation whose notifiers may themselves be waiting for a fault.
    Defer,
}

/// How a fault was dealt with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Served {
    /// Mapped, or refused with `SIGBUS`: its thread runs again.
    Ended,
    /// Put aside until an invalidation of its window ends.
    Deferred,
}

/// How long the fault thread waits for new faults while some are put aside.
const DEFERRED_POLL_MS: i32 = 1;

impl Shared {
    fn run(self: Arc<Self>) {
        let mut faults = Vec::new();
        let mut aside: Vec<Fault> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let wait = if aside.is_empty() {
                50
            } else {
                DEFERRED_POLL_MS
            };
            if let Err(e) = self.uffd.read_faults(wait, &mut faults) {
                tracing::error!("reading userfaultfd: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let earlier = std::mem::take(&mut aside);
            for f in faults.iter().chain(&earlier) {
                if self.serve(f) == Served::Deferred {
                    aside.push(*f);
                }
            }
        }
        // Shutting down: each fault put aside ends in its signal (`resolve` says so).
        for f in &aside {
            self.serve(f);
        }
    }

    /// The region holding `addr`: its start and itself.
    fn region_of(&self, addr: u64) -> Option<(u64, Region)> {
        let regions = self.regions.read();
        let (&start, &r) = regions.range(..=addr).next_back()?;
        (addr < start + r.len).then_some((start, r))
    }

    /// A page still pinned on the device after every retry (`Busy`, naming its frame) is
    /// reported as [`Error::HeldOnDevice`]: the buffer (its range's start) and the offset.
    fn held_on_device(&self, error: Error, addr: u64) -> Error {
        match (&error, self.region_of(addr)) {
            (Error::Busy(_), Some((start, _))) => Error::HeldOnDevice {
                addr: VirtAddr::from(start),
                offset: (addr - start) as usize,
            },
            _ => error,
        }
    }

    fn serve(&self, f: &Fault) -> Served {
        let addr = f.addr & !(PAGE - 1);
        let write = f.flags & (FAULT_WRITE | FAULT_WP) != 0;
        let served =
            if self
                .space
                .fault_inside_invalidation(f.tid, VirtAddr(addr), VirtAddr(addr + PAGE))
            {
                // A notifier (or anything else running inside an invalidation of this space)
                // touched a page that cannot be served while its own thread is there: a page of
                // a range being invalidated, or any page while that thread holds the map lock
                // exclusively (mprotect, mremap, fork). Waiting would wait for itself.
                Err(Error::Reentrant)
            } else {
                self.resolve(VirtAddr(addr), write)
            };
        match served {
            Ok(Served::Deferred) => return Served::Deferred,
            Ok(Served::Ended) => {
                // Mapping the page woke the thread (and `map_window` woke it where the page
                // was mapped already).
                self.served.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                tracing::debug!("CPU fault at {addr:#x}: {error}");
                let error = self.held_on_device(error, addr);
                *self.last_error.lock() = Some(CpuFaultError { addr, error });
                signal_bus(f.tid);
                // The thread runs again, into its signal.
                if let Err(e) = self.uffd.wake(addr, PAGE) {
                    tracing::error!("waking the thread faulting at {addr:#x}: {e}");
                }
            }
        }
        self.read_ahead();
        Served::Ended
    }

    /// Makes `addr` accessible (for `write`, writable) in the process, or says why not, or
    /// puts it aside while an invalidation of its window runs.
    fn resolve(&self, addr: VirtAddr, write: bool) -> Result<Served> {
        let mut last = Error::NoProgress { addr, tries: 0 };
        for tries in 0..SERVE_TRIES {
            if self.stop.load(Ordering::Acquire) {
                return Err(Error::InvalidArgument("the context is shutting down"));
            }
            let r = self.attempt(addr.get(), write);
            match r {
                Ok(Step::Done) => return Ok(Served::Ended),
                Ok(Step::Defer) => return Ok(Served::Deferred),
                Ok(Step::Retry) => continue,
                Ok(Step::Rehome) => match self.rehome(addr) {
                    Ok(()) => continue,
                    Err(e) => last = e,
                },
                Err(e @ (Error::Busy(_) | Error::NoProgress { .. })) => last = e,
                Err(Error::Engine(e)) if e.kind() == hetmem_engine::ErrorKind::Transient => {
                    last = Error::Engine(e)
                }
                Err(e) => return Err(e),
            }
            // A page pinned for a device kernel, or one another thread holds: wait a little.
            let us = 10u64 << (tries / 8).min(7);
            std::thread::sleep(Duration::from_micros(us));
        }
        Err(last)
    }

    /// One attempt: resolve the entry in the space, then map its window in the process.
    fn attempt(&self, addr: u64, write: bool) -> Result<Step> {
        let va = VirtAddr(addr);
        let (start, region) = self.region_of(addr).ok_or(Error::NotMapped(va))?;
        let space = &self.space;
        let vma = space.vma(va).ok_or(Error::NotMapped(va))?;
        if vma.home.is_none() {
            return Err(Error::NotMapped(va));
        }
        if !vma.prot.read {
            return Err(Error::ReadDenied(va));
        }
        if write && !vma.prot.write {
            return Err(Error::WriteDenied(va));
        }
        let end = start + region.len;
        let (mut lo, mut hi) =
            self.window(addr, vma.start.get().max(start), vma.end.get().min(end));
        if space
            .try_read_begin_range(VirtAddr(lo), VirtAddr(hi))
            .is_none()
        {
            // Part of the window is being invalidated: the page alone, or later.
            (lo, hi) = (addr, addr + PAGE);
            if space.try_read_begin_range(va, va + PAGE).is_none() {
                return Ok(Step::Defer);
            }
        }
        if hi - lo > PAGE {
            // Bring the rest of the window back with the faulting page, in one migration
            // (what fails here is left to the fault of the page itself).
            let _ = (self.bring)(lo, ((hi - lo) / PAGE) as usize);
        }
        space.fault(va, write || vma.prot.write)?;
        // Entries are read (and mapped) after this: an invalidation of the window from here
        // on is seen by `read_retry_range`; one running now (the migrations above are over)
        // puts the fault aside.
        let Some(seq) = space.try_read_begin_range(VirtAddr(lo), VirtAddr(hi)) else {
            return Ok(Step::Defer);
        };
        let step = self.map_window(&vma, lo, hi, seq, Some(addr))?;
        if let Step::Done = step {
            *self.stream.lock() = (lo, hi, ((hi - lo) / PAGE) as usize);
        }
        Ok(step)
    }

    /// Maps the present home frames of `[lo, hi)` (one mapping) in the process, unless an
    /// invalidation started since `seq`. `must`: the faulting address, which has to be among
    /// them (else the step says why not).
    fn map_window(
        &self,
        vma: &crate::mm::Vma,
        lo: u64,
        hi: u64,
        seq: u64,
        must: Option<u64>,
    ) -> Result<Step> {
        let space = &self.space;
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        let mut at = lo;
        while at < hi {
            match space.mirror_entry(VirtAddr(at), vma.prot.write) {
                Some((pfn, w)) if Some(pfn) == vma.home_of(VirtAddr(at)) => {
                    let wp = !w;
                    match runs.last_mut() {
                        Some((s, e, p)) if *e == at && *p == wp => *e = at + PAGE,
                        _ => runs.push((at, at + PAGE, wp)),
                    }
                }
                Some(_) if Some(at) == must => return Ok(Step::Rehome),
                None if Some(at) == must => return Ok(Step::Retry),
                _ => {}
            }
            at += PAGE;
        }
        let addr = VirtAddr(must.unwrap_or(lo));
        let _t = crate::mm::locks::acquire(crate::mm::locks::Rank::Mirror);
        let g = self.lock.lock();
        if space.read_retry_range(seq, VirtAddr(lo), VirtAddr(hi)) {
            return Ok(Step::Retry);
        }
        for &(s, e, wp) in &runs {
            if !wp && e - s >= BULK_PAGES * PAGE {
                self.uffd
                    .map_bulk(s, e - s)
                    .map_err(|e| Error::FaultFailed {
                        addr,
                        reason: format!("mapping a window in bulk: {e}"),
                    })?;
                continue;
            }
            let skipped = self
                .uffd
                .map(s, e - s, wp)
                .map_err(|e| Error::FaultFailed {
                    addr,
                    reason: format!("UFFDIO_CONTINUE: {e}"),
                })?;
            if skipped > 0 {
                // Pages that were mapped already get the protection their entries have now
                // (a write-protect fault lands here; changing protection flushes TLBs, so
                // only then), and threads waiting on them (a fault that raced an earlier
                // window) are woken: CONTINUE wakes only what it maps.
                self.uffd
                    .write_protect(s, e - s, wp)
                    .and_then(|()| self.uffd.wake(s, e - s))
                    .map_err(|e| Error::FaultFailed {
                        addr,
                        reason: format!("UFFDIO_WRITEPROTECT: {e}"),
                    })?;
            }
        }
        drop(g);
        Ok(Step::Done)
    }

    /// The window a fault at `addr` maps, inside `[floor, ceil)`: the base window around
    /// it, or, where the fault lies in or just after the last window mapped (a sequential
    /// scan, which may have run into the read-ahead before it was mapped), twice that window
    /// from `addr` on, up to [`MAX_WINDOW`] pages.
    fn window(&self, addr: u64, floor: u64, ceil: u64) -> (u64, u64) {
        let (start, end, last) = *self.stream.lock();
        if last > 0 && start <= addr && addr <= end {
            let n = (last * 2).clamp(self.base_window, MAX_WINDOW) as u64;
            (addr, (addr + n * PAGE).min(ceil))
        } else {
            let w = self.base_window as u64 * PAGE;
            let lo = (addr / w * w).max(floor);
            (lo, (lo + w).min(ceil))
        }
    }

    /// Moves the page at `addr` into its home frame (it came back to host memory elsewhere,
    /// or sits in coherent device memory).
    fn rehome(&self, addr: VirtAddr) -> Result<()> {
        let space = &self.space;
        let pm = space.pagemap().clone();
        let home = space
            .vma(addr)
            .and_then(|v| v.home_of(addr))
            .ok_or(Error::NotMapped(addr))?;
        let flags = MIGRATE_VMA_SELECT_SYSTEM | MIGRATE_VMA_SELECT_DEVICE_COHERENT;
        let mut m =
            Migration::setup_checked(space, addr, addr + PAGE, flags, self.owner, None, true)?;
        let Some((i, src)) = m.collected().next() else {
            // Pinned or busy: the caller waits and retries.
            return Err(Error::NoProgress { addr, tries: 1 });
        };
        let page = pm.claim_home(home, src.is_none(), true)?;
        if let Some(src) = src {
            let mut bytes = vec![0u8; PAGE_SIZE];
            // The home frame is locked by this migration and not mapped for pointers.
            let copied = pm
                .read_frame(src, 0, &mut bytes)
                .and_then(|()| pm.write_frame_owned(home, 0, &bytes));
            if let Err(e) = copied {
                page.unlock();
                pm.put_page(page);
                return Err(e);
            }
        }
        m.dst_mut()[i] = migrate_pfn(home);
        let out = m.copied()?.finalize();
        if out.migrated == 0 {
            return Err(Error::NoProgress { addr, tries: 1 });
        }
        Ok(())
    }

    /// Drops the process's entries of `[start, end)` (the frames stay in the page cache).
    fn drop_view(&self, start: u64, end: u64) {
        let _t = crate::mm::locks::acquire(crate::mm::locks::Rank::Mirror);
        let _g = self.lock.lock();
        let regions = self.regions.read();
        for (&s, r) in regions.range(..end) {
            let (lo, hi) = (s.max(start), (s + r.len).min(end));
            if lo >= hi {
                continue;
            }
            // SAFETY: `[lo, hi)` lies inside a view this mirror mapped and still owns (it is
            // listed in `regions`, which changes only under this same lock's holders); dropping
            // its entries discards nothing (the pages stay in the memfd).
            let r = unsafe {
                libc::madvise(
                    lo as *mut libc::c_void,
                    (hi - lo) as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if r != 0 {
                tracing::error!(
                    "MADV_DONTNEED on {lo:#x}..{hi:#x}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// Maps `len` bytes of the frame file from `offset`, shared, at an address of the kernel's
/// choosing; not inherited by fork(2) children (they would have no fault handler).
fn map_view(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: a new shared mapping of our own memfd, at an address the kernel picks: no
    // existing memory is touched. The result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: advice on the mapping just made; it changes only what fork(2) inherits.
    unsafe { libc::madvise(p, len as usize, libc::MADV_DONTFORK) };
    // Huge mappings where the frame file has huge pages (the kernel picks a 2 MiB-aligned
    // address for a shared-memory mapping then, and home runs of 2 MiB or more start on a
    // 2 MiB boundary of the file); no effect otherwise.
    // SAFETY: advice on the mapping just made; it changes only the page size the kernel may
    // use to map it.
    unsafe { libc::madvise(p, len as usize, libc::MADV_HUGEPAGE) };
    Ok(p as u64)
}

fn unmap_view(addr: u64, len: u64) {
    // SAFETY: `[addr, addr + len)` is a view this module mapped and no longer lists; safe
    // code holds no reference into it (views borrow their buffer, which is gone or freed).
    if unsafe { libc::munmap(addr as *mut libc::c_void, len as usize) } != 0 {
        tracing::error!(
            "munmap of view {addr:#x}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sends `SIGBUS` to thread `tid` of this process (the whole process if the kernel did not
/// say which thread faulted).
fn signal_bus(tid: u32) {
    // SAFETY: plain signal-sending system calls with this process's own ids.
    unsafe {
        let pid = libc::getpid();
        if tid == 0 {
            libc::kill(pid, libc::SIGBUS);
        } else {
            libc::syscall(libc::SYS_tgkill, pid, tid as libc::pid_t, libc::SIGBUS);
        }
    }
}

/// A user-facing reason for an OS error from userfaultfd.
fn why(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "userfaultfd is not permitted ({e}): run with CAP_SYS_PTRACE, or set \
             vm.unprivileged_userfaultfd=1; Buffer::read and Buffer::write keep working"
        ),
        Some(libc::ENOSYS) => format!("this kernel has no userfaultfd ({e})"),
        Some(libc::EINVAL) => format!(
            "this kernel lacks a userfaultfd feature hetmem needs (shmem minor faults, \
             write protection: Linux 6.4 or later): {e}"
        ),
        _ => format!("userfaultfd: {e}"),
    }
}
