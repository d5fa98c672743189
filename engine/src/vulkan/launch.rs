//! User kernels on the Vulkan backend: their pipelines, page tables and dispatches, and the
//! deferred destruction of pipelines and tables (see `deferred.rs`): a dispatch records, under
//! the kernel's and the table's map locks, the timeline value of its submission on both;
//! dropping either buries it with those values instead of waiting for the device.

use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use gpu_allocator::MemoryLocation;

use super::deferred::{self, Doomed, Tracked};
use super::memory;
use super::pipeline::Pipeline;
use super::queue::{Held, QUEUE_BIT};
use super::{record, VulkanBackend};
use crate::error::{EngineError, Result};

impl VulkanBackend {
    /// Destroys what the graveyard holds whose last use has completed (everything with
    /// `idle`, when the caller made sure the device is idle).
    pub(super) fn collect(&self, idle: bool) {
        let ready = self
            .graveyard
            .ready(|| (!idle).then(|| deferred::completed(&self.ctx)));
        if ready.is_empty() {
            return;
        }
        let mut guard = self.allocator.lock();
        for d in ready {
            match d {
                Doomed::Pipeline(p) => p.destroy(&self.ctx),
                Doomed::Buffer(b) => memory::destroy(
                    &self.ctx,
                    guard.as_mut().expect("allocator lives until drop"),
                    b,
                ),
            }
        }
    }

    pub(super) fn create_kernel_pipeline(
        &self,
        spirv: &[u32],
        entry: &str,
        chunks: u32,
    ) -> Result<u64> {
        let name = std::ffi::CString::new(entry)
            .map_err(|_| EngineError::KernelCompile(format!("entry point {entry:?}")))?;
        let p = Pipeline::new(
            &self.ctx,
            spirv,
            &name,
            crate::backend::FIXED_BINDINGS + chunks,
        )?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.kernels.lock().insert(id, Tracked::new(p));
        Ok(id)
    }

    pub(super) fn bury_kernel(&self, id: u64) {
        let Some(t) = self.kernels.lock().remove(&id) else {
            return;
        };
        self.graveyard.bury(Doomed::Pipeline(t.obj), t.last_use);
        self.collect(false);
    }

    pub(super) fn alloc_table_buffer(&self, words: usize) -> Result<(u64, NonNull<u32>)> {
        let bytes = (words.max(1) * 4) as u64;
        let mut guard = self.allocator.lock();
        let allocator = guard.as_mut().expect("allocator lives until drop");
        let b = memory::allocate(
            &self.ctx,
            allocator,
            bytes,
            MemoryLocation::CpuToGpu,
            "hetmem page table",
        )?;
        let Some(ptr) = b.host_ptr(0) else {
            memory::destroy(&self.ctx, allocator, b);
            return Err(EngineError::Unsupported(
                "no host-visible memory for page tables".into(),
            ));
        };
        // SAFETY: the mapping covers `bytes` bytes and nothing else uses it yet.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes as usize) };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        drop(guard);
        self.tables.lock().insert(id, Tracked::new(b));
        Ok((id, NonNull::new(ptr.cast()).expect("mapped")))
    }

    pub(super) fn bury_table(&self, id: u64) {
        let Some(t) = self.tables.lock().remove(&id) else {
            return;
        };
        self.graveyard.bury(Doomed::Buffer(t.obj), t.last_use);
        self.collect(false);
    }

    /// Records and submits one dispatch. The kernel's, the table's and the chunks' locks are
    /// held from lookup to submission, so an object dropped meanwhile is buried with this
    /// submission's value (lock order: kernels, tables, chunks, a queue's batches).
    pub(super) fn dispatch_kernel(
        &self,
        kernel: u64,
        table: u64,
        chunks: u32,
        meta: &[u32],
        groups: [u32; 3],
    ) -> Result<u64> {
        let meta_bytes = (meta.len().max(1) * 4) as u64;
        let args = self.staging_buffer(meta_bytes)?;
        let at = args.host_ptr(0).expect("staging is mapped");
        // SAFETY: the staging buffer holds at least `meta_bytes` bytes and is ours alone.
        unsafe { std::ptr::copy_nonoverlapping(meta.as_ptr().cast(), at, meta.len() * 4) };
        let mut kernels = self.kernels.lock();
        let mut tables = self.tables.lock();
        let existing = self.chunks.read();
        let (Some(p), Some(t)) = (kernels.get_mut(&kernel), tables.get_mut(&table)) else {
            self.release_staging(vec![args]);
            return Err(EngineError::InvalidConfig(format!(
                "no kernel {kernel} or no page table {table}"
            )));
        };
        let mut bound = Vec::with_capacity(2 + chunks as usize);
        bound.push((t.obj.buffer, 0, t.obj.size));
        bound.push((args.buffer, 0, meta_bytes));
        for c in 0..chunks as usize {
            // A chunk not created yet holds no page the table can name; any buffer fills
            // its binding.
            bound.push(match existing.get(c).and_then(Option::as_ref) {
                Some(b) => (b.buffer, 0, b.size),
                None => (args.buffer, 0, meta_bytes),
            });
        }
        // The compute queue where there is one besides the transfer queue.
        let q = usize::from(self.ctx.compute.is_some());
        let cb = match self.queue(q).command_buffer(&self.ctx.device) {
            Ok(cb) => cb,
            Err(e) => {
                self.release_staging(vec![args]);
                return Err(e);
            }
        };
        let mut held = Held {
            staging: vec![args],
            ..Held::default()
        };
        let recorded = (|| {
            let pool = Pipeline::pool(&self.ctx, 1, bound.len() as u32)?;
            held.descriptors = Some(pool);
            let set = p.obj.bind(&self.ctx, pool, &bound)?;
            record::begin(&self.ctx, cb)?;
            p.obj.dispatch(&self.ctx, cb, set, groups);
            record::end(&self.ctx, cb)
        })();
        if let Err(e) = recorded {
            self.abandon(q, cb, held);
            return Err(e);
        }
        let value = self.submit_recorded(q, cb, held)?;
        let v = value & !QUEUE_BIT;
        p.used(q, v);
        t.used(q, v);
        Ok(value)
    }
}
