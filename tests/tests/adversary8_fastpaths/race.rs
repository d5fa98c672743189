//! Two pages stages racing for overlapping destinations (one driver handing the same pfns
//! to two migrations), then both finalizing: every page ends in exactly one valid place.

use std::sync::Barrier;

use super::*;

/// One round: two ranges of `n` pages, set up by two threads, both naming the same `n`
/// destinations (in the same order, or the second reversed so that both may lose); the
/// pages stages start together, then each finalizes. The bytes of both ranges must be
/// intact, nothing left locked or as a migration entry, each destination mapped at most
/// once, and every destination not mapped freed exactly once.
///
/// Long: one round is one story (two threads' stages, then the checks of every page).
fn race_round(g: &Gpu, n: usize, reversed: bool, seed: u8) {
    let (a, da) = written(&g.space, n as u64, seed);
    let (b, db) = written(&g.space, n as u64, seed.wrapping_add(1));
    let d = device_dsts(g, n);
    let in_use = g.d.device().pages_in_use();
    let start = Barrier::new(2);
    let paged = Barrier::new(2);
    let outcomes: Vec<(bool, usize)> = std::thread::scope(|s| {
        let run = |at: VirtAddr, order: Vec<Pfn>| {
            let (start, paged, g) = (&start, &paged, g);
            move || {
                let mut src = vec![0u64; n];
                let mut dst = vec![0u64; n];
                let mut m = MigrateVma::new(&g.space, at, at + n as u64 * PAGE, &mut src, &mut dst);
                m.flags = MIGRATE_VMA_SELECT_SYSTEM;
                m.pgmap_owner = g.d.owner();
                migrate_vma_setup(&mut m).unwrap();
                assert_eq!(m.cpages, n);
                for (i, &p) in order.iter().enumerate() {
                    m.dst[i] = migrate_pfn(p);
                }
                start.wait();
                let r = migrate_vma_pages(&mut m);
                if let Err(e) = &r {
                    assert!(matches!(e, Error::PageInUse(_)), "{e:?}");
                }
                // Copy only for a winner, and only after both stages ran: a loser's
                // destinations are the winner's pages now.
                paged.wait();
                if r.is_ok() {
                    let pairs: Vec<(Pfn, Pfn)> = (0..n)
                        .map(|i| (migrate_pfn_to_pfn(m.src[i]).unwrap(), order[i]))
                        .collect();
                    g.d.device().copy(&pairs).unwrap().wait().unwrap();
                }
                let moved = (0..n)
                    .filter(|&i| m.src[i] & MIGRATE_PFN_MIGRATE != 0)
                    .count();
                migrate_vma_finalize(&mut m);
                (r.is_ok(), if r.is_ok() { moved } else { 0 })
            }
        };
        let mut rev = d.clone();
        if reversed {
            rev.reverse();
        }
        let ha = s.spawn(run(a, d.clone()));
        let hb = s.spawn(run(b, rev));
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    let winners = outcomes.iter().filter(|o| o.0).count();
    assert!(winners <= 1, "both pages stages took the same pages");
    if !reversed {
        assert_eq!(
            winners, 1,
            "same order: the first to mark the first page wins"
        );
    }
    let moved: usize = outcomes.iter().map(|o| o.1).sum();
    assert!(unsettled(&g.space, &g.pm, a, n).is_empty());
    assert!(unsettled(&g.space, &g.pm, b, n).is_empty());
    // Each destination is mapped once (the winner's) or freed (checked before the reads,
    // which bring the pages home).
    let mut mapped = 0;
    for &p in &d {
        let page = g.pm.page(p).unwrap();
        assert!(!page.is_locked(), "{p} left locked");
        match page.mapcount() {
            0 => assert_eq!(page.refcount(), 0, "{p}: unmapped but live"),
            1 => {
                assert_eq!(page.refcount(), 1, "{p}: one mapping, one reference");
                mapped += 1;
            }
            c => panic!("{p} mapped {c} times"),
        }
    }
    assert_eq!(mapped, moved);
    assert_eq!(g.d.device().pages_in_use(), in_use - (n - moved));
    assert_eq!(read(&g.space, a, n * 4096), da);
    assert_eq!(read(&g.space, b, n * 4096), db);
    g.space.munmap(a, n as u64 * PAGE).unwrap();
    g.space.munmap(b, n as u64 * PAGE).unwrap();
}

/// Many rounds of the race, same order and reversed; at the end every device page is free.
#[test]
fn racing_pages_stages_over_the_same_destinations_leave_each_page_in_one_place() {
    let g = gpu(MemoryKind::DevicePrivate, 256, 1, SMALL_POOL);
    watchdog("racing pages stages", move || {
        let base = g.d.device().pages_in_use();
        for round in 0..60 {
            race_round(&g, 24, round % 2 == 1, round as u8);
        }
        assert_eq!(g.d.device().pages_in_use(), base, "device pages leaked");
    });
}

/// A loser that finalizes while the winner still holds the destinations (between its pages
/// stage and finalize) must leave them alone; the winner then maps them.
#[test]
fn a_loser_finalizing_before_the_winner_leaves_the_winners_destinations() {
    let g = setup();
    let (a, da) = written(&g.space, 4, 91);
    let (b, db) = written(&g.space, 4, 92);
    let d = device_dsts(&g, 4);
    let in_use = g.d.device().pages_in_use();
    let (mut sa, mut ta) = ([0u64; 4], [0u64; 4]);
    let (mut sb, mut tb) = ([0u64; 4], [0u64; 4]);
    let mut ma = MigrateVma::new(&g.space, a, a + 4 * PAGE, &mut sa, &mut ta);
    let mut mb = MigrateVma::new(&g.space, b, b + 4 * PAGE, &mut sb, &mut tb);
    for m in [&mut ma, &mut mb] {
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        m.pgmap_owner = g.d.owner();
        migrate_vma_setup(m).unwrap();
        for (w, &p) in m.dst.iter_mut().zip(&d) {
            *w = migrate_pfn(p);
        }
    }
    migrate_vma_pages(&mut ma).unwrap();
    assert!(matches!(migrate_vma_pages(&mut mb), Err(Error::PageInUse(p)) if p == d[0]));
    migrate_vma_finalize(&mut mb);
    for &p in &d {
        let page = g.pm.page(p).unwrap();
        assert!(
            page.is_locked() && page.refcount() == 1,
            "{p} released by the loser"
        );
    }
    let pairs: Vec<(Pfn, Pfn)> = (0..4)
        .map(|i| (migrate_pfn_to_pfn(ma.src[i]).unwrap(), d[i]))
        .collect();
    g.d.device().copy(&pairs).unwrap().wait().unwrap();
    migrate_vma_finalize(&mut ma);
    drop((ma, mb));
    for (i, &p) in d.iter().enumerate() {
        assert_eq!(dev_pfn(&g.space, a + i as u64 * PAGE), p);
    }
    assert_eq!(g.d.device().pages_in_use(), in_use);
    assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
    assert!(unsettled(&g.space, &g.pm, b, 4).is_empty());
    assert_eq!(read(&g.space, a, 4 * 4096), da);
    assert_eq!(read(&g.space, b, 4 * 4096), db);
}
