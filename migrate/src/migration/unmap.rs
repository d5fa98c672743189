//! Replacing a page's entries with migration entries, and restoring them: the pieces that
//! `migrate_vma_*` and `migrate_device_*` share.

use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::{flags, Mapping, MemoryKind, Page};
use crate::mm::pte::LeafGuard;
use crate::mm::pte::{MigrationKind, Pte};
use crate::mm::space::{leaf_index, AddressSpace, PageTables, PAGE};
use crate::mm::{PageMap, VirtAddr};

/// The migration entry that stands in for `pte` (which maps `page`): `Write` if writable,
/// `ReadExclusive` if the page is anon-exclusive, else `Read`; young and dirty ride along,
/// and a dirty entry marks the page dirty now, so the bit survives a failed migration.
pub(crate) fn migration_entry(pte: Pte, page: &Page) -> Pte {
    let (write, dirty, young) = match pte {
        Pte::Present {
            write,
            dirty,
            young,
            ..
        } => (write, dirty, young),
        Pte::DevicePrivate { write, .. } => (write, false, false),
        other => unreachable!("no migration entry for {other:?}"),
    };
    if dirty {
        page.set(flags::DIRTY);
    }
    let kind = if write {
        MigrationKind::Write
    } else if page.test(flags::ANON_EXCLUSIVE) {
        MigrationKind::ReadExclusive
    } else {
        MigrationKind::Read
    };
    Pte::Migration {
        pfn: page.pfn(),
        kind,
        young,
        dirty,
    }
}

/// The entry that maps `page` in place of a migration entry of `kind` (a device-private page
/// gives a device-private entry; young and dirty come back from the migration entry).
pub(crate) fn entry_for(page: &Page, kind: MigrationKind, young: bool, dirty: bool) -> Pte {
    let write = kind == MigrationKind::Write;
    match page.kind() {
        MemoryKind::DevicePrivate => Pte::DevicePrivate {
            pfn: page.pfn(),
            write,
        },
        _ => Pte::Present {
            pfn: page.pfn(),
            write,
            dirty,
            young,
        },
    }
}

/// Runs `f` on each address space and address where `page` is mapped. `own` (a space and
/// address the caller knows maps it) spares the reverse-map lookups when it is the only one.
/// Mappings in address spaces being dropped are passed over (their teardown clears them).
pub(crate) fn for_each_mapping(
    pm: &PageMap,
    page: &Page,
    own: Option<(&AddressSpace, VirtAddr)>,
    mut f: impl FnMut(&AddressSpace, VirtAddr),
) {
    if let Some((space, addr)) = own {
        if page.sole_mapping()
            == Some(Mapping {
                space: space.id(),
                addr,
            })
        {
            f(space, addr);
            return;
        }
    }
    for Mapping { space, addr } in page.mappings() {
        if let Some(inner) = pm.spaces().get(space) {
            f(&AddressSpace::from_inner(inner), addr);
        }
    }
}

/// Runs `f` on every mapping of the locked page `page`, with the mapping's leaf locked. The
/// walk holds the page's [`RMAP_WALK`](crate::mm::page::RMAP_WALK) bit, so no migration
/// entry of the page moves (mremap) or is copied (fork) meanwhile, and it reaches the page
/// tables of address spaces being torn down too: one pass sees every migration entry of the
/// page. `own` (a space and address the caller knows maps the page) spares the reverse-map
/// lookups when it is the only mapping.
pub(crate) fn walk_mappings(
    pm: &PageMap,
    page: &Page,
    own: Option<(&AddressSpace, VirtAddr)>,
    mut f: impl FnMut(&PageTables, VirtAddr, &LeafGuard<'_>, usize),
) {
    if let Some((space, addr)) = own {
        let me = Mapping {
            space: space.id(),
            addr,
        };
        // The caller's migration holds `space`'s map lock: this mapping cannot move, and a
        // sole mapping cannot gain a sibling (fork waits for the map lock too).
        if page.sole_mapping() == Some(me) {
            if let Some(leaf) = space.leaf(addr, false) {
                let g = leaf.lock();
                f(&space.inner.tables, addr, &g, leaf_index(addr));
            }
            return;
        }
    }
    for m in page.begin_walk() {
        let Some(tables) = pm.spaces().tables(m.space) else {
            continue;
        };
        if let Some(leaf) = tables.leaf(m.addr, false) {
            let g = leaf.lock();
            f(&tables, m.addr, &g, leaf_index(m.addr));
        }
    }
    page.end_walk();
}

/// Whether a collected page can move.
pub(crate) enum Unmapped {
    /// Isolated, unmapped everywhere, referenced only by the migration.
    Ready,
    /// Something else holds it (a pin, another isolation): it must be restored.
    Busy,
}

/// Finishes unmapping a locked, referenced page: isolates it from the LRU (unless the caller
/// did: `isolated`) and drops its swap-cache copy, replaces its remaining entries in every
/// address space, then checks that only the migration (`expected` references) holds it.
/// `own` is the mapping the caller already replaced, if any: a page mapped only there needs
/// no reverse-map walk.
pub(crate) fn unmap_page(
    pm: &PageMap,
    page: &Page,
    expected: u32,
    own: Option<Mapping>,
    isolated: bool,
) -> Unmapped {
    if !isolated {
        if page.kind() == MemoryKind::System && !page.test_and_clear(flags::LRU) {
            return Unmapped::Busy;
        }
        if page.test(flags::SWAPCACHE) {
            page.clear(flags::SWAPCACHE);
        }
    }
    if own.is_none() || page.sole_mapping() != own {
        for_each_mapping(pm, page, None, |space, addr| {
            let Some(leaf) = space.leaf(addr, false) else {
                return;
            };
            let li = leaf_index(addr);
            let live = |pte: Pte| {
                matches!(pte, Pte::Present { .. } | Pte::DevicePrivate { .. })
                    && pte.pfn() == Some(page.pfn())
            };
            if !live(leaf.get(li)) {
                return;
            }
            // Mirrors first, with no leaf lock held (a notifier may sleep).
            let _inv = space.invalidate(NotifyRange {
                start: addr,
                end: addr + PAGE,
                event: NotifyEvent::Migrate,
                owner: page.owner(),
            });
            let g = leaf.lock();
            let pte = g.get(li);
            if live(pte) {
                g.set(li, migration_entry(pte, page));
                drop(g);
                pm.put_page(page);
            }
        });
    }
    if page.refcount() == expected {
        Unmapped::Ready
    } else {
        Unmapped::Busy
    }
}

/// Turns `page`'s migration entries back into the entries they replaced, each taking its
/// reference again (wherever they are now: see [`walk_mappings`]).
pub(crate) fn restore_entries(pm: &PageMap, page: &Page, own: Option<(&AddressSpace, VirtAddr)>) {
    walk_mappings(pm, page, own, |_, _, g, li| {
        if let Pte::Migration {
            pfn,
            kind,
            young,
            dirty,
        } = g.get(li)
        {
            if pfn == page.pfn() {
                let pte = entry_for(page, kind, young, dirty);
                page.get();
                g.set(li, pte);
            }
        }
    });
}

/// Puts a page back where it was: its entries restored, back on the LRU, unlocked (if
/// `unlock`), and the migration's reference dropped.
pub(crate) fn restore_page(
    pm: &PageMap,
    page: &Page,
    unlock: bool,
    own: Option<(&AddressSpace, VirtAddr)>,
) {
    restore_entries(pm, page, own);
    if page.kind() == MemoryKind::System {
        page.set(flags::LRU);
    }
    if unlock {
        page.unlock();
    }
    pm.put_page(page);
}
