//! `fork`: a copy-on-write copy of an address space.

use std::sync::atomic::Ordering;

use super::{copy_frame, leaf_end, leaf_index, AddressSpace, Vma, PAGE};
use crate::error::Result;
use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::{flags, Mapping, Page};
use crate::mm::pte::{MigrationKind, Pte};

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
                owner: 0,
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

    fn fork_one(&self, child: &AddressSpace, v: &Vma, addr: u64) -> Result<Forked<'_>> {
        let Some(leaf) = self.leaf(addr, false) else {
            return Ok(Forked::Done);
        };
        let i = leaf_index(addr);
        let g = leaf.lock();
        let pte = g.get(i);
        let cleaf = child.leaf(addr, true).expect("created");
        let cg = cleaf.lock();
        let pm = self.pagemap();
        match pte {
            Pte::None | Pte::Swap { .. } => {}
            Pte::Migration {
                pfn,
                kind,
                young,
                dirty,
            } => {
                // A page under migration is shared like a mapped one: the child gets the
                // entry too (read-only if private), recorded in the reverse map so that
                // finalize points it at the destination or restores it (unless finalize is
                // walking the reverse map right now: then wait for it). Migration entries
                // hold no reference: the migration holds its own.
                let page = pm.page_or_err(pfn)?;
                let mapping = Mapping {
                    space: child.id(),
                    addr,
                };
                if !page.move_rmap_unless_walked(None, mapping) {
                    return Ok(Forked::Walked(page));
                }
                let kind = if v.shared {
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
                g.set(i, entry);
                cg.set(i, entry);
            }
            Pte::Present {
                pfn,
                write,
                dirty,
                young,
            } => {
                let page = pm.page_or_err(pfn)?;
                if page.test(flags::ZERO) {
                    cg.set(i, pte);
                } else if !v.shared && page.pincount() > 0 {
                    // A pinned page cannot be shared: the child gets its own copy.
                    let copy = pm.alloc_system(false, false)?;
                    copy_frame(pm, pfn, copy.pfn())?;
                    copy.set(
                        flags::ANON_EXCLUSIVE | flags::LRU | if dirty { flags::DIRTY } else { 0 },
                    );
                    child.install(
                        &cg,
                        i,
                        addr,
                        Pte::Present {
                            pfn: copy.pfn(),
                            write,
                            dirty,
                            young,
                        },
                        copy,
                        false,
                    );
                } else {
                    let cow = !v.shared;
                    if cow {
                        page.clear(flags::ANON_EXCLUSIVE);
                        g.set(
                            i,
                            Pte::Present {
                                pfn,
                                write: false,
                                dirty,
                                young,
                            },
                        );
                    }
                    if dirty {
                        page.set(flags::DIRTY);
                    }
                    child.install(
                        &cg,
                        i,
                        addr,
                        Pte::Present {
                            pfn,
                            write: write && !cow,
                            dirty,
                            young,
                        },
                        page,
                        true,
                    );
                }
            }
            Pte::DevicePrivate { pfn, write } => {
                let page = pm.page_or_err(pfn)?;
                let cow = !v.shared;
                if cow {
                    page.clear(flags::ANON_EXCLUSIVE);
                    g.set(i, Pte::DevicePrivate { pfn, write: false });
                }
                child.install(
                    &cg,
                    i,
                    addr,
                    Pte::DevicePrivate {
                        pfn,
                        write: write && !cow,
                    },
                    page,
                    true,
                );
            }
        }
        Ok(Forked::Done)
    }
}
