//! Queues and retirement: each queue's timeline semaphore and command buffers, batches
//! submitted on it and tracked until the timeline passes them, and what retiring a batch
//! does (host readbacks, recycling).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use ash::vk;
use parking_lot::Mutex;

use super::conv::error;
use super::memory::Buffer;
use super::{record, VulkanBackend};
use crate::backend::Backend;
use crate::copy::Place;
use crate::error::Result;

/// One queue with a timeline semaphore that every submission on it signals.
pub(crate) struct Queue {
    pub(super) handle: Mutex<vk::Queue>,
    pub(crate) timeline: vk::Semaphore,
    /// Last value handed to a submission.
    last: AtomicU64,
    pub(super) pool: Mutex<CommandPool>,
}

pub(super) struct CommandPool {
    pub(super) pool: vk::CommandPool,
    free: VecDeque<vk::CommandBuffer>,
}

/// Work that runs on the host once a batch's copies have completed.
pub(crate) struct Readback {
    /// Index into the batch's staging buffers.
    pub(crate) staging: usize,
    pub(crate) staging_offset: u64,
    pub(crate) dst: Place,
    pub(crate) size: u64,
}

/// A submitted batch and what it holds until it completes.
pub(crate) struct InFlight {
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

/// Ticket values carry the queue in their top bit.
pub(crate) const QUEUE_BIT: u64 = 1 << 63;

impl VulkanBackend {
    pub(super) fn queue(&self, index: usize) -> &Queue {
        if index == 0 {
            &self.ctx.transfer
        } else {
            self.ctx.compute_queue()
        }
    }

    /// Submits a recorded command buffer on queue `q` and tracks it until completion.
    pub(super) fn submit_recorded(
        &self,
        q: usize,
        cb: vk::CommandBuffer,
        held: Held,
    ) -> Result<u64> {
        self.submit_recorded_after(q, cb, held, None)
    }

    /// As [`VulkanBackend::submit_recorded`]; with `after`, the batch first waits for that
    /// timeline semaphore to reach that value.
    pub(super) fn submit_recorded_after(
        &self,
        q: usize,
        cb: vk::CommandBuffer,
        held: Held,
        after: Option<(vk::Semaphore, u64)>,
    ) -> Result<u64> {
        let batch = InFlight { cb, held };
        let submit = || self.queue(q).submit(&self.ctx.device, cb, after);
        match self.in_flight[q].submit(batch, submit) {
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
    pub(super) fn retire(&self, q: usize, upto: u64) {
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
                        self.frames.place_ptr(r.dst),
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

    /// Waits for every batch submitted so far and retires it, so that their host readbacks
    /// have landed.
    pub(super) fn settle_readbacks(&self) -> Result<()> {
        for q in 0..2 {
            if q == 1 && self.ctx.compute.is_none() {
                continue;
            }
            let v = self.queue(q).last_submitted();
            if v > 0 {
                self.queue(q).wait(&self.ctx.device, v)?;
                self.retire(q, v);
            }
        }
        Ok(())
    }

    /// Records with `record` on the transfer queue, submits and waits.
    pub(super) fn run_now(
        &self,
        record: impl FnOnce(vk::CommandBuffer) -> Result<()>,
    ) -> Result<()> {
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
}

impl Queue {
    pub(super) fn new(device: &ash::Device, family: u32) -> Result<Queue> {
        // SAFETY: the family was requested with one queue at device creation.
        let handle = unsafe { device.get_device_queue(family, 0) };
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
        // SAFETY: the device is live and the create info outlives the call.
        let timeline = unsafe { device.create_semaphore(&info, None) }
            .map_err(|e| error("vkCreateSemaphore", e))?;
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: as above.
        let pool = unsafe { device.create_command_pool(&pool_info, None) }
            .map_err(|e| error("vkCreateCommandPool", e))?;
        Ok(Queue {
            handle: Mutex::new(handle),
            timeline,
            last: AtomicU64::new(0),
            pool: Mutex::new(CommandPool {
                pool,
                free: VecDeque::new(),
            }),
        })
    }

    /// A command buffer in the initial state, ready to record.
    pub(crate) fn command_buffer(&self, device: &ash::Device) -> Result<vk::CommandBuffer> {
        let mut pool = self.pool.lock();
        if let Some(cb) = pool.free.pop_front() {
            return Ok(cb);
        }
        let info = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool.pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is live and used only under its mutex.
        let cbs = unsafe { device.allocate_command_buffers(&info) }
            .map_err(|e| error("vkAllocateCommandBuffers", e))?;
        Ok(cbs[0])
    }

    /// Takes back a command buffer whose submission has completed.
    pub(crate) fn recycle(&self, device: &ash::Device, cb: vk::CommandBuffer) {
        let mut pool = self.pool.lock();
        // SAFETY: the buffer's work has completed (its timeline value passed) and the pool
        // was created with RESET_COMMAND_BUFFER.
        if unsafe { device.reset_command_buffer(cb, vk::CommandBufferResetFlags::empty()) }.is_ok()
        {
            pool.free.push_back(cb);
        }
    }

    /// Submits a recorded command buffer, signalling the next timeline value, which it returns;
    /// with `after`, the batch first waits for that timeline semaphore to reach that value.
    pub(crate) fn submit(
        &self,
        device: &ash::Device,
        cb: vk::CommandBuffer,
        after: Option<(vk::Semaphore, u64)>,
    ) -> Result<u64> {
        let queue = self.handle.lock();
        let value = self.last.load(Ordering::Acquire) + 1;
        let cbs = [cb];
        let sems = [self.timeline];
        let vals = [value];
        let wait_sems: Vec<vk::Semaphore> = after.iter().map(|a| a.0).collect();
        let wait_vals: Vec<u64> = after.iter().map(|a| a.1).collect();
        let stages = vec![vk::PipelineStageFlags::ALL_COMMANDS; wait_sems.len()];
        let mut tl = vk::TimelineSemaphoreSubmitInfo::default()
            .wait_semaphore_values(&wait_vals)
            .signal_semaphore_values(&vals);
        let submit = vk::SubmitInfo::default()
            .wait_semaphores(&wait_sems)
            .wait_dst_stage_mask(&stages)
            .command_buffers(&cbs)
            .signal_semaphores(&sems)
            .push_next(&mut tl);
        // SAFETY: the queue is used under its mutex; `cb` is fully recorded; values signalled
        // on the timeline increase because they are chosen under the same mutex.
        unsafe { device.queue_submit(*queue, &[submit], vk::Fence::null()) }
            .map_err(|e| error("vkQueueSubmit", e))?;
        self.last.store(value, Ordering::Release);
        Ok(value)
    }

    /// The value of the most recent submission (0 before the first).
    pub(crate) fn last_submitted(&self) -> u64 {
        self.last.load(Ordering::Acquire)
    }

    /// The highest value the timeline has reached.
    pub(crate) fn completed(&self, device: &ash::Device) -> Result<u64> {
        // SAFETY: the semaphore is a live timeline semaphore of `device`.
        unsafe { device.get_semaphore_counter_value(self.timeline) }
            .map_err(|e| error("vkGetSemaphoreCounterValue", e))
    }

    /// Blocks until the timeline reaches `value`.
    pub(crate) fn wait(&self, device: &ash::Device, value: u64) -> Result<()> {
        wait_timeline(device, self.timeline, value)
    }
}

/// Blocks until timeline semaphore `sem` reaches `value`.
pub(crate) fn wait_timeline(device: &ash::Device, sem: vk::Semaphore, value: u64) -> Result<()> {
    let sems = [sem];
    let vals = [value];
    let info = vk::SemaphoreWaitInfo::default()
        .semaphores(&sems)
        .values(&vals);
    // SAFETY: callers pass a live timeline semaphore of `device` and a value that was
    // submitted (or will be signalled by the copier thread, which outlives every waiter).
    unsafe { device.wait_semaphores(&info, u64::MAX) }.map_err(|e| error("vkWaitSemaphores", e))
}
