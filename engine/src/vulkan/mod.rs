//! The Vulkan backend (ash + gpu-allocator): device chunks, host frames imported in place (or
//! a staging path), region copies on a transfer queue, completion on timeline semaphores.

mod adapter;
mod context;
mod conv;
mod copier;
mod deferred;
mod gather;
mod instance;
mod launch;
mod memory;
mod pipeline;
mod queue;
mod record;

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ash::vk;
use gpu_allocator::vulkan::Allocator;
use gpu_allocator::MemoryLocation;
use parking_lot::{Mutex, RwLock};

use crate::backend::{Backend, Submitted, FIXED_BINDINGS};
use crate::config::{GatherMode, HostAccess};
use crate::copy::{CopyPlan, MemoryId, Place};
use crate::error::Result;
use crate::frames::HostFramePool;
use crate::inspect::KernelLimits;
use crate::pfn::PAGE_SIZE;
use crate::retire::Retirement;
pub(crate) use adapter::open;
use context::Context;
use deferred::{Doomed, Graveyard, Tracked};
use memory::Buffer;
use pipeline::Pipeline;
use queue::{InFlight, QUEUE_BIT};

/// The backend over one Vulkan device. Its impl is split by concern: opening (`adapter`),
/// memory and staging (`memory`), queues and retirement (`queue`), recording copies
/// (`record`), kernels (`launch`), deferred destruction (`deferred`); `Backend` and teardown
/// are here.
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
    /// Copies queued batches on a CPU device (with `cpu_assist`); see [`copier`].
    copier: Option<copier::Copier>,
    ctx: Context,
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
        if let Some(c) = &self.copier {
            // A thread about to block helps the copier with the job it is copying, as long
            // as its own batch is not done (it may help jobs queued after its own while the
            // queue has not yet noticed its job's end: work that must be done anyway).
            while self.queue(q).completed(&self.ctx.device)? < v && c.help() {}
        }
        self.queue(q).wait(&self.ctx.device, v)?;
        self.retire(q, v);
        Ok(())
    }

    fn zero_pages(&self, pages: &[Place]) -> Result<()> {
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

    fn read(&self, at: Place, out: &mut [u8]) -> Result<()> {
        if let Some(p) = self.chunk_host_ptr(at) {
            // SAFETY: the span lies inside one allocated page of a coherent mapping.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
            return Ok(());
        }
        let len = out.len();
        self.copy_through_staging(at, len, None, Some(out))
    }

    fn write(&self, at: Place, data: &[u8]) -> Result<()> {
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
        // The copier finishes and signals every job first: batches on the transfer queue
        // wait for them, so the device cannot become idle before.
        if let Some(c) = &self.copier {
            c.stop();
        }
        // After idle no submission uses any object; everything is destroyed before the
        // context (a later field) destroys the device.
        self.ctx.wait_idle();
        if let Some(c) = &self.copier {
            c.destroy(&self.ctx.device);
        }
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
