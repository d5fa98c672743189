//! The copy engine, checked byte for byte on every device kind against the host device.
#![allow(clippy::needless_range_loop)] // page i of several parallel arrays

use hetmem_engine::{Device, DeviceKind, EngineError, ErrorKind, Pfn, PAGE_SIZE};
use hetmem_tests::engine_bytes::{pattern, read_device, read_frame, write_frames, zip};
use hetmem_tests::{open_config, open_for_test, test_config, KINDS};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

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
