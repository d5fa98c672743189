//! `fork`: a copy-on-write copy of an address space.

use std::sync::atomic::Ordering;

use super::{copy_frame, leaf_end, leaf_index, AddressSpace, Vma, PAGE};
use crate::error::Result;
use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::{flags, Mapping, Page};
use crate::mm::pte::{LeafGuard, MigrationKind, Pte};
use crate::mm::{Owner, VirtAddr};

/// How [`AddressSpace::fork`] left one entry.
enum Forked<'p> {
    /// Shared with the child (or nothing to share).
    Done,
    /// A migration entry whose page's reverse map is being walked: retry after the walk.
    Walked(&'p Page),
}

impl AddressSpace {
    /// A copy of this space: private anonymous pages are shared copy-on-write (both sides
    /// read-only, no longer anon-exclusive) except pinned ones, which the child gets a copy
    /// of; shared mappings stay shared; device-private entries are shared read-only.
    /// Migration entries of a device-side migration are shared too (the migration's finalize
    /// finds the child's entry through the reverse map). Ranges mapped for CPU pointers are
    /// not inherited: the child has nothing there.
    pub fn fork(&self) -> Result<AddressSpace> {
        let map = self.map_write()?;
        let child = AddressSpace::new(self.pagemap());
        child.inner.next_addr.store(
            self.inner.next_addr.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let mut cmap = child.inner.map.write();
        // A range the process reaches through a CPU pointer stays with the parent (as
        // `MADV_DONTFORK` memory does): its frames are fixed, so they cannot be shared.
        for (&k, v) in map.iter().filter(|(_, v)| v.home.is_none()) {
            cmap.insert(k, Vma::new(v.start, v.end, v.prot, v.shared));
            let _inv = self.invalidate(NotifyRange {
                start: v.start,
                end: v.end,
                event: NotifyEvent::Protect,
                owner: Owner::NONE,
            });
            let mut addr = v.start;
            while addr < v.end {
                let stop = leaf_end(addr).min(v.end);
                if self.leaf(addr, false).is_none() {
                    addr = stop;
                    continue;
                }
                while addr < stop {
                    match self.fork_one(&child, v, addr)? {
                        Forked::Done => addr += PAGE,
                        Forked::Walked(page) => {
                            // A migration is walking the page's mappings: wait, then retry.
                            while page.walking() {
                                std::thread::yield_now();
                            }
                        }
                    }
                }
            }
        }
        drop(cmap);
        Ok(child)
    }

    /// Forks the entry at `addr` (in VMA `v`) into `child`. Takes the parent's leaf lock,
    /// then the child's, and hands the entry to the step for its kind; both leaves stay
    /// locked until the step returns.
    fn fork_one(&self, child: &AddressSpace, v: &Vma, addr: VirtAddr) -> Result<Forked<'_>> {
        let Some(leaf) = self.leaf(addr, false) else {
            return Ok(Forked::Done);
        };
        let g = leaf.lock();
        let cleaf = child.leaf(addr, true).expect("created");
        let cg = cleaf.lock();
        let slot = Slot {
            child,
            v,
            addr,
            i: leaf_index(addr),
            g: &g,
            cg: &cg,
        };
        match g.get(slot.i) {
            Pte::None | Pte::Swap { .. } => Ok(Forked::Done),
            pte @ Pte::Migration { .. } => self.fork_migration_entry(&slot, pte),
            pte @ Pte::Present { .. } => self.fork_present(&slot, pte).map(|()| Forked::Done),
            pte @ Pte::DevicePrivate { .. } => {
                self.fork_device_private(&slot, pte).map(|()| Forked::Done)
            }
        }
    }

    /// A page under migration is shared like a mapped one: the child gets the entry too
    /// (read-only if private), recorded in the reverse map so that finalize points it at
    /// the destination or restores it, unless finalize is walking the reverse map right
    /// now (then [`Forked::Walked`]: nothing changed, wait for it). Migration entries hold
    /// no reference: the migration holds its own.
    fn fork_migration_entry(&self, at: &Slot<'_>, pte: Pte) -> Result<Forked<'_>> {
        let Pte::Migration {
            pfn,
            kind,
            young,
            dirty,
        } = pte
        else {
            unreachable!("fork_one passes migration entries only");
        };
        let page = self.pagemap().page_or_err(pfn)?;
        let mapping = Mapping {
            space: at.child.id(),
            addr: at.addr,
        };
        if !page.move_rmap_unless_walked(None, mapping) {
            return Ok(Forked::Walked(page));
        }
        let kind = if at.v.shared {
            kind
        } else {
            page.clear(flags::ANON_EXCLUSIVE);
            MigrationKind::Read
        };
        let entry = Pte::Migration {
            pfn,
            kind,
            young,
            dirty,
        };
        at.g.set(at.i, entry);
        at.cg.set(at.i, entry);
        Ok(Forked::Done)
    }

    /// A present page: the zero page is shared as it is; a pinned private page is copied
    /// (a pinned page cannot be shared); any other page is shared, copy-on-write (both
    /// entries read-only, no longer anon-exclusive) in a private mapping.
    fn fork_present(&self, at: &Slot<'_>, pte: Pte) -> Result<()> {
        let Pte::Present {
            pfn,
            write,
            dirty,
            young,
        } = pte
        else {
            unreachable!("fork_one passes present entries only");
        };
        let pm = self.pagemap();
        let page = pm.page_or_err(pfn)?;
        if page.test(flags::ZERO) {
            at.cg.set(at.i, pte);
            return Ok(());
        }
        if !at.v.shared && page.pincount() > 0 {
            let copy = pm.alloc_system(false, false)?;
            copy_frame(pm, pfn, copy.pfn())?;
            copy.set(flags::ANON_EXCLUSIVE | flags::LRU | if dirty { flags::DIRTY } else { 0 });
            let entry = Pte::Present {
                pfn: copy.pfn(),
                write,
                dirty,
                young,
            };
            at.child.install(at.cg, at.i, at.addr, entry, copy, false);
            return Ok(());
        }
        let cow = !at.v.shared;
        if cow {
            page.clear(flags::ANON_EXCLUSIVE);
            let read_only = Pte::Present {
                pfn,
                write: false,
                dirty,
                young,
            };
            at.g.set(at.i, read_only);
        }
        if dirty {
            page.set(flags::DIRTY);
        }
        let entry = Pte::Present {
            pfn,
            write: write && !cow,
            dirty,
            young,
        };
        at.child.install(at.cg, at.i, at.addr, entry, page, true);
        Ok(())
    }

    /// A device-private entry is shared, copy-on-write in a private mapping: a CPU write on
    /// either side faults the page back and copies it.
    fn fork_device_private(&self, at: &Slot<'_>, pte: Pte) -> Result<()> {
        let Pte::DevicePrivate { pfn, write } = pte else {
            unreachable!("fork_one passes device-private entries only");
        };
        let page = self.pagemap().page_or_err(pfn)?;
        let cow = !at.v.shared;
        if cow {
            page.clear(flags::ANON_EXCLUSIVE);
            at.g.set(at.i, Pte::DevicePrivate { pfn, write: false });
        }
        let entry = Pte::DevicePrivate {
            pfn,
            write: write && !cow,
        };
        at.child.install(at.cg, at.i, at.addr, entry, page, true);
        Ok(())
    }
}

/// The entry [`AddressSpace::fork_one`] is forking: where it is, and the parent's and the
/// child's leaves, both locked (parent first).
struct Slot<'a> {
    child: &'a AddressSpace,
    v: &'a Vma,
    addr: VirtAddr,
    i: usize,
    g: &'a LeafGuard<'a>,
    cg: &'a LeafGuard<'a>,
}
