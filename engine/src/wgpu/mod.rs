//! The wgpu backend: the portable path (Vulkan, Metal, DX12, GL) and the interop surface for
//! runtimes that compute with wgpu. wgpu cannot import host memory, so host frames always go
//! through staging buffers; device-to-device copies use regions or the same WGSL gather
//! kernel as the Vulkan backend.

mod gather;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::backend::{copy_frames, gather_wanted, Backend, Submitted};
use crate::config::{DeviceConfig, DeviceInfo, DeviceKind, DeviceType, GatherMode, HostAccess};
use crate::copy::{CopyGroup, CopyPlan, MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::pfn::PAGE_SIZE;

/// Opens the wgpu adapter `config` selects (by name substring, else high performance).
pub(crate) fn open(
    config: &DeviceConfig,
    frames: &Arc<HostFramePool>,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    let no_device = |reason: String| EngineError::NoDevice {
        wanted: "wgpu".into(),
        reason,
    };
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let adapter = adapters
        .into_iter()
        .filter(|a| {
            config
                .adapter
                .as_ref()
                .is_none_or(|w| a.get_info().name.to_lowercase().contains(&w.to_lowercase()))
        })
        .min_by_key(|a| {
            (
                rank(a.get_info().device_type),
                a.get_info().backend != wgpu::Backend::Vulkan,
            )
        })
        .ok_or_else(|| no_device(format!("no wgpu adapter matches (found: {names:?})")))?;
    let ainfo = adapter.get_info();
    let limits = adapter.limits();
    let desc = wgpu::DeviceDescriptor {
        label: Some("hetmem"),
        required_features: wgpu::Features::empty(),
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&desc))
        .map_err(|e| no_device(format!("request_device: {e}")))?;
    let errors: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let sink = errors.clone();
    device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
        tracing::error!("wgpu: {e}");
        sink.lock().get_or_insert_with(|| e.to_string());
    }));
    let lost = Arc::new(AtomicBool::new(false));
    let lost_flag = lost.clone();
    device.set_device_lost_callback(move |_, msg| {
        tracing::error!("wgpu device lost: {msg}");
        lost_flag.store(true, Ordering::Release);
    });
    let device_type = match ainfo.device_type {
        wgpu::DeviceType::DiscreteGpu => DeviceType::Discrete,
        wgpu::DeviceType::IntegratedGpu => DeviceType::Integrated,
        wgpu::DeviceType::VirtualGpu => DeviceType::Virtual,
        wgpu::DeviceType::Cpu => DeviceType::Cpu,
        wgpu::DeviceType::Other => DeviceType::Other,
    };
    let info = DeviceInfo {
        kind: DeviceKind::Wgpu,
        name: format!("{} ({:?})", ainfo.name, ainfo.backend),
        device_type,
        reason: match &config.adapter {
            Some(w) => format!("asked for wgpu; HETMEM_ADAPTER matched {w:?} among {names:?}"),
            None => format!("asked for wgpu; {device_type:?} ranks first among {names:?}"),
        },
        host_access: HostAccess::Staging,
        dedicated_transfer_queue: false,
        host_visible_memory: false,
    };
    let gather = (config.gather != GatherMode::Never).then(|| gather::Gather::new(&device));
    let backend = WgpuBackend {
        frames: frames.clone(),
        chunks: RwLock::new(Vec::new()),
        pending: Mutex::new(VecDeque::new()),
        next: AtomicU64::new(0),
        completed: AtomicU64::new(0),
        max_binding: limits.max_storage_buffer_binding_size as u64,
        gather,
        gather_mode: config.gather,
        cpu_device: device_type == DeviceType::Cpu,
        errors,
        lost,
        queue,
        device,
    };
    Ok((info, Box::new(backend)))
}

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
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut gathered_pages = 0;
        // Uploads: every host -> device region of the batch goes through one staging buffer.
        let upload_bytes: u64 = plan
            .groups
            .iter()
            .filter(|g| !g.src.is_device() && g.dst.is_device())
            .flat_map(|g| &g.regions)
            .map(|r| r.size)
            .sum();
        let download_bytes: u64 = plan
            .groups
            .iter()
            .filter(|g| g.src.is_device() && !g.dst.is_device())
            .flat_map(|g| &g.regions)
            .map(|r| r.size)
            .sum();
        let upload = (upload_bytes > 0).then(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hetmem upload"),
                size: upload_bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::MAP_WRITE,
                mapped_at_creation: true,
            })
        });
        let mut download = (download_bytes > 0).then(|| Download {
            buffer: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hetmem download"),
                size: download_bytes,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
                mapped_at_creation: false,
            }),
            mapped: Arc::new(AtomicBool::new(false)),
            pieces: Vec::new(),
        });
        let mut up_at = 0u64;
        let mut down_at = 0u64;
        for g in &plan.groups {
            match (g.src.is_device(), g.dst.is_device()) {
                (false, false) => copy_frames(&self.frames, g),
                (false, true) => {
                    let up = upload.as_ref().expect("sized above");
                    let dst = self.chunk(g.dst)?;
                    let mut view = up
                        .slice(..)
                        .get_mapped_range_mut()
                        .map_err(|e| EngineError::Wgpu(format!("{e:?}")))?;
                    for r in &g.regions {
                        let s = self.frames.place_ptr(Place {
                            memory: g.src,
                            offset: r.src_offset,
                        });
                        // SAFETY: the source is an allocated frame span of `r.size` bytes.
                        let bytes = unsafe { std::slice::from_raw_parts(s, r.size as usize) };
                        view.slice(up_at as usize..(up_at + r.size) as usize)
                            .copy_from_slice(bytes);
                        enc.copy_buffer_to_buffer(up, up_at, &dst, r.dst_offset, r.size);
                        up_at += r.size;
                    }
                }
                (true, false) => {
                    let d = download.as_mut().expect("sized above");
                    let src = self.chunk(g.src)?;
                    for r in &g.regions {
                        enc.copy_buffer_to_buffer(&src, r.src_offset, &d.buffer, down_at, r.size);
                        d.pieces.push((
                            down_at,
                            Place {
                                memory: g.dst,
                                offset: r.dst_offset,
                            },
                            r.size,
                        ));
                        down_at += r.size;
                    }
                }
                (true, true) if self.use_gather(g) => {
                    let gather = self.gather.as_ref().expect("checked by use_gather");
                    gather.record(
                        &self.device,
                        &mut enc,
                        &self.chunk(g.src)?,
                        &self.chunk(g.dst)?,
                        g,
                    );
                    gathered_pages += g.pages();
                }
                (true, true) if g.src == g.dst => {
                    // wgpu refuses copies inside one buffer: go through a temporary one.
                    let buf = self.chunk(g.src)?;
                    let bytes: u64 = g.regions.iter().map(|r| r.size).sum();
                    let tmp = self.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("hetmem bounce"),
                        size: bytes,
                        usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        mapped_at_creation: false,
                    });
                    let mut at = 0;
                    for r in &g.regions {
                        enc.copy_buffer_to_buffer(&buf, r.src_offset, &tmp, at, r.size);
                        at += r.size;
                    }
                    at = 0;
                    for r in &g.regions {
                        enc.copy_buffer_to_buffer(&tmp, at, &buf, r.dst_offset, r.size);
                        at += r.size;
                    }
                }
                (true, true) => {
                    let (src, dst) = (self.chunk(g.src)?, self.chunk(g.dst)?);
                    for r in &g.regions {
                        enc.copy_buffer_to_buffer(&src, r.src_offset, &dst, r.dst_offset, r.size);
                    }
                }
            }
        }
        if let Some(up) = &upload {
            up.unmap();
        }
        let value = self.submit_encoder(enc, download)?;
        Ok(Submitted {
            value,
            gathered_pages,
        })
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
        let mapped = Arc::new(AtomicBool::new(false));
        let flag = mapped.clone();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            flag.store(r.is_ok(), Ordering::Release)
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| EngineError::Wgpu(format!("poll: {e}")))?;
        if !mapped.load(Ordering::Acquire) {
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
