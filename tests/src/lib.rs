//! Shared helpers for hetmem's integration tests: which devices to run a scenario on, the
//! dmirror test driver, and the KV-cache scenario the demo runs.

pub mod dmirror;
pub mod harness;
pub mod soak;

/// The KV-cache scenario the demo runs (the `hetmem-kv` crate, which the demo uses without
/// this crate).
pub use hetmem_kv as kv;

use hetmem_engine::{Device, DeviceConfig, DeviceKind, EngineError};

/// Opens a device of `kind` for a test with a `budget` in bytes and small chunks.
///
/// Returns `None` (after saying by name that the test is skipped) when the device kind is not
/// available here; under `CI=true` a missing Vulkan device is a failure instead.
pub fn open_for_test(kind: DeviceKind, budget: u64, test: &str) -> Option<Device> {
    open_config(test_config(kind, budget), test)
}

/// The configuration `open_for_test` uses: `kind`, `budget` bytes, chunks of a quarter of it
/// (1 to 16 MiB).
pub fn test_config(kind: DeviceKind, budget: u64) -> DeviceConfig {
    DeviceConfig::default()
        .kind(kind)
        .budget(budget)
        .chunk((budget / 4).clamp(1 << 20, 16 << 20) & !4095)
}

/// Opens a device with `config`; skips or fails as [`open_for_test`] does.
pub fn open_config(config: DeviceConfig, test: &str) -> Option<Device> {
    let kind = config.kind.unwrap_or(DeviceKind::Vulkan);
    match Device::open(config) {
        Ok(d) => Some(d),
        Err(e @ EngineError::NoDevice { .. }) => {
            if kind != DeviceKind::Host && hetmem_engine::running_in_ci() {
                panic!("{test}: CI=true and no Vulkan device: {e}");
            }
            say_skipped(test, kind, &e);
            None
        }
        Err(e) => panic!("{test}: opening {kind:?} failed: {e}"),
    }
}

/// The device kinds every engine scenario runs on.
pub const KINDS: [DeviceKind; 3] = [DeviceKind::Host, DeviceKind::Vulkan, DeviceKind::Wgpu];

/// Says by name that a test was skipped, past the test harness's output capture (which only
/// shows a passing test's `eprintln!` with `--nocapture`).
pub fn say_skipped(test: &str, kind: DeviceKind, why: &dyn std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test} on {kind:?}: {why}");
}
