//! Opening the backend on an adapter: the logical device, the allocator, what the device
//! offers (host import, host-visible device memory, the gather kernel) and the
//! [`DeviceInfo`] that says what was chosen and why.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ash::vk;
use gpu_allocator::vulkan::{Allocator, AllocatorCreateDesc};
use gpu_allocator::{AllocationSizes, AllocatorDebugSettings};
use parking_lot::{Mutex, RwLock};

use super::context::Context;
use super::deferred::Graveyard;
use super::{copier, gather, instance, VulkanBackend};
use crate::backend::Backend;
use crate::config::{
    DeviceConfig, DeviceInfo, DeviceKind, DeviceType, GatherMode, HostAccess, HostAccessMode,
};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::retire::Retirement;

/// Opens the Vulkan device `config` selects.
pub(crate) fn open(
    config: &DeviceConfig,
    frames: &Arc<HostFramePool>,
    why: &str,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    let inst = instance::Instance::new()?;
    let adapters = inst.adapters()?;
    let (adapter, reason) = instance::choose(&adapters, config.adapter.as_deref())?;
    let import = config.host_access == HostAccessMode::Auto;
    let ctx = Context::new(inst, &adapter, import)?;
    let host_access = if ctx.host_memory.is_some() {
        HostAccess::Import
    } else {
        HostAccess::Staging
    };
    let allocator = Allocator::new(&AllocatorCreateDesc {
        instance: ctx.instance.instance.clone(),
        device: ctx.device.clone(),
        physical_device: ctx.physical,
        debug_settings: AllocatorDebugSettings::default(),
        buffer_device_address: false,
        allocation_sizes: AllocationSizes::default(),
    })
    .map_err(|e| EngineError::Vulkan(format!("gpu-allocator: {e}")))?;
    let host_visible_memory = {
        let mp = &ctx.memory_properties;
        let want = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
        let local = mp.memory_types[..mp.memory_type_count as usize]
            .iter()
            .filter(|t| {
                t.property_flags
                    .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
            });
        local.clone().count() > 0 && local.clone().all(|t| t.property_flags.contains(want))
    };
    let info = DeviceInfo {
        kind: DeviceKind::Vulkan,
        name: adapter.name.clone(),
        device_type: adapter.device_type,
        reason: format!("{why}: {reason}"),
        host_access,
        dedicated_transfer_queue: ctx.compute.is_some(),
        host_visible_memory,
    };
    let gather = match config.gather {
        GatherMode::Never => None,
        _ => match gather::Gather::new(&ctx) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!("gather kernel unavailable, copying regions only: {e}");
                None
            }
        },
    };
    let cpu_device = adapter.device_type == DeviceType::Cpu;
    let cpu_assist =
        cpu_device && host_access == HostAccess::Import && host_visible_memory && config.cpu_assist;
    let copier = cpu_assist.then(|| start_copier(&ctx)).flatten();
    let backend = VulkanBackend {
        cpu_device,
        cpu_assist,
        copier,
        gather,
        gather_mode: config.gather,
        frames: frames.clone(),
        allocator: Mutex::new(Some(allocator)),
        chunks: RwLock::new(Vec::new()),
        imports: RwLock::new((0..frames.segments()).map(|_| None).collect()),
        staging: Mutex::new(Vec::new()),
        in_flight: [Retirement::default(), Retirement::default()],
        kernels: Mutex::new(HashMap::new()),
        tables: Mutex::new(HashMap::new()),
        graveyard: Graveyard::default(),
        next_id: AtomicU64::new(1),
        host_access,
        ctx,
    };
    Ok((info, Box::new(backend)))
}

/// The CPU copier of a CPU device, or `None` (logged) if its thread cannot start: queued
/// batches then go to the queue.
fn start_copier(ctx: &Context) -> Option<copier::Copier> {
    copier::Copier::new(&ctx.device)
        .inspect_err(|e| tracing::warn!("no CPU copier, queued batches go to the queue: {e}"))
        .ok()
}
