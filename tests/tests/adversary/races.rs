//! Sections 7 to 12: evictions racing a dying space, notifiers calling back in, inputs that
//! panicked, dropping the driver, a destination named twice, many threads on one page,
//! mirrors and long-term pins.

use super::*;

// ---------------------------------------------------------------------------------------
// 7. More of the dying-space race, without a sleeping notifier.
// ---------------------------------------------------------------------------------------

/// The natural form of `bug_dying_space_device_restore_releases_mapped_page`: evictions that
/// cannot get host frames (so they restore) race with the drop of the space that maps the
/// pages (a large teardown takes a while).
#[test]
fn bug_evict_restore_races_space_drop() {
    watchdog_for("evict vs space drop", Duration::from_secs(30), || {
        let mut hit = None;
        for round in 0..20 {
            let g = gpu(MemoryKind::DevicePrivate, 2048, 1, SMALL_POOL);
            let space = g.space.clone();
            drop(g.space);
            let n = 2048u64;
            let a = map(&space, n);
            for k in 0..n {
                space.write(a + k * PAGE, &[k as u8 | 1; 8]).unwrap();
            }
            g.d.migrate_to_device(&space, a, n as usize).unwrap();
            // No host frame left: every eviction restores.
            let hog = g.pool.alloc_batch(g.pool.available(), false).unwrap();
            let d = g.d.clone();
            let stop = Arc::new(AtomicBool::new(false));
            let evictor = {
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = d.evict(64);
                    }
                })
            };
            thread::sleep(Duration::from_millis(5));
            drop(space);
            stop.store(true, Ordering::Relaxed);
            let r = evictor.join();
            g.pool.free_batch(&hog).unwrap();
            if let Err(p) = r {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                hit = Some(format!("round {round}: evictor panicked: {msg}"));
                std::mem::forget((g.pm, g.d, g.pool));
                break;
            }
        }
        assert!(hit.is_none(), "{hit:?}");
    });
}

// ---------------------------------------------------------------------------------------
// 8. Notifiers that call back into the space.
// ---------------------------------------------------------------------------------------

/// A mirror that reads the space from its `invalidate` (to save what the device holds before
/// dropping it, say). During a migration that is fine (the map lock is shared and recursive),
/// but `munmap`, `mprotect`, `mremap` and `fork` call notifiers with the map lock held
/// exclusively, and a read from the notifier waits for that lock forever: a hang rather than
/// `MigrationInProgress` (which the space gives a thread that holds the lock shared).
#[test]
fn bug_notifier_reading_space_in_munmap_hangs() {
    struct Reader {
        space: parking_lot::Mutex<Option<AddressSpace>>,
        addr: VirtAddr,
        result: parking_lot::Mutex<Vec<String>>,
    }
    impl Notifier for Reader {
        fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
            let s = self.space.lock().clone();
            if let Some(s) = s {
                let mut b = [0u8; 8];
                let res = s.read(self.addr, &mut b);
                self.result.lock().push(format!("{:?}: {res:?}", r.event));
            }
        }
    }
    let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
    let a = map(&g.space, 2);
    g.space.write(a, &[1; 8]).unwrap();
    let n = Arc::new(Reader {
        space: parking_lot::Mutex::new(Some(g.space.clone())),
        addr: a,
        result: Default::default(),
    });
    let id = g.space.register_notifier(n.clone());
    // A migration's invalidation: the read works.
    g.d.migrate_to_device(&g.space, a, 1).unwrap();
    eprintln!("after migrate: {:?}", n.result.lock());
    let space = g.space.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        watchdog_for(
            "munmap with a reading notifier",
            Duration::from_secs(3),
            move || space.munmap(a + PAGE, PAGE),
        )
    }));
    // Let the stuck thread go is impossible; unhook the notifier for the record.
    *n.space.lock() = None;
    let _ = g.space.unregister_notifier(id);
    if let Err(p) = r {
        std::mem::forget(g);
        std::panic::resume_unwind(p);
    }
}

// ---------------------------------------------------------------------------------------
// 9. Bad input that panics instead of failing.
// ---------------------------------------------------------------------------------------

/// `migrate_to_device(space, addr, npages)` with a huge page count overflows
/// `npages as u64 * PAGE` (a debug panic) instead of failing with an error.
#[test]
fn bug_huge_npages_overflows() {
    watchdog("huge npages", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.d.migrate_to_device(&g.space, a, usize::MAX / 2)
                .map(|_| ())
        }));
        match r {
            Ok(Err(_)) => {}
            Ok(Ok(())) => panic!("a huge migration succeeded"),
            Err(_) => panic!("migrate_to_device with a huge page count panicked"),
        }
    });
}

// ---------------------------------------------------------------------------------------
// 10. Dropping the driver.
// ---------------------------------------------------------------------------------------

/// Dropping the last `GpuDriver` handle while pages are on its device: the driver does not
/// evict them (its `Drop` only clears the LRU), so their bytes are gone, and a CPU access
/// fails with `FaultFailed` ("driver gone"), which `kind()` calls `Transient` ("may pass on
/// retry"): it never will.
#[test]
fn bug_driver_drop_loses_device_pages() {
    watchdog("driver drop", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        let data = pattern(1, 9);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let Gpu {
            pool: _pool,
            pm: _pm,
            d,
            space,
        } = g;
        drop(d);
        let mut got = vec![0u8; 4096];
        let r = space.read(a, &mut got);
        assert!(
            r.is_ok() && got == data,
            "read after the driver was dropped: {r:?} (kind {:?})",
            r.as_ref().err().map(|e| e.kind())
        );
    });
}

// ---------------------------------------------------------------------------------------
// 11. A destination named twice.
// ---------------------------------------------------------------------------------------

/// A driver names the same (live, locked, unmapped) page as the destination of two entries.
/// `migrate_vma_pages` refuses it (`PageInUse`, "nothing changed"), and the migration is
/// dropped, "which restores every page": but the abandon step keeps every destination that is
/// live, locked and unmapped, so the page is released twice (a second unlock, a second put).
#[test]
fn bug_duplicate_dst_is_released_twice() {
    watchdog("duplicate dst", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 2);
        let data = pattern(2, 11);
        g.space.write(a, &data).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut m = Migration::setup(
                &g.space,
                a,
                a + 2 * PAGE,
                MIGRATE_VMA_SELECT_SYSTEM,
                g.d.owner(),
                None,
            )
            .unwrap();
            assert_eq!(m.cpages(), 2);
            let x = g.d.device().alloc_page(true).unwrap();
            g.pm.claim_device_page(x, true).unwrap().into_pfn();
            m.dst_mut()[0] = migrate_pfn(x);
            m.dst_mut()[1] = migrate_pfn(x);
            m.copied().map(|_| ())
        }));
        match r {
            Ok(Err(Error::PageInUse(_))) => {}
            Ok(other) => panic!("a destination named twice: {other:?}"),
            Err(p) => std::panic::resume_unwind(p),
        }
        assert_eq!(read(&g.space, a, 8192), data);
        assert_eq!(g.d.resident_pages(), 0);
    });
}

// ---------------------------------------------------------------------------------------
// 12. Many threads on one device page; mirrors; long-term pins of coherent memory.
// ---------------------------------------------------------------------------------------

/// Four threads in three address spaces (a parent and two fork children) read the same
/// device page while another thread keeps sending it back to the device and evicting it.
#[test]
fn held_many_faulters_one_page() {
    watchdog_for("many faulters", Duration::from_secs(30), || {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let g = gpu(mem, 64, 4, SMALL_POOL);
            let a = map(&g.space, 4);
            let data = pattern(4, 12);
            g.space.write(a, &data).unwrap();
            let kids = [g.space.fork().unwrap(), g.space.fork().unwrap()];
            let stop = Arc::new(AtomicBool::new(false));
            let errors = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
            let mut hs = Vec::new();
            let spaces = [
                g.space.clone(),
                kids[0].clone(),
                kids[1].clone(),
                g.space.clone(),
            ];
            for (t, s) in spaces.into_iter().enumerate() {
                let (stop, errors, data) = (stop.clone(), errors.clone(), data.clone());
                hs.push(thread::spawn(move || {
                    let mut got = vec![0u8; 4096];
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let k = (n % 4) as usize;
                        n += 1;
                        match s.read(a + k as u64 * PAGE, &mut got) {
                            Ok(()) if got == data[k * 4096..(k + 1) * 4096] => {}
                            Ok(()) => errors
                                .lock()
                                .push(format!("thread {t} page {k}: wrong bytes")),
                            Err(e) if benign(&e) => {}
                            Err(e) => errors.lock().push(format!("thread {t}: {e:?}")),
                        }
                    }
                    n
                }));
            }
            {
                let (stop, errors, g, kids) =
                    (stop.clone(), errors.clone(), g.clone(), kids.clone());
                hs.push(thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let s = if n.is_multiple_of(3) {
                            &g.space
                        } else {
                            &kids[(n % 2) as usize]
                        };
                        if let Err(e) = g.d.migrate_to_device(s, a, 4) {
                            if !benign(&e) {
                                errors.lock().push(format!("migrate: {e:?}"));
                            }
                        }
                        if n.is_multiple_of(5) {
                            let _ = g.d.evict_all();
                        }
                    }
                    n
                }));
            }
            thread::sleep(Duration::from_secs(2));
            stop.store(true, Ordering::Relaxed);
            let counts = join_all("many faulters", hs, Duration::from_secs(10));
            eprintln!("{mem:?}: {counts:?} {:?}", g.d.stats());
            let e = errors.lock().clone();
            assert!(e.is_empty(), "{e:#?}");
            for s in [&g.space, &kids[0], &kids[1]] {
                assert!(unsettled(s, &g.pm, a, 4).is_empty());
                assert_eq!(read(s, a, 4 * 4096), data);
            }
        }
    });
}

/// A mirror builds its view with `read_begin` / `hmm_range_fault` / frame reads /
/// `read_retry` while the pages migrate and are evicted: whenever `read_retry` says the view
/// is good, every byte it read must be right.
#[test]
fn held_mirror_views_are_never_stale() {
    watchdog_for("mirror views", Duration::from_secs(30), || {
        let g = gpu(MemoryKind::DevicePrivate, 8, 2, SMALL_POOL);
        let a = map(&g.space, 8);
        let data = pattern(8, 13);
        g.space.write(a, &data).unwrap();
        // A second space churns the device so that freed device pages get reused.
        let other = AddressSpace::new(&g.pm);
        let o = map(&other, 8);
        other.write(o, &pattern(8, 99)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let (g, stop, other) = (g.clone(), stop.clone(), other.clone());
            thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let _ =
                        g.d.migrate_to_device(&g.space, a + (n % 8) * PAGE, 1 + (n % 3) as usize);
                    let _ = g.d.migrate_to_device(&other, o + (n % 8) * PAGE, 2);
                    if n.is_multiple_of(7) {
                        let _ = g.d.migrate_to_host(&g.space, a, 8);
                    }
                    let mut b = [0u8; 8];
                    let _ = g.space.read(a + (n * 3 % 8) * PAGE, &mut b);
                    let _ = other.read(o + (n % 8) * PAGE, &mut b);
                }
            })
        };
        let owner = g.d.owner();
        let dev = g.d.device().clone();
        let t0 = Instant::now();
        let (mut good, mut retried) = (0u64, 0u64);
        let mut bad = Vec::new();
        while t0.elapsed() < Duration::from_secs(3) {
            let seq = g.space.read_begin();
            let pfns = match hetmem::mm::hmm_range_fault(&g.space, a, 8, false, owner) {
                Ok(p) => p,
                Err(e) => {
                    assert!(benign(&e), "{e:?}");
                    continue;
                }
            };
            let mut view = vec![0u8; 8 * 4096];
            let mut ok = true;
            for (k, h) in pfns.iter().enumerate() {
                let out = &mut view[k * 4096..(k + 1) * 4096];
                let r = if dev.owns(h.pfn) {
                    dev.read_page(h.pfn, 0, out).map_err(Error::from)
                } else {
                    g.pm.read_frame(h.pfn, 0, out)
                };
                ok &= r.is_ok();
            }
            if g.space.read_retry(seq) || !ok {
                retried += 1;
                continue;
            }
            good += 1;
            if view != data {
                let k = (0..8)
                    .find(|&k| view[k * 4096..(k + 1) * 4096] != data[k * 4096..(k + 1) * 4096]);
                bad.push(format!("view {good}: page {k:?} stale"));
            }
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
        eprintln!("{good} good views, {retried} retried");
        assert!(bad.is_empty(), "{bad:?}");
    });
}

/// Long-term pins of device-coherent pages race with migrations of the same range to the
/// device and CPU writes; every pin must hold system pages, and bytes must survive.
#[test]
fn held_longterm_pins_vs_coherent_migration() {
    watchdog_for("longterm pins", Duration::from_secs(30), || {
        let g = gpu(MemoryKind::DeviceCoherent, 16, 1, SMALL_POOL);
        let a = map(&g.space, 4);
        let data = pattern(4, 14);
        g.space.write(a, &data).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (g, stop) = (g.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = g.d.migrate_to_device(&g.space, a, 4);
                    let _ = g.d.evict(2);
                }
            })
        };
        let t0 = Instant::now();
        let mut errs = std::collections::BTreeMap::<String, usize>::new();
        let mut pinned = 0;
        while t0.elapsed() < Duration::from_secs(2) {
            match pin_pages_longterm(&g.space, a, 4, false) {
                Ok(pin) => {
                    pinned += 1;
                    for (k, &pfn) in pin.pfns().iter().enumerate() {
                        let p = g.pm.page(pfn).unwrap();
                        assert_eq!(
                            p.kind(),
                            MemoryKind::System,
                            "page {k} pinned long-term on the device"
                        );
                        let mut b = vec![0u8; 4096];
                        g.pm.read_frame(pfn, 0, &mut b).unwrap();
                        assert_eq!(b, data[k * 4096..(k + 1) * 4096], "pinned page {k} bytes");
                    }
                    drop(pin);
                }
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Transient | ErrorKind::OutOfMemory),
                        "{e:?}"
                    );
                    *errs
                        .entry(format!("{e:?}").chars().take(12).collect())
                        .or_default() += 1;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        mover.join().unwrap();
        eprintln!("{pinned} long-term pins, errors {errs:?}");
        assert_eq!(read(&g.space, a, 4 * 4096), data);
        assert!(unsettled(&g.space, &g.pm, a, 4).is_empty());
    });
}
