//! The host device: "device memory" is a separate host arena and copies are multi-threaded
//! memcpy. It is the reference the GPU backends are checked against, and the fallback where
//! no Vulkan driver exists.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use rayon::prelude::*;

use crate::backend::{Backend, Submitted};
use crate::config::{DeviceInfo, DeviceKind, DeviceType, HostAccess};
use crate::copy::{CopyPlan, MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::memcopy::{copy_spans, Span, STREAM_MIN_BYTES};
use crate::pfn::PAGE_SIZE;

/// Copies at most this many bytes per task, so that one large region spreads over threads.
const TASK_BYTES: usize = 1 << 20;
/// Batches smaller than this run on the calling thread.
const PARALLEL_BYTES: u64 = 256 << 10;

/// One anonymous mapping that stands in for a chunk of device memory.
struct Arena {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the arena is plain memory owned by the backend; copies into it are ordered by the
// engine (a page is never the target of two batches in flight).
unsafe impl Send for Arena {}
// SAFETY: as for `Send`.
unsafe impl Sync for Arena {}

impl Arena {
    fn new(len: usize) -> Result<Arena> {
        // SAFETY: a fresh anonymous mapping; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(EngineError::OutOfDeviceMemory {
                requested: len / PAGE_SIZE,
                available: 0,
                budget_pages: 0,
            });
        }
        Ok(Arena {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length and is no longer referenced.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub(crate) struct HostBackend {
    frames: Arc<HostFramePool>,
    chunks: RwLock<Vec<Option<Arena>>>,
    completed: AtomicU64,
}

/// Opens the host device.
pub(crate) fn open(frames: &Arc<HostFramePool>, reason: &str) -> (DeviceInfo, Box<dyn Backend>) {
    let info = DeviceInfo {
        kind: DeviceKind::Host,
        name: format!(
            "hetmem host device ({} threads)",
            rayon::current_num_threads()
        ),
        device_type: DeviceType::Software,
        reason: reason.to_string(),
        host_access: HostAccess::Direct,
        dedicated_transfer_queue: false,
        host_visible_memory: true,
    };
    let backend = HostBackend {
        frames: frames.clone(),
        chunks: RwLock::new(Vec::new()),
        completed: AtomicU64::new(0),
    };
    (info, Box::new(backend))
}

impl HostBackend {
    /// Address of `at`, which the caller has resolved to a live chunk or frame segment.
    fn addr(&self, chunks: &[Option<Arena>], at: Place) -> Result<*mut u8> {
        let base = match at.memory {
            MemoryId::Frames(_) => return Ok(self.frames.place_ptr(at)),
            MemoryId::Chunk(c) => {
                let arena = chunks
                    .get(c as usize)
                    .and_then(Option::as_ref)
                    .ok_or_else(|| EngineError::DeviceLost(format!("chunk {c} does not exist")))?;
                debug_assert!((at.offset as usize) < arena.len);
                arena.ptr
            }
        };
        // SAFETY: locations come from the engine's resolution and lie inside their object.
        Ok(unsafe { base.add(at.offset as usize) })
    }
}

impl Backend for HostBackend {
    fn alloc_chunk(&self, index: usize, bytes: u64) -> Result<()> {
        let arena = Arena::new(bytes as usize)?;
        let mut chunks = self.chunks.write();
        if chunks.len() <= index {
            chunks.resize_with(index + 1, || None);
        }
        chunks[index] = Some(arena);
        Ok(())
    }

    fn free_chunk(&self, index: usize) {
        if let Some(slot) = self.chunks.write().get_mut(index) {
            *slot = None;
        }
    }

    fn submit(&self, plan: &CopyPlan, _queue_only: bool) -> Result<Submitted> {
        let chunks = self.chunks.read();
        let mut spans = Vec::with_capacity(plan.region_count());
        for g in &plan.groups {
            for r in &g.regions {
                let src = self.addr(
                    &chunks,
                    Place {
                        memory: g.src,
                        offset: r.src_offset,
                    },
                )?;
                let dst = self.addr(
                    &chunks,
                    Place {
                        memory: g.dst,
                        offset: r.dst_offset,
                    },
                )?;
                let whole = Span {
                    src,
                    dst,
                    len: r.size as usize,
                };
                whole.cut_into(TASK_BYTES, &mut spans);
            }
        }
        let streaming = plan.bytes() >= STREAM_MIN_BYTES;
        // SAFETY: each span lies inside a live frame segment or arena, and the plan refused
        // batches in which spans overlap.
        let run = |s: &[Span]| unsafe { copy_spans(s, streaming) };
        if plan.bytes() < PARALLEL_BYTES {
            run(&spans);
        } else {
            // Pieces of about TASK_BYTES each, so that one long region spreads over threads.
            let per = (TASK_BYTES / spans.iter().map(|s| s.len).max().unwrap_or(1)).max(1);
            spans.par_chunks(per).for_each(run);
        }
        let value = self.completed.fetch_add(1, Ordering::AcqRel) + 1;
        Ok(Submitted {
            value,
            gathered_pages: 0,
        })
    }

    fn poll(&self, value: u64) -> Result<bool> {
        Ok(self.completed.load(Ordering::Acquire) >= value)
    }

    fn wait(&self, _value: u64) -> Result<()> {
        Ok(())
    }

    fn zero_pages(&self, pages: &[Place]) -> Result<()> {
        let chunks = self.chunks.read();
        for &at in pages {
            let p = self.addr(&chunks, at)?;
            // SAFETY: `at` is a whole allocated page inside a live arena.
            unsafe { p.write_bytes(0, PAGE_SIZE) };
        }
        Ok(())
    }

    fn read(&self, at: Place, out: &mut [u8]) -> Result<()> {
        let chunks = self.chunks.read();
        let p = self.addr(&chunks, at)?;
        // SAFETY: the span was checked to lie inside one allocated page.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn write(&self, at: Place, data: &[u8]) -> Result<()> {
        let chunks = self.chunks.read();
        let p = self.addr(&chunks, at)?;
        // SAFETY: the span was checked to lie inside one allocated page.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
}
