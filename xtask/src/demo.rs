//! `cargo xtask demo`: the KV-cache offload scenario (the `hetmem-kv` crate) at a size a user can
//! watch: blocks three times larger than the device budget, a progress bar, and a final table.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use hetmem::driver::DriverStats;
use hetmem::offload::{Context, ContextConfig};
use hetmem_engine::DeviceConfig;
use hetmem_kv::{run_kv, KvPhases, KvReport, KvShape};
use indicatif::{ProgressBar, ProgressStyle};

/// Options of the demo.
#[derive(clap::Args)]
pub struct Args {
    /// Number of KV blocks.
    #[arg(long, default_value_t = 48)]
    blocks: usize,
    /// MiB per block.
    #[arg(long, default_value_t = 8)]
    block_mib: usize,
    /// Device budget in MiB (default: a third of all blocks).
    #[arg(long)]
    budget_mib: Option<usize>,
    /// Blocks in each step's working set.
    #[arg(long, default_value_t = 12)]
    working_set: usize,
    /// Steps to run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
}

pub fn run(args: Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let block_bytes = args.block_mib << 20;
    let total = args.blocks * block_bytes;
    let budget = args.budget_mib.map_or(total / 3, |m| m << 20);
    if args.working_set * block_bytes > budget {
        bail!(
            "a working set of {} blocks does not fit a {} MiB budget",
            args.working_set,
            budget >> 20
        );
    }
    let config = ContextConfig {
        device: DeviceConfig::from_env()?,
        budget_bytes: budget as u64,
        ..ContextConfig::default()
    };
    let fault_around = config.fault_around;
    let ctx = Context::new(config)?;
    let info = ctx.device_info().clone();
    println!(
        "device: {} ({:?}, {:?})",
        info.name, info.kind, info.device_type
    );
    println!("chosen because: {}", info.reason);
    println!(
        "{} blocks x {} MiB = {} MiB of KV cache, device budget {} MiB, working set {} blocks, {} steps",
        args.blocks, args.block_mib, total >> 20, budget >> 20, args.working_set, args.steps
    );
    let shape = KvShape {
        blocks: args.blocks,
        block_bytes,
        working_set: args.working_set,
        steps: args.steps,
    };
    let bar = ProgressBar::new(args.steps as u64).with_style(ProgressStyle::with_template(
        "{bar:40} step {pos}/{len} {msg} [{elapsed}]",
    )?);
    let start = Instant::now();
    let report = run_kv(&ctx, shape, |_| {
        let s = ctx.stats();
        bar.set_message(format!("faults {} evictions {}", s.faults, s.evictions));
        bar.inc(1);
    })?;
    bar.finish();
    let wall = start.elapsed();
    let ok = print_totals(&args, &report, &ctx.stats(), wall, fault_around);
    ensure!(ok, "some block does not match the CPU reference");
    Ok(())
}

/// Prints the run's totals after the phase table: traffic, faults, evictions, wall time and
/// the check against the CPU reference. True if every block and spot check matched.
fn print_totals(
    args: &Args,
    report: &KvReport,
    s: &DriverStats,
    wall: Duration,
    fault_around: usize,
) -> bool {
    let ok = report.blocks_ok == args.blocks && report.spot_checks_ok == report.spot_checks;
    println!();
    print_phases(&report.phases, wall);
    let moved = s.bytes_to_device + s.bytes_to_host;
    println!();
    println!(
        "{:<28} {:.1} MiB host -> device, {:.1} MiB device -> host",
        "bytes moved",
        mib(s.bytes_to_device),
        mib(s.bytes_to_host)
    );
    println!(
        "{:<28} {:.2} GB/s (all bytes moved / the run's wall time)",
        "moved per wall second",
        gb_per_s(moved, wall)
    );
    let m = report.phases.moving;
    println!(
        "{:<28} {:.2} GB/s (bytes the prefetches moved / their wall time)",
        "prefetch per wall second",
        gb_per_s(m.bytes_moved, m.wall)
    );
    println!(
        "{:<28} {} (each brings up to {} pages home)",
        "CPU faults", s.faults, fault_around
    );
    println!(
        "{:<28} {} pages ({:.1} MiB) moved off the device to make room",
        "evictions",
        s.evictions,
        mib(s.evictions * 4096)
    );
    println!("{:<28} {:.2} s", "wall time", wall.as_secs_f64());
    println!(
        "{:<28} {} ({} of {} blocks, {} of {} spot checks)",
        "check against CPU reference",
        if ok { "OK" } else { "FAILED" },
        report.blocks_ok,
        args.blocks,
        report.spot_checks_ok,
        report.spot_checks
    );
    println!("{:<28} {}", "device step", report.device_step);
    ok
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// Decimal gigabytes per second; 0 for an empty interval.
fn gb_per_s(bytes: u64, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s / 1e9
    } else {
        0.0
    }
}

/// The run's wall time along its critical path: its phases follow one another on one
/// thread, so each row is the time the run spent there and the rows add up to the run.
fn print_phases(p: &KvPhases, wall: Duration) {
    println!("where the wall time went (the phases run one after another):");
    println!(
        "  {:<14} {:>9} {:>6} {:>11} {:>7} {:>10}",
        "phase", "wall s", "share", "moved MiB", "faults", "evictions"
    );
    let share = |d: Duration| 100.0 * d.as_secs_f64() / wall.as_secs_f64().max(1e-9);
    let mut accounted = Duration::ZERO;
    for (name, ph) in p.named() {
        accounted += ph.wall;
        println!(
            "  {:<14} {:>9.3} {:>5.1}% {:>11.1} {:>7} {:>10}",
            name,
            ph.wall.as_secs_f64(),
            share(ph.wall),
            mib(ph.bytes_moved),
            ph.faults,
            ph.evictions
        );
    }
    let rest = wall.saturating_sub(accounted);
    println!(
        "  {:<14} {:>9.3} {:>5.1}%",
        "other",
        rest.as_secs_f64(),
        share(rest)
    );
    println!("  fill: the CPU writes every block's first values (pages start on the host)");
    println!("  moving pages: prefetching each step's working set, evictions included");
    println!("  device step: the step's kernel launch and wait (or the host function)");
    println!("  CPU reads: spot-check reads during the steps, faulting pages home");
    println!("  final check: reading every block back and comparing with the reference");
    println!("  other: allocating the blocks, compiling the kernel, progress output");
}
