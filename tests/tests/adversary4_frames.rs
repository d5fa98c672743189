//! Fourth adversarial round (issue 11, after "no data race on frame or device-page bytes from
//! safe code"): attacks from safe code on the frame and device-page bit locks, on tickets that
//! hold frames until their batch completes, and on the page map's ownership of its frames
//! (live pages' frames, claimed home frames, the shared zero page).
//!
//! Every test either holds (a regression test that asserts bytes, error kinds or counters) or
//! found a bug; an attack that still finds one is `#[ignore]`d with the bug named. Every
//! racing test runs under a deadline (`watchdog`, `join_all`): a hang fails.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hetmem_engine::{Device, DeviceKind, EngineError, HostFramePool, Pfn, PAGE_SIZE};

use hetmem_tests::harness::*;
use hetmem_tests::{open_config, test_config, KINDS};

/// How long a racing scenario may run before it counts as a hang.
const RACE_LIMIT: Duration = Duration::from_secs(60);

/// A device of `kind` with `budget_pages` pages over `pool`; `None` (said by name) where
/// there is no such device outside CI.
fn device_over(kind: DeviceKind, budget_pages: usize, pool: &Arc<HostFramePool>) -> Option<Device> {
    let mut config = test_config(kind, (budget_pages * PAGE_SIZE) as u64);
    config.frames = Some(pool.clone());
    open_config(config, "adversary4")
}

/// One page of `b`.
fn page_of(b: u8) -> Vec<u8> {
    vec![b; PAGE_SIZE]
}

/// The bytes of frame `f`.
fn frame_bytes(pool: &HostFramePool, f: Pfn) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE];
    pool.read(f, 0, &mut v).unwrap();
    v
}

/// The bytes of device page `p`.
fn page_bytes(dev: &Device, p: Pfn) -> Vec<u8> {
    let mut v = vec![0u8; PAGE_SIZE];
    dev.read_page(p, 0, &mut v).unwrap();
    v
}

/// Device pages of `dev`, each filled with its own byte (`seed + index`).
fn filled_pages(dev: &Device, n: usize, seed: u8) -> Vec<Pfn> {
    let pages = dev.alloc_pages(n, false).unwrap();
    for (i, &p) in pages.iter().enumerate() {
        dev.write_page(p, 0, &page_of(seed.wrapping_add(i as u8)))
            .unwrap();
    }
    pages
}

// ---------------------------------------------------------------------------------------
// A. One access at a time: batches that name a page several times, many batches over one
//    source, zeroing racing copies, frees under copies in flight.
// ---------------------------------------------------------------------------------------

/// A batch that reads one frame many times (the zero page's pattern) copies it to every
/// destination; a batch that writes one destination twice, or reads and writes one page, is
/// refused with `OverlappingCopy`, and the refusal leaves no bit held (the frames can be
/// read, written and freed at once afterwards).
#[test]
fn duplicated_pfns_in_a_batch_copy_or_are_refused_and_hold_nothing() {
    for kind in KINDS {
        watchdog("duplicated pfns", move || {
            let pool = HostFramePool::new(SMALL_POOL).unwrap();
            let Some(dev) = device_over(kind, 64, &pool) else {
                return;
            };
            let base = pool.in_use();
            let src = pool.alloc(false).unwrap();
            pool.write(src, 0, &page_of(0x3C)).unwrap();
            let dsts = dev.alloc_pages(8, false).unwrap();
            let fan: Vec<(Pfn, Pfn)> = dsts.iter().map(|&d| (src, d)).collect();
            dev.copy_sync(&fan).unwrap();
            for &d in &dsts {
                assert_eq!(page_bytes(&dev, d), page_of(0x3C), "{kind:?}: fan-out copy");
            }
            let twice = dev.copy(&[(src, dsts[0]), (src, dsts[0])]).map(|_| ());
            assert!(
                matches!(twice, Err(EngineError::OverlappingCopy(p)) if p == dsts[0]),
                "{kind:?}: a destination named twice: {twice:?}"
            );
            let both = dev.copy(&[(src, dsts[1]), (dsts[1], dsts[2])]).map(|_| ());
            assert!(
                matches!(both, Err(EngineError::OverlappingCopy(_))),
                "{kind:?}: a page read and written: {both:?}"
            );
            let back = pool.alloc(false).unwrap();
            let mixed = dev.copy(&[(dsts[3], back), (src, back)]).map(|_| ());
            assert!(
                matches!(mixed, Err(EngineError::OverlappingCopy(p)) if p == back),
                "{kind:?}: a frame written twice: {mixed:?}"
            );
            // Nothing is left held: every access of the named pages goes through now.
            pool.write(src, 0, &page_of(0x11)).unwrap();
            pool.write(back, 0, &page_of(0x22)).unwrap();
            dev.write_page(dsts[0], 0, &page_of(0x33)).unwrap();
            assert_eq!(frame_bytes(&pool, back), page_of(0x22));
            assert_eq!(page_bytes(&dev, dsts[0]), page_of(0x33));
            assert_eq!(
                page_bytes(&dev, dsts[1]),
                page_of(0x3C),
                "{kind:?}: a refused batch copied"
            );
            pool.free_batch(&[src, back]).unwrap();
            dev.free_pages(&dsts).unwrap();
            assert_eq!(pool.in_use(), base, "{kind:?}: frames leaked");
            assert_eq!(dev.pages_in_use(), 0, "{kind:?}: device pages leaked");
        });
    }
}

/// Eight threads copy one shared source frame (as every fault of an untouched page copies
/// the zero page) into pages of their own, while two more rewrite and read the source: every
/// copy lands one whole version of the source (never half of one and half of another) and
/// nothing waits forever.
#[test]
fn racing_copies_of_one_shared_source_land_whole_versions() {
    for kind in KINDS {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let Some(dev) = device_over(kind, 256, &pool) else {
            continue;
        };
        let src = pool.alloc(false).unwrap();
        pool.write(src, 0, &page_of(0xA1)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let torn = Arc::new(AtomicUsize::new(0));
        let rounds = if kind == DeviceKind::Host { 400 } else { 40 };
        let mut hs = Vec::new();
        for t in 0..8u8 {
            let (dev, pool, torn) = (dev.clone(), pool.clone(), torn.clone());
            hs.push(thread::spawn(move || {
                let mine = dev.alloc_pages(4, false).unwrap();
                let frame = pool.alloc(false).unwrap();
                for r in 0..rounds {
                    let pairs: Vec<(Pfn, Pfn)> = mine.iter().map(|&d| (src, d)).collect();
                    if (r + t as usize).is_multiple_of(3) {
                        // Back out to a frame of its own (dropping the ticket waits).
                        drop(dev.copy_queued(&[(mine[0], frame)]).unwrap());
                    }
                    let ticket = if r % 2 == 0 {
                        dev.copy(&pairs).unwrap()
                    } else {
                        dev.copy_queued(&pairs).unwrap()
                    };
                    ticket.wait().unwrap();
                    for &(_, d) in &pairs {
                        let b = page_bytes(&dev, d);
                        if b.iter().any(|&x| x != b[0]) {
                            torn.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                dev.free_pages(&mine).unwrap();
                pool.free(frame).unwrap();
            }));
        }
        let writers: Vec<_> = (0..2u8)
            .map(|w| {
                let (pool, stop, torn) = (pool.clone(), stop.clone(), torn.clone());
                thread::spawn(move || {
                    let mut n = 0u8;
                    while !stop.load(Ordering::Relaxed) {
                        n = n.wrapping_add(1);
                        if w == 0 {
                            pool.write(src, 0, &page_of(n | 1)).unwrap();
                        } else {
                            let b = frame_bytes(&pool, src);
                            if b.iter().any(|&x| x != b[0]) {
                                torn.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                })
            })
            .collect();
        join_all("copiers of one source", hs, RACE_LIMIT);
        stop.store(true, Ordering::Relaxed);
        join_all("writer and reader of the source", writers, RACE_LIMIT);
        assert_eq!(
            torn.load(Ordering::Relaxed),
            0,
            "{kind:?}: a page held two versions"
        );
        pool.free(src).unwrap();
        assert_eq!(dev.pages_in_use(), 0);
        assert_eq!(pool.in_use(), 0, "{kind:?}: frames leaked");
    }
}

/// The thread that holds an unwaited ticket of a queued download touches the frames it
/// writes, in every way: a read sees the copy's bytes, a write lands after the copy, a
/// second copy out of the frames copies what the first left there (plus the write), and a
/// free waits for the copy instead of waiting for itself. The ticket is dropped unwaited at
/// the end.
#[test]
fn the_holder_of_an_unwaited_ticket_reads_writes_copies_and_frees_its_frames() {
    for kind in KINDS {
        watchdog("unwaited ticket holder", move || {
            let pool = HostFramePool::new(SMALL_POOL).unwrap();
            let Some(dev) = device_over(kind, 4096, &pool) else {
                return;
            };
            let n = 1024; // 4 MiB: in flight for a while on a CPU Vulkan device
            let src = filled_pages(&dev, n, 1);
            let dst = pool.alloc_batch(n, false).unwrap();
            let pairs: Vec<_> = src.iter().copied().zip(dst.iter().copied()).collect();
            let ticket = dev.copy_queued(&pairs).unwrap();
            // A write into the last frame waits for the copy, then lands.
            pool.write(dst[n - 1], 0, &page_of(0xEE)).unwrap();
            assert_eq!(
                frame_bytes(&pool, dst[n - 1]),
                page_of(0xEE),
                "{kind:?}: the copy landed after a write that followed it"
            );
            assert_eq!(
                frame_bytes(&pool, dst[n - 2]),
                page_of((n - 2 + 1) as u8),
                "{kind:?}: a read did not see the copy"
            );
            // A second copy, from the same frames back to fresh device pages.
            let again = dev.alloc_pages(2, false).unwrap();
            let second = dev
                .copy(&[(dst[n - 2], again[0]), (dst[n - 1], again[1])])
                .unwrap();
            second.wait().unwrap();
            assert_eq!(page_bytes(&dev, again[0]), page_of((n - 2 + 1) as u8));
            assert_eq!(page_bytes(&dev, again[1]), page_of(0xEE));
            pool.free_batch(&dst).unwrap();
            drop(ticket);
            dev.free_pages(&src).unwrap();
            dev.free_pages(&again).unwrap();
            assert_eq!(pool.in_use(), 0, "{kind:?}: frames leaked");
            assert_eq!(dev.pages_in_use(), 0);
        });
    }
}

/// Device pages freed while a queued upload into them is in flight (`free_pages` takes no
/// page bit) and allocated again zeroed at once: the zeroing waits for the upload, so the
/// new owner reads zeros, never the upload's bytes landing after the zeroing.
#[test]
fn device_pages_freed_under_an_upload_come_back_zeroed() {
    for kind in KINDS {
        watchdog("pages freed under an upload", move || {
            let pool = HostFramePool::new(SMALL_POOL).unwrap();
            let Some(dev) = device_over(kind, 2048, &pool) else {
                return;
            };
            let n = 1024;
            let frames = pool.alloc_batch(n, false).unwrap();
            for &f in &frames {
                pool.write(f, 0, &page_of(0x5A)).unwrap();
            }
            let pages = dev.alloc_pages(n, true).unwrap();
            let pairs: Vec<_> = frames.iter().copied().zip(pages.iter().copied()).collect();
            let ticket = dev.copy_queued(&pairs).unwrap();
            dev.free_pages(&pages).unwrap();
            let again = dev.alloc_pages(n, true).unwrap();
            let mut same = again.clone();
            same.sort_unstable();
            let mut old = pages.clone();
            old.sort_unstable();
            assert_eq!(same, old, "{kind:?}: the freed pages came back");
            drop(ticket);
            for &p in &again {
                assert_eq!(
                    page_bytes(&dev, p),
                    page_of(0),
                    "{kind:?}: a zeroed page {p} shows an earlier owner's upload"
                );
            }
            dev.free_pages(&again).unwrap();
            pool.free_batch(&frames).unwrap();
            assert_eq!(pool.in_use(), 0);
        });
    }
}

/// One thread allocates pages zeroed and frees them in a loop, checking that each reads as
/// zeros; others copy every page of the device's range out to frames (most of them are
/// free: refused) and read them, naming the pages being zeroed and freed. Copies hold frame
/// bits then page bits while the zeroing holds page bits and retires batches: no cycle, no
/// hang, and the zeroing is never seen half done.
#[test]
fn zeroing_races_copies_and_reads_of_the_pages_being_zeroed() {
    for kind in KINDS {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let Some(dev) = device_over(kind, 64, &pool) else {
            continue;
        };
        let range = dev.pfn_range();
        // Pages that have held bytes, so that every later zeroed allocation zeroes.
        let dirty = filled_pages(&dev, 64, 0x70);
        dev.free_pages(&dirty).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = if kind == DeviceKind::Host { 2000 } else { 150 };
        let zeroer = {
            let (dev, stop) = (dev.clone(), stop.clone());
            thread::spawn(move || {
                let mut bad = 0usize;
                for r in 0..rounds {
                    let n = 1 + r % 8;
                    let got = dev.alloc_pages(n, true).unwrap();
                    for &p in &got {
                        if page_bytes(&dev, p) != page_of(0) {
                            bad += 1;
                        }
                    }
                    // Dirty them again for the next round.
                    for &p in &got {
                        dev.write_page(p, 0, &page_of(0x7F)).unwrap();
                    }
                    dev.free_pages(&got).unwrap();
                }
                stop.store(true, Ordering::Relaxed);
                bad
            })
        };
        let racers: Vec<_> = (0..2)
            .map(|t| {
                let (dev, pool, stop) = (dev.clone(), pool.clone(), stop.clone());
                thread::spawn(move || {
                    let frames = pool.alloc_batch(8, false).unwrap();
                    let mut k = t as u64;
                    while !stop.load(Ordering::Relaxed) {
                        let pairs: Vec<(Pfn, Pfn)> = (0..8)
                            .map(|i| {
                                (
                                    Pfn(range.start.0 + (k + i) % range.count),
                                    frames[i as usize],
                                )
                            })
                            .collect();
                        if let Ok(ticket) = dev.copy_queued(&pairs) {
                            let _ = ticket.wait();
                        }
                        let mut b = vec![0u8; PAGE_SIZE];
                        let _ = dev.read_page(Pfn(range.start.0 + k % range.count), 0, &mut b);
                        if b.iter().any(|&x| x != b[0]) {
                            return Err(format!("a read saw a page half zeroed: {k}"));
                        }
                        k += 3;
                    }
                    pool.free_batch(&frames).unwrap();
                    Ok(())
                })
            })
            .collect();
        let bad = join_all("zeroer", vec![zeroer], RACE_LIMIT).remove(0);
        for r in join_all("copiers of pages being zeroed", racers, RACE_LIMIT) {
            r.unwrap();
        }
        assert_eq!(bad, 0, "{kind:?}: zeroed pages read non-zero");
        assert_eq!(dev.pages_in_use(), 0);
        assert_eq!(pool.in_use(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// B. Several devices over one pool; devices and tickets dropped with batches in flight.
// ---------------------------------------------------------------------------------------

/// Every pair of device kinds over one pool: a queued download by the first device into
/// frames, unwaited, and an upload of the same frames by the second: the second copy waits
/// for the first (its pages get the first device's bytes), with the first ticket still
/// unwaited on this thread. Then the first device's handles go (its ticket last), and the
/// frames come back.
#[test]
fn two_devices_over_one_pool_wait_for_each_others_copies() {
    for a in KINDS {
        for b in KINDS {
            watchdog("two devices, one pool", move || {
                let pool = HostFramePool::new(SMALL_POOL).unwrap();
                let (Some(da), Some(db)) =
                    (device_over(a, 2048, &pool), device_over(b, 2048, &pool))
                else {
                    return;
                };
                let n = 512;
                let src = filled_pages(&da, n, 9);
                let frames = pool.alloc_batch(n, false).unwrap();
                let down: Vec<_> = src.iter().copied().zip(frames.iter().copied()).collect();
                let ta = da.copy_queued(&down).unwrap();
                let dst = db.alloc_pages(n, false).unwrap();
                let up: Vec<_> = frames.iter().copied().zip(dst.iter().copied()).collect();
                db.copy_sync(&up).unwrap();
                for (i, &p) in dst.iter().enumerate().step_by(97) {
                    assert_eq!(
                        page_bytes(&db, p),
                        page_of(9u8.wrapping_add(i as u8)),
                        "{a:?} -> {b:?}: the second device copied before the first finished"
                    );
                }
                da.free_pages(&src).unwrap();
                drop(da);
                drop(ta);
                pool.free_batch(&frames).unwrap();
                db.free_pages(&dst).unwrap();
                assert_eq!(pool.in_use(), 0, "{a:?} -> {b:?}: frames leaked");
            });
        }
    }
}

/// A device whose last handle is an unwaited ticket (the device itself dropped) holds frames
/// that another thread is waiting to read; the ticket goes on a third thread. The reader
/// sees the copy's bytes, nothing hangs, and the frames and pages come back.
#[test]
fn a_device_dropped_while_another_thread_waits_for_its_frames() {
    for kind in KINDS {
        watchdog("device dropped under a waiter", move || {
            let pool = HostFramePool::new(SMALL_POOL).unwrap();
            let Some(dev) = device_over(kind, 2048, &pool) else {
                return;
            };
            let n = 1024;
            let src = filled_pages(&dev, n, 40);
            let frames = pool.alloc_batch(n, false).unwrap();
            let pairs: Vec<_> = src.iter().copied().zip(frames.iter().copied()).collect();
            let ticket = dev.copy_queued(&pairs).unwrap();
            drop(dev);
            let reader = {
                let (pool, last) = (pool.clone(), frames[n - 1]);
                thread::spawn(move || frame_bytes(&pool, last))
            };
            let dropper = thread::spawn(move || drop(ticket));
            let mut got = join_all("reader and dropper", vec![reader], RACE_LIMIT);
            join_all("dropper", vec![dropper], RACE_LIMIT);
            assert_eq!(
                got.remove(0),
                page_of(40u8.wrapping_add((n - 1) as u8)),
                "{kind:?}: the read did not see the copy"
            );
            pool.free_batch(&frames).unwrap();
            assert_eq!(pool.in_use(), 0, "{kind:?}: frames leaked");
        });
    }
}

/// A ticket that is forgotten (`mem::forget`, safe) keeps its batch's bits only until the
/// batch completes: a later free of its frames retires it and goes through.
#[test]
fn a_forgotten_ticket_does_not_keep_its_frames() {
    for kind in KINDS {
        watchdog("forgotten ticket", move || {
            let pool = HostFramePool::new(SMALL_POOL).unwrap();
            let Some(dev) = device_over(kind, 1024, &pool) else {
                return;
            };
            let n = 512;
            let src = filled_pages(&dev, n, 77);
            let frames = pool.alloc_batch(n, false).unwrap();
            let pairs: Vec<_> = src.iter().copied().zip(frames.iter().copied()).collect();
            std::mem::forget(dev.copy_queued(&pairs).unwrap());
            assert_eq!(
                frame_bytes(&pool, frames[7]),
                page_of(77 + 7),
                "{kind:?}: a read did not wait for a forgotten ticket's copy"
            );
            pool.free_batch(&frames).unwrap();
            dev.free_pages(&src).unwrap();
            assert_eq!(pool.in_use(), 0);
        });
    }
}

/// Many threads drop tickets unwaited, each over its own frames, while others read those
/// frames and the devices go away: every read sees the copied bytes, and at the end every
/// frame and page is back.
#[test]
fn tickets_dropped_unwaited_across_threads_leave_nothing_held() {
    for kind in KINDS {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let Some(dev) = device_over(kind, 1024, &pool) else {
            continue;
        };
        let hs: Vec<_> = (0..4u8)
            .map(|t| {
                let (dev, pool) = (dev.clone(), pool.clone());
                thread::spawn(move || {
                    for r in 0..20u8 {
                        let seed = t.wrapping_mul(50).wrapping_add(r);
                        let src = filled_pages(&dev, 16, seed);
                        let frames = pool.alloc_batch(16, false).unwrap();
                        let pairs: Vec<_> =
                            src.iter().copied().zip(frames.iter().copied()).collect();
                        let ticket = dev.copy_queued(&pairs).unwrap();
                        let (p2, f) = (pool.clone(), frames[15]);
                        let reader = thread::spawn(move || frame_bytes(&p2, f));
                        if r % 2 == 0 {
                            drop(ticket);
                        } else {
                            thread::spawn(move || drop(ticket)).join().unwrap();
                        }
                        let got = reader.join().unwrap();
                        if got != page_of(seed.wrapping_add(15)) {
                            return Err(format!("thread {t} round {r}: read {:?}", &got[..4]));
                        }
                        pool.free_batch(&frames).unwrap();
                        dev.free_pages(&src).unwrap();
                    }
                    Ok(())
                })
            })
            .collect();
        drop(dev);
        for r in join_all("ticket droppers", hs, RACE_LIMIT) {
            r.unwrap();
        }
        assert_eq!(pool.in_use(), 0, "{kind:?}: frames leaked");
    }
}

// C. The page map's frames and D. kernels: in `owners.rs`.
#[path = "adversary4_frames/owners.rs"]
mod owners;
