//! The Vulkan backend (ash + gpu-allocator): device chunks, host frames imported in place (or
//! a staging path), region copies on a transfer queue, completion on timeline semaphores.

mod context;
mod conv;
mod deferred;
mod gather;
mod instance;
mod launch;
mod memory;
mod pipeline;
mod record;

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ash::vk;
use gpu_allocator::vulkan::{Allocator, AllocatorCreateDesc};
use gpu_allocator::{AllocationSizes, AllocatorDebugSettings, MemoryLocation};
use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, Submitted, FIXED_BINDINGS};
use crate::config::{
    DeviceConfig, DeviceInfo, DeviceKind, DeviceType, GatherMode, HostAccess, HostAccessMode,
};
use crate::copy::{CopyPlan, Location, MemoryId};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::inspect::KernelLimits;
use crate::pfn::PAGE_SIZE;
use crate::retire::Retirement;
use context::{Context, Queue};
use deferred::{Doomed, Graveyard, Tracked};
use memory::Buffer;
use pipeline::Pipeline;

/// Staging buffers kept for reuse after their batch completes.
const STAGING_CACHE: usize = 4;

/// Opens the Vulkan device `config` selects.
pub(crate) fn open(
    config: &DeviceConfig,
    frames: &Arc<HostFramePool>,
    why: &str,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    let inst = instance::Instance::new()?;
    let adapters = inst.adapters()?;
    let (adapter, reason) = instance::choose(&adapters, config.adapter.as_deref())?;
    let import = config.host_access == HostAccessMode::Auto;
    let ctx = Context::new(inst, &adapter, import)?;
    let host_access = if ctx.host_memory.is_some() {
        HostAccess::Import
    } else {
        HostAccess::Staging
    };
    let allocator = Allocator::new(&AllocatorCreateDesc {
        instance: ctx.instance.instance.clone(),
        device: ctx.device.clone(),
        physical_device: ctx.physical,
        debug_settings: AllocatorDebugSettings::default(),
        buffer_device_address: false,
        allocation_sizes: AllocationSizes::default(),
    })
    .map_err(|e| EngineError::Vulkan(format!("gpu-allocator: {e}")))?;
    let host_visible_memory = {
        let mp = &ctx.memory_properties;
        let want = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let local = mp.memory_types[..mp.memory_type_count as usize]
            .iter()
            .filter(|t| {
                t.property_flags
                    .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
            });
        local.clone().count() > 0 && local.clone().all(|t| t.property_flags.contains(want))
    };
    let info = DeviceInfo {
        kind: DeviceKind::Vulkan,
        name: adapter.name.clone(),
        device_type: adapter.device_type,
        reason: format!("{why}: {reason}"),
        host_access,
        dedicated_transfer_queue: ctx.compute.is_some(),
        host_visible_memory,
    };
    let gather = match config.gather {
        GatherMode::Never => None,
        _ => match gather::Gather::new(&ctx) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!("gather kernel unavailable, copying regions only: {e}");
                None
            }
        },
    };
    let cpu_device = adapter.device_type == DeviceType::Cpu;
    let backend = VulkanBackend {
        cpu_device,
        cpu_assist: cpu_device
            && host_access == HostAccess::Import
            && host_visible_memory
            && config.cpu_assist,
        gather,
        gather_mode: config.gather,
        frames: frames.clone(),
        allocator: Mutex::new(Some(allocator)),
        chunks: RwLock::new(Vec::new()),
        imports: RwLock::new((0..frames.segments()).map(|_| None).collect()),
        staging: Mutex::new(Vec::new()),
        in_flight: [Retirement::default(), Retirement::default()],
        kernels: Mutex::new(HashMap::new()),
        tables: Mutex::new(HashMap::new()),
        graveyard: Graveyard::default(),
        next_id: AtomicU64::new(1),
        host_access,
        ctx,
    };
    Ok((info, Box::new(backend)))
}

/// Work that runs on the host once a batch's copies have completed.
pub(crate) struct Readback {
    /// Index into the batch's staging buffers.
    pub(crate) staging: usize,
    pub(crate) staging_offset: u64,
    pub(crate) dst: Location,
    pub(crate) size: u64,
}

/// A submitted batch and what it holds until it completes.
struct InFlight {
    cb: vk::CommandBuffer,
    held: Held,
}

/// What a recorded batch holds until it retires, besides its command buffer.
#[derive(Default)]
pub(crate) struct Held {
    pub(crate) staging: Vec<Buffer>,
    pub(crate) readbacks: Vec<Readback>,
    pub(crate) descriptors: Option<vk::DescriptorPool>,
}

pub(crate) struct VulkanBackend {
    pub(crate) frames: Arc<HostFramePool>,
    allocator: Mutex<Option<Allocator>>,
    chunks: RwLock<Vec<Option<Buffer>>>,
    imports: RwLock<Vec<Option<Buffer>>>,
    staging: Mutex<Vec<Buffer>>,
    /// Batches in submission order, per queue (0: transfer, 1: compute).
    in_flight: [Retirement<InFlight>; 2],
    /// User kernels by id, with their last use.
    kernels: Mutex<HashMap<u64, Tracked<Pipeline>>>,
    /// Page tables by id, with their last use.
    tables: Mutex<HashMap<u64, Tracked<Buffer>>>,
    /// Objects let go of while the device may still use them.
    graveyard: Graveyard,
    next_id: AtomicU64,
    host_access: HostAccess,
    gather: Option<gather::Gather>,
    gather_mode: GatherMode,
    /// The device is a CPU (lavapipe).
    cpu_device: bool,
    /// Split batches between the queue and the calling thread (CPU device, all memory mapped).
    cpu_assist: bool,
    ctx: Context,
}

/// Ticket values carry the queue in their top bit.
const QUEUE_BIT: u64 = 1 << 63;

impl VulkanBackend {
    fn queue(&self, index: usize) -> &Queue {
        if index == 0 {
            &self.ctx.transfer
        } else {
            self.ctx.compute_queue()
        }
    }

    /// The buffer holding `memory`, importing a frame segment on first use.
    fn buffer_of(&self, memory: MemoryId) -> Result<vk::Buffer> {
        Ok(self.bound_of(memory)?.0)
    }

    /// The buffer holding `memory` and its size in bytes.
    fn bound_of(&self, memory: MemoryId) -> Result<(vk::Buffer, u64)> {
        match memory {
            MemoryId::Chunk(c) => self
                .chunks
                .read()
                .get(c as usize)
                .and_then(Option::as_ref)
                .map(|b| (b.buffer, b.size))
                .ok_or_else(|| EngineError::DeviceLost(format!("chunk {c} does not exist"))),
            MemoryId::Frames(s) => {
                let s = s as usize;
                if let Some(b) = &self.imports.read()[s] {
                    return Ok((b.buffer, b.size));
                }
                let mut imports = self.imports.write();
                if imports[s].is_none() {
                    let (ptr, len) = self.frames.segment(s);
                    imports[s] = Some(memory::import_host(&self.ctx, ptr, len)?);
                }
                let b = imports[s].as_ref().expect("imported above");
                Ok((b.buffer, b.size))
            }
        }
    }

    /// A staging buffer of at least `size` bytes, mapped and coherent.
    fn staging_buffer(&self, size: u64) -> Result<Buffer> {
        {
            let mut cache = self.staging.lock();
            if let Some(i) = cache.iter().position(|b| b.size >= size) {
                return Ok(cache.swap_remove(i));
            }
        }
        let mut guard = self.allocator.lock();
        let allocator = guard.as_mut().expect("allocator lives until drop");
        let b = memory::allocate(
            &self.ctx,
            allocator,
            size.max(1 << 20),
            MemoryLocation::GpuToCpu,
            "hetmem staging",
        )?;
        if b.host_ptr(0).is_none() {
            memory::destroy(&self.ctx, allocator, b);
            return Err(EngineError::Vulkan(
                "no host-coherent memory for staging".into(),
            ));
        }
        Ok(b)
    }

    fn release_staging(&self, bufs: Vec<Buffer>) {
        let mut cache = self.staging.lock();
        for b in bufs {
            if cache.len() < STAGING_CACHE {
                cache.push(b);
            } else {
                let mut guard = self.allocator.lock();
                memory::destroy(
                    &self.ctx,
                    guard.as_mut().expect("allocator lives until drop"),
                    b,
                );
            }
        }
    }

    /// Submits a recorded command buffer on queue `q` and tracks it until completion.
    fn submit_recorded(&self, q: usize, cb: vk::CommandBuffer, held: Held) -> Result<u64> {
        let batch = InFlight { cb, held };
        match self.in_flight[q].submit(batch, || self.queue(q).submit(&self.ctx.device, cb)) {
            Ok(value) => Ok(value | if q == 1 { QUEUE_BIT } else { 0 }),
            Err((e, batch)) => {
                self.abandon(q, batch.cb, batch.held);
                Err(e)
            }
        }
    }

    /// Gives back what a batch that was never submitted holds.
    pub(crate) fn abandon(&self, q: usize, cb: vk::CommandBuffer, held: Held) {
        self.queue(q).recycle(&self.ctx.device, cb);
        self.release_staging(held.staging);
        if let Some(pool) = held.descriptors {
            // SAFETY: the batch was never submitted, so nothing uses the pool's sets.
            unsafe { self.ctx.device.destroy_descriptor_pool(pool, None) };
        }
    }

    /// Finishes every batch of queue `q` up to timeline value `upto`: host readbacks, then
    /// recycling of command buffers and staging.
    fn retire(&self, q: usize, upto: u64) {
        self.in_flight[q].retire(upto, |_, b| {
            for r in &b.held.readbacks {
                let src = b.held.staging[r.staging]
                    .host_ptr(r.staging_offset)
                    .expect("staging is mapped");
                // SAFETY: the copy into staging completed (timeline passed); the destination
                // frames were resolved as allocated when the batch was planned.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src,
                        self.frames.location_ptr(r.dst),
                        r.size as usize,
                    )
                };
            }
            self.queue(q).recycle(&self.ctx.device, b.cb);
            self.release_staging(b.held.staging);
            if let Some(pool) = b.held.descriptors {
                // SAFETY: the batch completed, so its descriptor sets are no longer in use.
                unsafe { self.ctx.device.destroy_descriptor_pool(pool, None) };
            }
        });
        self.collect(false);
    }

    /// Records with `record` on the transfer queue, submits and waits.
    fn run_now(&self, record: impl FnOnce(vk::CommandBuffer) -> Result<()>) -> Result<()> {
        let cb = self.ctx.transfer.command_buffer(&self.ctx.device)?;
        let recorded = record::begin(&self.ctx, cb)
            .and_then(|_| record(cb))
            .and_then(|_| record::end(&self.ctx, cb));
        if let Err(e) = recorded {
            self.ctx.transfer.recycle(&self.ctx.device, cb);
            return Err(e);
        }
        let v = self.submit_recorded(0, cb, Held::default())?;
        self.wait(v)
    }

    /// The host address of any location, when its memory is mapped.
    fn host_ptr(&self, at: Location) -> Option<*mut u8> {
        match at.memory {
            MemoryId::Frames(_) => Some(self.frames.location_ptr(at)),
            MemoryId::Chunk(_) => self.chunk_host_ptr(at),
        }
    }

    fn chunk_host_ptr(&self, at: Location) -> Option<*mut u8> {
        let MemoryId::Chunk(c) = at.memory else {
            return None;
        };
        self.chunks
            .read()
            .get(c as usize)?
            .as_ref()?
            .host_ptr(at.offset)
    }

    fn copy_through_staging(
        &self,
        at: Location,
        len: usize,
        to_device: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> Result<()> {
        let chunk = self.buffer_of(at.memory)?;
        let staging = self.staging_buffer(len as u64)?;
        let sp = staging.host_ptr(0).expect("staging is mapped");
        if let Some(data) = to_device {
            // SAFETY: the staging buffer holds at least `len` bytes and is ours alone.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), sp, len) };
        }
        let (src, dst, so, doff) = if to_device.is_some() {
            (staging.buffer, chunk, 0, at.offset)
        } else {
            (chunk, staging.buffer, at.offset, 0)
        };
        let r = self.run_now(|cb| {
            let region = [vk::BufferCopy {
                src_offset: so,
                dst_offset: doff,
                size: len as u64,
            }];
            // SAFETY: both buffers are live and the region lies inside each.
            unsafe { self.ctx.device.cmd_copy_buffer(cb, src, dst, &region) };
            Ok(())
        });
        if let (Ok(()), Some(out)) = (&r, out) {
            // SAFETY: the copy completed; the staging buffer holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(sp, out.as_mut_ptr(), len) };
        }
        self.release_staging(vec![staging]);
        r
    }
}

impl Backend for VulkanBackend {
    fn alloc_chunk(&self, index: usize, bytes: u64) -> Result<()> {
        let buf = {
            let mut guard = self.allocator.lock();
            memory::allocate(
                &self.ctx,
                guard.as_mut().expect("allocator lives until drop"),
                bytes,
                MemoryLocation::GpuOnly,
                "hetmem chunk",
            )?
        };
        let handle = buf.buffer;
        {
            let mut chunks = self.chunks.write();
            if chunks.len() <= index {
                chunks.resize_with(index + 1, || None);
            }
            chunks[index] = Some(buf);
        }
        // Zero the chunk once: fresh pages read as zeros and the first copy does not fault.
        let zeroed = self.run_now(|cb| {
            // SAFETY: the buffer is live and the fill covers it exactly.
            unsafe {
                self.ctx
                    .device
                    .cmd_fill_buffer(cb, handle, 0, vk::WHOLE_SIZE, 0)
            };
            Ok(())
        });
        if zeroed.is_err() {
            self.free_chunk(index);
        }
        zeroed
    }

    fn free_chunk(&self, index: usize) {
        let mut chunks = self.chunks.write();
        if let Some(b) = chunks.get_mut(index).and_then(Option::take) {
            // Any submission so far may use the chunk; those still recording hold the chunks'
            // lock until they have submitted, so the values read here cover them.
            self.graveyard
                .bury(Doomed::Buffer(b), deferred::submitted(&self.ctx));
        }
        drop(chunks);
        self.collect(false);
    }

    fn submit(&self, plan: &CopyPlan, queue_only: bool) -> Result<Submitted> {
        record::submit_plan(self, plan, queue_only)
    }

    fn poll(&self, value: u64) -> Result<bool> {
        let q = usize::from(value & QUEUE_BIT != 0);
        let v = value & !QUEUE_BIT;
        let done = self.queue(q).completed(&self.ctx.device)?;
        if done >= v {
            self.retire(q, done);
        }
        Ok(done >= v)
    }

    fn wait(&self, value: u64) -> Result<()> {
        let q = usize::from(value & QUEUE_BIT != 0);
        let v = value & !QUEUE_BIT;
        self.queue(q).wait(&self.ctx.device, v)?;
        self.retire(q, v);
        Ok(())
    }

    fn zero_pages(&self, pages: &[Location]) -> Result<()> {
        let mut runs: Vec<(MemoryId, u64, u64)> = Vec::new();
        for at in pages {
            match runs.last_mut() {
                Some((m, o, len)) if *m == at.memory && *o + *len == at.offset => {
                    *len += PAGE_SIZE as u64
                }
                _ => runs.push((at.memory, at.offset, PAGE_SIZE as u64)),
            }
        }
        let bufs = runs
            .iter()
            .map(|r| self.buffer_of(r.0))
            .collect::<Result<Vec<_>>>()?;
        self.run_now(|cb| {
            for (r, b) in runs.iter().zip(bufs) {
                // SAFETY: the buffer is live and the run lies inside it.
                unsafe { self.ctx.device.cmd_fill_buffer(cb, b, r.1, r.2, 0) };
            }
            Ok(())
        })
    }

    fn read(&self, at: Location, out: &mut [u8]) -> Result<()> {
        if let Some(p) = self.chunk_host_ptr(at) {
            // SAFETY: the span lies inside one allocated page of a coherent mapping.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        let len = out.len();
        self.copy_through_staging(at, len, None, Some(out))
    }

    fn write(&self, at: Location, data: &[u8]) -> Result<()> {
        if let Some(p) = self.chunk_host_ptr(at) {
            // SAFETY: the span lies inside one allocated page of a coherent mapping.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
            return Ok(());
        }
        self.copy_through_staging(at, data.len(), Some(data), None)
    }

    fn kernel_limits(&self) -> Result<KernelLimits> {
        let l = &self.ctx.limits;
        let per_stage = l
            .max_per_stage_descriptor_storage_buffers
            .min(l.max_descriptor_set_storage_buffers)
            .min(l.max_per_stage_resources);
        Ok(KernelLimits {
            max_chunks: per_stage.saturating_sub(FIXED_BINDINGS),
            max_binding_bytes: u64::from(l.max_storage_buffer_range),
            workgroup_memory: u64::from(l.max_compute_shared_memory_size),
            workgroup_size: l.max_compute_work_group_size,
            workgroup_invocations: l.max_compute_work_group_invocations,
        })
    }

    fn create_kernel(&self, spirv: &[u32], entry: &str, chunks: u32) -> Result<u64> {
        self.create_kernel_pipeline(spirv, entry, chunks)
    }

    fn destroy_kernel(&self, id: u64) {
        self.bury_kernel(id);
    }

    fn alloc_table(&self, words: usize) -> Result<(u64, NonNull<u32>)> {
        self.alloc_table_buffer(words)
    }

    fn free_table(&self, id: u64) {
        self.bury_table(id);
    }

    fn dispatch(
        &self,
        kernel: u64,
        table: u64,
        chunks: u32,
        meta: &[u32],
        groups: [u32; 3],
    ) -> Result<u64> {
        self.dispatch_kernel(kernel, table, chunks, meta, groups)
    }

    fn deferred_destroys(&self) -> usize {
        self.graveyard.len()
    }
}

impl Drop for VulkanBackend {
    fn drop(&mut self) {
        // After idle no submission uses any object; everything is destroyed before the
        // context (a later field) destroys the device.
        self.ctx.wait_idle();
        for q in 0..2 {
            self.retire(q, u64::MAX);
        }
        self.collect(true);
        if let Some(g) = &self.gather {
            g.destroy(&self.ctx);
        }
        for (_, p) in self.kernels.get_mut().drain() {
            p.obj.destroy(&self.ctx);
        }
        let mut guard = self.allocator.lock();
        let allocator = guard.as_mut().expect("allocator lives until drop");
        let bufs = self
            .chunks
            .get_mut()
            .drain(..)
            .chain(self.imports.get_mut().drain(..))
            .flatten()
            .chain(self.tables.get_mut().drain().map(|(_, t)| t.obj))
            .chain(self.staging.get_mut().drain(..));
        for b in bufs {
            memory::destroy(&self.ctx, allocator, b);
        }
        guard.take();
    }
}
