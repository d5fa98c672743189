//! Drivers that misuse `src`/`dst` between stages. The rule under attack: the stages act
//! on the pages setup locked and the destinations the pages stage took, whatever a driver
//! does to the words' frame numbers meanwhile; a bad destination set is refused with
//! nothing changed, and each destination is released exactly once.

use hetmem::migration::*;
use hetmem::mm::{pin_pages, AddressSpace, MemoryKind, PageMap, PAGE};
use hetmem::{Error, Owner, VirtAddr};
use hetmem_engine::Pfn;
use hetmem_tests::harness::{
    dev_pfn, gpu, map, pattern, read, setup_system_migration, unsettled, Gpu, SMALL_POOL,
};

fn setup() -> Gpu {
    gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL)
}

/// A fresh locked system page handed over as a driver does (`into_pfn`), holding `data`.
fn fresh(pm: &PageMap, data: &[u8]) -> Pfn {
    let p = pm.alloc_page(true, true).unwrap().into_pfn();
    pm.write_frame(p, 0, data).unwrap();
    p
}

/// The frames mapped at `n` pages from `a`.
fn frames(space: &AddressSpace, a: VirtAddr, n: usize) -> Vec<Pfn> {
    (0..n)
        .map(|k| dev_pfn(space, a + k as u64 * PAGE))
        .collect()
}

fn page_at(data: &[u8], k: usize) -> &[u8] {
    &data[k * 4096..(k + 1) * 4096]
}

/// A destination released by finalize: no reference, no flag, its frame back in the pool.
fn assert_freed(g: &Gpu, p: Pfn, what: &str) {
    let page = g.pm.page(p).unwrap();
    assert_eq!((page.refcount(), page.flags()), (0, 0), "{what} {p}");
    assert!(!g.pool.is_allocated(p), "{what} {p}: frame still allocated");
}

/// A page named twice in `dst` (adjacent or not, ascending or not) fails the pages stage
/// with `PageInUse` naming it; every destination keeps its flags (nothing marked taken,
/// nothing given the source's flags); finalize restores every source and releases each
/// destination exactly once.
#[test]
fn a_destination_named_twice_is_refused_and_released_once() {
    let g = setup();
    let a = map(&g.space, 4);
    let data = pattern(4, 7);
    g.space.write(a, &data).unwrap();
    let olds = frames(&g.space, a, 4);
    for order in [[0usize, 1, 0, 2], [2, 0, 1, 0]] {
        let base = g.pool.in_use();
        let n: Vec<Pfn> = (0..3).map(|k| fresh(&g.pm, page_at(&data, k))).collect();
        let flags: Vec<u32> = n.iter().map(|&p| g.pm.page(p).unwrap().flags()).collect();
        let (mut src, mut dst) = ([0u64; 4], [0u64; 4]);
        let mut m = setup_system_migration(&g.space, a, 4, Owner::NONE, &mut src, &mut dst);
        assert_eq!(m.cpages, 4);
        for (i, &k) in order.iter().enumerate() {
            m.dst[i] = migrate_pfn(n[k]);
        }
        let r = migrate_vma_pages(&mut m);
        assert!(matches!(r, Err(Error::PageInUse(p)) if p == n[0]), "{r:?}");
        for (k, &p) in n.iter().enumerate() {
            let page = g.pm.page(p).unwrap();
            assert_eq!(
                page.flags(),
                flags[k],
                "destination {k} changed by a refusal"
            );
            assert_eq!(page.refcount(), 1);
        }
        migrate_vma_finalize(&mut m);
        drop(m);
        assert_eq!(frames(&g.space, a, 4), olds, "every source restored");
        assert_eq!(read(&g.space, a, 4 * 4096), data);
        assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
        for &p in &n {
            assert_freed(&g, p, "destination");
        }
        assert_eq!(g.pool.in_use(), base, "each destination released once");
    }
}

/// Between setup and the pages stage the driver clears `VALID` on a collected entry,
/// points another at a third entry's page, clears `MIGRATE` on a fourth, sets `MIGRATE`
/// on an entry setup left alone (a pinned page), and names a page in a hole's word. The
/// stages follow the pages setup collected: 0, 1 and 2 move to their own destinations, 3
/// and the pinned page stay, the hole gets its new page; each destination that did not
/// map is released once; nothing is left locked.
#[test]
fn rewritten_source_words_do_not_redirect_any_stage() {
    let g = setup();
    let a = map(&g.space, 6);
    let data = pattern(5, 21);
    g.space.write(a, &data).unwrap();
    let olds = frames(&g.space, a, 5);
    let pin = pin_pages(&g.space, a + 4 * PAGE, 1, false, false).unwrap();
    let pinned = g.pm.page(olds[4]).unwrap();
    let pinned_counts = (pinned.refcount(), pinned.pincount(), pinned.mapcount());
    let base = g.pool.in_use();
    let hole_bytes = pattern(1, 99);
    let (mut src, mut dst) = ([0u64; 6], [0u64; 6]);
    let mut m = setup_system_migration(&g.space, a, 6, Owner::NONE, &mut src, &mut dst);
    assert_eq!(
        m.cpages, 5,
        "four pages and the hole; the pinned page stays"
    );
    assert_eq!(m.src[4], 0);
    assert_eq!(m.src[5], MIGRATE_PFN_MIGRATE, "a hole");
    let n: Vec<Pfn> = (0..5)
        .map(|k| fresh(&g.pm, page_at(&data, k)))
        .chain([fresh(&g.pm, &hole_bytes)])
        .collect();
    for (i, &p) in n.iter().enumerate() {
        m.dst[i] = migrate_pfn(p);
    }
    m.src[0] &= !MIGRATE_PFN_VALID;
    m.src[1] = migrate_pfn(olds[2]) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE;
    m.src[3] &= !MIGRATE_PFN_MIGRATE;
    m.src[4] = migrate_pfn(olds[4]) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE;
    m.src[5] = migrate_pfn(olds[0]) | MIGRATE_PFN_MIGRATE;
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    drop(m);
    let now = frames(&g.space, a, 6);
    assert_eq!(
        now,
        vec![n[0], n[1], n[2], olds[3], olds[4], n[5]],
        "where each entry ended"
    );
    assert_eq!(read(&g.space, a, 5 * 4096), data);
    assert_eq!(read(&g.space, a + 5 * PAGE, 4096), hole_bytes);
    assert!(unsettled(&g.space, &g.pm, a, 6).is_empty());
    for k in [0, 1, 2] {
        assert_freed(&g, olds[k], "old page");
    }
    for k in [3, 4] {
        assert_freed(&g, n[k], "unused destination");
    }
    let p3 = g.pm.page(olds[3]).unwrap();
    assert_eq!(
        (p3.refcount(), p3.mapcount(), p3.is_locked()),
        (1, 1, false)
    );
    let pinned = g.pm.page(olds[4]).unwrap();
    assert_eq!(
        (pinned.refcount(), pinned.pincount(), pinned.mapcount()),
        pinned_counts
    );
    assert!(!pinned.is_locked());
    for k in [0, 1, 2, 5] {
        let p = g.pm.page(n[k]).unwrap();
        assert_eq!((p.refcount(), p.mapcount(), p.is_locked()), (1, 1, false));
    }
    drop(pin);
    assert_eq!(
        g.pool.in_use(),
        base + 1,
        "the hole's page is the only new one"
    );
}

/// After the pages stage the driver zeroes one destination word and points another at a
/// different page: finalize maps and releases the destinations the pages stage took, and
/// does not touch the page the rewritten word names.
#[test]
fn destination_words_rewritten_after_the_pages_stage_change_nothing() {
    let g = setup();
    let a = map(&g.space, 3);
    let b = map(&g.space, 1);
    let data = pattern(3, 5);
    g.space.write(a, &data).unwrap();
    g.space.write(b, &pattern(1, 6)).unwrap();
    let other = dev_pfn(&g.space, b);
    let before = {
        let p = g.pm.page(other).unwrap();
        (p.refcount(), p.mapcount(), p.flags())
    };
    let olds = frames(&g.space, a, 3);
    let (mut src, mut dst) = ([0u64; 3], [0u64; 3]);
    let mut m = setup_system_migration(&g.space, a, 3, Owner::NONE, &mut src, &mut dst);
    let n: Vec<Pfn> = (0..3).map(|k| fresh(&g.pm, page_at(&data, k))).collect();
    for (i, &p) in n.iter().enumerate() {
        m.dst[i] = migrate_pfn(p);
    }
    migrate_vma_pages(&mut m).unwrap();
    // Entry 2 stops migrating (allowed): its destination is released, its page stays.
    m.src[2] &= !MIGRATE_PFN_MIGRATE;
    m.dst[0] = 0;
    m.dst[1] = migrate_pfn(other);
    m.dst[2] = migrate_pfn(other);
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(frames(&g.space, a, 3), vec![n[0], n[1], olds[2]]);
    assert_eq!(read(&g.space, a, 3 * 4096), data);
    assert_eq!(read(&g.space, b, 4096), pattern(1, 6));
    let p = g.pm.page(other).unwrap();
    assert_eq!((p.refcount(), p.mapcount(), p.flags()), before);
    assert_freed(&g, olds[0], "old page");
    assert_freed(&g, olds[1], "old page");
    assert_freed(&g, n[2], "unused destination");
    assert!(unsettled(&g.space, &g.pm, a, 3).is_empty());
}

/// With `Migration`: destinations that name a collected source page, a page another
/// migration's pages stage took, or a mapped page are refused (`PageInUse`); the refused
/// migration is dropped with every page restored, and it neither releases the other
/// migration's destination nor its own destinations twice.
#[test]
fn migration_refuses_sources_taken_and_mapped_pages_as_destinations() {
    let g = setup();
    let other_space = AddressSpace::new(&g.pm);
    let a = map(&g.space, 4);
    let b = map(&other_space, 4);
    let c = map(&g.space, 1);
    let (da, db) = (pattern(4, 1), pattern(4, 2));
    g.space.write(a, &da).unwrap();
    other_space.write(b, &db).unwrap();
    g.space.write(c, &pattern(1, 3)).unwrap();
    let (olds_a, olds_b) = (frames(&g.space, a, 4), frames(&other_space, b, 4));
    let mapped = dev_pfn(&g.space, c);
    let base = g.pool.in_use();
    // The winner: b's migration, copied (its pages stage took nb).
    let nb: Vec<Pfn> = (0..4).map(|k| fresh(&g.pm, page_at(&db, k))).collect();
    let mut mb = Migration::setup(
        &other_space,
        b,
        b + 4 * PAGE,
        MIGRATE_VMA_SELECT_SYSTEM,
        hetmem::mm::Owner(7),
        None,
    )
    .unwrap();
    for (i, &p) in nb.iter().enumerate() {
        mb.dst_mut()[i] = migrate_pfn(p);
    }
    let mb = mb.copied().unwrap();
    let bad = [olds_a[1], nb[2], mapped];
    for (which, &bad) in bad.iter().enumerate() {
        let na: Vec<Pfn> = (0..3).map(|k| fresh(&g.pm, page_at(&da, k))).collect();
        let mut ma = Migration::setup(
            &g.space,
            a,
            a + 4 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            hetmem::mm::Owner(7),
            None,
        )
        .unwrap();
        assert_eq!(ma.cpages(), 4);
        for (i, &p) in na.iter().enumerate() {
            ma.dst_mut()[i] = migrate_pfn(p);
        }
        ma.dst_mut()[3] = migrate_pfn(bad);
        let r = ma.copied();
        assert!(
            matches!(r, Err(Error::PageInUse(p)) if p == bad),
            "case {which}: {:?}",
            r.err()
        );
        assert_eq!(frames(&g.space, a, 4), olds_a, "case {which}");
        assert_eq!(read(&g.space, a, 4 * 4096), da);
        for &p in &na {
            assert_freed(&g, p, "refused migration's destination");
        }
    }
    let p = g.pm.page(nb[2]).unwrap();
    assert!(
        p.is_locked() && p.refcount() == 1,
        "the winner's page is intact"
    );
    let out = mb.finalize();
    assert_eq!((out.cpages, out.migrated), (4, 4));
    assert_eq!(frames(&other_space, b, 4), nb);
    assert_eq!(read(&other_space, b, 4 * 4096), db);
    for &p in &olds_b {
        assert_freed(&g, p, "winner's old page");
    }
    assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
    assert!(unsettled(&other_space, &g.pm, b, 4).is_empty());
    let m = g.pm.page(mapped).unwrap();
    assert_eq!((m.refcount(), m.mapcount(), m.is_locked()), (1, 1, false));
    assert_eq!(g.pool.in_use(), base, "no page leaked or freed twice");
}

/// A bad destination (`None`: a frame freed just before it is named) and the error kind
/// it must get.
type Case = (Option<Pfn>, fn(&Error) -> bool);

/// Each kind of bad destination, named after good ones whose sources are dirty: an unknown
/// frame (`UnknownPfn`), a free page (`PageFree`), an unlocked page (`NotLocked`), a page a
/// guard still holds (`PageInUse`). The refusal takes back exactly what the pass did to
/// the good ones (the mark and the moved `DIRTY`), and finalize restores every source and
/// releases the good destinations once.
#[test]
fn every_refusal_after_accepted_destinations_takes_back_the_moved_flags() {
    let g = setup();
    let a = map(&g.space, 4);
    let data = pattern(4, 33);
    g.space.write(a, &data).unwrap();
    let olds = frames(&g.space, a, 4);
    let unlocked = g.pm.alloc_page(true, false).unwrap();
    let guarded = g.pm.alloc_page(true, true).unwrap();
    // `None`: a frame freed just before it is named (the pool would hand it out again).
    let cases: [Case; 4] = [
        (Some(Pfn(1 << 44)), |e| matches!(e, Error::UnknownPfn(_))),
        (None, |e| matches!(e, Error::PageFree(_))),
        (Some(unlocked.pfn()), |e| matches!(e, Error::NotLocked(_))),
        (Some(guarded.pfn()), |e| matches!(e, Error::PageInUse(_))),
    ];
    for (case, (bad, kind)) in cases.into_iter().enumerate() {
        let base = g.pool.in_use();
        let n: Vec<Pfn> = (0..3).map(|k| fresh(&g.pm, page_at(&data, k))).collect();
        let bad = bad.unwrap_or_else(|| {
            let f = g.pool.alloc(false).unwrap();
            g.pool.free(f).unwrap();
            f
        });
        let flags: Vec<u32> = n.iter().map(|&p| g.pm.page(p).unwrap().flags()).collect();
        let (mut src, mut dst) = ([0u64; 4], [0u64; 4]);
        let mut m = setup_system_migration(&g.space, a, 4, Owner::NONE, &mut src, &mut dst);
        for (i, &p) in n.iter().enumerate() {
            m.dst[i] = migrate_pfn(p);
        }
        m.dst[3] = migrate_pfn(bad);
        let r = migrate_vma_pages(&mut m);
        assert!(r.as_ref().is_err_and(kind), "case {case}: {r:?}");
        for (k, &p) in n.iter().enumerate() {
            let page = g.pm.page(p).unwrap();
            assert_eq!(page.flags(), flags[k], "case {case}: destination {k}");
        }
        migrate_vma_finalize(&mut m);
        drop(m);
        assert_eq!(frames(&g.space, a, 4), olds, "case {case}");
        assert_eq!(read(&g.space, a, 4 * 4096), data, "case {case}");
        assert!(unsettled(&g.space, &g.pm, a, 4).is_empty(), "case {case}");
        for &p in &n {
            assert_freed(&g, p, "destination");
        }
        assert_eq!(g.pool.in_use(), base, "case {case}");
    }
    let p = guarded.page();
    assert_eq!(
        (p.refcount(), p.is_locked()),
        (1, true),
        "the guard's page is intact"
    );
    assert!(!unlocked.page().is_locked());
}

/// A raw `migrate_device_finalize` whose pages stage never ran, naming a destination that
/// another migration's pages stage took: the page is that migration's, so this finalize
/// must restore its device page and leave the destination alone.
#[test]
fn a_raw_device_finalize_does_not_release_another_migrations_destination() {
    let g = setup();
    let other = AddressSpace::new(&g.pm);
    let (a, b) = (map(&g.space, 1), map(&other, 1));
    let (da, db) = (pattern(1, 61), pattern(1, 62));
    g.space.write(a, &da).unwrap();
    other.write(b, &db).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 1).unwrap().migrated, 1);
    let device = dev_pfn(&g.space, a);
    let n0 = fresh(&g.pm, &db);
    let mut m = Migration::setup(
        &other,
        b,
        b + PAGE,
        MIGRATE_VMA_SELECT_SYSTEM,
        hetmem::mm::Owner(7),
        None,
    )
    .unwrap();
    m.dst_mut()[0] = migrate_pfn(n0);
    let m = m.copied().unwrap();
    let mut src = [migrate_pfn(device)];
    assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
    let mut dst = [migrate_pfn(n0)];
    migrate_device_finalize(&g.pm, &mut src, &mut dst);
    assert_eq!(dev_pfn(&g.space, a), device, "the device page is restored");
    let out = m.finalize();
    assert_eq!(out.migrated, 1);
    assert_eq!(dev_pfn(&other, b), n0);
    let p = g.pm.page(n0).unwrap();
    assert_eq!((p.refcount(), p.mapcount(), p.is_locked()), (1, 1, false));
    assert_eq!(read(&other, b, 4096), db);
    assert_eq!(read(&g.space, a, 4096), da);
}

/// `npages` is a public field: a driver that grows it before the pages stage, or shrinks
/// it before finalize, must not unbalance the stages. The pages stage refuses a count that
/// is not setup's (`InvalidArgument`), and finalize finishes every entry setup collected:
/// nothing panics, and no page is left locked behind a migration entry.
#[test]
fn a_changed_npages_cannot_unbalance_the_stages() {
    let g = setup();
    let a = map(&g.space, 4);
    let data = pattern(4, 71);
    g.space.write(a, &data).unwrap();
    let olds = frames(&g.space, a, 4);
    let (mut src, mut dst) = ([0u64; 8], [0u64; 8]);
    let mut m = setup_system_migration(&g.space, a, 4, Owner::NONE, &mut src, &mut dst);
    assert_eq!(m.cpages, 4);
    m.npages = 8;
    let r = migrate_vma_pages(&mut m);
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(frames(&g.space, a, 4), olds);
    assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
    assert_eq!(read(&g.space, a, 4 * 4096), data);

    let n: Vec<Pfn> = (0..4).map(|k| fresh(&g.pm, page_at(&data, k))).collect();
    let (mut src, mut dst) = ([0u64; 4], [0u64; 4]);
    let mut m = setup_system_migration(&g.space, a, 4, Owner::NONE, &mut src, &mut dst);
    for (i, &p) in n.iter().enumerate() {
        m.dst[i] = migrate_pfn(p);
    }
    migrate_vma_pages(&mut m).unwrap();
    m.npages = 2;
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(frames(&g.space, a, 4), n, "every collected entry finished");
    assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
    assert_eq!(read(&g.space, a, 4 * 4096), data);
    for &p in &olds {
        assert_freed(&g, p, "old page");
    }
}

/// `start` (with `end`) and `space` are public too: a driver that moves the range to an
/// unmapped address, or swaps the space, after setup must not make the pages stage map
/// holes there or finalize look for its entries there. The pages stage refuses
/// (`InvalidArgument`), and finalize finishes the range setup collected.
#[test]
fn a_moved_range_or_swapped_space_cannot_redirect_the_stages() {
    let g = setup();
    let other = AddressSpace::new(&g.pm);
    let a = map(&g.space, 4);
    let data = pattern(2, 81);
    g.space.write(a, &data).unwrap();
    let olds = frames(&g.space, a, 2);
    let gone = map(&g.space, 8);
    g.space.munmap(gone, 8 * PAGE).unwrap();
    for case in 0..2 {
        let base = g.pool.in_use();
        let n: Vec<Pfn> = (0..4).map(|k| fresh(&g.pm, &pattern(1, k as u8))).collect();
        let (mut src, mut dst) = ([0u64; 4], [0u64; 4]);
        let mut m = setup_system_migration(&g.space, a, 4, Owner::NONE, &mut src, &mut dst);
        assert_eq!(m.cpages, 4, "two pages and two holes");
        for (i, &p) in n.iter().enumerate() {
            m.dst[i] = migrate_pfn(p);
        }
        if case == 0 {
            (m.start, m.end) = (gone, gone + 4 * PAGE);
        } else {
            m.space = &other;
        }
        let r = migrate_vma_pages(&mut m);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "case {case}: {r:?}"
        );
        migrate_vma_finalize(&mut m);
        drop(m);
        assert_eq!(frames(&g.space, a, 2), olds, "case {case}");
        assert_eq!(read(&g.space, a, 2 * 4096), data);
        assert_eq!(read(&g.space, a + 2 * PAGE, 4096), vec![0u8; 4096]);
        assert!(unsettled(&g.space, &g.pm, a, 4).is_empty(), "case {case}");
        for k in 0..8 {
            let pte = g.space.pte(gone + k * PAGE);
            assert!(matches!(pte, hetmem::mm::Pte::None), "case {case}: {pte:?}");
        }
        for &p in &n {
            assert_freed(&g, p, "destination");
        }
        assert_eq!(g.pool.in_use(), base, "case {case}");
    }
}
