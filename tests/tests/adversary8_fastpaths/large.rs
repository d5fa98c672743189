//! Batches large enough for the fast paths' edges: more than a block of `Page` structs
//! (16 384) so the cursor moves between blocks, more than finalize's free batch (1024), many
//! page-table leaves, with holes, pages shared by fork, pinned pages and failed copies; and
//! device pages of two pagemaps given back by one finalize.

use hetmem::mm::pin_pages;
use hetmem_tests::dmirror::Dmirror;

use super::*;

/// Pages of the big range.
const N: usize = 20_000;

/// Which page of the big range is what.
fn hole(i: usize) -> bool {
    i % 11 == 5
}
fn pinned(i: usize) -> bool {
    !hole(i) && i % 997 == 1
}
fn failing(i: usize) -> bool {
    !hole(i) && !pinned(i) && i % 1009 == 2
}
fn rewritten(i: usize) -> bool {
    !hole(i) && i.is_multiple_of(3)
}

/// One migration of 20 000 pages to a device and one back, over frames that cross a block
/// of `Page` structs, with holes, fork-shared and exclusive pages, pins and failed copies:
/// the counts are what each kind of page allows, both spaces read their own bytes, nothing
/// is left locked, and every frame and device page comes back.
#[test]
fn twenty_thousand_pages_with_holes_forks_pins_and_failed_copies() {
    watchdog("large batch", || {
        let pool = HostFramePool::new(256 << 20).unwrap();
        let pm = hetmem::mm::PageMap::new(pool.clone()).unwrap();
        let dm = Dmirror::new(host_device(N + 64, &pool), MemoryKind::DevicePrivate, &pm);
        let space = AddressSpace::new(&pm);
        let base = pool.in_use();
        let a = map(&space, N as u64);
        let orig = pattern(N, 93);
        let mut want = vec![0u8; N * 4096];
        for i in (0..N).filter(|&i| !hole(i)) {
            let r = i * 4096..(i + 1) * 4096;
            space.write(a + r.start as u64, &orig[r.clone()]).unwrap();
            want[r.clone()].copy_from_slice(&orig[r]);
        }
        let frames: Vec<Pfn> = (0..N)
            .filter(|&i| !hole(i))
            .map(|i| dev_pfn(&space, a + i as u64 * PAGE))
            .collect();
        let max = frames.iter().max().unwrap().0;
        let min = frames.iter().min().unwrap().0;
        assert!(max / 16_384 != min / 16_384, "the frames stay in one block");
        let child = space.fork().unwrap();
        let child_want = want.clone();
        let fresh = pattern(N, 94);
        for i in (0..N).filter(|&i| rewritten(i)) {
            let r = i * 4096..(i + 1) * 4096;
            space.write(a + r.start as u64, &fresh[r.clone()]).unwrap();
            want[r.clone()].copy_from_slice(&fresh[r]);
        }
        let pins: Vec<_> = (0..N)
            .filter(|&i| pinned(i))
            .map(|i| pin_pages(&space, a + i as u64 * PAGE, 1, false, false).unwrap())
            .collect();
        let fails: Vec<VirtAddr> = (0..N)
            .filter(|&i| failing(i))
            .map(|i| a + i as u64 * PAGE)
            .collect();
        dm.fail_copies_at(&fails);
        let moved = dm.migrate_to_device(&space, a, N).unwrap();
        dm.fail_copies_at(&[]);
        let npinned = (0..N).filter(|&i| pinned(i)).count();
        assert_eq!(moved.cpages, N - npinned);
        assert_eq!(moved.migrated, N - npinned - fails.len());
        for i in 0..N {
            let pte = space.pte(a + i as u64 * PAGE);
            let stays = pinned(i) || failing(i);
            assert_eq!(
                matches!(pte, Pte::DevicePrivate { .. }),
                !stays,
                "page {i}: {pte:?}"
            );
        }
        assert!(unsettled(&space, &pm, a, N).is_empty());
        assert!(unsettled(&child, &pm, a, N).is_empty());
        // Back in one migration of device pages (a block of their own), then the bytes.
        let back = dm.migrate_to_system(&space, a, N).unwrap();
        assert_eq!(back.migrated, moved.migrated);
        assert_eq!(read(&space, a, N * 4096), want);
        assert_eq!(read(&child, a, N * 4096), child_want);
        assert!(unsettled(&space, &pm, a, N).is_empty());
        assert!(unsettled(&child, &pm, a, N).is_empty());
        drop(pins);
        drop(child);
        space.munmap(a, N as u64 * PAGE).unwrap();
        assert_eq!(dm.device().pages_in_use(), 0, "device pages leaked");
        assert_eq!(pool.in_use(), base, "frames leaked");
    });
}

/// A range whose pages sit on two device pagemaps, interleaved, evicted by one device
/// migration of 3000 pages (three free batches): each driver gets back exactly its own
/// pages (the test driver panics on a page not its own), and the bytes come home.
#[test]
fn device_pages_of_two_pagemaps_go_back_to_their_own_drivers_in_one_finalize() {
    watchdog("two pagemaps", || {
        let n = 3000;
        let pool = HostFramePool::new(128 << 20).unwrap();
        let pm = hetmem::mm::PageMap::new(pool.clone()).unwrap();
        let da = Dmirror::new(host_device(n, &pool), MemoryKind::DevicePrivate, &pm);
        let db = Dmirror::new(host_device(n, &pool), MemoryKind::DevicePrivate, &pm);
        let space = AddressSpace::new(&pm);
        let (a, data) = written(&space, n as u64, 95);
        let mut src = vec![0u64; n];
        let mut dst = vec![0u64; n];
        let mut m = MigrateVma::new(&space, a, a + n as u64 * PAGE, &mut src, &mut dst);
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        m.pgmap_owner = da.owner();
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.cpages, n);
        let pa = da.device().alloc_pages(n / 2, true).unwrap();
        let pb = db.device().alloc_pages(n - n / 2, true).unwrap();
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        for i in 0..n {
            let s = migrate_pfn_to_pfn(m.src[i]).unwrap();
            let (d, pairs) = if i % 2 == 0 {
                (pa[i / 2], &mut ca)
            } else {
                (pb[i / 2], &mut cb)
            };
            m.dst[i] = migrate_pfn(pm.claim_device_page(d, true).unwrap().into_pfn());
            pairs.push((s, d));
        }
        da.device().copy(&ca).unwrap().wait().unwrap();
        db.device().copy(&cb).unwrap().wait().unwrap();
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        drop(m);
        assert_eq!(
            (da.device().pages_in_use(), db.device().pages_in_use()),
            (n / 2, n - n / 2)
        );
        // Evict both, interleaved, in one device migration.
        let pfns: Vec<Pfn> = (0..n)
            .map(|i| dev_pfn(&space, a + i as u64 * PAGE))
            .collect();
        let mut ev = DeviceMigration::pfns(&pm, &pfns).unwrap();
        assert_eq!(ev.cpages(), n);
        let (mut ca, mut cb) = (Vec::new(), Vec::new());
        for (i, &p) in pfns.iter().enumerate() {
            let f = pm.alloc_page(false, true).unwrap().into_pfn();
            ev.dst_mut()[i] = migrate_pfn(f);
            if i % 2 == 0 { &mut ca } else { &mut cb }.push((p, f));
        }
        da.device().copy(&ca).unwrap().wait().unwrap();
        db.device().copy(&cb).unwrap().wait().unwrap();
        let out = ev.copied().unwrap().finalize();
        assert_eq!(out.migrated, n);
        assert_eq!(
            (da.device().pages_in_use(), db.device().pages_in_use()),
            (0, 0)
        );
        for (i, &p) in pfns.iter().enumerate() {
            let page = pm.page(p).unwrap();
            assert_eq!((page.refcount(), page.flags()), (0, 0), "device page {i}");
            assert!(matches!(
                space.pte(a + i as u64 * PAGE),
                Pte::Present { .. }
            ));
        }
        assert!(unsettled(&space, &pm, a, n).is_empty());
        assert_eq!(read(&space, a, n * 4096), data);
    });
}

/// Eviction by frame number racing CPU reads of the same pages: every read sees its bytes,
/// and at the end nothing is locked, left as a migration entry, or leaked.
#[test]
fn eviction_racing_cpu_faults_keeps_bytes_and_counts() {
    watchdog("eviction vs faults", || {
        let n = 600;
        let pool = HostFramePool::new(64 << 20).unwrap();
        let pm = hetmem::mm::PageMap::new(pool.clone()).unwrap();
        let dm = Dmirror::new(host_device(n, &pool), MemoryKind::DevicePrivate, &pm);
        let space = AddressSpace::new(&pm);
        let (a, data) = written(&space, n as u64, 96);
        for round in 0..6 {
            assert_eq!(dm.migrate_to_device(&space, a, n).unwrap().migrated, n);
            std::thread::scope(|s| {
                let ev = s.spawn(|| {
                    // Busy pages (locked by a fault) are skipped; try until all are home.
                    while dm.device().pages_in_use() > 0 {
                        dm.evict_all().unwrap();
                    }
                });
                for k in (0..n).rev().step_by(7) {
                    let at = a + k as u64 * PAGE;
                    assert_eq!(
                        read(&space, at, 4096),
                        data[k * 4096..(k + 1) * 4096],
                        "round {round}, page {k}"
                    );
                }
                ev.join().unwrap();
            });
            assert!(unsettled(&space, &pm, a, n).is_empty());
            assert_eq!(read(&space, a, n * 4096), data);
        }
        assert_eq!(dm.device().pages_in_use(), 0);
    });
}
