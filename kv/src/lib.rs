//! The KV-cache offload scenario that `cargo xtask demo` runs, shared with its integration
//! test: blocks larger in total than the device budget; each step prefetches its working set
//! (evicting others), runs a device step that updates its blocks in device memory, and reads
//! a few blocks back on the CPU (faults); every block is then checked against a reference.
//!
//! Where the device runs kernels (Vulkan), the device step is the WGSL kernel
//! `shaders/kv_step.wgsl`, which reaches the blocks through the device page table; on the
//! host device it is the same step as a Rust function over the pinned device pages.

use hetmem::offload::{workgroups, Buffer, Context, Location};
use hetmem::Result;
use hetmem_engine::{Kernel, PAGE_SIZE};
use std::time::{Duration, Instant};

/// The WGSL of the device step.
pub const KV_STEP_WGSL: &str = include_str!("../../shaders/kv_step.wgsl");

/// Sizes of a run.
#[derive(Clone, Copy, Debug)]
pub struct KvShape {
    /// Number of blocks.
    pub blocks: usize,
    /// Bytes per block (a multiple of 4 KiB).
    pub block_bytes: usize,
    /// Blocks per step's working set.
    pub working_set: usize,
    /// Steps.
    pub steps: usize,
}

/// What a run found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvReport {
    /// Blocks whose every word matched the reference.
    pub blocks_ok: usize,
    /// CPU spot checks during the steps that matched.
    pub spot_checks_ok: usize,
    /// CPU spot checks made.
    pub spot_checks: usize,
    /// How the device step ran.
    pub device_step: DeviceStep,
    /// Wall time and traffic of each phase.
    pub phases: KvPhases,
}

/// Wall time and traffic of one phase of a run. A run's phases follow one another on the
/// calling thread, so their wall times add up to the run's (less allocation and the kernel's
/// compilation); the traffic is the context's counters' growth over the phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phase {
    /// Wall time spent in the phase, summed over its steps.
    pub wall: Duration,
    /// Bytes copied host -> device and device -> host.
    pub bytes_moved: u64,
    /// CPU faults served.
    pub faults: u64,
    /// Pages evicted from the device.
    pub evictions: u64,
}

/// The phases of a run, in the order each step runs them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvPhases {
    /// Writing every block's first values from the CPU, before the steps.
    pub fill: Phase,
    /// Moving pages: each step's prefetch of its working set to the device, with the
    /// evictions that make room, until the copies are waited for.
    pub moving: Phase,
    /// The device step over the working set (the kernel's launch and wait, or the host
    /// function).
    pub device_step: Phase,
    /// The CPU's spot-check reads during the steps, with the faults that bring pages home.
    pub cpu_reads: Phase,
    /// Reading every block back at the end and comparing it with the reference.
    pub check: Phase,
}

impl KvPhases {
    /// The phases with their names, in order.
    pub fn named(&self) -> [(&'static str, Phase); 5] {
        [
            ("fill", self.fill),
            ("moving pages", self.moving),
            ("device step", self.device_step),
            ("CPU reads", self.cpu_reads),
            ("final check", self.check),
        ]
    }
}

/// Runs `f` as part of `phase`: adds its wall time and the growth of `ctx`'s counters.
fn timed<T>(ctx: &Context, phase: &mut Phase, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let before = ctx.stats();
    let start = Instant::now();
    let out = f();
    phase.wall += start.elapsed();
    let after = ctx.stats();
    phase.bytes_moved += (after.bytes_to_device + after.bytes_to_host)
        - (before.bytes_to_device + before.bytes_to_host);
    phase.faults += after.faults - before.faults;
    phase.evictions += after.evictions - before.evictions;
    out
}

/// How the device step of a run was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStep {
    /// The WGSL kernel `kv_step`, through the device page table.
    Kernel,
    /// A Rust function over the pinned device pages (devices without kernels).
    HostFunction,
}

impl std::fmt::Display for DeviceStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceStep::Kernel => "WGSL kernel through the device page table",
            DeviceStep::HostFunction => "Rust function over the pinned device pages",
        })
    }
}

/// One step's device work on the blocks `set`, adding `adds[k]` to every word of block
/// `set[k]`.
fn run_step(
    ctx: &Context,
    kernel: Option<&Kernel>,
    blocks: &[Buffer],
    set: &[usize],
    adds: &[u32],
    block_bytes: usize,
) -> Result<()> {
    match kernel {
        Some(k) => {
            let bound: Vec<(&Buffer, std::ops::Range<usize>)> =
                set.iter().map(|&b| (&blocks[b], 0..block_bytes)).collect();
            let pages_per_block = block_bytes.div_ceil(PAGE_SIZE);
            let mut args = vec![pages_per_block as u32];
            args.extend_from_slice(adds);
            // One workgroup per page: a "workgroup" of one invocation per 4 KiB.
            let groups = workgroups(set.len() * pages_per_block * PAGE_SIZE, PAGE_SIZE, 1)?;
            ctx.launch(k, &bound, &args, groups)?.wait()
        }
        None => {
            for (&b, &add) in set.iter().zip(adds) {
                let pin = blocks[b].pin_on_device(0..block_bytes)?;
                device_step(ctx, pin.pfns(), add)?;
            }
            Ok(())
        }
    }
}

/// The value word `i` of block `b` starts with.
fn initial(b: usize, i: usize) -> u32 {
    (b as u32).wrapping_mul(1_000_003).wrapping_add(i as u32)
}

/// The working set of `step`: a window that slides by a third of its size each step.
pub fn working_set(step: usize, s: &KvShape) -> Vec<usize> {
    let start = step * s.working_set.div_ceil(3);
    (0..s.working_set).map(|k| (start + k) % s.blocks).collect()
}

/// The device step on one block: every word += `add`, in the device's memory.
fn device_step(ctx: &Context, pfns: &[hetmem_engine::Pfn], add: u32) -> Result<()> {
    let dev = ctx.driver().device();
    let mut page = vec![0u8; PAGE_SIZE];
    for &pfn in pfns {
        dev.read_page(pfn, 0, &mut page)?;
        for w in page.chunks_exact_mut(4) {
            let v = u32::from_le_bytes(w.try_into().expect("4 bytes")).wrapping_add(add);
            w.copy_from_slice(&v.to_le_bytes());
        }
        dev.write_page(pfn, 0, &page)?;
    }
    Ok(())
}

fn fill(buf: &Buffer, b: usize) -> Result<()> {
    let mut bytes = Vec::with_capacity(buf.len());
    for i in 0..buf.len() / 4 {
        bytes.extend_from_slice(&initial(b, i).to_le_bytes());
    }
    buf.write(0, &bytes)
}

fn matches(buf: &Buffer, b: usize, added: u32) -> Result<bool> {
    let mut bytes = vec![0u8; buf.len()];
    buf.read(0, &mut bytes)?;
    Ok(bytes.chunks_exact(4).enumerate().all(|(i, w)| {
        u32::from_le_bytes(w.try_into().expect("4 bytes")) == initial(b, i).wrapping_add(added)
    }))
}

/// Runs the scenario on `ctx`; `on_step` is called after each step (for progress).
pub fn run_kv(ctx: &Context, s: KvShape, mut on_step: impl FnMut(usize)) -> Result<KvReport> {
    let blocks: Vec<Buffer> = (0..s.blocks)
        .map(|_| ctx.alloc(s.block_bytes))
        .collect::<Result<_>>()?;
    let mut phases = KvPhases::default();
    timed(ctx, &mut phases.fill, || {
        blocks
            .iter()
            .enumerate()
            .try_for_each(|(b, buf)| fill(buf, b))
    })?;
    let mut added = vec![0u32; s.blocks];
    let kernel = match ctx.kernel_support() {
        Ok(()) => Some(ctx.compile_kernel(KV_STEP_WGSL, "kv_step")?),
        Err(e) => {
            tracing::info!("device step on the host: {e}");
            None
        }
    };
    let mut report = KvReport {
        blocks_ok: 0,
        spot_checks_ok: 0,
        spot_checks: 0,
        device_step: if kernel.is_some() {
            DeviceStep::Kernel
        } else {
            DeviceStep::HostFunction
        },
        phases: KvPhases::default(),
    };
    for step in 0..s.steps {
        let set = working_set(step, &s);
        timed(ctx, &mut phases.moving, || {
            let tickets: Vec<_> = set
                .iter()
                .map(|&b| blocks[b].prefetch(0..s.block_bytes, Location::Device))
                .collect::<Result<_>>()?;
            tickets.into_iter().try_for_each(|t| t.wait().map(drop))
        })?;
        let adds: Vec<u32> = set
            .iter()
            .map(|&b| (step as u32 + 1).wrapping_mul(b as u32 + 1))
            .collect();
        timed(ctx, &mut phases.device_step, || {
            run_step(ctx, kernel.as_ref(), &blocks, &set, &adds, s.block_bytes)
        })?;
        for (&b, &add) in set.iter().zip(&adds) {
            added[b] = added[b].wrapping_add(add);
        }
        timed(ctx, &mut phases.cpu_reads, || {
            for &b in set.iter().step_by(4) {
                let mut w = [0u8; 4];
                blocks[b].read(s.block_bytes / 2, &mut w)?;
                report.spot_checks += 1;
                if u32::from_le_bytes(w) == initial(b, s.block_bytes / 8).wrapping_add(added[b]) {
                    report.spot_checks_ok += 1;
                }
            }
            Ok(())
        })?;
        on_step(step);
    }
    timed(ctx, &mut phases.check, || {
        for (b, buf) in blocks.iter().enumerate() {
            if matches(buf, b, added[b])? {
                report.blocks_ok += 1;
            }
        }
        Ok(())
    })?;
    report.phases = phases;
    Ok(report)
}
