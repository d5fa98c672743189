//! The read-ahead variants of a sequential scan through a pointer, measured interleaved (one
//! round of each in turn, so a shared machine's load drifts across all of them alike):
//! median scan time of a device-resident buffer per `HETMEM_CPU_READAHEAD` mode, beside the
//! median host-resident scan. Home frames are not punched (that cost is the pointers
//! bench's). `cargo run --release -p hetmem-bench --example pointer_scan_ahead [MiB]
//! [rounds] [mode...]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::mm::MemoryKind;
use hetmem::offload::{Buffer, Context, ContextConfig, Location};
use hetmem_engine::{DeviceConfig, HostFramePool};

fn scan(buf: &Buffer, words: u64) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let s = buf
        .view::<u64>()?
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    let d = t.elapsed();
    anyhow::ensure!(s == words * (words - 1) / 2, "a scan read wrong words");
    Ok(d)
}

fn median(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(8), |a| a.parse())?;
    let mut modes: Vec<String> = args.collect();
    if modes.is_empty() {
        modes = ["map", "bring"].map(String::from).to_vec();
    }
    let bytes = mib << 20;
    let words = (bytes / 8) as u64;
    let mut runs: Vec<(String, Context, Buffer)> = Vec::new();
    for m in &modes {
        let pool: Arc<HostFramePool> = HostFramePool::new(2 * bytes)?;
        pool.forbid_home_punching();
        let mut device = DeviceConfig::from_env()?;
        device.frames = Some(pool);
        let ctx = Context::new(ContextConfig {
            device,
            budget_bytes: 2 * bytes as u64,
            memory: Some(MemoryKind::DevicePrivate),
            fault_around: 16,
        })?;
        std::env::set_var("HETMEM_CPU_READAHEAD", m);
        let buf = ctx.alloc_mapped(bytes)?;
        std::env::remove_var("HETMEM_CPU_READAHEAD");
        buf.view_mut::<u64>()?
            .iter_mut()
            .enumerate()
            .for_each(|(i, w)| *w = i as u64);
        runs.push((m.clone(), ctx, buf));
    }
    let mut host = Vec::new();
    let mut dev: Vec<Vec<Duration>> = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        host.push(scan(&runs[0].2, words)?);
        for (k, (_, _, buf)) in runs.iter().enumerate() {
            buf.prefetch(0..buf.len(), Location::Device)?.wait()?;
            dev[k].push(scan(buf, words)?);
        }
    }
    let h = median(&mut host);
    println!("{mib} MiB, {rounds} rounds interleaved; host-resident scan: median {h:.1} ms");
    for ((m, ctx, _), d) in runs.iter().zip(&mut dev) {
        let ms = median(d);
        println!(
            "  {m:<12} device-resident scan: median {ms:.1} ms ({:.2}x of host-resident), {} CPU faults in all",
            h / ms,
            ctx.cpu_faults()
        );
    }
    Ok(())
}
