//! Defects 6 to 10: exhaustion as an error, invalidations that end and run without a leaf
//! lock, failed or dropped migrations that strand nothing, readers of one device page.

use super::*;

/// Defect 6a: a CPU fault on a device-private page when no host frame is free returns an
/// error of kind `OutOfMemory` (not a retry loop); once frames are free again the page reads
/// back with its bytes.
#[test]
fn d06a_a_fault_with_no_free_host_frame_is_out_of_memory() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 4);
    let data = pattern(4, 11);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 4).unwrap().migrated, 4);
    let hoard = g.pool.alloc_batch(g.pool.available(), false).unwrap();
    let s = g.space.clone();
    let reader = spawn_watched(move || {
        let mut v = vec![0u8; 16];
        s.read(a, &mut v).map(|()| v)
    });
    let r = match reader.wait(WATCHDOG) {
        Ok(r) => r,
        Err(stuck) => {
            // Frames again, so that the stuck reader finishes rather than spin on.
            g.pool.free_batch(&hoard).unwrap();
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a CPU fault with no free host frame did not return within {WATCHDOG:?}: it retries forever");
        }
    };
    g.pool.free_batch(&hoard).unwrap();
    let e = r.expect_err("a fault with no free host frame succeeded");
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    let s = g.space.clone();
    let got = watchdog("d06a: a read once frames are free", move || {
        read(&s, a, 4 * 4096)
    });
    assert_eq!(differences(&got, &data), Vec::<String>::new());
}

/// Defect 6b: a long-term pin of a device-coherent page when no host frame is free (so the
/// page cannot move out first) returns an error and leaves the page mapped and unlocked: a
/// CPU read then returns its bytes.
#[test]
fn d06b_a_longterm_pin_with_no_free_host_frame_leaves_the_page_usable() {
    let g = gpu(MemoryKind::DeviceCoherent, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 2);
    let data = pattern(2, 12);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 2).unwrap().migrated, 2);
    let pfn = g.space.pte(a).pfn().unwrap();
    assert_eq!(g.pm.page(pfn).unwrap().kind(), MemoryKind::DeviceCoherent);
    let hoard = g.pool.alloc_batch(g.pool.available(), false).unwrap();
    let s = g.space.clone();
    let pin = spawn_watched(move || pin_pages_longterm(&s, a, 1, false));
    let r = match pin.wait(WATCHDOG) {
        Ok(r) => r,
        Err(stuck) => {
            g.pool.free_batch(&hoard).unwrap();
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a long-term pin with no free host frame did not return within {WATCHDOG:?}");
        }
    };
    assert!(
        r.is_err(),
        "a long-term pin of a coherent page succeeded with no free host frame"
    );
    let pte = g.space.pte(a);
    assert!(
        matches!(pte, Pte::Present { pfn: p, .. } if p == pfn),
        "the coherent page must stay mapped where it was: {pte:?}"
    );
    assert!(
        !g.pm.page(pfn).unwrap().test(flags::LOCKED),
        "the coherent page was left LOCKED"
    );
    let s = g.space.clone();
    let got = watchdog("d06b: a read after the failed pin", move || {
        read(&s, a, 2 * 4096)
    });
    assert_eq!(differences(&got, &data), Vec::<String>::new());
    g.pool.free_batch(&hoard).unwrap();
}

/// Defect 7: a `Migration<Copied>` dropped without finalize, whose range has a hole that got
/// a destination: afterwards no page of the range is locked, no migration entry is left, a
/// CPU read of the hole returns zeros (within the watchdog) and the other pages their bytes.
#[test]
fn d07_a_dropped_copied_migration_unlocks_its_holes() {
    watchdog("d07", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 4);
        let data = pattern(2, 13);
        space.write(a, &data).unwrap(); // pages 2, 3 stay holes
        let mut m = Migration::setup(
            space,
            a,
            a + 4 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            dev.owner(),
            None,
        )
        .unwrap();
        assert_eq!(m.cpages(), 4);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        let copied = m.copied().unwrap();
        drop(copied); // an early return: never finalized
        let bad = unsettled(space, pm, a, 4);
        assert!(bad.is_empty(), "after dropping a copied migration: {bad:?}");
        let s = space.clone();
        let hole = watchdog("d07: a CPU read of the hole", move || {
            read(&s, a + 2 * PAGE, 2 * 4096)
        });
        assert!(hole.iter().all(|&b| b == 0), "the holes must read as zeros");
        assert_eq!(
            differences(&read(space, a, 2 * 4096), &data),
            Vec::<String>::new()
        );
        space.munmap(a, 4 * PAGE).unwrap();
        assert_eq!(dev.device().pages_in_use(), 0, "device pages leaked");
    });
}

/// Defect 8a: every `invalidate` made by a migration of one range is matched by an
/// `invalidate_end` of the same range by the time the migration returns: through the
/// typestate wrapper (finished, dropped after setup, dropped after the pages stage) and
/// through `migrate_vma_*`, each over a range with a hole.
#[test]
fn d08a_every_invalidation_of_a_vma_migration_ends() {
    watchdog("d08a", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let setup = |a: VirtAddr| {
            Migration::setup(
                space,
                a,
                a + 4 * PAGE,
                MIGRATE_VMA_SELECT_SYSTEM,
                dev.owner(),
                None,
            )
            .unwrap()
        };
        let mut bad = Vec::new();
        // Each case gets its own range: pages 0..3 written, page 3 a hole.
        let fresh = || {
            let a = map(space, 4);
            space.write(a, &pattern(3, 14)).unwrap();
            rec.take();
            a
        };

        let a = fresh();
        let mut m = setup(a);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        assert_eq!(m.copied().unwrap().finalize().migrated, 4);
        bad.extend(unpaired("Migration finalized", &rec.take()));

        let a = fresh();
        drop(setup(a));
        bad.extend(unpaired("Migration dropped after setup", &rec.take()));

        let a = fresh();
        let mut m = setup(a);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        drop(m.copied().unwrap());
        bad.extend(unpaired("Migration dropped after copied", &rec.take()));

        let a = fresh();
        let mut src = vec![0u64; 4];
        let mut dst = vec![0u64; 4];
        let mut m = MigrateVma::new(space, a, a + 4 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        bad.extend(unpaired("migrate_vma_setup/pages/finalize", &rec.take()));

        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// Defect 8b: every `invalidate` made by `migrate_device_range` / `migrate_device_pages` /
/// `migrate_device_finalize` is matched by an `invalidate_end` of the same range by the time
/// finalize returns, whether the pages moved (eviction) or not (no destinations).
#[test]
fn d08b_every_invalidation_of_a_device_migration_ends() {
    watchdog("d08b", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let a = map(space, 4);
        let data = pattern(4, 15);
        space.write(a, &data).unwrap();
        let mut bad = Vec::new();

        assert_eq!(dev.migrate_to_device(space, a, 4).unwrap().migrated, 4);
        rec.take();
        assert_eq!(dev.evict_all().unwrap(), 4);
        bad.extend(unpaired(
            "migrate_device_range/pages/finalize (eviction)",
            &rec.take(),
        ));

        assert_eq!(dev.migrate_to_device(space, a, 4).unwrap().migrated, 4);
        rec.take();
        let range = dev.pgmap.range;
        let n = range.count as usize;
        let mut src = vec![0u64; n];
        assert_eq!(
            migrate_device_range(pm, &mut src, range.start, n).unwrap(),
            4
        );
        let mut dst = vec![0u64; n];
        migrate_device_pages(pm, &mut src, &dst).unwrap();
        migrate_device_finalize(pm, &mut src, &mut dst);
        bad.extend(unpaired(
            "migrate_device_range/pages/finalize with no destinations",
            &rec.take(),
        ));

        let s = space.clone();
        let got = watchdog("d08b: a read after the device migrations", move || {
            read(&s, a, 4 * 4096)
        });
        assert_eq!(differences(&got, &data), Vec::<String>::new());
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// A notifier whose `invalidate` (of a migration) checks that no page-table leaf lock is
/// held: it has another thread read a page in the same 2 MiB leaf (outside the range) and
/// waits for it; if the read cannot finish in 2 s, the leaf's lock was held.
struct LeafProbe {
    space: Mutex<Option<AddressSpace>>,
    probe: VirtAddr,
    armed: AtomicBool,
    failures: Mutex<Vec<String>>,
}

impl Notifier for LeafProbe {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        if r.event != NotifyEvent::Migrate || !self.armed.load(Ordering::Acquire) {
            return;
        }
        let Some(space) = self.space.lock().clone() else {
            return;
        };
        let probe = self.probe;
        let reader = spawn_watched(move || {
            let mut b = [0u8; 1];
            space.read(probe, &mut b).map(|()| b[0])
        });
        if reader.wait(Duration::from_secs(2)).is_err() {
            self.failures.lock().push(format!(
                "invalidate of {:#x}..{:#x} ran with the leaf lock held: a read of {probe:#x} \
                 in the same leaf waited 2 s",
                r.start, r.end
            ));
            // One failure per operation is enough.
            self.armed.store(false, Ordering::Release);
        }
    }
}

/// Defect 8c: `invalidate` is never called under a page-table leaf lock (it may sleep):
/// while it runs, a CPU read of another page of the same leaf proceeds. Checked for
/// `migrate_vma_setup` (through a migration to the device), for the insertion of a hole's
/// page by `migrate_vma_pages`, and for `migrate_device_range` (through eviction).
#[test]
fn d08c_invalidate_runs_without_the_leaf_lock() {
    watchdog_for("d08c", Duration::from_secs(20), || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        // One 2 MiB leaf: the migrated ranges and, in a mapping of its own, the probe page.
        let base = VirtAddr(0x2000_0000_0000);
        let (a, h, probe) = (base, base + 16 * PAGE, base + 256 * PAGE);
        for (at, pages) in [(a, 8), (h, 4), (probe, 1)] {
            space.mmap(Some(at), pages * PAGE, Prot::RW, false).unwrap();
        }
        space.write(a, &pattern(8, 16)).unwrap();
        space.write(h, &pattern(2, 17)).unwrap(); // pages 2, 3 of h stay holes
        space.write(probe, &[0x5a]).unwrap();
        let n = Arc::new(LeafProbe {
            space: Mutex::new(Some(space.clone())),
            probe,
            armed: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
        });
        space.register_notifier(n.clone());

        n.armed.store(true, Ordering::Release);
        assert_eq!(dev.migrate_to_device(space, a, 8).unwrap().migrated, 8);
        n.armed.store(false, Ordering::Release);

        let mut src = vec![0u64; 4];
        let mut dst = vec![0u64; 4];
        let mut m = MigrateVma::new(space, h, h + 4 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        n.armed.store(true, Ordering::Release);
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        n.armed.store(false, Ordering::Release);

        n.armed.store(true, Ordering::Release);
        dev.evict_all().unwrap();
        n.armed.store(false, Ordering::Release);

        // The notifier holds the space: let it go.
        *n.space.lock() = None;
        let failures = n.failures.lock().clone();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Defect 9: `GpuDriver::migrate_to_device` of more than `CHUNK_PAGES` pages whose copies
/// fail (injected): whatever it returns, no page of the range is left locked, no migration
/// entry is left, and every page reads back its bytes.
#[test]
fn d09_a_failed_chunk_strands_no_page() {
    watchdog_for("d09", Duration::from_secs(30), || {
        let n = CHUNK_PAGES + 64;
        let g = gpu(MemoryKind::DevicePrivate, n, 16, 256 << 20);
        let mut keep = KeepOnPanic::default();
        g.keep(&mut keep);
        let (pm, d, space) = (&g.pm, &g.d, &g.space);
        let a = map(space, n as u64);
        for p in 0..n as u64 {
            space
                .write(a + p * PAGE, &(p as u32 + 1).to_le_bytes())
                .unwrap();
        }
        let device = d.device();
        let r = device.pfn_range();
        let mut bad = Vec::new();
        for (what, fail) in [
            ("the first chunk", 0..CHUNK_PAGES as u64),
            ("the second chunk", CHUNK_PAGES as u64..r.count),
            ("every chunk", 0..r.count),
        ] {
            let pfns: Vec<Pfn> = fail.map(|i| r.start.add(i)).collect();
            device.inject_copy_failures(&pfns);
            let moved = d.migrate_to_device(space, a, n);
            device.inject_copy_failures(&[]);
            assert!(
                !matches!(moved, Ok(m) if m.migrated == n),
                "copies of {what} failing: the injected failures did not bite"
            );
            let problems = unsettled(space, pm, a, n);
            if !problems.is_empty() {
                bad.push(format!(
                    "copies of {what} failing ({moved:?}): {} problems, first {:?}",
                    problems.len(),
                    &problems[..problems.len().min(4)]
                ));
                continue;
            }
            for p in 0..n as u64 {
                let got = read(space, a + p * PAGE, 4);
                if got != (p as u32 + 1).to_le_bytes() {
                    bad.push(format!("copies of {what} failing: page {p} reads {got:?}"));
                    break;
                }
            }
            d.migrate_to_host(space, a, n).unwrap();
            if d.resident_pages() != 0 {
                bad.push(format!(
                    "copies of {what} failing: {} device pages still in use with the range back on the host",
                    d.resident_pages()
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// Defect 9, the mechanism: a migration dropped with its copy in flight (what a driver's
/// early return does to a chunk it holds) waits for the copy, then restores every page: no
/// page locked, no migration entry, the bytes in place, the destinations freed; the same for
/// a device migration (eviction) dropped mid-copy. The space's mappings can change again
/// once it is dropped.
#[test]
fn d09b_a_migration_dropped_mid_copy_restores_every_page() {
    watchdog_for("d09b", WATCHDOG, || {
        let env = mirror(MemoryKind::DevicePrivate);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 24usize;
        let a = map(space, n as u64);
        let data = pattern(n, 29);
        // Pages 0..20 written, the last 4 holes.
        space.write(a, &data[..20 * 4096]).unwrap();
        let in_use = dev.device().pages_in_use();
        let mut m = Migration::setup(
            space,
            a,
            a + n as u64 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            dev.owner(),
            None,
        )
        .unwrap();
        assert_eq!(m.cpages(), n);
        let idx: Vec<usize> = m.collected().map(|(i, _)| i).collect();
        let pfns = dev.device().alloc_pages(idx.len(), true).unwrap();
        for (&i, &d) in idx.iter().zip(&pfns) {
            pm.claim_device_page(d, true).unwrap().into_pfn();
            m.dst_mut()[i] = migrate_pfn(d);
        }
        let device = dev.device().clone();
        let inflight = m.submit(|pairs| device.copy_queued(pairs));
        drop(inflight);
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "a migration dropped mid-copy: {bad:?}");
        let mut want = data.clone();
        want[20 * 4096..].fill(0);
        let diff = differences(&read(space, a, n * 4096), &want);
        assert!(diff.is_empty(), "bytes differ: {diff:?}");
        assert_eq!(dev.device().pages_in_use(), in_use, "destinations freed");
        for i in 0..n as u64 {
            assert!(
                !matches!(space.pte(a + i * PAGE), Pte::DevicePrivate { .. }),
                "page {i} stayed on the host"
            );
        }

        // Now on the device, and an eviction dropped mid-copy.
        assert_eq!(dev.migrate_to_device(space, a, n).unwrap().migrated, n);
        let range = dev.pgmap.range;
        let mut m = DeviceMigration::range(pm, range.start, range.count as usize).unwrap();
        let idx: Vec<usize> = m.collected().map(|(i, _)| i).collect();
        assert_eq!(idx.len(), n, "every device page collected");
        for &i in &idx {
            let host = pm.alloc_page(false, true).unwrap();
            m.dst_mut()[i] = migrate_pfn(host.into_pfn());
        }
        let inflight = m.submit(|pairs| device.copy(pairs));
        drop(inflight);
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "an eviction dropped mid-copy: {bad:?}");
        for i in 0..n as u64 {
            assert!(
                matches!(space.pte(a + i * PAGE), Pte::DevicePrivate { .. }),
                "page {i} stayed on the device"
            );
        }
        let diff = differences(&read(space, a, n * 4096), &want);
        assert!(diff.is_empty(), "bytes differ after the eviction: {diff:?}");
        space.munmap(a, n as u64 * PAGE).unwrap();
        assert_eq!(dev.device().pages_in_use(), in_use);
    });
}

/// Defect 10a: three threads read one device-private page (GpuDriver) at once: all return
/// its bytes within the watchdog, after a few faults (today each fault sees the others'
/// references, restores the page and retries: hundreds of thousands of faults until the
/// scheduler happens to break the livelock, or forever). To have them at once every time,
/// the test holds the page's lock while the readers start, and lets it go once all three
/// wait for it (or after 200 ms, if they wait some other way).
#[test]
fn d10a_three_readers_of_one_device_page_all_return() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let Gpu { d, space, pm, .. } = g;
    let mut keep = KeepOnPanic::default();
    keep.keep(pm.clone());
    keep.keep(space.clone());
    let a = map(&space, 1);
    let data = pattern(1, 18);
    space.write(a, &data).unwrap();
    for round in 0..3 {
        assert_eq!(d.migrate_to_device(&space, a, 1).unwrap().migrated, 1);
        let faults = d.stats().faults;
        let page = pm.page(space.pte(a).pfn().unwrap()).unwrap();
        let locked = pm.lock_page(page.pfn()).unwrap();
        let refs = page.refcount();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let s = space.clone();
                spawn_watched(move || {
                    let mut v = vec![0u8; 4096];
                    s.read(a, &mut v).map(|()| v)
                })
            })
            .collect();
        let waiting = Instant::now() + Duration::from_millis(200);
        while page.refcount() < refs + 3 && Instant::now() < waiting {
            thread::sleep(Duration::from_millis(1));
        }
        drop(locked);
        let deadline = Instant::now() + WATCHDOG;
        let mut results = Vec::new();
        let mut stuck = Vec::new();
        for r in readers {
            match r.wait(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) => results.push(v),
                Err(w) => stuck.push(w),
            }
        }
        if !stuck.is_empty() {
            // With the driver gone their faults fail, and the stuck readers stop spinning.
            drop(d);
            for w in stuck.drain(..) {
                let _ = w.wait(Duration::from_secs(5));
            }
            panic!(
                "round {round}: 3 readers of one device page, {} of them still faulting after {WATCHDOG:?} (livelock)",
                3 - results.len()
            );
        }
        for r in results {
            let v = r.unwrap_or_else(|e| panic!("round {round}: a reader failed: {e}"));
            assert_eq!(
                differences(&v, &data),
                Vec::<String>::new(),
                "round {round}"
            );
        }
        // Three reads need a few faults, not a livelock that happens to end.
        let faults = d.stats().faults - faults;
        assert!(
            faults <= 30,
            "round {round}: 3 reads of one device page took {faults} faults (a livelock until the scheduler broke it)"
        );
    }
}

/// Defect 10b: a CPU read of a device-private page whose copy back to host fails
/// (injected) returns an error within the watchdog instead of retrying forever; once copies
/// work again, it returns the page's bytes.
#[test]
fn d10b_a_fault_whose_copy_fails_returns_an_error() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 1);
    let data = pattern(1, 19);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 1).unwrap().migrated, 1);
    let device = g.d.device().clone();
    device.inject_copy_failures(&all_frames(&g.pool));
    let s = g.space.clone();
    let reader = spawn_watched(move || {
        let mut v = vec![0u8; 16];
        s.read(a, &mut v).map(|()| v)
    });
    let r = reader.wait(WATCHDOG);
    device.inject_copy_failures(&[]);
    let r = match r {
        Ok(r) => r,
        Err(stuck) => {
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a CPU read whose copy back fails did not return within {WATCHDOG:?}: it retries forever");
        }
    };
    assert!(r.is_err(), "a read whose copy back failed returned {r:?}");
    let s = g.space.clone();
    let got = watchdog("d10b: a read once copies work", move || read(&s, a, 4096));
    assert_eq!(differences(&got, &data), Vec::<String>::new());
}
