//! `GpuDriver`: the driver that ships with hetmem. It owns one engine device, registers its
//! memory as a device pagemap, moves ranges between host and device with one batched copy per
//! migration, serves CPU faults with a fault-around window, and evicts least recently used
//! pages under a budget.

mod access;
mod evict;
mod gpu;
mod migrate;
mod ops;
mod table;

pub use gpu::{DriverConfig, DriverStats, GpuDriver, CHUNK_PAGES, MAX_FAULT_AROUND};
pub use table::{DevicePin, Launch};
