//! An offload user's errors name a buffer and an offset, never an internal frame number:
//! a pin or a launch whose page cannot be brought to the device and held there fails with
//! `BufferBusy { addr, offset }` (it used to be `Busy(pfn)`), with nothing pinned. (A view
//! of pinned pages, `HeldOnDevice`, is in `pointers_adversary.rs`; `read` and `write` of
//! held pages in `offload.rs`.)

use hetmem::offload::{Buffer, Context, Location};
use hetmem::{Error, ErrorKind};
use hetmem_engine::{DeviceKind, Pfn};
use hetmem_tests::harness::{offload_context, pattern};

const PAGE: usize = 4096;

/// Makes every copy into a device page fail from now on.
fn fail_copies_to_the_device(ctx: &Context) {
    let d = ctx.driver().device();
    let r = d.pfn_range();
    let all: Vec<Pfn> = (0..r.count).map(|k| r.start.add(k)).collect();
    d.inject_copy_failures(&all);
}

fn written(ctx: &Context, pages: usize, seed: u8) -> (Buffer, Vec<u8>) {
    let b = ctx.alloc(pages * PAGE).unwrap();
    let bytes = pattern(pages, seed);
    b.write(0, &bytes).unwrap();
    (b, bytes)
}

fn check(b: &Buffer, bytes: &[u8]) {
    let mut got = vec![0u8; bytes.len()];
    b.read(0, &mut got).unwrap();
    assert!(got == bytes, "the buffer's bytes survive");
}

fn pinned_pages(ctx: &Context, b: &Buffer) -> usize {
    let space = ctx.space();
    let pm = space.pagemap();
    (0..b.len() / PAGE)
        .filter_map(|k| space.pte(b.addr() + (k * PAGE) as u64).pfn())
        .filter(|&pfn| pm.page(pfn).is_some_and(|p| p.pincount() > 0))
        .count()
}

#[test]
fn a_pin_that_cannot_hold_its_pages_names_the_buffer_and_offset() {
    let name = "a_pin_that_cannot_hold_its_pages_names_the_buffer_and_offset";
    let ctx = offload_context(DeviceKind::Host, 1 << 20, None, name).unwrap();
    let (b, bytes) = written(&ctx, 4, 0x21);
    fail_copies_to_the_device(&ctx);
    let r = PAGE..3 * PAGE;
    let e = b.pin_on_device(r.clone()).unwrap_err();
    match e {
        Error::BufferBusy { addr, offset } => {
            assert_eq!(addr, b.addr(), "{e}");
            assert_eq!(offset, r.start, "the range's first page never came: {e}");
        }
        other => panic!("a pin that cannot hold its pages: {other:?}"),
    }
    assert_eq!(e.kind(), ErrorKind::Transient);
    assert!(!e.to_string().contains("pfn"), "{e}");
    assert_eq!(pinned_pages(&ctx, &b), 0, "nothing stays pinned");
    ctx.driver().device().inject_copy_failures(&[]);
    let pin = b.pin_on_device(r).unwrap();
    assert_eq!(pin.pfns().len(), 2);
    drop(pin);
    check(&b, &bytes);
}

/// Adds `hm_arg(0)` to each u32 word of bound buffers 0 and 1, `hm_arg(1)` pages each.
const ADD_BOTH: &str = r#"
@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lane: u32) {
    let i = hm_invocation(wg, nwg, lane, 64u);
    if (i >= hm_arg(1) * HM_PAGE_WORDS) {
        return;
    }
    let p = hm_ptr(0u, i * 4u);
    hm_store(p, hm_load(p) + hm_arg(0));
    let q = hm_ptr(1u, i * 4u);
    hm_store(q, hm_load(q) + hm_arg(0));
}
"#;

/// A launch whose second buffer cannot be brought to the device names that buffer (not
/// the first, which is there already) and its offset; nothing ran, nothing stays pinned.
#[test]
fn a_launch_that_cannot_hold_its_pages_names_the_buffer_and_offset() {
    let name = "a_launch_that_cannot_hold_its_pages_names_the_buffer_and_offset";
    let Some(ctx) = offload_context(DeviceKind::Vulkan, 1 << 20, None, name) else {
        return;
    };
    let kernel = ctx.compile_kernel(ADD_BOTH, "add").unwrap();
    let (a, a_bytes) = written(&ctx, 2, 0x31);
    let (b, b_bytes) = written(&ctx, 2, 0x41);
    a.prefetch(0..a.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    fail_copies_to_the_device(&ctx);
    let r = PAGE..2 * PAGE;
    let e = ctx
        .launch(
            &kernel,
            &[(&a, r.clone()), (&b, r.clone())],
            &[1, 1],
            [16, 1, 1],
        )
        .map(|_| ())
        .unwrap_err();
    match e {
        Error::BufferBusy { addr, offset } => {
            assert_eq!(addr, b.addr(), "the buffer that did not come: {e}");
            assert_eq!(offset, r.start, "{e}");
        }
        other => panic!("a launch that cannot hold its pages: {other:?}"),
    }
    assert!(!e.to_string().contains("pfn"), "{e}");
    assert_eq!(pinned_pages(&ctx, &a) + pinned_pages(&ctx, &b), 0);
    ctx.driver().device().inject_copy_failures(&[]);
    check(&a, &a_bytes);
    check(&b, &b_bytes);
}
