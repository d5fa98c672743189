//! The kernel's device-migration protocol over hetmem's address spaces: `migrate_vma_*` for
//! a range of a mapping, `migrate_device_*` for device pages by frame number.

pub mod device;
mod dst;
mod finalize;
mod hole;
pub mod pfn;
pub mod staged;
mod unmap;
pub mod vma;

pub use device::{
    migrate_device_coherent_page, migrate_device_finalize, migrate_device_pages,
    migrate_device_pfns, migrate_device_range, pin_pages_longterm,
};
pub use pfn::*;
pub use staged::{Collected, Copied, DeviceMigration, InFlight, Migration, Outcome};
pub use vma::{migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup, MigrateVma};
