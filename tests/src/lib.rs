//! Shared helpers for hetmem's integration tests: which devices to run a scenario on, the
//! dmirror test driver, and the KV-cache scenario the demo runs.

pub mod dmirror;
pub mod engine_bytes;
pub mod harness;
pub mod soak;
pub mod soak_offload;

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
            if kind != DeviceKind::Host && crate::running_in_ci() {
                panic!("{}: CI=true and no Vulkan device: {e}", test_name(test));
            }
            say_skipped(test, kind, &e);
            None
        }
        Err(e) => panic!("{}: opening {kind:?} failed: {e}", test_name(test)),
    }
}

/// True when running under CI (`CI=true`), where a missing Vulkan device must fail tests
/// instead of skipping them.
pub fn running_in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The device kinds every engine scenario runs on.
pub const KINDS: [DeviceKind; 3] = [DeviceKind::Host, DeviceKind::Vulkan, DeviceKind::Wgpu];

/// Says by name that a test was skipped, past the test harness's output capture (which only
/// shows a passing test's `eprintln!` with `--nocapture`).
pub fn say_skipped(test: &str, kind: DeviceKind, why: &dyn std::fmt::Display) {
    use std::io::Write;
    let name = test_name(test);
    let _ = writeln!(std::io::stderr(), "SKIPPED {name} on {kind:?}: {why}");
}

/// The running test's name, for messages: the test harness names each test's thread after
/// its test (and [`harness::watchdog`] passes the name on to its thread), with `label` (what
/// the caller calls the scenario) after it when that says something more; `label` alone on
/// a thread without a test's name.
pub fn test_name(label: &str) -> String {
    match std::thread::current().name() {
        Some(n) if n != "main" && !n.is_empty() => {
            if n.rsplit("::").next() == Some(label) {
                n.to_string()
            } else {
                format!("{n} ({label})")
            }
        }
        _ => label.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::test_name;

    fn on_thread(name: Option<&str>, label: &'static str) -> String {
        let mut b = std::thread::Builder::new();
        if let Some(n) = name {
            b = b.name(n.to_string());
        }
        b.spawn(move || test_name(label)).unwrap().join().unwrap()
    }

    #[test]
    fn a_skip_names_the_test_and_the_scenario() {
        assert_eq!(
            on_thread(Some("driver::budget_is_kept"), "budget"),
            "driver::budget_is_kept (budget)"
        );
        assert_eq!(
            on_thread(Some("kernels::bad_kernels"), "bad_kernels"),
            "kernels::bad_kernels"
        );
        assert_eq!(on_thread(None, "harness"), "harness");
    }

    #[test]
    fn a_watchdog_thread_keeps_the_test_name() {
        let inner = std::thread::Builder::new()
            .name("adversary::some_race".into())
            .spawn(|| crate::harness::watchdog("race", || test_name("harness")))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(inner, "adversary::some_race (harness)");
    }
}
