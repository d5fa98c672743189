//! The wgpu backend: the portable path (Vulkan, Metal, DX12, GL) and the interop surface for
//! runtimes that compute with wgpu. wgpu cannot import host memory, so host frames always go
//! through staging buffers; device-to-device copies use regions or the same WGSL gather
//! kernel as the Vulkan backend.

mod adapter;
mod gather;
mod record;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::backend::{gather_wanted, Backend, Submitted};
use crate::config::GatherMode;
use crate::copy::{CopyGroup, CopyPlan, MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::pfn::PAGE_SIZE;
pub(crate) use adapter::open;

/// Downloads of one batch: a mappable buffer and where its pieces go.
struct Download {
    buffer: wgpu::Buffer,
    mapped: Arc<AtomicBool>,
    /// (offset in `buffer`, destination frame location, bytes)
    pieces: Vec<(u64, Place, u64)>,
}

struct Pending {
    value: u64,
    index: wgpu::SubmissionIndex,
    done: Arc<AtomicBool>,
    download: Option<Download>,
}

pub(crate) struct WgpuBackend {
    frames: Arc<HostFramePool>,
    chunks: RwLock<Vec<Option<wgpu::Buffer>>>,
    pending: Mutex<VecDeque<Pending>>,
    next: AtomicU64,
    completed: AtomicU64,
    max_binding: u64,
    gather: Option<gather::Gather>,
    gather_mode: GatherMode,
    cpu_device: bool,
    errors: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicBool>,
    queue: wgpu::Queue,
    device: wgpu::Device,
}

const CHUNK_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

impl WgpuBackend {
    fn chunk(&self, m: MemoryId) -> Result<wgpu::Buffer> {
        let MemoryId::Chunk(c) = m else {
            unreachable!("host frames have no wgpu buffer")
        };
        self.chunks
            .read()
            .get(c as usize)
            .and_then(Option::clone)
            .ok_or_else(|| EngineError::DeviceLost(format!("chunk {c} does not exist")))
    }

    /// Fails if wgpu reported an error or lost the device since the last check.
    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(EngineError::DeviceLost("wgpu device lost".into()));
        }
        match self.errors.lock().take() {
            Some(e) => Err(EngineError::Wgpu(e)),
            None => Ok(()),
        }
    }

    /// Whether group `g` goes through the gather kernel: it can (the kernel exists, the
    /// objects are two chunks that can be bound) and [`gather_wanted`] says it should.
    fn use_gather(&self, g: &CopyGroup) -> bool {
        if self.gather.is_none() || g.src == g.dst {
            return false;
        }
        let fits = |m| self.chunk(m).is_ok_and(|b| b.size() <= self.max_binding);
        if !fits(g.src) || !fits(g.dst) {
            return false;
        }
        gather_wanted(self.gather_mode, self.cpu_device, g)
    }

    /// Waits until every submitted batch with a download has retired (its bytes are in
    /// their frames).
    fn settle_downloads(&self) -> Result<()> {
        let last = self
            .pending
            .lock()
            .iter()
            .filter(|p| p.download.is_some())
            .map(|p| p.value)
            .max();
        match last {
            Some(v) => self.wait(v),
            None => Ok(()),
        }
    }

    fn submit_encoder(
        &self,
        encoder: wgpu::CommandEncoder,
        download: Option<Download>,
    ) -> Result<u64> {
        let mut pending = self.pending.lock();
        let index = self.queue.submit([encoder.finish()]);
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        self.queue
            .on_submitted_work_done(move || flag.store(true, Ordering::Release));
        if let Some(d) = &download {
            let flag = d.mapped.clone();
            d.buffer.slice(..).map_async(wgpu::MapMode::Read, move |r| {
                if r.is_ok() {
                    flag.store(true, Ordering::Release);
                }
            });
        }
        let value = self.next.fetch_add(1, Ordering::AcqRel) + 1;
        pending.push_back(Pending {
            value,
            index,
            done,
            download,
        });
        drop(pending);
        self.check()?;
        Ok(value)
    }

    /// Completes every finished batch in order: downloads land in their frames.
    fn retire(&self) -> Result<()> {
        let mut pending = self.pending.lock();
        while let Some(p) = pending.front() {
            let ready = p.done.load(Ordering::Acquire)
                && p.download
                    .as_ref()
                    .is_none_or(|d| d.mapped.load(Ordering::Acquire));
            if !ready {
                break;
            }
            let p = pending.pop_front().expect("checked above");
            if let Some(d) = p.download {
                let view = d
                    .buffer
                    .slice(..)
                    .get_mapped_range()
                    .map_err(|e| EngineError::Wgpu(format!("{e:?}")))?;
                for &(off, at, len) in &d.pieces {
                    let src = &view[off as usize..(off + len) as usize];
                    // SAFETY: the destination is an allocated frame span resolved by the plan.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            self.frames.place_ptr(at),
                            len as usize,
                        )
                    };
                }
                drop(view);
                d.buffer.unmap();
            }
            self.completed.store(p.value, Ordering::Release);
        }
        Ok(())
    }

    fn poll_device(&self, wait_for: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let kind = match wait_for {
            Some(i) => wgpu::PollType::Wait {
                submission_index: Some(i),
                timeout: None,
            },
            None => wgpu::PollType::Poll,
        };
        self.device
            .poll(kind)
            .map_err(|e| EngineError::Wgpu(format!("poll: {e}")))?;
        self.check()
    }

    /// Records and runs a one-off encoder, waiting for it.
    fn run_now(&self, record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>) -> Result<()> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        record(&mut enc)?;
        let v = self.submit_encoder(enc, None)?;
        self.wait(v)
    }
}

impl Backend for WgpuBackend {
    fn alloc_chunk(&self, index: usize, bytes: u64) -> Result<()> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hetmem chunk"),
            size: bytes,
            usage: CHUNK_USAGE,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(EngineError::OutOfDeviceMemory {
                requested: (bytes / PAGE_SIZE as u64) as usize,
                available: 0,
                budget_pages: 0,
            })
            .inspect_err(|_| tracing::warn!("wgpu chunk allocation: {e}"));
        }
        self.check()?;
        // Touch the whole chunk once so that the first copy into it does not fault.
        self.run_now(|enc| {
            enc.clear_buffer(&buffer, 0, None);
            Ok(())
        })?;
        let mut chunks = self.chunks.write();
        if chunks.len() <= index {
            chunks.resize_with(index + 1, || None);
        }
        chunks[index] = Some(buffer);
        Ok(())
    }

    fn free_chunk(&self, index: usize) {
        // No wait: wgpu keeps a dropped buffer's memory until the submissions that use it
        // have completed.
        drop(self.chunks.write().get_mut(index).and_then(Option::take));
    }

    fn submit(&self, plan: &CopyPlan, _queue_only: bool) -> Result<Submitted> {
        record::submit_plan(self, plan)
    }

    fn poll(&self, value: u64) -> Result<bool> {
        self.poll_device(None)?;
        self.retire()?;
        Ok(self.completed.load(Ordering::Acquire) >= value)
    }

    fn wait(&self, value: u64) -> Result<()> {
        while self.completed.load(Ordering::Acquire) < value {
            let index = self
                .pending
                .lock()
                .iter()
                .find(|p| p.value == value)
                .map(|p| p.index.clone());
            self.poll_device(index)?;
            self.retire()?;
            if self.completed.load(Ordering::Acquire) < value {
                // Callbacks run on the next poll after the work is done.
                self.poll_device(None)?;
                self.retire()?;
            }
        }
        Ok(())
    }

    fn zero_pages(&self, pages: &[Place]) -> Result<()> {
        let bufs = pages
            .iter()
            .map(|p| self.chunk(p.memory))
            .collect::<Result<Vec<_>>>()?;
        self.run_now(|enc| {
            for (at, b) in pages.iter().zip(&bufs) {
                enc.clear_buffer(b, at.offset, Some(PAGE_SIZE as u64));
            }
            Ok(())
        })
    }

    fn read(&self, at: Place, out: &mut [u8]) -> Result<()> {
        let buf = self.chunk(at.memory)?;
        // Copies move whole 4-byte words: read the aligned span around the request.
        let start = at.offset & !3;
        let end = (at.offset + out.len() as u64)
            .next_multiple_of(4)
            .max(start + 4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("hetmem read"),
            size: end - start,
            usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&buf, start, &staging, 0, end - start);
        let v = self.submit_encoder(enc, None)?;
        self.wait(v)?;
        // 0: the callback has not run yet, 1: mapped, 2: the mapping failed.
        let mapped = Arc::new(AtomicU8::new(0));
        let flag = mapped.clone();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            flag.store(if r.is_ok() { 1 } else { 2 }, Ordering::Release)
        });
        // Another thread's poll may be running the callback when this one returns: poll
        // until it has run, rather than taking "not yet" for a failure.
        while mapped.load(Ordering::Acquire) == 0 {
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| EngineError::Wgpu(format!("poll: {e}")))?;
            if mapped.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
        }
        if mapped.load(Ordering::Acquire) != 1 {
            return Err(EngineError::Wgpu(
                "mapping a read-back buffer failed".into(),
            ));
        }
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| EngineError::Wgpu(format!("{e:?}")))?;
        let skip = (at.offset - start) as usize;
        out.copy_from_slice(&view[skip..skip + out.len()]);
        drop(view);
        staging.unmap();
        Ok(())
    }

    fn write(&self, at: Place, data: &[u8]) -> Result<()> {
        let buf = self.chunk(at.memory)?;
        if at.offset.is_multiple_of(4) && data.len().is_multiple_of(4) {
            self.queue.write_buffer(&buf, at.offset, data);
        } else {
            // Word-align by reading the surrounding words first.
            let start = at.offset & !3;
            let end = (at.offset + data.len() as u64).next_multiple_of(4);
            let mut words = vec![0u8; (end - start) as usize];
            self.read(
                Place {
                    memory: at.memory,
                    offset: start,
                },
                &mut words,
            )?;
            let skip = (at.offset - start) as usize;
            words[skip..skip + data.len()].copy_from_slice(data);
            self.queue.write_buffer(&buf, start, &words);
        }
        self.run_now(|_| Ok(()))
    }
}
