//! What ML runtimes call: a [`Context`] that owns a device, its driver and an address space,
//! and managed [`Buffer`]s that move between host and device on request (prefetch, evict),
//! on advice, and on CPU access.

mod buffer;
mod context;
mod grid;
mod view;

pub use crate::driver::{DevicePin, Launch};
pub use buffer::{Advice, Buffer, Location, Prefetch};
pub use context::{Context, ContextConfig};
pub use grid::{workgroups, MAX_WORKGROUPS};
pub use view::{View, ViewMut};
