//! Recording a copy plan into one command buffer and submitting it.

use ash::vk;

use super::conv::{error, regions};
use super::queue::{Held, Readback};
use super::VulkanBackend;
use crate::backend::{copy_frames, gather_wanted, Submitted};
use crate::config::{GatherMode, HostAccess};
use crate::copy::{CopyGroup, CopyPlan, MemoryId, Place, Region};
use crate::error::Result;
use crate::memcopy::{copy_spans, Span, STREAM_MIN_BYTES};

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

/// Whether group `g` goes through the gather kernel: it can (the kernel exists, both objects
/// can be bound, no staging is involved) and [`gather_wanted`] says it should.
fn use_gather(b: &VulkanBackend, g: &CopyGroup) -> bool {
    let Some(gather) = &b.gather else {
        return false;
    };
    let staged = b.host_access == HostAccess::Staging;
    let touches_host = !g.src.is_device() || !g.dst.is_device();
    if staged && touches_host {
        return false;
    }
    let fits = |m: MemoryId| {
        b.bound_of(m)
            .is_ok_and(|(_, size)| size <= gather.max_binding)
    };
    if !fits(g.src) || !fits(g.dst) {
        return false;
    }
    gather_wanted(b.gather_mode, b.cpu_device, g)
}

/// Batches below this size are not split between the queue and the CPU.
const CPU_SHARE_MIN_BYTES: u64 = 1 << 20;
/// Batches up to this size are copied by the calling thread alone on a CPU device: a
/// submission and its wait cost more than copying a few pages (a one-page fault on lavapipe
/// spends ~50 us in submit-and-wait when the waiter is on the other core, against ~1 us of
/// memcpy).
const CPU_ONLY_MAX_BYTES: u64 = 256 << 10;
/// Share of a batch, in percent of bytes, left to the queue when the CPU helps: lavapipe's
/// queue copies long regions about as fast as memcpy (half each) and scattered 4 KiB regions
/// at about 0.6x of it (two fifths to the queue).
const QUEUE_SHARE_LONG: u64 = 50;
const QUEUE_SHARE_SCATTERED: u64 = 40;
/// Regions averaging at least this many bytes count as long.
const LONG_REGION: u64 = 64 << 10;

/// On a CPU device (lavapipe) whose memory and host frames are both mapped, the device's
/// queue and the calling thread are two CPU cores: split the batch between them. Returns
/// the queue's part and the calling thread's part.
fn split_for_cpu(b: &VulkanBackend, plan: &CopyPlan) -> Option<(CopyPlan, Vec<Span>)> {
    let small = plan.bytes() <= CPU_ONLY_MAX_BYTES;
    if !b.cpu_assist
        || (plan.bytes() < CPU_SHARE_MIN_BYTES && !small)
        || b.gather_mode == GatherMode::Always
    {
        return None;
    }
    let regions = plan.region_count() as u64;
    let share = if small {
        0
    } else if plan.bytes() / regions.max(1) >= LONG_REGION {
        QUEUE_SHARE_LONG
    } else {
        QUEUE_SHARE_SCATTERED
    };
    let mut queue_left = plan.bytes() * share / 100;
    let mut queue = CopyPlan::default();
    let mut cpu = Vec::new();
    for g in &plan.groups {
        let mut qg = CopyGroup {
            src: g.src,
            dst: g.dst,
            regions: Vec::new(),
        };
        for r in &g.regions {
            let to_queue = r
                .size
                .min(queue_left.next_multiple_of(crate::pfn::PAGE_SIZE as u64));
            if to_queue > 0 {
                qg.regions.push(Region {
                    size: to_queue,
                    ..*r
                });
                queue_left = queue_left.saturating_sub(to_queue);
                queue.pages += (to_queue / crate::pfn::PAGE_SIZE as u64) as usize;
            }
            if to_queue < r.size {
                let src = b.host_ptr(Place {
                    memory: g.src,
                    offset: r.src_offset + to_queue,
                })?;
                let dst = b.host_ptr(Place {
                    memory: g.dst,
                    offset: r.dst_offset + to_queue,
                })?;
                cpu.push(Span {
                    src,
                    dst,
                    len: (r.size - to_queue) as usize,
                });
            }
        }
        if !qg.regions.is_empty() {
            queue.groups.push(qg);
        }
    }
    Some((queue, cpu))
}

/// Records and submits `plan` as one submission (on a CPU device, part of it is copied by
/// the calling thread before this returns; see [`split_for_cpu`]).
pub(crate) fn submit_plan(
    b: &VulkanBackend,
    plan: &CopyPlan,
    queue_only: bool,
) -> Result<Submitted> {
    if queue_only && b.cpu_assist && plan.bytes() >= STREAM_MIN_BYTES {
        if let (Some(copier), Some(spans)) = (&b.copier, all_spans(b, plan)) {
            return submit_to_copier(b, copier, spans);
        }
    }
    let split = if queue_only {
        None
    } else {
        split_for_cpu(b, plan)
    };
    let Some((queue_part, cpu_part)) = split else {
        return submit_on_queue(b, plan);
    };
    // The calling thread's copies must come after every batch submitted before this one,
    // as the queue's copies do.
    for q in b.ctx.queues() {
        q.wait(&b.ctx.device, q.last_submitted())?;
    }
    let submitted = if queue_part.groups.is_empty() {
        Submitted {
            value: b.ctx.transfer.last_submitted(),
            gathered_pages: 0,
        }
    } else {
        submit_on_queue(b, &queue_part)?
    };
    // SAFETY: every span lies inside mapped, allocated memory (resolved by the plan); the
    // plan refused overlapping pairs, so the queue's part never touches these bytes.
    unsafe { copy_spans(&cpu_part, plan.bytes() >= STREAM_MIN_BYTES) };
    Ok(submitted)
}

/// Every region of `plan` as host addresses, if all of them are mapped.
fn all_spans(b: &VulkanBackend, plan: &CopyPlan) -> Option<Vec<Span>> {
    let mut spans = Vec::with_capacity(plan.region_count());
    for g in &plan.groups {
        for r in &g.regions {
            spans.push(Span {
                src: b.host_ptr(Place {
                    memory: g.src,
                    offset: r.src_offset,
                })?,
                dst: b.host_ptr(Place {
                    memory: g.dst,
                    offset: r.dst_offset,
                })?,
                len: r.size as usize,
            });
        }
    }
    Some(spans)
}

/// Hands a queued batch to the CPU copier and submits, on the transfer queue, the empty batch
/// that waits for it (see [`super::copier`]); the ticket's value is that batch's.
fn submit_to_copier(
    b: &VulkanBackend,
    copier: &super::copier::Copier,
    spans: Vec<Span>,
) -> Result<Submitted> {
    let q = &b.ctx.transfer;
    let cb = q.command_buffer(&b.ctx.device)?;
    if let Err(e) = begin(&b.ctx, cb).and_then(|_| end(&b.ctx, cb)) {
        b.abandon(0, cb, Held::default());
        return Err(e);
    }
    // Every batch submitted before this one comes first, except the copier's own, which
    // are in order anyway (and waiting for them would add two thread wake-ups per job).
    let after: Vec<(vk::Semaphore, u64)> = b
        .ctx
        .queues()
        .map(|q| (q.timeline, q.last_submitted()))
        .collect();
    // The transfer-queue value this job waits for (or skips as the copier's own).
    let seen = after
        .iter()
        .find(|&&(sem, _)| sem == q.timeline)
        .map_or(0, |&(_, v)| v);
    let after = after
        .into_iter()
        .filter(|&(sem, v)| !(sem == q.timeline && copier.is_own_batch(v)))
        .collect();
    let value = match copier.queue(after, spans) {
        Ok(v) => v,
        Err(e) => {
            b.abandon(0, cb, Held::default());
            return Err(e);
        }
    };
    match b.submit_recorded_after(0, cb, Held::default(), Some((copier.timeline, value))) {
        Ok(value) => {
            // Only a batch right after the transfer-queue batch this job waited for (or
            // skipped as the copier's own) may be skipped by the next job: a batch another
            // thread submitted in between is not covered by this job's wait.
            if value == seen + 1 {
                copier.submitted(value);
            }
            Ok(Submitted {
                value,
                gathered_pages: 0,
            })
        }
        Err(e) => {
            // The caller takes the error as "nothing was submitted" and may reuse the pages
            // at once: the copy must be over before it hears of it.
            copier.wait(&b.ctx.device, value);
            Err(e)
        }
    }
}

fn submit_on_queue(b: &VulkanBackend, plan: &CopyPlan) -> Result<Submitted> {
    if b.host_access == HostAccess::Staging && plan.groups.iter().any(|g| !g.src.is_device()) {
        // Through staging, host frames are read (uploads) or written (host-to-host copies)
        // while recording, and earlier batches' downloads land in frames only when they
        // retire: let them land first.
        b.settle_readbacks()?;
    }
    let gathered: Vec<bool> = plan.groups.iter().map(|g| use_gather(b, g)).collect();
    let any_gather = gathered.iter().any(|&x| x);
    let q = usize::from(any_gather && b.ctx.compute.is_some());
    let queue = b.queue(q);
    let cb = queue.command_buffer(&b.ctx.device)?;
    let mut held = Held::default();
    let recorded = begin(&b.ctx, cb)
        .and_then(|_| record_groups(b, cb, plan, &gathered, &mut held))
        .and_then(|_| end(&b.ctx, cb));
    if let Err(e) = recorded {
        b.abandon(q, cb, held);
        return Err(e);
    }
    let value = b.submit_recorded(q, cb, held)?;
    let gathered_pages = plan
        .groups
        .iter()
        .zip(&gathered)
        .filter(|(_, &x)| x)
        .map(|(g, _)| g.pages())
        .sum();
    Ok(Submitted {
        value,
        gathered_pages,
    })
}

/// Records every gathered group: one pairs buffer for the batch, one dispatch per group.
fn record_gathers(
    b: &VulkanBackend,
    cb: vk::CommandBuffer,
    groups: &[&CopyGroup],
    held: &mut Held,
) -> Result<()> {
    let gather = b.gather.as_ref().expect("gather decided only when present");
    let align = gather.offset_align;
    let lists: Vec<Vec<[u32; 2]>> = groups.iter().map(|g| g.page_pairs()).collect();
    let total: u64 = lists
        .iter()
        .map(|l| (l.len() as u64 * 8).next_multiple_of(align))
        .sum();
    let pairs = b.staging_buffer(total)?;
    let pbuf = pairs.buffer;
    let base = pairs.host_ptr(0).expect("staging is mapped");
    held.staging.push(pairs);
    let pool = gather.pool(&b.ctx, groups.len() as u32)?;
    held.descriptors = Some(pool);
    let mut at = 0u64;
    for (g, list) in groups.iter().zip(&lists) {
        let bytes: &[u8] = bytemuck::cast_slice(list);
        // SAFETY: `at + bytes.len() <= total`, inside the mapped pairs buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), base.add(at as usize), bytes.len())
        };
        let src = b.bound_of(g.src)?;
        let dst = b.bound_of(g.dst)?;
        gather.record(&b.ctx, cb, pool, src, dst, pbuf, at, list.len() as u32)?;
        at += (bytes.len() as u64).next_multiple_of(align);
    }
    Ok(())
}

fn record_groups(
    b: &VulkanBackend,
    cb: vk::CommandBuffer,
    plan: &CopyPlan,
    gathered: &[bool],
    held: &mut Held,
) -> Result<()> {
    let staged = b.host_access == HostAccess::Staging;
    let gather_groups: Vec<&CopyGroup> = plan
        .groups
        .iter()
        .zip(gathered)
        .filter(|(_, &x)| x)
        .map(|(g, _)| g)
        .collect();
    if !gather_groups.is_empty() {
        record_gathers(b, cb, &gather_groups, held)?;
    }
    for (g, _) in plan.groups.iter().zip(gathered).filter(|(_, &x)| !x) {
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
            copy_frames(&b.frames, g);
        } else {
            record_staged(b, cb, g, host_src, held)?;
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
    extras: &mut Held,
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
            let src = b.frames.place_ptr(Place {
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
                dst: Place {
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
