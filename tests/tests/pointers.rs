//! CPU pointers into managed buffers (`Context::alloc_mapped`): plain loads and stores that
//! fault device pages back through userfaultfd, typed views, and what the docs promise when
//! an access cannot be served.

use std::sync::Arc;

use hetmem::mm::PageState;
use hetmem::offload::{Buffer, Context, Location};
use hetmem::Error;
use hetmem::VirtAddr;
use hetmem_engine::DeviceKind;

const PAGE: usize = 4096;

fn context(kind: DeviceKind, budget: u64, test: &str) -> Option<Context> {
    hetmem_tests::harness::offload_context(kind, budget, None, test)
}

fn mapped(ctx: &Context, bytes: usize, test: &str) -> Option<Buffer> {
    hetmem_tests::harness::mapped_buffer(ctx, bytes, test)
}

fn on_device(ctx: &Context, buf: &Buffer) -> usize {
    hetmem::mm::snapshot(
        ctx.space(),
        buf.addr(),
        buf.len() / PAGE,
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

fn word(i: usize, salt: u32) -> u32 {
    (i as u32).wrapping_mul(2_654_435_761) ^ salt
}

#[test]
fn plain_loads_and_stores_fault_pages_back_from_the_device() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let test = "plain_loads_and_stores";
        let Some(ctx) = context(kind, 4 << 20, test) else {
            continue;
        };
        let Some(buf) = mapped(&ctx, 64 * PAGE, test) else {
            return;
        };
        assert_eq!(buf.as_ptr().unwrap() as u64, buf.addr().get());
        {
            let v = buf.view::<u32>().unwrap();
            assert!(v.iter().all(|&w| w == 0), "a new buffer reads as zeros");
        }
        {
            let mut v = buf.view_mut::<u32>().unwrap();
            for (i, w) in v.iter_mut().enumerate() {
                *w = word(i, 1);
            }
        }
        let moved = buf
            .prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(moved.migrated, 64, "{kind:?}");
        assert_eq!(on_device(&ctx, &buf), 64);
        let faults = ctx.cpu_faults();
        {
            let v = buf.view::<u32>().unwrap();
            for (i, &w) in v.iter().enumerate() {
                assert_eq!(w, word(i, 1), "{kind:?}: word {i} after the round trip");
            }
        }
        assert!(ctx.cpu_faults() > faults, "the loads faulted");
        assert_eq!(on_device(&ctx, &buf), 0, "every page came back");
        // A store through the raw pointer, seen by `read`.
        // SAFETY: inside the buffer, no view alive, no other thread writes it.
        unsafe { buf.as_mut_ptr().unwrap().add(5 * PAGE + 3).write(0xEE) };
        let mut b = [0u8; 1];
        buf.read(5 * PAGE + 3, &mut b).unwrap();
        assert_eq!(b[0], 0xEE);
        // And a `write` seen through the view.
        buf.write(7 * PAGE, &0xDEAD_BEEFu32.to_le_bytes()).unwrap();
        assert_eq!(buf.view::<u32>().unwrap()[7 * PAGE / 4], 0xDEAD_BEEF);
        assert!(ctx.take_cpu_fault_error().is_none());
        buf.free().unwrap();
    }
}

#[test]
fn views_exclude_changes_and_the_range_cannot_be_unmapped_under_them() {
    let test = "views_exclude_changes";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
        return;
    };
    let v = buf.view::<u8>().unwrap();
    assert!(matches!(buf.write(0, &[1]), Err(Error::ViewActive)));
    assert!(matches!(buf.free(), Err(Error::ViewActive)));
    assert!(matches!(buf.view_mut::<u8>(), Err(Error::ViewActive)));
    let mut b = [9u8; 1];
    buf.read(0, &mut b).unwrap();
    assert_eq!(b[0], 0);
    assert_eq!(v[0], 0);
    // The space refuses to unmap, protect or move the range behind the buffer's back.
    let space = ctx.space();
    assert!(matches!(
        space.munmap(buf.addr(), PAGE as u64),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        space.mprotect(buf.addr(), PAGE as u64, hetmem::mm::Prot::READ),
        Err(Error::InvalidArgument(_))
    ));
    drop(v);
    let mut m = buf.view_mut::<u8>().unwrap();
    m[0] = 3;
    assert!(matches!(buf.read(0, &mut b), Err(Error::ViewActive)));
    drop(m);
    buf.read(0, &mut b).unwrap();
    assert_eq!(b[0], 3);
    // A plain buffer has no pointer.
    let plain = ctx.alloc(PAGE).unwrap();
    assert!(matches!(plain.as_ptr(), Err(Error::NotCpuMapped)));
    buf.free().unwrap();
    assert!(matches!(buf.as_ptr(), Err(Error::Freed)));
    assert!(matches!(buf.view::<u8>(), Err(Error::Freed)));
}

#[test]
fn threads_touching_device_pages_through_pointers_see_every_byte() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let test = "threads_touching_device_pages";
        let Some(ctx) = context(kind, 8 << 20, test) else {
            continue;
        };
        let Some(buf) = mapped(&ctx, 256 * PAGE, test) else {
            return;
        };
        let words = buf.len() / 4;
        buf.view_mut::<u32>()
            .unwrap()
            .iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = word(i, 7));
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        assert_eq!(on_device(&ctx, &buf), 256);
        let buf = Arc::new(buf);
        let threads = 4;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let buf = buf.clone();
                std::thread::spawn(move || {
                    let v = buf.view::<u32>().unwrap();
                    // Overlapping: every thread reads everything, starting at its own quarter.
                    for k in 0..words {
                        let i = (k + t * words / threads) % words;
                        assert_eq!(v[i], word(i, 7), "thread {t} word {i}");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("reader thread");
        }
        assert_eq!(on_device(&ctx, &buf), 0);
        assert!(
            ctx.stats().faults <= 256,
            "{kind:?}: no page migrated twice: {} driver faults",
            ctx.stats().faults
        );
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}

#[test]
fn stores_racing_migrations_and_evictions_are_never_lost() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let test = "stores_racing_migrations";
        let Some(ctx) = context(kind, 1 << 20, test) else {
            continue;
        };
        let pages = 64;
        let Some(buf) = mapped(&ctx, pages * PAGE, test) else {
            return;
        };
        let buf = Arc::new(buf);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let moved = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mover = {
            let (buf, stop, ctx, moved) = (buf.clone(), stop.clone(), ctx.clone(), moved.clone());
            std::thread::spawn(move || {
                let mut rounds = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let half = (rounds % 2) * (pages / 2) * PAGE;
                    let r = half..half + pages / 2 * PAGE;
                    buf.prefetch(r.clone(), Location::Device)
                        .unwrap()
                        .wait()
                        .unwrap();
                    buf.evict(r).unwrap();
                    ctx.driver().evict_all().unwrap();
                    rounds += 1;
                    moved.store(rounds, std::sync::atomic::Ordering::Relaxed);
                }
                rounds
            })
        };
        // Each writer owns one word of every page and counts it up through a raw pointer,
        // for 200 rounds and until the mover has gone round several times; the last value
        // written must be what is there at the end.
        let writers: Vec<_> = (0..3usize)
            .map(|t| {
                let (buf, moved) = (buf.clone(), moved.clone());
                std::thread::spawn(move || {
                    let p = buf.as_mut_ptr().unwrap() as usize;
                    let mut round = 0u32;
                    while round < 200 || moved.load(std::sync::atomic::Ordering::Relaxed) < 4 {
                        round += 1;
                        for page in 0..pages {
                            let at = p + page * PAGE + t * 4;
                            // SAFETY: inside the buffer; each thread writes only its own
                            // words, and nothing else writes them.
                            unsafe { (at as *mut u32).write_volatile(round) };
                        }
                    }
                    round
                })
            })
            .collect();
        let last: Vec<u32> = writers
            .into_iter()
            .map(|w| w.join().expect("writer"))
            .collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let rounds = mover.join().expect("mover");
        assert!(rounds >= 4);
        for page in 0..pages {
            for (t, &want) in last.iter().enumerate() {
                let mut b = [0u8; 4];
                buf.read(page * PAGE + t * 4, &mut b).unwrap();
                assert_eq!(
                    u32::from_le_bytes(b),
                    want,
                    "{kind:?} page {page} writer {t}"
                );
            }
        }
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}

/// Runs this test binary again with only `test`, `HETMEM_CHILD=mode`, and returns how it
/// ended (a child that gets a signal cannot report through the test harness).
fn run_child(test: &str, mode: &str) -> std::process::ExitStatus {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("HETMEM_CHILD", mode)
        .status()
        .unwrap()
}

#[test]
fn a_store_to_a_read_only_buffer_is_sigbus_with_the_error_recorded() {
    use std::os::unix::process::ExitStatusExt;
    let test = "a_store_to_a_read_only_buffer_is_sigbus_with_the_error_recorded";
    let Ok(mode) = std::env::var("HETMEM_CHILD") else {
        // The store kills its process with SIGBUS...
        let status = run_child(test, "default");
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
        // ...and, with the signal blocked in the storing thread, the error is there to read.
        let status = run_child(test, "blocked");
        assert_eq!(status.code(), Some(77), "{status:?}");
        return;
    };
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
        std::process::exit(if mode == "blocked" { 77 } else { 0 });
    };
    buf.write(0, &[5]).unwrap();
    buf.set_read_only(true).unwrap();
    assert!(matches!(buf.write(0, &[6]), Err(Error::WriteDenied(_))));
    assert!(matches!(buf.view_mut::<u8>(), Err(Error::WriteDenied(_))));
    assert_eq!(buf.view::<u8>().unwrap()[0], 5, "reads still work");
    let target = buf.as_mut_ptr().unwrap() as usize + PAGE;
    if mode == "default" {
        // SAFETY: an unsafe store into a read-only managed page: what the test is about.
        unsafe { (target as *mut u8).write_volatile(1) };
        unreachable!("the store must not complete");
    }
    std::thread::spawn(move || {
        // SAFETY: blocking SIGBUS for this thread only, through a zeroed signal set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGBUS);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            // The store faults again and again (each fault refused): it never completes.
            (target as *mut u8).write_volatile(1);
        }
    });
    for _ in 0..500 {
        if let Some(e) = ctx.take_cpu_fault_error() {
            assert_eq!(e.addr, target as u64);
            assert!(matches!(e.error, Error::WriteDenied(_)), "{:?}", e.error);
            std::process::exit(77);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no fault error recorded");
}

#[test]
fn a_read_syscall_into_a_device_resident_page_sees_the_right_bytes() {
    let test = "a_read_syscall_into_a_device_resident_page";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 8 * PAGE, test) else {
        return;
    };
    buf.write(0, &[0x11; 8 * PAGE]).unwrap();
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(on_device(&ctx, &buf), 8);
    let mut fds = [0i32; 2];
    // SAFETY: a pipe into a two-element array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let msg = b"written by the kernel";
    // SAFETY: writing our own bytes into our own pipe.
    assert_eq!(
        unsafe { libc::write(fds[1], msg.as_ptr().cast(), msg.len()) },
        msg.len() as isize
    );
    let dst = buf.as_mut_ptr().unwrap() as usize + 3 * PAGE + 100;
    // SAFETY: the destination lies inside the buffer; nothing else uses it now.
    let got = unsafe { libc::read(fds[0], dst as *mut libc::c_void, msg.len()) };
    // SAFETY: closing the pipe's two ends.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    match ctx.cpu_pointers().unwrap() {
        hetmem::cpu::FaultScope::All => {
            assert_eq!(got, msg.len() as isize, "the kernel's access was served");
            let mut back = vec![0u8; PAGE];
            buf.read(3 * PAGE, &mut back).unwrap();
            assert_eq!(&back[100..100 + msg.len()], msg);
            assert!(
                back[..100].iter().all(|&b| b == 0x11),
                "the rest came back too"
            );
        }
        hetmem::cpu::FaultScope::UserOnly => {
            assert_eq!(got, -1, "without privilege the system call fails (EFAULT)");
        }
    }
}

#[test]
fn a_forked_child_does_not_inherit_mapped_ranges_and_their_pages_stay() {
    let test = "a_forked_child_does_not_inherit";
    let ctx = context(DeviceKind::Host, 1 << 20, test).unwrap();
    let Some(buf) = mapped(&ctx, 2 * PAGE, test) else {
        return;
    };
    buf.write(0, b"parent").unwrap();
    let child = ctx.space().fork().unwrap();
    assert!(
        child.vma(buf.addr()).is_none(),
        "the child has nothing there"
    );
    assert!(matches!(
        child.read(buf.addr(), &mut [0u8; 6]),
        Err(Error::NotMapped(_))
    ));
    buf.view_mut::<u8>().unwrap()[0] = b'P';
    assert_eq!(&buf.view::<u8>().unwrap()[..6], b"Parent");
    assert!(matches!(
        ctx.space()
            .mremap(buf.addr(), PAGE as u64, VirtAddr(1 << 40)),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn a_kernel_changes_words_written_through_a_slice_and_the_slice_sees_the_change() {
    let test = "a_kernel_changes_words_written_through_a_slice";
    let Some(ctx) = context(DeviceKind::Vulkan, 8 << 20, test) else {
        return;
    };
    let Some(buf) = mapped(&ctx, 16 * PAGE, test) else {
        return;
    };
    let words = buf.len() / 4;
    buf.view_mut::<u32>()
        .unwrap()
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u32);
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let k = ctx
        .compile_kernel(
            r#"
@compute @workgroup_size(64)
fn bump(@builtin(global_invocation_id) g: vec3<u32>) {
    let p = hm_ptr(0u, g.x * 4u);
    hm_store(p, hm_load(p) * 3u + hm_arg(0));
}"#,
            "bump",
        )
        .unwrap();
    {
        let v = buf.view::<u32>().unwrap();
        assert!(
            matches!(
                ctx.launch(&k, &[(&buf, 0..buf.len())], &[7], [words as u32 / 64, 1, 1]),
                Err(Error::ViewActive)
            ),
            "a launch may not change bytes a view is reading"
        );
        assert_eq!(v[3], 3);
    }
    ctx.launch(&k, &[(&buf, 0..buf.len())], &[7], [words as u32 / 64, 1, 1])
        .unwrap()
        .wait()
        .unwrap();
    let v = buf.view::<u32>().unwrap();
    for (i, &w) in v.iter().enumerate() {
        assert_eq!(w, i as u32 * 3 + 7, "word {i} through the slice");
    }
    let mut b = [0u8; 4];
    buf.read(100 * 4, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 307, "and through Buffer::read");
}

#[test]
fn a_load_of_a_page_pinned_on_the_device_waits_for_the_pin() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let test = "a_load_of_a_page_pinned_on_the_device_waits";
        let Some(ctx) = context(kind, 4 << 20, test) else {
            continue;
        };
        let Some(buf) = mapped(&ctx, 4 * PAGE, test) else {
            return;
        };
        buf.write(2 * PAGE, &[0x5A; 16]).unwrap();
        let pin = buf.pin_on_device(0..buf.len()).unwrap();
        assert_eq!(on_device(&ctx, &buf), 4);
        let p = buf.as_ptr().unwrap() as usize;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: inside the buffer, which outlives the thread (joined below).
                let b = unsafe { std::ptr::read_volatile((p + 2 * PAGE + 5) as *const u8) };
                done.store(true, std::sync::atomic::Ordering::SeqCst);
                b
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "{kind:?}: the load waits while the page is pinned"
        );
        drop(pin);
        assert_eq!(reader.join().unwrap(), 0x5A, "{kind:?}");
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}

#[test]
fn launches_over_buffers_far_apart_in_the_space_both_run() {
    let test = "launches_over_buffers_far_apart";
    let Some(ctx) = context(DeviceKind::Vulkan, 8 << 20, test) else {
        return;
    };
    let Some(mapped) = mapped(&ctx, 4 * PAGE, test) else {
        return;
    };
    let plain = ctx.alloc(4 * PAGE).unwrap();
    let far = plain.addr().get().abs_diff(mapped.addr().get()) / PAGE as u64;
    assert!(far > 1 << 31, "the two buffers lie {far} pages apart");
    let k = ctx
        .compile_kernel(
            r#"
@compute @workgroup_size(64)
fn inc(@builtin(global_invocation_id) g: vec3<u32>) {
    let p = hm_ptr(0u, g.x * 4u);
    hm_store(p, hm_load(p) + 1u);
}"#,
            "inc",
        )
        .unwrap();
    for _ in 0..2 {
        for b in [&plain, &mapped] {
            ctx.launch(
                &k,
                &[(b, 0..b.len())],
                &[],
                [(b.len() / 4 / 64) as u32, 1, 1],
            )
            .unwrap()
            .wait()
            .unwrap();
        }
    }
    for b in [&plain, &mapped] {
        let mut w = [0u8; 4];
        b.read(4 * PAGE - 4, &mut w).unwrap();
        assert_eq!(u32::from_le_bytes(w), 2);
    }
}

#[test]
fn long_sequential_scans_and_rewrites_through_slices_keep_every_word() {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        let test = "long_sequential_scans_and_rewrites";
        let Some(ctx) = context(kind, 16 << 20, test) else {
            continue;
        };
        // Long enough for the windows of a sequential scan to grow past the bulk threshold.
        let Some(buf) = mapped(&ctx, 2048 * PAGE, test) else {
            return;
        };
        for round in 0..3u32 {
            buf.prefetch(0..buf.len(), Location::Device)
                .unwrap()
                .wait()
                .unwrap();
            {
                let mut v = buf.view_mut::<u32>().unwrap();
                for (i, w) in v.iter_mut().enumerate() {
                    if round > 0 {
                        assert_eq!(*w, word(i, round - 1), "{kind:?} round {round} word {i}");
                    }
                    *w = word(i, round);
                }
            }
            buf.prefetch(0..buf.len(), Location::Device)
                .unwrap()
                .wait()
                .unwrap();
            {
                let v = buf.view::<u32>().unwrap();
                for (i, &w) in v.iter().enumerate() {
                    assert_eq!(w, word(i, round), "{kind:?} round {round} word {i} (read)");
                }
            }
            // Part of a range the scan mapped in long runs (in 2 MiB entries where the
            // kernel backs the frames with huge pages) goes back to the device: the rest stays
            // mapped and right, the part faults back.
            buf.prefetch(100 * PAGE..700 * PAGE, Location::Device)
                .unwrap()
                .wait()
                .unwrap();
            let v = buf.view::<u32>().unwrap();
            for (i, &w) in v.iter().enumerate().rev() {
                assert_eq!(w, word(i, round), "{kind:?} round {round} word {i} (after)");
            }
        }
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}
