//! How to open a device ([`DeviceConfig`], read from `HETMEM_DEVICE` / `HETMEM_ADAPTER` /
//! `HETMEM_GATHER` or built in code) and what was opened ([`DeviceInfo`]). The choice itself
//! is made in `select`.

use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::pagemap::DEFAULT_CHUNK_BYTES;

/// The backend a device runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Vulkan through ash and gpu-allocator: the performance path.
    Vulkan,
    /// wgpu: the portable path.
    Wgpu,
    /// The software device: device memory is a separate host arena, copies are memcpy.
    Host,
}

impl std::str::FromStr for DeviceKind {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(DeviceKind::Vulkan),
            "wgpu" => Ok(DeviceKind::Wgpu),
            "host" | "cpu" => Ok(DeviceKind::Host),
            other => Err(EngineError::InvalidConfig(format!(
                "unknown device kind {other:?} (expected vulkan, wgpu or host)"
            ))),
        }
    }
}

/// What sort of hardware a device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// A discrete GPU.
    Discrete,
    /// A GPU that shares memory with the CPU.
    Integrated,
    /// A virtual GPU.
    Virtual,
    /// A Vulkan implementation on the CPU, such as lavapipe.
    Cpu,
    /// The built-in host device.
    Software,
    /// Anything else.
    Other,
}

/// How copies reach host frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostAccess {
    /// Host frames are imported into the device (`VK_EXT_external_memory_host`) and copied
    /// in place.
    Import,
    /// Copies go through a device-visible staging buffer.
    Staging,
    /// The device is the CPU: it reads and writes frames directly.
    Direct,
}

/// Which host-access path to use where there is a choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum HostAccessMode {
    /// Import where the device supports it, else staging.
    #[default]
    Auto,
    /// Always stage (used by tests to cover the fallback).
    Staging,
}

/// When scattered pages go through the gather kernel instead of copy regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum GatherMode {
    /// By the engine's measured threshold.
    #[default]
    Auto,
    /// Never: always copy regions.
    Never,
    /// Whenever the backend has the kernel and the objects can be bound.
    Always,
}

/// How to open a device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The backend; `None` chooses by preference.
    pub kind: Option<DeviceKind>,
    /// A substring of the adapter name to pick (case-insensitive).
    pub adapter: Option<String>,
    /// Most device memory the device may hold, in bytes.
    pub budget_bytes: u64,
    /// Bytes per chunk of device memory.
    pub chunk_bytes: u64,
    /// Import host frames or stage copies.
    pub host_access: HostAccessMode,
    /// Gather kernel policy.
    pub gather: GatherMode,
    /// The host frame pool; `None` uses [`HostFramePool::global`].
    pub frames: Option<Arc<HostFramePool>>,
    /// On a CPU Vulkan device (lavapipe), let the calling thread copy part of each large
    /// batch beside the queue, and copy queued batches (`Device::copy_queued`) on hetmem's
    /// copier thread with streaming stores instead of lavapipe's queue
    /// (`HETMEM_CPU_ASSIST=0` turns both off).
    pub cpu_assist: bool,
}

impl Default for DeviceConfig {
    /// Preference order, a 1 GiB budget, 64 MiB chunks; the environment is not read.
    fn default() -> Self {
        DeviceConfig {
            kind: None,
            adapter: None,
            budget_bytes: 1 << 30,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            host_access: HostAccessMode::Auto,
            gather: GatherMode::Auto,
            frames: None,
            cpu_assist: true,
        }
    }
}

impl DeviceConfig {
    /// The default configuration with `HETMEM_DEVICE` (vulkan, wgpu, host),
    /// `HETMEM_ADAPTER` (name substring) and `HETMEM_GATHER` (auto, never, always) applied.
    /// An unknown value is an error.
    pub fn from_env() -> Result<Self> {
        let mut c = DeviceConfig::default();
        if let Ok(v) = std::env::var("HETMEM_DEVICE") {
            if !v.trim().is_empty() {
                c.kind = Some(v.parse()?);
            }
        }
        if let Ok(v) = std::env::var("HETMEM_GATHER") {
            c.gather = match v.trim() {
                "" | "auto" => GatherMode::Auto,
                "never" | "off" => GatherMode::Never,
                "always" | "on" => GatherMode::Always,
                other => {
                    return Err(EngineError::InvalidConfig(format!(
                        "HETMEM_GATHER={other:?} (expected auto, never or always)"
                    )))
                }
            };
        }
        if let Ok(v) = std::env::var("HETMEM_CPU_ASSIST") {
            c.cpu_assist = !matches!(v.trim(), "0" | "false" | "off");
        }
        if let Ok(v) = std::env::var("HETMEM_ADAPTER") {
            if !v.trim().is_empty() {
                c.adapter = Some(v);
            }
        }
        Ok(c)
    }

    /// Sets the backend.
    pub fn kind(mut self, kind: DeviceKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// Sets the budget in bytes.
    pub fn budget(mut self, bytes: u64) -> Self {
        self.budget_bytes = bytes;
        self
    }

    /// Sets the chunk size in bytes.
    pub fn chunk(mut self, bytes: u64) -> Self {
        self.chunk_bytes = bytes;
        self
    }
}

/// The device that was opened, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The backend.
    pub kind: DeviceKind,
    /// The adapter's name.
    pub name: String,
    /// What sort of hardware it is.
    pub device_type: DeviceType,
    /// Why this device was chosen.
    pub reason: String,
    /// How copies reach host frames.
    pub host_access: HostAccess,
    /// True if copies run on a queue family with transfer but neither graphics nor compute.
    pub dedicated_transfer_queue: bool,
    /// True if device memory is also host-visible and coherent (CPU access without copies).
    pub host_visible_memory: bool,
}
