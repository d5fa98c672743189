//! Recording a copy plan into one wgpu command encoder: host frames go through one upload
//! and one download staging buffer per batch (wgpu cannot import host memory), device pages
//! move by regions, through a bounce buffer, or by the gather kernel.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{Download, WgpuBackend};
use crate::backend::{copy_frames, Submitted};
use crate::copy::{CopyGroup, CopyPlan, Place};
use crate::error::{EngineError, Result};

/// Records and submits `plan` as one submission.
pub(super) fn submit_plan(b: &WgpuBackend, plan: &CopyPlan) -> Result<Submitted> {
    // Host frames are read (uploads) or written (host-to-host copies) now, while downloads of
    // earlier batches land in frames only when those batches retire: let them land first,
    // or this batch would read bytes not yet there or have its writes overwritten later.
    if plan.groups.iter().any(|g| !g.src.is_device()) {
        b.settle_downloads()?;
    }
    let mut enc = b.device.create_command_encoder(&Default::default());
    let mut staging = Staging::for_plan(b, plan);
    let mut gathered_pages = 0;
    for g in &plan.groups {
        match (g.src.is_device(), g.dst.is_device()) {
            (false, false) => copy_frames(&b.frames, g),
            (false, true) => staging.upload(b, &mut enc, g)?,
            (true, false) => staging.download(b, &mut enc, g)?,
            (true, true) => gathered_pages += record_between_chunks(b, &mut enc, g)?,
        }
    }
    if let Some(up) = &staging.upload {
        up.unmap();
    }
    let value = b.submit_encoder(enc, staging.download)?;
    Ok(Submitted {
        value,
        gathered_pages,
    })
}

/// A batch's staging: one upload buffer (mapped from its creation) for every host -> device
/// region and one download buffer for every device -> host region, each sized to the
/// batch's bytes in its direction, and how far each is filled.
struct Staging {
    upload: Option<wgpu::Buffer>,
    up_at: u64,
    download: Option<Download>,
    down_at: u64,
}

impl Staging {
    /// The staging buffers `plan` needs (none for a direction it does not copy).
    fn for_plan(b: &WgpuBackend, plan: &CopyPlan) -> Staging {
        let bytes = |to_device: bool| -> u64 {
            plan.groups
                .iter()
                .filter(|g| g.src.is_device() != to_device && g.dst.is_device() == to_device)
                .flat_map(|g| &g.regions)
                .map(|r| r.size)
                .sum()
        };
        let (upload_bytes, download_bytes) = (bytes(true), bytes(false));
        let upload = (upload_bytes > 0).then(|| {
            b.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hetmem upload"),
                size: upload_bytes,
                usage: wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::MAP_WRITE,
                mapped_at_creation: true,
            })
        });
        let download = (download_bytes > 0).then(|| Download {
            buffer: b.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("hetmem download"),
                size: download_bytes,
                usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
                mapped_at_creation: false,
            }),
            mapped: Arc::new(AtomicBool::new(false)),
            pieces: Vec::new(),
        });
        Staging {
            upload,
            up_at: 0,
            download,
            down_at: 0,
        }
    }

    /// Host frames -> a chunk: the frames' bytes are copied into the upload buffer now, and
    /// the copy from there into the chunk is recorded.
    fn upload(
        &mut self,
        b: &WgpuBackend,
        enc: &mut wgpu::CommandEncoder,
        g: &CopyGroup,
    ) -> Result<()> {
        let up = self.upload.as_ref().expect("sized by for_plan");
        let dst = b.chunk(g.dst)?;
        let mut view = up
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| EngineError::Wgpu(format!("{e:?}")))?;
        for r in &g.regions {
            let s = b.frames.place_ptr(Place {
                memory: g.src,
                offset: r.src_offset,
            });
            // SAFETY: the source is an allocated frame span of `r.size` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(s, r.size as usize) };
            let at = self.up_at;
            view.slice(at as usize..(at + r.size) as usize)
                .copy_from_slice(bytes);
            enc.copy_buffer_to_buffer(up, at, &dst, r.dst_offset, r.size);
            self.up_at += r.size;
        }
        Ok(())
    }

    /// A chunk -> host frames: the copy into the download buffer is recorded, and where each
    /// piece goes is noted for when the batch retires.
    fn download(
        &mut self,
        b: &WgpuBackend,
        enc: &mut wgpu::CommandEncoder,
        g: &CopyGroup,
    ) -> Result<()> {
        let d = self.download.as_mut().expect("sized by for_plan");
        let src = b.chunk(g.src)?;
        for r in &g.regions {
            let at = self.down_at;
            enc.copy_buffer_to_buffer(&src, r.src_offset, &d.buffer, at, r.size);
            let to = Place {
                memory: g.dst,
                offset: r.dst_offset,
            };
            d.pieces.push((at, to, r.size));
            self.down_at += r.size;
        }
        Ok(())
    }
}

/// Records a chunk -> chunk group; returns the pages the gather kernel copies (none when
/// the group goes by regions).
fn record_between_chunks(
    b: &WgpuBackend,
    enc: &mut wgpu::CommandEncoder,
    g: &CopyGroup,
) -> Result<usize> {
    if b.use_gather(g) {
        let gather = b.gather.as_ref().expect("checked by use_gather");
        gather.record(&b.device, enc, &b.chunk(g.src)?, &b.chunk(g.dst)?, g);
        return Ok(g.pages());
    }
    if g.src == g.dst {
        // wgpu refuses copies inside one buffer: go through a temporary one.
        let buf = b.chunk(g.src)?;
        let bytes: u64 = g.regions.iter().map(|r| r.size).sum();
        let tmp = b.device.create_buffer(&wgpu::BufferDescriptor {
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
        return Ok(0);
    }
    let (src, dst) = (b.chunk(g.src)?, b.chunk(g.dst)?);
    for r in &g.regions {
        enc.copy_buffer_to_buffer(&src, r.src_offset, &dst, r.dst_offset, r.size);
    }
    Ok(0)
}
