//! The process's own page table as one more mirror of an address space: ranges that code
//! reaches through plain CPU pointers (the kernel's view of a process, kept by hetmem's rules).
//!
//! The fault path is in `fault.rs`, the read-ahead of scans in `ahead.rs`, the runs left to
//! the kernel's own fault path in `left.rs`, the userfaultfd itself in `uffd.rs`.
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
//!   way);
//! - a long run of present, writable home pages is instead left to the kernel's own fault
//!   path (its registration ends) until an invalidation touches it, which registers it again
//!   before it drops entries (`left.rs`).
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
mod fault;
mod left;
mod uffd;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use hetmem_engine::PfnRange;
use parking_lot::{Mutex, RwLock};

use left::Left;
pub use uffd::FaultScope;
use uffd::Uffd;

use crate::error::{Error, Result};
use crate::mm::{AddressSpace, Notifier, NotifierId, NotifyRange, Owner, SpaceId, VirtAddr, PAGE};

/// Most pages one fault maps (and, for a sequential scan, brings back) at once.
pub const MAX_WINDOW: usize = 2048;
/// Runs of at least this many writable pages are left to the kernel's fault path
/// (`Shared::leave`) rather than mapped page by page.
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
    /// It guards the runs left to the kernel's fault path (`Shared::leave`).
    lock: Mutex<Left>,
    stop: AtomicBool,
    last_error: Mutex<Option<CpuFaultError>>,
    served: AtomicU64,
    /// The last window mapped (start, end, pages), to grow windows on sequential scans.
    stream: Mutex<(u64, u64, usize)>,
    /// The address of the last fault served (how far the read-ahead may run ahead of it).
    last_fault: AtomicU64,
    /// (thread, page) of faults refused once and not signalled (`Shared::first_strike`).
    strikes: Mutex<std::collections::HashSet<(u32, u64)>>,
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
            lock: Mutex::new(Left::default()),
            stop: AtomicBool::new(false),
            last_error: Mutex::new(None),
            served: AtomicU64::new(0),
            stream: Mutex::new((0, 0, 0)),
            last_fault: AtomicU64::new(0),
            strikes: Mutex::new(std::collections::HashSet::new()),
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
        // A region that used these addresses before left nothing behind (`unmap` forgets its
        // runs); forgetting again costs nothing and keeps a stale run from ever answering
        // this region's faults.
        s.lock.lock().0.remove(&view);
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
        s.lock.lock().0.remove(&addr);
        // A scan of this range ends here: its stream must not read ahead into a range mapped
        // at these addresses later.
        {
            let mut stream = s.stream.lock();
            if (addr..addr + region.len).contains(&stream.0) {
                *stream = (0, 0, 0);
                s.last_fault.store(0, Ordering::Relaxed);
            }
        }
        // Unmapped while still registered (the registration goes with the mapping), so no
        // access in between is served by the kernel from frames about to be given back;
        // threads still waiting on a fault there are woken, into the signal of an access to
        // unmapped memory.
        unmap_view(addr, region.len);
        if let Err(e) = s.uffd.wake(addr, region.len) {
            tracing::error!("waking faults in {addr:#x}..: {e}");
        }
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

impl Shared {
    /// Drops the process's entries of `[start, end)` (the frames stay in the page cache).
    fn drop_view(&self, start: u64, end: u64) {
        let _t = crate::mm::locks::acquire(crate::mm::locks::Rank::Mirror);
        let mut loose = self.lock.lock();
        let regions = self.regions.read();
        for (&s, r) in regions.range(..end) {
            let (lo, hi) = (s.max(start), (s + r.len).min(end));
            if lo >= hi {
                continue;
            }
            // The parts of the range left to the kernel are registered again first, so that
            // no access from here on maps a page without a fault that hetmem serves.
            self.register_again(&mut loose, s, r.len, lo, hi);
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
