//! # hetmem-engine
//!
//! The engine under hetmem: devices (Vulkan, wgpu, or the built-in host device), device memory
//! carved into numbered 4 KiB pages, a pool of numbered host frames, and a copy engine that
//! moves batches of pages between them in one submission.
//!
//! The engine knows frame numbers ([`Pfn`]) and nothing of address spaces: the migration layer
//! (crate `hetmem`) decides what moves where.
//!
//! ```
//! use hetmem_engine::{Device, DeviceConfig, DeviceKind, PAGE_SIZE};
//!
//! # fn main() -> Result<(), hetmem_engine::EngineError> {
//! let device = Device::open(DeviceConfig::default().kind(DeviceKind::Host).budget(16 << 20))?;
//! let frames = device.frames().alloc_batch(4, true)?;
//! device.frames().write(frames[0], 0, b"hello")?;
//! let pages = device.alloc_pages(4, true)?;
//! let there: Vec<_> = frames.iter().copied().zip(pages.iter().copied()).collect();
//! device.copy(&there)?.wait()?;
//! let mut back = [0u8; 5];
//! device.read_page(pages[0], 0, &mut back)?;
//! assert_eq!(&back, b"hello");
//! assert_eq!(device.stats().regions, 1); // four consecutive pages, one copy region
//! device.free_pages(&pages)?;
//! device.frames().free_batch(&frames)?;
//! # let _ = PAGE_SIZE;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod backend;
mod bitmap;
mod config;
mod copy;
mod device;
mod error;
mod frames;
mod host;
mod inject;
mod inspect;
mod kernel;
mod memcopy;
mod pagemap;
mod pfn;
mod retire;
mod select;
mod slots;
mod spirv;
mod vulkan;
mod wgpu;

pub use config::{
    DeviceConfig, DeviceInfo, DeviceKind, DeviceType, GatherMode, HostAccess, HostAccessMode,
};
pub use device::{CopyStats, Device, Ticket};
pub use error::{EngineError, ErrorKind, Result};
pub use frames::HostFramePool;
pub use inspect::KernelRejection;
pub use kernel::{FaultSite, Kernel, PageTable, KERNEL_HELPER};
pub use pagemap::DEFAULT_CHUNK_BYTES;
pub use pfn::{Pfn, PfnRange, PAGE_SHIFT, PAGE_SIZE};

/// Test hooks and the copy plan's types, for hetmem's own tests and benchmarks (the
/// `testing` feature): not part of the API.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::copy::{CopyGroup, CopyPlan, MemoryId, Place, Region};
}
