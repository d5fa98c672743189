//! The CPU-pointer API (`Context::alloc_mapped`, `Buffer::as_ptr`, views) used as a hostile
//! or careless user would: through the public API only, plus raw loads and stores that stay
//! in bounds and race no other writer. Each test is named after what it found (or what it
//! rules out); scenarios that end in a signal run in a child process of this binary.
//!
//! Long: a little over the limit; its scenarios share the child-process runner that turns a
//! signal into a result.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hetmem::mm::PageState;
use hetmem::offload::{Buffer, Context, Location};
use hetmem::Error;
use hetmem_engine::{DeviceKind, HostFramePool};
use hetmem_tests::harness::{join_all, run_child_with};

const PAGE: usize = 4096;

fn context_with(
    kind: DeviceKind,
    budget: u64,
    frames: Option<Arc<HostFramePool>>,
    test: &str,
) -> Option<Context> {
    hetmem_tests::harness::offload_context(kind, budget, frames, test)
}

fn context(kind: DeviceKind, budget: u64, test: &str) -> Option<Context> {
    context_with(kind, budget, None, test)
}

fn mapped(ctx: &Context, bytes: usize, test: &str) -> Option<Buffer> {
    hetmem_tests::harness::mapped_buffer(ctx, bytes, test)
}

fn device_pages(ctx: &Context, buf: &Buffer) -> usize {
    hetmem::mm::snapshot(
        ctx.space(),
        buf.addr(),
        buf.len().div_ceil(PAGE),
        ctx.driver().owner(),
    )
    .iter()
    .filter(|s| {
        matches!(
            s,
            PageState::DevicePrivateLocal | PageState::DeviceCoherentLocal
        )
    })
    .count()
}

/// A word that differs by index, salt and buffer.
fn word(i: usize, salt: u32) -> u32 {
    (i as u32).wrapping_mul(0x9E37_79B1).rotate_left(7) ^ salt
}

fn fill(buf: &Buffer, salt: u32) {
    for (i, w) in buf.view_mut::<u32>().unwrap().iter_mut().enumerate() {
        *w = word(i, salt);
    }
}

fn check(buf: &Buffer, salt: u32, what: &str) {
    let mut bytes = vec![0u8; buf.len()];
    buf.read(0, &mut bytes).unwrap();
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        let w = u32::from_le_bytes(c.try_into().unwrap());
        assert_eq!(w, word(i, salt), "{what}: word {i} (page {})", i * 4 / PAGE);
    }
}

// ---------------------------------------------------------------------------------------
// Memory safety from safe code.
// ---------------------------------------------------------------------------------------

/// `ctx.space().write` is safe and public: it must not change bytes that a live `View`
/// (a `&[u32]`) is reading.
#[test]
fn space_write_changes_bytes_under_a_live_view() {
    let test = "space_write_changes_bytes_under_a_live_view";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 2 * PAGE, test) else {
        return;
    };
    buf.write(0, &1u32.to_le_bytes()).unwrap();
    let v = buf.view::<u32>().unwrap();
    assert_eq!(v[0], 1);
    let r = ctx.space().write(buf.addr(), &2u32.to_le_bytes());
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "the space wrote under a view: {r:?}"
    );
    assert_eq!(v[0], 1, "the bytes behind a shared reference changed");
    drop(v);
    // Through the buffer, the same write is fine once the view is gone.
    buf.write(0, &3u32.to_le_bytes()).unwrap();
    assert_eq!(buf.view::<u32>().unwrap()[0], 3);
}

/// `ctx.space().read` is safe and public: it must not read bytes that a live `ViewMut`
/// (a `&mut [u32]`, possibly being written on another thread) holds exclusively.
#[test]
fn space_read_races_a_live_view_mut() {
    let test = "space_read_races_a_live_view_mut";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 2 * PAGE, test) else {
        return;
    };
    let mut m = buf.view_mut::<u32>().unwrap();
    m[0] = 9;
    let mut out = [0u8; 4];
    let r = ctx.space().read(buf.addr(), &mut out);
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "the space read bytes a &mut holds: {r:?}"
    );
    drop(m);
    buf.read(0, &mut out).unwrap();
    assert_eq!(u32::from_le_bytes(out), 9);
}

/// A view made while the buffer's pages are pinned on the device (by `pin_on_device`, as a
/// launch does) used to be handed out; its first load then waited for the pin, which the
/// same thread holds: after the fault's retries the thread got SIGBUS, from safe code. A
/// view of pinned pages is refused with `HeldOnDevice` (the buffer and the first pinned
/// page's offset, never a frame number) instead, and a pin under a live view with
/// `ViewActive`.
#[test]
fn a_view_under_its_own_threads_device_pin_is_refused_not_a_hang() {
    let test = "a_view_under_its_own_threads_device_pin_is_refused_not_a_hang";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
        return;
    };
    buf.write(PAGE, &[0x42]).unwrap();
    {
        let pin = buf.pin_on_device(0..buf.len()).unwrap();
        assert_eq!(device_pages(&ctx, &buf), 4);
        let v = buf.view::<u8>();
        assert!(
            matches!(v, Err(Error::HeldOnDevice { addr, offset: 0 }) if addr == buf.addr()),
            "view of pinned pages: {v:?}"
        );
        let m = buf.view_mut::<u8>();
        assert!(
            matches!(m, Err(Error::HeldOnDevice { addr, offset: 0 }) if addr == buf.addr()),
            "view_mut of pinned pages: {m:?}"
        );
        drop(pin);
        // Only the third page pinned: the offset names it.
        let pin = buf.pin_on_device(2 * PAGE..3 * PAGE).unwrap();
        let v = buf.view::<u8>();
        assert!(
            matches!(v, Err(Error::HeldOnDevice { addr, offset }) if addr == buf.addr() && offset == 2 * PAGE),
            "view with page 2 pinned: {v:?}"
        );
        drop(pin);
    }
    {
        let v = buf.view::<u8>().unwrap();
        let pin = buf.pin_on_device(0..PAGE);
        assert!(
            matches!(pin, Err(Error::ViewActive)),
            "a pin under a live view: {:?}",
            pin.map(|_| ())
        );
        assert_eq!(v[PAGE], 0x42);
    }
    // And nothing is left pinned: the bytes move and come back.
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(buf.view::<u8>().unwrap()[PAGE], 0x42);
}

/// The same scenario run to its end in a child: before the fix the load through the view
/// waited for its own thread's pin and the child died of SIGBUS; now `view` says
/// `HeldOnDevice`.
#[test]
fn reading_a_view_under_ones_own_device_pin_is_not_a_sigbus() {
    let test = "reading_a_view_under_ones_own_device_pin_is_not_a_sigbus";
    if std::env::var("HETMEM_CHILD").is_err() {
        let status = run_child_with(test, "pin", &[], Duration::from_secs(120));
        let status = status.expect("the child hung");
        assert_eq!(status.code(), Some(0), "child: {status:?}");
        return;
    }
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 2 * PAGE, test) else {
        std::process::exit(0);
    };
    let _pin = buf.pin_on_device(0..buf.len()).unwrap();
    let sum: u32 = match buf.view::<u8>() {
        Ok(v) => v.iter().map(|&b| b as u32).sum(),
        Err(Error::HeldOnDevice { .. }) => 0,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(sum, 0);
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------
// Addresses.
// ---------------------------------------------------------------------------------------

/// A plain `alloc` takes an address range of the context's space that the process itself
/// never reserved; the space used to hand out addresses where the kernel puts mappings, so a
/// large plain buffer covered the address the kernel then chose for a CPU-mapped buffer and
/// `alloc_mapped` failed with `AlreadyMapped`.
#[test]
fn a_large_plain_alloc_makes_alloc_mapped_fail() {
    let test = "a_large_plain_alloc_makes_alloc_mapped_fail";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    // Address space only: nothing is committed until touched.
    let plain = ctx.alloc(2 << 40).unwrap();
    let buf = match ctx.alloc_mapped(4 * PAGE) {
        Ok(b) => b,
        Err(Error::PointersUnavailable(why)) => {
            assert!(!hetmem_tests::running_in_ci(), "{why}");
            return;
        }
        Err(e) => panic!("alloc_mapped beside a large plain buffer: {e}"),
    };
    let p = plain.addr()..plain.addr() + plain.len() as u64;
    assert!(!p.contains(&buf.addr()));
    buf.view_mut::<u8>().unwrap()[5] = 5;
    plain.write(5, &[6]).unwrap();
    let mut b = [0u8; 1];
    plain.read(5, &mut b).unwrap();
    assert_eq!((buf.view::<u8>().unwrap()[5], b[0]), (5, 6));
}

// ---------------------------------------------------------------------------------------
// Lost or stale bytes.
// ---------------------------------------------------------------------------------------

/// Home runs are reused after `free` and drop: a new buffer never shows an old one's bytes,
/// whether those were written through a pointer, `write`, or came back from the device.
#[test]
fn a_reused_home_run_never_shows_an_old_buffers_bytes() {
    let test = "a_reused_home_run_never_shows_an_old_buffers_bytes";
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let Some(ctx) = context(kind, 1 << 20, test) else {
            continue;
        };
        for round in 0..24usize {
            let pages = 1 + round % 5;
            let Some(buf) = mapped(&ctx, pages * PAGE, test) else {
                return;
            };
            {
                let v = buf.view::<u64>().unwrap();
                let dirty = v.iter().position(|&w| w != 0);
                assert_eq!(dirty, None, "{kind:?} round {round}: a new buffer not zero");
            }
            let mut back = vec![0u8; buf.len()];
            buf.read(0, &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 0), "{kind:?} round {round}: read");
            // Dirty it three ways, send some of it to the device, then let it go.
            // SAFETY: inside the buffer; no view alive, no other thread uses it.
            unsafe { buf.as_mut_ptr().unwrap().write_bytes(0xA5, buf.len()) };
            buf.write(0, &[0x5A; 64]).unwrap();
            if round % 2 == 0 {
                buf.prefetch(0..buf.len(), Location::Device)
                    .unwrap()
                    .wait()
                    .unwrap();
                if round % 4 == 0 {
                    ctx.driver().evict_all().unwrap();
                }
            }
            if round % 3 == 0 {
                drop(buf);
            } else {
                buf.free().unwrap();
            }
        }
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}

// ---------------------------------------------------------------------------------------
// Leaks.
// ---------------------------------------------------------------------------------------

/// Every home frame goes back to the pool when buffers are freed or dropped, whatever state
/// their pages were in (touched, on the device, evicted elsewhere, never touched), and the
/// home runs can be reserved again.
#[test]
fn freed_and_dropped_mapped_buffers_return_every_home_frame() {
    let test = "freed_and_dropped_mapped_buffers_return_every_home_frame";
    let pool = HostFramePool::new(64 << 20).unwrap();
    let ctx = context_with(DeviceKind::Host, 64 * PAGE as u64, Some(pool.clone()), test).unwrap();
    // The context's own frames (the zero page and the like) are counted from here.
    let Some(first) = mapped(&ctx, PAGE, test) else {
        return;
    };
    first.free().unwrap();
    let (used, avail) = (pool.in_use(), pool.available());
    for round in 0..3 {
        let bufs: Vec<Buffer> = (0..6)
            .map(|i| mapped(&ctx, (i + 1) * 8 * PAGE, test).unwrap())
            .collect();
        for (i, b) in bufs.iter().enumerate() {
            match i % 3 {
                0 => fill(b, i as u32),
                1 => {
                    fill(b, i as u32);
                    b.prefetch(0..b.len(), Location::Device)
                        .unwrap()
                        .wait()
                        .unwrap();
                }
                _ => {}
            }
        }
        ctx.driver().evict_all().unwrap();
        for (i, b) in bufs.into_iter().enumerate() {
            if i % 2 == 0 {
                b.free().unwrap();
            }
        }
        assert_eq!(
            (pool.in_use(), pool.available()),
            (used, avail),
            "round {round}: frames in use / available after free and drop"
        );
    }
}

/// The names of this process's threads that start with `prefix` (`/proc/self/task`), sorted.
fn threads_named(prefix: &str) -> Vec<String> {
    let mut names = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect::<Vec<_>>();
    names.sort();
    names
}

/// The fault thread (and the prefetch worker) end when the last handle of the context goes,
/// even after faults, prefetches and a buffer dropped while its pages were on the device.
#[test]
fn the_fault_thread_stops_when_the_context_drops() {
    let test = "the_fault_thread_stops_when_the_context_drops";
    if std::env::var("HETMEM_CHILD").is_err() {
        let status = run_child_with(test, "threads", &[], Duration::from_secs(120));
        let status = status.expect("the child hung");
        assert_eq!(status.code(), Some(0), "child: {status:?}");
        return;
    }
    // Threads the process starts once (the test harness's, lazily made globals) are counted
    // after a first round; every later round must end with the same set.
    let mut before = None;
    for round in 0..4 {
        let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
        let Some(buf) = mapped(&ctx, 32 * PAGE, test) else {
            std::process::exit(0);
        };
        fill(&buf, round);
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        check(&buf, round, "round trip");
        assert_eq!(threads_named("hetmem-cpu-faul").len(), 1);
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        let other = buf.clone();
        drop((buf, ctx));
        // A buffer handle keeps its context: nothing stops yet.
        assert_eq!(threads_named("hetmem-cpu-faul").len(), 1);
        drop(other);
        // The context is gone: its threads end (the prefetch worker is not joined: wait
        // for it, under a generous deadline that only a leak reaches).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = threads_named("hetmem-");
            if left.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: threads left: {left:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let now = threads_named("");
        match &before {
            None => before = Some(now),
            Some(b) => assert_eq!(&now, b, "round {round}: threads after the context dropped"),
        }
    }
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------
// Races.
// ---------------------------------------------------------------------------------------

/// Many CPU-mapped buffers over a device budget smaller than any one of them: writer threads
/// count words up through raw pointers while a mover prefetches whole buffers to the device
/// (evicting the others by frame number, so pages come back outside their home frames) and
/// `evict_all` runs. The last value each writer stored is what every buffer holds.
#[test]
fn stores_racing_budget_evictions_across_many_buffers_are_never_lost() {
    let test = "stores_racing_budget_evictions_across_many_buffers";
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let Some(ctx) = context(kind, 12 * PAGE as u64, test) else {
            continue;
        };
        let (nbufs, pages, writers, rounds) = (6usize, 10usize, 3usize, 60u32);
        let mut bufs = Vec::new();
        for _ in 0..nbufs {
            let Some(b) = mapped(&ctx, pages * PAGE, test) else {
                return;
            };
            bufs.push(b);
        }
        let bufs = Arc::new(bufs);
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (bufs, stop, ctx) = (bufs.clone(), stop.clone(), ctx.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let b = &bufs[n % bufs.len()];
                    b.prefetch(0..b.len(), Location::Device)
                        .unwrap()
                        .wait()
                        .unwrap();
                    if n % 5 == 4 {
                        ctx.driver().evict_all().unwrap();
                    }
                    n += 1;
                }
                n
            })
        };
        let hs: Vec<_> = (0..writers)
            .map(|t| {
                let bufs = bufs.clone();
                std::thread::spawn(move || {
                    let ptrs: Vec<usize> = bufs
                        .iter()
                        .map(|b| b.as_mut_ptr().unwrap() as usize)
                        .collect();
                    for round in 1..=rounds {
                        for (k, &p) in ptrs.iter().enumerate() {
                            for page in 0..pages {
                                let at = p + page * PAGE + (t * 8 + k % 2) * 4;
                                // SAFETY: in bounds; each thread stores only to its own words.
                                unsafe { (at as *mut u32).write_volatile(round) };
                            }
                        }
                    }
                })
            })
            .collect();
        join_all(test, hs, Duration::from_secs(240));
        stop.store(true, Ordering::Relaxed);
        let moves = join_all(test, vec![mover], Duration::from_secs(60))[0];
        assert!(moves > 0);
        for (k, b) in bufs.iter().enumerate() {
            for page in 0..pages {
                for t in 0..writers {
                    let mut w = [0u8; 4];
                    b.read(page * PAGE + (t * 8 + k % 2) * 4, &mut w).unwrap();
                    assert_eq!(
                        u32::from_le_bytes(w),
                        rounds,
                        "{kind:?} buffer {k} page {page} writer {t}"
                    );
                }
            }
        }
        assert!(
            ctx.take_cpu_fault_error().is_none(),
            "{:?}",
            ctx.take_cpu_fault_error()
        );
    }
}

/// The driver is public too (`ctx.driver()`): its `launch` must not run a kernel that
/// writes bytes a live `View` is reading (`Context::launch` refuses that with `ViewActive`).
#[test]
fn a_driver_launch_changes_bytes_under_a_live_view() {
    let test = "a_driver_launch_changes_bytes_under_a_live_view";
    let Some(ctx) = context(DeviceKind::Vulkan, 4 << 20, test) else {
        return;
    };
    let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
        return;
    };
    buf.write(0, &5u32.to_le_bytes()).unwrap();
    let k = ctx
        .compile_kernel(
            r#"
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) g: vec3<u32>) {
    let p = hm_ptr(0u, g.x * 4u);
    hm_store(p, hm_load(p) + hm_arg(0));
}"#,
            "add",
        )
        .unwrap();
    let v = buf.view::<u32>().unwrap();
    assert_eq!(v[0], 5);
    let r = ctx
        .driver()
        .launch(ctx.space(), &k, &[(buf.addr(), 1)], &[1], [1, 1, 1])
        .and_then(|l| l.wait());
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "the driver launched over a CPU-mapped range: {r:?}"
    );
    assert_eq!(v[0], 5, "the bytes behind a shared reference changed");
    drop(v);
    ctx.launch(&k, &[(&buf, 0..PAGE)], &[1], [1, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        buf.view::<u32>().unwrap()[0],
        6,
        "through the context it works"
    );
}

/// `ctx.driver().pin_on_device` skipped the buffer's view check: a live view's next load of
/// the pinned page waited for a pin its own thread held (SIGBUS after the fault's retries).
#[test]
fn a_driver_pin_under_a_live_view_is_not_refused() {
    let test = "a_driver_pin_under_a_live_view_is_not_refused";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 2 * PAGE, test) else {
        return;
    };
    let v = buf.view::<u8>().unwrap();
    let pin = ctx.driver().pin_on_device(ctx.space(), buf.addr(), 2);
    assert!(
        matches!(pin, Err(Error::InvalidArgument(_))),
        "the driver pinned a CPU-mapped range under a view: {:?}",
        pin.map(|_| ())
    );
    assert_eq!(v[0], 0);
    drop(v);
    // The buffer's own pin is the way in.
    let pin = buf.pin_on_device(0..buf.len()).unwrap();
    assert_eq!(device_pages(&ctx, &buf), 2);
    drop(pin);
}

// ---------------------------------------------------------------------------------------
// Hangs and exhaustion (each in a child process).
// ---------------------------------------------------------------------------------------

/// A thread blocked in a fault on a CPU-mapped page (a `read(2)` into it, while the page is
/// pinned on the device) while another thread frees the buffer (`free`), or drops every
/// handle and the context (`drop`): nothing hangs, the freeing thread gets `Ok`, and the
/// blocked system call ends (with the bytes if it was served first, else `EFAULT`).
#[test]
fn freeing_or_dropping_under_a_blocked_fault_does_not_hang() {
    let test = "freeing_or_dropping_under_a_blocked_fault_does_not_hang";
    let Ok(mode) = std::env::var("HETMEM_CHILD") else {
        for mode in ["free", "drop"] {
            let status = run_child_with(test, mode, &[], Duration::from_secs(120));
            let status = status.unwrap_or_else(|| panic!("{mode}: the child hung"));
            assert_eq!(status.code(), Some(0), "{mode}: child: {status:?}");
        }
        return;
    };
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
        std::process::exit(0);
    };
    if ctx.cpu_pointers().unwrap() != hetmem::cpu::FaultScope::All {
        // Without kernel-mode faults the system call fails at once: nothing to block.
        std::process::exit(0);
    }
    let pin = buf.pin_on_device(0..buf.len()).unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: a pipe into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: our own bytes into our own pipe.
    assert_eq!(
        unsafe { libc::write(fds[1], b"abcd".as_ptr().cast(), 4) },
        4
    );
    let dst = buf.as_mut_ptr().unwrap() as usize + PAGE;
    let reader = std::thread::spawn(move || {
        // SAFETY: SIGBUS blocked for this thread only (a fault the mirror gives up on is
        // signalled to it; the system call then sees EFAULT); the destination lies in the
        // buffer when the call starts: the test is what happens when it goes meanwhile.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGBUS);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::read(fds[0], dst as *mut libc::c_void, 4)
        }
    });
    // Let the reader block in its fault (if it has not yet, the outcome is the same).
    std::thread::sleep(Duration::from_millis(200));
    match mode.as_str() {
        "free" => {
            buf.free().unwrap();
            drop(pin);
        }
        _ => drop((buf, ctx, pin)),
    }
    let got = reader.join().unwrap();
    assert!(got == -1 || got == 4, "read(2) returned {got}");
    std::process::exit(0);
}

/// With a 1 GiB host frame pool: a CPU-mapped buffer larger than the pool is a typed
/// out-of-memory error; one that fits keeps its home frames while plain buffers exhaust the
/// rest, so its pages still come back from the device (evictions by frame number fail, a
/// CPU fault brings them home) with every byte.
#[test]
fn host_frame_exhaustion_keeps_mapped_buffers_whole() {
    let test = "host_frame_exhaustion_keeps_mapped_buffers_whole";
    if std::env::var("HETMEM_CHILD").is_err() {
        let env = [("HETMEM_HOST_FRAMES_GIB", "1")];
        let status = run_child_with(test, "oom", &env, Duration::from_secs(300));
        let status = status.expect("the child hung");
        assert_eq!(status.code(), Some(0), "child: {status:?}");
        return;
    }
    let ctx = context(DeviceKind::Host, 256 << 20, test).unwrap();
    let pool = ctx.driver().pagemap().frames().clone();
    assert!(
        pool.available() <= (1 << 30) / PAGE,
        "the child's pool is 1 GiB"
    );
    match ctx.alloc_mapped(2 << 30) {
        Err(Error::PointersUnavailable(_)) => std::process::exit(0),
        Err(e) => assert_eq!(e.kind(), hetmem::ErrorKind::OutOfMemory, "{e}"),
        Ok(_) => panic!("2 GiB of home frames from a 1 GiB pool"),
    }
    let buf = mapped(&ctx, 64 << 20, test).unwrap();
    fill(&buf, 0x77);
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(device_pages(&ctx, &buf), buf.len() / PAGE);
    // Plain buffers take every other frame.
    let mut plain = Vec::new();
    let chunk = 64 << 20;
    loop {
        let b = ctx.alloc(chunk).unwrap();
        match b.write(0, &vec![1u8; chunk]) {
            Ok(()) => plain.push(b),
            Err(e) => {
                assert_eq!(e.kind(), hetmem::ErrorKind::OutOfMemory, "{e}");
                break;
            }
        }
        assert!(plain.len() < 32, "the pool never ran out");
    }
    // Evictions by frame number find no frame; the pages stay on the device, whole.
    let _ = ctx.driver().evict_all();
    check(&buf, 0x77, "after the pool ran out");
    assert_eq!(device_pages(&ctx, &buf), 0);
    assert!(ctx.take_cpu_fault_error().is_none());
    std::process::exit(0);
}
