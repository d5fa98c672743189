//! Large batches: more pages than finalize gives back at once (1024), more than a block of
//! `Page` structs (16384, so the page cursor moves between blocks), with holes, pages
//! mapped twice (fork), pinned pages and failed copies; device pages of two pagemaps freed
//! in one finalize; eviction racing CPU faults.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hetmem::migration::*;
use hetmem::mm::{pin_pages, AddressSpace, MemoryKind, PageMap, Pte, PAGE};
use hetmem::VirtAddr;
use hetmem_engine::{HostFramePool, Pfn};
use hetmem_tests::dmirror::Dmirror;
use hetmem_tests::harness::{host_device, join_all, map, read, unsettled, watchdog_for};

/// Bytes of page `k` (distinct per page and per seed).
fn page_bytes(k: usize, seed: u8) -> Vec<u8> {
    (0..4096)
        .map(|i| (k as u8) ^ ((k >> 8) as u8).wrapping_mul(7) ^ seed ^ (i % 241) as u8 | 1)
        .collect()
}

fn on_device(space: &AddressSpace, a: VirtAddr, k: usize) -> bool {
    matches!(space.pte(a + k as u64 * PAGE), Pte::DevicePrivate { .. })
}

/// 20 000 pages to the device and back: every 9th page a hole, the range mapped twice by a
/// fork, every 1000th page pinned (it stays), every 777th copy failing (it stays). Each
/// page ends with its bytes in one place, both spaces agree, the counts are exact, and
/// once everything is gone the pool and the device hold nothing.
#[test]
fn twenty_thousand_pages_with_holes_forks_pins_and_failed_copies() {
    watchdog_for("large migration", Duration::from_secs(240), || {
        const N: usize = 20_000;
        let pool = HostFramePool::new(512 << 20).unwrap();
        let pm = PageMap::new(pool.clone()).unwrap();
        let dev = Dmirror::new(host_device(N + 64, &pool), MemoryKind::DevicePrivate, &pm);
        let base = pool.in_use();
        let space = AddressSpace::new(&pm);
        let a = map(&space, N as u64);
        let hole = |k: usize| k % 9 == 4;
        let pinned = |k: usize| k % 1000 == 7;
        let fails = |k: usize| k % 777 == 3 && !hole(k) && !pinned(k);
        let mut want = vec![0u8; N * 4096];
        for k in (0..N).filter(|&k| !hole(k)) {
            let b = page_bytes(k, 3);
            want[k * 4096..(k + 1) * 4096].copy_from_slice(&b);
            space.write(a + k as u64 * PAGE, &b).unwrap();
        }
        let child = space.fork().unwrap();
        let pins: Vec<_> = (0..N)
            .filter(|&k| pinned(k))
            .map(|k| pin_pages(&space, a + k as u64 * PAGE, 1, false, false).unwrap())
            .collect();
        let fail_at: Vec<VirtAddr> = (0..N)
            .filter(|&k| fails(k))
            .map(|k| a + k as u64 * PAGE)
            .collect();
        dev.fail_copies_at(&fail_at);
        let moved = dev.migrate_to_device(&space, a, N).unwrap();
        dev.fail_copies_at(&[]);
        let npinned = (0..N).filter(|&k| pinned(k)).count();
        assert_eq!(moved.cpages, N - npinned, "everything but the pinned pages");
        assert_eq!(moved.migrated, N - npinned - fail_at.len());
        for k in 0..N {
            let stays = pinned(k) || fails(k);
            assert_eq!(on_device(&space, a, k), !stays, "page {k}");
        }
        assert_eq!(dev.device().pages_in_use(), moved.migrated);
        assert!(unsettled(&space, &pm, a, N).is_empty());
        assert!(unsettled(&child, &pm, a, N).is_empty());
        assert!(
            read(&space, a, N * 4096) == want,
            "parent's bytes after going out"
        );
        // The child reads its own view: written pages as they were, holes as zeros.
        assert!(read(&child, a, N * 4096) == want, "child's bytes");
        drop(pins);
        let back = dev.migrate_to_system(&space, a, N).unwrap();
        assert_eq!(back.migrated, back.cpages);
        assert!((0..N).all(|k| !on_device(&space, a, k)));
        assert!(
            read(&space, a, N * 4096) == want,
            "parent's bytes after coming back"
        );
        drop(child);
        drop(space);
        assert_eq!(dev.device().pages_in_use(), 0, "device pages leaked");
        assert_eq!(pool.in_use(), base, "host frames leaked or freed twice");
    });
}

/// Two device pagemaps (two devices), 1500 pages on each, brought home by one
/// `DeviceMigration` whose frame list interleaves them in descending order: one finalize
/// frees more than a batch of device pages of both pagemaps, each to its own driver.
#[test]
fn one_finalize_frees_device_pages_of_two_pagemaps() {
    watchdog_for("two pagemaps", Duration::from_secs(120), || {
        const N: usize = 1500;
        let pool = HostFramePool::new(256 << 20).unwrap();
        let pm = PageMap::new(pool.clone()).unwrap();
        let d1 = Dmirror::new(host_device(N + 8, &pool), MemoryKind::DevicePrivate, &pm);
        let d2 = Dmirror::new(host_device(N + 8, &pool), MemoryKind::DevicePrivate, &pm);
        let space = AddressSpace::new(&pm);
        let (a1, a2) = (map(&space, N as u64), map(&space, N as u64));
        let w1: Vec<u8> = (0..N).flat_map(|k| page_bytes(k, 1)).collect();
        let w2: Vec<u8> = (0..N).flat_map(|k| page_bytes(k, 2)).collect();
        space.write(a1, &w1).unwrap();
        space.write(a2, &w2).unwrap();
        assert_eq!(d1.migrate_to_device(&space, a1, N).unwrap().migrated, N);
        assert_eq!(d2.migrate_to_device(&space, a2, N).unwrap().migrated, N);
        let dev_of = |s: VirtAddr, k: usize| match space.pte(s + k as u64 * PAGE) {
            Pte::DevicePrivate { pfn, .. } => pfn,
            other => panic!("{other:?}"),
        };
        let mut pfns: Vec<Pfn> = (0..N)
            .flat_map(|k| [dev_of(a1, k), dev_of(a2, k)])
            .collect();
        pfns.reverse();
        let mut m = DeviceMigration::pfns(&pm, &pfns).unwrap();
        assert_eq!(m.cpages(), 2 * N);
        let mut held = Vec::new();
        let (mut p1, mut p2) = (Vec::new(), Vec::new());
        for (i, &s) in pfns.iter().enumerate() {
            let page = pm.alloc_page(false, true).unwrap();
            let pair = (s, page.pfn());
            if d1.device().owns(s) {
                p1.push(pair);
            } else {
                p2.push(pair);
            }
            held.push((i, page));
        }
        d1.device().copy(&p1).unwrap().wait().unwrap();
        d2.device().copy(&p2).unwrap().wait().unwrap();
        for (i, page) in held {
            m.dst_mut()[i] = migrate_pfn(page.into_pfn());
        }
        let out = m.copied().unwrap().finalize();
        assert_eq!((out.cpages, out.migrated, out.failed), (2 * N, 2 * N, 0));
        assert_eq!(d1.device().pages_in_use(), 0, "device 1 pages not freed");
        assert_eq!(d2.device().pages_in_use(), 0, "device 2 pages not freed");
        assert!(read(&space, a1, N * 4096) == w1);
        assert!(read(&space, a2, N * 4096) == w2);
        assert!(unsettled(&space, &pm, a1, N).is_empty());
        assert!(unsettled(&space, &pm, a2, N).is_empty());
        for &p in &pfns {
            let page = pm.page(p).unwrap();
            assert_eq!((page.refcount(), page.flags()), (0, 0), "device page {p}");
        }
    });
}

/// Eviction of the whole device (`migrate_device_range`) while two threads fault pages
/// home by reading them, several rounds: no byte is lost, no page stays locked or behind a
/// migration entry, and at the end every page is home and the device is empty.
#[test]
fn eviction_racing_cpu_faults_keeps_every_byte() {
    watchdog_for("eviction vs faults", Duration::from_secs(180), || {
        const N: usize = 1536;
        let pool = HostFramePool::new(128 << 20).unwrap();
        let pm = PageMap::new(pool.clone()).unwrap();
        let dev = Arc::new(Dmirror::new(
            host_device(N + 8, &pool),
            MemoryKind::DevicePrivate,
            &pm,
        ));
        let space = AddressSpace::new(&pm);
        let a = map(&space, N as u64);
        for round in 0..4u8 {
            let want: Vec<u8> = (0..N).flat_map(|k| page_bytes(k, round)).collect();
            space.write(a, &want).unwrap();
            assert_eq!(dev.migrate_to_device(&space, a, N).unwrap().migrated, N);
            let evict = {
                let dev = dev.clone();
                thread::spawn(move || dev.evict_all().map(|_| ()))
            };
            let readers: Vec<_> = (0..2)
                .map(|t| {
                    let (space, want) = (space.clone(), want.clone());
                    thread::spawn(move || {
                        for k in (t..N).step_by(3) {
                            let got = read(&space, a + k as u64 * PAGE, 4096);
                            assert!(got == want[k * 4096..(k + 1) * 4096], "page {k}");
                        }
                    })
                })
                .collect();
            join_all("readers", readers, Duration::from_secs(90));
            let r = join_all("evictor", vec![evict], Duration::from_secs(90));
            r[0].as_ref().expect("eviction");
            assert!(unsettled(&space, &pm, a, N).is_empty(), "round {round}");
            assert!((0..N).all(|k| !on_device(&space, a, k)), "round {round}");
            assert_eq!(dev.device().pages_in_use(), 0, "round {round}");
            assert!(read(&space, a, N * 4096) == want, "round {round}");
        }
    });
}

/// One raw migration to device memory whose destinations alternate between two device
/// pagemaps, named in descending order (the page cursor switches range at every entry;
/// the pages stage sees no ascending batch). Each page lands on its own device, reads
/// back through its own driver's fault, and both devices end empty.
#[test]
fn destinations_of_two_pagemaps_in_descending_order() {
    watchdog_for(
        "two pagemaps as destinations",
        Duration::from_secs(60),
        || {
            const N: usize = 600;
            let pool = HostFramePool::new(128 << 20).unwrap();
            let pm = PageMap::new(pool.clone()).unwrap();
            let d1 = Dmirror::new(host_device(N, &pool), MemoryKind::DevicePrivate, &pm);
            let d2 = Dmirror::new(host_device(N, &pool), MemoryKind::DevicePrivate, &pm);
            let space = AddressSpace::new(&pm);
            let a = map(&space, N as u64);
            let want: Vec<u8> = (0..N).flat_map(|k| page_bytes(k, 9)).collect();
            space.write(a, &want).unwrap();
            let mut src = vec![0u64; N];
            let mut dst = vec![0u64; N];
            let mut m = MigrateVma::new(&space, a, a + N as u64 * PAGE, &mut src, &mut dst);
            m.flags = MIGRATE_VMA_SELECT_SYSTEM;
            migrate_vma_setup(&mut m).unwrap();
            assert_eq!(m.cpages, N);
            let mut f1 = d1.device().alloc_pages(N / 2, true).unwrap();
            let mut f2 = d2.device().alloc_pages(N / 2, true).unwrap();
            let (mut p1, mut p2) = (Vec::new(), Vec::new());
            let mut named = Vec::new();
            for i in 0..N {
                let s = Pfn(m.src[i] >> MIGRATE_PFN_SHIFT);
                let (d, pairs) = if i % 2 == 0 {
                    (f1.pop().unwrap(), &mut p1)
                } else {
                    (f2.pop().unwrap(), &mut p2)
                };
                pairs.push((s, d));
                named.push(d);
            }
            d1.device().copy(&p1).unwrap().wait().unwrap();
            d2.device().copy(&p2).unwrap().wait().unwrap();
            for (i, &d) in named.iter().enumerate() {
                m.dst[i] = migrate_pfn(pm.claim_device_page(d, true).unwrap().into_pfn());
            }
            migrate_vma_pages(&mut m).unwrap();
            migrate_vma_finalize(&mut m);
            drop(m);
            for (i, &d) in named.iter().enumerate() {
                let pte = space.pte(a + i as u64 * PAGE);
                assert!(
                    matches!(pte, Pte::DevicePrivate { pfn, .. } if pfn == d),
                    "entry {i}: {pte:?}"
                );
            }
            assert!(unsettled(&space, &pm, a, N).is_empty());
            assert_eq!(d1.device().pages_in_use(), N / 2);
            assert_eq!(d2.device().pages_in_use(), N / 2);
            assert!(
                read(&space, a, N * 4096) == want,
                "bytes through both drivers"
            );
            assert!((0..N).all(|k| !on_device(&space, a, k)));
            assert_eq!(d1.device().pages_in_use(), 0);
            assert_eq!(d2.device().pages_in_use(), 0);
            assert!(
                d1.faults() > 0 && d2.faults() > 0,
                "each driver served its own pages"
            );
        },
    );
}
