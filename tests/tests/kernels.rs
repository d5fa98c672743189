//! User kernels on the engine: WGSL with hetmem's helper, page tables, dispatch, faults.
// A dispatch binds a list of entry ranges, often of one buffer.
#![allow(clippy::single_range_in_vec_init)]

use hetmem_engine::{DeviceKind, EngineError, ErrorKind, KernelRejection, PAGE_SIZE};
use hetmem_tests::open_for_test;

use hetmem_tests::harness::ADD_KERNEL as ADD;

fn words(page: &[u8]) -> Vec<u32> {
    page.chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

#[test]
fn a_kernel_translates_through_the_page_table() {
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 8 << 20, "kernel_translates") else {
        return;
    };
    let kernel = dev.compile_kernel(ADD, "add").expect("compiles");
    // Three device pages, deliberately out of order in the table: virtual page k of the
    // window -> device page order[k].
    let pages = dev.alloc_pages(3, true).unwrap();
    let order = [pages[2], pages[0], pages[1]];
    for (k, &p) in order.iter().enumerate() {
        let data: Vec<u8> = (0..PAGE_SIZE / 4)
            .flat_map(|i| ((k * 10_000 + i) as u32).to_le_bytes())
            .collect();
        dev.write_page(p, 0, &data).unwrap();
    }
    let table = dev.page_table(8).unwrap();
    for (k, &p) in order.iter().enumerate() {
        table.set(k + 2, Some(p)).unwrap();
    }
    assert_eq!(table.get(3), Some(order[1]));
    assert_eq!(table.get(0), None);
    // Buffer 0 starts at virtual page 2 and spans 3 pages.
    let groups = (3 * PAGE_SIZE as u32 / 4).div_ceil(64);
    dev.dispatch(&kernel, &table, &[2..5], &[7, 3], [groups, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(table.faults(), (0, None));
    for (k, &p) in order.iter().enumerate() {
        let mut page = vec![0u8; PAGE_SIZE];
        dev.read_page(p, 0, &mut page).unwrap();
        let w = words(&page);
        assert!(
            w.iter()
                .enumerate()
                .all(|(i, &v)| v == (k * 10_000 + i) as u32 + 7),
            "virtual page {k} (device page {p}) not updated in place"
        );
    }

    // A page the table does not map: the kernel records a fault and writes nothing there.
    table.set(3, None).unwrap();
    dev.dispatch(&kernel, &table, &[2..5], &[1, 3], [groups, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    let (n, first) = table.faults();
    assert_eq!(
        n as usize,
        2 * PAGE_SIZE / 4,
        "one load and one store per word"
    );
    let first = first.expect("a fault site");
    assert_eq!(first.buffer, 0);
    assert_eq!(
        first.offset / PAGE_SIZE as u64,
        1,
        "page 1 of the buffer: entry 3"
    );
    let mut page = vec![0u8; PAGE_SIZE];
    dev.read_page(order[1], 0, &mut page).unwrap();
    assert_eq!(words(&page)[5], 10_005 + 7, "unmapped page left alone");
    dev.read_page(order[2], 0, &mut page).unwrap();
    assert_eq!(words(&page)[5], 20_005 + 8, "mapped page updated");
    table.reset_faults();
    assert_eq!(table.faults(), (0, None));
    dev.free_pages(&pages).unwrap();
}

#[test]
fn bad_kernels_and_bad_dispatches_are_refused() {
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 4 << 20, "bad_kernels") else {
        return;
    };
    let e = dev.compile_kernel("fn broken( {", "x").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    let e = dev.compile_kernel(ADD, "missing").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    let kernel = dev.compile_kernel(ADD, "add").unwrap();
    let table = dev.page_table(4).unwrap();
    let e = dev
        .dispatch(&kernel, &table, &[0..1], &[1, 1], [0, 1, 1])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    assert!(table.set(4, None).is_err(), "entry past the end");
    #[allow(clippy::reversed_empty_ranges)] // a reversed range is one of the bad inputs
    let bad_ranges = [3..5, 2..1];
    for bad in bad_ranges {
        let e = dev
            .dispatch(
                &kernel,
                &table,
                std::slice::from_ref(&bad),
                &[1, 1],
                [1, 1, 1],
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Misuse, "{bad:?}: {e}");
    }
    let host = open_for_test(DeviceKind::Host, 4 << 20, "bad_kernels").unwrap();
    assert!(
        table.set(0, Some(host.pfn_range().start)).is_err(),
        "foreign page"
    );
    let e = host.compile_kernel(ADD, "add").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let other = open_for_test(DeviceKind::Vulkan, 4 << 20, "bad_kernels").unwrap();
    let foreign = other.page_table(4).unwrap();
    let e = dev
        .dispatch(&kernel, &foreign, &[0..1], &[1, 1], [1, 1, 1])
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
}

/// Fills a device page with `base + i` in word `i`.
fn fill(dev: &hetmem_engine::Device, page: hetmem_engine::Pfn, base: u32) {
    let data: Vec<u8> = (0..PAGE_SIZE as u32 / 4)
        .flat_map(|i| (base + i).to_le_bytes())
        .collect();
    dev.write_page(page, 0, &data).unwrap();
}

/// Checks that word `i` of a device page holds `base + i`.
fn check(dev: &hetmem_engine::Device, page: hetmem_engine::Pfn, base: u32, what: &str) {
    let mut got = vec![0u8; PAGE_SIZE];
    dev.read_page(page, 0, &mut got).unwrap();
    let w = words(&got);
    let bad = (0..w.len()).find(|&i| w[i] != base + i as u32);
    assert!(bad.is_none(), "{what}: word {bad:?} is wrong");
}

#[test]
fn kernels_and_tables_dropped_while_their_launches_run() {
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 8 << 20, "drop_while_running") else {
        return;
    };
    hetmem_tests::harness::watchdog_for(
        "drop_while_running",
        std::time::Duration::from_secs(120),
        move || {
            let shared = std::sync::Arc::new(dev.compile_kernel(ADD, "add").unwrap());
            let groups = (PAGE_SIZE as u32 / 4).div_ceil(64);
            let mut threads = Vec::new();
            // One thread launches a kernel it keeps, over a table it keeps, all along.
            {
                let (dev, kernel) = (dev.clone(), shared.clone());
                threads.push(std::thread::spawn(move || {
                    let page = dev.alloc_page(true).unwrap();
                    fill(&dev, page, 1000);
                    let table = dev.page_table(2).unwrap();
                    table.set(1, Some(page)).unwrap();
                    for n in 1..=30u32 {
                        dev.dispatch(&kernel, &table, &[1..2], &[1, 1], [groups, 1, 1])
                            .unwrap()
                            .wait()
                            .unwrap();
                        assert_eq!(table.faults(), (0, None));
                        check(&dev, page, 1000 + n, "the steady launcher's page");
                    }
                    dev.free_page(page).unwrap();
                }));
            }
            // Others drop their kernel and their table right after launching, before the
            // launch is waited for; some drop the shared kernel's last other handle too.
            for t in 0..3u32 {
                let dev = dev.clone();
                threads.push(std::thread::spawn(move || {
                    let page = dev.alloc_page(true).unwrap();
                    let base = 100_000 * (t + 1);
                    fill(&dev, page, base);
                    for n in 1..=6u32 {
                        let kernel = dev.compile_kernel(ADD, "add").unwrap();
                        let table = dev.page_table(4).unwrap();
                        table.set(3, Some(page)).unwrap();
                        let ticket = dev
                            .dispatch(&kernel, &table, &[3..4], &[2, 1], [groups, 1, 1])
                            .unwrap();
                        drop(kernel);
                        drop(table);
                        ticket.wait().unwrap();
                        check(&dev, page, base + 2 * n, "a page whose kernel was dropped");
                    }
                    dev.free_page(page).unwrap();
                }));
            }
            drop(shared);
            for h in threads {
                h.join().unwrap();
            }
            // A last launch retires whatever is left: nothing stays buried.
            let kernel = dev.compile_kernel(ADD, "add").unwrap();
            let table = dev.page_table(1).unwrap();
            let page = dev.alloc_page(true).unwrap();
            fill(&dev, page, 0);
            table.set(0, Some(page)).unwrap();
            let ticket = dev
                .dispatch(&kernel, &table, &[0..1], &[5, 1], [groups, 1, 1])
                .unwrap();
            drop(table);
            drop(kernel);
            ticket.wait().unwrap();
            check(&dev, page, 5, "the last launch's page");
            assert_eq!(dev.deferred_destroys(), 0, "objects left unburied");
            dev.free_page(page).unwrap();
        },
    );
}

#[test]
fn kernels_outside_the_layout_or_the_limits_are_refused_before_any_pipeline() {
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 4 << 20, "layout_refused") else {
        return;
    };
    let refused = |src: &str| match dev.compile_kernel(src, "main") {
        Err(e @ EngineError::KernelRejected(_)) => {
            assert_eq!(e.kind(), ErrorKind::Misuse);
            match e {
                EngineError::KernelRejected(r) => r,
                _ => unreachable!(),
            }
        }
        Err(e) => panic!("expected a rejection, got {e}"),
        Ok(_) => panic!("expected a rejection, it compiled"),
    };
    // A binding of its own outside group 0 (this crashed the driver at pipeline creation).
    let r = refused(
        "@group(1) @binding(0) var<storage, read_write> mine: array<u32>;\n\
         @compute @workgroup_size(64)\n\
         fn main(@builtin(global_invocation_id) g: vec3<u32>) { mine[g.x] = 1u; }\n",
    );
    assert!(
        matches!(&r, KernelRejection::OwnResource { name, line: 1, .. } if name == "mine"),
        "{r:?}"
    );
    // 16 MiB of workgroup memory, far over the device's limit.
    let r = refused(
        "var<workgroup> big: array<u32, 4194304>;\n\
         @compute @workgroup_size(64)\n\
         fn main(@builtin(local_invocation_index) i: u32) { big[i] = i; }\n",
    );
    assert!(
        matches!(r, KernelRejection::WorkgroupMemory { bytes: Some(b), limit } if b == 16 << 20 && limit < b),
        "{r:?}"
    );
    // A million invocations per workgroup.
    let r = refused(
        "@compute @workgroup_size(1024, 1024, 1)\n\
         fn main() { hm_store(hm_ptr(0u, 0u), 1u); }\n",
    );
    assert!(
        matches!(
            r,
            KernelRejection::WorkgroupSize {
                size: [1024, 1024, 1],
                ..
            }
        ),
        "{r:?}"
    );
    // Within the limits, workgroup memory works.
    let ok = dev
        .compile_kernel(
            "var<workgroup> tile: array<u32, 64>;\n\
             @compute @workgroup_size(64)\n\
             fn main(@builtin(local_invocation_index) i: u32) {\n\
                 tile[i] = hm_load(hm_ptr(0u, i * 4u));\n\
                 workgroupBarrier();\n\
                 hm_store(hm_ptr(0u, i * 4u), tile[63u - i]);\n\
             }\n",
            "main",
        )
        .unwrap();
    let page = dev.alloc_page(true).unwrap();
    fill(&dev, page, 0);
    let table = dev.page_table(1).unwrap();
    table.set(0, Some(page)).unwrap();
    dev.dispatch(&ok, &table, &[0..1], &[], [1, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    let mut got = vec![0u8; PAGE_SIZE];
    dev.read_page(page, 0, &mut got).unwrap();
    let w = words(&got);
    assert_eq!(&w[..3], &[63, 62, 61], "reversed through workgroup memory");
    assert_eq!(w[64], 64, "past the workgroup untouched");
    dev.free_page(page).unwrap();
}

/// Reads 1024 words of bound buffer 0 from byte `hm_arg(0)` into its first page, and writes
/// 0xdead into 1024 words from byte `hm_arg(1)`, through `hm_ptr`, a forged `HmPtr`, or a
/// page handle, as `hm_arg(2)` says (0, 1, 2).
const PROBE: &str = r#"
@compute @workgroup_size(64)
fn probe(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x >= 1024u) {
        return;
    }
    var v = 0u;
    switch hm_arg(2) {
        case 0u: {
            v = hm_load(hm_ptr(0u, hm_arg(0) + g.x * 4u));
            hm_store(hm_ptr(0u, hm_arg(1) + g.x * 4u), 0xdeadu);
        }
        case 1u: {
            // A word index past the page: the next device page, if it were not checked.
            v = hm_load(HmPtr(0u, 0u, 1024u + g.x));
            hm_store(HmPtr(0u, 0u, 2048u + g.x), 0xdeadu);
        }
        default: {
            let p = hm_page(0u, 0u);
            v = hm_page_load(p, 1024u + g.x);
            hm_page_store(p, 2048u + g.x, 0xdeadu);
        }
    }
    hm_store(hm_ptr(0u, g.x * 4u), v);
}
"#;

/// Long: one scenario read top to bottom (the buffers, each out-of-range access, the checks
/// that nothing else changed); its steps share the fixture.
#[test]
fn a_kernel_reaches_only_the_pages_its_launch_bound() {
    let Some(dev) = open_for_test(DeviceKind::Vulkan, 4 << 20, "bound_pages_only") else {
        return;
    };
    let kernel = dev.compile_kernel(PROBE, "probe").unwrap();
    // Four consecutive device pages: buffer 0 is the first (entry 0), the others are
    // mapped by the table right after it (entries 1..4) but not bound.
    let pages = dev.alloc_pages(4, true).unwrap();
    let table = dev.page_table(4).unwrap();
    for (k, &p) in pages.iter().enumerate() {
        fill(&dev, p, 1000 * k as u32);
        table.set(k, Some(p)).unwrap();
    }
    let page = PAGE_SIZE as u32;
    for (mode, read_at, write_at) in [(0u32, page, 2 * page), (1, 0, 0), (2, 0, 0)] {
        table.reset_faults();
        fill(&dev, pages[0], 0);
        dev.dispatch(
            &kernel,
            &table,
            &[0..1],
            &[read_at, write_at, mode],
            [16, 1, 1],
        )
        .unwrap()
        .wait()
        .unwrap();
        let (n, site) = table.faults();
        if mode < 2 {
            assert_eq!(
                n,
                2 * 1024,
                "mode {mode}: every load and store outside faults"
            );
            let site = site.unwrap();
            assert_eq!(site.buffer, 0);
            if mode == 0 {
                assert!(
                    (u64::from(page)..3 * u64::from(page)).contains(&site.offset),
                    "{site:?}"
                );
            } else {
                assert!(
                    site.offset >= u64::from(page),
                    "past the page's words: {site:?}"
                );
            }
        } else {
            assert_eq!(
                n, 0,
                "a page handle's words outside the page are dropped quietly"
            );
        }
        let mut got = vec![0u8; PAGE_SIZE];
        dev.read_page(pages[0], 0, &mut got).unwrap();
        assert!(
            words(&got).iter().all(|&w| w == 0),
            "mode {mode}: reads outside the bound page give zeros"
        );
        for (k, &p) in pages.iter().enumerate().skip(1) {
            check(&dev, p, 1000 * k as u32, "a page that was not bound");
        }
    }
    // A buffer index the launch did not bind is outside too.
    table.reset_faults();
    let stray = dev
        .compile_kernel(
            "@compute @workgroup_size(1)\nfn main() { hm_store(hm_ptr(1u, 0u), hm_load(hm_ptr(3u, 8u))); }\n",
            "main",
        )
        .unwrap();
    dev.dispatch(&stray, &table, &[0..1], &[], [1, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    let (n, site) = table.faults();
    assert_eq!(n, 2);
    let site = site.unwrap();
    assert!(site.buffer == 1 || site.buffer == 3, "{site:?}");
    for (k, &p) in pages.iter().enumerate().skip(1) {
        check(&dev, p, 1000 * k as u32, "a page that was not bound");
    }
    dev.free_pages(&pages).unwrap();
}
