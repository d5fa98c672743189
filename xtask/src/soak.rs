//! `cargo xtask soak`: runs `hetmem_tests::soak` (`--layer mm`, the default) or
//! `hetmem_tests::soak_offload` (`--layer offload`) with options, and the short soaks that
//! `cargo xtask test` (CI) runs on every device and memory kind.

//!
//! Without the `full` feature only the options are here (for `--help`); main then runs the
//! task again with it.

#[cfg(feature = "full")]
use std::time::Duration;

#[cfg(feature = "full")]
use anyhow::{bail, Result};
#[cfg(feature = "full")]
use hetmem::mm::MemoryKind;
#[cfg(feature = "full")]
use hetmem_engine::DeviceKind;
#[cfg(feature = "full")]
use hetmem_tests::soak::{SoakConfig, SoakReport};
#[cfg(feature = "full")]
use hetmem_tests::soak_offload::{OffloadSoakConfig, OffloadSoakReport};

/// Options of `cargo xtask soak`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which API to soak: mm (address spaces, migrations, the driver) or offload (a
    /// Context's managed buffers, CPU pointers, kernel launches).
    #[arg(long, default_value = "mm")]
    layer: String,
    /// Device: host or vulkan (lavapipe without a GPU).
    #[arg(long, default_value = "host")]
    device: String,
    /// Device memory: private or coherent.
    #[arg(long, default_value = "private")]
    memory: String,
    /// Worker threads.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Stop after this many operations (all threads), if sooner.
    #[arg(long)]
    ops: Option<u64>,
    /// Seed of the first thread.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Pages each thread owns (offload: split over its buffers).
    #[arg(long, default_value_t = 16)]
    pages: usize,
    /// Offload: buffers each thread owns (every other one CPU-mapped where pointers work).
    #[arg(long, default_value_t = 2)]
    buffers: usize,
    /// Device budget in pages.
    #[arg(long, default_value_t = 24)]
    budget: usize,
    /// Host frames beyond what the regions need (small: exhaustion); offload: 64 if unset.
    #[arg(long)]
    spare_frames: Option<usize>,
    /// Chance per operation of injecting copy failures.
    #[arg(long, default_value_t = 0.02)]
    copy_failures: f64,
    /// Offload: chance per operation that a thread takes every free host frame through its
    /// next operation (host-frame exhaustion).
    #[arg(long, default_value_t = 0.0)]
    host_exhaustion: f64,
    /// Offload: chance per operation that the next copy batch is lost mid-way, with the
    /// device (`DeviceLost`).
    #[arg(long, default_value_t = 0.0)]
    device_loss: f64,
}

#[cfg(feature = "full")]
fn device(name: &str) -> Result<DeviceKind> {
    Ok(match name {
        "host" => DeviceKind::Host,
        "vulkan" => DeviceKind::Vulkan,
        "wgpu" => DeviceKind::Wgpu,
        other => bail!("unknown device {other:?} (host, vulkan, wgpu)"),
    })
}

#[cfg(feature = "full")]
fn memory(name: &str) -> Result<MemoryKind> {
    Ok(match name {
        "private" => MemoryKind::DevicePrivate,
        "coherent" => MemoryKind::DeviceCoherent,
        other => bail!("unknown memory kind {other:?} (private, coherent)"),
    })
}

#[cfg(feature = "full")]
/// Runs one soak and prints what it did.
pub fn run(args: &Args) -> Result<()> {
    match args.layer.as_str() {
        "mm" if args.host_exhaustion > 0.0 || args.device_loss > 0.0 => {
            bail!("--host-exhaustion and --device-loss are options of --layer offload")
        }
        "mm" => {}
        "offload" => return soak_offload(&offload_config(args)?),
        other => bail!("unknown layer {other:?} (mm, offload)"),
    }
    let config = SoakConfig {
        device: device(&args.device)?,
        memory: memory(&args.memory)?,
        threads: args.threads.max(1),
        duration: Duration::from_secs(args.seconds),
        max_ops: args.ops.unwrap_or(u64::MAX),
        seed: args.seed,
        pages_per_thread: args.pages.max(1),
        budget_pages: args.budget.max(1),
        spare_host_frames: args.spare_frames.unwrap_or(24),
        copy_failure_rate: args.copy_failures.clamp(0.0, 1.0),
        ..SoakConfig::default()
    };
    soak(&config)
}

#[cfg(feature = "full")]
fn offload_config(args: &Args) -> Result<OffloadSoakConfig> {
    let buffers = args.buffers.max(1);
    Ok(OffloadSoakConfig {
        device: device(&args.device)?,
        memory: memory(&args.memory)?,
        threads: args.threads.max(1),
        duration: Duration::from_secs(args.seconds),
        max_ops: args.ops.unwrap_or(u64::MAX),
        seed: args.seed,
        buffers_per_thread: buffers,
        pages_per_buffer: (args.pages / buffers).max(1),
        budget_pages: args.budget.max(1),
        spare_host_frames: args.spare_frames.unwrap_or(64),
        copy_failure_rate: args.copy_failures.clamp(0.0, 1.0),
        host_exhaustion_rate: args.host_exhaustion.clamp(0.0, 1.0),
        device_loss_rate: args.device_loss.clamp(0.0, 1.0),
        ..OffloadSoakConfig::default()
    })
}

#[cfg(feature = "full")]
fn soak_offload(config: &OffloadSoakConfig) -> Result<()> {
    eprintln!(
        "soak (offload): {:?} {:?}, {} threads x {} buffers of {} pages, budget {} pages, \
         {:?}, seed {}, injected: copy failures at {}, host-frame exhaustion at {}, device \
         loss at {}",
        config.device,
        config.memory,
        config.threads,
        config.buffers_per_thread,
        config.pages_per_buffer,
        config.budget_pages,
        config.duration,
        config.seed,
        config.copy_failure_rate,
        config.host_exhaustion_rate,
        config.device_loss_rate
    );
    match hetmem_tests::soak_offload::run(config) {
        Ok(r) => {
            print_offload_report(&r);
            Ok(())
        }
        Err(e) => bail!(
            "offload soak failed ({:?} {:?}, seed {}): {e}",
            config.device,
            config.memory,
            config.seed
        ),
    }
}

#[cfg(feature = "full")]
fn print_offload_report(r: &OffloadSoakReport) {
    let secs = r.wall.as_secs_f64();
    if let Some(why) = &r.pointers_unavailable {
        println!("soak (offload): CPU pointers unavailable, plain buffers only: {why}");
    }
    if let Some(why) = &r.kernels_unavailable {
        println!("soak (offload): no kernel launches on this device: {why}");
    }
    println!(
        "soak (offload): {} ops in {secs:.1} s ({:.0} ops/s wall), {} ended in an accepted \
         error ({} out of memory, {} device lost), {} copy-failure injections, {} host-frame \
         exhaustions, {} device losses armed ({} batches lost), {} kernel launches, {} pointer \
         loads/stores/views ({} CPU faults served), {} faults, {} evictions; failures: 0",
        r.ops,
        r.ops as f64 / secs,
        r.errors,
        r.out_of_memory,
        r.device_lost,
        r.injected,
        r.exhaustions,
        r.loss_injections,
        r.lost_batches,
        r.launches,
        r.pointer_ops,
        r.cpu_faults,
        r.faults,
        r.evictions
    );
    let errors: Vec<String> = r
        .error_counts
        .iter()
        .map(|(what, n)| format!("{what} x{n}"))
        .collect();
    if !errors.is_empty() {
        println!("soak (offload): accepted errors: {}", errors.join(", "));
    }
}

#[cfg(feature = "full")]
fn soak(config: &SoakConfig) -> Result<()> {
    eprintln!(
        "soak: {:?} {:?}, {} threads, {:?}, seed {}",
        config.device, config.memory, config.threads, config.duration, config.seed
    );
    match hetmem_tests::soak::run(config) {
        Ok(r) => {
            print_report(&r);
            Ok(())
        }
        Err(e) => bail!("soak failed ({:?} {:?}): {e}", config.device, config.memory),
    }
}

#[cfg(feature = "full")]
fn print_report(r: &SoakReport) {
    let secs = r.wall.as_secs_f64();
    println!(
        "soak: {} ops in {secs:.1} s ({:.0} ops/s wall), {} ended in an accepted error, \
         {} copy-failure injections, {} faults, {} evictions; failures: 0",
        r.ops,
        r.ops as f64 / secs,
        r.errors,
        r.injected,
        r.faults,
        r.evictions
    );
}

#[cfg(feature = "full")]
/// The soaks CI runs: the host device and Vulkan (lavapipe), both memory kinds, a few
/// seconds each. Vulkan's absence fails the run under `CI=true` and is skipped (said by
/// name) elsewhere.
pub fn ci() -> Result<()> {
    let (mut passed, mut skipped) = (0, 0);
    for dev in [DeviceKind::Host, DeviceKind::Vulkan] {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let config = SoakConfig {
                device: dev,
                memory: mem,
                duration: Duration::from_secs(12),
                seed: 0x50a6,
                ..SoakConfig::default()
            };
            if !device_present(dev, "soak")? {
                skipped += 1;
                continue;
            }
            soak(&config)?;
            passed += 1;
        }
    }
    // The offload API on both devices (private memory), with pointers and, on Vulkan,
    // kernel launches; copy failures, host-frame exhaustion and device losses injected.
    for dev in [DeviceKind::Host, DeviceKind::Vulkan] {
        if !device_present(dev, "soak (offload)")? {
            skipped += 1;
            continue;
        }
        soak_offload(&OffloadSoakConfig {
            device: dev,
            duration: Duration::from_secs(10),
            seed: 0x0ff1,
            host_exhaustion_rate: 0.01,
            device_loss_rate: 0.01,
            ..OffloadSoakConfig::default()
        })?;
        passed += 1;
    }
    // A failed soak returned above with its error.
    println!("soak: {passed} passed, 0 failed, {skipped} skipped");
    Ok(())
}

/// Whether a soak on `dev` can run: a missing Vulkan device fails the run under `CI=true`
/// and is skipped, by name, elsewhere.
#[cfg(feature = "full")]
fn device_present(dev: DeviceKind, what: &str) -> Result<bool> {
    if dev != DeviceKind::Vulkan
        || hetmem_engine::Device::open(hetmem_engine::DeviceConfig::default().kind(dev)).is_ok()
    {
        return Ok(true);
    }
    if hetmem_tests::running_in_ci() {
        bail!("{what}: CI=true and no Vulkan device");
    }
    eprintln!("SKIPPED {what} on Vulkan: no Vulkan device");
    Ok(false)
}
