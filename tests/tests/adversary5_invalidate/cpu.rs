//! CPU pointers (`Context::alloc_mapped`, views) under unmaps, frees and migrations of
//! other buffers and of the same buffer: the second half of `adversary5_invalidate`. Each
//! scenario runs in a child of the test binary, on the host device and on Vulkan.

use super::*;

/// The exit code of a child that ran its scenario to the end.
const RAN: i32 = 77;

/// Runs the CPU-pointer scenario `body` in a child of this binary on each device kind (a
/// `SIGBUS` or a hang there is a failure here, not the end of the test binary).
fn in_child(test: &str, body: fn(DeviceKind, &str)) {
    use std::os::unix::process::ExitStatusExt;
    match std::env::var("HETMEM_CHILD") {
        Ok(mode) => {
            let kind = if mode == "vulkan" {
                DeviceKind::Vulkan
            } else {
                DeviceKind::Host
            };
            body(kind, test);
            // Said by code: a child that found no test by this name exits 0.
            std::process::exit(RAN);
        }
        Err(_) => {
            for mode in ["host", "vulkan"] {
                let status = run_child(test, mode, RACE_LIMIT)
                    .unwrap_or_else(|| panic!("{mode}: the child hung"));
                assert_eq!(
                    status.code(),
                    Some(RAN),
                    "{mode}: child ended {status:?} (signal {:?})",
                    status.signal()
                );
            }
        }
    }
}

/// The bytes of `b` through a view, retried while a migration holds it.
fn view_bytes(b: &hetmem::offload::Buffer) -> Vec<u8> {
    b.view::<u8>().unwrap().to_vec()
}

/// A CPU-mapped buffer is written and read through views while another thread sends it to
/// the device again and again (each touch faults it back), and a third allocates, writes,
/// sends to the device and frees other buffers, CPU-mapped and not (their unmaps and the
/// migrations of their ranges are invalidations next to the buffer's windows). The bytes
/// follow a shadow, no CPU fault is refused, and the buffer's pages settle.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn cpu_pointers_race_frees_and_migrations_of_neighbours() {
    in_child(
        "cpu::cpu_pointers_race_frees_and_migrations_of_neighbours",
        |kind, test| {
            use hetmem::offload::Location;
            let Some(ctx) = offload_context(kind, 4 << 20, None, test) else {
                return;
            };
            let Some(buf) = mapped_buffer(&ctx, 16 * PAGE as usize, test) else {
                return;
            };
            let stop = AtomicBool::new(false);
            let (sent, churned) = (AtomicUsize::new(0), AtomicUsize::new(0));
            let shadow = parking_lot::Mutex::new(pattern(16, 0x44));
            buf.write(0, &shadow.lock()).unwrap();
            watchdog_for(test, RACE_LIMIT, move || {
                thread::scope(|s| {
                    s.spawn(|| {
                        let mut i = 0usize;
                        while i < 400
                            || sent.load(Ordering::Relaxed) < 40
                            || churned.load(Ordering::Relaxed) < 40
                        {
                            i += 1;
                            {
                                let mut v = buf.view_mut::<u8>().unwrap();
                                let at = (i * 977) % v.len();
                                v[at] = i as u8;
                                shadow.lock()[at] = i as u8;
                            }
                            if i.is_multiple_of(16) {
                                assert_eq!(view_bytes(&buf), *shadow.lock(), "round {i}");
                            }
                        }
                        stop.store(true, Ordering::Release);
                    });
                    s.spawn(|| {
                        while !stop.load(Ordering::Acquire) {
                            if let Ok(p) = buf.prefetch(0..buf.len(), Location::Device) {
                                if p.wait().is_ok() {
                                    sent.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    });
                    s.spawn(|| {
                        let mut round = 0u8;
                        while !stop.load(Ordering::Acquire) {
                            round = round.wrapping_add(1);
                            let m = ctx.alloc_mapped(3 * PAGE as usize).unwrap();
                            let plain = ctx.alloc(2 * PAGE as usize).unwrap();
                            m.write(0, &pattern(3, round)).unwrap();
                            plain.write(0, &pattern(2, round)).unwrap();
                            m.prefetch(0..m.len(), Location::Device)
                                .unwrap()
                                .wait()
                                .unwrap();
                            plain
                                .prefetch(0..plain.len(), Location::Device)
                                .unwrap()
                                .wait()
                                .unwrap();
                            assert_eq!(view_bytes(&m), pattern(3, round));
                            plain.free().unwrap();
                            m.free().unwrap();
                            assert!(m.view::<u8>().is_err(), "a freed buffer has no view");
                            churned.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                });
                eprintln!(
                    "{kind:?}: {} CPU faults served, {} sends, {} neighbours freed",
                    ctx.cpu_faults(),
                    sent.load(Ordering::Relaxed),
                    churned.load(Ordering::Relaxed)
                );
                assert!(
                    ctx.take_cpu_fault_error().is_none(),
                    "a CPU fault was refused"
                );
                assert_eq!(view_bytes(&buf), *shadow.lock());
                let mut out = vec![0u8; buf.len()];
                buf.read(0, &mut out).unwrap();
                assert_eq!(out, *shadow.lock());
                let bad = unsettled(ctx.space(), ctx.space().pagemap(), buf.addr(), 16);
                assert!(bad.is_empty(), "{bad:#?}");
            });
        },
    );
}

/// A CPU-mapped buffer on the device is read through views by one thread while another
/// frees it (refused with `ViewActive` while a view lives, so retried) and a third frees its
/// neighbours: every view read before the free sees the buffer's bytes, every one after is
/// refused, no fault is refused, and the buffer's frames go back.
#[test]
fn cpu_views_race_the_free_of_their_own_buffer() {
    in_child(
        "cpu::cpu_views_race_the_free_of_their_own_buffer",
        |kind, test| {
            use hetmem::offload::Location;
            let Some(ctx) = offload_context(kind, 4 << 20, None, test) else {
                return;
            };
            for round in 0..20u8 {
                let Some(buf) = mapped_buffer(&ctx, 8 * PAGE as usize, test) else {
                    return;
                };
                let next = ctx.alloc_mapped(2 * PAGE as usize).unwrap();
                let bytes = pattern(8, round);
                buf.write(0, &bytes).unwrap();
                buf.prefetch(0..buf.len(), Location::Device)
                    .unwrap()
                    .wait()
                    .unwrap();
                let freed = AtomicBool::new(false);
                thread::scope(|s| {
                    s.spawn(|| loop {
                        let after = freed.load(Ordering::Acquire);
                        match buf.view::<u8>() {
                            Ok(v) => {
                                assert!(!after, "round {round}: a view after the free");
                                assert_eq!(&v[..], &bytes[..], "round {round}");
                            }
                            // The free may land between the load above and the view.
                            Err(Error::Freed) => break,
                            Err(e) => panic!("round {round}: view refused: {e}"),
                        }
                    });
                    s.spawn(|| loop {
                        match buf.free() {
                            Ok(()) => {
                                freed.store(true, Ordering::Release);
                                break;
                            }
                            Err(Error::ViewActive) => thread::yield_now(),
                            Err(e) => panic!("round {round}: free: {e}"),
                        }
                    });
                    s.spawn(|| next.free().unwrap());
                });
            }
            assert!(
                ctx.take_cpu_fault_error().is_none(),
                "a CPU fault was refused"
            );
        },
    );
}
