//! # hetmem
//!
//! Device memory migration in the manner of Linux HMM (`mm/migrate_device.c`), over a
//! userspace address space, with copies done by [`hetmem_engine`].
//!
//! - [`mm`]: pages, the page map, address spaces with page tables, faults, pins, notifiers.
//! - [`migration`]: `migrate_vma_setup` / `migrate_vma_pages` / `migrate_vma_finalize`,
//!   `migrate_device_range` and friends, with the kernel's `MIGRATE_PFN_*` values.
//! - [`driver`]: [`driver::GpuDriver`], the driver that ships with hetmem.
//! - [`offload`]: what runtimes call: a [`offload::Context`] and managed [`offload::Buffer`]s.

//!
//! ```
//! use hetmem::offload::{Context, ContextConfig, Location};
//! use hetmem_engine::{DeviceConfig, DeviceKind};
//!
//! # fn main() -> hetmem::Result<()> {
//! // The host device here so the example runs anywhere; `ContextConfig::default()` picks a
//! // GPU (or lavapipe) when there is one.
//! let config = ContextConfig {
//!     device: DeviceConfig::default().kind(DeviceKind::Host),
//!     budget_bytes: 4 << 20,
//!     ..ContextConfig::default()
//! };
//! let ctx = Context::new(config)?;
//! let kv = ctx.alloc(1 << 20)?; // a 1 MiB managed buffer
//! kv.write(0, b"key-value block 0")?;
//! let moved = kv.prefetch(0..kv.len(), Location::Device)?.wait()?; // to the device
//! assert_eq!(moved.migrated, 256);
//! let mut back = [0u8; 17];
//! kv.read(0, &mut back)?; // a CPU access faults the page (and its neighbours) back
//! assert_eq!(&back, b"key-value block 0");
//! assert_eq!(ctx.stats().faults, 1);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod addr;
pub mod cpu;
pub mod driver;
pub mod error;
pub mod migration;
pub mod mm;
pub mod offload;

pub use addr::{Owner, VirtAddr};
pub use error::{Error, ErrorKind, Result};

/// The README's examples, run as doc tests so that none can fail as written.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
pub use hetmem_engine as engine;
