//! Recording a copy plan into one command buffer and submitting it.

use ash::vk;

use super::conv::error;
use super::{Readback, VulkanBackend};
use crate::copy::{CopyGroup, CopyPlan, Location, MemoryId};
use crate::device::Submitted;
use crate::error::Result;
use crate::select::HostAccess;

/// Begins a one-time command buffer that first waits for all earlier work of its queue.
pub(crate) fn begin(ctx: &super::Context, cb: vk::CommandBuffer) -> Result<()> {
    let info =
        vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
    // SAFETY: `cb` is in the initial state and used by this thread only.
    unsafe { ctx.device.begin_command_buffer(cb, &info) }
        .map_err(|e| error("vkBeginCommandBuffer", e))?;
    barrier(
        ctx,
        cb,
        vk::PipelineStageFlags::ALL_COMMANDS,
        vk::AccessFlags::MEMORY_WRITE,
        vk::PipelineStageFlags::ALL_COMMANDS,
        vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
    );
    Ok(())
}

/// Makes the batch's writes visible to the host, and ends the command buffer.
pub(crate) fn end(ctx: &super::Context, cb: vk::CommandBuffer) -> Result<()> {
    barrier(
        ctx,
        cb,
        vk::PipelineStageFlags::ALL_COMMANDS,
        vk::AccessFlags::MEMORY_WRITE,
        vk::PipelineStageFlags::HOST,
        vk::AccessFlags::HOST_READ | vk::AccessFlags::HOST_WRITE,
    );
    // SAFETY: `cb` is recording.
    unsafe { ctx.device.end_command_buffer(cb) }.map_err(|e| error("vkEndCommandBuffer", e))
}

fn barrier(
    ctx: &super::Context,
    cb: vk::CommandBuffer,
    src_stage: vk::PipelineStageFlags,
    src: vk::AccessFlags,
    dst_stage: vk::PipelineStageFlags,
    dst: vk::AccessFlags,
) {
    let mb = [vk::MemoryBarrier::default()
        .src_access_mask(src)
        .dst_access_mask(dst)];
    // SAFETY: `cb` is recording; a global memory barrier references no resource.
    unsafe {
        ctx.device.cmd_pipeline_barrier(
            cb,
            src_stage,
            dst_stage,
            vk::DependencyFlags::empty(),
            &mb,
            &[],
            &[],
        )
    };
}

fn regions(g: &CopyGroup) -> Vec<vk::BufferCopy> {
    g.regions
        .iter()
        .map(|r| vk::BufferCopy {
            src_offset: r.src_offset,
            dst_offset: r.dst_offset,
            size: r.size,
        })
        .collect()
}

/// What recording produced besides commands: staging buffers and host work after completion.
#[derive(Default)]
struct Extras {
    staging: Vec<super::Buffer>,
    readbacks: Vec<Readback>,
}

/// Records and submits `plan` as one submission.
pub(crate) fn submit_plan(b: &VulkanBackend, plan: &CopyPlan) -> Result<Submitted> {
    let q = 0;
    let queue = b.queue(q);
    let cb = queue.command_buffer(&b.ctx.device)?;
    let mut extras = Extras::default();
    let recorded = begin(&b.ctx, cb)
        .and_then(|_| record_groups(b, cb, plan, &mut extras))
        .and_then(|_| end(&b.ctx, cb));
    if let Err(e) = recorded {
        queue.recycle(&b.ctx.device, cb);
        b.release_staging(extras.staging);
        return Err(e);
    }
    let value = b.submit_recorded(q, cb, extras.staging, extras.readbacks)?;
    Ok(Submitted {
        value,
        gathered_pages: 0,
    })
}

fn record_groups(
    b: &VulkanBackend,
    cb: vk::CommandBuffer,
    plan: &CopyPlan,
    extras: &mut Extras,
) -> Result<()> {
    let staged = b.host_access == HostAccess::Staging;
    for g in &plan.groups {
        let host_src = matches!(g.src, MemoryId::Frames(_));
        let host_dst = matches!(g.dst, MemoryId::Frames(_));
        if !staged || (!host_src && !host_dst) {
            let src = b.buffer_of(g.src)?;
            let dst = b.buffer_of(g.dst)?;
            // SAFETY: both buffers are live until the batch retires; regions were resolved
            // inside them and do not overlap.
            unsafe { b.ctx.device.cmd_copy_buffer(cb, src, dst, &regions(g)) };
        } else if host_src && host_dst {
            // Host to host without import: a plain memcpy, now.
            for r in &g.regions {
                let s = b.frame_ptr(Location {
                    memory: g.src,
                    offset: r.src_offset,
                });
                let d = b.frame_ptr(Location {
                    memory: g.dst,
                    offset: r.dst_offset,
                });
                // SAFETY: both spans are allocated frames; the plan refused overlaps.
                unsafe { std::ptr::copy_nonoverlapping(s, d, r.size as usize) };
            }
        } else {
            record_staged(b, cb, g, host_src, extras)?;
        }
    }
    Ok(())
}

/// Host frames <-> device through a staging buffer: uploads are copied into staging now,
/// downloads are copied out of it when the batch retires.
fn record_staged(
    b: &VulkanBackend,
    cb: vk::CommandBuffer,
    g: &CopyGroup,
    upload: bool,
    extras: &mut Extras,
) -> Result<()> {
    let bytes: u64 = g.regions.iter().map(|r| r.size).sum();
    let staging = b.staging_buffer(bytes)?;
    let sbuf = staging.buffer;
    let base = staging.host_ptr(0).expect("staging is mapped");
    let device = b.buffer_of(if upload { g.dst } else { g.src })?;
    let index = extras.staging.len();
    extras.staging.push(staging);
    let mut copies = Vec::with_capacity(g.regions.len());
    let mut at = 0u64;
    for r in &g.regions {
        if upload {
            let src = b.frame_ptr(Location {
                memory: g.src,
                offset: r.src_offset,
            });
            // SAFETY: `at + size <= bytes`, inside the staging buffer; the source is an
            // allocated frame span.
            unsafe { std::ptr::copy_nonoverlapping(src, base.add(at as usize), r.size as usize) };
            copies.push(vk::BufferCopy {
                src_offset: at,
                dst_offset: r.dst_offset,
                size: r.size,
            });
        } else {
            copies.push(vk::BufferCopy {
                src_offset: r.src_offset,
                dst_offset: at,
                size: r.size,
            });
            extras.readbacks.push(Readback {
                staging: index,
                staging_offset: at,
                dst: Location {
                    memory: g.dst,
                    offset: r.dst_offset,
                },
                size: r.size,
            });
        }
        at += r.size;
    }
    let (src, dst) = if upload {
        (sbuf, device)
    } else {
        (device, sbuf)
    };
    // SAFETY: both buffers are live until the batch retires; regions lie inside each.
    unsafe { b.ctx.device.cmd_copy_buffer(cb, src, dst, &copies) };
    Ok(())
}
