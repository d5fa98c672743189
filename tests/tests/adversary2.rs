//! Second adversarial round: attacks on the mechanisms the first round's fixes added (the
//! reverse-map walk bit, a dying space's page tables, the per-thread map lock, waiting
//! without a reference, read pins that unshare, the driver's teardown, the owning migration
//! types). Each test failed before its fix, or held from the start (`walk_vs_*`,
//! `driver_drop_races_faults`, `fork_out_of_frames_half_way`, `pin_on_device_read_only_*`,
//! the coherent read pin).

#![allow(clippy::type_complexity)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hetmem::migration::*;
use hetmem::mm::{flags, pin_pages, AddressSpace, MemoryKind, Prot, Pte, PAGE};
use hetmem::ErrorKind;

use hetmem_tests::harness::*;

// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// A. A tolerated second `migrate_device_finalize` meets a later migration of the same page.
// ---------------------------------------------------------------------------------------

/// An eviction is abandoned (finalize restores the device page D); the caller calls
/// `migrate_device_finalize` a second time on the same arrays (tolerated, per the docs),
/// but only after another eviction has collected D, copied it to host page H2 and passed its
/// pages stage. The second finalize takes "D is locked" to mean "D is mine": it restores D's
/// entries (the data now lives in H2 per the other migration), unlocks D and drops a
/// reference; the other migration's finalize then skips D (unlocked): H2 stays LOCKED.
#[test]
fn device_finalize_twice_steals_later_migration() {
    watchdog("second finalize vs later eviction", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        let data = pattern(1, 21);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let d = dev_pfn(&g.space, a);
        let frames0 = g.pool.in_use();
        // First eviction: collected, no destination, finalized (restore).
        let mut src = [migrate_pfn(d)];
        assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
        let mut dst = [0u64];
        migrate_device_pages(&g.pm, &mut src, &dst).unwrap();
        migrate_device_finalize(&g.pm, &mut src, &mut dst);
        assert!(matches!(g.space.pte(a), Pte::DevicePrivate { .. }));
        // Second eviction, through the owning type, up to its pages stage.
        let mut m2 = DeviceMigration::pfns(&g.pm, &[d]).unwrap();
        assert_eq!(m2.cpages(), 1);
        let h2pfn = g.pm.alloc_page(false, true).unwrap().into_pfn();
        g.d.device().copy(&[(d, h2pfn)]).unwrap().wait().unwrap();
        m2.dst_mut()[0] = migrate_pfn(h2pfn);
        let m2 = m2.copied().unwrap();
        // The tolerated second finalize of the first eviction's arrays.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst)
        }));
        let out = m2.finalize();
        eprintln!(
            "second finalize: {:?}; m2 outcome {out:?}; pte {:?}",
            r.is_ok(),
            g.space.pte(a)
        );
        let h2_locked = g.pm.page(h2pfn).unwrap().test(flags::LOCKED);
        let h2_ref = g.pm.page(h2pfn).unwrap().refcount();
        let bad = unsettled(&g.space, &g.pm, a, 1);
        if let Err(p) = r {
            std::mem::forget(g);
            std::panic::resume_unwind(p);
        }
        assert!(bad.is_empty(), "{bad:?}");
        assert!(
            !h2_locked,
            "the later eviction's destination {h2pfn} is left LOCKED (refcount {h2_ref})"
        );
        assert_eq!(read(&g.space, a, 4096), data);
        g.space.munmap(a, PAGE).unwrap();
        assert_eq!(g.d.resident_pages(), 0, "device pages leaked");
        assert_eq!(g.pool.in_use(), frames0, "host frames leaked");
    });
}

/// As above, but the first eviction migrated D away (D freed) and the device then hands D
/// out again, locked, as a destination of a new migration (to device) still in flight: the
/// second finalize of the first eviction takes the new owner's lock for its own.
#[test]
fn device_finalize_twice_after_page_reused_as_destination() {
    watchdog("second finalize vs reused device page", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 2);
        let data = pattern(2, 22);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let d = dev_pfn(&g.space, a);
        let mut src = [migrate_pfn(d)];
        assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
        let h = g.pm.alloc_page(false, true).unwrap().into_pfn();
        let mut dst = [migrate_pfn(h)];
        g.d.device().copy(&[(d, h)]).unwrap().wait().unwrap();
        migrate_device_pages(&g.pm, &mut src, &dst).unwrap();
        migrate_device_finalize(&g.pm, &mut src, &mut dst);
        assert_eq!(read(&g.space, a, 4096), data[..4096].to_vec());
        // A new migration of page 1 to the device, raw, destination allocated by hand.
        let mut s2 = [0u64; 1];
        let mut d2 = [0u64; 1];
        let mut m = MigrateVma::new(&g.space, a + PAGE, a + 2 * PAGE, &mut s2, &mut d2);
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        m.pgmap_owner = g.d.owner();
        migrate_vma_setup(&mut m).unwrap();
        let x = g.d.device().alloc_pages(1, true).unwrap();
        eprintln!("freed device page {d}, new destination {}", x[0]);
        g.pm.claim_device_page(x[0], true).unwrap().into_pfn();
        m.dst[0] = migrate_pfn(x[0]);
        g.d.device()
            .copy(&[(migrate_pfn_to_pfn(m.src[0]).unwrap(), x[0])])
            .unwrap()
            .wait()
            .unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst)
        }));
        let r2 = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_vma_pages(&mut m).unwrap();
            migrate_vma_finalize(&mut m);
        }));
        drop(m);
        if x[0] != d {
            eprintln!("(the device did not reuse the page: scenario not reached)");
        }
        if let Err(p) = r {
            std::mem::forget(g);
            std::panic::resume_unwind(p);
        }
        if let Err(p) = r2 {
            std::mem::forget(g);
            std::panic::resume_unwind(p);
        }
        let bad = unsettled(&g.space, &g.pm, a, 2);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(read(&g.space, a, 8192), data);
    });
}

// ---------------------------------------------------------------------------------------
// B. The per-thread map lock: a thread touching its own migrating range.
// ---------------------------------------------------------------------------------------

/// A thread between setup and finalize reads the range it is migrating (a driver that
/// reads the source through the space instead of through the frame): the read finds a
/// migration entry for a page this thread has locked and waits for itself. Other
/// self-deadlocks (munmap, fork) fail with `MigrationInProgress`.
#[test]
fn own_thread_reads_migrating_range() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
    let a = map(&g.space, 1);
    g.space.write(a, &pattern(1, 23)).unwrap();
    let (tx, rx) = mpsc::channel();
    let gg = g.clone();
    thread::spawn(move || {
        let m = Migration::setup(
            &gg.space,
            a,
            a + PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            gg.d.owner(),
            None,
        )
        .unwrap();
        let mut b = [0u8; 16];
        let r = gg.space.read(a, &mut b);
        let _ = tx.send(format!("{r:?}"));
        drop(m);
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => eprintln!("read of own migrating range: {r}"),
        Err(_) => panic!("read of the thread's own migrating range: HANG (self-deadlock)"),
    }
}

// ---------------------------------------------------------------------------------------
// C. Read pins of device-private pages shared after fork.
// ---------------------------------------------------------------------------------------

/// `fault_own_page` leaves device-private entries to the access that follows: a page shared
/// with a fork child on the device comes home shared, and the read pin holds a page that the
/// parent's next write copies away from (the stale-pin bug, via the device).
#[test]
fn read_pin_of_device_page_shared_after_fork_goes_stale() {
    watchdog("pin of shared device page", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        g.space.write(a, &[1; 4096]).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let child = g.space.fork().unwrap();
        assert!(matches!(g.space.pte(a), Pte::DevicePrivate { .. }));
        let pin = pin_pages(&g.space, a, 1, false, false).unwrap();
        g.space.write(a, &[2; 4096]).unwrap();
        let mut seen = vec![0u8; 4096];
        g.pm.read_frame(pin.pfns()[0], 0, &mut seen).unwrap();
        let now = g.space.pte(a).pfn();
        let pinned = pin.pfns()[0];
        drop(pin);
        assert_eq!(read(&child, a, 1), vec![1]);
        drop(child);
        assert_eq!(
            seen[0], 2,
            "pinned frame {pinned} no longer backs the parent's page (now {now:?})"
        );
    });
}

/// The same with the zero page's sibling: a device-coherent page shared after fork.
#[test]
fn read_pin_of_coherent_page_shared_after_fork_goes_stale() {
    watchdog("pin of shared coherent page", || {
        let g = gpu(MemoryKind::DeviceCoherent, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        g.space.write(a, &[1; 4096]).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let child = g.space.fork().unwrap();
        let pin = pin_pages(&g.space, a, 1, false, false).unwrap();
        g.space.write(a, &[2; 4096]).unwrap();
        let mut seen = vec![0u8; 4096];
        g.pm.read_frame(pin.pfns()[0], 0, &mut seen).unwrap();
        let now = g.space.pte(a).pfn();
        let pinned = pin.pfns()[0];
        drop(pin);
        assert_eq!(read(&child, a, 1), vec![1]);
        drop(child);
        assert_eq!(
            seen[0], 2,
            "pinned frame {pinned} no longer backs the parent's page (now {now:?})"
        );
    });
}

// ---------------------------------------------------------------------------------------
// D. GpuDriver teardown.
// ---------------------------------------------------------------------------------------

/// The driver's last handle goes while the host frame pool is empty: its Drop cannot evict,
/// gives up, and the device (with the only copy of the data) goes with it.
#[test]
fn driver_drop_with_no_host_frames_loses_data() {
    watchdog("driver drop, no frames", || {
        let Gpu { pool, pm, d, space } = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&space, 4);
        let data = pattern(4, 24);
        space.write(a, &data).unwrap();
        d.migrate_to_device(&space, a, 4).unwrap();
        let mut hog = Vec::new();
        while let Ok(p) = pm.alloc_page(false, false) {
            hog.push(p);
        }
        drop(d);
        drop(hog);
        let mut got = vec![0u8; 4 * 4096];
        let r = space.read(a, &mut got);
        eprintln!(
            "read after the driver's drop: {r:?}; pte {:?}; frames {}",
            space.pte(a),
            pool.in_use()
        );
        assert!(
            r.is_ok() && got == data,
            "data lost at driver teardown: {r:?}"
        );
    });
}

/// The driver's last handle goes while another thread faults its pages back: a fault that
/// has locked a device page when the Drop's eviction passes makes the eviction skip it, and
/// Drop stops at the first round that moves nothing.
#[test]
fn driver_drop_races_faults() {
    watchdog("driver drop vs faults", || {
        let t0 = Instant::now();
        let mut rounds = 0;
        while t0.elapsed() < Duration::from_secs(3) {
            rounds += 1;
            let Gpu {
                pool: _pool,
                pm,
                d,
                space,
            } = gpu(MemoryKind::DevicePrivate, 64, 1, 8 << 20);
            let n = 8u64;
            let a = map(&space, n);
            let data = pattern(n as usize, 25);
            space.write(a, &data).unwrap();
            d.migrate_to_device(&space, a, n as usize).unwrap();
            let go = Arc::new(AtomicBool::new(false));
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let (space, go) = (space.clone(), go.clone());
                    thread::spawn(move || {
                        while !go.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                        let mut errs = Vec::new();
                        for k in 0..n {
                            let k = (k + t as u64 * 2) % n;
                            let mut b = [0u8; 1];
                            if let Err(e) = space.read(a + k * PAGE, &mut b) {
                                errs.push(format!("{e:?}"));
                            }
                        }
                        errs
                    })
                })
                .collect();
            go.store(true, Ordering::Relaxed);
            drop(d);
            let errs = join_all("faulters", hs, Duration::from_secs(10));
            let mut got = vec![0u8; n as usize * 4096];
            let r = space.read(a, &mut got);
            if r.is_err() || got != data {
                let ptes: Vec<_> = (0..n).map(|k| space.pte(a + k * PAGE)).collect();
                panic!(
                    "round {rounds}: read after drop {r:?}, faulter errors {errs:?}, ptes {ptes:?}"
                );
            }
            drop(space);
            drop(pm);
        }
        eprintln!("{rounds} rounds");
    });
}

// ---------------------------------------------------------------------------------------
// E. Walk bit vs mremap/fork/teardown chaos.
// ---------------------------------------------------------------------------------------

/// Evictions (abandoned and completed) of a device page shared by a parent and fork children,
/// while children mremap back and forth, fork grandchildren, and die; afterwards every space
/// reads the data and nothing is left locked or in migration.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn walk_vs_remap_fork_drop_chaos() {
    watchdog_for("walk chaos", Duration::from_secs(20), || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 1);
        let data = pattern(1, 26);
        g.space.write(a, &data).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let kids: Vec<AddressSpace> = (0..8).map(|_| g.space.fork().unwrap()).collect();
        let mut hs = Vec::new();
        for (t, kid) in kids.iter().enumerate() {
            let (kid, stop) = (kid.clone(), stop.clone());
            hs.push(thread::spawn(move || {
                let b = kid.mmap(None, PAGE, Prot::RW, false).unwrap();
                kid.munmap(b, PAGE).unwrap();
                let mut at = a;
                let mut x = t as u64 + 1;
                let mut errs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match (x >> 33) % 4 {
                        0 | 1 => {
                            let to = if at == a { b } else { a };
                            kid.mremap(at, PAGE, to).unwrap();
                            at = to;
                        }
                        2 => {
                            let gc = kid.fork().unwrap();
                            drop(gc);
                        }
                        _ => {
                            let gc = kid.fork().unwrap();
                            let mut v = [0u8; 8];
                            if let Err(e) = gc.read(at, &mut v) {
                                errs.push(format!("{e:?}"));
                            }
                            thread::spawn(move || drop(gc));
                        }
                    }
                }
                (kid, at, errs)
            }));
        }
        let pm = g.pm.clone();
        let d = g.d.clone();
        let space = g.space.clone();
        let mut evicts = 0u64;
        let mut migs = 0u64;
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(m) = d.migrate_to_device(&space, a, 1) {
                let _ = m;
                migs += 1;
            }
            if let Pte::DevicePrivate { pfn, .. } = space.pte(a) {
                let m = DeviceMigration::pfns(&pm, &[pfn]).unwrap();
                if evicts.is_multiple_of(2) {
                    drop(m);
                } else if m.cpages() == 1 {
                    let mut m = m;
                    if let Ok(h) = pm.alloc_page(false, true) {
                        m.dst_mut()[0] = migrate_pfn(h.into_pfn());
                        let m = m.submit(|p| d.device().copy(p)).wait().unwrap();
                        m.finalize();
                    }
                }
                evicts += 1;
            }
            let _ = d.evict_all();
        }
        stop.store(true, Ordering::Relaxed);
        let res = join_all("kids", hs, Duration::from_secs(10));
        eprintln!("{evicts} evictions, {migs} migrations");
        assert!(unsettled(&space, &pm, a, 1).is_empty());
        assert_eq!(read(&space, a, 4096), data);
        for (kid, at, errs) in res {
            assert!(errs.is_empty(), "{errs:?}");
            let bad = unsettled(&kid, &pm, at, 1);
            assert!(bad.is_empty(), "{bad:?}");
            assert_eq!(read(&kid, at, 4096), data);
        }
    });
}

// ---------------------------------------------------------------------------------------
// F. fork failing half-way.
// ---------------------------------------------------------------------------------------

/// fork copies a pinned page for the child; with no host frame left that fails half-way
/// (after earlier entries were shared and write-protected, including a device page's). The
/// partial child must be dropped cleanly, the error be out-of-memory, and the parent keep
/// its data and be able to write (reclaiming exclusivity), with no frames leaked.
#[test]
fn fork_out_of_frames_half_way() {
    watchdog("fork OOM", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 3);
        let data = pattern(3, 27);
        g.space.write(a, &data).unwrap();
        g.d.migrate_to_device(&g.space, a, 1).unwrap();
        let pin = pin_pages(&g.space, a + 2 * PAGE, 1, true, false).unwrap();
        let before = g.pool.in_use();
        let mut hog = Vec::new();
        while let Ok(p) = g.pm.alloc_page(false, false) {
            hog.push(p);
        }
        let r = g.space.fork();
        let kind = r.as_ref().err().map(|e| e.kind());
        eprintln!("fork with no frames: {:?}", r.as_ref().err());
        drop(r);
        drop(hog);
        drop(pin);
        assert_eq!(kind, Some(ErrorKind::OutOfMemory));
        assert!(unsettled(&g.space, &g.pm, a, 3).is_empty());
        assert_eq!(read(&g.space, a, 3 * 4096), data);
        g.space.write(a, &[9; 3 * 4096]).unwrap();
        g.space.munmap(a, 3 * PAGE).unwrap();
        assert_eq!(g.d.resident_pages(), 0);
        assert_eq!(
            g.pool.in_use(),
            before - 2,
            "frames leaked (before: {before})"
        );
    });
}

/// pin_on_device of a read-only mapping (a device kernel that only reads a constant buffer).
#[test]
fn pin_on_device_read_only_mapping() {
    watchdog("pin_on_device ro", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 2);
        let data = pattern(2, 28);
        g.space.write(a, &data).unwrap();
        g.space.mprotect(a, 2 * PAGE, Prot::READ).unwrap();
        let r = g.d.pin_on_device(&g.space, a, 2).map(|p| p.pfns().to_vec());
        eprintln!("pin_on_device of a read-only mapping: {r:?}");
        let child = g.space.fork().unwrap();
        let r2 = g.d.pin_on_device(&child, a, 2).map(|p| p.pfns().to_vec());
        eprintln!("pin_on_device of a read-only mapping shared with parent: {r2:?}");
        assert_eq!(read(&g.space, a, 8192), data);
        assert_eq!(read(&child, a, 8192), data);
        assert!(unsettled(&g.space, &g.pm, a, 2).is_empty());
    });
}
