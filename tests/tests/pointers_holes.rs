//! Home frames of device-resident pages give their memory back: a CPU-mapped buffer sent to
//! the device leaves its home frames empty, and the frame pool punches them out of its file
//! (`HostFramePool::allow_home_punching`, on for devices that do not pin host frames). The
//! bytes come back whole when the pages return, and a punched frame taken afresh reads as
//! zeros.

use std::sync::Arc;

use hetmem::offload::{Buffer, Context, Location};
use hetmem_engine::{DeviceKind, DeviceType, HostAccess, HostFramePool};
use hetmem_tests::harness::{mapped_buffer, offload_context};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
/// The buffer: large enough that its frames dwarf what else the pool's file holds.
const BYTES: usize = 32 * MIB;

/// A word that differs by index and salt.
fn word(i: usize, salt: u32) -> u32 {
    (i as u32).wrapping_mul(0x9E37_79B1).rotate_left(11) ^ salt
}

fn fill(buf: &Buffer, salt: u32) {
    for (i, w) in buf.view_mut::<u32>().unwrap().iter_mut().enumerate() {
        *w = word(i, salt);
    }
}

/// Every word through a view (device-resident pages fault back through the pointer).
fn check_view(buf: &Buffer, salt: u32, what: &str) {
    let v = buf.view::<u32>().unwrap();
    for (i, &w) in v.iter().enumerate() {
        assert_eq!(w, word(i, salt), "{what}: word {i} (page {})", i * 4 / PAGE);
    }
}

fn to_device(buf: &Buffer) {
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
}

/// A context on `kind` over a pool of its own (so other tests' frames do not count).
fn setup(kind: DeviceKind, test: &str) -> Option<(Context, Arc<HostFramePool>, Buffer)> {
    let pool = HostFramePool::new(256 * MIB).unwrap();
    let ctx = offload_context(kind, 2 * BYTES as u64, Some(pool.clone()), test)?;
    let buf = mapped_buffer(&ctx, BYTES, test)?;
    Some((ctx, pool, buf))
}

fn allocated(pool: &HostFramePool) -> u64 {
    pool.file_allocated_bytes()
        .expect("the frame pool is a memfd")
}

fn device_resident_pages_release_their_home_frames(kind: DeviceKind, test: &str) {
    let Some((ctx, pool, buf)) = setup(kind, test) else {
        return;
    };
    let info = ctx.device_info();
    if info.host_access == HostAccess::Import && info.device_type != DeviceType::Cpu {
        // A GPU pins the frames it imports: the context forbade punching for good.
        assert!(
            !pool.allow_home_punching(),
            "{}: punching forbidden",
            info.name
        );
        return;
    }
    assert!(pool.allow_home_punching(), "the context allowed punching");
    fill(&buf, 0xA5);
    let before = allocated(&pool);
    let punched = pool.punched_frames();
    to_device(&buf);
    let after = allocated(&pool);
    let pages = (BYTES / PAGE) as u64;
    assert_eq!(
        pool.punched_frames() - punched,
        pages,
        "every home frame punched"
    );
    assert!(
        before - after >= BYTES as u64,
        "the file shrank by {} bytes of {BYTES}",
        before.saturating_sub(after)
    );
    // Every byte comes back through the pointer, into frames the file holds again.
    check_view(&buf, 0xA5, "after the round trip");
    assert!(allocated(&pool) >= after + BYTES as u64);
    assert!(ctx.take_cpu_fault_error().is_none());
    // And through `read`, after a second trip (a fault now and a prefetch back).
    to_device(&buf);
    buf.prefetch(0..buf.len(), Location::Host)
        .unwrap()
        .wait()
        .unwrap();
    let mut bytes = vec![0u8; BYTES];
    buf.read(0, &mut bytes).unwrap();
    for (i, c) in bytes.chunks_exact(4).enumerate() {
        assert_eq!(u32::from_le_bytes(c.try_into().unwrap()), word(i, 0xA5));
    }
    // A punched frame taken afresh reads as zeros: the run goes back to the pool and the
    // next buffer of the same size reuses it.
    let home = ctx.space().pte(buf.addr()).pfn();
    assert!(home.is_some(), "host-resident after the prefetch home");
    to_device(&buf);
    buf.free().unwrap();
    let next = ctx.alloc_mapped(BYTES).unwrap();
    assert!(next.view::<u64>().unwrap().iter().all(|&w| w == 0));
    assert_eq!(
        ctx.space().pte(next.addr()).pfn(),
        home,
        "the new buffer's first page lives in the old one's home frame"
    );
}

#[test]
fn device_resident_pages_release_their_home_frames_on_the_host_device() {
    device_resident_pages_release_their_home_frames(
        DeviceKind::Host,
        "device_resident_pages_release_their_home_frames_on_the_host_device",
    );
}

#[test]
fn device_resident_pages_release_their_home_frames_on_lavapipe() {
    device_resident_pages_release_their_home_frames(
        DeviceKind::Vulkan,
        "device_resident_pages_release_their_home_frames_on_lavapipe",
    );
}

/// A pool that a pinning device forbade to punch keeps its home frames' memory.
#[test]
fn a_pool_forbidden_to_punch_keeps_its_home_frames() {
    let test = "a_pool_forbidden_to_punch_keeps_its_home_frames";
    let Some((_ctx, pool, buf)) = setup(DeviceKind::Host, test) else {
        return;
    };
    pool.forbid_home_punching();
    assert!(!pool.allow_home_punching(), "forbidden for good");
    fill(&buf, 0x3C);
    let before = allocated(&pool);
    to_device(&buf);
    assert_eq!(pool.punched_frames(), 0);
    assert!(allocated(&pool) >= before, "nothing was given back");
    check_view(&buf, 0x3C, "after the round trip");
}
