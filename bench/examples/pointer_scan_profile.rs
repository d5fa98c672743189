//! Profiles a sequential scan of a device-resident CPU-mapped buffer: wall time, CPU faults
//! served, driver faults, and the CPU time each thread of the process spent during the scan
//! (from `/proc/self/task/*/schedstat`), against the scan's wall time. `cargo run --release -p hetmem-bench --example
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
        let cpu0 = cpu_time();
        let th0 = threads();
        let t = Instant::now();
        let s2: u64 = buf.view::<u64>()?.iter().fold(0, |a, &w| a.wrapping_add(w));
        let dev = t.elapsed();
        let cpu = cpu_time() - cpu0;
        let th1 = threads();
        for (name, ns) in &th1 {
            let before = th0.iter().find(|(n, _)| n == name).map_or(0, |x| x.1);
            if ns - before > 100_000 {
                println!(
                    "    thread {name}: {:.1} ms on CPU",
                    (ns - before) as f64 / 1e6
                );
            }
        }
        println!(
            "  device-resident scan: CPU time of the process {:.1} ms over a wall time of {:.1} ms",
            cpu * 1e3,
            dev.as_secs_f64() * 1e3
        );
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

/// User + system CPU time of the whole process so far, in seconds.
fn cpu_time() -> f64 {
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the live struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 * 1e-6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// (thread id + name, nanoseconds on CPU) of every thread, from /proc/self/task/*/schedstat.
fn threads() -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let p = e.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let st = std::fs::read_to_string(p.join("schedstat")).unwrap_or_default();
        let ns: u64 = st
            .split_whitespace()
            .next()
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        v.push((
            format!("{}:{}", e.file_name().to_string_lossy(), name.trim()),
            ns,
        ));
    }
    v
}
