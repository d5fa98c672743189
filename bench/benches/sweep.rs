//! The size sweep: host -> device, device -> host and round trip, 64 KiB to 1 GiB, as one
//! contiguous run and as scattered 4 KiB / 16 KiB / 64 KiB blocks, in the same run:
//! - `memcpy`: the same blocks copied by the CPU (the physical limit on a CPU device);
//! - `wgpu_naive`: `queue.write_buffer` per block up, `map_async` per block down;
//! - `per_block_loop`: one copy and one submission per block;
//! - `hetmem_batch`: the engine's batched copy of every block at once;
//! - `hetmem_migrate` and `hetmem_prefetch` (contiguous runs): `migrate_vma_*` through
//!   GpuDriver, and the offload API's `prefetch`, pages of a virtual range.
//!
//! Groups are named `sweep_<direction>_<layout>_<size>`. `HETMEM_SWEEP_MAX` (bytes, default
//! 1 GiB under `cargo bench`, 1 MiB when `cargo test` runs the bench once) caps the sizes; `HETMEM_SWEEP_SLOW_MAX` (default 16 MiB) caps the sizes at which
//! the per-block paths run (a per-block loop over 1 GiB of 4 KiB blocks is 262 144 waits),
//! except for the 256 MiB round trip in 4 KiB blocks, which the project's targets use.

use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkGroup, Criterion, Throughput};
use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{AddressSpace, MemoryKind, PageMap, Prot, PAGE as VPAGE};
use hetmem::offload::{Context, ContextConfig, Location};
use hetmem_bench::{Baseline, NaiveWgpu, PAGE};
use hetmem_engine::{Device, DeviceConfig, Pfn};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const SIZES: [usize; 5] = [64 * KIB, MIB, 16 * MIB, 256 * MIB, 1024 * MIB];
/// Block size of each layout; 0 is one contiguous run.
const LAYOUTS: [(usize, &str); 4] = [
    (0, "contig"),
    (4 * KIB, "blk4k"),
    (16 * KIB, "blk16k"),
    (64 * KIB, "blk64k"),
];
const DIRECTIONS: [&str; 3] = ["up", "down", "round"];
/// The size of the round trip the project's targets are stated for.
const TARGET_BYTES: usize = 256 * MIB;

fn env_bytes(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn size_name(bytes: usize) -> String {
    if bytes >= MIB {
        format!("{}MiB", bytes / MIB)
    } else {
        format!("{}KiB", bytes / KIB)
    }
}

/// Host frames and device pages of one size, paired block by block in `order`.
struct Pairs {
    up: Vec<(Pfn, Pfn)>,
    down: Vec<(Pfn, Pfn)>,
    /// Pages per block (the contiguous layout is one block).
    block_pages: usize,
}

fn pairs(frames: &[Pfn], pages: &[Pfn], block: usize) -> Pairs {
    let n = frames.len();
    let block_pages = if block == 0 { n } else { block / PAGE };
    let mut blocks: Vec<&[Pfn]> = pages.chunks(block_pages).collect();
    if block != 0 {
        blocks.shuffle(&mut rand::rngs::StdRng::seed_from_u64(7));
    }
    let dst: Vec<Pfn> = blocks.concat();
    let up: Vec<(Pfn, Pfn)> = frames.iter().copied().zip(dst).collect();
    let down = up.iter().map(|&(f, p)| (p, f)).collect();
    Pairs {
        up,
        down,
        block_pages,
    }
}

fn configure(g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>, bytes: usize) {
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(if bytes >= 256 * MIB {
            3000
        } else {
            1000
        }))
        .throughput(Throughput::Bytes(bytes as u64));
}

/// Long: one case per size, layout and direction, in nested loops that share what each level
/// sets up (the device and its frames per size, the pairs and baseline per layout); split,
/// each part would take most of them as arguments.
fn sweep(c: &mut Criterion) {
    // `cargo bench` passes `--bench`; `cargo test` runs each case once as a smoke test, at
    // the smallest sizes only.
    let measuring = std::env::args().any(|a| a == "--bench");
    let max = env_bytes("HETMEM_SWEEP_MAX", if measuring { 1024 * MIB } else { MIB });
    let slow_max = env_bytes("HETMEM_SWEEP_SLOW_MAX", 16 * MIB);
    for bytes in SIZES.into_iter().filter(|&b| b <= max) {
        let n = bytes / PAGE;
        let dev = Device::open(DeviceConfig::from_env().unwrap().budget(bytes as u64)).unwrap();
        let frames = dev.frames().alloc_batch(n, false).unwrap();
        let pages = dev.alloc_pages(n, false).unwrap();
        let naive = if bytes <= slow_max || bytes == TARGET_BYTES {
            NaiveWgpu::new(bytes)
        } else {
            None
        };
        for (block, layout) in LAYOUTS {
            let p = pairs(&frames, &pages, block);
            let mut base = Baseline::with_block(bytes, if block == 0 { bytes } else { block });
            let order: Vec<usize> = base.pairs.iter().map(|p| p.1).collect();
            let blk = if block == 0 { bytes } else { block };
            let mut host = vec![3u8; bytes];
            for dir in DIRECTIONS {
                let name = format!("sweep_{dir}_{layout}_{}", size_name(bytes));
                let mut g = c.benchmark_group(&name);
                let moved = if dir == "round" { 2 * bytes } else { bytes };
                configure(&mut g, moved);
                g.bench_function("memcpy", |b| {
                    b.iter(|| {
                        for _ in 0..(moved / bytes) {
                            if block == 0 {
                                base.contiguous();
                            } else {
                                base.scattered();
                            }
                        }
                    })
                });
                let batches: Vec<&[(Pfn, Pfn)]> = match dir {
                    "up" => vec![&p.up],
                    "down" => vec![&p.down],
                    _ => vec![&p.up, &p.down],
                };
                g.bench_function("hetmem_batch", |b| {
                    b.iter(|| {
                        for batch in &batches {
                            dev.copy(batch).unwrap().wait().unwrap();
                        }
                    })
                });
                // The targets compare the 256 MiB round trip with the per-block paths in
                // 4 KiB blocks, so that case runs whatever the cap.
                let target_case = dir == "round" && block == 4 * KIB && bytes == TARGET_BYTES;
                if bytes <= slow_max || target_case {
                    g.bench_function("per_block_loop", |b| {
                        b.iter(|| {
                            for batch in &batches {
                                for blockpairs in batch.chunks(p.block_pages) {
                                    dev.copy(blockpairs).unwrap().wait().unwrap();
                                }
                            }
                        })
                    });
                    if let Some(w) = &naive {
                        g.bench_function("wgpu_naive", |b| {
                            b.iter(|| {
                                if dir != "down" {
                                    w.upload(&host, &order, blk);
                                }
                                if dir != "up" {
                                    w.download(&mut host, &order, blk);
                                }
                            })
                        });
                    }
                }
                if block == 0 {
                    migrations(&mut g, dir, bytes);
                }
                g.finish();
            }
        }
        dev.free_pages(&pages).unwrap();
        dev.frames().free_batch(&frames).unwrap();
    }
}

/// `hetmem_migrate` and `hetmem_prefetch` of `bytes` of a virtual range, in direction `dir`;
/// the way back of a one-way case is not timed.
fn migrations(
    g: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    dir: &str,
    bytes: usize,
) {
    let n = bytes / PAGE;
    let (time_up, time_down) = (dir != "down", dir != "up");
    {
        let dev = Device::open(DeviceConfig::from_env().unwrap().budget(bytes as u64)).unwrap();
        let pm = PageMap::new(dev.frames().clone()).unwrap();
        let cfg = DriverConfig {
            kind: Some(MemoryKind::DevicePrivate),
            ..DriverConfig::default()
        };
        let d = GpuDriver::new(dev, &pm, cfg).unwrap();
        let space = AddressSpace::new(&pm);
        let a = space.mmap(None, bytes as u64, Prot::RW, false).unwrap();
        for k in 0..n as u64 {
            space.write(a + k * VPAGE, &[k as u8]).unwrap();
        }
        g.bench_function("hetmem_migrate", |b| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = Instant::now();
                    d.migrate_to_device(&space, a, n).unwrap();
                    let t1 = Instant::now();
                    d.migrate_to_host(&space, a, n).unwrap();
                    let t2 = Instant::now();
                    t += if time_up { t1 - t0 } else { Duration::ZERO }
                        + if time_down { t2 - t1 } else { Duration::ZERO };
                }
                t
            })
        });
    }
    let ctx = Context::new(ContextConfig {
        device: DeviceConfig::from_env().unwrap(),
        budget_bytes: bytes as u64,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around: 16,
    })
    .unwrap();
    let buf = ctx.alloc(bytes).unwrap();
    buf.write(0, &vec![5u8; bytes]).unwrap();
    g.bench_function("hetmem_prefetch", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let t0 = Instant::now();
                buf.prefetch(0..bytes, Location::Device)
                    .unwrap()
                    .wait()
                    .unwrap();
                let t1 = Instant::now();
                buf.prefetch(0..bytes, Location::Host)
                    .unwrap()
                    .wait()
                    .unwrap();
                let t2 = Instant::now();
                t += if time_up { t1 - t0 } else { Duration::ZERO }
                    + if time_down { t2 - t1 } else { Duration::ZERO };
            }
            t
        })
    });
}

criterion_group!(benches, sweep);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    println!(
        "\nratios to memcpy of the same bytes: `cargo xtask bench-report` (sweep tables and plots)"
    );
}
