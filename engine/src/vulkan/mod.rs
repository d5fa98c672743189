//! The Vulkan backend (ash + gpu-allocator).

use std::sync::Arc;

use crate::device::Backend;
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::select::{DeviceConfig, DeviceInfo};

/// Opens the Vulkan device `config` selects.
pub(crate) fn open(
    _config: &DeviceConfig,
    _frames: &Arc<HostFramePool>,
    _why: &str,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    Err(EngineError::NoDevice {
        wanted: "vulkan".into(),
        reason: "backend not built yet".into(),
    })
}
