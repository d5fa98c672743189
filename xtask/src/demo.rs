//! `cargo xtask demo`: the KV-cache offload scenario (the `hetmem-kv` crate) at a size a user can
//! watch: blocks three times larger than the device budget, a progress bar, and a final table.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use hetmem::offload::{Context, ContextConfig};
use hetmem_engine::DeviceConfig;
use hetmem_kv::{run_kv, KvShape};
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
    let secs = start.elapsed().as_secs_f64();
    let s = ctx.stats();
    let moved = s.bytes_to_device + s.bytes_to_host;
    let gbps = if s.copy_ns > 0 {
        moved as f64 / s.copy_ns as f64
    } else {
        0.0
    };
    let ok = report.blocks_ok == args.blocks && report.spot_checks_ok == report.spot_checks;
    println!();
    println!("{:<28} {} ({:?})", "device", info.name, info.kind);
    println!(
        "{:<28} {:.1} MiB",
        "bytes host -> device",
        s.bytes_to_device as f64 / (1 << 20) as f64
    );
    println!(
        "{:<28} {:.1} MiB",
        "bytes device -> host",
        s.bytes_to_host as f64 / (1 << 20) as f64
    );
    println!("{:<28} {}", "CPU faults", s.faults);
    println!("{:<28} {} pages", "evictions", s.evictions);
    println!(
        "{:<28} {:.2} GB/s over {:.0} ms of copies ({:.0} ms bookkeeping)",
        "copy throughput",
        gbps,
        s.copy_ns as f64 / 1e6,
        s.bookkeeping_ns as f64 / 1e6
    );
    println!("{:<28} {:.2} s", "wall time", secs);
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
    ensure!(ok, "some block does not match the CPU reference");
    Ok(())
}
