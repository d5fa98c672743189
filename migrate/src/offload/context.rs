//! The offload context: one device, its driver, one address space for managed buffers.

use std::sync::Arc;

use hetmem_engine::{Device, DeviceConfig, DeviceInfo};

use super::buffer::Buffer;
use crate::driver::{DriverConfig, DriverStats, GpuDriver};
use crate::error::{Error, Result};
use crate::mm::{AddressSpace, MemoryKind, PageMap, Prot, PAGE};

/// How to build a context.
#[derive(Clone, Debug)]
pub struct ContextConfig {
    /// The device (`DeviceConfig::from_env()` by default: `HETMEM_DEVICE`, `HETMEM_ADAPTER`).
    pub device: DeviceConfig,
    /// Device memory the context may use, in bytes (the device budget).
    pub budget_bytes: u64,
    /// Private or coherent device memory (`None`: coherent where the device offers it).
    pub memory: Option<MemoryKind>,
    /// Pages brought back per CPU fault.
    pub fault_around: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            device: DeviceConfig::from_env().unwrap_or_default(),
            budget_bytes: 1 << 30,
            memory: Some(MemoryKind::DevicePrivate),
            fault_around: 16,
        }
    }
}

pub(crate) struct Inner {
    pub(crate) driver: GpuDriver,
    pub(crate) space: AddressSpace,
}

/// A device with its driver and an address space for managed buffers. Cloning gives
/// another handle.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.device_info().name)
            .finish()
    }
}

impl Context {
    /// Opens the device `config` selects (and says which, through `tracing`), registers its
    /// memory and makes an empty address space.
    pub fn new(config: ContextConfig) -> Result<Context> {
        let device = Device::open(config.device.clone().budget(config.budget_bytes))?;
        let pagemap = PageMap::new(device.frames().clone())?;
        let driver = GpuDriver::new(
            device,
            &pagemap,
            DriverConfig {
                kind: config.memory,
                fault_around: config.fault_around,
                budget_pages: None,
            },
        )?;
        let space = AddressSpace::new(&pagemap);
        Ok(Context {
            inner: Arc::new(Inner { driver, space }),
        })
    }

    /// Which device is used, and why it was chosen.
    pub fn device_info(&self) -> &DeviceInfo {
        self.inner.driver.device().info()
    }

    /// The driver (for its statistics, eviction, budget).
    pub fn driver(&self) -> &GpuDriver {
        &self.inner.driver
    }

    /// The address space the buffers live in.
    pub fn space(&self) -> &AddressSpace {
        &self.inner.space
    }

    /// Counters: bytes each way, faults, evictions, copy and bookkeeping time.
    pub fn stats(&self) -> DriverStats {
        self.inner.driver.stats()
    }

    /// A managed buffer of `bytes` (rounded up to whole pages), zero-filled, on the host
    /// until used elsewhere.
    pub fn alloc(&self, bytes: usize) -> Result<Buffer> {
        if bytes == 0 {
            return Err(Error::EmptyRange);
        }
        let len = (bytes as u64).div_ceil(PAGE) * PAGE;
        let addr = self.inner.space.mmap(None, len, Prot::RW, false)?;
        Ok(Buffer::new(self.clone(), addr, bytes))
    }
}
