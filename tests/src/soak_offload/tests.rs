//! The offload soak's own tests: short runs pass, with and without injected faults, and
//! sabotaged ones fail with the defect named.

use super::*;

fn short(device: DeviceKind, sabotage: Option<Sabotage>) -> Result<OffloadSoakReport, String> {
    short_with(device, sabotage, 0.0)
}

/// A short run with host-frame exhaustion and device losses injected at `rate` each.
fn short_with(
    device: DeviceKind,
    sabotage: Option<Sabotage>,
    rate: f64,
) -> Result<OffloadSoakReport, String> {
    run(&OffloadSoakConfig {
        host_exhaustion_rate: rate,
        device_loss_rate: rate,
        device,
        threads: 4,
        duration: Duration::from_millis(1500),
        // Short only for the stall it must catch. A panicking thread is not slow to
        // unwind (its buffers' unmaps take about 0.1 ms), but the first panic of a
        // process with RUST_BACKTRACE set spends 0.2-0.5 s in the default panic hook,
        // symbolising the backtrace from this debug build's DWARF, before unwinding
        // starts; the watchdog would call it stuck.
        stuck_after: Duration::from_millis(if matches!(sabotage, Some(Sabotage::Stall)) {
            500
        } else {
            20_000
        }),
        sabotage,
        ..OffloadSoakConfig::default()
    })
}

#[test]
fn a_short_offload_soak_passes_on_every_device() {
    let report = short(DeviceKind::Host, None).unwrap();
    assert!(report.ops > 100, "{report:?}");
    // Under CI=true (as root) pointers must have been used; the run fails otherwise.
    if report.pointers_unavailable.is_none() {
        assert!(report.pointer_ops > 0, "{report:?}");
    }
    if crate::open_for_test(DeviceKind::Vulkan, 1 << 20, "offload_soak").is_some() {
        let report = short(DeviceKind::Vulkan, None).unwrap();
        assert!(report.launches > 0, "kernels ran on Vulkan: {report:?}");
    }
}

#[test]
fn a_byte_changed_behind_the_shadow_fails_the_run() {
    let e = short(DeviceKind::Host, Some(Sabotage::CorruptByte)).unwrap_err();
    assert!(e.contains("shared buffer") && e.contains("expected"), "{e}");
}

#[test]
fn a_stuck_thread_fails_the_run_naming_every_thread() {
    let e = short(DeviceKind::Host, Some(Sabotage::Stall)).unwrap_err();
    assert!(e.starts_with("stuck: thread 0:"), "{e}");
    for k in 0..4 {
        assert!(e.contains(&format!("thread {k}: ")), "{e}");
    }
    assert!(
        e.contains("soak-offload-0 holds [Map]"),
        "the locks it holds: {e}"
    );
}

#[test]
fn a_panic_fails_the_run_with_its_message() {
    let e = short(DeviceKind::Host, Some(Sabotage::Panic)).unwrap_err();
    assert!(e.contains("thread 0 panicked: sabotage"), "{e}");
}

/// Under exhaustion and device losses, a run passes, and it did meet both: operations
/// failed with `OutOfMemory` and with `DeviceLost`, and batches were lost mid-way.
#[test]
fn a_short_offload_soak_with_exhaustion_and_device_loss_passes() {
    let mut devices = vec![DeviceKind::Host];
    if crate::open_for_test(DeviceKind::Vulkan, 1 << 20, "offload_soak_injected").is_some() {
        devices.push(DeviceKind::Vulkan);
    }
    for device in devices {
        let r = short_with(device, None, 0.05).unwrap();
        assert!(r.exhaustions > 0 && r.loss_injections > 0, "{r:?}");
        assert!(r.lost_batches > 0, "no batch was lost: {r:?}");
        assert!(r.device_lost > 0, "no operation saw the loss: {r:?}");
        assert!(r.out_of_memory > 0, "no operation met exhaustion: {r:?}");
    }
}

#[test]
fn a_byte_changed_behind_the_shadow_fails_a_run_with_exhaustion_and_device_loss() {
    let e = short_with(DeviceKind::Host, Some(Sabotage::CorruptByte), 0.05).unwrap_err();
    assert!(e.contains("shared buffer") && e.contains("expected"), "{e}");
}

#[test]
fn a_leaked_host_frame_fails_a_run_with_exhaustion_and_device_loss() {
    let e = short_with(DeviceKind::Host, Some(Sabotage::LeakFrame), 0.05).unwrap_err();
    assert!(
        e.contains("host frames in use after the context was dropped"),
        "{e}"
    );
}

#[test]
fn a_leaked_device_page_fails_a_run_with_exhaustion_and_device_loss() {
    let e = short_with(DeviceKind::Host, Some(Sabotage::LeakDevicePage), 0.05).unwrap_err();
    assert!(
        e.contains("device pages in use after the context was dropped"),
        "{e}"
    );
}
