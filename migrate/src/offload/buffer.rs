//! Managed buffers: a range of the context's address space that moves between host and device
//! memory on request, on advice and on CPU access.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::context::Context;
use super::view::{Access, Use, View, ViewMut};
use crate::driver::DevicePin;
use crate::error::{Error, Result};
use crate::migration::Outcome;
use crate::mm::{VirtAddr, PAGE};

/// Where a buffer's pages should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Host memory.
    Host,
    /// The context's device.
    Device,
}

/// Hints about a buffer's use (CUDA's `cudaMemAdvise`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Advice {
    /// Keep the pages there: they move there now.
    PreferredLocation(Location),
    /// The device will use the pages: eviction passes them over once.
    AccessedBy(Location),
}

struct Inner {
    ctx: Context,
    addr: VirtAddr,
    len: usize,
    freed: AtomicBool,
    preferred: Mutex<Option<Location>>,
    /// Mapped in the process too (`Context::alloc_mapped`): `addr` is a CPU address.
    mapped: bool,
    /// Views alive and library uses of the bytes that views exclude.
    access: Access,
}

impl Inner {
    fn unmap(&self) -> Result<()> {
        if self.mapped {
            self.ctx.unmap_cpu(self.addr.get())
        } else {
            self.ctx
                .space()
                .munmap(self.addr, (self.len as u64).div_ceil(PAGE) * PAGE)
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if !self.freed.swap(true, Ordering::AcqRel) {
            let _ = self.unmap();
        }
    }
}

/// A managed buffer. Cloning gives another handle to the same buffer.
#[derive(Clone)]
pub struct Buffer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("addr", &self.inner.addr)
            .field("len", &self.inner.len)
            .finish()
    }
}

/// A prefetch in flight; `wait` gives what moved.
#[must_use = "a prefetch is only known to be done once waited on"]
pub struct Prefetch {
    rx: std::sync::mpsc::Receiver<Result<Outcome>>,
    /// The result, once `is_done` has taken it from the worker.
    done: Mutex<Option<Result<Outcome>>>,
}

impl Prefetch {
    /// Blocks until the pages have moved (or failed to).
    pub fn wait(self) -> Result<Outcome> {
        if let Some(r) = self.done.lock().take() {
            return r;
        }
        self.rx
            .recv()
            .unwrap_or(Err(Error::InvalidArgument("the prefetch worker panicked")))
    }
    /// True once the prefetch has finished.
    pub fn is_done(&self) -> bool {
        let mut done = self.done.lock();
        if done.is_some() {
            return true;
        }
        match self.rx.try_recv() {
            Ok(r) => {
                *done = Some(r);
                true
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => true,
        }
    }
}

impl Buffer {
    pub(crate) fn new(ctx: Context, addr: VirtAddr, len: usize, mapped: bool) -> Buffer {
        Buffer {
            inner: Arc::new(Inner {
                ctx,
                addr,
                len,
                freed: AtomicBool::new(false),
                preferred: Mutex::new(None),
                mapped,
                access: Access::default(),
            }),
        }
    }

    /// The buffer's first byte as a CPU pointer, for a buffer made by
    /// [`Context::alloc_mapped`] ([`Error::NotCpuMapped`] otherwise). Loads and stores through
    /// it work from any thread while the buffer lives: a page on the device faults back on
    /// first touch. Dereferencing it is `unsafe` as for any raw pointer: the caller keeps to
    /// the buffer's bounds, does not race other writers, and stops using it once the buffer
    /// is freed (an access after that gets `SIGBUS` or `SIGSEGV`). [`Buffer::view`] and
    /// [`Buffer::view_mut`] are the safe way in.
    pub fn as_ptr(&self) -> Result<*const u8> {
        Ok(self.as_mut_ptr()?.cast_const())
    }

    /// [`Buffer::as_ptr`], for writing.
    pub fn as_mut_ptr(&self) -> Result<*mut u8> {
        if !self.inner.mapped {
            return Err(Error::NotCpuMapped);
        }
        if self.inner.freed.load(Ordering::Acquire) {
            return Err(Error::Freed);
        }
        Ok(self.inner.addr.get() as *mut u8)
    }

    /// The buffer's bytes as `&[T]` (as many whole `T`s as fit), for a buffer made by
    /// [`Context::alloc_mapped`]. While the view lives, calls that would change the bytes
    /// (`write`, a kernel launch over the buffer, `free`, an exclusive view) fail with
    /// [`Error::ViewActive`]; pages may still move, and fault back on access.
    ///
    /// ```
    /// # use hetmem::offload::{Context, ContextConfig};
    /// # fn main() -> hetmem::Result<()> {
    /// # let ctx = Context::new(ContextConfig { device: hetmem_engine::DeviceConfig::default().kind(hetmem_engine::DeviceKind::Host), budget_bytes: 1 << 20, ..Default::default() })?;
    /// let buf = match ctx.alloc_mapped(8192) {
    ///     Ok(b) => b,
    ///     Err(hetmem::Error::PointersUnavailable(why)) => { eprintln!("{why}"); return Ok(()) }
    ///     Err(e) => return Err(e),
    /// };
    /// buf.view_mut::<u32>()?[5] = 7;
    /// assert_eq!(buf.view::<u32>()?[5], 7);
    /// # Ok(()) }
    /// ```
    ///
    /// A buffer with a page pinned on the device ([`Buffer::pin_on_device`], a launch in
    /// flight) has no view: [`Error::HeldOnDevice`], naming the buffer and the first held
    /// page's offset (a load of that page would wait for the pin, which may be the viewing
    /// thread's own).
    pub fn view<T: bytemuck::Pod>(&self) -> Result<View<'_, T>> {
        let p = self.as_ptr()?;
        // SAFETY: the range is the buffer's own CPU mapping, page-aligned (so aligned for
        // any `Pod` type up to a page), mapped while `self` lives (freeing needs a token the
        // view excludes), its faults served by the context's mirror; its bytes do not change
        // while the view's token is held (every library write takes a token first).
        let view = unsafe { View::new(p, self.inner.len, &self.inner.access) }?;
        // Checked with the view's token held: no pin can be taken while it lives.
        self.refuse_pinned()?;
        Ok(view)
    }

    /// Fails with [`Error::HeldOnDevice`] if a page of the buffer is pinned on the device
    /// (private or coherent): a CPU access to it waits until the pin goes.
    fn refuse_pinned(&self) -> Result<()> {
        let space = self.inner.ctx.space();
        let pm = space.pagemap();
        for k in 0..(self.inner.len as u64).div_ceil(PAGE) {
            let pfn = match space.pte(self.inner.addr + k * PAGE) {
                crate::mm::Pte::DevicePrivate { pfn, .. } => pfn,
                crate::mm::Pte::Present { pfn, .. } if !pm.frames().contains(pfn) => pfn,
                _ => continue,
            };
            if pm.page(pfn).is_some_and(|p| p.pincount() > 0) {
                return Err(Error::HeldOnDevice {
                    addr: self.inner.addr,
                    offset: (k * PAGE) as usize,
                });
            }
        }
        Ok(())
    }

    /// The buffer's bytes as `&mut [T]` (as many whole `T`s as fit), for a buffer made by
    /// [`Context::alloc_mapped`]. While it lives, every other use of the bytes through the
    /// library (`read`, `write`, views, launches, pins, `free`) fails with
    /// [`Error::ViewActive`]. Refused with [`Error::HeldOnDevice`] as [`Buffer::view`] is.
    pub fn view_mut<T: bytemuck::Pod>(&self) -> Result<ViewMut<'_, T>> {
        let p = self.as_mut_ptr()?;
        // SAFETY: as in `view`, and the exclusive token keeps every other library access out.
        let view = unsafe { ViewMut::new(p, self.inner.len, &self.inner.access) }?;
        self.refuse_pinned()?;
        // Checked with the view's token held: the protection cannot change while it lives.
        let space = self.inner.ctx.space();
        if space.vma(self.inner.addr).is_some_and(|v| !v.prot.write) {
            return Err(Error::WriteDenied(self.inner.addr));
        }
        Ok(view)
    }

    /// Makes a buffer made by [`Context::alloc_mapped`] read-only (`true`) or writable again.
    /// Afterwards a store through its pointer to a read-only page is a fault that cannot be
    /// served: the storing thread gets `SIGBUS`, and
    /// [`Context::take_cpu_fault_error`] says [`Error::WriteDenied`] at that address;
    /// `write` and `view_mut` fail with `WriteDenied`. Fails with [`Error::ViewActive`] while
    /// a view is alive.
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        if !self.inner.mapped {
            return Err(Error::NotCpuMapped);
        }
        let (addr, n) = self.pages(0..self.inner.len)?;
        let _use = self.begin(Use::Write)?;
        let prot = if read_only {
            crate::mm::Prot::READ
        } else {
            crate::mm::Prot::RW
        };
        self.inner
            .ctx
            .space()
            .mprotect_checked(addr, n as u64 * PAGE, prot, true)
    }

    /// A library use of the bytes, checked against live views.
    pub(crate) fn begin(&self, what: Use) -> Result<super::view::Token<'_>> {
        self.inner.access.begin(what)
    }

    /// Bytes in the buffer.
    pub fn len(&self) -> usize {
        self.inner.len
    }
    /// True for an empty buffer (never: allocation refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// The buffer's address in the context's address space.
    pub fn addr(&self) -> VirtAddr {
        self.inner.addr
    }
    /// The preferred location last advised.
    pub fn preferred(&self) -> Option<Location> {
        *self.inner.preferred.lock()
    }

    /// The page-aligned address and page count covering `range`, after checks.
    /// `offset + len`, or `OutOfBounds` if that overflows.
    fn end_of(&self, offset: usize, len: usize) -> Result<usize> {
        offset.checked_add(len).ok_or(Error::OutOfBounds {
            start: offset,
            end: usize::MAX,
            size: self.inner.len,
        })
    }

    fn pages(&self, range: Range<usize>) -> Result<(VirtAddr, usize)> {
        if self.inner.freed.load(Ordering::Acquire) {
            return Err(Error::Freed);
        }
        if range.start > range.end || range.end > self.inner.len {
            return Err(Error::OutOfBounds {
                start: range.start,
                end: range.end,
                size: self.inner.len,
            });
        }
        if range.is_empty() {
            return Err(Error::EmptyRange);
        }
        let first = range.start as u64 / PAGE;
        let last = (range.end as u64).div_ceil(PAGE);
        Ok((self.inner.addr + first * PAGE, (last - first) as usize))
    }

    /// What a CPU access to `range` that failed with `e` reports: a page held on the device
    /// (`Busy`, from a launch's or a guard's pin) becomes [`Error::HeldOnDevice`] with the
    /// buffer's address and the offset of the first held byte of `range`, never a frame
    /// number.
    fn held_on_device(&self, e: Error, range: Range<usize>) -> Error {
        if !matches!(e, Error::Busy(_)) {
            return e;
        }
        let space = self.inner.ctx.space();
        let pm = space.pagemap();
        let held = (range.start as u64 / PAGE..(range.end as u64).div_ceil(PAGE)).find(|&k| {
            let pte = space.pte(self.inner.addr + k * PAGE);
            pte.pfn()
                .and_then(|pfn| pm.page(pfn))
                .is_some_and(|p| p.kind() != crate::mm::MemoryKind::System && p.pincount() > 0)
        });
        Error::HeldOnDevice {
            addr: self.inner.addr,
            offset: held
                .map_or(range.start, |k| (k * PAGE) as usize)
                .max(range.start),
        }
    }

    /// What a device-side call (a pin, a launch) on `range` that failed with `e` reports: a
    /// page that could not be held (`Busy`, naming its frame) becomes
    /// [`Error::BufferBusy`] with the buffer's address and the offset of that page in
    /// `range` (the range's first byte if the page has moved on since), never a frame
    /// number.
    pub(crate) fn busy_in(&self, e: Error, range: Range<usize>) -> Error {
        let Error::Busy(pfn) = e else {
            return e;
        };
        let offset = self.offset_of(pfn, range.clone()).unwrap_or(range.start);
        Error::BufferBusy {
            addr: self.inner.addr,
            offset: offset.max(range.start),
        }
    }

    /// The offset of the page of `range` that maps `pfn` now, if one does.
    pub(crate) fn offset_of(&self, pfn: hetmem_engine::Pfn, range: Range<usize>) -> Option<usize> {
        let space = self.inner.ctx.space();
        (range.start as u64 / PAGE..(range.end as u64).div_ceil(PAGE))
            .find(|&k| space.pte(self.inner.addr + k * PAGE).pfn() == Some(pfn))
            .map(|k| (k * PAGE) as usize)
    }

    /// Moves the pages of `range` to `to`, in the background (on the context's one prefetch
    /// worker, in the order asked). A device prefetch larger than the device budget is
    /// refused (`OverBudget`) with nothing moved.
    pub fn prefetch(&self, range: Range<usize>, to: Location) -> Result<Prefetch> {
        let (addr, n) = self.pages(range)?;
        let driver = self.inner.ctx.driver().clone();
        if to == Location::Device && n > driver.budget_pages() {
            return Err(Error::OverBudget {
                pages: n,
                budget: driver.budget_pages(),
            });
        }
        let space = self.inner.ctx.space().clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.inner.ctx.inner.background(Box::new(move || {
            let moved = match to {
                Location::Device => driver.migrate_to_device_unchecked(&space, addr, n),
                Location::Host => driver.migrate_to_host_unchecked(&space, addr, n),
            };
            let _ = tx.send(moved);
        }))?;
        Ok(Prefetch {
            rx,
            done: Mutex::new(None),
        })
    }

    /// Moves the pages of `range` back to host memory now.
    ///
    /// During a launch that binds part of `range`: the eviction's invalidation first waits
    /// for the running kernel to finish (the device page table is cleared only then), and the
    /// pages the launch holds stay on the device until it is waited on or dropped; they are
    /// counted as not migrated. Their bytes are the kernel's.
    pub fn evict(&self, range: Range<usize>) -> Result<Outcome> {
        let (addr, n) = self.pages(range)?;
        self.inner
            .ctx
            .driver()
            .migrate_to_host_unchecked(self.inner.ctx.space(), addr, n)
    }

    /// Applies advice to the whole buffer.
    pub fn advise(&self, advice: Advice) -> Result<()> {
        let (addr, n) = self.pages(0..self.inner.len)?;
        match advice {
            Advice::PreferredLocation(loc) => {
                // Recorded only once the buffer is there: failed advice changes nothing.
                self.prefetch(0..self.inner.len, loc)?.wait()?;
                *self.inner.preferred.lock() = Some(loc);
            }
            Advice::AccessedBy(Location::Device) => {
                self.inner
                    .ctx
                    .driver()
                    .touch(self.inner.ctx.space(), addr, n)
            }
            Advice::AccessedBy(Location::Host) => {}
        }
        Ok(())
    }

    /// Copies bytes out of the buffer from `offset` (pages on the device fault back, or are
    /// read in place if the memory is coherent). A page held on the device by a launch
    /// (running or not yet waited on) or a [`Buffer::pin_on_device`] guard cannot come back:
    /// the read fails with [`Error::HeldOnDevice`], naming the buffer and the offset, and
    /// `out` holds no meaningful bytes. It may wait for a running kernel to finish (the
    /// fault's invalidation does), never for the launch to be waited on, which may be this
    /// thread's to do.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.pages(offset..self.end_of(offset, out.len())?)?;
        let _use = self.begin(Use::Read)?;
        self.inner
            .ctx
            .space()
            .read_checked(self.inner.addr + offset as u64, out, self.inner.mapped)
            .map_err(|e| self.held_on_device(e, offset..offset + out.len()))
    }

    /// Copies bytes into the buffer at `offset`. A range with a page held on the device (by a
    /// [`Buffer::pin_on_device`] guard or a launch, running or not yet waited on) fails with
    /// [`Error::HeldOnDevice`], naming the buffer and the offset, before any byte is written.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        let (addr, n) = self.pages(offset..self.end_of(offset, data.len())?)?;
        let _use = self.begin(Use::Write)?;
        let space = self.inner.ctx.space();
        let pm = space.pagemap();
        for k in 0..n as u64 {
            if let crate::mm::Pte::DevicePrivate { pfn, .. } = space.pte(addr + k * PAGE) {
                if pm.page(pfn).is_some_and(|p| p.pincount() > 0) {
                    return Err(self.held_on_device(Error::Busy(pfn), offset..offset + data.len()));
                }
            }
        }
        space
            .write_checked(self.inner.addr + offset as u64, data, self.inner.mapped)
            .map_err(|e| self.held_on_device(e, offset..offset + data.len()))
    }

    /// Brings `range` to the device and holds its pages there (no eviction, no migration)
    /// until the guard drops: what a device kernel needs while it runs. Pages already on the
    /// device are pinned first, so bringing in the rest cannot evict them. Fails with
    /// [`Error::ViewActive`] while a view of the buffer lives (its loads would wait for the
    /// pin), and views are refused while the pin lives. A page that cannot be brought and
    /// held there fails it with [`Error::BufferBusy`] (buffer and offset), nothing pinned.
    pub fn pin_on_device(&self, range: Range<usize>) -> Result<DevicePin> {
        let (addr, n) = self.pages(range.clone())?;
        // Held while pinning: a view made afterwards sees the pins.
        let _use = self.begin(Use::Write)?;
        let ctx = &self.inner.ctx;
        ctx.driver()
            .pin_on_device_unchecked(ctx.space(), addr, n)
            .map_err(|e| self.busy_in(e, range))
    }

    /// The pages of `range` (address, count), for binding to a kernel launch.
    pub(crate) fn page_range(&self, range: Range<usize>) -> Result<(VirtAddr, usize)> {
        self.pages(range)
    }

    /// True if `ctx` is the context the buffer belongs to.
    pub(crate) fn belongs_to(&self, ctx: &Context) -> bool {
        std::sync::Arc::ptr_eq(&self.inner.ctx.inner, &ctx.inner)
    }

    /// Frees the buffer; every handle then fails with [`Error::Freed`].
    ///
    /// During a launch that binds it: the unmap's invalidation first waits for the running
    /// kernel to finish, then the buffer's pages leave the address space; the device pages
    /// the launch holds go back to the device when it is waited on or dropped, and its wait
    /// reports the kernel's own outcome. Other buffers' bytes are untouched.
    ///
    /// Waits for this buffer's reads and writes in progress on other threads (they would
    /// otherwise land in whatever is mapped at its addresses next); fails with
    /// [`Error::ViewActive`] while a view lives.
    pub fn free(&self) -> Result<()> {
        self.inner.access.close()?;
        self.inner.freed.store(true, Ordering::Release);
        self.inner.unmap()
    }
}
