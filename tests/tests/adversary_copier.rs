//! Attacks on the CPU copier of a CPU Vulkan device (queued batches copied by a host thread,
//! ordered with the queues through a host-signalled timeline) and on the other paths that
//! `copy_queued` takes: chains across threads, tickets outliving the device, injected copy
//! failures, budget running out mid-way. Every racing test runs under a watchdog.
//! Long: one file of independent attack scenarios on one change, each read top to bottom.
// A dispatch binds a list of entry ranges, here of one buffer.
#![allow(clippy::single_range_in_vec_init)]

use std::sync::{mpsc, Arc};
use std::time::Duration;

use hetmem_engine::{DeviceConfig, DeviceKind, EngineError, HostAccessMode, Pfn};
use hetmem_tests::engine_bytes::{pattern, read_device, read_frame, write_frames, zip};
use hetmem_tests::harness::watchdog_for;
use hetmem_tests::{open_config, open_for_test, test_config, KINDS};

const LIMIT: Duration = Duration::from_secs(60);

/// Every device kind, and Vulkan through staging.
fn configs() -> Vec<DeviceConfig> {
    let mut staging = test_config(DeviceKind::Vulkan, 64 << 20);
    staging.host_access = HostAccessMode::Staging;
    KINDS
        .iter()
        .map(|&k| test_config(k, 64 << 20))
        .chain([staging])
        .collect()
}

/// A chain of batches across three threads: thread 0 queues src -> d1, thread 1 (told once
/// thread 0's `copy_queued` returned) copies d1 -> d2 with `copy` (shared with the calling
/// thread on lavapipe), thread 2 queues d2 -> back and waits. Nobody waits in between: the
/// end of the chain must hold the first source's bytes.
#[test]
fn a_chain_handed_across_threads_keeps_submission_order() {
    const N: usize = 600;
    for config in configs() {
        let Some(dev) = open_config(config, "a_chain_handed_across_threads") else {
            continue;
        };
        let k = (dev.info().kind, dev.info().host_access);
        let dev = Arc::new(dev);
        watchdog_for("chain across threads", LIMIT, move || {
            let f = dev.frames().clone();
            let src = f.alloc_batch(N, false).unwrap();
            let back = f.alloc_batch(N, false).unwrap();
            let d1 = dev.alloc_pages(N, false).unwrap();
            let d2 = dev.alloc_pages(N, false).unwrap();
            let (tx1, rx1) = mpsc::channel::<u64>();
            let (tx2, rx2) = mpsc::channel::<u64>();
            let (tx0, rx0) = mpsc::channel::<()>();
            std::thread::scope(|s| {
                let (dv, srcv, d1v) = (&dev, &src, &d1);
                s.spawn(move || {
                    for round in 0..12u64 {
                        write_frames(dv, srcv, 7_000 * round);
                        // The ticket is dropped unwaited once the next thread is told.
                        let t = dv.copy_queued(&zip(srcv, d1v)).unwrap();
                        tx1.send(round).unwrap();
                        drop(t);
                        rx0.recv().unwrap();
                    }
                });
                let (dv, d1v, d2v) = (&dev, &d1, &d2);
                s.spawn(move || {
                    for round in rx1 {
                        let t = dv.copy(&zip(d1v, d2v)).unwrap();
                        tx2.send(round).unwrap();
                        drop(t);
                    }
                });
                let (dv, d2v, backv) = (&dev, &d2, &back);
                s.spawn(move || {
                    for round in rx2 {
                        dv.copy_queued(&zip(d2v, backv)).unwrap().wait().unwrap();
                        for i in (0..N).step_by(29) {
                            assert_eq!(
                                read_frame(dv, backv[i]),
                                pattern(7_000 * round + i as u64),
                                "{k:?} round {round} page {i}"
                            );
                        }
                        tx0.send(()).unwrap();
                    }
                });
            });
            dev.free_pages(&d1).unwrap();
            dev.free_pages(&d2).unwrap();
            f.free_batch(&src).unwrap();
            f.free_batch(&back).unwrap();
        });
    }
}

/// Threads queue batches and keep their tickets while the device is dropped; the tickets are
/// waited on afterwards (the device's backend lives on through them) and the bytes are whole.
#[test]
fn tickets_outlive_the_device_dropped_under_them() {
    const N: usize = 300;
    for k in KINDS {
        for round in 0..3u64 {
            let Some(dev) = open_for_test(k, 64 << 20, "tickets_outlive_the_device") else {
                break;
            };
            watchdog_for("tickets outlive the device", LIMIT, move || {
                let f = dev.frames().clone();
                let mut kept = Vec::new();
                let (tx, rx) = mpsc::channel();
                std::thread::scope(|s| {
                    for t in 0..3u64 {
                        let (dev, tx) = (&dev, tx.clone());
                        s.spawn(move || {
                            let f = dev.frames();
                            let src = f.alloc_batch(N, false).unwrap();
                            let d = dev.alloc_pages(N, false).unwrap();
                            let back = f.alloc_batch(N, false).unwrap();
                            let seed = 100_000 * t + 1000 * round;
                            write_frames(dev, &src, seed);
                            let a = dev.copy_queued(&zip(&src, &d)).unwrap();
                            let b = dev.copy_queued(&zip(&d, &back)).unwrap();
                            // A dropped ticket in between, and one more queued on top.
                            drop(dev.copy_queued(&zip(&src, &d)).unwrap());
                            tx.send((a, b, seed, back, src)).unwrap();
                        });
                    }
                });
                drop(tx);
                kept.extend(rx);
                drop(dev);
                for (a, b, seed, back, src) in kept {
                    b.wait().unwrap();
                    a.wait().unwrap();
                    for i in (0..N).step_by(31) {
                        let mut v = vec![0; hetmem_engine::PAGE_SIZE];
                        f.read(back[i], 0, &mut v).unwrap();
                        assert_eq!(v, pattern(seed + i as u64), "{k:?} page {i}");
                    }
                    f.free_batch(&back).unwrap();
                    f.free_batch(&src).unwrap();
                }
            });
        }
    }
}

/// Injected copy failures in a queued batch large enough for the copier: the failed pairs are
/// named, their destinations keep their bytes, every other pair lands, and the chain after it
/// (reading the batch's output) sees exactly that.
#[test]
fn injected_failures_in_queued_batches_name_the_pairs_and_spare_the_destinations() {
    const N: usize = 800;
    for config in configs() {
        let Some(dev) = open_config(config, "injected_failures_in_queued_batches") else {
            continue;
        };
        let k = (dev.info().kind, dev.info().host_access);
        watchdog_for("injected failures", LIMIT, move || {
            let f = dev.frames();
            let src = f.alloc_batch(N, false).unwrap();
            let back = f.alloc_batch(N, false).unwrap();
            let d = dev.alloc_pages(N, false).unwrap();
            for &p in &d {
                dev.write_page(p, 0, &[0x5A; hetmem_engine::PAGE_SIZE])
                    .unwrap();
            }
            write_frames(&dev, &src, 42);
            let bad: Vec<usize> = (0..N).step_by(97).chain([N - 1]).collect();
            let bad_pfns: Vec<Pfn> = bad.iter().map(|&i| d[i]).collect();
            dev.inject_copy_failures(&bad_pfns);
            let t = dev.copy_queued(&zip(&src, &d)).unwrap();
            dev.inject_copy_failures(&[]);
            let t2 = dev.copy_queued(&zip(&d, &back)).unwrap();
            drop(t2);
            match t.wait() {
                Err(EngineError::CopyFailed { mut failed, .. }) => {
                    failed.sort();
                    assert_eq!(failed, bad, "{k:?}: the failed pairs");
                }
                other => panic!("{k:?}: wanted CopyFailed, got {other:?}"),
            }
            // The dropped ticket's copy is done once a later batch is waited on.
            dev.copy(&[(d[1], back[1])]).unwrap().wait().unwrap();
            for i in 0..N {
                let want = if bad.contains(&i) {
                    vec![0x5A; hetmem_engine::PAGE_SIZE]
                } else {
                    pattern(42 + i as u64)
                };
                assert_eq!(read_device(&dev, d[i]), want, "{k:?} device page {i}");
                assert_eq!(read_frame(&dev, back[i]), want, "{k:?} back {i}");
            }
        });
    }
}

/// The budget runs out while other threads queue batches: allocation fails cleanly, nothing
/// hangs, and the batches' bytes arrive.
#[test]
fn budget_running_out_while_batches_are_queued() {
    const N: usize = 512; // 2 MiB
    for k in KINDS {
        let Some(dev) = open_for_test(k, 16 << 20, "budget_running_out") else {
            continue;
        };
        let dev = Arc::new(dev);
        watchdog_for("budget running out", LIMIT, move || {
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let dev = &dev;
                    s.spawn(move || {
                        let f = dev.frames();
                        let src = f.alloc_batch(N, false).unwrap();
                        let back = f.alloc_batch(N, false).unwrap();
                        for round in 0..8u64 {
                            let seed = 10_000 * t + 100 * round;
                            write_frames(dev, &src, seed);
                            let d = loop {
                                match dev.alloc_pages(N, false) {
                                    Ok(d) => break d,
                                    Err(_) => std::thread::yield_now(),
                                }
                            };
                            let a = dev.copy_queued(&zip(&src, &d)).unwrap();
                            dev.copy_queued(&zip(&d, &back)).unwrap().wait().unwrap();
                            a.wait().unwrap();
                            for i in (0..N).step_by(37) {
                                assert_eq!(
                                    read_frame(dev, back[i]),
                                    pattern(seed + i as u64),
                                    "{k:?} thread {t} round {round} page {i}"
                                );
                            }
                            dev.free_pages(&d).unwrap();
                        }
                    });
                }
                // A hog that takes the rest of the budget a page at a time and lets go.
                let dev = &dev;
                s.spawn(move || {
                    for _ in 0..20 {
                        let mut held = Vec::new();
                        while let Ok(p) = dev.alloc_page(false) {
                            held.push(p);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        dev.free_pages(&held).unwrap();
                    }
                });
            });
        });
    }
}

/// Only on Vulkan: many threads mixing `copy_queued`, `copy`, `read_page` and `write_page`
/// on disjoint pages, with tickets dropped unwaited: each thread's bytes are whole.
#[test]
fn mixed_paths_from_many_threads() {
    const N: usize = 400;
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 128 << 20, "mixed_paths") else {
        return;
    };
    let dev = Arc::new(dev);
    watchdog_for("mixed paths", LIMIT, move || {
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let dev = &dev;
                s.spawn(move || {
                    let f = dev.frames();
                    let src = f.alloc_batch(N, false).unwrap();
                    let back = f.alloc_batch(N, false).unwrap();
                    let d = dev.alloc_pages(N, false).unwrap();
                    for round in 0..6u64 {
                        let seed = 1_000_000 * t + 1000 * round;
                        write_frames(dev, &src, seed);
                        drop(dev.copy_queued(&zip(&src, &d)).unwrap());
                        // write_page after a dropped queued batch to the same page: the
                        // drop waited, so this write lands last.
                        dev.write_page(d[3], 0, &pattern(seed + 3)).unwrap();
                        let a = dev.copy(&zip(&d[..N / 2], &back[..N / 2])).unwrap();
                        let b = dev.copy_queued(&zip(&d[N / 2..], &back[N / 2..])).unwrap();
                        b.wait().unwrap();
                        a.wait().unwrap();
                        assert_eq!(read_device(dev, d[N - 1]), pattern(seed + N as u64 - 1));
                        for i in (0..N).step_by(23).chain([3]) {
                            assert_eq!(
                                read_frame(dev, back[i]),
                                pattern(seed + i as u64),
                                "thread {t} round {round} page {i}"
                            );
                        }
                    }
                    dev.free_pages(&d).unwrap();
                    f.free_batch(&src).unwrap();
                    f.free_batch(&back).unwrap();
                });
            }
        });
    });
}

/// A migration of 80 MiB to a lavapipe device (several chunks, pipelined through
/// `copy_queued`) while another thread evicts everything, then munmaps half the range: nothing
/// hangs, no entry is left unsettled, and the half still mapped reads its bytes.
#[test]
fn a_large_migration_races_evict_and_munmap() {
    use hetmem::mm::{MemoryKind, PAGE};
    use hetmem_tests::harness::{gpu_on, map, pattern as host_pattern, read, unsettled};
    const PAGES: usize = 20 << 10; // 80 MiB
    for round in 0..2u8 {
        let Some(g) = gpu_on(
            DeviceKind::Vulkan,
            MemoryKind::DevicePrivate,
            PAGES + 1024,
            0,
            256 << 20,
        ) else {
            return;
        };
        watchdog_for("large migration", Duration::from_secs(120), move || {
            let g = Arc::new(g);
            let addr = map(&g.space, PAGES as u64);
            let bytes = host_pattern(PAGES, round);
            g.space.write(addr, &bytes).unwrap();
            let g2 = g.clone();
            let racer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30 * u64::from(round + 1)));
                g2.d.evict_all().unwrap();
                let half = (PAGES / 2) as u64 * PAGE;
                g2.space.munmap(addr + half, half).unwrap();
            });
            // Errors are allowed (the range goes away under it); hangs and panics are not.
            let _ = g.d.migrate_to_device(&g.space, addr, PAGES);
            racer.join().unwrap();
            let _ = g.d.migrate_to_device(&g.space, addr, PAGES / 2);
            let left = unsettled(&g.space, &g.pm, addr, PAGES / 2);
            assert!(left.is_empty(), "round {round}: {left:?}");
            let half = PAGES / 2 * PAGE as usize;
            assert!(
                read(&g.space, addr, half) == bytes[..half],
                "round {round}: the mapped half lost its bytes"
            );
            g.d.evict_all().unwrap();
            assert!(read(&g.space, addr, half) == bytes[..half]);
        });
    }
}

/// Injected device loss on queued batches from several threads, with chains reading the lost
/// batches' output: each lost ticket fails with `DeviceLost`, nothing hangs, and the device
/// copies whole batches afterwards.
#[test]
fn injected_device_loss_on_queued_batches() {
    const N: usize = 700;
    for config in configs() {
        let Some(dev) = open_config(config, "injected_device_loss_on_queued") else {
            continue;
        };
        let k = (dev.info().kind, dev.info().host_access);
        let dev = Arc::new(dev);
        watchdog_for("device loss", LIMIT, move || {
            dev.inject_device_loss(3, false);
            std::thread::scope(|s| {
                for t in 0..3u64 {
                    let dev = &dev;
                    s.spawn(move || {
                        let f = dev.frames();
                        let src = f.alloc_batch(N, false).unwrap();
                        let back = f.alloc_batch(N, false).unwrap();
                        let d = dev.alloc_pages(N, false).unwrap();
                        for round in 0..4u64 {
                            let seed = 1_000 * t + 100 * round;
                            write_frames(dev, &src, seed);
                            let a = dev.copy_queued(&zip(&src, &d));
                            let b = dev.copy_queued(&zip(&d, &back));
                            let (a, b) = (a.unwrap(), b.unwrap());
                            let ra = a.wait();
                            let rb = b.wait();
                            if ra.is_ok() && rb.is_ok() {
                                for i in (0..N).step_by(53) {
                                    assert_eq!(
                                        read_frame(dev, back[i]),
                                        pattern(seed + i as u64),
                                        "{k:?} thread {t} round {round} page {i}"
                                    );
                                }
                            } else {
                                for r in [ra, rb] {
                                    if let Err(e) = r {
                                        assert!(
                                            matches!(e, EngineError::DeviceLost(_)),
                                            "{k:?}: {e}"
                                        );
                                    }
                                }
                            }
                        }
                        dev.free_pages(&d).unwrap();
                        f.free_batch(&src).unwrap();
                        f.free_batch(&back).unwrap();
                    });
                }
            });
            assert_eq!(dev.lost_batches(), 3, "{k:?}");
        });
    }
}

/// A device dropped (last owner) by a thread while its copier is mid-job for a ticket held by
/// another thread that helps copying: the drop waits, the helper's wait ends, bytes whole.
#[test]
fn the_last_ticket_dropped_while_another_thread_helps() {
    const N: usize = 4096; // 16 MiB: many pieces
    for round in 0..4u64 {
        let Some(dev) = open_for_test(DeviceKind::Vulkan, 96 << 20, "the_last_ticket") else {
            return;
        };
        watchdog_for("last ticket", LIMIT, move || {
            let f = dev.frames().clone();
            let src = f.alloc_batch(N, false).unwrap();
            let back = f.alloc_batch(N, false).unwrap();
            let d = dev.alloc_pages(N, false).unwrap();
            write_frames(&dev, &src[..64], round);
            let a = dev.copy_queued(&zip(&src, &d)).unwrap();
            let b = dev.copy_queued(&zip(&d, &back)).unwrap();
            let c = dev.copy_queued(&zip(&back, &src)).unwrap();
            drop(dev);
            let h = std::thread::spawn(move || {
                b.wait().unwrap();
                drop(b);
            });
            drop(a);
            c.wait().unwrap();
            drop(c);
            h.join().unwrap();
            for (i, &b) in back.iter().enumerate().take(64) {
                let mut v = vec![0; hetmem_engine::PAGE_SIZE];
                f.read(b, 0, &mut v).unwrap();
                assert_eq!(v, pattern(round + i as u64), "page {i}");
            }
            f.free_batch(&src).unwrap();
            f.free_batch(&back).unwrap();
        });
    }
}

/// Queued copy -> kernel -> queued copy, nobody waiting in between, from two threads: the
/// kernel reads the first copy's bytes and the last copy reads the kernel's.
#[test]
fn queued_copies_around_a_kernel_keep_order() {
    use hetmem_engine::PAGE_SIZE;
    const N: usize = 512;
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 64 << 20, "copies_around_a_kernel") else {
        return;
    };
    let dev = Arc::new(dev);
    watchdog_for("copies around a kernel", LIMIT, move || {
        let kernel = dev
            .compile_kernel(hetmem_tests::harness::ADD_KERNEL, "add")
            .unwrap();
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (dev, kernel) = (&dev, &kernel);
                s.spawn(move || {
                    let f = dev.frames();
                    let src = f.alloc_batch(N, false).unwrap();
                    let back = f.alloc_batch(N, false).unwrap();
                    let d = dev.alloc_pages(N, false).unwrap();
                    let table = dev.page_table(N).unwrap();
                    for (k, &p) in d.iter().enumerate() {
                        table.set(k, Some(p)).unwrap();
                    }
                    let groups = (N * PAGE_SIZE / 4).div_ceil(64) as u32;
                    for round in 0..6u64 {
                        let seed = 10_000 * t + 1000 * round;
                        write_frames(dev, &src, seed);
                        let a = dev.copy_queued(&zip(&src, &d)).unwrap();
                        let k = dev
                            .dispatch(
                                kernel,
                                &table,
                                &[0..N as u32],
                                &[3, N as u32],
                                [groups, 1, 1],
                            )
                            .unwrap();
                        let b = dev.copy_queued(&zip(&d, &back)).unwrap();
                        drop(a);
                        b.wait().unwrap();
                        k.wait().unwrap();
                        for i in (0..N).step_by(19) {
                            let want: Vec<u8> = pattern(seed + i as u64)
                                .chunks_exact(4)
                                .flat_map(|w| {
                                    u32::from_le_bytes(w.try_into().unwrap())
                                        .wrapping_add(3)
                                        .to_le_bytes()
                                })
                                .collect();
                            assert!(
                                read_frame(dev, back[i]) == want,
                                "thread {t} round {round} page {i}: not the kernel's output"
                            );
                        }
                    }
                    dev.free_pages(&d).unwrap();
                    f.free_batch(&src).unwrap();
                    f.free_batch(&back).unwrap();
                });
            }
        });
    });
}

/// A pipelined 80 MiB migration to a lavapipe device with copy failures injected on every
/// other device page, while another thread reads the range through the CPU (faulting pages
/// back): nothing hangs, no entry is left unsettled, every byte reads as written, before and
/// after evicting everything.
#[test]
fn a_large_migration_with_failing_copies_and_cpu_readers() {
    use hetmem::mm::MemoryKind;
    use hetmem_tests::harness::{gpu_on, map, pattern as host_pattern, read, unsettled};
    const PAGES: usize = 20 << 10; // 80 MiB
    let Some(g) = gpu_on(
        DeviceKind::Vulkan,
        MemoryKind::DevicePrivate,
        PAGES + 1024,
        0,
        256 << 20,
    ) else {
        return;
    };
    watchdog_for("failing migration", Duration::from_secs(120), move || {
        let g = Arc::new(g);
        let r = g.d.device().pfn_range();
        let bad: Vec<Pfn> = (0..r.count)
            .step_by(2)
            .map(|i| Pfn(r.start.0 + i))
            .collect();
        g.d.device().inject_copy_failures(&bad);
        let addr = map(&g.space, PAGES as u64);
        let bytes = Arc::new(host_pattern(PAGES, 9));
        g.space.write(addr, &bytes).unwrap();
        let (g2, b2) = (g.clone(), bytes.clone());
        let reader = std::thread::spawn(move || {
            for k in 0..40usize {
                let at = (k * 509) % PAGES;
                let off = at * 4096;
                assert!(
                    read(&g2.space, addr + off as u64, 4096) == b2[off..off + 4096],
                    "page {at} read wrong while migrating"
                );
            }
        });
        for _ in 0..2 {
            let _ = g.d.migrate_to_device(&g.space, addr, PAGES);
        }
        reader.join().unwrap();
        let left = unsettled(&g.space, &g.pm, addr, PAGES);
        assert!(left.is_empty(), "{:?}", &left[..left.len().min(5)]);
        assert!(read(&g.space, addr, PAGES * 4096) == bytes[..]);
        g.d.device().inject_copy_failures(&[]);
        g.d.evict_all().unwrap();
        assert!(read(&g.space, addr, PAGES * 4096) == bytes[..]);
    });
}

/// Host frames run out in the middle of a pipelined 80 MiB migration back to the host (another
/// mapping holds most of the pool): the migration fails or stops part-way without hanging,
/// leaves nothing unsettled, and once the other mapping goes every byte reads as written.
#[test]
fn host_frames_run_out_mid_way_through_a_migration_home() {
    use hetmem::mm::{MemoryKind, PAGE};
    use hetmem_tests::harness::{gpu_on, map, pattern as host_pattern, read, unsettled};
    const PAGES: usize = 20 << 10; // 80 MiB
    let Some(g) = gpu_on(
        DeviceKind::Vulkan,
        MemoryKind::DevicePrivate,
        PAGES + 1024,
        0,
        112 << 20,
    ) else {
        return;
    };
    watchdog_for("frames run out", Duration::from_secs(120), move || {
        let addr = map(&g.space, PAGES as u64);
        let bytes = host_pattern(PAGES, 5);
        g.space.write(addr, &bytes).unwrap();
        let out = g.d.migrate_to_device(&g.space, addr, PAGES).unwrap();
        assert_eq!(out.migrated, PAGES);
        // Another mapping takes most of the pool: what is left holds the first chunk of the
        // way home (64 MiB) but not the whole range.
        const HOG: usize = 14 << 10;
        let hog = map(&g.space, HOG as u64);
        g.space.write(hog, &vec![1u8; HOG * 4096]).unwrap();
        let r = g.d.migrate_to_host(&g.space, addr, PAGES);
        let left = unsettled(&g.space, &g.pm, addr, PAGES);
        assert!(left.is_empty(), "{r:?}: {:?}", &left[..left.len().min(5)]);
        g.space.munmap(hog, HOG as u64 * PAGE).unwrap();
        assert!(read(&g.space, addr, PAGES * 4096) == bytes[..], "{r:?}");
        g.d.migrate_to_host(&g.space, addr, PAGES).unwrap();
        assert!(read(&g.space, addr, PAGES * 4096) == bytes[..]);
    });
}

/// A thread copies with `copy` (800 KiB: the queue alone copies it) and then, without
/// waiting, queues a batch that reads what that copy wrote, while other threads keep queuing
/// batches of their own: the queued batch must come after the `copy` whatever the others'
/// batches did in between (a queued batch skips waiting for the transfer queue's latest batch
/// when that batch is the copier's own, which is only right if nothing was submitted between
/// that job and its batch).
#[test]
fn a_queued_batch_comes_after_a_queue_copy_while_others_queue() {
    const M: usize = 200; // 800 KiB: on the queue alone
    const E: usize = 100; // extra pages: the queued batch is above 1 MiB
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 128 << 20, "queued_after_queue_copy") else {
        return;
    };
    let dev = Arc::new(dev);
    watchdog_for("queued after a queue copy", LIMIT, move || {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..3 {
                let (dev, stop) = (&dev, &stop);
                s.spawn(move || {
                    let f = dev.frames();
                    let src = f.alloc_batch(300, false).unwrap();
                    let d = dev.alloc_pages(300, false).unwrap();
                    let mut kept = std::collections::VecDeque::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        kept.push_back(dev.copy_queued(&zip(&src, &d)).unwrap());
                        if kept.len() > 3 {
                            drop(kept.pop_front());
                        }
                    }
                    drop(kept);
                    dev.free_pages(&d).unwrap();
                    f.free_batch(&src).unwrap();
                });
            }
            let f = dev.frames();
            let src = f.alloc_batch(M, false).unwrap();
            let back = f.alloc_batch(M + E, false).unwrap();
            let d = dev.alloc_pages(M, false).unwrap();
            let e = dev.alloc_pages(E, false).unwrap();
            let mut bad = None;
            for round in 0..3000u64 {
                let seed = 1_000 * round;
                write_frames(&dev, &src[..1], seed);
                write_frames(&dev, &src[M - 1..], seed + M as u64 - 1);
                // Reversed: 4 KiB regions, slow on the queue.
                let mut rev = zip(&src, &d);
                rev.reverse();
                let t1 = dev.copy(&rev).unwrap();
                let mut pairs = zip(&d, &back[..M]);
                pairs.extend(zip(&e, &back[M..]));
                dev.copy_queued(&pairs).unwrap().wait().unwrap();
                drop(t1);
                for i in [0, M - 1] {
                    if read_frame(&dev, back[i]) != pattern(seed + i as u64) {
                        bad = Some((round, i));
                    }
                }
                if bad.is_some() {
                    break;
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(
                bad, None,
                "the queued batch read d before the copy wrote it"
            );
        });
    });
}

/// On every kind: a queued download whose ticket is dropped unwaited, its frames freed and
/// handed to a new owner who writes them, then a later batch waited on: the new owner's
/// bytes stay (the dropped batch never lands after the drop).
#[test]
fn a_dropped_queued_download_never_lands_after_the_drop_on_any_kind() {
    use hetmem_engine::{HostFramePool, PAGE_SIZE};
    const N: usize = 400; // above 1 MiB: the copier's size on lavapipe
    for k in KINDS {
        let pool = HostFramePool::new(8 << 20).unwrap();
        let mut config = test_config(k, 8 << 20);
        config.frames = Some(pool.clone());
        let Some(dev) = open_config(config, "a_dropped_queued_download") else {
            continue;
        };
        watchdog_for("dropped download", LIMIT, move || {
            let pages = dev.alloc_pages(N, false).unwrap();
            for &p in &pages {
                dev.write_page(p, 0, &[0xAA; PAGE_SIZE]).unwrap();
            }
            for _ in 0..5 {
                let frames = pool.alloc_batch(N, false).unwrap();
                drop(dev.copy_queued(&zip(&pages, &frames)).unwrap());
                pool.free_batch(&frames).unwrap();
                let reused = pool.alloc_batch(N, false).unwrap();
                for &f in &reused {
                    pool.write(f, 0, &[0x55; PAGE_SIZE]).unwrap();
                }
                let other = pool.alloc(false).unwrap();
                dev.copy(&[(pages[0], other)]).unwrap().wait().unwrap();
                for (i, &f) in reused.iter().enumerate() {
                    assert!(
                        read_frame(&dev, f).iter().all(|&b| b == 0x55),
                        "{k:?}: frame {i} got the dropped batch's bytes"
                    );
                }
                pool.free_batch(&reused).unwrap();
                pool.free(other).unwrap();
            }
        });
    }
}
