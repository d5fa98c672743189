//! # hetmem
//!
//! Device memory migration in the manner of Linux HMM, over a userspace address space, with
//! copies done by [`hetmem_engine`]. The migration layer is being built; today this crate
//! re-exports the engine.

#![warn(missing_docs)]

pub use hetmem_engine as engine;
