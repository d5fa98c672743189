//! The offload API: managed buffers, prefetch, advice, eviction, device pins, bad input.
//!
//! Long: a little over the limit; its tests share the context helpers and the kernels' WGSL
//! sources.

use hetmem::mm::{MemoryKind, PageState};
use hetmem::offload::{Advice, Context, ContextConfig, Location};
use hetmem::Error;
use hetmem::VirtAddr;
use hetmem_engine::{DeviceConfig, DeviceKind};

fn context(kind: DeviceKind, budget: u64, test: &str) -> Option<Context> {
    hetmem_tests::harness::offload_context(kind, budget, None, test)
}

fn states(ctx: &Context, addr: VirtAddr, pages: usize) -> Vec<PageState> {
    hetmem::mm::snapshot(ctx.space(), addr, pages, ctx.driver().owner())
}

#[test]
fn prefetch_evict_and_cpu_access() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let Some(ctx) = context(kind, 1 << 20, "prefetch_evict") else {
            continue;
        };
        let buf = ctx.alloc(10 * 4096 + 100).unwrap();
        let data: Vec<u8> = (0..buf.len()).map(|i| (i % 199) as u8).collect();
        buf.write(0, &data).unwrap();
        let t = buf.prefetch(0..buf.len(), Location::Device).unwrap();
        assert_eq!(t.wait().unwrap().migrated, 11);
        assert!(states(&ctx, buf.addr(), 11)
            .iter()
            .all(|&s| s == PageState::DevicePrivateLocal));
        let moved = buf.evict(4096..3 * 4096).unwrap();
        assert_eq!(moved.migrated, 2);
        let mut got = vec![0; buf.len()];
        buf.read(0, &mut got).unwrap();
        assert_eq!(got, data);
        let s = ctx.stats();
        assert_eq!(s.bytes_to_device, 11 * 4096);
        assert!(s.faults >= 1);
    }
}

#[test]
fn advice_moves_and_protects_pages() {
    let Some(ctx) = context(DeviceKind::Host, 8 * 4096, "advice") else {
        return;
    };
    let hot = ctx.alloc(4 * 4096).unwrap();
    let cold = ctx.alloc(4 * 4096).unwrap();
    hot.advise(Advice::PreferredLocation(Location::Device))
        .unwrap();
    assert_eq!(hot.preferred(), Some(Location::Device));
    cold.prefetch(0..cold.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    hot.advise(Advice::AccessedBy(Location::Device)).unwrap();
    // The budget is full: a third buffer's prefetch evicts, and the cold pages go first.
    let third = ctx.alloc(4 * 4096).unwrap();
    third
        .prefetch(0..third.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert!(states(&ctx, hot.addr(), 4)
        .iter()
        .all(|&s| s == PageState::DevicePrivateLocal));
    assert!(states(&ctx, cold.addr(), 4)
        .iter()
        .all(|&s| s != PageState::DevicePrivateLocal));
    assert!(ctx.stats().evictions >= 4);
}

#[test]
fn device_pins_hold_pages_for_a_kernel() {
    let Some(ctx) = context(DeviceKind::Host, 4 * 4096, "device_pins") else {
        return;
    };
    let a = ctx.alloc(4 * 4096).unwrap();
    a.write(0, &[6u8; 4 * 4096]).unwrap();
    let pin = a.pin_on_device(0..2 * 4096).unwrap();
    assert_eq!(pin.pfns().len(), 2);
    // A kernel "runs": other work needs the whole budget, but the pinned pages stay.
    let b = ctx.alloc(4 * 4096).unwrap();
    b.prefetch(0..b.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert!(states(&ctx, a.addr(), 2)
        .iter()
        .all(|&s| s == PageState::DevicePrivateLocal));
    assert!(ctx.driver().resident_pages() <= 4, "the budget holds");
    // The CPU cannot take a pinned device page away from the kernel.
    assert!(matches!(
        a.read(4100, &mut [0u8; 4]),
        Err(Error::HeldOnDevice { addr, offset: 4100 }) if addr == a.addr()
    ));
    drop(pin);
    let mut got = vec![0; 4 * 4096];
    a.read(0, &mut got).unwrap();
    assert!(got.iter().all(|&x| x == 6));
}

#[test]
fn bad_input_is_refused_and_nothing_is_lost() {
    let Some(ctx) = context(DeviceKind::Host, 4 * 4096, "offload_bad_input") else {
        return;
    };
    let buf = ctx.alloc(8 * 4096).unwrap();
    buf.write(0, &[9u8; 8 * 4096]).unwrap();
    assert!(matches!(
        buf.prefetch(0..9 * 4096, Location::Device),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        buf.read(8 * 4096 - 2, &mut [0; 4]),
        Err(Error::OutOfBounds { .. })
    ));
    let e = buf.prefetch(0..8 * 4096, Location::Device).err().unwrap();
    assert!(
        matches!(
            e,
            Error::OverBudget {
                pages: 8,
                budget: 4
            }
        ),
        "{e}"
    );
    assert_eq!(e.kind(), hetmem::ErrorKind::OutOfMemory);
    let mut got = vec![0; 8 * 4096];
    buf.read(0, &mut got).unwrap();
    assert!(
        got.iter().all(|&x| x == 9),
        "a refused prefetch loses nothing"
    );
    assert!(matches!(ctx.alloc(0), Err(Error::EmptyRange)));
    let other = buf.clone();
    buf.free().unwrap();
    assert!(matches!(
        other.prefetch(0..4096, Location::Device),
        Err(Error::Freed)
    ));
    assert!(matches!(other.free(), Err(Error::Freed)));
    assert!(ctx.space().vma(buf.addr()).is_none());
}

#[test]
fn the_demo_scenario_at_small_size() {
    use hetmem_tests::kv::{run_kv, KvShape};
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let shape = KvShape {
            blocks: 12,
            block_bytes: 64 * 4096,
            working_set: 3,
            steps: 8,
        };
        let Some(ctx) = context(kind, 4 * 64 * 4096, "demo_small") else {
            continue;
        };
        let report = run_kv(&ctx, shape, |_| {}).unwrap();
        assert_eq!(report.blocks_ok, 12, "{kind:?}: checksums");
        assert_eq!(report.spot_checks_ok, report.spot_checks);
        let expected = if kind == DeviceKind::Vulkan {
            hetmem_tests::kv::DeviceStep::Kernel
        } else {
            hetmem_tests::kv::DeviceStep::HostFunction
        };
        assert_eq!(report.device_step, expected, "{kind:?}");
        let s = ctx.stats();
        assert!(s.evictions > 0 && s.faults > 0, "{kind:?}: {s:?}");
        // The phases partition the run's traffic: every fault, eviction and byte moved
        // happened in exactly one of them, and each phase did what it says.
        let named = report.phases.named();
        let sum =
            |f: fn(&hetmem_tests::kv::Phase) -> u64| named.iter().map(|(_, p)| f(p)).sum::<u64>();
        assert_eq!(sum(|p| p.faults), s.faults, "{kind:?}: {named:?}");
        assert_eq!(sum(|p| p.evictions), s.evictions, "{kind:?}: {named:?}");
        assert_eq!(
            sum(|p| p.bytes_moved),
            s.bytes_to_device + s.bytes_to_host,
            "{kind:?}: {named:?}"
        );
        let p = report.phases;
        assert_eq!(p.fill.bytes_moved, 0, "{kind:?}: blocks start on the host");
        assert!(
            p.moving.bytes_moved >= (3 * 64 * 4096) as u64, // the first working set, at least
            "{kind:?}: {p:?}"
        );
        assert!(p.moving.evictions > 0, "{kind:?}: {p:?}");
        assert_eq!(p.moving.faults, 0, "{kind:?}: prefetches do not fault");
        assert!(
            p.cpu_reads.faults > 0 && p.check.faults > 0,
            "{kind:?}: {p:?}"
        );
        assert!(
            ctx.driver().resident_pages() <= 4 * 64,
            "never over the budget"
        );
    }
}

/// Adds `hm_arg(0)` to every word of bound buffer 0 (`hm_arg(1)` pages) and copies the
/// result into bound buffer 1 when two are bound.
const ADD: &str = r#"
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    if (gid.x >= hm_arg(1) * HM_PAGE_WORDS) {
        return;
    }
    let p = hm_ptr(0u, gid.x * 4u);
    let v = hm_load(p) + hm_arg(0);
    hm_store(p, v);
    if (hm_buffers() > 1u) {
        hm_store(hm_ptr(1u, gid.x * 4u), v);
    }
}
"#;

fn word_bytes(n: usize, f: impl Fn(usize) -> u32) -> Vec<u8> {
    (0..n).flat_map(|i| f(i).to_le_bytes()).collect()
}

#[test]
fn a_kernel_between_prefetch_and_unpin_sees_the_right_bytes() {
    let Some(ctx) = context(DeviceKind::Vulkan, 64 * 4096, "kernel_sees_right_bytes") else {
        return;
    };
    let kernel = ctx.compile_kernel(ADD, "add").unwrap();
    let pages = 24;
    let a = ctx.alloc(pages * 4096).unwrap();
    let out = ctx.alloc(pages * 4096).unwrap();
    a.write(0, &word_bytes(pages * 1024, |i| i as u32 * 3))
        .unwrap();
    // Half of `a` goes to the device first, scattered among other buffers' pages.
    let filler = ctx.alloc(8 * 4096).unwrap();
    a.prefetch(0..pages * 4096 / 2, Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    filler
        .prefetch(0..filler.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let groups = (pages as u32 * 1024).div_ceil(64);
    let run = ctx
        .launch(
            &kernel,
            &[(&a, 0..a.len()), (&out, 0..out.len())],
            &[5, pages as u32],
            [groups, 1, 1],
        )
        .unwrap();
    // While it runs, its pages are pinned: the CPU cannot take them.
    assert!(states(&ctx, a.addr(), pages)
        .iter()
        .all(|&s| s == PageState::DevicePrivateLocal));
    // The table maps each page to the device page its PTE names.
    for k in 0..pages as u64 {
        let addr = a.addr() + k * 4096;
        assert_eq!(
            ctx.driver().table_entry(ctx.space(), addr),
            ctx.space().pte(addr).pfn()
        );
    }
    run.wait().unwrap();
    let mut got = vec![0u8; pages * 4096];
    a.read(0, &mut got).unwrap();
    assert_eq!(got, word_bytes(pages * 1024, |i| i as u32 * 3 + 5));
    out.read(0, &mut got).unwrap();
    assert_eq!(got, word_bytes(pages * 1024, |i| i as u32 * 3 + 5));
    // The CPU reads faulted pages back: their table entries are gone.
    let back = a.addr();
    assert_eq!(ctx.driver().table_entry(ctx.space(), back), None);
    // A prefetch (a migration) puts entries back without a launch.
    a.prefetch(0..a.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let e = ctx.driver().table_entry(ctx.space(), back);
    assert!(e.is_some());
    assert_eq!(e, ctx.space().pte(back).pfn());
    // Eviction clears them again.
    ctx.driver().evict_all().unwrap();
    assert_eq!(ctx.driver().table_entry(ctx.space(), back), None);
    // Second run, from the host: the launch brings the pages in.
    ctx.launch(
        &kernel,
        &[(&a, 0..a.len())],
        &[1, pages as u32],
        [groups, 1, 1],
    )
    .unwrap()
    .wait()
    .unwrap();
    a.read(0, &mut got).unwrap();
    assert_eq!(got, word_bytes(pages * 1024, |i| i as u32 * 3 + 6));
}

#[test]
fn a_kernel_past_its_buffer_faults_and_bad_launches_are_refused() {
    let Some(ctx) = context(DeviceKind::Vulkan, 16 * 4096, "kernel_faults") else {
        return;
    };
    let kernel = ctx.compile_kernel(ADD, "add").unwrap();
    let a = ctx.alloc(4 * 4096).unwrap();
    a.write(0, &word_bytes(4 * 1024, |i| i as u32)).unwrap();
    // Only the first two pages are bound, but the kernel is told four.
    let e = ctx
        .launch(&kernel, &[(&a, 0..2 * 4096)], &[1, 4], [64, 1, 1])
        .unwrap()
        .wait()
        .unwrap_err();
    match e {
        Error::KernelFault {
            buffer,
            addr,
            offset,
            accesses,
        } => {
            assert_eq!((buffer, addr), (0, Some(a.addr())));
            assert!((2 * 4096..4 * 4096).contains(&offset), "{offset}");
            assert_eq!(
                accesses,
                2 * 2 * 1024,
                "a load and a store per word outside"
            );
        }
        other => panic!("expected a kernel fault, got {other}"),
    }
    let mut got = vec![0u8; 4 * 4096];
    a.read(0, &mut got).unwrap();
    assert_eq!(
        got,
        word_bytes(4 * 1024, |i| i as u32 + u32::from(i < 2 * 1024)),
        "bound pages updated, the rest untouched"
    );
    // Bad input: typed errors, nothing moves.
    let big = ctx.alloc(32 * 4096).unwrap();
    assert!(matches!(
        ctx.launch(&kernel, &[(&big, 0..big.len())], &[1, 32], [1, 1, 1]),
        Err(Error::OverBudget { .. })
    ));
    assert!(matches!(
        ctx.launch(&kernel, &[(&a, 0..5 * 4096)], &[1, 1], [1, 1, 1]),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        ctx.launch(&kernel, &[], &[1, 1], [1, 1, 1]),
        Err(Error::InvalidArgument(_))
    ));
    big.free().unwrap();
    assert!(matches!(
        ctx.launch(&kernel, &[(&big, 0..4096)], &[1, 1], [1, 1, 1]),
        Err(Error::Freed)
    ));
    a.read(0, &mut got).unwrap();
    assert_eq!(
        got,
        word_bytes(4 * 1024, |i| i as u32 + u32::from(i < 2 * 1024))
    );
    let other = context(DeviceKind::Vulkan, 16 * 4096, "kernel_faults").unwrap();
    let theirs = other.alloc(4096).unwrap();
    assert!(matches!(
        ctx.launch(&kernel, &[(&theirs, 0..4096)], &[1, 1], [1, 1, 1]),
        Err(Error::InvalidArgument(_))
    ));
    let host = context(DeviceKind::Host, 16 * 4096, "kernel_faults").unwrap();
    assert!(host.kernel_support().is_err());
    assert!(host.compile_kernel(ADD, "add").is_err());
}

/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn kernels_racing_faults_and_evictions_lose_no_update() {
    let Some(ctx) = context(DeviceKind::Vulkan, 32 * 4096, "kernels_racing") else {
        return;
    };
    let kernel = ctx.compile_kernel(ADD, "add").unwrap();
    let pages = 16;
    let a = ctx.alloc(pages * 4096).unwrap();
    a.write(0, &word_bytes(pages * 1024, |i| i as u32)).unwrap();
    let other = ctx.alloc(32 * 4096).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let launches = std::thread::scope(|s| {
        let churn = s.spawn(|| {
            let mut rng = 0x2545_f491_u64;
            let mut w = [0u8; 4];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                match rng % 3 {
                    // A CPU read faults a page back (or finds it pinned by a kernel).
                    0 => match a.read(((rng as usize >> 8) % (pages * 4096)) & !3, &mut w) {
                        Ok(()) | Err(Error::HeldOnDevice { .. }) => {}
                        Err(e) => panic!("read: {e}"),
                    },
                    // Other work evicts whatever is not pinned.
                    1 => {
                        other
                            .prefetch(0..other.len(), Location::Device)
                            .unwrap()
                            .wait()
                            .unwrap();
                    }
                    _ => {
                        ctx.driver().evict_all().unwrap();
                    }
                }
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(1500);
        let mut n = 0u32;
        let mut failure = None;
        let mut busy = 0;
        while std::time::Instant::now() < deadline {
            match ctx
                .launch(
                    &kernel,
                    &[(&a, 0..a.len())],
                    &[1, pages as u32],
                    [256, 1, 1],
                )
                .and_then(|l| l.wait())
            {
                Ok(()) => n += 1,
                // Pages the other thread keeps moving may not settle: nothing ran, and the
                // error names the buffer and an offset in the bound range.
                Err(Error::BufferBusy { addr, offset }) if addr == a.addr() && offset < a.len() => {
                    busy += 1
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        churn.join().unwrap();
        if let Some(e) = failure {
            panic!("launch {n} failed: {e}");
        }
        eprintln!("{n} launches, {busy} refused as busy");
        n
    });
    assert!(launches > 0);
    let mut got = vec![0u8; pages * 4096];
    a.read(0, &mut got).unwrap();
    let want = word_bytes(pages * 1024, |i| i as u32 + launches);
    let wrong: Vec<usize> = (0..pages * 1024)
        .filter(|&w| got[4 * w..4 * w + 4] != want[4 * w..4 * w + 4])
        .collect();
    assert!(
        wrong.is_empty(),
        "{} words lost updates after {launches} launches, first at word {} (page {}): {:?}",
        wrong.len(),
        wrong[0],
        wrong[0] / 1024,
        u32::from_le_bytes(got[4 * wrong[0]..4 * wrong[0] + 4].try_into().unwrap())
            .wrapping_sub(wrong[0] as u32)
    );
}

/// Doubles word `i` and adds `i`, for every word of bound buffer 0 (`hm_arg(0)` words),
/// over a grid of two or three dimensions.
const TWICE_PLUS_INDEX: &str = r#"
@compute @workgroup_size(64)
fn twice(@builtin(workgroup_id) wg: vec3<u32>,
         @builtin(num_workgroups) n: vec3<u32>,
         @builtin(local_invocation_index) lane: u32) {
    let i = hm_invocation(wg, n, lane, 64u);
    if (i >= hm_arg(0)) {
        return;
    }
    let p = hm_ptr(0u, i * 4u);
    hm_store(p, hm_load(p) * 2u + i);
}
"#;

#[test]
fn a_64_mib_buffer_launches_over_a_2d_grid_and_every_word_changes_once() {
    use hetmem::offload::workgroups;
    let bytes = 64 << 20;
    // 16 MiB chunks: a kernel binds every chunk of the budget, and devices allow a few dozen.
    let config = ContextConfig {
        device: DeviceConfig::default()
            .kind(DeviceKind::Vulkan)
            .chunk(16 << 20),
        budget_bytes: bytes as u64,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around: 16,
    };
    let ctx = match Context::new(config) {
        Ok(c) => c,
        Err(e) => {
            assert!(
                !hetmem_tests::running_in_ci(),
                "CI=true and no Vulkan device: {e}"
            );
            hetmem_tests::say_skipped("kernel_over_64_mib", DeviceKind::Vulkan, &e);
            return;
        }
    };
    let kernel = ctx.compile_kernel(TWICE_PLUS_INDEX, "twice").unwrap();
    let buf = ctx.alloc(bytes).unwrap();
    let words = bytes / 4;
    buf.write(0, &word_bytes(words, |i| (i as u32) ^ 0x5a5a_5a5a))
        .unwrap();
    let groups = workgroups(bytes, 4, 64).unwrap();
    assert!(groups[1] > 1, "64 MiB needs a second dimension: {groups:?}");
    ctx.launch(&kernel, &[(&buf, 0..bytes)], &[words as u32], groups)
        .unwrap()
        .wait()
        .unwrap();
    let mut out = vec![0u8; bytes];
    buf.read(0, &mut out).unwrap();
    // Every word exactly once: a word missed or done twice (overlapping rows) shows.
    for (i, w) in out.chunks_exact(4).enumerate() {
        let got = u32::from_le_bytes(w.try_into().unwrap());
        let want = ((i as u32) ^ 0x5a5a_5a5a)
            .wrapping_mul(2)
            .wrapping_add(i as u32);
        assert_eq!(got, want, "word {i} of {words}");
    }
}

/// Copies 1024 words of kernel buffer `hm_arg(0)` from byte `hm_arg(1)` into the first page
/// of buffer 0, and writes 0xdead into 1024 words of the same buffer from byte `hm_arg(2)`.
const PROBE: &str = r#"
@compute @workgroup_size(64)
fn probe(@builtin(global_invocation_id) g: vec3<u32>) {
    if (g.x >= 1024u) {
        return;
    }
    let v = hm_load(hm_ptr(hm_arg(0), hm_arg(1) + g.x * 4u));
    hm_store(hm_ptr(hm_arg(0), hm_arg(2) + g.x * 4u), 0xdeadu);
    hm_store(hm_ptr(0u, g.x * 4u), v);
}
"#;

/// Long: one scenario read top to bottom (the buffers, each out-of-range access, the checks
/// that nothing else changed); its steps share the fixture.
#[test]
fn a_kernel_outside_its_ranges_faults_naming_the_buffer_and_touches_nothing_else() {
    let Some(ctx) = context(DeviceKind::Vulkan, 32 * 4096, "kernel_outside_ranges") else {
        return;
    };
    let kernel = ctx.compile_kernel(PROBE, "probe").unwrap();
    let a = ctx.alloc(2 * 4096).unwrap();
    let b = ctx.alloc(2 * 4096).unwrap();
    let gone = ctx.alloc(2 * 4096).unwrap();
    let pattern = |tag: u32| word_bytes(2 * 1024, move |i| tag << 16 | i as u32);
    a.write(0, &pattern(0xa)).unwrap();
    b.write(0, &pattern(0xb)).unwrap();
    gone.write(0, &pattern(0xf)).unwrap();
    // `gone` runs a kernel (its pages get device pages and table entries), then is freed.
    ctx.launch(
        &kernel,
        &[(&gone, 0..gone.len())],
        &[0, 4096, 4096],
        [16, 1, 1],
    )
    .unwrap()
    .wait()
    .unwrap();
    gone.free().unwrap();
    let zeros = word_bytes(1024, |_| 0);
    // Buffer 1 is the second page of `b` only: its page before, its page after, and the
    // freed buffer's pages beyond are all outside.
    for (read_at, write_at) in [
        (4096u32, 4096u32),
        (8192, 3 * 4096),
        (u32::MAX - 4095, 4096),
    ] {
        a.write(0, &pattern(0xa)).unwrap();
        let e = ctx
            .launch(
                &kernel,
                &[(&a, 0..4096), (&b, 4096..2 * 4096)],
                &[1, read_at, write_at],
                [16, 1, 1],
            )
            .unwrap()
            .wait()
            .unwrap_err();
        match e {
            Error::KernelFault {
                buffer: 1,
                addr: Some(at),
                offset,
                accesses: 2048,
            } => {
                assert_eq!(
                    at,
                    b.addr() + 4096,
                    "buffer 1's offset 0 is b's second page"
                );
                assert!(offset >= 4096, "{offset}");
            }
            other => panic!("{read_at}/{write_at}: expected a fault in buffer 1, got {other}"),
        }
        let mut got = vec![0u8; 2 * 4096];
        a.read(0, &mut got).unwrap();
        assert_eq!(
            &got[..4096],
            &zeros[..],
            "reads outside the range give zeros"
        );
        assert_eq!(
            &got[4096..],
            &pattern(0xa)[4096..],
            "a's unbound page untouched"
        );
        b.read(0, &mut got).unwrap();
        assert_eq!(got, pattern(0xb), "b untouched");
    }
    // A buffer index the launch never bound.
    let e = ctx
        .launch(&kernel, &[(&a, 0..4096)], &[2, 0, 0], [16, 1, 1])
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::KernelFault {
                buffer: 2,
                addr: None,
                offset: 0,
                ..
            }
        ),
        "{e}"
    );
    // The helper's raw accessors are not reachable: such a kernel does not compile.
    let e = ctx
        .compile_kernel(
            "@compute @workgroup_size(1)\nfn main() { hm_store(hm_ptr(0u, 0u), hm__chunk_load(0u, 0u)); }\n",
            "main",
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Engine(hetmem_engine::EngineError::KernelRejected(
                hetmem_engine::KernelRejection::HelperInternals { .. }
            ))
        ),
        "{e}"
    );
}

#[test]
fn cpu_access_free_and_evict_during_a_launch() {
    let Some(ctx) = context(DeviceKind::Vulkan, 32 * 4096, "during_a_launch") else {
        return;
    };
    hetmem_tests::harness::watchdog("during_a_launch", move || {
        let kernel = ctx.compile_kernel(ADD, "add").unwrap();
        let pages = 8;
        let a = ctx.alloc(pages * 4096).unwrap();
        let b = ctx.alloc(pages * 4096).unwrap();
        let c = ctx.alloc(4096).unwrap();
        let start = word_bytes(pages * 1024, |i| i as u32 * 7);
        a.write(0, &start).unwrap();
        c.write(0, &[9u8; 4096]).unwrap();
        let groups = (pages as u32 * 1024).div_ceil(64);
        let run = ctx
            .launch(
                &kernel,
                &[(&a, 0..a.len()), (&b, 0..b.len())],
                &[5, pages as u32],
                [groups, 1, 1],
            )
            .unwrap();
        // CPU access to a held range: a typed error naming the buffer and the offset, and
        // nothing written.
        let e = a.write(3 * 4096 + 8, &[1, 2, 3, 4]).unwrap_err();
        assert!(
            matches!(e, Error::HeldOnDevice { addr, offset: 12296 } if addr == a.addr()),
            "{e}"
        );
        assert_eq!(e.kind(), hetmem::ErrorKind::Transient);
        let e = a.read(5 * 4096 + 12, &mut [0u8; 8]).unwrap_err();
        assert!(
            matches!(e, Error::HeldOnDevice { addr, offset: 20492 } if addr == a.addr()),
            "{e}"
        );
        // A buffer the launch does not hold is not affected.
        let mut byte = [0u8; 1];
        c.read(77, &mut byte).unwrap();
        assert_eq!(byte, [9]);
        // Evicting a held range moves nothing (after the kernel finished).
        let moved = a.evict(0..a.len()).unwrap();
        assert_eq!(moved.migrated, 0, "held pages stay on the device");
        assert!(states(&ctx, a.addr(), pages)
            .iter()
            .all(|&s| s == PageState::DevicePrivateLocal));
        // Freeing a bound buffer: the kernel finishes first, the launch still completes.
        b.free().unwrap();
        assert!(matches!(b.read(0, &mut byte), Err(Error::Freed)));
        run.wait().unwrap();
        assert_eq!(
            ctx.driver().resident_pages(),
            pages,
            "the freed buffer's device pages went back when the launch ended"
        );
        // No byte lost: `a` holds the kernel's result, and is writable again.
        let mut got = vec![0u8; pages * 4096];
        a.read(0, &mut got).unwrap();
        assert_eq!(got, word_bytes(pages * 1024, |i| i as u32 * 7 + 5));
        a.write(3 * 4096 + 8, &[1, 2, 3, 4]).unwrap();
        let mut w = [0u8; 4];
        a.read(3 * 4096 + 8, &mut w).unwrap();
        assert_eq!(w, [1, 2, 3, 4]);
        let moved = a.evict(0..a.len()).unwrap();
        assert_eq!(
            moved.migrated, 0,
            "the reads brought every page home already"
        );
    });
}
