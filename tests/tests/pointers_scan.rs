//! Sequential scans through a pointer, where the fault thread reads ahead: the windows it
//! brings back and maps before the scan reaches them hold the right bytes, and a later
//! migration or device kernel removes them like any other mapping (no stale page stays
//! mapped).

use hetmem::offload::Location;
use hetmem_engine::DeviceKind;
use hetmem_tests::harness::{mapped_buffer, offload_context, run_child, ADD_KERNEL};

const PAGE: usize = 4096;
const BYTES: usize = 8 << 20;

fn pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes(kind: DeviceKind, test: &str) {
    let Some(ctx) = offload_context(kind, BYTES as u64 + (4 << 20), None, test) else {
        return;
    };
    let Some(buf) = mapped_buffer(&ctx, BYTES, test) else {
        return;
    };
    let words = BYTES / 4;
    let pages = BYTES / PAGE;
    buf.view_mut::<u32>()
        .unwrap()
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u32);
    // Kernels run on Vulkan only; on the host device the words change through `write`,
    // which leaves the pages on the device.
    let k = (kind == DeviceKind::Vulkan).then(|| ctx.compile_kernel(ADD_KERNEL, "add").unwrap());
    for round in 1..=3u32 {
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        let faults = ctx.cpu_faults();
        {
            let v = buf.view::<u32>().unwrap();
            for (i, &w) in v.iter().enumerate() {
                let want = i as u32 + 5 * (round - 1);
                assert_eq!(w, want, "round {round}: word {i} (page {})", i * 4 / PAGE);
            }
        }
        let taken = ctx.cpu_faults() - faults;
        assert!(
            (taken as usize) < pages / 16,
            "round {round}: {taken} faults for {pages} pages: the scan was not served in windows"
        );
        // The words change on the device: the pages mapped ahead must leave the process.
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        match &k {
            Some(k) => ctx
                .launch(
                    k,
                    &[(&buf, 0..buf.len())],
                    &[5, pages as u32],
                    [(words / 64) as u32, 1, 1],
                )
                .unwrap()
                .wait()
                .unwrap(),
            None => {
                let bytes: Vec<u8> = (0..words)
                    .flat_map(|i| (i as u32 + 5 * round).to_le_bytes())
                    .collect();
                buf.write(0, &bytes).unwrap();
            }
        }
    }
    let v = buf.view::<u32>().unwrap();
    assert!(v.iter().enumerate().all(|(i, &w)| w == i as u32 + 15));
    assert!(ctx.take_cpu_fault_error().is_none());
}

#[test]
fn pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes_on_the_host_device() {
    pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes(
        DeviceKind::Host,
        "pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes_on_the_host_device",
    );
}

#[test]
fn pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes_on_lavapipe() {
    pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes(
        DeviceKind::Vulkan,
        "pages_mapped_ahead_of_a_scan_hold_and_lose_the_right_bytes_on_lavapipe",
    );
}

/// A scan leaves the long runs it brought back to the kernel's own fault path (the fault
/// thread ends their registration); making the buffer read-only afterwards must register
/// them again, so a store into the middle of the scanned range is refused (`SIGBUS`), not
/// mapped writable by the kernel.
#[test]
fn a_store_into_a_scanned_range_made_read_only_is_refused() {
    use std::os::unix::process::ExitStatusExt;
    let test = "a_store_into_a_scanned_range_made_read_only_is_refused";
    let Ok(kind) = std::env::var("HETMEM_CHILD") else {
        for kind in ["host", "vulkan"] {
            let status =
                run_child(test, kind, std::time::Duration::from_secs(120)).expect("the child hung");
            if status.code() == Some(77) {
                continue; // no userfaultfd or no Vulkan here (said by the child)
            }
            assert_eq!(status.signal(), Some(libc::SIGBUS), "{kind}: {status:?}");
        }
        return;
    };
    let kind = if kind == "host" {
        DeviceKind::Host
    } else {
        DeviceKind::Vulkan
    };
    let Some(ctx) = offload_context(kind, BYTES as u64 + (4 << 20), None, test) else {
        std::process::exit(77);
    };
    let Some(buf) = mapped_buffer(&ctx, BYTES, test) else {
        std::process::exit(77);
    };
    buf.view_mut::<u32>()
        .unwrap()
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u32);
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let faults = ctx.cpu_faults();
    let sum = buf
        .view::<u32>()
        .unwrap()
        .iter()
        .fold(0u64, |a, &w| a + w as u64);
    let words = (BYTES / 4) as u64;
    assert_eq!(sum, words * (words - 1) / 2);
    let taken = ctx.cpu_faults() - faults;
    assert!(
        (taken as usize) < BYTES / PAGE / 64,
        "{taken} faults: the scan was not served in long windows"
    );
    buf.set_read_only(true).unwrap();
    assert_eq!(buf.view::<u32>().unwrap()[BYTES / 8], (BYTES / 8) as u32);
    let target = buf.as_mut_ptr().unwrap() as usize + BYTES / 2 + PAGE;
    // SAFETY: an unsafe store into a read-only managed page: what the test is about.
    unsafe { (target as *mut u32).write_volatile(7) };
    // Reached only if the store went through.
    std::process::exit(0);
}
