//! The read-ahead against freed buffers, read-only neighbours and an exhausted device.

use std::os::unix::process::ExitStatusExt;

use hetmem_tests::harness::run_child;

use super::*;

const FREED_BYTES: usize = 40 * MIB;
const FREED_SCANNED: usize = 3 * MIB;

/// A scan stops early in a device-resident buffer and the buffer is freed at once, while the
/// read-ahead is still bringing the windows after the scan. A new buffer then takes the freed
/// one's addresses (the kernel hands the same hole back) and is moved to the device: no page of
/// it may come back to host memory without an access, and its bytes must be its own.
fn freed_while_read_ahead(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, 2 * FREED_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let mut reused = 0;
    for round in 0..6u32 {
        let Some(a) = mapped_buffer(&ctx, FREED_BYTES, test) else {
            return;
        };
        let fa = seeded(round);
        fill(&a, fa);
        to_device(&a, 0..FREED_BYTES);
        let base = a.as_ptr().unwrap() as usize;
        for w in 0..FREED_SCANNED / 4 {
            assert_eq!(
                load(base, w),
                fa(w),
                "round {round}: word {w} of the freed buffer"
            );
        }
        let old = a.addr();
        a.free().unwrap();
        let c = mapped_buffer(&ctx, FREED_BYTES, test).unwrap();
        reused += usize::from(c.addr() == old);
        let fc = seeded(!round);
        fill(&c, fc);
        to_device(&c, 0..FREED_BYTES);
        let before = ctx.stats().bytes_to_host;
        std::thread::sleep(SETTLE);
        let brought = ctx.stats().bytes_to_host - before;
        let back = not_on_device(&ctx, &c);
        assert!(
            brought == 0 && back.is_empty(),
            "round {round}: the new buffer (same address: {}) lost {} pages ({brought} bytes) \
             to the freed buffer's read-ahead, from page {:?}",
            c.addr() == old,
            back.len(),
            back.first()
        );
        assert_eq!(
            first_wrong(&c, fc),
            None,
            "round {round}: the new buffer's bytes"
        );
        c.free().unwrap();
    }
    eprintln!("{test}: the new buffer took the freed one's address in {reused} of 6 rounds");
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn a_buffer_mapped_where_one_was_freed_mid_read_ahead_stays_on_the_device_on_the_host_device() {
    freed_while_read_ahead(
        DeviceKind::Host,
        "a_buffer_mapped_where_one_was_freed_mid_read_ahead_stays_on_the_device_on_the_host_device",
    );
}

#[test]
fn a_buffer_mapped_where_one_was_freed_mid_read_ahead_stays_on_the_device_on_lavapipe() {
    freed_while_read_ahead(
        DeviceKind::Vulkan,
        "a_buffer_mapped_where_one_was_freed_mid_read_ahead_stays_on_the_device_on_lavapipe",
    );
}

const RO_BYTES: usize = 12 * MIB;

/// Three buffers side by side, the middle one read-only: scanning the first must not bring the
/// read-only one back; scans of each, and one walk across all three where they are adjacent,
/// read the right bytes; then a store into the read-only one's middle must end in `SIGBUS`
/// (the read-ahead maps its pages write-protected, never writable).
#[test]
fn a_read_only_neighbour_is_neither_brought_nor_made_writable_by_read_ahead() {
    let test = "a_read_only_neighbour_is_neither_brought_nor_made_writable_by_read_ahead";
    let Ok(mode) = std::env::var("HETMEM_CHILD") else {
        for kind in ["host", "vulkan"] {
            let status = run_child(&format!("more::{test}"), kind, Duration::from_secs(60))
                .unwrap_or_else(|| panic!("{kind}: the child HUNG"));
            if status.code() == Some(77) {
                continue;
            }
            assert_eq!(status.signal(), Some(libc::SIGBUS), "{kind}: {status:?}");
        }
        return;
    };
    let kind = if mode == "host" {
        DeviceKind::Host
    } else {
        DeviceKind::Vulkan
    };
    let Some(ctx) = context(kind, 3 * RO_BYTES + 8 * MIB, 16, test) else {
        std::process::exit(77);
    };
    let Some(c) = mapped_buffer(&ctx, RO_BYTES, test) else {
        std::process::exit(77);
    };
    let b = mapped_buffer(&ctx, RO_BYTES, test).unwrap();
    let a = mapped_buffer(&ctx, RO_BYTES, test).unwrap();
    let bufs = [&a, &b, &c];
    let fs = [seeded(1), seeded(2), seeded(3)];
    for (buf, f) in bufs.iter().zip(fs) {
        fill(buf, f);
        to_device(buf, 0..RO_BYTES);
    }
    b.set_read_only(true).unwrap();
    assert_eq!(first_wrong(&a, fs[0]), None, "a");
    std::thread::sleep(SETTLE);
    assert_eq!(
        not_on_device(&ctx, &b),
        vec![],
        "the read-only buffer after a's scan"
    );
    assert_eq!(not_on_device(&ctx, &c), vec![], "c after a's scan");
    assert_eq!(first_wrong(&b, fs[1]), None, "b");
    assert_eq!(first_wrong(&c, fs[2]), None, "c");
    let adjacent = a.addr().get() + RO_BYTES as u64 == b.addr().get()
        && b.addr().get() + RO_BYTES as u64 == c.addr().get();
    if adjacent {
        for buf in bufs {
            to_device(buf, 0..RO_BYTES);
        }
        // One walk across the three buffers, as one stream of faults.
        let base = a.as_ptr().unwrap() as usize;
        for w in 0..3 * RO_BYTES / 4 {
            let (k, i) = (w / (RO_BYTES / 4), w % (RO_BYTES / 4));
            assert_eq!(load(base, w), fs[k](i), "walk: buffer {k}, word {i}");
        }
    } else {
        eprintln!("{test}: the three views are not adjacent; no walk across them");
    }
    assert!(ctx.take_cpu_fault_error().is_none());
    let target = b.as_ptr().unwrap() as usize + RO_BYTES / 2 + 4 * PAGE;
    // SAFETY: a store into a read-only managed page of a live buffer: the mirror must refuse
    // it with SIGBUS, which is what the test is about.
    unsafe { (target as *mut u32).write_volatile(7) };
    // Reached only if the store went through.
    std::process::exit(0);
}

const BIG_BYTES: usize = 16 * MIB;
const SMALL_BUDGET: usize = 4 * MIB;

/// The device holds a quarter of the buffer: a mover keeps sending 2 MiB pieces there (each
/// evicts others) while scanners read the buffer forward and backward, so windows of the
/// read-ahead cannot all be on the device and some are being evicted as they come. Every word
/// must be right, and once everyone has stopped nothing may keep moving (no read-ahead that
/// keeps bringing, no fault served without an access).
fn exhausted_device(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, SMALL_BUDGET, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, BIG_BYTES, test) else {
        return;
    };
    let words = BIG_BYTES / 4;
    let f = seeded(0x5EED);
    fill(&buf, f);
    let base = buf.as_ptr().unwrap() as usize;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (buf, stop) = (buf.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut k = round;
                while !stop.load(Ordering::Acquire) {
                    let at = (k * 5 % 8) * 2 * MIB;
                    buf.prefetch(at..at + 2 * MIB, Location::Device)
                        .unwrap()
                        .wait()
                        .unwrap();
                    k += 1;
                }
            })
        };
        let scanners = (0..2)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..words {
                        let w = if t == 0 { i } else { words - 1 - i };
                        assert_eq!(load(base, w), f(w), "scanner {t}: word {w}");
                    }
                })
            })
            .collect();
        join_all(test, scanners, LIMIT);
        stop.store(true, Ordering::Release);
        join_all(test, vec![mover], LIMIT);
        // A scan that stops half-way, the rest left on the device where it fits.
        to_device(&buf, BIG_BYTES - SMALL_BUDGET..BIG_BYTES);
        for w in 0..words / 2 {
            assert_eq!(load(base, w), f(w), "round {round}: half-way, word {w}");
        }
        std::thread::sleep(SETTLE);
        let (s0, faults0) = (ctx.stats(), ctx.cpu_faults());
        std::thread::sleep(2 * SETTLE);
        let (s1, faults1) = (ctx.stats(), ctx.cpu_faults());
        assert_eq!(
            (s1.bytes_to_host, s1.bytes_to_device, s1.evictions, faults1),
            (s0.bytes_to_host, s0.bytes_to_device, s0.evictions, faults0),
            "round {round}: pages kept moving with no one touching the buffer"
        );
    }
    assert_eq!(first_wrong(&buf, f), None, "at the end");
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn scans_with_an_exhausted_device_read_right_bytes_and_then_rest_on_the_host_device() {
    exhausted_device(
        DeviceKind::Host,
        "scans_with_an_exhausted_device_read_right_bytes_and_then_rest_on_the_host_device",
    );
}

#[test]
fn scans_with_an_exhausted_device_read_right_bytes_and_then_rest_on_lavapipe() {
    exhausted_device(
        DeviceKind::Vulkan,
        "scans_with_an_exhausted_device_read_right_bytes_and_then_rest_on_lavapipe",
    );
}
