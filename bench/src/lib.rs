//! Helpers shared by hetmem's benchmarks: baselines and the ratio table printed after a run.

use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Bytes in one page.
pub const PAGE: usize = 4096;

/// Two page-aligned host buffers and a random pairing of their pages, for memcpy baselines.
pub struct Baseline {
    src: Vec<u8>,
    dst: Vec<u8>,
    block: usize,
    /// `(source block, destination block)` for the scattered case.
    pub pairs: Vec<(usize, usize)>,
}

impl Baseline {
    /// Buffers of `bytes` each, filled, and a random page pairing.
    pub fn new(bytes: usize) -> Baseline {
        Baseline::with_block(bytes, PAGE)
    }

    /// Buffers of `bytes` each, filled, and a random pairing of their `block`-byte blocks.
    pub fn with_block(bytes: usize, block: usize) -> Baseline {
        let src: Vec<u8> = (0..bytes).map(|i| (i * 31 % 251) as u8).collect();
        let dst = vec![1u8; bytes];
        let blocks = bytes / block;
        let mut dsts: Vec<usize> = (0..blocks).collect();
        dsts.shuffle(&mut rand::rngs::StdRng::seed_from_u64(11));
        Baseline {
            src,
            dst,
            block,
            pairs: (0..blocks).zip(dsts).collect(),
        }
    }

    /// One memcpy of the whole buffer.
    pub fn contiguous(&mut self) {
        self.dst.copy_from_slice(&self.src);
        std::hint::black_box(&self.dst);
    }

    /// One memcpy per block, in the scattered pairing.
    pub fn scattered(&mut self) {
        let b = self.block;
        for &(s, d) in &self.pairs {
            self.dst[d * b..(d + 1) * b].copy_from_slice(&self.src[s * b..(s + 1) * b]);
        }
        std::hint::black_box(&self.dst);
    }
}

/// Where criterion keeps its results (`target/criterion`, or under `CARGO_TARGET_DIR`).
fn criterion_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("criterion")
}

/// Saves results measured outside criterion (tables in another shape, latency percentiles)
/// as `target/criterion/hetmem-<name>.json`, beside criterion's own, for
/// `cargo xtask bench-report`; clearing `target/criterion` clears them too.
pub fn save_results(name: &str, value: &serde_json::Value) -> std::io::Result<PathBuf> {
    let dir = criterion_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("hetmem-{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    Ok(path)
}

/// Mean time in nanoseconds of a finished criterion benchmark, from its saved estimates.
pub fn criterion_mean_ns(group: &str, bench: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // The file is small JSON: {"mean":{"confidence_interval":{...},"point_estimate":N,...
    let at = text.find("\"mean\"")?;
    let rest = &text[at..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let num: String = rest[p..]
        .chars()
        .take_while(|c| {
            c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == 'E' || *c == '-' || *c == '+'
        })
        .collect();
    num.parse().ok()
}

/// Prints `name`, GB/s and the ratio to `baseline` for each row `(name, group, bench, baseline bench)`.
pub fn print_ratios(title: &str, bytes: u64, rows: &[(&str, &str, &str, &str)]) {
    println!("\n{title}");
    println!("{:<44} {:>10} {:>12}", "case", "GB/s", "x baseline");
    for &(name, group, bench, base) in rows {
        let (Some(t), Some(b)) = (
            criterion_mean_ns(group, bench),
            criterion_mean_ns(group, base),
        ) else {
            println!("{name:<44} {:>10} {:>12}", "-", "-");
            continue;
        };
        println!("{name:<44} {:>10.2} {:>12.2}", bytes as f64 / t, b / t);
    }
}

/// A wgpu device and a device buffer, used the way a runtime without hetmem would.
pub struct NaiveWgpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    buffer: wgpu::Buffer,
}

impl NaiveWgpu {
    /// A device buffer of `bytes` on the first high-performance adapter, if any.
    pub fn new(bytes: usize) -> Option<NaiveWgpu> {
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
            size: bytes as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        Some(NaiveWgpu {
            device,
            queue,
            buffer,
        })
    }

    /// One `write_buffer` per block of `block` bytes (host block `i` to device slot
    /// `order[i]`), then one submit and wait.
    pub fn upload(&self, host: &[u8], order: &[usize], block: usize) {
        for (i, &slot) in order.iter().enumerate() {
            self.queue.write_buffer(
                &self.buffer,
                (slot * block) as u64,
                &host[i * block..(i + 1) * block],
            );
        }
        self.queue.submit([]);
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .unwrap();
    }

    /// Per block: copy to a mappable buffer, submit, `map_async`, wait, read.
    pub fn download(&self, host: &mut [u8], order: &[usize], block: usize) {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: block as u64,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        for (i, &slot) in order.iter().enumerate() {
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(
                &self.buffer,
                (slot * block) as u64,
                &staging,
                0,
                block as u64,
            );
            self.queue.submit([enc.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., |r| r.expect("map"));
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .unwrap();
            host[i * block..(i + 1) * block]
                .copy_from_slice(&staging.get_mapped_range(..).unwrap());
            staging.unmap();
        }
    }
}
