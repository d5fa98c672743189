//! hetmem's batched copy beside what a runtime would otherwise write, on 16 MiB of scattered
//! 4 KiB blocks (4 096 blocks), in the same run:
//! - memcpy of the same blocks (the physical limit on a CPU device);
//! - a per-block loop: one copy and one submission per block (vLLM's per-block swap);
//! - the naive wgpu path: `queue.write_buffer` per block up, `map_async` per block down;
//! - hetmem: the whole batch in one submission.

use std::time::Duration;

use criterion::{criterion_group, Criterion, Throughput};
use hetmem_bench::{print_ratios, Baseline, PAGE};
use hetmem_engine::{Device, DeviceConfig, Pfn};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const BLOCKS: usize = 4096;
const GROUP: &str = "blocks_16MiB";

/// A wgpu device and a device buffer, used the way a runtime without hetmem would.
struct NaiveWgpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    buffer: wgpu::Buffer,
}

impl NaiveWgpu {
    fn new() -> Option<NaiveWgpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .ok()?;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: None,
            required_features: wgpu::Features::empty(),
            required_limits: adapter.limits(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .ok()?;
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (BLOCKS * PAGE) as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(NaiveWgpu {
            device,
            queue,
            buffer,
        })
    }

    /// One `write_buffer` per block, then one submit and wait.
    fn upload(&self, host: &[u8], order: &[usize]) {
        for (i, &slot) in order.iter().enumerate() {
            self.queue.write_buffer(
                &self.buffer,
                (slot * PAGE) as u64,
                &host[i * PAGE..(i + 1) * PAGE],
            );
        }
        self.queue.submit([]);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
    }

    /// Per block: copy to a mappable buffer, submit, `map_async`, wait, read.
    fn download(&self, host: &mut [u8], order: &[usize]) {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: PAGE as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        for (i, &slot) in order.iter().enumerate() {
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&self.buffer, (slot * PAGE) as u64, &staging, 0, PAGE as u64);
            self.queue.submit([enc.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .unwrap();
            host[i * PAGE..(i + 1) * PAGE].copy_from_slice(&staging.get_mapped_range(..).unwrap());
            staging.unmap();
        }
    }
}

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
    if let Some(naive) = NaiveWgpu::new() {
        let mut host = vec![3u8; BLOCKS * PAGE];
        g.bench_function("wgpu_naive_up", |b| b.iter(|| naive.upload(&host, &order)));
        g.bench_function("wgpu_naive_down", |b| {
            b.iter(|| naive.download(&mut host, &order))
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
