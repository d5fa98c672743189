//! The finalize stage that `migrate_vma_finalize` and `migrate_device_finalize` share: every
//! migration entry of a migrated page now maps its destination, every other page is
//! restored, all pages are unlocked and the migration's references dropped.

use hetmem_engine::Pfn;

use super::pfn::*;
use super::unmap::{entry_for, restore_entries, walk_mappings};
use crate::mm::page::{flags, Mapping, MemoryKind, Page};
use crate::mm::pte::{LeafGuard, Pte, PTRS_PER_LEAF};
use crate::mm::released::Released;
use crate::mm::space::{leaf_index, AddressSpace, PAGE};
use crate::mm::{PageMap, VirtAddr};

/// The page each word of `words` names (`None` for a word without `VALID` or naming no
/// registered frame), for a finalize whose caller has not looked its pages up already.
pub(crate) fn resolve<'p>(pm: &'p PageMap, words: &[u64]) -> Vec<Option<&'p Page>> {
    let mut pages = pm.cursor();
    words
        .iter()
        .map(|&w| pages.page(migrate_pfn_to_pfn(w)?))
        .collect()
}

/// The finalize stage shared with `migrate_device_finalize`, over the pages of the entries:
/// `old[i]` is the page setup collected for entry `i` (`None` for a hole or an entry not
/// collected) and `new[i]` its destination (`None` if it has none); entry `i` migrated if
/// `src[i]` still has `MIGRATE` and it has a destination. The caller looked the pages up
/// once (setup and the pages stage keep them), so finalize does not look up any frame.
///
/// `own` is the address space and start address of a `migrate_vma` range (entry `i` maps
/// `start + i` pages there): pages mapped only there are finished, unlocked and released
/// under one leaf lock per leaf, without reverse-map lookups; references are dropped in one
/// batch at the end.
pub(crate) fn finalize(
    pm: &PageMap,
    src: &[u64],
    old: &[Option<&Page>],
    new: &[Option<&Page>],
    fault_page: Option<Pfn>,
    own: Option<(&AddressSpace, VirtAddr)>,
) {
    debug_assert_eq!((old.len(), new.len()), (src.len(), src.len()));
    let mut done = Done {
        fault_page,
        put: Vec::new(),
        released: Released::with_capacity(src.len().min(FREE_BATCH + PTRS_PER_LEAF)),
    };
    let mut slow: Vec<usize> = Vec::new();
    let mut i = 0;
    while i < src.len() {
        let end = match own {
            Some((_, start)) => src
                .len()
                .min(i + PTRS_PER_LEAF - leaf_index(start + i as u64 * PAGE)),
            None => src.len().min(i + PTRS_PER_LEAF),
        };
        let leaf = own.and_then(|(space, start)| {
            Some((space, start, space.leaf(start + i as u64 * PAGE, false)?))
        });
        if let Some((space, start, leaf)) = leaf {
            let g = leaf.lock();
            for k in i..end {
                let (o, n) = (old[k], new[k]);
                let addr = start + k as u64 * PAGE;
                match finish_in_leaf(&g, space, addr, o, n, migrated(src[k], n)) {
                    Finished::Slow => slow.push(k),
                    Finished::Done => done.release(o, n),
                    Finished::Handed(me) => done.release_replaced(o, me),
                }
            }
        } else {
            slow.extend(i..end);
        }
        for &k in &slow {
            let here = own.map(|(space, start)| (space, start + k as u64 * PAGE));
            finish_slow(pm, old[k], new[k], migrated(src[k], new[k]), here);
            done.release(old[k], new[k]);
        }
        slow.clear();
        // Pages are given back a batch at a time as they come: a large migration's list
        // stays small (in cache, and never a fresh allocation the kernel must fault in).
        if done.released.len() >= FREE_BATCH {
            pm.free_gathered(&mut done.released);
        }
        i = end;
    }
    pm.free_gathered(&mut done.released);
    pm.put_pages(&done.put);
}

/// Released pages finalize gathers before giving them back.
const FREE_BATCH: usize = 1024;

/// What finalize does with the migration's hold on each finished entry's pages.
struct Done<'p> {
    fault_page: Option<Pfn>,
    /// References to drop at the end.
    put: Vec<&'p Page>,
    /// Pages whose last reference and lock went together: free, to give back.
    released: Released<'p>,
}

impl<'p> Done<'p> {
    /// Unlocks and lets go of an entry's old page (the fault page stays locked: its caller
    /// holds it) and its new one, whose entry did not take it (a hole's new page was mapped
    /// by `pages` if it migrated; else it is unused).
    fn release(&mut self, old: Option<&'p Page>, new: Option<&'p Page>) {
        if let Some(old) = old {
            if self.fault_page == Some(old.pfn()) {
                self.put.push(old);
            } else if old.release_if_last() {
                self.released.push(old);
            } else {
                old.unlock();
                self.put.push(old);
            }
        }
        if let Some(new) = new {
            new.unlock();
            self.put.push(new);
        }
    }

    /// Lets go of the old page of an entry that now maps its new page (`Handed`): the old
    /// page forgets mapping `me`, which was its only one.
    fn release_replaced(&mut self, old: Option<&'p Page>, me: Mapping) {
        let old = old.expect("a handed entry had a page");
        if self.fault_page != Some(old.pfn()) && old.release_replaced() {
            self.released.push(old);
            return;
        }
        let forgot = old.take_sole_rmap(me);
        debug_assert!(
            forgot,
            "page {} gained a mapping while migrating",
            old.pfn()
        );
        if self.fault_page != Some(old.pfn()) {
            old.unlock();
        }
        self.put.push(old);
    }
}

/// How [`finish_in_leaf`] left an entry.
enum Finished {
    /// Not finished: it needs the reverse-map walk.
    Slow,
    /// Finished; the migration still holds its reference on the new page (if any).
    Done,
    /// Finished by mapping the new page, which took the migration's reference with it and
    /// is unlocked; the old page's one mapping (this one) is still in its reverse map.
    Handed(Mapping),
}

/// Whether an entry with source word `s` and destination `new` migrated.
fn migrated(s: u64, new: Option<&Page>) -> bool {
    s & MIGRATE_PFN_MIGRATE != 0 && new.is_some()
}

/// Finishes one entry under its (locked) leaf if its old page is mapped only at `addr`;
/// `Slow` if it needs the reverse-map walk instead. Holes need nothing here.
fn finish_in_leaf(
    g: &LeafGuard<'_>,
    space: &AddressSpace,
    addr: VirtAddr,
    old: Option<&Page>,
    new: Option<&Page>,
    migrated: bool,
) -> Finished {
    let Some(old) = old else {
        return Finished::Done;
    };
    let li = leaf_index(addr);
    let me = Mapping {
        space: space.id(),
        addr,
    };
    let Pte::Migration {
        pfn,
        kind,
        young,
        dirty,
    } = g.get(li)
    else {
        return Finished::Slow;
    };
    if pfn != old.pfn() {
        return Finished::Slow;
    }
    if migrated {
        let new = new.expect("valid destination");
        // Under this leaf lock, with this entry naming `old`, a map count of one says the
        // entry is the page's only mapping: no path lets the count fall below the entries
        // that map a page (they add a mapping before its entry and drop it after).
        if old.mapcount() != 1 {
            return Finished::Slow;
        }
        // The migration's reference on the new page becomes the mapping's.
        space.install(g, li, addr, entry_for(new, kind, young, dirty), new, false);
        new.unlock_with(new_flags(new, kind, dirty));
        return Finished::Handed(me);
    }
    if old.sole_mapping() != Some(me) {
        return Finished::Slow;
    }
    let pte = entry_for(old, kind, young, dirty);
    old.get();
    g.set(li, pte);
    if old.kind() == MemoryKind::System {
        old.set(flags::LRU);
    }
    Finished::Done
}

/// Finishes one entry through the reverse map (pages mapped in several places).
fn finish_slow(
    pm: &PageMap,
    old: Option<&Page>,
    new: Option<&Page>,
    migrated: bool,
    here: Option<(&AddressSpace, VirtAddr)>,
) {
    let Some(old) = old else {
        return;
    };
    if migrated {
        remap_to(pm, old, new.expect("valid destination"), here);
    } else {
        restore_entries(pm, old, here);
        if old.kind() == MemoryKind::System {
            old.set(flags::LRU);
        }
    }
}

/// The destination inherits dirtiness, exclusivity and (for system memory) the LRU.
fn mark_new(new: &Page, kind: crate::mm::MigrationKind, dirty: bool) {
    new.set(new_flags(new, kind, dirty));
}

/// The flags [`mark_new`] sets.
fn new_flags(new: &Page, kind: crate::mm::MigrationKind, dirty: bool) -> u32 {
    let mut f = 0;
    if dirty {
        f |= flags::DIRTY;
    }
    if kind != crate::mm::MigrationKind::Read {
        f |= flags::ANON_EXCLUSIVE;
    }
    if new.kind() == MemoryKind::System {
        f |= flags::LRU;
    }
    f
}

/// Points every migration entry of `old` at `new`, with the entry's access, young and dirty
/// bits (a device-private destination gives device-private entries). A destination mapped
/// read-only-shared (a source shared by fork, maybe after the pages stage moved the source's
/// exclusivity over) is not anon-exclusive.
fn remap_to(pm: &PageMap, old: &Page, new: &Page, own: Option<(&AddressSpace, VirtAddr)>) {
    let mut shared = false;
    // Each mapping of the locked `old` is a migration entry, and becomes `new`'s.
    walk_mappings(pm, old, own, |tables, addr, g, li| {
        let Pte::Migration {
            pfn,
            kind,
            young,
            dirty,
        } = g.get(li)
        else {
            return;
        };
        if pfn != old.pfn() {
            return;
        }
        mark_new(new, kind, dirty);
        shared |= kind == crate::mm::MigrationKind::Read;
        old.remove_rmap(Mapping {
            space: tables.id,
            addr,
        });
        tables.install(g, li, addr, entry_for(new, kind, young, dirty), new, true);
    });
    if shared || new.mapcount() > 1 {
        new.clear(flags::ANON_EXCLUSIVE);
    }
}
