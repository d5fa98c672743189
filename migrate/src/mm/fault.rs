//! Faults and the CPU access path: a CPU touch of an address resolves its entry (populating
//! holes, copying on write, bringing device-private pages back through their owner's
//! `migrate_to_ram`, waiting out migrations), then reads or writes the bytes in place.

use std::sync::Arc;

use hetmem_engine::{Pfn, PAGE_SIZE};

use super::notifier::{NotifyEvent, NotifyRange};
use super::page::{flags, Page};
use super::pagemap::{FaultContext, PageMap};
use super::pte::Pte;
use super::space::{find_vma, leaf_index, AddressSpace, Vma, PAGE};
use crate::error::{Error, Result};
use crate::mm::{Owner, VirtAddr};

/// Times a fault retries a device-private page that its driver left on the device (another
/// thread held a reference to it, so it could not move) before failing with
/// [`Error::NoProgress`]. Retries after the first few back off (up to a millisecond each), so
/// the limit spans about a second of contention.
pub const FAULT_TRIES: u32 = 1024;

/// Retries that only yield before backing off.
const FAULT_SPINS: u32 = 8;

impl AddressSpace {
    /// Handles a CPU access to `addr`: afterwards the entry is present (and writable for a
    /// write), unless the access is not allowed.
    pub fn fault(&self, addr: VirtAddr, write: bool) -> Result<()> {
        let addr = addr.page_down();
        self.with_page(addr, write, |_| Ok(()))
    }

    /// Reads `out.len()` bytes at `addr` through the page table.
    ///
    /// A range mapped for CPU pointers (`Context::alloc_mapped`) is refused with
    /// [`Error::InvalidArgument`]: its bytes may sit behind a live `&mut` view, and only its
    /// buffer knows (`Buffer::read`).
    pub fn read(&self, addr: VirtAddr, out: &mut [u8]) -> Result<()> {
        self.read_checked(addr, out, false)
    }

    /// Writes `data` at `addr` through the page table.
    ///
    /// A range mapped for CPU pointers is refused with [`Error::InvalidArgument`]: its bytes
    /// may sit behind a live view, and only its buffer knows (`Buffer::write`).
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<()> {
        self.write_checked(addr, data, false)
    }

    /// `read`, of ranges mapped for CPU pointers too if `homed` (the caller has checked the
    /// buffer's views).
    pub(crate) fn read_checked(&self, addr: VirtAddr, out: &mut [u8], homed: bool) -> Result<()> {
        if !homed {
            self.refuse_homed(addr, out.len())?;
        }
        self.for_each_span(addr, out.len(), false, |pm, pfn, off, range| {
            if homed {
                pm.read_frame_owned(pfn, off, &mut out[range])
            } else {
                pm.read_frame(pfn, off, &mut out[range])
            }
        })
    }

    /// `write`, of ranges mapped for CPU pointers too if `homed` (the caller has checked the
    /// buffer's views).
    pub(crate) fn write_checked(&self, addr: VirtAddr, data: &[u8], homed: bool) -> Result<()> {
        if !homed {
            self.refuse_homed(addr, data.len())?;
        }
        self.for_each_span(addr, data.len(), true, |pm, pfn, off, range| {
            if homed {
                pm.write_frame_owned(pfn, off, &data[range])
            } else {
                pm.write_frame(pfn, off, &data[range])
            }
        })
    }

    /// Fails if a mapping of `[addr, addr + len)`, up to its first hole, is mapped for CPU
    /// pointers (the hole is left to the access itself to report).
    pub(crate) fn refuse_homed(&self, addr: VirtAddr, len: usize) -> Result<()> {
        let end = addr.saturating_add(len as u64);
        let mut at = addr.page_down();
        while at < end {
            match self.vma(at) {
                Some(v) if v.home.is_some() => {
                    return Err(Error::InvalidArgument(
                        "the range is mapped for CPU pointers: use its buffer",
                    ))
                }
                Some(v) => at = v.end,
                // The access stops at the hole, before anything past it.
                None => break,
            }
        }
        Ok(())
    }

    fn for_each_span(
        &self,
        addr: VirtAddr,
        len: usize,
        write: bool,
        mut f: impl FnMut(&PageMap, Pfn, usize, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let at = addr + done as u64;
            let page_addr = at.page_down();
            let off = at.page_offset() as usize;
            let n = (PAGE_SIZE - off).min(len - done);
            self.with_page(page_addr, write, |pfn| {
                f(self.pagemap(), pfn, off, done..done + n)
            })?;
            done += n;
        }
        Ok(())
    }

    /// Resolves `addr` for a CPU access and runs `f` on its frame under the leaf lock, so that
    /// no migration can move the page while `f` touches it.
    ///
    /// Waiting is never holding: a thread that finds a migration entry, or a device-private
    /// page locked by another fault or migration, waits for the page's unlock without a
    /// reference (a waiter's reference would make the page look pinned to the thread that
    /// holds the lock, which would then skip it: a livelock). A device-private page that is
    /// still on the device after its driver returned is retried [`FAULT_TRIES`] times, then
    /// the fault fails with [`Error::NoProgress`]; a driver error (out of host memory, a
    /// failed copy) ends the fault at once. A thread that holds the space's map lock already
    /// (a migration of its own between setup and finalize) gets
    /// [`Error::MigrationInProgress`] instead of waiting: the page may be its own.
    ///
    /// Longer than 80 lines on purpose: one loop over the entry's states, so that where the
    /// leaf lock is taken and dropped (and `f` runs under it) reads in one place; the
    /// branches share the lock guard, the retry count and `f`, which runs exactly once.
    pub(crate) fn with_page<R>(
        &self,
        addr: VirtAddr,
        write: bool,
        f: impl FnOnce(Pfn) -> Result<R>,
    ) -> Result<R> {
        // A thread with a migration of this space in progress must not wait for a page
        // lock: the page may be one its own migration holds.
        let migrating_here = self.held_by_this_thread();
        let map = self.map_read()?;
        let vma = find_vma(&map, addr).ok_or(Error::NotMapped(addr))?;
        if !vma.prot.read && !write {
            return Err(Error::ReadDenied(addr));
        }
        if write && !vma.prot.write {
            return Err(Error::WriteDenied(addr));
        }
        let leaf = self.leaf(addr, true).expect("created");
        let i = leaf_index(addr);
        let pm = self.pagemap().clone();
        let mut tries = 0u32;
        loop {
            let g = leaf.lock();
            let pte = g.get(i);
            match pte {
                Pte::Present {
                    pfn,
                    write: w,
                    dirty,
                    ..
                } if w || !write => {
                    g.set(
                        i,
                        Pte::Present {
                            pfn,
                            write: w,
                            dirty: dirty || write,
                            young: true,
                        },
                    );
                    return f(pfn);
                }
                Pte::Present { pfn, .. } => {
                    // A write to a read-only entry of a writable mapping: reuse the page if
                    // this mapping is its only user, else copy it.
                    let page = pm.page_or_err(pfn)?;
                    let sole = !page.test(flags::ZERO)
                        && (page.test(flags::ANON_EXCLUSIVE)
                            || (page.mapcount() == 1 && page.refcount() == 1));
                    if sole || vma.shared {
                        page.set(flags::ANON_EXCLUSIVE);
                        g.set(
                            i,
                            Pte::Present {
                                pfn,
                                write: true,
                                dirty: true,
                                young: true,
                            },
                        );
                        return f(pfn);
                    }
                    drop(g);
                    // The frame behind the address changes: mirrors hear of it first (outside
                    // the leaf lock, since a notifier may sleep), and the copy is made only if
                    // the entry is still the one seen.
                    let copy = self.alloc_page_for(&vma, addr, false)?;
                    let _inv = self.invalidate(NotifyRange {
                        start: addr,
                        end: addr + PAGE,
                        event: NotifyEvent::Clear,
                        owner: Owner::NONE,
                    });
                    let g = leaf.lock();
                    if g.get(i) != pte {
                        drop(g);
                        pm.put_page(copy);
                        continue;
                    }
                    if let Err(e) = super::space::copy_frame(&pm, pfn, copy.pfn()) {
                        drop(g);
                        pm.put_page(copy);
                        return Err(e);
                    }
                    let was_dirty = matches!(pte, Pte::Present { dirty: true, .. });
                    copy.set(
                        flags::ANON_EXCLUSIVE
                            | flags::LRU
                            | if was_dirty { flags::DIRTY } else { 0 },
                    );
                    let new = Pte::Present {
                        pfn: copy.pfn(),
                        write: true,
                        dirty: true,
                        young: true,
                    };
                    let shared_page = !page.test(flags::ZERO);
                    if shared_page {
                        page.remove_rmap(super::page::Mapping {
                            space: self.id(),
                            addr,
                        });
                    }
                    self.install(&g, i, addr, new, copy, false);
                    let r = f(copy.pfn());
                    drop(g);
                    if shared_page {
                        pm.put_page(page);
                    }
                    return r;
                }
                Pte::None => {
                    drop(g);
                    self.populate(&vma, addr, write)?;
                }
                Pte::DevicePrivate { pfn, .. } => {
                    let page = pm.page_or_err(pfn)?;
                    // Locked under the leaf lock, where the entry still names it; only then
                    // referenced, so a concurrent migration cannot free it.
                    if !page.trylock() {
                        drop(g);
                        if migrating_here {
                            return Err(Error::MigrationInProgress);
                        }
                        page.wait_unlocked();
                        continue;
                    }
                    page.get();
                    drop(g);
                    let r = self.fault_device_private(addr, write, page);
                    page.unlock();
                    pm.put_page(page);
                    r?;
                    let still =
                        matches!(self.pte(addr), Pte::DevicePrivate { pfn: p, .. } if p == pfn);
                    if still {
                        // A page pinned for a device kernel cannot move: report it.
                        if page.pincount() > 0 {
                            return Err(Error::Busy(pfn));
                        }
                        tries += 1;
                        if tries >= FAULT_TRIES {
                            return Err(Error::NoProgress { addr, tries });
                        }
                        if tries < FAULT_SPINS {
                            std::thread::yield_now();
                        } else {
                            let us = 1u64 << (tries - FAULT_SPINS).min(10);
                            std::thread::sleep(std::time::Duration::from_micros(us));
                        }
                    }
                }
                Pte::Migration { pfn, .. } => {
                    let page = pm.page_or_err(pfn)?;
                    drop(g);
                    if migrating_here {
                        return Err(Error::MigrationInProgress);
                    }
                    page.wait_unlocked();
                }
                Pte::Swap { .. } => {
                    return Err(Error::InvalidArgument("swap entries are not supported"))
                }
            }
        }
    }

    /// For a mirror of the CPU's own: the frame a present entry at `addr` maps and whether it
    /// is writable; with `will_write`, a writable entry is also marked young and dirty (the
    /// mirror lets writes through without telling). `None` for any other entry.
    pub(crate) fn mirror_entry(&self, addr: VirtAddr, will_write: bool) -> Option<(Pfn, bool)> {
        let leaf = self.leaf(addr, false)?;
        let i = leaf_index(addr);
        let g = leaf.lock();
        match g.get(i) {
            Pte::Present { pfn, write, .. } => {
                if will_write && write {
                    g.set(
                        i,
                        Pte::Present {
                            pfn,
                            write,
                            dirty: true,
                            young: true,
                        },
                    );
                }
                Some((pfn, write))
            }
            _ => None,
        }
    }

    /// Calls the owner's `migrate_to_ram` for `page`, which the caller has locked and
    /// referenced (and found under `addr`'s entry with the leaf locked).
    fn fault_device_private(&self, addr: VirtAddr, write: bool, page: &Page) -> Result<()> {
        match self.pagemap().ops(page.pfn()).cloned() {
            Some(ops) => ops.migrate_to_ram(FaultContext {
                space: self,
                addr,
                write,
                page,
            }),
            None => Err(Error::FaultFailed {
                addr,
                reason: "device page without a pagemap".into(),
            }),
        }
    }

    /// For a read pin: makes the entry at `addr` map a page of its own, exclusively, without
    /// asking for write access (the kernel's unsharing for `FOLL_PIN`): a hole gets a zeroed
    /// page, the zero page is replaced by one, and a page of a private mapping shared with a
    /// fork is copied (or, if nothing else maps it any more, taken back as exclusive), so a
    /// later copy-on-write cannot leave the pin holding a page the space no longer maps.
    /// Mirrors hear of a replaced page first. Entries of any other state are left to the
    /// access that follows.
    pub(crate) fn fault_own_page(&self, addr: VirtAddr) -> Result<()> {
        let map = self.map_read()?;
        let vma = find_vma(&map, addr).ok_or(Error::NotMapped(addr))?;
        if !vma.prot.read {
            return Err(Error::ReadDenied(addr));
        }
        let leaf = self.leaf(addr, true).expect("created");
        let i = leaf_index(addr);
        let pm = self.pagemap();
        let pte = leaf.get(i);
        let old = match pte {
            Pte::None => None,
            Pte::Present { pfn, .. } if pfn == pm.zero_pfn() => None,
            Pte::Present { pfn, .. } if !vma.shared => {
                let p = pm.page_or_err(pfn)?;
                if p.test(flags::ANON_EXCLUSIVE) {
                    return Ok(());
                }
                Some(p)
            }
            _ => return Ok(()),
        };
        if let Some(p) = old {
            let g = leaf.lock();
            if g.get(i) == pte && p.mapcount() == 1 && p.refcount() == 1 {
                p.set(flags::ANON_EXCLUSIVE);
                return Ok(());
            }
        }
        let page = self.alloc_page_for(&vma, addr, old.is_none())?;
        page.set(flags::ANON_EXCLUSIVE | flags::LRU);
        let _inv = (pte != Pte::None).then(|| {
            self.invalidate(NotifyRange {
                start: addr,
                end: addr + PAGE,
                event: NotifyEvent::Clear,
                owner: Owner::NONE,
            })
        });
        let _vt = crate::mm::locks::acquire(crate::mm::locks::Rank::Vma);
        let _v = vma.lock.lock();
        let g = leaf.lock();
        if g.get(i) != pte {
            // Changed meanwhile: the access that follows resolves whatever is there now.
            drop(g);
            pm.put_page(page);
            return Ok(());
        }
        let (dirty, young) = match pte {
            Pte::Present { dirty, young, .. } => (dirty, young),
            _ => (false, true),
        };
        if let Some(p) = old {
            if let Err(e) = super::space::copy_frame(pm, p.pfn(), page.pfn()) {
                drop(g);
                pm.put_page(page);
                return Err(e);
            }
            if dirty {
                page.set(flags::DIRTY);
            }
            p.remove_rmap(super::page::Mapping {
                space: self.id(),
                addr,
            });
        }
        let own = Pte::Present {
            pfn: page.pfn(),
            write: false,
            dirty,
            young,
        };
        self.install(&g, i, addr, own, page, false);
        drop(g);
        if let Some(p) = old {
            pm.put_page(p);
        }
        Ok(())
    }

    /// A new page for `addr` of `vma`: its home frame in a range mapped for CPU pointers, else
    /// any frame of the pool.
    fn alloc_page_for(&self, vma: &Vma, addr: VirtAddr, zeroed: bool) -> Result<&Page> {
        match vma.home_of(addr) {
            Some(home) => self.pagemap().claim_home(home, zeroed, false),
            None => self.pagemap().alloc_system(zeroed, false),
        }
    }

    /// Fills the hole at `addr`: the shared zero page for a read of a private mapping (not of
    /// one mapped for CPU pointers, whose pages live in their home frames), else a new zeroed
    /// page. Takes the VMA's lock, so no migration walk is collecting the range.
    fn populate(&self, vma: &Arc<Vma>, addr: VirtAddr, write: bool) -> Result<()> {
        let _vt = crate::mm::locks::acquire(crate::mm::locks::Rank::Vma);
        let _v = vma.lock.lock();
        let leaf = self.leaf(addr, true).expect("created");
        let i = leaf_index(addr);
        let pm = self.pagemap();
        if !write && !vma.shared && vma.home.is_none() {
            let g = leaf.lock();
            if g.get(i) == Pte::None {
                g.set(
                    i,
                    Pte::Present {
                        pfn: pm.zero_pfn(),
                        write: false,
                        dirty: false,
                        young: true,
                    },
                );
            }
            return Ok(());
        }
        let page = self.alloc_page_for(vma, addr, true)?;
        page.set(flags::ANON_EXCLUSIVE | flags::LRU);
        let g = leaf.lock();
        if g.get(i) != Pte::None {
            drop(g);
            pm.put_page(page);
            return Ok(());
        }
        let pte = Pte::Present {
            pfn: page.pfn(),
            write: vma.prot.write,
            dirty: write,
            young: true,
        };
        self.install(&g, i, addr, pte, page, false);
        Ok(())
    }
}
