//! hetmem's batched copy beside what a runtime would otherwise write, on 16 MiB of scattered
//! 4 KiB blocks (4 096 blocks), in the same run:
//! - memcpy of the same blocks (the physical limit on a CPU device);
//! - a per-block loop: one copy and one submission per block (vLLM's per-block swap);
//! - the naive wgpu path: `queue.write_buffer` per block up, `map_async` per block down;
//! - hetmem: the whole batch in one submission.

use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use hetmem_bench::{print_ratios, Baseline, NaiveWgpu, PAGE};
use hetmem_engine::{Device, DeviceConfig, Pfn};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const BLOCKS: usize = 4096;
const GROUP: &str = "blocks_16MiB";

fn bench_peers(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .throughput(Throughput::Bytes((BLOCKS * PAGE) as u64));
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(3));

    let mut base = Baseline::new(BLOCKS * PAGE);
    g.bench_function("memcpy_scattered", |b| b.iter(|| base.scattered()));
    let order: Vec<usize> = base.pairs.iter().map(|p| p.1).collect();
    drop(base);

    let dev = Device::open(DeviceConfig::from_env().unwrap().budget(64 << 20)).unwrap();
    eprintln!("device: {} ({:?})", dev.info().name, dev.info().kind);
    let frames = dev.frames().alloc_batch(BLOCKS, false).unwrap();
    let mut pages = dev.alloc_pages(BLOCKS, false).unwrap();
    pages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(4));
    let up: Vec<(Pfn, Pfn)> = frames.iter().copied().zip(pages.iter().copied()).collect();
    let down: Vec<(Pfn, Pfn)> = up.iter().map(|&(f, p)| (p, f)).collect();
    g.bench_function("hetmem_batched_up", |b| {
        b.iter(|| dev.copy(&up).unwrap().wait().unwrap())
    });
    g.bench_function("hetmem_batched_down", |b| {
        b.iter(|| dev.copy(&down).unwrap().wait().unwrap())
    });
    g.bench_function("per_block_loop_up", |b| {
        b.iter(|| {
            for p in &up {
                dev.copy(std::slice::from_ref(p)).unwrap().wait().unwrap();
            }
        })
    });
    g.bench_function("per_block_loop_down", |b| {
        b.iter(|| {
            for p in &down {
                dev.copy(std::slice::from_ref(p)).unwrap().wait().unwrap();
            }
        })
    });
    if let Some(naive) = NaiveWgpu::new(BLOCKS * PAGE) {
        let mut host = vec![3u8; BLOCKS * PAGE];
        g.bench_function("wgpu_naive_up", |b| {
            b.iter(|| naive.upload(&host, &order, PAGE))
        });
        g.bench_function("wgpu_naive_down", |b| {
            b.iter(|| naive.download(&mut host, &order, PAGE))
        });
    } else {
        eprintln!("no wgpu adapter: the naive wgpu baseline is left out");
    }
    g.finish();
    dev.free_pages(&pages).unwrap();
    dev.frames().free_batch(&frames).unwrap();
}

criterion_group!(benches, bench_peers);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    print_ratios(
        "4 096 scattered 4 KiB blocks (16 MiB), ratio to memcpy of the same blocks (same run)",
        (BLOCKS * PAGE) as u64,
        &[
            (
                "hetmem, one batch, up",
                GROUP,
                "hetmem_batched_up",
                "memcpy_scattered",
            ),
            (
                "hetmem, one batch, down",
                GROUP,
                "hetmem_batched_down",
                "memcpy_scattered",
            ),
            (
                "per-block loop, up",
                GROUP,
                "per_block_loop_up",
                "memcpy_scattered",
            ),
            (
                "per-block loop, down",
                GROUP,
                "per_block_loop_down",
                "memcpy_scattered",
            ),
            ("naive wgpu, up", GROUP, "wgpu_naive_up", "memcpy_scattered"),
            (
                "naive wgpu, down",
                GROUP,
                "wgpu_naive_down",
                "memcpy_scattered",
            ),
        ],
    );
}
