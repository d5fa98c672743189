//! The device page table of each address space, and kernel launches over it.
//!
//! A table maps a window of an address space's virtual pages to the device pages that hold
//! them. Migrations to the device fill it in (under the page locks of the new pages, and
//! only if no invalidation came between); every invalidation of the space clears the range
//! after waiting for the kernel that may be reading it, so a kernel never reads a page that
//! has moved. A launch pins the pages it binds, which the invalidations of migrations then
//! cannot move, and writes their entries before the dispatch.

use std::sync::{Arc, OnceLock, Weak};

use hetmem_engine::{Device, FaultSite, Kernel, PageTable, Pfn, Ticket};
use parking_lot::Mutex;

use super::migrate::Inner;
use crate::error::{Error, Result};
use crate::mm::{
    AddressSpace, MemoryKind, Notifier, NotifyEvent, NotifyRange, Pte, SpaceId, VirtAddr, PAGE,
};

/// Device pages held in place for the lifetime of a device kernel: never evicted, never
/// migrated, until the guard drops.
#[must_use = "pages are released when the guard drops"]
pub struct DevicePin {
    pub(crate) driver: Arc<Inner>,
    pub(crate) addr: VirtAddr,
    pub(crate) pfns: Vec<Pfn>,
}

/// Pages a device page table may cover beyond what one launch needs, to keep the entries of
/// earlier launches (4 MiB of table).
const UNION_PAGES: u64 = 1 << 20;

impl std::fmt::Debug for DevicePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicePin")
            .field("addr", &self.addr)
            .field("pages", &self.pfns.len())
            .finish()
    }
}

impl DevicePin {
    /// Pins `npages` pages from `addr` on the device, migrating those that are not there.
    pub(crate) fn acquire(
        driver: &Arc<Inner>,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<DevicePin> {
        if npages > driver.budget_pages {
            return Err(Error::OverBudget {
                pages: npages,
                budget: driver.budget_pages,
            });
        }
        let pm = &driver.pagemap;
        let mut pinned: Vec<Option<Pfn>> = vec![None; npages];
        let mut pin = DevicePin {
            driver: driver.clone(),
            addr,
            pfns: Vec::with_capacity(npages),
        };
        for attempt in 0..PIN_ATTEMPTS {
            if attempt > 0 {
                std::thread::yield_now();
            }
            for (k, slot) in pinned.iter_mut().enumerate().filter(|(_, s)| s.is_none()) {
                if let Some(pfn) = pin_settled(driver, space, addr + k as u64 * PAGE)? {
                    pin.pfns.push(pfn);
                    *slot = Some(pfn);
                }
            }
            if pinned.iter().all(Option::is_some) {
                pin.pfns = pinned.into_iter().map(|p| p.expect("all pinned")).collect();
                return Ok(pin);
            }
            // Another device's private pages cannot move device to device: home first.
            for (k, _) in pinned.iter().enumerate().filter(|(_, s)| s.is_none()) {
                let at = addr + k as u64 * PAGE;
                if let Pte::DevicePrivate { pfn, .. } = space.pte(at) {
                    if pm.page(pfn).is_some_and(|p| p.owner() != driver.owner) {
                        space.fault(at, false)?;
                    }
                }
            }
            driver.migrate_range_to_device(space, addr, npages)?;
        }
        let missing = pinned
            .iter()
            .position(Option::is_none)
            .expect("some page is missing");
        Err(Error::Busy(
            space
                .pte(addr + missing as u64 * PAGE)
                .pfn()
                .unwrap_or_default(),
        ))
    }

    /// The device pages, one per page of the pinned range, in order.
    pub fn pfns(&self) -> &[Pfn] {
        &self.pfns
    }

    /// The first address of the pinned range.
    pub fn addr(&self) -> VirtAddr {
        self.addr
    }
}

impl Drop for DevicePin {
    fn drop(&mut self) {
        let pm = &self.driver.pagemap;
        for &pfn in &self.pfns {
            if let Some(p) = pm.page(pfn) {
                p.remove_pin();
                pm.put_page(p);
            }
        }
    }
}

/// Rounds of pinning what is on the device and migrating the rest before a pin gives up
/// with [`Error::Busy`] (other threads keep moving the pages).
const PIN_ATTEMPTS: usize = 8;

/// A dispatched kernel, as the table tracks it until it retires.
struct Running {
    ticket: Ticket,
    /// Set when it retires: faulting accesses and where the first was, or the error its
    /// wait gave.
    outcome: OnceLock<std::result::Result<(u32, Option<FaultSite>), String>>,
}

struct State {
    table: Option<PageTable>,
    /// First virtual page of the window.
    base: u64,
    /// The kernel dispatched last, until it retires (kernels of a space run one at a time).
    running: Option<Arc<Running>>,
}

impl State {
    /// Makes the window cover virtual pages `[lo, hi)` as well as what it covered before:
    /// a larger table (with room to grow upwards, where new buffers are mapped) replaces
    /// one that is too small, its entries carried over.
    fn cover(&mut self, device: &Device, lo: u64, hi: u64) -> Result<()> {
        let covered = self
            .table
            .as_ref()
            .is_some_and(|t| lo >= self.base && hi <= self.base + t.len() as u64);
        if covered {
            return Ok(());
        }
        // The old window too, unless that would make a sparse table far larger than this
        // launch needs (buffers can lie far apart: plain ones high in the space, CPU-mapped
        // ones where the kernel put their views): then a table for this launch's ranges
        // alone (a running launch keeps the table it was given).
        let (lo, hi) = match &self.table {
            Some(t) => {
                let (ulo, uhi) = (lo.min(self.base), hi.max(self.base + t.len() as u64));
                if uhi - ulo <= (2 * (hi - lo)).max(UNION_PAGES) {
                    (ulo, uhi)
                } else {
                    (lo, hi)
                }
            }
            None => (lo, hi),
        };
        let len = (hi - lo) as usize;
        if len > u32::MAX as usize / 2 {
            return Err(Error::InvalidArgument(
                "bound ranges span more than 2^31 pages",
            ));
        }
        let fresh = device.page_table(len + len / 2)?;
        if let Some(old) = &self.table {
            for i in 0..old.len() {
                let at = self.base + i as u64;
                let inside = at >= lo && at < lo + fresh.len() as u64;
                if let Some(p) = old.get(i).filter(|_| inside) {
                    let _ = fresh.set((at - lo) as usize, Some(p));
                }
            }
        }
        self.table = Some(fresh);
        self.base = lo;
        Ok(())
    }

    /// Waits for the running kernel and records what it found.
    fn retire(&mut self) {
        let Some(r) = self.running.take() else { return };
        let waited = r.ticket.wait();
        let table = self
            .table
            .as_ref()
            .expect("a kernel ran, so a table exists");
        let outcome = waited.map(|()| table.faults()).map_err(|e| e.to_string());
        table.reset_faults();
        let _ = r.outcome.set(outcome);
    }

    /// Clears the entries of `[start, end)`.
    fn clear(&self, start: VirtAddr, end: VirtAddr) {
        let Some(t) = &self.table else { return };
        let (s, e) = (start.page_number(), end.get().div_ceil(PAGE));
        let lo = s.max(self.base);
        let hi = e.min(self.base + t.len() as u64);
        if lo < hi {
            t.clear((lo - self.base) as usize..(hi - self.base) as usize);
        }
    }

    /// Points the entry of virtual page `vpn` at `pfn`, if the window covers it.
    fn set(&self, vpn: u64, pfn: Pfn) {
        if let Some(t) = &self.table {
            if vpn >= self.base && vpn < self.base + t.len() as u64 {
                let _ = t.set((vpn - self.base) as usize, Some(pfn));
            }
        }
    }
}

/// One address space's table.
pub(crate) struct SpaceTable {
    state: Mutex<State>,
}

impl SpaceTable {
    /// The table of `space`, made on first use.
    fn of(driver: &Arc<Inner>, space: &AddressSpace) -> Arc<SpaceTable> {
        let mut tables = driver.tables.lock();
        if let Some(t) = tables.get(&space.id()) {
            return t.clone();
        }
        let t = Arc::new(SpaceTable {
            state: Mutex::new(State {
                table: None,
                base: 0,
                running: None,
            }),
        });
        tables.insert(space.id(), t.clone());
        drop(tables);
        space.register_notifier(Arc::new(TableNotifier(Arc::downgrade(driver))));
        t
    }

    /// The device page the table maps `addr` to.
    pub(crate) fn entry(&self, addr: VirtAddr) -> Option<Pfn> {
        let st = self.state.lock();
        let t = st.table.as_ref()?;
        let vpn = addr.page_number();
        if vpn < st.base || vpn >= st.base + t.len() as u64 {
            return None;
        }
        t.get((vpn - st.base) as usize)
    }

    /// Records migrated pages: `pages` are (address, device page), all still locked by the
    /// migration; nothing is written if the space saw an invalidation since `seq`.
    pub(crate) fn migrated(&self, space: &AddressSpace, seq: u64, pages: &[(VirtAddr, Pfn)]) {
        let st = self.state.lock();
        if space.invalidate_seq() != seq {
            return;
        }
        for &(addr, pfn) in pages {
            st.set(addr.page_number(), pfn);
        }
    }
}

/// Clears tables on invalidation.
pub(crate) struct TableNotifier(pub(crate) Weak<Inner>);

impl Notifier for TableNotifier {
    fn invalidate(&self, space: SpaceId, range: &NotifyRange) {
        let Some(d) = self.0.upgrade() else { return };
        let Some(t) = d.tables.lock().get(&space).cloned() else {
            return;
        };
        let mut st = t.state.lock();
        // The kernel that may read the range finishes first.
        st.retire();
        st.clear(range.start, range.end);
        if range.event == NotifyEvent::Release {
            drop(st);
            d.tables.lock().remove(&space);
        }
    }
}

/// A kernel launched over managed memory; its pages stay pinned on the device until it is
/// waited on (dropping it waits too).
#[must_use = "a kernel's results are only known once waited on"]
pub struct Launch {
    running: Arc<Running>,
    table: Arc<SpaceTable>,
    /// The bound ranges (page-aligned address, pages), in the kernel's buffer order.
    ranges: Vec<(VirtAddr, usize)>,
    pins: Vec<DevicePin>,
}

impl std::fmt::Debug for Launch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launch")
            .field("ticket", &self.running.ticket)
            .finish()
    }
}

impl Launch {
    /// Pins `ranges` (address, pages) of `space` on the device, writes their table entries
    /// and dispatches `kernel` over `groups`; buffer `i` of the kernel is `ranges[i]`.
    pub(crate) fn start(
        driver: &Arc<Inner>,
        space: &AddressSpace,
        kernel: &Kernel,
        ranges: &[(VirtAddr, usize)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        if ranges.is_empty() {
            return Err(Error::InvalidArgument("a launch binds at least one range"));
        }
        let total: usize = ranges.iter().map(|r| r.1).sum();
        if total > driver.budget_pages {
            return Err(Error::OverBudget {
                pages: total,
                budget: driver.budget_pages,
            });
        }
        for &(addr, n) in ranges {
            if n == 0 {
                return Err(Error::EmptyRange);
            }
            space.check_range(addr, n as u64 * PAGE)?;
        }
        let pins = ranges
            .iter()
            .map(|&(addr, n)| DevicePin::acquire(driver, space, addr, n))
            .collect::<Result<Vec<_>>>()?;
        let table = SpaceTable::of(driver, space);
        let mut st = table.state.lock();
        st.retire();
        // The window covers every bound range (and what it covered before).
        let lo = ranges
            .iter()
            .map(|r| r.0.page_number())
            .min()
            .expect("non-empty");
        let hi = ranges
            .iter()
            .map(|r| r.0.page_number() + r.1 as u64)
            .max()
            .expect("non-empty");
        st.cover(&driver.device, lo, hi)?;
        for pin in &pins {
            for (k, &pfn) in pin.pfns.iter().enumerate() {
                st.set(pin.addr.page_number() + k as u64, pfn);
            }
        }
        let bound: Vec<std::ops::Range<u32>> = ranges
            .iter()
            .map(|r| {
                let first = (r.0.page_number() - st.base) as u32;
                first..first + r.1 as u32
            })
            .collect();
        let t = st.table.as_ref().expect("made above");
        t.reset_faults();
        let ticket = driver.device.dispatch(kernel, t, &bound, args, groups)?;
        let running = Arc::new(Running {
            ticket,
            outcome: OnceLock::new(),
        });
        st.running = Some(running.clone());
        drop(st);
        Ok(Launch {
            running,
            table,
            ranges: ranges.to_vec(),
            pins,
        })
    }

    /// True once the kernel has finished; does not block.
    pub fn is_done(&self) -> bool {
        self.running.outcome.get().is_some() || self.running.ticket.is_done().unwrap_or(true)
    }

    /// Blocks until the kernel has finished, then releases its pins. Fails with
    /// [`Error::KernelFault`], naming the buffer and the offset of the first such access,
    /// if the kernel touched anything outside the ranges the launch bound (those accesses
    /// read zeros and wrote nothing).
    pub fn wait(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        {
            let mut st = self.table.state.lock();
            if st
                .running
                .as_ref()
                .is_some_and(|r| Arc::ptr_eq(r, &self.running))
            {
                st.retire();
            }
        }
        self.pins.clear();
        match self.running.outcome.get() {
            Some(Ok((0, _))) => Ok(()),
            Some(Ok((n, site))) => {
                let site = site.unwrap_or(FaultSite {
                    buffer: 0,
                    offset: 0,
                });
                Err(Error::KernelFault {
                    buffer: site.buffer as usize,
                    addr: self.ranges.get(site.buffer as usize).map(|r| r.0),
                    offset: site.offset,
                    accesses: *n,
                })
            }
            Some(Err(e)) => Err(Error::FaultFailed {
                addr: self.ranges[0].0,
                reason: format!("kernel did not complete: {e}"),
            }),
            None => unreachable!("a retired kernel has an outcome"),
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if !self.pins.is_empty() {
            let _ = self.finish();
        }
    }
}

/// Pins the page `at` maps if it is one of `driver`'s device pages in a settled, writable
/// entry, and returns it; `None` if it is not (yet): not on this device, under migration,
/// or read-only (then made writable first, for the next attempt).
fn pin_settled(driver: &Inner, space: &AddressSpace, at: VirtAddr) -> Result<Option<Pfn>> {
    let pm = &driver.pagemap;
    // Only a settled entry: a page under migration may be on its way out.
    let (pfn, writable) = match space.pte(at) {
        Pte::Present { pfn, write, .. } | Pte::DevicePrivate { pfn, write } => (pfn, write),
        _ => return Ok(None),
    };
    // A kernel may write what it is given: a read-only entry is made writable
    // first, as a CPU write would (a copy of a page shared after fork, or
    // `WriteDenied` for a read-only mapping), then brought back to the device.
    if !writable {
        space.fault(at, true)?;
        return Ok(None);
    }
    let Some(page) = pm
        .page(pfn)
        .filter(|p| p.owner() == driver.owner && p.kind() != MemoryKind::System && p.try_get())
    else {
        return Ok(None);
    };
    page.add_pin();
    // Still the settled entry: a migration that passed its reference check before
    // the pin shows a migration entry (whose pfn is still this page's) until it
    // maps the new page, so only a settled entry proves the pin holds the page
    // the address maps.
    let settled = matches!(
        space.pte(at),
        Pte::Present { pfn: p, .. } | Pte::DevicePrivate { pfn: p, .. } if p == pfn
    );
    if settled {
        return Ok(Some(pfn));
    }
    page.remove_pin();
    pm.put_page(page);
    Ok(None)
}
