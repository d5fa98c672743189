//! The scenarios of `adversary6_left` that end in a signal, or may: each runs in a child of
//! the test binary, on the host device and on Vulkan (`in_children`).

use super::*;

const STEP: u32 = 7;
/// Rounds of device changes the scanners race.
const ROUNDS: u32 = 16;

/// Two scanners own a quarter of the buffer each and add `STEP` to every word of it, pass
/// after pass, checking the word they left (a stale page or a lost store shows); a mover
/// sends random ranges of the whole buffer to the device and back; the main thread changes
/// the second half on the device round after round and reads it back through the pointer,
/// so the runs the scanners' read-ahead left there must be registered again each time.
///
/// Long: three kinds of racing threads and the main thread's rounds, which share the
/// buffer's layout and the shadow; split apart they would pass all of it around.
fn scanners_race_moves_and_device_changes(kind: DeviceKind, test: &str) {
    let (ctx, buf) = child_setup(kind, RACE_BYTES, 16, test);
    let (half, words) = (RACE_BYTES / 2, RACE_BYTES / 4);
    fill(&buf, |i| i as u32);
    to_device(&buf, 0..RACE_BYTES);
    let base = buf.as_mut_ptr().unwrap() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let mut hs = Vec::new();
    for k in 0..2 {
        let stop = stop.clone();
        let own = k * words / 4..(k + 1) * words / 4;
        hs.push(std::thread::spawn(move || {
            let mut pass = 0u32;
            while pass < 2 || !stop.load(Ordering::Acquire) {
                for w in own.clone() {
                    let v = load(base, w);
                    assert_eq!(
                        v,
                        w as u32 + STEP * pass,
                        "scanner {k}: word {w}, pass {pass}"
                    );
                    store(base, w, v + STEP);
                }
                pass += 1;
            }
            pass
        }));
    }
    let mover = {
        let (buf, stop) = (buf.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut x, pages) = (0x9E37_79B9_7F4A_7C15u64, RACE_BYTES / PAGE);
            while !stop.load(Ordering::Acquire) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let first = (x >> 33) as usize % pages;
                let r = first * PAGE..(first + 1 + (x >> 17) as usize % 700).min(pages) * PAGE;
                let moved = match x % 3 {
                    0 => buf.prefetch(r, Location::Device).and_then(|p| p.wait()),
                    1 => buf.evict(r),
                    _ => buf.prefetch(r, Location::Host).and_then(|p| p.wait()),
                };
                if let Err(e) = moved {
                    assert_eq!(e.kind(), ErrorKind::Transient, "mover: {e}");
                }
            }
            0
        })
    };
    for round in 1..=ROUNDS {
        add_on_device(&ctx, &buf, half..RACE_BYTES, 5, |w| {
            w as u32 + 5 * (round - 1)
        });
        for w in words / 2..words {
            assert_eq!(
                load(base, w),
                w as u32 + 5 * round,
                "round {round}: word {w}"
            );
        }
    }
    stop.store(true, Ordering::Release);
    hs.push(mover);
    let passes = join_all(test, hs, LIMIT);
    let mut all = vec![0u8; RACE_BYTES];
    buf.read(0, &mut all).unwrap();
    for (w, c) in all.chunks_exact(4).enumerate() {
        let want = match w / (words / 4) {
            k @ (0 | 1) => w as u32 + STEP * passes[k],
            _ => w as u32 + 5 * ROUNDS,
        };
        assert_eq!(
            u32::from_le_bytes(c.try_into().unwrap()),
            want,
            "word {w} at the end"
        );
    }
    if let Some(e) = ctx.take_cpu_fault_error() {
        panic!("a fault was refused: {e:?}");
    }
}

#[test]
fn scanners_racing_moves_and_device_changes_keep_every_word() {
    let test = "signals::scanners_racing_moves_and_device_changes_keep_every_word";
    match child_kind() {
        None => in_children(test, &[], ended_well, "success"),
        Some(kind) => scanners_race_moves_and_device_changes(kind, test),
    }
}

#[test]
fn scanners_racing_moves_and_device_changes_keep_every_word_with_punched_homes() {
    let test =
        "signals::scanners_racing_moves_and_device_changes_keep_every_word_with_punched_homes";
    match child_kind() {
        None => in_children(
            test,
            &[("HETMEM_RELEASE_HOMES", "1")],
            ended_well,
            "success",
        ),
        Some(kind) => scanners_race_moves_and_device_changes(kind, test),
    }
}

/// A store into a window the read-ahead left to the kernel (never touched by the scan) after
/// the buffer was made read-only must be refused.
#[test]
fn a_store_into_a_window_read_ahead_made_read_only_is_refused() {
    let test = "signals::a_store_into_a_window_read_ahead_made_read_only_is_refused";
    let Some(kind) = child_kind() else {
        return in_children(test, &[], sigbus, "SIGBUS");
    };
    let (_ctx, buf) = child_setup(kind, AHEAD_BYTES, 16, test);
    fill(&buf, |i| i as u32);
    to_device(&buf, 0..AHEAD_BYTES);
    scan_then_stop(&buf, |w| w as u32);
    buf.set_read_only(true).unwrap();
    let base = buf.as_mut_ptr().unwrap() as usize;
    let w = (SCANNED + 2 * MIB + PAGE) / 4;
    assert_eq!(load(base, w), w as u32);
    store(base, w, 1);
    // Reached only if the store went through.
    std::process::exit(0);
}

/// A thread stores sequentially (its stores leave runs to the kernel) while the main thread
/// makes the buffer read-only; a store made after `set_read_only` returned, into a page the
/// thread stored to before, must be refused.
#[test]
fn a_store_racing_set_read_only_is_refused_once_it_returned() {
    let test = "signals::a_store_racing_set_read_only_is_refused_once_it_returned";
    let Some(kind) = child_kind() else {
        return in_children(test, &[], sigbus, "SIGBUS");
    };
    let (_ctx, buf) = child_setup(kind, RACE_BYTES, 16, test);
    to_device(&buf, 0..RACE_BYTES);
    let base = buf.as_mut_ptr().unwrap() as usize;
    let done = Arc::new(AtomicBool::new(false));
    let passes = Arc::new(AtomicU32::new(0));
    let (d, p) = (done.clone(), passes.clone());
    std::thread::spawn(move || loop {
        for w in (0..RACE_BYTES / 4).step_by(16) {
            if d.load(Ordering::Acquire) {
                // Half a buffer behind: a page the last pass stored to, likely in a left run
                // (the page being faulted in now is not one).
                store(base, (w + RACE_BYTES / 8) % (RACE_BYTES / 4), 1);
                // Reached only if a store into a read-only buffer went through.
                std::process::exit(0);
            }
            store(base, w, w as u32);
        }
        p.fetch_add(1, Ordering::Release);
    });
    while passes.load(Ordering::Acquire) < 2 {
        std::thread::yield_now();
    }
    to_device(&buf, 0..RACE_BYTES / 2);
    buf.set_read_only(true).unwrap();
    done.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_secs(10));
    panic!("the storing thread neither stored nor faulted");
}

const RUNS: usize = 68;

/// More than 64 runs of one buffer left to the kernel (a strided scan with a fault-around of
/// 256 pages: one window, one run, per 2 MiB), one of them split by an invalidation of its
/// middle (past the cap: the next invalidation registers the whole buffer again); then the
/// buffer changes on the device and every run must show it, and a store after it is made
/// read-only must be refused.
#[test]
fn more_than_64_left_runs_in_one_buffer_are_registered_again() {
    let test = "signals::more_than_64_left_runs_in_one_buffer_are_registered_again";
    let Some(kind) = child_kind() else {
        return in_children(test, &[], sigbus, "SIGBUS");
    };
    let bytes = (2 * RUNS + 2) * MIB;
    let (ctx, buf) = child_setup(kind, bytes, 256, test);
    let base = buf.as_mut_ptr().unwrap() as usize;
    let first = base.next_multiple_of(MIB) - base;
    let run = |k: usize| first + 2 * MIB * k;
    let in_run = |w: usize| {
        (4 * w)
            .checked_sub(first)
            .is_some_and(|b| b % (2 * MIB) < MIB)
    };
    for k in 0..RUNS {
        let r = run(k) / 4..(run(k) + MIB) / 4;
        let data: Vec<u8> = r.flat_map(|w| (w as u32).to_le_bytes()).collect();
        buf.write(run(k), &data).unwrap();
    }
    for k in 0..RUNS {
        let w = (run(k) + 8 * PAGE) / 4;
        assert_eq!(load(base, w), w as u32, "run {k}");
    }
    let maps = mappings_in(base, bytes);
    assert!(
        maps >= 2 * 64,
        "{maps} mappings: fewer runs were left than this test needs"
    );
    to_device(&buf, run(3) + MIB / 4..run(3) + MIB / 4 + 2 * PAGE);
    to_device(&buf, run(10)..run(10) + PAGE);
    let old = |w: usize| if in_run(w) { w as u32 } else { 0 };
    add_on_device(&ctx, &buf, 0..bytes, 1, old);
    for k in 0..RUNS {
        for w in (run(k) / 4..(run(k) + MIB) / 4).step_by(61) {
            assert_eq!(load(base, w), w as u32 + 1, "run {k}: word {w}");
        }
        assert_eq!(load(base, (run(k) + MIB) / 4), 1, "after run {k}");
    }
    assert!(ctx.take_cpu_fault_error().is_none());
    buf.set_read_only(true).unwrap();
    let w = (run(40) + MIB / 2) / 4;
    assert_eq!(load(base, w), w as u32 + 1);
    store(base, w, 0);
    std::process::exit(0);
}

/// A thread scans a buffer through its pointer (runs left to the kernel) while the main
/// thread frees it (a live view makes `free` fail first): the scan must end in a signal,
/// never read a byte the buffer did not hold.
#[test]
fn freeing_a_buffer_under_a_pointer_scan_ends_the_scan_in_a_signal() {
    let test = "signals::freeing_a_buffer_under_a_pointer_scan_ends_the_scan_in_a_signal";
    let Some(kind) = child_kind() else {
        let signalled = |s: ExitStatus| matches!(s.signal(), Some(libc::SIGBUS | libc::SIGSEGV));
        return in_children(test, &[], signalled, "SIGBUS or SIGSEGV");
    };
    let (_ctx, buf) = child_setup(kind, RACE_BYTES, 16, test);
    fill(&buf, |i| i as u32 | 1);
    to_device(&buf, 0..RACE_BYTES);
    let base = buf.as_ptr().unwrap() as usize;
    let passes = Arc::new(AtomicU32::new(0));
    let p = passes.clone();
    std::thread::spawn(move || loop {
        for w in 0..RACE_BYTES / 4 {
            let v = load(base, w);
            if v != w as u32 | 1 {
                eprintln!("{test}: word {w} read {v:#x}");
                std::process::exit(3);
            }
        }
        p.fetch_add(1, Ordering::Release);
    });
    while passes.load(Ordering::Acquire) < 1 {
        std::thread::yield_now();
    }
    let v = buf.view::<u8>().unwrap();
    assert!(matches!(buf.free(), Err(Error::ViewActive)));
    drop(v);
    buf.free().unwrap();
    assert!(matches!(buf.as_ptr(), Err(Error::Freed)));
    std::thread::sleep(Duration::from_secs(10));
    panic!("the scan went on after the buffer was freed");
}

/// Readers scan a buffer (loads only) through its pointer while the main thread sends it to
/// the device and makes it read-only and writable again, over and over: a load is never a
/// write, so none may be refused, whatever the protection is when its fault is served.
#[test]
fn loads_racing_read_only_toggles_are_never_refused() {
    let test = "signals::loads_racing_read_only_toggles_are_never_refused";
    let Some(kind) = child_kind() else {
        return in_children(test, &[], ended_well, "success");
    };
    let (ctx, buf) = child_setup(kind, RACE_BYTES, 16, test);
    fill(&buf, |i| i as u32);
    let base = buf.as_ptr().unwrap() as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let hs = (0..2)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    for w in (t * PAGE / 4..RACE_BYTES / 4).step_by(PAGE / 4 * 2) {
                        assert_eq!(load(base, w), w as u32, "reader {t}: word {w}");
                    }
                }
            })
        })
        .collect();
    for round in 0..100 {
        to_device(&buf, 0..RACE_BYTES);
        buf.set_read_only(round % 2 == 0).unwrap();
    }
    stop.store(true, Ordering::Release);
    join_all(test, hs, LIMIT);
    if let Some(e) = ctx.take_cpu_fault_error() {
        panic!("a load was refused: {e:?}");
    }
}

/// Read-only and writable again, with scans between: pages mapped write-protected while the
/// buffer was read-only (and runs left before and after) must take stores once it is
/// writable again, keep them through a trip to the device, and refuse them once it is
/// read-only again.
#[test]
fn stores_follow_read_only_toggles_between_scans() {
    let test = "signals::stores_follow_read_only_toggles_between_scans";
    let Some(kind) = child_kind() else {
        return in_children(test, &[], sigbus, "SIGBUS");
    };
    let (ctx, buf) = child_setup(kind, RACE_BYTES, 16, test);
    let (base, words) = (buf.as_mut_ptr().unwrap() as usize, RACE_BYTES / 4);
    fill(&buf, |i| i as u32);
    for round in 1..=4u32 {
        to_device(&buf, 0..RACE_BYTES);
        buf.set_read_only(true).unwrap();
        let v = buf.view::<u32>().unwrap();
        let bad = v
            .iter()
            .enumerate()
            .find(|&(w, &x)| x != w as u32 + round - 1);
        assert!(bad.is_none(), "round {round}: read-only scan: {bad:?}");
        drop(v);
        buf.set_read_only(false).unwrap();
        for w in 0..words {
            store(base, w, load(base, w) + 1);
        }
        to_device(&buf, 0..RACE_BYTES);
        for w in (0..words).step_by(31) {
            assert_eq!(load(base, w), w as u32 + round, "round {round}: word {w}");
        }
    }
    assert!(ctx.take_cpu_fault_error().is_none());
    buf.set_read_only(true).unwrap();
    store(base, words / 3, 0);
    std::process::exit(0);
}
