//! Attacks on the runs of a CPU-mapped buffer that the mirror leaves to the kernel's own fault
//! path (`migrate/src/cpu/left.rs`): a long run of present, writable home pages loses its
//! userfaultfd registration, and the first invalidation that touches it must register it again
//! before the process's entries go. Public API only (`Context`, `Buffer`, raw loads and stores
//! in bounds), plus `/proc/self/maps` to see that runs were left at all. Scenarios that may end
//! in a signal or hang run in a child process of this binary.

use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use hetmem::offload::{Buffer, Context, Location};
use hetmem::{Error, ErrorKind};
use hetmem_engine::DeviceKind;
use hetmem_tests::harness::{
    join_all, load_word, mapped_buffer, offload_context_with, run_child_with, store_word,
    ADD_KERNEL,
};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const LIMIT: Duration = Duration::from_secs(60);
/// The buffer most scenarios use.
const RACE_BYTES: usize = 8 * MIB;

/// A context on `kind` with `fault_around` pages per fault; `None` (said) where there is no
/// such device outside CI, a failure under `CI=true`.
fn context(kind: DeviceKind, budget: usize, fault_around: usize, test: &str) -> Option<Context> {
    // Chunks large enough that a kernel may bind the whole budget (lavapipe allows 30).
    let chunk = (budget / 16).next_power_of_two().max(4 * MIB);
    offload_context_with(chunk as u64, fault_around, kind, budget as u64, None, test)
}

/// The word at index `w` from `base` (a live mapped buffer's address, `w` inside it).
fn load(base: usize, w: usize) -> u32 {
    // SAFETY: callers pass a live mapped buffer's address and an index inside it.
    unsafe { load_word(base, w) }
}

/// Stores `v` at word `w` from `base`.
fn store(base: usize, w: usize, v: u32) {
    // SAFETY: as for `load`; each test says which thread owns which words.
    unsafe { store_word(base, w, v) }
}

/// Mappings of the process that overlap `[addr, addr + len)`: a buffer with runs left to the
/// kernel is split into one mapping per run and per registered part between them.
fn mappings_in(addr: usize, len: usize) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                usize::from_str_radix(a, 16).ok()?,
                usize::from_str_radix(b, 16).ok()?,
            ))
        })
        .filter(|&(a, b)| a < addr + len && addr < b)
        .count()
}

/// Fills the buffer's words with `f(index)` through an exclusive view.
fn fill(buf: &Buffer, f: impl Fn(usize) -> u32) {
    let mut v = buf.view_mut::<u32>().unwrap();
    v.iter_mut().enumerate().for_each(|(i, w)| *w = f(i));
}

fn to_device(buf: &Buffer, r: Range<usize>) {
    buf.prefetch(r, Location::Device).unwrap().wait().unwrap();
}

/// Adds `n` to every word of `r` on the device: a kernel on Vulkan, a library `write` of the
/// device-resident pages on the host device (which runs no kernels).
fn add_on_device(ctx: &Context, buf: &Buffer, r: Range<usize>, n: u32, old: impl Fn(usize) -> u32) {
    to_device(buf, r.clone());
    if ctx.device_info().kind == DeviceKind::Vulkan {
        let k = ctx.compile_kernel(ADD_KERNEL, "add").unwrap();
        // At most 4 MiB per launch (the chunks of device memory one kernel may bind).
        for at in r.clone().step_by(4 * MIB) {
            let part = at..(at + 4 * MIB).min(r.end);
            let args = [n, (part.len() / PAGE) as u32];
            let groups = [(part.len() / 4 / 64) as u32, 1, 1];
            let mut tries = 0;
            loop {
                match ctx.launch(&k, &[(buf, part.clone())], &args, groups) {
                    Ok(l) => break l.wait().unwrap(),
                    Err(Error::BufferBusy { .. }) if tries < 100 => tries += 1,
                    Err(e) => panic!("launch: {e}"),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        return;
    }
    let bytes: Vec<u8> = (r.start / 4..r.end / 4)
        .flat_map(|w| old(w).wrapping_add(n).to_le_bytes())
        .collect();
    buf.write(r.start, &bytes).unwrap();
}

/// Runs `test` in a child per device kind (`host`, `vulkan`) with `env`; each must end as
/// `ok` says (77: no device or userfaultfd there, said by the child).
fn in_children(test: &str, env: &[(&str, &str)], ok: fn(ExitStatus) -> bool, want: &str) {
    for kind in ["host", "vulkan"] {
        let status = run_child_with(test, kind, env, LIMIT)
            .unwrap_or_else(|| panic!("{test} on {kind}: the child HUNG"));
        if status.code() == Some(77) {
            continue;
        }
        assert!(
            ok(status),
            "{test} on {kind}: wanted {want}, got {status:?}"
        );
    }
}

/// The device kind a child runs on, `None` in the parent.
fn child_kind() -> Option<DeviceKind> {
    let mode = std::env::var("HETMEM_CHILD").ok()?;
    Some(if mode == "host" {
        DeviceKind::Host
    } else {
        DeviceKind::Vulkan
    })
}

fn ended_well(s: ExitStatus) -> bool {
    s.success()
}

fn sigbus(s: ExitStatus) -> bool {
    s.signal() == Some(libc::SIGBUS)
}

/// A context and a mapped buffer of `bytes` in a child (exit 77 where there is none).
fn child_setup(
    kind: DeviceKind,
    bytes: usize,
    fault_around: usize,
    test: &str,
) -> (Context, Buffer) {
    let Some(ctx) = context(kind, bytes + 8 * MIB, fault_around, test) else {
        std::process::exit(77);
    };
    let Some(buf) = mapped_buffer(&ctx, bytes, test) else {
        std::process::exit(77);
    };
    (ctx, buf)
}

const AHEAD_BYTES: usize = 24 * MIB;
const SCANNED: usize = 3 * MIB;

/// Scans the first `SCANNED` bytes of a device-resident buffer (checking `want`), then gives
/// the fault thread time to read ahead past where the scan stopped.
fn scan_then_stop(buf: &Buffer, want: impl Fn(usize) -> u32) {
    let v = buf.view::<u32>().unwrap();
    for (w, &x) in v[..SCANNED / 4].iter().enumerate() {
        assert_eq!(x, want(w), "scanned word {w}");
    }
    drop(v);
    // Not a timing assertion: the read-ahead runs while no fault waits, this lets it run.
    std::thread::sleep(Duration::from_millis(150));
}

/// Windows the read-ahead brought back (and left to the kernel) past a scan that stopped are
/// never read; the buffer then changes on the device, or through `write` while those windows
/// are host-resident: a later read of them must see the new bytes.
fn windows_read_ahead_past_a_stopped_scan(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, AHEAD_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, AHEAD_BYTES, test) else {
        return;
    };
    let words = AHEAD_BYTES / 4;
    fill(&buf, |i| i as u32);
    let mut add = 0u32;
    for round in 1..=4u32 {
        to_device(&buf, 0..AHEAD_BYTES);
        scan_then_stop(&buf, |w| w as u32 + add);
        if round % 2 == 1 {
            add_on_device(&ctx, &buf, 0..AHEAD_BYTES, 9, |w| w as u32 + add);
        } else {
            // The pages read ahead are host-resident now: the library writes them in place.
            let bytes: Vec<u8> = (0..words)
                .flat_map(|w| (w as u32 + add + 9).to_le_bytes())
                .collect();
            buf.write(0, &bytes).unwrap();
        }
        add += 9;
        let base = buf.as_ptr().unwrap() as usize;
        // Past the scan first, backwards, so that no sequential stream runs into them.
        for w in (SCANNED / 4..words).rev().step_by(97) {
            assert_eq!(load(base, w), w as u32 + add, "round {round}: word {w}");
        }
        let v = buf.view::<u32>().unwrap();
        assert!(
            v.iter().enumerate().all(|(w, &x)| x == w as u32 + add),
            "round {round}: a word is stale"
        );
    }
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn windows_read_ahead_past_a_stopped_scan_show_later_bytes_on_the_host_device() {
    windows_read_ahead_past_a_stopped_scan(
        DeviceKind::Host,
        "windows_read_ahead_past_a_stopped_scan_show_later_bytes_on_the_host_device",
    );
}

#[test]
fn windows_read_ahead_past_a_stopped_scan_show_later_bytes_on_lavapipe() {
    windows_read_ahead_past_a_stopped_scan(
        DeviceKind::Vulkan,
        "windows_read_ahead_past_a_stopped_scan_show_later_bytes_on_lavapipe",
    );
}

/// `read(2)` from a pipe into, and `write(2)` to a pipe from, runs that were left to the
/// kernel and have since gone to the device and changed there: the kernel's own accesses
/// must fault (served by the mirror) rather than use the old page-cache bytes.
fn system_calls_on_left_runs(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, RACE_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, RACE_BYTES, test) else {
        return;
    };
    let words = RACE_BYTES / 4;
    fill(&buf, |i| i as u32);
    to_device(&buf, 0..RACE_BYTES);
    let sum: u64 = buf.view::<u32>().unwrap().iter().map(|&w| w as u64).sum();
    assert_eq!(sum, (words as u64) * (words as u64 - 1) / 2);
    assert!(
        mappings_in(buf.addr().get() as usize, RACE_BYTES) > 1,
        "the scan left no run to the kernel: this test would test nothing"
    );
    add_on_device(&ctx, &buf, 0..RACE_BYTES, 3, |w| w as u32);
    let user_only = ctx.cpu_pointers().unwrap() == hetmem::cpu::FaultScope::UserOnly;
    let mut fds = [0i32; 2];
    // SAFETY: pipe(2) fills the two descriptors of a new pipe.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let base = buf.as_mut_ptr().unwrap() as usize;
    // Out of the buffer: 16 KiB from 5 MiB + 100.
    let (out_at, len) = (5 * MIB + 100, 16 << 10);
    // SAFETY: the source lies inside the buffer; the pipe holds 64 KiB, so this does not block.
    let n = unsafe { libc::write(fds[1], (base + out_at) as *const libc::c_void, len) };
    if user_only {
        assert_eq!(n, -1, "a kernel access to a device page without privilege");
    } else {
        assert_eq!(n, len as isize, "write(2) from the buffer");
        let mut got = vec![0u8; len];
        // SAFETY: reads into a Vec of `len` bytes.
        let m = unsafe { libc::read(fds[0], got.as_mut_ptr().cast(), len) };
        assert_eq!(m, len as isize);
        let mut want = vec![0u8; len];
        buf.read(out_at, &mut want).unwrap();
        assert_eq!(got, want, "write(2) sent other bytes than the buffer holds");
        assert_eq!(
            got[..4],
            ((out_at / 4) as u32 + 3).to_le_bytes(),
            "old bytes sent"
        );
    }
    // Into the buffer: 16 KiB at 3 MiB + 100 (crossing pages).
    let (in_at, pattern) = (3 * MIB + 100, vec![0xA5u8; len]);
    // SAFETY: writes a Vec's bytes to the pipe.
    assert_eq!(
        unsafe { libc::write(fds[1], pattern.as_ptr().cast(), len) },
        len as isize
    );
    // SAFETY: the destination lies inside the buffer, which no other thread uses.
    let n = unsafe { libc::read(fds[0], (base + in_at) as *mut libc::c_void, len) };
    // SAFETY: closing the pipe made above.
    unsafe { (libc::close(fds[0]), libc::close(fds[1])) };
    let mut all = vec![0u8; RACE_BYTES];
    buf.read(0, &mut all).unwrap();
    for (w, c) in all.chunks_exact(4).enumerate() {
        let b = 4 * w;
        let piped = n > 0 && b + 4 > in_at && b < in_at + len;
        if !piped {
            let v = u32::from_le_bytes(c.try_into().unwrap());
            assert_eq!(v, w as u32 + 3, "word {w}: read(2) {n}");
        }
    }
    if !user_only {
        assert_eq!(n, len as isize, "read(2) into the buffer");
        assert!(all[in_at..in_at + len].iter().all(|&b| b == 0xA5));
    }
}

#[test]
fn system_calls_on_left_runs_see_device_bytes_on_the_host_device() {
    system_calls_on_left_runs(
        DeviceKind::Host,
        "system_calls_on_left_runs_see_device_bytes_on_the_host_device",
    );
}

#[test]
fn system_calls_on_left_runs_see_device_bytes_on_lavapipe() {
    system_calls_on_left_runs(
        DeviceKind::Vulkan,
        "system_calls_on_left_runs_see_device_bytes_on_lavapipe",
    );
}

/// Threads fault at once in the same windows of a device-resident buffer (each reads every
/// fourth page): while one fault's window is left to the kernel, the others' messages are
/// still queued for it and must be answered (no hang), and every word must be right.
fn simultaneous_faults(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, RACE_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, RACE_BYTES, test) else {
        return;
    };
    let words = RACE_BYTES / 4;
    fill(&buf, |i| i as u32);
    let base = buf.as_ptr().unwrap() as usize;
    for round in 0..10u32 {
        to_device(&buf, 0..RACE_BYTES);
        let go = Arc::new(Barrier::new(4));
        let hs = (0..4)
            .map(|t| {
                let go = go.clone();
                std::thread::spawn(move || {
                    go.wait();
                    for page in (t..RACE_BYTES / PAGE).step_by(4) {
                        for w in (page * PAGE / 4..(page + 1) * PAGE / 4).step_by(97) {
                            assert_eq!(load(base, w), w as u32 + round, "thread {t}: word {w}");
                        }
                    }
                })
            })
            .collect();
        join_all(test, hs, LIMIT);
        add_on_device(&ctx, &buf, 0..RACE_BYTES, 1, |w| w as u32 + round);
    }
    let v = buf.view::<u32>().unwrap();
    assert!(v.iter().enumerate().all(|(w, &x)| x == w as u32 + 10));
    assert_eq!(v.len(), words);
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn simultaneous_faults_in_windows_being_left_are_all_served_on_the_host_device() {
    simultaneous_faults(
        DeviceKind::Host,
        "simultaneous_faults_in_windows_being_left_are_all_served_on_the_host_device",
    );
}

#[test]
fn simultaneous_faults_in_windows_being_left_are_all_served_on_lavapipe() {
    simultaneous_faults(
        DeviceKind::Vulkan,
        "simultaneous_faults_in_windows_being_left_are_all_served_on_lavapipe",
    );
}

/// Two buffers allocated one after the other: their views may sit side by side in the
/// process and in the frame file, so the kernel may merge their left runs into one mapping.
/// Each must still see its own device changes, and freeing one must leave the other intact.
fn adjacent_buffers(kind: DeviceKind, test: &str) {
    let Some(ctx) = context(kind, 2 * RACE_BYTES + 8 * MIB, 16, test) else {
        return;
    };
    let (Some(a), Some(b)) = (
        mapped_buffer(&ctx, RACE_BYTES, test),
        mapped_buffer(&ctx, RACE_BYTES, test),
    ) else {
        return;
    };
    let (pa, pb) = (a.addr().get() as usize, b.addr().get() as usize);
    if pa.abs_diff(pb) != RACE_BYTES {
        eprintln!("{test}: the views are not adjacent ({pa:#x}, {pb:#x})");
    }
    fill(&a, |i| i as u32);
    fill(&b, |i| !(i as u32));
    let check = |buf: &Buffer, f: &dyn Fn(usize) -> u32, what: &str| {
        let v = buf.view::<u32>().unwrap();
        let bad = v.iter().enumerate().find(|&(w, &x)| x != f(w));
        assert!(bad.is_none(), "{what}: {bad:?}");
    };
    for round in 0..3u32 {
        to_device(&a, 0..RACE_BYTES);
        to_device(&b, 0..RACE_BYTES);
        check(&a, &|w| w as u32 + 2 * round, "a, scanned");
        check(&b, &|w| (!(w as u32)).wrapping_add(round), "b, scanned");
        add_on_device(&ctx, &a, 0..RACE_BYTES, 2, |w| w as u32 + 2 * round);
        add_on_device(&ctx, &b, 0..RACE_BYTES, 1, |w| {
            (!(w as u32)).wrapping_add(round)
        });
    }
    check(&a, &|w| w as u32 + 6, "a, at the end");
    a.free().unwrap();
    check(
        &b,
        &|w| (!(w as u32)).wrapping_add(3),
        "b, after a was freed",
    );
    add_on_device(&ctx, &b, 0..RACE_BYTES, 1, |w| {
        (!(w as u32)).wrapping_add(3)
    });
    check(
        &b,
        &|w| (!(w as u32)).wrapping_add(4),
        "b, changed after a was freed",
    );
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn adjacent_buffers_keep_their_own_bytes_on_the_host_device() {
    adjacent_buffers(
        DeviceKind::Host,
        "adjacent_buffers_keep_their_own_bytes_on_the_host_device",
    );
}

#[test]
fn adjacent_buffers_keep_their_own_bytes_on_lavapipe() {
    adjacent_buffers(
        DeviceKind::Vulkan,
        "adjacent_buffers_keep_their_own_bytes_on_lavapipe",
    );
}

#[path = "adversary6_left/signals.rs"]
mod signals;
