//! Sections 1 to 5: address spaces torn down under a device-side migration, restore walks
//! against mremap, bad input, device kernels against protection and fork, buffer bounds.

use super::*;

// ---------------------------------------------------------------------------------------
// 1. A device-side migration meets an address space that is being torn down.
// ---------------------------------------------------------------------------------------

/// An eviction (`DeviceMigration`) collects a device page mapped only in space S; S's last
/// handle is then dropped, and S's teardown is slow (its mirror's `Release` invalidation
/// waits for a device kernel). The eviction is abandoned (no host frame / failed copy):
/// finalize restores, and its reverse-map walk passes over the dying space without waiting,
/// so the old page's last reference goes while S's teardown still has it in its reverse
/// map: `release_if_last` hits its debug assertion ("releasing mapped page").
#[test]
fn bug_dying_space_device_restore_releases_mapped_page() {
    watchdog("dying space restore", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let space = g.space.clone();
        drop(g.space);
        let a = map(&space, 1);
        space.write(a, &pattern(1, 1)).unwrap();
        g.d.migrate_to_device(&space, a, 1).unwrap();
        let pfn = dev_pfn(&space, a);
        let sleepy = Arc::new(Sleepy {
            event: NotifyEvent::Release,
            nap: Duration::from_millis(400),
            entered: AtomicBool::new(false),
        });
        space.register_notifier(sleepy.clone());
        let m = DeviceMigration::pfns(&g.pm, &[pfn]).unwrap();
        assert_eq!(m.cpages(), 1);
        let dropper = thread::spawn(move || drop(space));
        while !sleepy.entered.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        // Abandon the eviction while the teardown sleeps.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(m)));
        dropper.join().unwrap();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
        // The device page is free again and nothing leaked.
        assert_eq!(g.d.resident_pages(), 0, "device page leaked");
    });
}

/// The same, on the path where the eviction's copy succeeded: finalize's remap walk waits
/// for the dying space, but only `WALK_ROUNDS` yields; a teardown that takes longer (a mirror
/// waiting for a long kernel) makes it give up and release the old page while still mapped.
#[test]
fn bug_dying_space_device_remap_gives_up() {
    watchdog("dying space remap", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let space = g.space.clone();
        drop(g.space);
        let a = map(&space, 1);
        space.write(a, &pattern(1, 2)).unwrap();
        g.d.migrate_to_device(&space, a, 1).unwrap();
        let pfn = dev_pfn(&space, a);
        let sleepy = Arc::new(Sleepy {
            event: NotifyEvent::Release,
            nap: Duration::from_secs(1),
            entered: AtomicBool::new(false),
        });
        space.register_notifier(sleepy.clone());
        // The raw calls, so that a panic in finalize is not followed by a second finalize in
        // a destructor.
        let mut src = [migrate_pfn(pfn)];
        assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
        let host = g.pm.alloc_page(false, true).unwrap().into_pfn();
        let mut dst = [migrate_pfn(host)];
        g.d.device().copy(&[(pfn, host)]).unwrap().wait().unwrap();
        migrate_device_pages(&g.pm, &mut src, &dst).unwrap();
        let dropper = thread::spawn(move || drop(space));
        while !sleepy.entered.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst)
        }));
        eprintln!("finalize returned after {:?}", t.elapsed());
        dropper.join().unwrap();
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
}

// ---------------------------------------------------------------------------------------
// 2. A device-side restore walk against mremap back and forth.
// ---------------------------------------------------------------------------------------

/// A device page shared by a parent and many fork children; one child mremaps its range
/// back and forth while evictions of the page are abandoned (restore). The restore walk
/// remembers the (space, address) pairs it visited and stops when a round shows none it has
/// not seen: an entry that was away when its address was visited and came back later is
/// never restored. It stays a migration entry for an unlocked page: its data is lost and any
/// access to it spins forever.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn bug_device_restore_walk_misses_entry_moved_back() {
    watchdog_for(
        "restore vs mremap ping-pong",
        Duration::from_secs(30),
        || {
            let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
            let a = map(&g.space, 1);
            let data = pattern(1, 3);
            g.space.write(a, &data).unwrap();
            g.d.migrate_to_device(&g.space, a, 1).unwrap();
            let pfn = dev_pfn(&g.space, a);
            let kids: Vec<AddressSpace> = (0..48).map(|_| g.space.fork().unwrap()).collect();
            let victim = kids[kids.len() / 2].clone();
            let b = victim.mmap(None, PAGE, Prot::RW, false).unwrap();
            victim.munmap(b, PAGE).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let moves = Arc::new(AtomicU64::new(0));
            let mover = {
                let (victim, stop, moves) = (victim.clone(), stop.clone(), moves.clone());
                thread::spawn(move || {
                    let mut at = a;
                    while !stop.load(Ordering::Relaxed) {
                        let to = if at == a { b } else { a };
                        victim.mremap(at, PAGE, to).unwrap();
                        at = to;
                        moves.fetch_add(1, Ordering::Relaxed);
                    }
                    at
                })
            };
            let pm = g.pm.clone();
            let t0 = Instant::now();
            let mut rounds = 0u64;
            let mut found = None;
            while t0.elapsed() < Duration::from_secs(4) {
                let m = DeviceMigration::pfns(&pm, &[pfn]).unwrap();
                drop(m);
                rounds += 1;
                // After each abandoned eviction, no space may keep a migration entry for the page
                // once nobody migrates it (the mover only moves entries, it never makes them).
                if rounds.is_multiple_of(64) {
                    let p = pm.page(pfn).unwrap();
                    if !p.test(flags::LOCKED) {
                        for (k, s) in kids.iter().enumerate() {
                            for addr in [a, b] {
                                if let Pte::Migration { pfn: q, .. } = s.pte(addr) {
                                    if q == pfn && !p.test(flags::LOCKED) {
                                        found = Some(format!(
                                            "child {k} at {addr:#x}: {:?}",
                                            s.pte(addr)
                                        ));
                                    }
                                }
                            }
                        }
                    }
                    if found.is_some() {
                        break;
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let at = mover.join().unwrap();
            eprintln!(
                "{rounds} abandoned evictions, {} moves, found: {found:?}",
                moves.load(Ordering::Relaxed)
            );
            let bad = unsettled(&victim, &pm, at, 1);
            if found.is_some() && std::env::var_os("ADVERSARY_SHOW_HANG").is_some() {
                // The stale migration entry names an unlocked page: a read waits for the unlock
                // (at once) and retries, forever.
                let (tx, rx) = mpsc::channel();
                let v = victim.clone();
                thread::spawn(move || {
                    let _ = tx.send(read(&v, at, 16));
                });
                let r = rx.recv_timeout(Duration::from_secs(3));
                eprintln!("read of the stale entry after 3 s: {r:?}");
            }
            assert!(found.is_none() && bad.is_empty(), "{found:?} {bad:?}");
            // Every space still reads the data (the read of a stale migration entry would spin).
            let r = watchdog_for("read after the race", Duration::from_secs(3), {
                let victim = victim.clone();
                move || read(&victim, at, 4096)
            });
            assert_eq!(r, data);
            std::mem::forget(kids);
        },
    );
}

// ---------------------------------------------------------------------------------------
// 3. Bad input.
// ---------------------------------------------------------------------------------------

/// `migrate_vma_pages` promises that a bad `dst` entry (free, unlocked, ...) fails the call
/// with nothing changed; it only checks entries whose `src` has MIGRATE, and finalize then
/// unlocks and puts whatever the other entries name: a free page trips the reference-count
/// assertion, a live page of someone else loses a reference it never gave.
#[test]
fn bug_bad_dst_on_uncollected_entry_is_accepted() {
    watchdog("bad dst on uncollected entry", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = map(&g.space, 2);
        g.space.write(a, &pattern(2, 4)).unwrap();
        // Page 1 is pinned: setup does not collect it (src = 0).
        let pin = pin_pages(&g.space, a + PAGE, 1, false, false).unwrap();
        let mut src = [0u64; 2];
        let mut dst = [0u64; 2];
        let mut m = MigrateVma::new(&g.space, a, a + 2 * PAGE, &mut src, &mut dst);
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        m.pgmap_owner = g.d.owner();
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.src[1], 0, "the pinned page is not collected");
        // A device page that is free (never allocated): a bad destination.
        let free = g.d.pgmap().range.start.add(10);
        m.dst[1] = migrate_pfn(free);
        let r = migrate_vma_pages(&mut m);
        eprintln!("migrate_vma_pages with a free page in dst[1]: {r:?}");
        let fin = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_vma_finalize(&mut m);
        }));
        drop(m);
        drop(pin);
        assert!(
            r.is_err(),
            "a free page named as a destination was accepted by migrate_vma_pages"
        );
        if let Err(p) = fin {
            std::panic::resume_unwind(p);
        }
    });
}

/// A read pin (`write = false`) of readable memory that was never touched: the pin faults
/// with a write, and a read-only mapping refuses it with an access error.
#[test]
fn bug_read_pin_of_read_only_hole_is_denied() {
    watchdog("read pin of read-only hole", || {
        let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let a = g.space.mmap(None, 2 * PAGE, Prot::READ, false).unwrap();
        // The page reads fine.
        assert_eq!(read(&g.space, a, 16), vec![0; 16]);
        let r1 = pin_pages(&g.space, a, 1, false, false).map(|_| ());
        let r2 = pin_pages(&g.space, a + PAGE, 1, false, false).map(|_| ());
        assert!(
            r1.is_ok() && r2.is_ok(),
            "read pins of readable pages: after a read {r1:?}, never touched {r2:?}"
        );
    });
}

/// The same miss on the `migrate_vma` path: the migration holds its own space's map lock,
/// but a fork child that shares the page can mremap its copy of the range meanwhile. A
/// migration that restores (here: the driver gives no destinations) walks the reverse map
/// with the same "stop when nothing new" rule and leaves the child's entry a migration entry.
#[test]
fn bug_vma_restore_walk_misses_child_entry_moved_back() {
    watchdog_for(
        "vma restore vs child mremap",
        Duration::from_secs(30),
        || {
            let g = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
            let a = map(&g.space, 1);
            let data = pattern(1, 5);
            g.space.write(a, &data).unwrap();
            let kids: Vec<AddressSpace> = (0..48).map(|_| g.space.fork().unwrap()).collect();
            let victim = kids[kids.len() / 2].clone();
            let b = victim.mmap(None, PAGE, Prot::RW, false).unwrap();
            victim.munmap(b, PAGE).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let mover = {
                let (victim, stop) = (victim.clone(), stop.clone());
                thread::spawn(move || {
                    let mut at = a;
                    while !stop.load(Ordering::Relaxed) {
                        let to = if at == a { b } else { a };
                        victim.mremap(at, PAGE, to).unwrap();
                        at = to;
                    }
                    at
                })
            };
            let t0 = Instant::now();
            let mut rounds = 0u64;
            let mut found = None;
            'race: while t0.elapsed() < Duration::from_secs(4) {
                {
                    // Setup, then the driver migrates nothing: finalize restores.
                    let m = Migration::setup(
                        &g.space,
                        a,
                        a + PAGE,
                        MIGRATE_VMA_SELECT_SYSTEM,
                        g.d.owner(),
                        None,
                    )
                    .unwrap();
                    drop(m);
                }
                rounds += 1;
                let pfn = g.space.pte(a).pfn().unwrap();
                let p = g.pm.page(pfn).unwrap();
                for (k, s) in kids.iter().enumerate() {
                    for addr in [a, b] {
                        if let Pte::Migration { pfn: q, .. } = s.pte(addr) {
                            if q == pfn && !p.test(flags::LOCKED) {
                                found = Some(format!("child {k} at {addr:#x}: {:?}", s.pte(addr)));
                                break 'race;
                            }
                        }
                    }
                }
            }
            stop.store(true, Ordering::Relaxed);
            let at = mover.join().unwrap();
            eprintln!("{rounds} abandoned migrations, found: {found:?}");
            let bad = unsettled(&victim, &g.pm, at, 1);
            assert!(found.is_none() && bad.is_empty(), "{found:?} {bad:?}");
            std::mem::forget(kids);
        },
    );
}

// ---------------------------------------------------------------------------------------
// 4. Device kernels and protection / copy-on-write.
// ---------------------------------------------------------------------------------------

use hetmem_tests::harness::ADD_KERNEL as ADD;

fn vulkan_context(test: &str) -> Option<hetmem::offload::Context> {
    use hetmem::offload::{Context, ContextConfig};
    let config = ContextConfig {
        device: hetmem_engine::DeviceConfig::default()
            .kind(DeviceKind::Vulkan)
            .chunk(1 << 20),
        budget_bytes: 64 * 4096,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around: 16,
    };
    match Context::new(config) {
        Ok(c) => Some(c),
        Err(e) => {
            if hetmem_tests::running_in_ci() {
                panic!("{test}: CI=true and no Vulkan device: {e}");
            }
            hetmem_tests::say_skipped(test, DeviceKind::Vulkan, &e);
            None
        }
    }
}

/// A kernel launched over a buffer that was made read-only writes it: `pin_on_device` and
/// `launch` never look at the mapping's protection (the contract: "a read-only range refuses
/// device writes with a permission error").
#[test]
fn bug_kernel_writes_read_only_buffer() {
    watchdog_for(
        "kernel on read-only buffer",
        Duration::from_secs(60),
        || {
            let Some(ctx) = vulkan_context("bug_kernel_writes_read_only_buffer") else {
                return;
            };
            let kernel = ctx.compile_kernel(ADD, "add").unwrap();
            let buf = ctx.alloc(4096).unwrap();
            let before = vec![1u8; 4096];
            buf.write(0, &before).unwrap();
            ctx.space().mprotect(buf.addr(), PAGE, Prot::READ).unwrap();
            assert!(matches!(buf.write(0, &[2]), Err(Error::WriteDenied(_))));
            let r = ctx
                .launch(&kernel, &[(&buf, 0..4096)], &[7, 1], [16, 1, 1])
                .and_then(|l| l.wait());
            let mut after = vec![0u8; 4096];
            buf.read(0, &mut after).unwrap();
            assert!(
                r.is_err() || after == before,
                "a kernel wrote a read-only buffer: launch {r:?}, first word now {:?}",
                &after[..4]
            );
        },
    );
}

/// After a fork, parent and child share the buffer's pages copy-on-write; a kernel the parent
/// launches then writes the shared device page in place, and the child sees the parent's
/// post-fork writes.
#[test]
fn bug_kernel_write_after_fork_reaches_child() {
    watchdog_for("kernel after fork", Duration::from_secs(60), || {
        let Some(ctx) = vulkan_context("bug_kernel_write_after_fork_reaches_child") else {
            return;
        };
        let kernel = ctx.compile_kernel(ADD, "add").unwrap();
        let buf = ctx.alloc(4096).unwrap();
        let before = vec![1u8; 4096];
        buf.write(0, &before).unwrap();
        let child = ctx.space().fork().unwrap();
        ctx.launch(&kernel, &[(&buf, 0..4096)], &[7, 1], [16, 1, 1])
            .unwrap()
            .wait()
            .unwrap();
        let mut parent_now = vec![0u8; 4096];
        buf.read(0, &mut parent_now).unwrap();
        assert_ne!(parent_now, before, "the kernel ran on the parent's buffer");
        let child_now = read(&child, buf.addr(), 4096);
        assert_eq!(
            &child_now[..4],
            &before[..4],
            "the child sees the parent's kernel write made after the fork"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 5. The offload API's bounds.
// ---------------------------------------------------------------------------------------

/// `Buffer::read` at an offset near `usize::MAX` overflows `offset + len` before the bounds
/// check (a debug panic instead of `OutOfBounds`).
#[test]
fn bug_buffer_offset_overflow_panics() {
    watchdog("buffer offset overflow", || {
        use hetmem::offload::{Context, ContextConfig};
        let ctx = Context::new(ContextConfig {
            device: hetmem_engine::DeviceConfig::default().kind(DeviceKind::Host),
            budget_bytes: 1 << 20,
            ..ContextConfig::default()
        })
        .unwrap();
        let buf = ctx.alloc(4096).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut out = [0u8; 2];
            buf.read(usize::MAX, &mut out).map(|_| ())
        }));
        match r {
            Ok(Err(Error::OutOfBounds { .. })) => {}
            Ok(other) => panic!("read at usize::MAX: {other:?}"),
            Err(_) => panic!("read at usize::MAX panicked instead of OutOfBounds"),
        }
    });
}
