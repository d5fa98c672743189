//! Attacks on the CPU read-ahead of sequential scans (`migrate/src/cpu/ahead.rs`, the windows
//! of `cpu/fault.rs`): between faults the fault thread brings the windows after a scan back
//! from the device and maps them, each window's first page left unmapped as a tripwire. The
//! read-ahead must never show wrong bytes, never hang or spin, and never reach past the end of
//! its buffer (into a neighbour, or into a buffer mapped later at a freed one's address).
//! Public API only (`Context`, `Buffer`, raw loads in bounds), plus the space's entries
//! (`Context::space().pte`) and the driver's counters to see where pages are. The runs left to
//! the kernel are `adversary6_left`'s subject and not repeated here.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use hetmem::mm::Pte;
use hetmem::offload::{Buffer, Context, Location};
use hetmem::VirtAddr;
use hetmem_engine::DeviceKind;
use hetmem_tests::harness::{join_all, load_word, mapped_buffer, offload_context_with, ADD_KERNEL};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(15);
/// Lets the fault thread read ahead (it does so only while no fault waits); no test asserts a
/// duration, this only gives the read-ahead its chance to go wrong.
const SETTLE: Duration = Duration::from_millis(150);

/// A context on `kind` with `budget` bytes of device memory and `fault_around` pages per fault;
/// `None` (said) where there is no such device outside CI, a failure under `CI=true`.
fn context(kind: DeviceKind, budget: usize, fault_around: usize, test: &str) -> Option<Context> {
    offload_context_with(MIB as u64, fault_around, kind, budget as u64, None, test)
}

/// The word at index `w` from `base` (a live mapped buffer's address, `w` inside it).
fn load(base: usize, w: usize) -> u32 {
    // SAFETY: callers pass a live mapped buffer's address and an index inside it.
    unsafe { load_word(base, w) }
}

/// Fills a buffer's words with `f(index)` through `Buffer::write` (no CPU fault, so no stream).
fn fill(buf: &Buffer, f: impl Fn(usize) -> u32) {
    let bytes: Vec<u8> = (0..buf.len() / 4)
        .flat_map(|w| f(w).to_le_bytes())
        .collect();
    buf.write(0, &bytes).unwrap();
}

fn to_device(buf: &Buffer, r: Range<usize>) {
    buf.prefetch(r, Location::Device).unwrap().wait().unwrap();
}

/// Pages of `buf` whose entry is not a device page.
fn not_on_device(ctx: &Context, buf: &Buffer) -> Vec<usize> {
    (0..buf.len() / PAGE)
        .filter(|&k| {
            let pte = ctx
                .space()
                .pte(VirtAddr(buf.addr().get() + (k * PAGE) as u64));
            !matches!(pte, Pte::DevicePrivate { .. })
        })
        .collect()
}

/// The first word of `buf` that is not `f(index)`, read through a view.
fn first_wrong(buf: &Buffer, f: impl Fn(usize) -> u32) -> Option<(usize, u32)> {
    let v = buf.view::<u32>().unwrap();
    v.iter()
        .enumerate()
        .find(|&(w, &x)| x != f(w))
        .map(|(w, &x)| (w, x))
}

/// A named way of scanning a buffer.
type Scan<'a> = (&'a str, Box<dyn Fn() + 'a>);

fn seeded(seed: u32) -> impl Fn(usize) -> u32 + Copy {
    move |w| (w as u32).wrapping_mul(2654435761) ^ seed
}

/// Buffers of 1, 2, 3 pages, of a window less, exactly and more than `MAX_WINDOW` (2048
/// pages), each between two neighbours that stay on the device: scanned forward, backward and
/// half-way, each word must be right and neither neighbour may lose a page to the read-ahead.
fn odd_sizes(kind: DeviceKind, test: &str) {
    for fault_around in [1, 16] {
        let Some(ctx) = context(kind, 96 * MIB, fault_around, test) else {
            return;
        };
        let (mut kept, mut adjacent) = (Vec::new(), 0);
        for pages in [1usize, 2, 3, 4, 33, 2047, 2048, 2049, 2050, 4097] {
            let what = format!("{pages} pages, fault-around {fault_around}");
            // Views are placed top-down: the buffer lies between `hi` and `lo`.
            let hi = mapped_buffer(&ctx, MIB, test).unwrap();
            let Some(buf) = mapped_buffer(&ctx, pages * PAGE, test) else {
                return;
            };
            let lo = mapped_buffer(&ctx, MIB, test).unwrap();
            let end = buf.addr().get() + buf.len() as u64;
            adjacent += usize::from(end == hi.addr().get());
            let (f, fh, fl) = (seeded(pages as u32), seeded(0xA1), seeded(0xB2));
            fill(&buf, f);
            fill(&hi, fh);
            fill(&lo, fl);
            let words = buf.len() / 4;
            let base = buf.as_ptr().unwrap() as usize;
            let scans: [Scan; 3] = [
                (
                    "forward",
                    Box::new(|| assert_eq!(first_wrong(&buf, f), None, "{what}")),
                ),
                (
                    "backward",
                    Box::new(|| {
                        for w in (0..words).rev() {
                            assert_eq!(load(base, w), f(w), "{what}: backward, word {w}");
                        }
                    }),
                ),
                (
                    "half-way",
                    Box::new(|| {
                        for w in 0..words / 2 {
                            assert_eq!(load(base, w), f(w), "{what}: half-way, word {w}");
                        }
                    }),
                ),
            ];
            for (how, scan) in &scans {
                to_device(&buf, 0..buf.len());
                to_device(&hi, 0..hi.len());
                to_device(&lo, 0..lo.len());
                let before = ctx.stats().bytes_to_host;
                scan();
                std::thread::sleep(SETTLE);
                let brought = ctx.stats().bytes_to_host - before;
                assert_eq!(
                    not_on_device(&ctx, &hi),
                    vec![],
                    "{what}, {how}: next buffer"
                );
                assert_eq!(
                    not_on_device(&ctx, &lo),
                    vec![],
                    "{what}, {how}: buffer before"
                );
                assert!(
                    brought <= buf.len() as u64,
                    "{what}, {how}: {brought} bytes came back for a buffer of {}",
                    buf.len()
                );
            }
            drop(scans);
            assert_eq!(first_wrong(&buf, f), None, "{what}: at the end");
            assert_eq!(first_wrong(&hi, fh), None, "{what}: next buffer");
            assert_eq!(first_wrong(&lo, fl), None, "{what}: buffer before");
            // Kept until the context goes: freed holes would be handed out again and break
            // the next buffers' adjacency.
            kept.extend([hi, buf, lo]);
        }
        eprintln!("{test}: fault-around {fault_around}: {adjacent} of 10 buffers had the next one adjacent");
        assert!(ctx.take_cpu_fault_error().is_none());
    }
}

#[test]
fn odd_sized_buffers_scanned_every_way_stay_inside_on_the_host_device() {
    odd_sizes(
        DeviceKind::Host,
        "odd_sized_buffers_scanned_every_way_stay_inside_on_the_host_device",
    );
}

#[test]
fn odd_sized_buffers_scanned_every_way_stay_inside_on_lavapipe() {
    odd_sizes(
        DeviceKind::Vulkan,
        "odd_sized_buffers_scanned_every_way_stay_inside_on_lavapipe",
    );
}

/// Adds `n` to every word of `buf` on the device: a kernel on Vulkan, `write` on the host
/// device (which runs no kernels; its pages stay on the device).
fn add_on_device(ctx: &Context, buf: &Buffer, n: u32, old: impl Fn(usize) -> u32) {
    to_device(buf, 0..buf.len());
    if ctx.device_info().kind == DeviceKind::Vulkan {
        let k = ctx.compile_kernel(ADD_KERNEL, "add").unwrap();
        let args = [n, (buf.len() / PAGE) as u32];
        let groups = [(buf.len() / 4 / 64) as u32, 1, 1];
        ctx.launch(&k, &[(buf, 0..buf.len())], &args, groups)
            .unwrap()
            .wait()
            .unwrap();
        return;
    }
    fill(buf, |w| old(w).wrapping_add(n));
}

const SHARED_BYTES: usize = 4 * MIB;

/// Three threads scan one device-resident buffer at once: forward from the start, backward
/// from the end, forward from the middle (wrapping). Their faults keep resetting and moving
/// the one stream the read-ahead follows; every word must still be right, round after round
/// of device changes.
fn opposite_scans(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, 4 * SHARED_BYTES, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, SHARED_BYTES, test) else {
        return;
    };
    let words = SHARED_BYTES / 4;
    fill(&buf, |w| w as u32);
    let base = buf.as_ptr().unwrap() as usize;
    for round in 0..4u32 {
        to_device(&buf, 0..buf.len());
        let go = Arc::new(Barrier::new(3));
        let hs = (0..3)
            .map(|t| {
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    for i in 0..words {
                        let w = match t {
                            0 => i,
                            1 => words - 1 - i,
                            _ => (i + words / 2) % words,
                        };
                        assert_eq!(load(base, w), w as u32 + round, "scanner {t}: word {w}");
                    }
                })
            })
            .collect();
        join_all(test, hs, LIMIT);
        add_on_device(&ctx, &buf, 1, |w| w as u32 + round);
    }
    assert_eq!(first_wrong(&buf, |w| w as u32 + 4), None);
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn opposite_and_offset_scans_of_one_buffer_read_right_bytes_on_the_host_device() {
    opposite_scans(
        DeviceKind::Host,
        "opposite_and_offset_scans_of_one_buffer_read_right_bytes_on_the_host_device",
    );
}

#[test]
fn opposite_and_offset_scans_of_one_buffer_read_right_bytes_on_lavapipe() {
    opposite_scans(
        DeviceKind::Vulkan,
        "opposite_and_offset_scans_of_one_buffer_read_right_bytes_on_lavapipe",
    );
}

const STOP_BYTES: usize = 24 * MIB;

/// A scan stops a quarter of the way into a device-resident buffer, so the read-ahead goes on
/// bringing the windows after it; meanwhile one thread rewrites the second half through
/// `Buffer::write` (pieces in a scrambled order) and another moves ranges of the whole buffer
/// to the device and back. Once all have returned, a scan of the whole buffer must see the
/// first half unchanged and the second half as written.
fn stopped_scan_racing_writes(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, STOP_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, STOP_BYTES, test) else {
        return;
    };
    let (words, half) = (STOP_BYTES / 4, STOP_BYTES / 2);
    fill(&buf, |w| w as u32);
    let base = buf.as_ptr().unwrap() as usize;
    let mut now: Vec<u32> = (0..words as u32).collect();
    for round in 1..=5u32 {
        to_device(&buf, 0..STOP_BYTES);
        let stop = Arc::new(AtomicBool::new(false));
        let scanner = {
            let want = now[..words / 4].to_vec();
            std::thread::spawn(move || {
                for (w, &x) in want.iter().enumerate() {
                    assert_eq!(load(base, w), x, "round {round}: scanned word {w}");
                }
            })
        };
        let writer = {
            let buf = buf.clone();
            std::thread::spawn(move || {
                let pieces = half / MIB;
                for k in 0..pieces {
                    let p = (k * 7 + round as usize) % pieces;
                    let at = half + p * MIB;
                    let bytes: Vec<u8> = (at / 4..(at + MIB) / 4)
                        .flat_map(|w| (w as u32 ^ (round << 24)).to_le_bytes())
                        .collect();
                    buf.write(at, &bytes).unwrap();
                }
            })
        };
        let mover = {
            let (buf, stop) = (buf.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x2545_F491_4F6C_DD1Du64 ^ round as u64;
                while !stop.load(Ordering::Acquire) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let first = (x as usize >> 8) % (STOP_BYTES / PAGE);
                    let n = 1 + (x as usize >> 40) % 1024;
                    let r = first * PAGE..(first + n).min(STOP_BYTES / PAGE) * PAGE;
                    let to = if x & 1 == 0 {
                        Location::Device
                    } else {
                        Location::Host
                    };
                    buf.prefetch(r, to).unwrap().wait().unwrap();
                }
            })
        };
        join_all(test, vec![scanner, writer], LIMIT);
        stop.store(true, Ordering::Release);
        join_all(test, vec![mover], LIMIT);
        for (w, x) in now.iter_mut().enumerate().skip(half / 4) {
            *x = w as u32 ^ (round << 24);
        }
        for (w, &x) in now.iter().enumerate() {
            assert_eq!(load(base, w), x, "round {round}: word {w} after the race");
        }
    }
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn a_stopped_scan_racing_writes_and_moves_sees_the_last_bytes_on_the_host_device() {
    stopped_scan_racing_writes(
        DeviceKind::Host,
        "a_stopped_scan_racing_writes_and_moves_sees_the_last_bytes_on_the_host_device",
    );
}

#[test]
fn a_stopped_scan_racing_writes_and_moves_sees_the_last_bytes_on_lavapipe() {
    stopped_scan_racing_writes(
        DeviceKind::Vulkan,
        "a_stopped_scan_racing_writes_and_moves_sees_the_last_bytes_on_lavapipe",
    );
}

#[path = "adversary7_ahead/more.rs"]
mod more;
