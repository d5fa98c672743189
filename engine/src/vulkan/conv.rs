//! Conversions between Vulkan's types and hetmem's.

use ash::vk;

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
