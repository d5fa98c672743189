//! Conversions between Vulkan's types and hetmem's.

use ash::vk;

use crate::config::DeviceType;
use crate::copy::CopyGroup;
use crate::error::EngineError;

/// Turns a Vulkan result code from call `what` into the engine's error.
pub(crate) fn error(what: &str, e: vk::Result) -> EngineError {
    match e {
        vk::Result::ERROR_DEVICE_LOST => EngineError::DeviceLost(what.to_string()),
        vk::Result::ERROR_OUT_OF_DEVICE_MEMORY | vk::Result::ERROR_OUT_OF_HOST_MEMORY => {
            EngineError::OutOfDeviceMemory {
                requested: 0,
                available: 0,
                budget_pages: 0,
            }
        }
        other => EngineError::Vulkan(format!("{what}: {other}")),
    }
}

/// What sort of hardware a physical device is, in hetmem's terms.
pub(crate) fn device_type(t: vk::PhysicalDeviceType) -> DeviceType {
    match t {
        vk::PhysicalDeviceType::DISCRETE_GPU => DeviceType::Discrete,
        vk::PhysicalDeviceType::INTEGRATED_GPU => DeviceType::Integrated,
        vk::PhysicalDeviceType::VIRTUAL_GPU => DeviceType::Virtual,
        vk::PhysicalDeviceType::CPU => DeviceType::Cpu,
        _ => DeviceType::Other,
    }
}

/// A plan's copy group as Vulkan copy regions, in the group's order.
pub(crate) fn regions(g: &CopyGroup) -> Vec<vk::BufferCopy> {
    g.regions
        .iter()
        .map(|r| vk::BufferCopy {
            src_offset: r.src_offset,
            dst_offset: r.dst_offset,
            size: r.size,
        })
        .collect()
}
