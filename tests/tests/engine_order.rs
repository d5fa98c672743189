//! The order of copy batches: every batch runs after every batch submitted before it, whichever
//! path copies it (the queue, the calling thread, the CPU copier of a CPU device, staging), and
//! a dropped ticket's batch never lands in memory after the drop.

use hetmem_engine::{Device, DeviceKind, PAGE_SIZE};
use hetmem_tests::engine_bytes::{pattern, read_device, read_frame, write_frames, zip};
use hetmem_tests::{open_config, open_for_test, test_config, KINDS};

/// Queued batches (on lavapipe: copied by the engine's CPU copier, helped by waiting threads)
/// run in submission order with every other batch: a chain of copies, each reading what the
/// one before wrote, submitted without waiting in between, delivers the first source's bytes
/// at the end of the chain; a ticket dropped unwaited still copies. Run on every device kind
/// and on Vulkan through staging too (whose downloads land in frames only at retirement:
/// a later batch that reads or writes those frames on the host must come after them).
#[test]
fn queued_batches_keep_submission_order() {
    use hetmem_engine::HostAccessMode;
    let staging = {
        let mut c = test_config(DeviceKind::Vulkan, 64 << 20);
        c.host_access = HostAccessMode::Staging;
        c
    };
    let configs = KINDS
        .iter()
        .map(|&k| test_config(k, 64 << 20))
        .chain([staging]);
    for config in configs {
        let Some(dev) = open_config(config, "queued_batches_keep_submission_order") else {
            continue;
        };
        copy_chains(&dev);
    }
}

fn copy_chains(dev: &Device) {
    const N: usize = 700; // 2.7 MiB: above the size that goes to the copier
    let k = (dev.info().kind, dev.info().host_access);
    let f = dev.frames();
    for round in 0..20u64 {
        let src = f.alloc_batch(N, false).unwrap();
        let back = f.alloc_batch(N, false).unwrap();
        let back2 = f.alloc_batch(N, false).unwrap();
        let d1 = dev.alloc_pages(N, false).unwrap();
        let d2 = dev.alloc_pages(N, false).unwrap();
        write_frames(dev, &src, 10_000 * round);
        let t1 = dev.copy_queued(&zip(&src, &d1)).unwrap();
        let t2 = dev.copy_queued(&zip(&d1, &d2)).unwrap();
        // Batches in the middle of the chain that are not queued: 128 pages (small enough
        // to go to the device's queue alone), then the rest (shared with this thread on a
        // CPU device).
        let t3 = dev.copy(&zip(&d2[..128], &back[..128])).unwrap();
        let t3b = dev.copy(&zip(&d2[128..], &back[128..])).unwrap();
        drop(dev.copy_queued(&zip(&back, &back2)).unwrap());
        let last = dev.copy_queued(&zip(&back2, &src)).unwrap();
        last.wait().unwrap();
        for t in [t1, t2, t3, t3b] {
            assert!(t.is_done().unwrap(), "{k:?}: an earlier batch is not done");
        }
        for i in (0..N).step_by(37) {
            let want = pattern(10_000 * round + i as u64);
            assert_eq!(
                read_device(dev, d2[i]),
                want,
                "{k:?} round {round} d2 page {i}"
            );
            assert_eq!(
                read_frame(dev, back2[i]),
                want,
                "{k:?} round {round} back2 {i}"
            );
            assert_eq!(read_frame(dev, src[i]), want, "{k:?} round {round} src {i}");
        }
        dev.free_pages(&d1).unwrap();
        dev.free_pages(&d2).unwrap();
        for v in [src, back, back2] {
            f.free_batch(&v).unwrap();
        }
    }
    // Dropping the device with a queued batch nobody waits for ends (the copy is done before
    // the device goes).
    let src = f.alloc_batch(N, false).unwrap();
    let d = dev.alloc_pages(N, false).unwrap();
    drop(dev.copy_queued(&zip(&src, &d)).unwrap());
}

/// Threads queuing batches and waiting for them at once: each thread's bytes arrive whole,
/// whichever thread (the copier or a waiting one) copied them.
#[test]
fn queued_batches_from_many_threads() {
    const N: usize = 400;
    for k in KINDS {
        let Some(dev) = open_for_test(k, 128 << 20, "queued_batches_from_many_threads") else {
            continue;
        };
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let dev = &dev;
                s.spawn(move || {
                    let f = dev.frames();
                    let src = f.alloc_batch(N, false).unwrap();
                    let back = f.alloc_batch(N, false).unwrap();
                    let d = dev.alloc_pages(N, false).unwrap();
                    for round in 0..10u64 {
                        let seed = 1_000_000 * t + 1000 * round;
                        write_frames(dev, &src, seed);
                        dev.copy_queued(&zip(&src, &d)).unwrap().wait().unwrap();
                        dev.copy_queued(&zip(&d, &back)).unwrap().wait().unwrap();
                        for i in (0..N).step_by(41) {
                            assert_eq!(
                                read_frame(dev, back[i]),
                                pattern(seed + i as u64),
                                "{k:?} thread {t} round {round} page {i}"
                            );
                        }
                    }
                    dev.free_pages(&d).unwrap();
                    f.free_batch(&src).unwrap();
                    f.free_batch(&back).unwrap();
                });
            }
        });
    }
}

/// A batch whose ticket is dropped unwaited must not write a host frame after the drop: on
/// the staging path its readback landed in the frame whenever a later wait or poll retired
/// the batch, so a frame freed after the drop and handed to a new owner got the old batch's
/// bytes over the new owner's (read back: the device page's 0xAA, not the owner's 0x55).
/// Through the public API only: `copy_queued`, a dropped ticket, the pool's free and alloc.
#[test]
fn a_dropped_tickets_copy_never_lands_in_a_frame_freed_and_reused_after_the_drop() {
    use hetmem_engine::{HostAccessMode, HostFramePool};
    let name = "a_dropped_tickets_copy_never_lands_in_a_frame_freed_and_reused_after_the_drop";
    for mode in [HostAccessMode::Staging, HostAccessMode::Auto] {
        // A private pool: no other test's frees reorder its free list.
        let pool = HostFramePool::new(4 << 20).unwrap();
        let mut config = test_config(DeviceKind::Vulkan, 4 << 20);
        config.host_access = mode;
        config.frames = Some(pool.clone());
        let Some(dev) = open_config(config, name) else {
            return;
        };
        let pages = dev.alloc_pages(16, false).unwrap();
        for &p in &pages {
            dev.write_page(p, 0, &[0xAA; PAGE_SIZE]).unwrap();
        }
        let frames = pool.alloc_batch(16, false).unwrap();
        // Queued (the calling thread copies nothing), and the ticket dropped unwaited.
        drop(dev.copy_queued(&zip(&pages, &frames)).unwrap());
        pool.free_batch(&frames).unwrap();
        let reused = pool.alloc_batch(16, false).unwrap();
        let mut sorted = frames.clone();
        sorted.sort();
        assert_eq!(reused, sorted, "the pool hands the freed frames out again");
        for &f in &reused {
            pool.write(f, 0, &[0x55; PAGE_SIZE]).unwrap();
        }
        // Any later wait retires every batch before it on the queue.
        let other = pool.alloc(false).unwrap();
        dev.copy(&[(pages[0], other)]).unwrap().wait().unwrap();
        for (k, &f) in reused.iter().enumerate() {
            let got = read_frame(&dev, f);
            assert!(
                got.iter().all(|&b| b == 0x55),
                "{mode:?}: the new owner's frame {k} reads {:#04x} (the dropped batch's bytes)",
                got.iter().find(|&&b| b != 0x55).unwrap()
            );
        }
        dev.free_pages(&pages).unwrap();
        pool.free_batch(&reused).unwrap();
        pool.free(other).unwrap();
    }
}
