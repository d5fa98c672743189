//! Choosing a device: the backend `DeviceConfig::kind` names, or by preference (a discrete
//! GPU, then any Vulkan device, lavapipe included, then the host device).

use std::sync::Arc;

use crate::backend::Backend;
use crate::config::{DeviceConfig, DeviceInfo, DeviceKind};
use crate::error::Result;
use crate::frames::HostFramePool;

/// Opens the backend `config` asks for, or the preferred one.
pub(crate) fn open_backend(
    config: &DeviceConfig,
    frames: &Arc<HostFramePool>,
) -> Result<(DeviceInfo, Box<dyn Backend>)> {
    match config.kind {
        Some(DeviceKind::Host) => Ok(crate::host::open(frames, "asked for the host device")),
        Some(DeviceKind::Vulkan) => crate::vulkan::open(config, frames, "asked for Vulkan"),
        Some(DeviceKind::Wgpu) => crate::wgpu::open(config, frames),
        None => match crate::vulkan::open(config, frames, "preferred device") {
            Ok(opened) => Ok(opened),
            Err(e) => {
                let why = format!("fell back to the host device: no usable Vulkan device ({e})");
                tracing::warn!("{why}");
                Ok(crate::host::open(frames, &why))
            }
        },
    }
}
