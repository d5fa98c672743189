//! The logical device, its queues and their timelines.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use ash::vk;
use parking_lot::Mutex;

use super::conv::error;
use super::instance::{Adapter, Instance};
use crate::error::Result;

/// One queue with a timeline semaphore that every submission on it signals.
pub(crate) struct Queue {
    pub(super) handle: Mutex<vk::Queue>,
    pub(crate) timeline: vk::Semaphore,
    /// Last value handed to a submission.
    last: AtomicU64,
    pool: Mutex<CommandPool>,
}

struct CommandPool {
    pool: vk::CommandPool,
    free: VecDeque<vk::CommandBuffer>,
}

/// The device and what every part of the backend needs from it.
pub(crate) struct Context {
    pub(crate) device: ash::Device,
    pub(crate) physical: vk::PhysicalDevice,
    pub(crate) host_memory: Option<ash::ext::external_memory_host::Device>,
    pub(crate) memory_properties: vk::PhysicalDeviceMemoryProperties,
    pub(crate) limits: vk::PhysicalDeviceLimits,
    /// Queue for copies: a transfer-only family where there is one.
    pub(crate) transfer: Queue,
    /// Queue for kernels and fills, when it is not the transfer queue.
    pub(crate) compute: Option<Queue>,
    // Declared last: dropped after the device.
    pub(crate) instance: Instance,
}

impl Context {
    /// Creates the logical device on `adapter`, importing host memory if `import` is asked
    /// and supported.
    pub(crate) fn new(instance: Instance, adapter: &Adapter, import: bool) -> Result<Context> {
        let inst = &instance.instance;
        let pd = adapter.physical;
        // SAFETY: `pd` belongs to `inst`.
        let families = unsafe { inst.get_physical_device_queue_family_properties(pd) };
        let has = |i: usize, f: vk::QueueFlags| families[i].queue_flags.contains(f);
        let compute_family = (0..families.len())
            .find(|&i| has(i, vk::QueueFlags::COMPUTE))
            .ok_or_else(|| crate::EngineError::NoDevice {
                wanted: "vulkan".into(),
                reason: format!("{} has no compute queue", adapter.name),
            })?;
        let transfer_only = (0..families.len()).find(|&i| {
            has(i, vk::QueueFlags::TRANSFER)
                && !has(i, vk::QueueFlags::GRAPHICS)
                && !has(i, vk::QueueFlags::COMPUTE)
        });
        let transfer_family = transfer_only.unwrap_or(compute_family);
        let priorities = [1.0f32];
        let mut queue_infos = vec![vk::DeviceQueueCreateInfo::default()
            .queue_family_index(transfer_family as u32)
            .queue_priorities(&priorities)];
        if transfer_family != compute_family {
            queue_infos.push(
                vk::DeviceQueueCreateInfo::default()
                    .queue_family_index(compute_family as u32)
                    .queue_priorities(&priorities),
            );
        }
        let import = import && adapter.host_import;
        let mut ext_names = Vec::new();
        if import {
            ext_names.push(ash::ext::external_memory_host::NAME.as_ptr());
        }
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default().timeline_semaphore(true);
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_infos)
            .enabled_extension_names(&ext_names)
            .push_next(&mut v12);
        // SAFETY: `info` and everything it points to outlive the call; `pd` belongs to `inst`.
        let device = unsafe { inst.create_device(pd, &info, None) }
            .map_err(|e| error("vkCreateDevice", e))?;
        // SAFETY: `pd` belongs to `inst`.
        let memory_properties = unsafe { inst.get_physical_device_memory_properties(pd) };
        // SAFETY: as above.
        let limits = unsafe { inst.get_physical_device_properties(pd) }.limits;
        let host_memory =
            import.then(|| ash::ext::external_memory_host::Device::new(inst, &device));
        let transfer = Queue::new(&device, transfer_family as u32)?;
        let compute = if transfer_family != compute_family {
            Some(Queue::new(&device, compute_family as u32)?)
        } else {
            None
        };
        Ok(Context {
            device,
            physical: pd,
            host_memory,
            memory_properties,
            limits,
            transfer,
            compute,
            instance,
        })
    }

    /// The queue for kernels and fills.
    pub(crate) fn compute_queue(&self) -> &Queue {
        self.compute.as_ref().unwrap_or(&self.transfer)
    }

    /// The queues, transfer first.
    pub(crate) fn queues(&self) -> impl Iterator<Item = &Queue> {
        std::iter::once(&self.transfer).chain(self.compute.as_ref())
    }

    /// Waits until the device is idle, holding every queue's lock (`vkDeviceWaitIdle` needs
    /// every queue externally synchronised): for teardown only, where nothing else may run.
    pub(crate) fn wait_idle(&self) {
        // Transfer first, then compute: the one order in which several queue locks are held.
        let held: Vec<_> = self.queues().map(|q| q.handle.lock()).collect();
        // SAFETY: every queue of the device is locked, so no submission races the wait.
        let _ = unsafe { self.device.device_wait_idle() };
        drop(held);
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.wait_idle();
        // SAFETY: all work was waited for above; the backend destroyed its buffers and memory
        // before dropping the context.
        unsafe {
            for q in self.queues() {
                self.device.destroy_semaphore(q.timeline, None);
                self.device.destroy_command_pool(q.pool.lock().pool, None);
            }
            self.device.destroy_device(None);
        }
    }
}

impl Queue {
    fn new(device: &ash::Device, family: u32) -> Result<Queue> {
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

    /// Submits a recorded command buffer, signalling the next timeline value, which it returns.
    pub(crate) fn submit(&self, device: &ash::Device, cb: vk::CommandBuffer) -> Result<u64> {
        let queue = self.handle.lock();
        let value = self.last.load(Ordering::Acquire) + 1;
        let cbs = [cb];
        let sems = [self.timeline];
        let vals = [value];
        let mut tl = vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&vals);
        let submit = vk::SubmitInfo::default()
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
        let sems = [self.timeline];
        let vals = [value];
        let info = vk::SemaphoreWaitInfo::default()
            .semaphores(&sems)
            .values(&vals);
        // SAFETY: the semaphore is live; a value not yet submitted is never waited for (the
        // caller got it from `submit`).
        unsafe { device.wait_semaphores(&info, u64::MAX) }.map_err(|e| error("vkWaitSemaphores", e))
    }
}
