//! `mremap`: moving a mapping and its entries, whatever their state.

use std::sync::Arc;

use super::{
    check_aligned, covered, leaf_end, leaf_index, overlaps, range_of, split_range, AddressSpace,
    Vma, MMAP_TOP, PAGE,
};
use crate::error::{Error, Result};
use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::Mapping;
use crate::mm::pte::Pte;
use crate::mm::{Owner, VirtAddr};

/// Options of [`AddressSpace::mremap_with`] (the kernel's `MREMAP_FIXED` replacing a
/// mapping, and `MREMAP_DONTUNMAP`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MremapFlags {
    /// Unmap whatever is mapped at the destination instead of failing.
    pub fixed_replace: bool,
    /// Keep the old range mapped, empty (private mappings only).
    pub dont_unmap: bool,
}

impl AddressSpace {
    /// Moves the mapping `[old, old + len)` to `new` (which must be unmapped), with its
    /// entries in whatever state they are. Same as [`AddressSpace::mremap_with`] with no
    /// flags.
    pub fn mremap(&self, old: VirtAddr, len: u64, new: VirtAddr) -> Result<()> {
        self.mremap_with(old, len, new, MremapFlags::default())
    }

    /// Moves the mapping `[old, old + len)` to `new`, with its entries in whatever state
    /// they are (device-private and migration entries included: each entry and its page's
    /// reverse mapping move together, under both leaves' locks, so a migration finishing
    /// meanwhile finds the entry at one address or the other, never at neither). The ranges
    /// must not overlap. `flags.fixed_replace` unmaps whatever is mapped at `new` first (else
    /// that is [`Error::AlreadyMapped`]); `flags.dont_unmap` leaves the old range mapped and
    /// empty (private mappings only: its pages read as zeros again).
    pub fn mremap_with(
        &self,
        old: VirtAddr,
        len: u64,
        new: VirtAddr,
        flags: MremapFlags,
    ) -> Result<()> {
        let (start, end) = range_of(old, len)?;
        check_aligned(new.get())?;
        let new_end =
            new.checked_add(len)
                .filter(|&e| e <= MMAP_TOP)
                .ok_or(Error::InvalidArgument(
                    "range past the top of the address space",
                ))?;
        let mut map = self.map_write()?;
        covered(&map, start, end)?;
        if new < end && start < new_end {
            // The source is mapped, so without a replacement that is the usual refusal.
            if !flags.fixed_replace {
                return Err(Error::AlreadyMapped(new));
            }
            return Err(Error::InvalidArgument("mremap ranges overlap"));
        }
        if super::any_homed(&map, start, end)
            || (flags.fixed_replace && super::any_homed(&map, new, new_end))
        {
            // Its frames are fixed by the process's own mapping of the range.
            return Err(Error::InvalidArgument(
                "mremap of a range mapped for CPU pointers",
            ));
        }
        if flags.dont_unmap
            && map
                .range(..end)
                .rev()
                .take_while(|(_, v)| v.end > start)
                .any(|(_, v)| v.shared)
        {
            return Err(Error::InvalidArgument(
                "mremap dont_unmap of a shared mapping",
            ));
        }
        if overlaps(&map, new, new_end) {
            if !flags.fixed_replace {
                return Err(Error::AlreadyMapped(new));
            }
            self.unmap_locked(&mut map, new, new_end);
        }
        let keys = split_range(&mut map, start, end);
        let _inv = self.invalidate(NotifyRange {
            start,
            end,
            event: NotifyEvent::Remap,
            owner: Owner::NONE,
        });
        for k in keys {
            let v = if flags.dont_unmap {
                map.get(&k).expect("listed above").clone()
            } else {
                map.remove(&k).expect("listed above")
            };
            let to = new + (v.start - start);
            map.insert(to, Vma::new(to, to + (v.end - v.start), v.prot, v.shared));
        }
        self.move_entries(start, end, new);
        Ok(())
    }

    /// Moves every entry of `[start, end)` to the same offset from `new`. Each move holds
    /// both leaves' locks, and the page's reverse map changes inside that hold.
    fn move_entries(&self, start: VirtAddr, end: VirtAddr, new: VirtAddr) {
        let mut addr = start;
        while addr < end {
            let stop = leaf_end(addr).min(end);
            let Some(src) = self.leaf(addr, false) else {
                addr = stop;
                continue;
            };
            while addr < stop {
                let i = leaf_index(addr);
                if src.get(i) == Pte::None {
                    addr += PAGE;
                    continue;
                }
                let to = new + (addr - start);
                let dst = self.leaf(to, true).expect("created");
                // Two leaf locks at once: only mremap and fork do that, each under its
                // space's exclusive map lock, and every other path takes one leaf at a time.
                let gs = src.lock();
                let gd = (!Arc::ptr_eq(&src, &dst)).then(|| dst.lock());
                let pte = gs.get(i);
                if let Some(p) = self.mapped_page(pte) {
                    let (from, to) = (
                        Mapping {
                            space: self.id(),
                            addr,
                        },
                        Mapping {
                            space: self.id(),
                            addr: to,
                        },
                    );
                    if !matches!(pte, Pte::Migration { .. }) {
                        p.add_rmap(to);
                        p.remove_rmap(from);
                    } else if !p.move_rmap_unless_walked(Some(from), to) {
                        // The migration is putting its entries back or in place: let it.
                        drop(gd);
                        drop(gs);
                        while p.walking() {
                            std::thread::yield_now();
                        }
                        continue;
                    }
                }
                gs.set(i, Pte::None);
                gd.as_ref().unwrap_or(&gs).set(leaf_index(to), pte);
                drop(gd);
                drop(gs);
                addr += PAGE;
            }
        }
    }
}
