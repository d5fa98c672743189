//! # hetmem
//!
//! Device memory migration in the manner of Linux HMM (`mm/migrate_device.c`), over a
//! userspace address space, with copies done by [`hetmem_engine`].
//!
//! - [`mm`]: pages, the page map, address spaces with page tables, faults, pins, notifiers.
//! - [`migration`]: `migrate_vma_setup` / `migrate_vma_pages` / `migrate_vma_finalize`,
//!   `migrate_device_range` and friends, with the kernel's `MIGRATE_PFN_*` values.
//! - [`driver`]: [`driver::GpuDriver`], the driver that ships with hetmem.

#![warn(missing_docs)]

pub mod driver;
pub mod error;
pub mod migration;
pub mod mm;

pub use error::{Error, ErrorKind, Result};
pub use hetmem_engine as engine;
