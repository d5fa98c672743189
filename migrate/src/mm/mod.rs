//! The address-space model: pages, the page map, page tables, mappings, faults, pins and
//! notifiers. It knows nothing of migration; drivers reach it through [`PagemapOps`].

pub mod fault;
pub mod locks;
pub mod notifier;
pub mod page;
pub mod page_guard;
mod page_lock;
pub mod pagemap;
pub mod pin;
pub mod pte;
pub mod range_fault;
pub(crate) mod released;
pub mod space;
mod sync;

pub(crate) use crate::addr::page_addrs;
pub use crate::addr::{Owner, VirtAddr};
pub use fault::FAULT_TRIES;
pub use notifier::{Notifier, NotifyEvent, NotifyRange};
pub use page::{flags, Mapping, MemoryKind, Page};
pub use page_guard::{LockedPage, NewPage};
pub use pagemap::{DevicePagemap, FaultContext, FrameAccess, PageMap, PagemapOps};
pub use pin::{pin_pages, PinGuard};
pub use pte::{MigrationKind, Pte};
pub use range_fault::{hmm_range_fault, snapshot, HmmPfn, PageState};
pub use space::{AddressSpace, Home, MremapFlags, NotifierId, Prot, SpaceId, Vma, PAGE};
