//! Sections 13 to 16: leaf boundaries and mremap flags, owning types dropped at every state,
//! raw API misuse, notifier re-entry, pins after fork, two devices, the test driver.

use super::*;

// ---------------------------------------------------------------------------------------
// 13. Leaf boundaries, mremap flags, leaks.
// ---------------------------------------------------------------------------------------

/// Ranges that straddle page-table leaves, moved by mremap (plain, `dont_unmap`,
/// `fixed_replace`) to addresses with other leaf offsets while their pages are on the device,
/// half-migrated, or under eviction; bytes and frame counts are checked at the end.
#[test]
fn held_mremap_flags_across_leaves() {
    watchdog_for("mremap across leaves", Duration::from_secs(30), || {
        let g = gpu(MemoryKind::DevicePrivate, 256, 16, SMALL_POOL);
        let leaf = 512 * PAGE;
        let base = VirtAddr(0x10_0000_0000);
        let n = 40u64;
        let a = base + leaf - 7 * PAGE;
        g.space.mmap(Some(a), n * PAGE, Prot::RW, false).unwrap();
        let mut data = pattern(n as usize, 15);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a + 3 * PAGE, 20).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let evictor = {
            let (g, stop) = (g.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = g.d.evict(5);
                    thread::yield_now();
                }
            })
        };
        let mut at = a;
        let targets = [
            base + 3 * leaf + 100 * PAGE,
            base + 5 * leaf - 3 * PAGE,
            base + 8 * leaf,
            base + 11 * leaf - 39 * PAGE,
        ];
        for round in 0..200 {
            let to = targets[round % targets.len()];
            let flags = MremapFlags {
                fixed_replace: round % 3 == 0,
                dont_unmap: round % 5 == 0,
            };
            if flags.fixed_replace && g.space.vma(to).is_none() {
                // Something to replace.
                g.space.mmap(Some(to), 3 * PAGE, Prot::RW, false).unwrap();
                g.space.write(to, &[0xaa; 8]).unwrap();
            }
            if !flags.fixed_replace && g.space.vma(to).is_some() {
                g.space.munmap(to, n * PAGE).unwrap();
            }
            g.space.mremap_with(at, n * PAGE, to, flags).unwrap();
            if flags.dont_unmap {
                // The old range stays, empty.
                assert_eq!(read(&g.space, at, 16), vec![0; 16], "round {round}");
                g.space.munmap(at, n * PAGE).unwrap();
            }
            at = to;
            // Touch some pages, send some to the device.
            let k = (round as u64 * 7) % n;
            g.space.write(at + k * PAGE, &[round as u8; 16]).unwrap();
            data[(k * PAGE) as usize..(k * PAGE) as usize + 16].fill(round as u8);
            let s = (round as u64 * 13) % (n - 10);
            g.d.migrate_to_device(&g.space, at + s * PAGE, 10).unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        evictor.join().unwrap();
        assert_eq!(read(&g.space, at, (n * PAGE) as usize), data);
        assert!(unsettled(&g.space, &g.pm, at, n as usize).is_empty());
        let Gpu { pool, pm, d, space } = g;
        drop(space);
        let left = (d.resident_pages(), pool.in_use());
        drop((d, pm));
        assert_eq!(left, (0, 1), "device pages / host frames left");
    });
}

// ---------------------------------------------------------------------------------------
// 14. Owning types dropped at every state; raw API misuse; notifier re-entry.
// ---------------------------------------------------------------------------------------

fn check_space(g: &Gpu, a: VirtAddr, n: usize, data: &[u8], what: &str) {
    let bad = unsettled(&g.space, &g.pm, a, n);
    assert!(bad.is_empty(), "{what}: {bad:?}");
    assert_eq!(read(&g.space, a, n * 4096), data, "{what}: bytes");
}

/// Long: one case per state an owning type can be dropped in, over one fixture; each case is a
/// few lines.
#[test]
fn held_owning_types_dropped_at_every_state() {
    watchdog_for("drop at every state", Duration::from_secs(30), || {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let g = gpu(mem, 64, 1, SMALL_POOL);
            let n = 6usize;
            let a = map(&g.space, n as u64 + 2);
            let data = pattern(n, 16);
            g.space.write(a, &data).unwrap();
            // A hole at the end, to be migrated as well.
            let full = {
                let mut d = data.clone();
                d.extend(vec![0u8; 2 * 4096]);
                d
            };
            let np = n + 2;
            for to_device in [true, false] {
                if !to_device {
                    g.d.migrate_to_device(&g.space, a, np).unwrap();
                }
                for state in 0..4 {
                    let what = format!("{mem:?} to_device={to_device} state={state}");
                    let (flags, dev) = if to_device {
                        (MIGRATE_VMA_SELECT_SYSTEM, true)
                    } else {
                        (
                            MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT,
                            false,
                        )
                    };
                    let mut m = Migration::setup(
                        &g.space,
                        a,
                        a + np as u64 * PAGE,
                        flags,
                        g.d.owner(),
                        None,
                    )
                    .unwrap();
                    let want: Vec<(usize, Option<Pfn>)> = m.collected().collect();
                    let dsts: Vec<Pfn> = if dev {
                        let v = g.d.device().alloc_pages(want.len(), true).unwrap();
                        for &p in &v {
                            g.pm.claim_device_page(p, true).unwrap().into_pfn();
                        }
                        v
                    } else {
                        (0..want.len())
                            .map(|_| g.pm.alloc_page(true, true).unwrap().into_pfn())
                            .collect()
                    };
                    for (&(i, _), &d) in want.iter().zip(&dsts) {
                        m.dst_mut()[i] = migrate_pfn(d);
                    }
                    // A reader waits on the migration entries meanwhile.
                    let reader = {
                        let s = g.space.clone();
                        thread::spawn(move || {
                            let mut v = vec![0u8; 4096];
                            s.read(a, &mut v).map(|_| v)
                        })
                    };
                    match state {
                        0 => drop(m),
                        1 => {
                            let dev = g.d.device().clone();
                            let f = m.submit(|p| dev.copy_queued(p));
                            drop(f)
                        }
                        2 => {
                            let dev = g.d.device().clone();
                            let c = m.submit(|p| dev.copy(p)).wait().unwrap();
                            drop(c)
                        }
                        _ => {
                            let dev = g.d.device().clone();
                            let c = m.submit(|p| dev.copy(p)).wait().unwrap();
                            let o = c.finalize();
                            assert_eq!(o.migrated, want.len(), "{what}");
                        }
                    }
                    let r = reader.join().unwrap().unwrap();
                    assert_eq!(r, data[..4096], "{what}: the waiting reader");
                    check_space(&g, a, np, &full, &what);
                    // Put the pages back where the next round wants them.
                    if to_device {
                        let _ = g.d.migrate_to_host(&g.space, a, np).unwrap();
                    } else {
                        let _ = g.d.migrate_to_device(&g.space, a, np).unwrap();
                    }
                    check_space(&g, a, np, &full, &what);
                }
            }
            // Device migrations dropped at each state.
            g.d.migrate_to_device(&g.space, a, np).unwrap();
            for state in 0..4 {
                let what = format!("{mem:?} device state={state}");
                let pfns: Vec<Pfn> = (0..np)
                    .map(|k| g.space.pte(a + k as u64 * PAGE).pfn().unwrap())
                    .collect();
                let mut m = DeviceMigration::pfns(&g.pm, &pfns).unwrap();
                let want: Vec<usize> = m.collected().map(|(i, _)| i).collect();
                assert_eq!(want.len(), np, "{what}");
                for &i in &want {
                    m.dst_mut()[i] = migrate_pfn(g.pm.alloc_page(false, true).unwrap().into_pfn());
                }
                let dev = g.d.device().clone();
                match state {
                    0 => drop(m),
                    1 => drop(m.submit(|p| dev.copy_queued(p))),
                    2 => drop(m.submit(|p| dev.copy(p)).wait().unwrap()),
                    _ => {
                        let o = m.submit(|p| dev.copy(p)).wait().unwrap().finalize();
                        assert_eq!(o.migrated, np);
                    }
                }
                check_space(&g, a, np, &full, &what);
                let _ = g.d.migrate_to_device(&g.space, a, np).unwrap();
            }
            let Gpu { pool, pm, d, space } = g;
            drop(space);
            let left = (d.resident_pages(), pool.in_use());
            drop((d, pm));
            assert_eq!(left, (0, 1), "{mem:?}: device pages / host frames left");
        }
    });
}

#[test]
fn held_raw_api_misuse() {
    watchdog("raw misuse", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 2);
        let data = pattern(2, 17);
        g.space.write(a, &data).unwrap();
        let mut src = [0u64; 2];
        let mut dst = [0u64; 2];
        let mut m = MigrateVma::new(&g.space, a, a + 2 * PAGE, &mut src, &mut dst);
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        assert_eq!(
            migrate_vma_pages(&mut m).unwrap_err().kind(),
            ErrorKind::Misuse
        );
        migrate_vma_finalize(&mut m);
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(
            migrate_vma_setup(&mut m).unwrap_err().kind(),
            ErrorKind::Misuse
        );
        // munmap on this thread: refused, not a deadlock.
        assert!(matches!(
            g.space.munmap(a, PAGE),
            Err(Error::MigrationInProgress)
        ));
        let x = g.d.device().alloc_pages(2, true).unwrap();
        for (i, &p) in x.iter().enumerate() {
            g.pm.claim_device_page(p, true).unwrap().into_pfn();
            m.dst[i] = migrate_pfn(p);
        }
        g.d.device()
            .copy(&[
                (migrate_pfn_to_pfn(m.src[0]).unwrap(), x[0]),
                (migrate_pfn_to_pfn(m.src[1]).unwrap(), x[1]),
            ])
            .unwrap()
            .wait()
            .unwrap();
        migrate_vma_pages(&mut m).unwrap();
        assert_eq!(
            migrate_vma_pages(&mut m).unwrap_err().kind(),
            ErrorKind::Misuse
        );
        migrate_vma_finalize(&mut m);
        migrate_vma_finalize(&mut m);
        drop(m);
        assert_eq!(read(&g.space, a, 8192), data);
        assert!(unsettled(&g.space, &g.pm, a, 2).is_empty());
        g.space.munmap(a, 2 * PAGE).unwrap();
        assert_eq!(g.d.resident_pages(), 0);
    });
}

/// `migrate_device_finalize` called twice on the same arrays (the vma flavour makes a second
/// finalize a no-op; the device flavour is documented as "as `migrate_vma_finalize`").
#[test]
fn bug_device_finalize_twice_double_releases() {
    watchdog("device finalize twice", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        let data = pattern(1, 18);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let pfn = dev_pfn(&g.space, a);
        let mut src = [0u64; 1];
        migrate_device_range(&g.pm, &mut src, pfn, 1).unwrap();
        let host = g.pm.alloc_page(false, true).unwrap().into_pfn();
        let mut dst = [migrate_pfn(host)];
        g.d.device().copy(&[(pfn, host)]).unwrap().wait().unwrap();
        migrate_device_pages(&g.pm, &mut src, &dst).unwrap();
        migrate_device_finalize(&g.pm, &mut src, &mut dst);
        assert_eq!(read(&g.space, a, 4096), data);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst)
        }));
        std::mem::forget(g);
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
}

/// Notifiers that register and unregister notifiers, and read other spaces, from inside
/// `invalidate`, during migrations, evictions, mprotect and fork.
#[test]
fn held_notifier_reentry() {
    struct Meddler {
        space: AddressSpace,
        other: AddressSpace,
        other_addr: VirtAddr,
        ids: parking_lot::Mutex<Vec<hetmem::mm::NotifierId>>,
        calls: AtomicUsize,
    }
    impl Notifier for Meddler {
        fn invalidate(&self, _: SpaceId, _r: &NotifyRange) {
            let c = self.calls.fetch_add(1, Ordering::Relaxed);
            if c.is_multiple_of(2) {
                struct Nop;
                impl Notifier for Nop {
                    fn invalidate(&self, _: SpaceId, _: &NotifyRange) {}
                }
                let id = self.space.register_notifier(Arc::new(Nop));
                self.ids.lock().push(id);
            } else if let Some(id) = self.ids.lock().pop() {
                assert!(self.space.unregister_notifier(id));
            }
            let mut b = [0u8; 8];
            let _ = self.other.read(self.other_addr, &mut b);
            let _ = self.space.invalidate_seq();
        }
    }
    watchdog("notifier re-entry", || {
        let g = gpu(MemoryKind::DevicePrivate, 16, 2, SMALL_POOL);
        let other = AddressSpace::new(&g.pm);
        let o = map(&other, 1);
        other.write(o, &[3; 8]).unwrap();
        g.d.migrate_to_device(&other, o, 1).unwrap();
        let a = map(&g.space, 8);
        let data = pattern(8, 19);
        g.space.write(a, &data).unwrap();
        let m = Arc::new(Meddler {
            space: g.space.clone(),
            other: other.clone(),
            other_addr: o,
            ids: Default::default(),
            calls: AtomicUsize::new(0),
        });
        let id = g.space.register_notifier(m.clone());
        for round in 0..50 {
            g.d.migrate_to_device(&g.space, a, 8).unwrap();
            let _ = g.d.evict(3);
            g.space
                .mprotect(
                    a,
                    8 * PAGE,
                    if round % 2 == 0 { Prot::READ } else { Prot::RW },
                )
                .unwrap();
            let child = g.space.fork().unwrap();
            assert_eq!(read(&child, a, 8 * 4096), data);
            drop(child);
            g.d.migrate_to_device(&other, o, 1).unwrap();
        }
        assert!(g.space.unregister_notifier(id));
        assert_eq!(read(&g.space, a, 8 * 4096), data);
        eprintln!("{} notifier calls", m.calls.load(Ordering::Relaxed));
    });
}

// ---------------------------------------------------------------------------------------
// 15. Pins after fork; two devices.
// ---------------------------------------------------------------------------------------

/// A read pin taken after fork pins the page the parent shares with its child; the parent's
/// next CPU write copies the page (copy-on-write) and the pin keeps the old one: the device
/// that holds the pin no longer sees the parent's memory (Linux unshares on a read
/// `FOLL_PIN` of a shared anonymous page for exactly this reason).
#[test]
fn bug_read_pin_after_fork_goes_stale() {
    watchdog("pin after fork", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        g.space.write(a, &[1; 4096]).unwrap();
        let child = g.space.fork().unwrap();
        let pin = pin_pages(&g.space, a, 1, false, true).unwrap();
        g.space.write(a, &[2; 4096]).unwrap();
        let mut seen = vec![0u8; 4096];
        g.pm.read_frame(pin.pfns()[0], 0, &mut seen).unwrap();
        let now = g.space.pte(a).pfn();
        drop(pin);
        drop(child);
        assert_eq!(
            seen[0], 2,
            "the pinned frame no longer backs the parent's page (which is now {now:?})"
        );
    });
}

/// Two drivers over one page map: pages on device A are not brought to device B by B's
/// `pin_on_device` (its migration selects system pages only), which retries and reports
/// `Busy` (Transient, "may pass on retry"), though no retry can help.
#[test]
fn bug_pin_on_device_of_other_devices_page() {
    watchdog("two devices", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let dev_b = host_device(64, &g.pool);
        let b = GpuDriver::new(
            dev_b,
            &g.pm,
            DriverConfig {
                budget_pages: Some(64),
                ..DriverConfig::default()
            },
        )
        .unwrap();
        let a = map(&g.space, 1);
        g.space.write(a, &[5; 4096]).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let moved = b.migrate_to_device(&g.space, a, 1).unwrap();
        eprintln!("B's migrate_to_device of A's page: {moved:?}");
        let r = b.pin_on_device(&g.space, a, 1).map(|p| p.pfns().to_vec());
        assert!(r.is_ok(), "pin_on_device of another device's page: {r:?}");
    });
}

/// The device budget is full and eviction cannot get host frames: `pin_on_device` retries
/// and fails with `Busy` (Transient), and `migrate_to_device` returns `Ok` with nothing
/// moved; the cause is out of memory ("Out of memory is an error, not a loop ... typed
/// OutOfMemory").
#[test]
fn bug_full_device_and_no_host_frames_is_busy_not_oom() {
    watchdog("full device, no host frames", || {
        let g = gpu(MemoryKind::DevicePrivate, 4, 1, SMALL_POOL);
        let a = map(&g.space, 4);
        g.space.write(a, &[1; 4 * 4096]).unwrap();
        g.d.migrate_to_device(&g.space, a, 4).unwrap();
        let b = map(&g.space, 1);
        g.space.write(b, &[2; 4096]).unwrap();
        let hog = g.pool.alloc_batch(g.pool.available(), false).unwrap();
        let m = g.d.migrate_to_device(&g.space, b, 1);
        let p = g.d.pin_on_device(&g.space, b, 1).map(|_| ());
        g.pool.free_batch(&hog).unwrap();
        eprintln!("migrate_to_device: {m:?}; pin_on_device: {p:?}");
        assert!(
            p.as_ref().err().map(|e| e.kind()) == Some(ErrorKind::OutOfMemory),
            "pin_on_device with no room and no host frames to evict to: {p:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 16. The test driver (tests/src/dmirror.rs), not the library.
// ---------------------------------------------------------------------------------------

/// `Dmirror::device_write` writes through the frames `hmm_range_fault` returned and only then
/// checks the invalidation sequence: a write that raced a migration lands in a frame that
/// was freed meanwhile, and that frame may already back another page (here another space's).
#[test]
fn testdriver_dmirror_device_write_hits_freed_frames() {
    watchdog_for("dmirror stale write", Duration::from_secs(30), || {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let device = host_device(256, &pool);
        let pm = PageMap::new(pool).unwrap();
        let dev = Arc::new(Dmirror::new(device, MemoryKind::DevicePrivate, &pm));
        let s1 = AddressSpace::new(&pm);
        let x = map(&s1, 1);
        s1.write(x, &[1; 4096]).unwrap();
        let s2 = AddressSpace::new(&pm);
        let y = map(&s2, 16);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (dev, s1, stop) = (dev.clone(), s1.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = dev.device_write(&s1, x, &[0xd1; 4096]);
                }
            })
        };
        let mover = {
            let (dev, s1, stop) = (dev.clone(), s1.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = dev.migrate_to_device(&s1, x, 1);
                    let _ = dev.migrate_to_system(&s1, x, 1);
                }
            })
        };
        let t0 = Instant::now();
        let mut found = None;
        let mut n = 0u8;
        'outer: while t0.elapsed() < Duration::from_secs(3) {
            n = n.wrapping_add(1) | 1;
            // Fresh frames for s2: unmap and write again.
            s2.munmap(y, 16 * PAGE).unwrap();
            s2.mmap(Some(y), 16 * PAGE, Prot::RW, false).unwrap();
            s2.write(y, &vec![n; 16 * 4096]).unwrap();
            thread::yield_now();
            let got = read(&s2, y, 16 * 4096);
            if let Some(i) = got.iter().position(|&b| b != n) {
                found = Some(format!("s2 byte {i} is {:#x}, want {n:#x}", got[i]));
                break 'outer;
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        mover.join().unwrap();
        assert!(
            found.is_none(),
            "another space's page was written: {found:?}"
        );
    });
}
