//! The logical device: its creation on an adapter, its queues (see `queue`), teardown.

use ash::vk;

use super::conv::error;
use super::instance::{Adapter, Instance};
use super::queue::Queue;
use crate::error::Result;

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
