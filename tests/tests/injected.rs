//! Defects the offload soak found once host-frame exhaustion and device losses were injected
//! into it (`cargo xtask soak --layer offload --host-exhaustion R --device-loss R`), one test
//! each, on the host device with a private frame pool.

use std::sync::Arc;

use hetmem::offload::Buffer;
use hetmem::ErrorKind;
use hetmem_engine::{DeviceKind, HostFramePool, Pfn};
use hetmem_tests::harness::{mapped_buffer, offload_context, pattern};

/// A pool small enough to exhaust (one segment).
fn small_pool() -> Arc<HostFramePool> {
    HostFramePool::new(4 << 20).expect("frame pool")
}

/// Takes every free frame of `pool`.
fn exhaust(pool: &HostFramePool) -> Vec<Pfn> {
    pool.alloc_batch(pool.available(), false)
        .expect("every free frame")
}

/// Once ordinary allocation had reached the home runs' ceiling (every frame taken, as under
/// a passing exhaustion), no home run could ever be reserved again, though the frames came
/// back: `alloc_mapped` failed with out of host frames for the rest of the context's life.
#[test]
fn a_home_run_is_reserved_again_after_a_passing_exhaustion() {
    let pool = small_pool();
    let all = exhaust(&pool);
    let e = pool.reserve_home(8).unwrap_err();
    assert_eq!(e.kind(), hetmem_engine::ErrorKind::OutOfMemory, "{e}");
    pool.free_batch(&all).unwrap();
    let run = pool
        .reserve_home(8)
        .expect("a home run once the frames are back");
    assert_eq!(run.count, 8);
    pool.release_home(run).unwrap();

    // Through the offload API: a CPU-mapped buffer after the pool ran dry and recovered.
    let name = "a_home_run_is_reserved_again_after_a_passing_exhaustion";
    let pool = small_pool();
    let Some(ctx) = offload_context(DeviceKind::Host, 1 << 20, Some(pool.clone()), name) else {
        return;
    };
    let all = exhaust(&pool);
    let refused = ctx.alloc_mapped(8 * 4096);
    pool.free_batch(&all).unwrap();
    match refused {
        Err(e) => assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}"),
        Ok(_) => panic!("alloc_mapped succeeded with every frame taken"),
    }
    let Some(b) = mapped_buffer(&ctx, 8 * 4096, name) else {
        return;
    };
    write_and_check(&b);
}

fn write_and_check(b: &Buffer) {
    let bytes = pattern(8, 0x3D);
    b.write(0, &bytes).unwrap();
    let mut got = vec![0u8; bytes.len()];
    b.read(0, &mut got).unwrap();
    assert!(got == bytes, "the buffer reads back what was written");
}

/// A copy batch lost with the device mid-way ended a prefetch or an eviction in `Ok` (the
/// pages were counted as failed copies, as for a transient failure) or in `FaultFailed`: the
/// caller could not tell that the device was gone. Each now fails with
/// `ErrorKind::DeviceLost`, every page where it was with its bytes, nothing leaked.
#[test]
fn a_copy_lost_with_the_device_is_a_device_lost_error_with_every_page_in_place() {
    let pool = small_pool();
    let name = "a_copy_lost_with_the_device_is_a_device_lost_error_with_every_page_in_place";
    let Some(ctx) = offload_context(DeviceKind::Host, 1 << 20, Some(pool.clone()), name) else {
        return;
    };
    let device = ctx.driver().device().clone();
    let frames_before = pool.in_use();
    let b = ctx.alloc(8 * 4096).unwrap();
    let bytes = pattern(8, 0x61);
    b.write(0, &bytes).unwrap();
    let check = |what: &str| {
        let mut got = vec![0u8; bytes.len()];
        b.read(0, &mut got).unwrap();
        assert!(got == bytes, "{what}: the bytes survive");
    };

    // To the device: the batch is lost after half of it; nothing moved.
    device.inject_device_loss(1, false);
    let e = b
        .prefetch(0..b.len(), hetmem::offload::Location::Device)
        .unwrap()
        .wait()
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DeviceLost, "{e}");
    assert_eq!(device.lost_batches(), 1);
    assert_eq!(device.pages_in_use(), 0, "the destinations went back");
    check("a lost prefetch to the device");

    // Home again: on the device first, then an eviction whose batch is lost.
    let moved = b
        .prefetch(0..b.len(), hetmem::offload::Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(moved.migrated, 8);
    device.inject_device_loss(1, false);
    let e = b.evict(0..b.len()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DeviceLost, "{e}");
    assert_eq!(device.pages_in_use(), 8, "every page stayed on the device");
    device.inject_device_loss(1, false);
    let e = ctx.driver().evict(8).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DeviceLost, "{e}");
    assert_eq!(device.pages_in_use(), 8, "every page stayed on the device");
    assert_eq!(device.lost_batches(), 3);
    check("lost evictions");

    b.free().unwrap();
    drop(ctx);
    assert_eq!(device.pages_in_use(), 0, "no device page leaked");
    drop(device);
    assert_eq!(pool.in_use(), frames_before, "no host frame leaked");
}

/// With every host frame taken for good (an exhaustion that does not pass), every offload
/// call on pages that need a frame ends, with `OutOfMemory` (or, for a read of pages already
/// on the host, its bytes), and none leaves a byte changed. (A 120 s soak on the host device
/// once had every thread stuck, a prefetch holding the map lock, after one thread ended with
/// the frames possibly still taken; this single-threaded check does not reproduce that.)
#[test]
fn a_lasting_exhaustion_ends_every_call_with_out_of_memory() {
    use hetmem::offload::Location;
    let name = "a_lasting_exhaustion_ends_every_call_with_out_of_memory";
    let pool = small_pool();
    let Some(ctx) = offload_context(DeviceKind::Host, 1 << 20, Some(pool.clone()), name) else {
        return;
    };
    let b = ctx.alloc(16 * 4096).unwrap();
    let bytes = pattern(16, 0x77);
    b.write(0, &bytes).unwrap();
    b.prefetch(0..8 * 4096, Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let all = exhaust(&pool);
    let worker = {
        let b = b.clone();
        let ctx = ctx.clone();
        let bytes = bytes.clone();
        std::thread::spawn(move || {
            let oom = |what: &str, r: hetmem::Result<()>| match r {
                Err(e) if e.kind() == ErrorKind::OutOfMemory => {}
                other => panic!("{what} under a lasting exhaustion: {other:?}"),
            };
            oom(
                "a prefetch home",
                b.prefetch(0..b.len(), Location::Host)
                    .unwrap()
                    .wait()
                    .map(|_| ()),
            );
            oom("an eviction", b.evict(0..b.len()).map(|_| ()));
            oom(
                "the driver's evict_all",
                ctx.driver().evict_all().map(|_| ()),
            );
            let mut got = vec![0u8; 4096];
            oom("a read of a device page", b.read(0, &mut got));
            oom("a write to a device page", b.write(0, &[1]));
            b.read(8 * 4096, &mut got).unwrap();
            assert!(
                got == bytes[8 * 4096..9 * 4096],
                "a host page reads as it is"
            );
            tx.send(()).unwrap();
        })
    };
    let ended = rx.recv_timeout(std::time::Duration::from_secs(60));
    pool.free_batch(&all).unwrap();
    if ended.is_err() {
        // A panic ended the thread (join says which), or a call hangs.
        worker.join().unwrap();
        panic!("a call under a lasting exhaustion did not end within 60 s");
    }
    worker.join().unwrap();
    let mut got = vec![0u8; bytes.len()];
    b.read(0, &mut got).unwrap();
    assert!(got == bytes, "every byte survives");
}
