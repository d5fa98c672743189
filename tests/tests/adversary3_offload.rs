//! Third adversarial round, offload half (issue 11): launches that outlive what they were
//! given, kernels that forge a translated page, views and stale handles racing moves, pins,
//! writes and frees from other threads, and launches racing moves of their buffer. Vulkan
//! tests run on lavapipe (a skip without Vulkan outside CI, a failure under `CI=true`).
//!
//! Every test here either held from the start (a regression test that asserts bytes, error
//! kinds or counters) or failed before its fix in the library.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hetmem::Error;
use hetmem_engine::DeviceKind;

use hetmem_tests::harness::*;

// ---------------------------------------------------------------------------------------
// D. Launches that outlive what they were given (lavapipe; a skip without Vulkan outside
//    CI, a failure under CI=true).
// ---------------------------------------------------------------------------------------

fn vulkan(test: &str) -> Option<hetmem::offload::Context> {
    offload_context(DeviceKind::Vulkan, 64 * 4096, None, test)
}

/// The kernel, the buffers and every handle of the context dropped while a launch runs,
/// from another thread than the one that waits for it: the launch still completes (the
/// kernel's pipeline and page table are destroyed by timeline, not under it), its wait
/// returns, and a new context on the same device works and reads zeros.
#[test]
fn everything_dropped_under_a_running_launch() {
    watchdog_for("drops under a launch", Duration::from_secs(120), || {
        let test = "everything_dropped_under_a_running_launch";
        for round in 0..20u32 {
            let Some(ctx) = vulkan(test) else { return };
            let kernel = ctx.compile_kernel(SLOW_ADD_KERNEL, "add").unwrap();
            let buf = ctx.alloc(4 * 4096).unwrap();
            buf.write(0, &[1u8; 4 * 4096]).unwrap();
            let launch = ctx
                .launch(&kernel, &[(&buf, 0..4 * 4096)], &[1, 4, 64], [64, 1, 1])
                .unwrap();
            let waiter = thread::spawn(move || launch.wait());
            if round % 2 == 0 {
                drop(kernel);
                drop(ctx);
                drop(buf);
            } else {
                buf.free().unwrap();
                drop(buf);
                drop(kernel);
                drop(ctx);
            }
            let r = join_all("launch waiter", vec![waiter], Duration::from_secs(60)).remove(0);
            assert!(r.is_ok(), "round {round}: {r:?}");
        }
        let ctx = vulkan(test).unwrap();
        let buf = ctx.alloc(4 * 4096).unwrap();
        let mut v = vec![0xFFu8; 4 * 4096];
        buf.read(0, &mut v).unwrap();
        assert!(
            v.iter().all(|&x| x == 0),
            "a new buffer shows an old one's bytes"
        );
    });
}

/// A launch that is never waited for nor dropped (`mem::forget`) keeps its pins for ever:
/// freeing its buffer and dropping the context must still return (the pinned device pages
/// stay allocated: a leak, not a hang), and the freed range must not show the kernel's
/// bytes to the next buffer.
#[test]
fn a_forgotten_launch_does_not_hang_free_or_teardown() {
    watchdog_for("forgotten launch", Duration::from_secs(120), || {
        let test = "a_forgotten_launch_does_not_hang_free_or_teardown";
        let Some(ctx) = vulkan(test) else { return };
        let kernel = ctx.compile_kernel(SLOW_ADD_KERNEL, "add").unwrap();
        let buf = ctx.alloc(4 * 4096).unwrap();
        buf.write(0, &[1u8; 4 * 4096]).unwrap();
        let launch = ctx
            .launch(&kernel, &[(&buf, 0..4 * 4096)], &[1, 4, 16], [64, 1, 1])
            .unwrap();
        std::mem::forget(launch);
        assert!(matches!(
            buf.write(0, &[2]),
            Err(Error::HeldOnDevice { .. })
        ));
        buf.free().unwrap();
        let again = ctx.alloc(4 * 4096).unwrap();
        let mut v = vec![0xFFu8; 4 * 4096];
        again.read(0, &mut v).unwrap();
        assert!(
            v.iter().all(|&x| x == 0),
            "a new buffer shows the forgotten launch's bytes"
        );
        drop(again);
        drop(kernel);
        drop(ctx);
    });
}

// ---------------------------------------------------------------------------------------
// F. User kernels that forge a translated page.
// ---------------------------------------------------------------------------------------

/// An `HmPage` names a device chunk and a word in it directly, so only `hm_page` may make
/// one: building one in a function or keeping one in a `var` is refused. A module-scope
/// `const` built with the struct's constructor is neither (its expression lives in the
/// module, not in a function), and would let `hm_page_store` write any word of any chunk:
/// other buffers' device pages. Every such kernel must be refused before a pipeline exists.
#[test]
fn a_kernel_cannot_forge_a_page_handle() {
    watchdog_for("forged HmPage", Duration::from_secs(60), || {
        let Some(ctx) = vulkan("a_kernel_cannot_forge_a_page_handle") else {
            return;
        };
        let forged = [
            (
                "module const",
                "const FORGED = HmPage(0u, 3072u, true);\n\
                 @compute @workgroup_size(1)\n\
                 fn main() { hm_page_store(FORGED, 0u, 57005u); }\n",
            ),
            (
                "typed module const",
                "const FORGED: HmPage = HmPage(0u, 3072u, true);\n\
                 @compute @workgroup_size(1)\n\
                 fn main() { hm_page_store(FORGED, 0u, 57005u); }\n",
            ),
            (
                "module const in a struct",
                "struct Wrap { p: HmPage }\n\
                 const W = Wrap(HmPage(0u, 3072u, true));\n\
                 @compute @workgroup_size(1)\n\
                 fn main() { hm_page_store(W.p, 0u, 57005u); }\n",
            ),
            (
                "function const",
                "@compute @workgroup_size(1)\n\
                 fn main() { const F = HmPage(0u, 3072u, true); hm_page_store(F, 0u, 57005u); }\n",
            ),
            (
                "private global",
                "var<private> g: HmPage;\n\
                 @compute @workgroup_size(1)\n\
                 fn main() { g = hm_page(0u, 0u); g.first = 3072u; hm_page_store(g, 0u, 57005u); }\n",
            ),
        ];
        let mut accepted = Vec::new();
        for (what, src) in forged {
            match ctx.compile_kernel(src, "main") {
                Err(Error::Engine(hetmem_engine::EngineError::KernelRejected(_))) => {}
                Err(e) => panic!("{what}: refused, but not as a rejection: {e}"),
                Ok(_) => accepted.push(what),
            }
        }
        assert!(
            accepted.is_empty(),
            "kernels that forge an HmPage compiled: {accepted:?}"
        );
    });
}

// ---------------------------------------------------------------------------------------
// G. Views against moves, pins, writes and frees from other threads.
// ---------------------------------------------------------------------------------------

/// One thread takes views of a CPU-mapped buffer over and over and checks every byte; three
/// others evict it, prefetch it both ways, pin it on the device, rewrite it (with the same
/// bytes) and try to free it. Views never see another byte, the calls that conflict with a
/// view fail with `ViewActive`/`HeldOnDevice` (never a panic, a hang or a SIGBUS), `free` succeeds
/// only once no view is alive, and afterwards the context's frames come back.
///
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// split, its threads and checks would be read apart from each other.
#[test]
fn views_race_moves_pins_writes_and_free() {
    use hetmem::offload::Location;
    watchdog_for("views vs moves", Duration::from_secs(60), || {
        let test = "views_race_moves_pins_writes_and_free";
        let pool = hetmem_engine::HostFramePool::new(SMALL_POOL).unwrap();
        let ctx = offload_context(DeviceKind::Host, 64 * 4096, Some(pool.clone()), test).unwrap();
        let frames0 = pool.in_use();
        let n = 24usize;
        let Some(buf) = mapped_buffer(&ctx, n * 4096, test) else {
            return;
        };
        let data = Arc::new(pattern(n, 71));
        buf.write(0, &data).unwrap();
        let buf = Arc::new(buf);
        let stop = Arc::new(AtomicBool::new(false));
        // Set before the free is tried: from then on, "freed" is an answer too.
        let freeing = Arc::new(AtomicBool::new(false));
        let viewer = {
            let (buf, data, stop) = (buf.clone(), data.clone(), stop.clone());
            let freeing = freeing.clone();
            thread::spawn(move || {
                let (mut views, mut busy) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match buf.view::<u8>() {
                        Ok(v) => {
                            if let Some(i) = (0..v.len()).find(|&i| v[i] != data[i]) {
                                panic!("view byte {i}: {:#x}, wrote {:#x}", v[i], data[i]);
                            }
                            views += 1;
                        }
                        Err(Error::HeldOnDevice { .. } | Error::ViewActive) => busy += 1,
                        Err(Error::Freed) if freeing.load(Ordering::Acquire) => break,
                        Err(e) => panic!("view: {e}"),
                    }
                }
                (views, busy)
            })
        };
        let movers: Vec<_> = (0..3u64)
            .map(|t| {
                let (buf, data, stop) = (buf.clone(), data.clone(), stop.clone());
                let freeing = freeing.clone();
                thread::spawn(move || {
                    let mut x = t + 1;
                    let len = buf.len();
                    while !stop.load(Ordering::Relaxed) {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let a = (x >> 33) as usize % n;
                        let r = a * 4096..((a + 1 + (x >> 50) as usize % 4).min(n)) * 4096;
                        let res = match x % 6 {
                            0 => buf.evict(r.clone()).map(|_| ()),
                            1 => buf
                                .prefetch(r.clone(), Location::Device)
                                .and_then(|p| p.wait())
                                .map(|_| ()),
                            2 => buf
                                .prefetch(r.clone(), Location::Host)
                                .and_then(|p| p.wait())
                                .map(|_| ()),
                            3 => buf.pin_on_device(r.clone()).map(drop),
                            4 => buf.write(r.start, &data[r.clone()]),
                            _ => {
                                let mut out = vec![0u8; r.len()];
                                buf.read(r.start, &mut out).map(|()| {
                                    assert_eq!(out, data[r.clone()], "read at {r:?}");
                                })
                            }
                        };
                        match res {
                            Ok(()) => {}
                            Err(
                                Error::ViewActive
                                | Error::BufferBusy { .. }
                                | Error::HeldOnDevice { .. }
                                | Error::OverBudget { .. },
                            ) => {}
                            Err(Error::Freed | Error::NotMapped(_))
                                if freeing.load(Ordering::Acquire) => {}
                            Err(e) => panic!("mover on {r:?} of {len}: {e}"),
                        }
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(1500));
        // A free while views come and go: refused while one lives, else it succeeds.
        freeing.store(true, Ordering::Release);
        let freed = loop {
            match buf.free() {
                Ok(()) => break true,
                Err(Error::ViewActive | Error::Busy(_)) => thread::yield_now(),
                Err(e) => panic!("free: {e}"),
            }
            if stop.load(Ordering::Relaxed) {
                break false;
            }
        };
        stop.store(true, Ordering::Relaxed);
        let (views, _) = join_all("viewer", vec![viewer], Duration::from_secs(20)).remove(0);
        join_all("movers", movers, Duration::from_secs(20));
        assert!(freed);
        eprintln!("views: {views}");
        assert!(views > 0, "no view was ever had");
        drop(buf);
        drop(ctx);
        assert!(frames0 > 0);
        assert_eq!(
            pool.in_use(),
            0,
            "frames left in use after the context went"
        );
    });
}

/// A freed buffer's handle, still used by another thread (writes, pins, moves), while its
/// range is freed and a new buffer allocated (the space reuses the addresses): nothing
/// done through the old handle may reach the new buffer (its bytes stay the ones written
/// through it, and it is never held by a pin it did not take).
///
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// split, its threads and checks would be read apart from each other.
#[test]
fn a_freed_buffers_handle_never_reaches_the_next_buffer() {
    use hetmem::offload::Location;
    watchdog_for("stale handle", Duration::from_secs(60), || {
        let test = "a_freed_buffers_handle_never_reaches_the_next_buffer";
        let ctx = offload_context(DeviceKind::Host, 64 * 4096, None, test).unwrap();
        let n = 4usize;
        let (old_bytes, new_bytes) = (pattern(n, 81), pattern(n, 82));
        let mut reused = 0;
        for round in 0..100 {
            let old = Arc::new(ctx.alloc(n * 4096).unwrap());
            old.write(0, &old_bytes).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let mut hammer = Some({
                let (old, stop, bytes) = (old.clone(), stop.clone(), old_bytes.clone());
                thread::spawn(move || {
                    let mut k = 0u32;
                    let mut pins = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = match k % 5 {
                            0 => old.write(0, &bytes),
                            1 => old.pin_on_device(0..n * 4096).map(|p| pins.push(p)),
                            2 => old.evict(0..n * 4096).map(drop),
                            3 => old
                                .prefetch(0..n * 4096, Location::Device)
                                .and_then(|p| p.wait())
                                .map(drop),
                            _ => {
                                pins.clear();
                                Ok(())
                            }
                        };
                        k += 1;
                        match r {
                            Ok(())
                            | Err(
                                Error::Freed
                                | Error::NotMapped(_)
                                | Error::BufferBusy { .. }
                                | Error::HeldOnDevice { .. },
                            ) => {}
                            Err(e) => panic!("old handle: {e}"),
                        }
                    }
                })
            });
            let stop_hammer = |hammer: &mut Option<thread::JoinHandle<()>>| {
                stop.store(true, Ordering::Relaxed);
                if let Some(h) = hammer.take() {
                    join_all("hammer", vec![h], Duration::from_secs(20));
                }
            };
            thread::sleep(Duration::from_millis(2));
            let addr = old.addr();
            loop {
                match old.free() {
                    Ok(()) => break,
                    Err(Error::Busy(_) | Error::HeldOnDevice { .. }) => thread::yield_now(),
                    Err(e) => panic!("free: {e}"),
                }
            }
            // The next mapping at the same addresses (the space would reuse them sooner or
            // later; here at once).
            let space = ctx.space();
            let len = (n * 4096) as u64;
            let at = space
                .mmap(Some(addr), len, hetmem::mm::Prot::RW, false)
                .unwrap_or_else(|e| panic!("round {round}: mmap at the freed range: {e}"));
            assert_eq!(at, addr);
            reused += 1;
            let w = match space.write(at, &new_bytes) {
                Err(Error::HeldOnDevice { .. } | Error::Busy(_)) => {
                    // Only a pin through the old handle could hold the new mapping.
                    stop_hammer(&mut hammer);
                    space.write(at, &new_bytes).map(|()| false)
                }
                other => other.map(|()| true),
            };
            let clean = w.unwrap_or_else(|e| panic!("round {round}: write of the new buffer: {e}"));
            thread::sleep(Duration::from_millis(2));
            let mut got = vec![0u8; n * 4096];
            space.read(at, &mut got).unwrap();
            assert!(
                got == new_bytes,
                "round {round}: the new mapping shows the old handle's bytes"
            );
            assert!(
                clean,
                "round {round}: the new mapping was held by the old handle's pin"
            );
            stop_hammer(&mut hammer);
            space.read(at, &mut got).unwrap();
            assert!(got == new_bytes, "round {round}: after the hammer stopped");
            space.munmap(at, len).unwrap();
        }
        eprintln!("address reused in {reused} of 100 rounds");
    });
}

// ---------------------------------------------------------------------------------------
// I. Launches racing moves and CPU access of their buffer (lavapipe).
// ---------------------------------------------------------------------------------------

/// One thread launches "add 1 to every word" over a buffer and waits, 200 times; another
/// evicts it, prefetches it both ways, reads it and pins it meanwhile. Reads see a count
/// between the start and the end (never a torn or lost update), the calls that meet a
/// launch fail with `HeldOnDevice`/`BufferBusy` or wait, and at the end every word counts every
/// launch exactly once.
///
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// split, its threads and checks would be read apart from each other.
#[test]
fn launches_race_moves_and_reads_of_their_buffer() {
    use hetmem::offload::Location;
    watchdog_for("launches vs moves", Duration::from_secs(120), || {
        let test = "launches_race_moves_and_reads_of_their_buffer";
        let Some(ctx) = vulkan(test) else { return };
        let kernel = ctx.compile_kernel(SLOW_ADD_KERNEL, "add").unwrap();
        let n = 4usize;
        let buf = Arc::new(ctx.alloc(n * 4096).unwrap());
        buf.write(0, &vec![0u8; n * 4096]).unwrap();
        let launches = 200u32;
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (buf, stop) = (buf.clone(), stop.clone());
            thread::spawn(move || {
                let mut k = 0u32;
                let mut reads = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let r = match k % 5 {
                        0 => buf.evict(0..n * 4096).map(drop),
                        1 => buf
                            .prefetch(0..n * 4096, Location::Device)
                            .and_then(|p| p.wait())
                            .map(drop),
                        2 => buf
                            .prefetch(0..n * 4096, Location::Host)
                            .and_then(|p| p.wait())
                            .map(drop),
                        3 => buf.pin_on_device(0..4096).map(drop),
                        _ => {
                            let mut out = vec![0u8; n * 4096];
                            buf.read(0, &mut out).map(|()| {
                                let w: Vec<u32> = out
                                    .chunks(4)
                                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                                    .collect();
                                let first = w[0];
                                assert!(first <= launches, "a word counts {first} > {launches}");
                                reads += 1;
                            })
                        }
                    };
                    k += 1;
                    match r {
                        Ok(())
                        | Err(
                            Error::HeldOnDevice { .. }
                            | Error::BufferBusy { .. }
                            | Error::OverBudget { .. },
                        ) => {}
                        Err(e) => panic!("mover: {e}"),
                    }
                }
                reads
            })
        };
        for i in 0..launches {
            // A launch whose pages the mover keeps taking away may give up with the typed
            // BufferBusy (bounded retries); then it did not run, and is tried again.
            let mut tries = 0;
            let l = loop {
                match ctx.launch(
                    &kernel,
                    &[(&buf, 0..n * 4096)],
                    &[1, n as u32, 1],
                    [64, 1, 1],
                ) {
                    Ok(l) => break l,
                    Err(Error::BufferBusy { .. }) if tries < 1000 => tries += 1,
                    Err(e) => panic!("launch {i}: {e}"),
                }
            };
            l.wait().unwrap_or_else(|e| panic!("launch {i}: {e}"));
        }
        stop.store(true, Ordering::Relaxed);
        join_all("mover", vec![mover], Duration::from_secs(30));
        let mut out = vec![0u8; n * 4096];
        buf.read(0, &mut out).unwrap();
        let wrong: Vec<(usize, u32)> = out
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .enumerate()
            .filter(|&(_, w)| w != launches)
            .take(8)
            .collect();
        assert!(
            wrong.is_empty(),
            "words that missed or doubled a launch: {wrong:?}"
        );
    });
}
