//! Profiles a sequential scan of a device-resident CPU-mapped buffer: wall time, CPU faults
//! served and driver faults. `cargo run --release -p hetmem-bench --example
//! pointer_scan_profile [MiB] [rounds]`.

use std::time::Instant;

use hetmem::mm::MemoryKind;
use hetmem::offload::{Context, ContextConfig, Location};
use hetmem_engine::DeviceConfig;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let bytes = mib << 20;
    let ctx = Context::new(ContextConfig {
        device: DeviceConfig::from_env()?,
        budget_bytes: 2 * bytes as u64,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around: 16,
    })?;
    let buf = ctx.alloc_mapped(bytes)?;
    buf.view_mut::<u64>()?
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u64);
    for _ in 0..rounds {
        let t = Instant::now();
        let s: u64 = buf.view::<u64>()?.iter().fold(0, |a, &w| a.wrapping_add(w));
        let host = t.elapsed();
        buf.prefetch(0..buf.len(), Location::Device)?.wait()?;
        let (f0, d0) = (ctx.cpu_faults(), ctx.stats().faults);
        let t = Instant::now();
        let s2: u64 = buf.view::<u64>()?.iter().fold(0, |a, &w| a.wrapping_add(w));
        let dev = t.elapsed();
        assert_eq!(s, s2);
        buf.prefetch(0..buf.len(), Location::Device)?.wait()?;
        let t = Instant::now();
        buf.prefetch(0..buf.len(), Location::Host)?.wait()?;
        let back = t.elapsed();
        println!(
            "  (the same bytes back to host memory by one prefetch alone: {:.1} ms, {:.2} GB/s; the next scan maps them through CPU faults)",
            back.as_secs_f64() * 1e3,
            bytes as f64 / back.as_secs_f64() / 1e9
        );
        println!(
            "host {:.1} ms ({:.2} GB/s), device-resident {:.1} ms ({:.2} GB/s, {:.2}x): {} CPU faults, {} driver faults",
            host.as_secs_f64() * 1e3,
            bytes as f64 / host.as_secs_f64() / 1e9,
            dev.as_secs_f64() * 1e3,
            bytes as f64 / dev.as_secs_f64() / 1e9,
            host.as_secs_f64() / dev.as_secs_f64(),
            ctx.cpu_faults() - f0,
            ctx.stats().faults - d0,
        );
    }
    Ok(())
}
