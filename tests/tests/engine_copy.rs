//! The copy engine, checked byte for byte on every device kind against the host device.
#![allow(clippy::needless_range_loop)] // page i of several parallel arrays

use hetmem_engine::{Device, DeviceKind, EngineError, ErrorKind, Pfn, PAGE_SIZE};
use hetmem_tests::{open_config, open_for_test, test_config, KINDS};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// A page of bytes that depends on `seed` and on every byte position.
fn pattern(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..PAGE_SIZE).map(|_| rng.random()).collect()
}

fn write_frames(dev: &Device, frames: &[Pfn], seed: u64) {
    for (i, &f) in frames.iter().enumerate() {
        dev.frames().write(f, 0, &pattern(seed + i as u64)).unwrap();
    }
}

fn read_frame(dev: &Device, f: Pfn) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    dev.frames().read(f, 0, &mut v).unwrap();
    v
}

fn read_device(dev: &Device, p: Pfn) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    dev.read_page(p, 0, &mut v).unwrap();
    v
}

fn zip(a: &[Pfn], b: &[Pfn]) -> Vec<(Pfn, Pfn)> {
    a.iter().copied().zip(b.iter().copied()).collect()
}

/// Host -> device -> device -> host -> host for `n` pages, checking bytes at every hop.
fn four_directions(kind: DeviceKind, n: usize) {
    let name = format!("four_directions_{n}");
    let Some(dev) = open_for_test(kind, 64 << 20, &name) else {
        return;
    };
    let f = dev.frames();
    let src = f.alloc_batch(n, false).unwrap();
    write_frames(&dev, &src, 1000);
    let d1 = dev.alloc_pages(n, false).unwrap();
    let d2 = dev.alloc_pages(n, false).unwrap();
    let back = f.alloc_batch(n, false).unwrap();
    let back2 = f.alloc_batch(n, false).unwrap();

    dev.copy(&zip(&src, &d1)).unwrap().wait().unwrap();
    dev.copy(&zip(&d1, &d2)).unwrap().wait().unwrap();
    dev.copy(&zip(&d2, &back)).unwrap().wait().unwrap();
    dev.copy(&zip(&back, &back2)).unwrap().wait().unwrap();
    for i in 0..n {
        let want = pattern(1000 + i as u64);
        assert_eq!(
            read_device(&dev, d1[i]),
            want,
            "{kind:?} host->device page {i}"
        );
        assert_eq!(
            read_device(&dev, d2[i]),
            want,
            "{kind:?} device->device page {i}"
        );
        assert_eq!(
            read_frame(&dev, back[i]),
            want,
            "{kind:?} device->host page {i}"
        );
        assert_eq!(
            read_frame(&dev, back2[i]),
            want,
            "{kind:?} host->host page {i}"
        );
    }
    dev.free_pages(&d1).unwrap();
    dev.free_pages(&d2).unwrap();
    for v in [src, back, back2] {
        f.free_batch(&v).unwrap();
    }
    assert_eq!(dev.pages_in_use(), 0);
}

#[test]
fn single_page_all_directions() {
    for k in KINDS {
        four_directions(k, 1);
    }
}

#[test]
fn runs_all_directions() {
    for k in KINDS {
        for n in [2, 511, 512, 513, 1024] {
            four_directions(k, n);
        }
    }
}

/// 10 000 random scattered pairs in a random mix of directions, compared with the host device.
#[test]
fn scattered_pairs_match_the_host_device() {
    const N: usize = 10_000;
    let mut reference: Option<Vec<Vec<u8>>> = None;
    // The host device first (the reference), then Vulkan with and without the CPU's help.
    for (k, assist) in [
        (DeviceKind::Host, false),
        (DeviceKind::Vulkan, true),
        (DeviceKind::Vulkan, false),
    ] {
        let mut config = test_config(k, 128 << 20);
        config.cpu_assist = assist;
        let Some(dev) = open_config(config, "scattered_pairs_match_the_host_device") else {
            continue;
        };
        let f = dev.frames();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Sources: N host frames and N device pages; destinations drawn from separate pools.
        let hs = f.alloc_batch(N, false).unwrap();
        let ds = dev.alloc_pages(N, false).unwrap();
        write_frames(&dev, &hs, 0);
        dev.copy(&zip(&hs, &ds)).unwrap().wait().unwrap();
        write_frames(&dev, &hs, 50_000);
        let mut hd = f.alloc_batch(N, false).unwrap();
        let mut dd = dev.alloc_pages(N, false).unwrap();
        hd.shuffle(&mut rng);
        dd.shuffle(&mut rng);
        let mut pairs = Vec::with_capacity(N);
        for i in 0..N {
            let src = if rng.random_bool(0.5) { hs[i] } else { ds[i] };
            let dst = if rng.random_bool(0.5) { hd[i] } else { dd[i] };
            pairs.push((src, dst));
        }
        pairs.shuffle(&mut rng);
        dev.copy(&pairs).unwrap().wait().unwrap();
        let got: Vec<Vec<u8>> = pairs
            .iter()
            .map(|&(_, d)| {
                if dev.owns(d) {
                    read_device(&dev, d)
                } else {
                    read_frame(&dev, d)
                }
            })
            .collect();
        // Every destination holds its source's pattern.
        for (i, &(s, _)) in pairs.iter().enumerate() {
            let idx = hs
                .iter()
                .position(|&x| x == s)
                .or_else(|| ds.iter().position(|&x| x == s));
            let idx = idx.unwrap() as u64;
            let seed = if dev.owns(s) { idx } else { 50_000 + idx };
            assert_eq!(got[i], pattern(seed), "{k:?} pair {i}");
        }
        match &reference {
            None => reference = Some(got),
            Some(r) => assert!(r == &got, "{k:?} differs from the host device"),
        }
        dev.free_pages(&ds).unwrap();
        dev.free_pages(&dd).unwrap();
        f.free_batch(&hs).unwrap();
        f.free_batch(&hd).unwrap();
    }
}

#[test]
fn a_run_is_recorded_as_one_region() {
    for k in KINDS {
        // A private frame pool, so that other tests cannot interleave with our frames.
        let mut config = test_config(k, 16 << 20);
        config.frames = Some(hetmem_engine::HostFramePool::new(8 << 20).unwrap());
        let Some(dev) = open_config(config, "a_run_is_recorded_as_one_region") else {
            continue;
        };
        let frames = dev.frames().alloc_batch(300, false).unwrap();
        let pages = dev.alloc_pages(300, false).unwrap();
        let before = dev.stats();
        dev.copy(&zip(&frames, &pages)).unwrap().wait().unwrap();
        let after = dev.stats();
        assert_eq!(after.batches - before.batches, 1);
        assert_eq!(after.pages - before.pages, 300);
        assert_eq!(
            after.regions - before.regions,
            1,
            "{k:?}: 300 consecutive pages"
        );
        // Every other page: no two are adjacent, so 150 regions.
        let odd: Vec<_> = (0..300).step_by(2).map(|i| (frames[i], pages[i])).collect();
        assert_eq!(dev.plan(&odd).unwrap().region_count(), 150);
        dev.free_pages(&pages).unwrap();
        dev.frames().free_batch(&frames).unwrap();
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    for k in KINDS {
        let Some(dev) = open_for_test(k, 1 << 20, "bad_input_is_refused") else {
            continue;
        };
        let f = dev.frames();
        let frame = f.alloc(false).unwrap();
        f.write(frame, 0, &pattern(9)).unwrap();
        let page = dev.alloc_page(true).unwrap();

        // An unknown pfn.
        let e = dev.copy(&[(frame, Pfn(3))]).err().unwrap();
        assert!(matches!(e, EngineError::UnknownPfn(Pfn(3))), "{e}");
        assert_eq!(e.kind(), ErrorKind::Misuse);
        // A freed device page.
        let freed = dev.alloc_page(false).unwrap();
        dev.free_page(freed).unwrap();
        let e = dev.copy(&[(frame, page), (frame, freed)]).err().unwrap();
        assert!(matches!(e, EngineError::FreedPfn(p) if p == freed), "{e}");
        assert!(matches!(
            dev.read_page(freed, 0, &mut [0; 8]),
            Err(EngineError::FreedPfn(_))
        ));
        // The valid pair of the refused batch did not run.
        assert_eq!(read_device(&dev, page), vec![0; PAGE_SIZE]);
        // Double free, of a device page and of a frame; an unknown pfn freed.
        assert!(matches!(dev.free_page(freed), Err(EngineError::DoubleFree(p)) if p == freed));
        assert!(matches!(
            dev.free_pages(&[page, page]),
            Err(EngineError::DoubleFree(_))
        ));
        assert!(dev.is_allocated(page), "a refused free frees nothing");
        assert!(matches!(
            dev.free_page(frame),
            Err(EngineError::UnknownPfn(_))
        ));
        // A batch larger than the budget.
        let budget = dev.budget_pages();
        let in_use = dev.pages_in_use();
        let e = dev.alloc_pages(budget + 1, false).err().unwrap();
        assert!(
            matches!(e, EngineError::OutOfDeviceMemory { requested, .. } if requested == budget + 1)
        );
        assert_eq!(e.kind(), ErrorKind::OutOfMemory);
        assert_eq!(dev.pages_in_use(), in_use);
        assert!(dev.reserved_bytes() <= budget as u64 * PAGE_SIZE as u64);
        // Everything that is left can still be had, exactly.
        let rest = dev.alloc_pages(dev.pages_available(), false).unwrap();
        assert_eq!(dev.pages_in_use(), budget);
        assert!(dev.alloc_page(false).is_err());
        dev.free_pages(&rest).unwrap();
        // Overlaps inside one batch.
        let f2 = f.alloc(false).unwrap();
        assert!(matches!(
            dev.copy(&[(frame, page), (f2, page)]).err().unwrap(),
            EngineError::OverlappingCopy(p) if p == page
        ));
        assert_eq!(read_frame(&dev, frame), pattern(9));
        dev.free_page(page).unwrap();
        f.free_batch(&[frame, f2]).unwrap();
        assert!(matches!(f.free(frame), Err(EngineError::DoubleFree(_))));
    }
}

#[test]
fn zeroed_allocation_is_zero_after_reuse() {
    for k in KINDS {
        let Some(dev) = open_for_test(k, 1 << 20, "zeroed_allocation_is_zero_after_reuse") else {
            continue;
        };
        let n = dev.budget_pages();
        let frames = dev.frames().alloc_batch(n, false).unwrap();
        write_frames(&dev, &frames, 77);
        let pages = dev.alloc_pages(n, false).unwrap();
        dev.copy(&zip(&frames, &pages)).unwrap().wait().unwrap();
        assert_eq!(read_device(&dev, pages[3]), pattern(80));
        dev.free_pages(&pages).unwrap();
        // The whole budget is recycled pages now: every one must read as zeros.
        let again = dev.alloc_pages(n, true).unwrap();
        for &p in &again {
            assert_eq!(read_device(&dev, p), vec![0; PAGE_SIZE], "{k:?} page {p}");
        }
        dev.free_pages(&again).unwrap();
        // Host frames too.
        dev.frames().free_batch(&frames).unwrap();
        let z = dev.frames().alloc_batch(n, true).unwrap();
        assert!(z.iter().all(|&p| read_frame(&dev, p) == vec![0; PAGE_SIZE]));
        dev.frames().free_batch(&z).unwrap();
    }
}

#[test]
fn injected_failures_name_the_failed_pairs_and_keep_old_bytes() {
    for k in KINDS {
        let Some(dev) = open_for_test(k, 4 << 20, "injected_failures") else {
            continue;
        };
        let frames = dev.frames().alloc_batch(8, false).unwrap();
        write_frames(&dev, &frames, 5);
        let pages = dev.alloc_pages(8, true).unwrap();
        dev.inject_copy_failures(&[pages[2], pages[5]]);
        let e = dev.copy(&zip(&frames, &pages)).unwrap().wait().unwrap_err();
        match e {
            EngineError::CopyFailed { failed, .. } => assert_eq!(failed, vec![2, 5]),
            other => panic!("{other}"),
        }
        dev.inject_copy_failures(&[]);
        for i in 0..8 {
            let want = if i == 2 || i == 5 {
                vec![0; PAGE_SIZE]
            } else {
                pattern(5 + i as u64)
            };
            assert_eq!(read_device(&dev, pages[i]), want, "{k:?} page {i}");
        }
        dev.free_pages(&pages).unwrap();
        dev.frames().free_batch(&frames).unwrap();
    }
}

#[test]
fn several_batches_in_flight() {
    for k in KINDS {
        let Some(dev) = open_for_test(k, 16 << 20, "several_batches_in_flight") else {
            continue;
        };
        let frames = dev.frames().alloc_batch(64, false).unwrap();
        write_frames(&dev, &frames, 300);
        let pages = dev.alloc_pages(64, false).unwrap();
        let tickets: Vec<_> = (0..8)
            .map(|b| {
                dev.copy(&zip(&frames[b * 8..b * 8 + 8], &pages[b * 8..b * 8 + 8]))
                    .unwrap()
            })
            .collect();
        for t in tickets.iter().rev() {
            t.wait().unwrap();
            assert!(t.is_done().unwrap());
        }
        for i in 0..64 {
            assert_eq!(read_device(&dev, pages[i]), pattern(300 + i as u64));
        }
        dev.free_pages(&pages).unwrap();
        dev.frames().free_batch(&frames).unwrap();
    }
}

#[test]
fn default_selection_says_what_it_chose() {
    let dev = Device::open(hetmem_engine::DeviceConfig::default().budget(1 << 20)).unwrap();
    let info = dev.info();
    assert!(!info.name.is_empty() && !info.reason.is_empty());
    if hetmem_tests::running_in_ci() {
        assert_eq!(
            info.kind,
            DeviceKind::Vulkan,
            "CI has lavapipe: {}",
            info.reason
        );
    }
}

#[test]
fn unknown_device_kind_in_the_environment_is_an_error() {
    assert!(matches!(
        "tpu".parse::<DeviceKind>(),
        Err(EngineError::InvalidConfig(_))
    ));
    assert_eq!("Vulkan".parse::<DeviceKind>().unwrap(), DeviceKind::Vulkan);
}

/// The staging path (no host-memory import) gives the same bytes as the import path.
#[test]
fn staging_path_matches_import_path() {
    use hetmem_engine::{DeviceConfig, HostAccess, HostAccessMode};
    let mut results = Vec::new();
    for mode in [HostAccessMode::Auto, HostAccessMode::Staging] {
        let mut config = DeviceConfig::default()
            .kind(DeviceKind::Vulkan)
            .budget(16 << 20);
        config.host_access = mode;
        let dev = match Device::open(config) {
            Ok(d) => d,
            Err(e) if !hetmem_tests::running_in_ci() => {
                hetmem_tests::say_skipped(
                    "staging_path_matches_import_path",
                    DeviceKind::Vulkan,
                    &e,
                );
                return;
            }
            Err(e) => panic!("CI=true and no Vulkan device: {e}"),
        };
        if mode == HostAccessMode::Staging {
            assert_eq!(dev.info().host_access, HostAccess::Staging);
        }
        let n = 700;
        let f = dev.frames();
        let src = f.alloc_batch(n, false).unwrap();
        write_frames(&dev, &src, 4242);
        let pages = dev.alloc_pages(n, false).unwrap();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(1));
        let there: Vec<_> = order.iter().map(|&i| (src[i], pages[i])).collect();
        dev.copy(&there).unwrap().wait().unwrap();
        let back = f.alloc_batch(n, false).unwrap();
        let home: Vec<_> = (0..n).map(|i| (pages[i], back[(i * 3) % n])).collect();
        let t = dev.copy(&home).unwrap();
        while !t.is_done().unwrap() {}
        let bytes: Vec<Vec<u8>> = back.iter().map(|&b| read_frame(&dev, b)).collect();
        for i in 0..n {
            assert_eq!(
                bytes[(i * 3) % n],
                pattern(4242 + i as u64),
                "{mode:?} page {i}"
            );
        }
        results.push(bytes);
        dev.free_pages(&pages).unwrap();
        f.free_batch(&src).unwrap();
        f.free_batch(&back).unwrap();
    }
    assert!(results[0] == results[1]);
}

/// Scattered pages through the gather kernel give the same bytes as region copies.
#[test]
fn gather_kernel_matches_region_copies() {
    use hetmem_engine::GatherMode;
    let mut outputs = Vec::new();
    let cases = [DeviceKind::Vulkan, DeviceKind::Wgpu]
        .into_iter()
        .flat_map(|k| [GatherMode::Never, GatherMode::Always, GatherMode::Auto].map(|m| (k, m)));
    for (kind, mode) in cases {
        let mut config = test_config(kind, 32 << 20);
        config.gather = mode;
        // A missing device says so and the others are still compared.
        let Some(dev) = open_config(config, "gather_kernel_matches_region_copies") else {
            continue;
        };
        let n = 2000;
        let f = dev.frames();
        let src = f.alloc_batch(n, false).unwrap();
        write_frames(&dev, &src, 777);
        let mut pages = dev.alloc_pages(n, false).unwrap();
        pages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(2));
        let before = dev.stats();
        let up = zip(&src, &pages);
        dev.copy(&up).unwrap().wait().unwrap();
        // Device to device, scattered again.
        let mut other = dev.alloc_pages(n, false).unwrap();
        other.shuffle(&mut rand::rngs::StdRng::seed_from_u64(5));
        let across = zip(&pages, &other);
        dev.copy(&across).unwrap().wait().unwrap();
        let gathered = dev.stats().gathered_pages - before.gathered_pages;
        let cpu = dev.info().device_type == hetmem_engine::DeviceType::Cpu;
        // Vulkan gathers every group; wgpu reaches host frames only through staging and
        // cannot bind one buffer twice, so it gathers between distinct device chunks only.
        let eligible: usize = match kind {
            DeviceKind::Wgpu => dev
                .plan(&across)
                .unwrap()
                .groups
                .iter()
                .filter(|g| g.src != g.dst)
                .map(|g| g.pages())
                .sum(),
            _ => 2 * n,
        };
        assert!(eligible > n / 2, "the test must exercise the kernel");
        match mode {
            GatherMode::Never => assert_eq!(gathered, 0),
            GatherMode::Always => assert_eq!(gathered, eligible as u64, "{kind:?}"),
            // Measured slower than regions on a CPU device, so Auto leaves it out there.
            GatherMode::Auto if cpu => assert_eq!(gathered, 0),
            GatherMode::Auto => assert_eq!(gathered, eligible as u64, "{kind:?} on a GPU"),
        }
        let back = f.alloc_batch(n, false).unwrap();
        dev.copy(&zip(&other, &back)).unwrap().wait().unwrap();
        let bytes: Vec<Vec<u8>> = back.iter().map(|&p| read_frame(&dev, p)).collect();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(b, &pattern(777 + i as u64), "{kind:?} {mode:?} page {i}");
        }
        outputs.push(bytes);
        dev.free_pages(&pages).unwrap();
        dev.free_pages(&other).unwrap();
        f.free_batch(&src).unwrap();
        f.free_batch(&back).unwrap();
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
}

/// Queued batches (on lavapipe: copied by the engine's CPU copier, helped by waiting threads)
/// run in submission order with every other batch: a chain of copies, each reading what the
/// one before wrote, submitted without waiting in between, delivers the first source's bytes
/// at the end of the chain; a ticket dropped unwaited still copies. Run on every device kind
/// and on Vulkan through staging too (whose downloads land in frames only at retirement:
/// a later batch that reads or writes those frames on the host must come after them).
#[test]
fn queued_batches_keep_submission_order() {
    use hetmem_engine::HostAccessMode;
    let staging = {
        let mut c = test_config(DeviceKind::Vulkan, 64 << 20);
        c.host_access = HostAccessMode::Staging;
        c
    };
    let configs = KINDS
        .iter()
        .map(|&k| test_config(k, 64 << 20))
        .chain([staging]);
    for config in configs {
        let Some(dev) = open_config(config, "queued_batches_keep_submission_order") else {
            continue;
        };
        copy_chains(&dev);
    }
}

fn copy_chains(dev: &Device) {
    const N: usize = 700; // 2.7 MiB: above the size that goes to the copier
    let k = (dev.info().kind, dev.info().host_access);
    let f = dev.frames();
    for round in 0..20u64 {
        let src = f.alloc_batch(N, false).unwrap();
        let back = f.alloc_batch(N, false).unwrap();
        let back2 = f.alloc_batch(N, false).unwrap();
        let d1 = dev.alloc_pages(N, false).unwrap();
        let d2 = dev.alloc_pages(N, false).unwrap();
        write_frames(dev, &src, 10_000 * round);
        let t1 = dev.copy_queued(&zip(&src, &d1)).unwrap();
        let t2 = dev.copy_queued(&zip(&d1, &d2)).unwrap();
        // Batches in the middle of the chain that are not queued: 128 pages (small enough
        // to go to the device's queue alone), then the rest (shared with this thread on a
        // CPU device).
        let t3 = dev.copy(&zip(&d2[..128], &back[..128])).unwrap();
        let t3b = dev.copy(&zip(&d2[128..], &back[128..])).unwrap();
        drop(dev.copy_queued(&zip(&back, &back2)).unwrap());
        let last = dev.copy_queued(&zip(&back2, &src)).unwrap();
        last.wait().unwrap();
        for t in [t1, t2, t3, t3b] {
            assert!(t.is_done().unwrap(), "{k:?}: an earlier batch is not done");
        }
        for i in (0..N).step_by(37) {
            let want = pattern(10_000 * round + i as u64);
            assert_eq!(
                read_device(dev, d2[i]),
                want,
                "{k:?} round {round} d2 page {i}"
            );
            assert_eq!(
                read_frame(dev, back2[i]),
                want,
                "{k:?} round {round} back2 {i}"
            );
            assert_eq!(read_frame(dev, src[i]), want, "{k:?} round {round} src {i}");
        }
        dev.free_pages(&d1).unwrap();
        dev.free_pages(&d2).unwrap();
        for v in [src, back, back2] {
            f.free_batch(&v).unwrap();
        }
    }
    // Dropping the device with a queued batch nobody waits for ends (the copy is done before
    // the device goes).
    let src = f.alloc_batch(N, false).unwrap();
    let d = dev.alloc_pages(N, false).unwrap();
    drop(dev.copy_queued(&zip(&src, &d)).unwrap());
}

/// Threads queuing batches and waiting for them at once: each thread's bytes arrive whole,
/// whichever thread (the copier or a waiting one) copied them.
#[test]
fn queued_batches_from_many_threads() {
    const N: usize = 400;
    for k in KINDS {
        let Some(dev) = open_for_test(k, 128 << 20, "queued_batches_from_many_threads") else {
            continue;
        };
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let dev = &dev;
                s.spawn(move || {
                    let f = dev.frames();
                    let src = f.alloc_batch(N, false).unwrap();
                    let back = f.alloc_batch(N, false).unwrap();
                    let d = dev.alloc_pages(N, false).unwrap();
                    for round in 0..10u64 {
                        let seed = 1_000_000 * t + 1000 * round;
                        write_frames(dev, &src, seed);
                        dev.copy_queued(&zip(&src, &d)).unwrap().wait().unwrap();
                        dev.copy_queued(&zip(&d, &back)).unwrap().wait().unwrap();
                        for i in (0..N).step_by(41) {
                            assert_eq!(
                                read_frame(dev, back[i]),
                                pattern(seed + i as u64),
                                "{k:?} thread {t} round {round} page {i}"
                            );
                        }
                    }
                    dev.free_pages(&d).unwrap();
                    f.free_batch(&src).unwrap();
                    f.free_batch(&back).unwrap();
                });
            }
        });
    }
}

/// A batch whose ticket is dropped unwaited must not write a host frame after the drop: on
/// the staging path its readback landed in the frame whenever a later wait or poll retired
/// the batch, so a frame freed after the drop and handed to a new owner got the old batch's
/// bytes over the new owner's (read back: the device page's 0xAA, not the owner's 0x55).
/// Through the public API only: `copy_queued`, a dropped ticket, the pool's free and alloc.
#[test]
fn a_dropped_tickets_copy_never_lands_in_a_frame_freed_and_reused_after_the_drop() {
    use hetmem_engine::{HostAccessMode, HostFramePool};
    let name = "a_dropped_tickets_copy_never_lands_in_a_frame_freed_and_reused_after_the_drop";
    for mode in [HostAccessMode::Staging, HostAccessMode::Auto] {
        // A private pool: no other test's frees reorder its free list.
        let pool = HostFramePool::new(4 << 20).unwrap();
        let mut config = test_config(DeviceKind::Vulkan, 4 << 20);
        config.host_access = mode;
        config.frames = Some(pool.clone());
        let Some(dev) = open_config(config, name) else {
            return;
        };
        let pages = dev.alloc_pages(16, false).unwrap();
        for &p in &pages {
            dev.write_page(p, 0, &[0xAA; PAGE_SIZE]).unwrap();
        }
        let frames = pool.alloc_batch(16, false).unwrap();
        // Queued (the calling thread copies nothing), and the ticket dropped unwaited.
        drop(dev.copy_queued(&zip(&pages, &frames)).unwrap());
        pool.free_batch(&frames).unwrap();
        let reused = pool.alloc_batch(16, false).unwrap();
        let mut sorted = frames.clone();
        sorted.sort();
        assert_eq!(reused, sorted, "the pool hands the freed frames out again");
        for &f in &reused {
            pool.write(f, 0, &[0x55; PAGE_SIZE]).unwrap();
        }
        // Any later wait retires every batch before it on the queue.
        let other = pool.alloc(false).unwrap();
        dev.copy(&[(pages[0], other)]).unwrap().wait().unwrap();
        for (k, &f) in reused.iter().enumerate() {
            let got = read_frame(&dev, f);
            assert!(
                got.iter().all(|&b| b == 0x55),
                "{mode:?}: the new owner's frame {k} reads {:#04x} (the dropped batch's bytes)",
                got.iter().find(|&&b| b != 0x55).unwrap()
            );
        }
        dev.free_pages(&pages).unwrap();
        pool.free_batch(&reused).unwrap();
        pool.free(other).unwrap();
    }
}
