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
    let run = pool.reserve_home(8).expect("a home run once the frames are back");
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
