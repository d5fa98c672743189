//! `cargo xtask demo`: moves a working set between host frames and the device in batches, and
//! checks every byte on the way back.

use std::time::Instant;

use anyhow::{ensure, Result};
use hetmem_engine::{Device, DeviceConfig, PAGE_SIZE};
use indicatif::{ProgressBar, ProgressStyle};

/// Options of the demo.
#[derive(clap::Args)]
pub struct Args {
    /// MiB moved per round.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Rounds (there and back each).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
}

pub fn run(args: Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let pages = args.mib * (1 << 20) / PAGE_SIZE;
    let dev = Device::open(DeviceConfig::from_env()?.budget((args.mib as u64 + 64) << 20))?;
    println!(
        "device: {} ({:?}) — {}",
        dev.info().name,
        dev.info().kind,
        dev.info().reason
    );
    let f = dev.frames();
    let host = f.alloc_batch(pages, false)?;
    for (i, &p) in host.iter().enumerate() {
        f.write(p, 0, &(i as u64).to_le_bytes())?;
    }
    let device_pages = dev.alloc_pages(pages, false)?;
    let there: Vec<_> = host
        .iter()
        .copied()
        .zip(device_pages.iter().copied())
        .collect();
    let back: Vec<_> = there.iter().map(|&(h, d)| (d, h)).collect();
    let bar = ProgressBar::new(args.rounds as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} rounds {msg}",
    )?);
    let start = Instant::now();
    for _ in 0..args.rounds {
        dev.copy(&there)?.wait()?;
        for &p in &host {
            f.zero(p)?;
        }
        dev.copy(&back)?.wait()?;
        bar.inc(1);
    }
    bar.finish();
    let secs = start.elapsed().as_secs_f64();
    for (i, &p) in host.iter().enumerate() {
        let mut b = [0u8; 8];
        f.read(p, 0, &mut b)?;
        ensure!(
            u64::from_le_bytes(b) == i as u64,
            "page {i} came back wrong"
        );
    }
    let bytes = (2 * args.rounds * pages * PAGE_SIZE) as f64;
    println!(
        "moved {:.1} GiB in {secs:.2} s ({:.2} GB/s incl. zeroing); check: OK",
        bytes / (1u64 << 30) as f64,
        bytes / secs / 1e9
    );
    dev.free_pages(&device_pages)?;
    f.free_batch(&host)?;
    Ok(())
}
