//! The fault thread's path: reading faults, resolving each through hetmem's fault path,
//! mapping (or leaving to the kernel) the window around it, and moving pages home.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hetmem_engine::PAGE_SIZE;

use super::uffd::{Fault, FAULT_WP, FAULT_WRITE};
use super::{signal_bus, CpuFaultError, Region, Shared, BULK_PAGES, MAX_WINDOW, SERVE_TRIES};

/// Refusals remembered for their second strike (`Shared::first_strike`).
const MAX_STRIKES: usize = 1024;
use crate::error::{Error, Result};
use crate::migration::{
    migrate_pfn, Migration, MIGRATE_VMA_SELECT_DEVICE_COHERENT, MIGRATE_VMA_SELECT_SYSTEM,
};
use crate::mm::{VirtAddr, PAGE};

/// What one attempt at a fault came to.
pub(super) enum Step {
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
    pub(super) fn run(self: Arc<Self>) {
        let mut faults = Vec::new();
        let mut aside: Vec<Fault> = Vec::new();
        // Whether the read-ahead of a scan has more windows to bring: only a look at the
        // descriptor (no wait) before the next.
        let mut ahead = false;
        while !self.stop.load(Ordering::Acquire) {
            let wait = if ahead {
                0
            } else if aside.is_empty() {
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
            // Faults first: a window ahead is brought only while none is waiting.
            ahead = self.read_ahead();
        }
        // Shutting down: each fault put aside ends in its signal (`resolve` says so).
        for f in &aside {
            self.serve(f);
        }
    }

    /// The region holding `addr`: its start and itself.
    pub(super) fn region_of(&self, addr: u64) -> Option<(u64, Region)> {
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
        if self.lock.lock().contains(addr) {
            // A fault queued just before its run was left to the kernel: its thread was
            // woken (`leave`) and maps the page through the kernel's own fault path.
            if let Err(e) = self.uffd.wake(addr, PAGE) {
                tracing::error!("waking the thread faulting at {addr:#x}: {e}");
            }
            return Served::Ended;
        }
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
                self.strikes.lock().remove(&(f.tid, addr));
            }
            Err(error) if self.first_strike(f.tid, addr, &error) => {
                // The message may be stale: its thread's access may have been served since
                // (a window mapped around it woke it) and the thread moved on, after which its
                // buffer was freed or made read-only. It is woken without a signal; if the
                // access still cannot be served, it faults again at once and that fault's
                // refusal is signalled.
                tracing::debug!("CPU fault at {addr:#x}: {error} (first refusal: woken)");
                if let Err(e) = self.uffd.wake(addr, PAGE) {
                    tracing::error!("waking the thread faulting at {addr:#x}: {e}");
                }
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
        Served::Ended
    }

    /// True if `error`, for a fault of thread `tid` at `addr`, is one a stale message can
    /// get (the range unmapped or its protection changed after the access was served) and
    /// this thread has not been refused there just before: the refusal is then remembered
    /// and not signalled. The second refusal in a row is signalled.
    fn first_strike(&self, tid: u32, addr: u64, error: &Error) -> bool {
        if self.stop.load(Ordering::Acquire)
            || !matches!(
                error,
                Error::NotMapped(_) | Error::ReadDenied(_) | Error::WriteDenied(_)
            )
        {
            return false;
        }
        let mut strikes = self.strikes.lock();
        if strikes.remove(&(tid, addr)) {
            return false;
        }
        if strikes.len() >= MAX_STRIKES {
            // Threads that moved on leave entries behind; forgetting them costs a real
            // refusal at most one more round trip.
            strikes.clear();
        }
        strikes.insert((tid, addr));
        true
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
        // A read of a writable mapping asks for write access, so the window maps writable in
        // one go; `vma` was looked up before the migration above, and the range may have been
        // made read-only since (`set_read_only`): a read is never refused for that, it is
        // tried again with the mapping as it is now.
        match space.fault(va, write || vma.prot.write) {
            Err(Error::WriteDenied(_)) if !write => return Ok(Step::Retry),
            r => r?,
        }
        // Entries are read (and mapped) after this: an invalidation of the window from here
        // on is seen by `read_retry_range`; one running now (the migrations above are over)
        // puts the fault aside.
        let Some(seq) = space.try_read_begin_range(VirtAddr(lo), VirtAddr(hi)) else {
            return Ok(Step::Defer);
        };
        let step = self.map_window(&vma, lo, hi, seq, Some(addr))?;
        if let Step::Done = step {
            let mut stream = self.stream.lock();
            // A fault inside the stream (a scan reaching a window the read-ahead brought)
            // keeps the stream's end, where the read-ahead goes on.
            let (start, end, last) = *stream;
            let end = if last > 0 && start <= addr && addr <= end {
                end.max(hi)
            } else {
                hi
            };
            *stream = (lo, end, ((hi - lo) / PAGE) as usize);
            drop(stream);
            self.last_fault.store(addr, Ordering::Relaxed);
        }
        Ok(step)
    }

    /// Maps the present home frames of `[lo, hi)` (one mapping) in the process, unless an
    /// invalidation started since `seq`. `must`: the faulting address, which has to be among
    /// them (else the step says why not).
    pub(super) fn map_window(
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
        let region = self.region_of(lo).ok_or(Error::NotMapped(addr))?;
        let failed = |what: &str, e: std::io::Error| Error::FaultFailed {
            addr,
            reason: format!("{what}: {e}"),
        };
        let _t = crate::mm::locks::acquire(crate::mm::locks::Rank::Mirror);
        let mut g = self.lock.lock();
        if space.read_retry_range(seq, VirtAddr(lo), VirtAddr(hi)) {
            return Ok(Step::Retry);
        }
        for &(s, e, wp) in &runs {
            // A long writable run is left to the kernel (its pages map on the accessing
            // thread's own faults, many per fault); where that is refused (no room for one
            // more mapping), it is mapped here.
            if !wp
                && e - s >= BULK_PAGES * PAGE
                && g.room(region.0)
                && self.leave(&mut g, region.0, s, e).is_ok()
            {
                continue;
            }
            let skipped = match self.uffd.map(s, e - s, wp) {
                Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {
                    // Part of the run was left to the kernel earlier (its entries did not
                    // change since: an invalidation would have registered it again).
                    if !wp {
                        self.leave(&mut g, region.0, s, e)
                            .map_err(|e| failed("leaving a run", e))?;
                        continue;
                    }
                    self.uffd
                        .register(region.0, region.1.len)
                        .map_err(|e| failed("registering a region again", e))?;
                    g.0.remove(&region.0);
                    self.uffd.map(s, e - s, wp)
                }
                r => r,
            }
            .map_err(|e| failed("UFFDIO_CONTINUE", e))?;
            if skipped > 0 {
                // Pages that were mapped already get the protection their entries have now
                // (a write-protect fault lands here; changing protection flushes TLBs, so
                // only then), and threads waiting on them (a fault that raced an earlier
                // window) are woken: CONTINUE wakes only what it maps.
                self.uffd
                    .write_protect(s, e - s, wp)
                    .and_then(|()| self.uffd.wake(s, e - s))
                    .map_err(|e| failed("UFFDIO_WRITEPROTECT", e))?;
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
}
