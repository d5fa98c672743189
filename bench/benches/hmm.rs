//! The kernel HMM self-test's benchmark table, same shape (Sys->Dev and Dev->Sys time and
//! GB/s for 512 KiB .. 256 MiB buffers, warm-up then 5 iterations, 4 KiB pages), plus CPU
//! fault-back latency (p50/p99, one page and a fault-around window) and eviction throughput
//! with `migrate_device_range`, all through `GpuDriver` on the chosen device.

use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{AddressSpace, MemoryKind, PageMap, Prot, PAGE};
use hetmem::VirtAddr;
use hetmem_bench::{save_results, Baseline};
use hetmem_engine::{Device, DeviceConfig};

const SIZES_KIB: [usize; 7] = [512, 1024, 2048, 4096, 8192, 16384, 262_144];

fn driver(fault_around: usize) -> (GpuDriver, AddressSpace) {
    let dev = Device::open(DeviceConfig::from_env().unwrap().budget(320 << 20)).unwrap();
    let pm = PageMap::new(dev.frames().clone()).unwrap();
    let config = DriverConfig {
        kind: Some(MemoryKind::DevicePrivate),
        fault_around,
        budget_pages: None,
    };
    let d = GpuDriver::new(dev, &pm, config).unwrap();
    let space = AddressSpace::new(&pm);
    (d, space)
}

fn filled(space: &AddressSpace, bytes: usize) -> VirtAddr {
    let a = space.mmap(None, bytes as u64, Prot::RW, false).unwrap();
    let chunk = vec![0x5au8; bytes.min(1 << 20)];
    let mut at = 0;
    while at < bytes {
        space
            .write(a + at as u64, &chunk[..chunk.len().min(bytes - at)])
            .unwrap();
        at += chunk.len();
    }
    a
}

/// The self-test's table: for each size, warm up once, then 5 timed iterations each way,
/// beside a memcpy of the same bytes timed the same way. Returns the rows for the report.
fn hmm_table() -> serde_json::Value {
    let (d, space) = driver(16);
    println!(
        "\nHMM self-test table shape ({}; 4 KiB pages; mean of 5 after a warm-up)",
        d.device().info().name
    );
    println!(
        "{:>10} {:>14} {:>10} {:>14} {:>10} {:>12}",
        "size", "Sys->Dev ms", "GB/s", "Dev->Sys ms", "GB/s", "memcpy ms"
    );
    let mut rows = Vec::new();
    for kib in SIZES_KIB {
        let bytes = kib << 10;
        let n = bytes / 4096;
        let a = filled(&space, bytes);
        d.migrate_to_device(&space, a, n).unwrap();
        d.migrate_to_host(&space, a, n).unwrap();
        let (mut there, mut back) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..5 {
            let t = Instant::now();
            assert_eq!(d.migrate_to_device(&space, a, n).unwrap().migrated, n);
            there += t.elapsed();
            let t = Instant::now();
            assert_eq!(d.migrate_to_host(&space, a, n).unwrap().migrated, n);
            back += t.elapsed();
        }
        let (there, back) = (there / 5, back / 5);
        let mut base = Baseline::new(bytes);
        base.contiguous();
        let t = Instant::now();
        for _ in 0..5 {
            base.contiguous();
        }
        let memcpy = t.elapsed() / 5;
        drop(base);
        let gbps = |t: Duration| bytes as f64 / t.as_secs_f64() / 1e9;
        let label = if kib >= 1024 {
            format!("{} MiB", kib >> 10)
        } else {
            format!("{kib} KiB")
        };
        println!(
            "{label:>10} {:>14.3} {:>10.2} {:>14.3} {:>10.2} {:>12.3}",
            there.as_secs_f64() * 1e3,
            gbps(there),
            back.as_secs_f64() * 1e3,
            gbps(back),
            memcpy.as_secs_f64() * 1e3
        );
        rows.push(serde_json::json!({
            "size": label,
            "bytes": bytes,
            "sys_to_dev_ns": there.as_nanos() as f64,
            "dev_to_sys_ns": back.as_nanos() as f64,
            "memcpy_ns": memcpy.as_nanos() as f64,
        }));
        space.munmap(a, bytes as u64).unwrap();
    }
    serde_json::json!({ "device": d.device().info().name, "rows": rows })
}

/// CPU fault-back latency of device-private pages: p50 and p99 over 2 000 faults. Returns
/// them for the report.
fn fault_latency(window: usize) -> serde_json::Value {
    let (d, space) = driver(window);
    let n = 2000 * window;
    let a = filled(&space, n * 4096);
    d.migrate_to_device(&space, a, n).unwrap();
    let mut lat: Vec<Duration> = Vec::with_capacity(2000);
    for k in 0..2000u64 {
        let mut b = [0u8; 1];
        let t = Instant::now();
        space.read(a + k * window as u64 * PAGE, &mut b).unwrap();
        lat.push(t.elapsed());
        assert_eq!(b[0], 0x5a);
    }
    lat.sort();
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    let faults = d.stats().faults;
    println!(
        "fault-back, window {window:>2} page(s): p50 {:>8.1} us  p99 {:>8.1} us  ({faults} faults)",
        p(0.5),
        p(0.99),
    );
    serde_json::json!({
        "window": window,
        "p50_us": p(0.5),
        "p99_us": p(0.99),
        "faults": faults,
    })
}

fn eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("evict_migrate_device_range");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let (d, space) = driver(16);
    for mib in [16usize, 64] {
        let bytes = mib << 20;
        let n = bytes / 4096;
        let a = filled(&space, bytes);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{mib}MiB")),
            &n,
            |b, &n| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        d.migrate_to_device(&space, a, n).unwrap();
                        let s = Instant::now();
                        assert_eq!(d.evict_all().unwrap(), n);
                        t += s.elapsed();
                    }
                    t
                })
            },
        );
        space.munmap(a, bytes as u64).unwrap();
    }
    g.finish();
}

criterion_group!(benches, eviction);

fn main() {
    let table = hmm_table();
    println!();
    let faults = [fault_latency(1), fault_latency(16)];
    let saved = save_results(
        "hmm",
        &serde_json::json!({ "table": table, "fault_back": faults }),
    )
    .expect("save the table for cargo xtask bench-report");
    println!("saved for the report: {}", saved.display());
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
