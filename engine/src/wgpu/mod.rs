//! The wgpu backend.

use std::sync::Arc;

use crate::device::Backend;
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::select::{DeviceConfig, DeviceInfo};

/// Opens the wgpu adapter `config` selects.
pub(crate) fn open(
    _config: &DeviceConfig,
    _frames: &Arc<HostFramePool>,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    Err(EngineError::NoDevice {
        wanted: "wgpu".into(),
        reason: "backend not built yet".into(),
    })
}
