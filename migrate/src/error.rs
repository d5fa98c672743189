//! The crate's one error type.

use hetmem_engine::{EngineError, Pfn};

use crate::addr::VirtAddr;

/// What a caller can do about an [`Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The call was wrong: fix the caller.
    Misuse,
    /// An access the mapping does not allow (no read, or a write to read-only memory).
    Access,
    /// Memory ran out: evict or free, then retry.
    OutOfMemory,
    /// The device is gone.
    DeviceLost,
    /// May pass on retry (a busy page, a failed copy).
    Transient,
    /// This machine or process cannot do it (CPU pointers without userfaultfd).
    Unavailable,
}

/// Errors of the migration layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An address or length is not page-aligned.
    #[error("address {0:#x} is not page-aligned")]
    Unaligned(u64),
    /// `start >= end`, or a zero length.
    #[error("empty range")]
    EmptyRange,
    /// No mapping covers the address.
    #[error("address {0:#x} is not mapped")]
    NotMapped(VirtAddr),
    /// The range spans more than one mapping (or a gap).
    #[error("range {start:#x}..{end:#x} is not inside one mapping")]
    AcrossVmas {
        /// Start of the range.
        start: VirtAddr,
        /// End of the range.
        end: VirtAddr,
    },
    /// The mapping allows no access at all, so it cannot be migrated.
    #[error("mapping at {0:#x} allows no access")]
    NoAccess(VirtAddr),
    /// A read of memory mapped without read permission.
    #[error("read of {0:#x} denied")]
    ReadDenied(VirtAddr),
    /// A write of memory mapped read-only.
    #[error("write of {0:#x} denied: read-only mapping")]
    WriteDenied(VirtAddr),
    /// `src` or `dst` is shorter than the range's page count.
    #[error("{which} array has {got} entries, {needed} needed")]
    ShortArray {
        /// `src` or `dst`.
        which: &'static str,
        /// Entries needed.
        needed: usize,
        /// Entries given.
        got: usize,
    },
    /// The fault page is not a locked device-private page.
    #[error("fault page {0} is not a locked device-private page")]
    BadFaultPage(Pfn),
    /// The frame number names no registered page.
    #[error("pfn {0} is not a registered page")]
    UnknownPfn(Pfn),
    /// The page is free.
    #[error("page {0} is free")]
    PageFree(Pfn),
    /// The page is already in use (mapped, or named twice).
    #[error("page {0} is already in use")]
    PageInUse(Pfn),
    /// A destination page is not locked.
    #[error("destination page {0} is not locked")]
    NotLocked(Pfn),
    /// The range overlaps a registered one.
    #[error("frames from {0} are already registered")]
    RangeRegistered(Pfn),
    /// The page map holds no more ranges.
    #[error("too many registered ranges")]
    TooManyRanges,
    /// The address range is already mapped.
    #[error("range at {0:#x} is already mapped")]
    AlreadyMapped(VirtAddr),
    /// The page is busy (pinned, locked elsewhere) and could not be migrated.
    #[error("page {0} is busy")]
    Busy(Pfn),
    /// A device could not bring a page back on a fault (the kernel's SIGBUS).
    #[error("fault at {addr:#x} failed: {reason}")]
    FaultFailed {
        /// The faulting address.
        addr: VirtAddr,
        /// Why.
        reason: String,
    },
    /// A long-term pin found a device-coherent page: it must be migrated to host first.
    #[error("page {0} is device-coherent: migrate it before a long-term pin")]
    CoherentPin(Pfn),
    /// The buffer was freed.
    #[error("the buffer was freed")]
    Freed,
    /// A range runs past the end of its buffer.
    #[error("range {start}..{end} is out of bounds of a {size}-byte buffer")]
    OutOfBounds {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
        /// The buffer's size.
        size: usize,
    },
    /// A request needs more device pages at once than the budget holds.
    #[error("{pages} pages requested at once, the device budget is {budget}")]
    OverBudget {
        /// Pages requested.
        pages: usize,
        /// The budget in pages.
        budget: usize,
    },
    /// A kernel loaded or stored outside the ranges its launch bound (or, which pinning
    /// prevents, a page that was not on the device); the access read zeros and wrote nothing.
    #[error("a kernel touched byte {offset} of its buffer {buffer}{}, outside the range the launch bound ({accesses} such accesses)", addr.map_or(" (not bound)".to_string(), |a| format!(" (bound at {a:#x})")))]
    KernelFault {
        /// The buffer, as its index in the launch's list.
        buffer: usize,
        /// The address of the buffer's byte 0 as the kernel sees it (the start of the page
        /// holding the bound range's first byte); `None` if the launch bound no buffer
        /// with that index.
        addr: Option<VirtAddr>,
        /// The byte offset of the first such access from `addr`.
        offset: u64,
        /// Loads and stores that fell outside.
        accesses: u32,
    },
    /// A CPU access to a buffer found a page held on the device by a launch (running, or not
    /// yet waited on) or by a `pin_on_device` guard; nothing was written. Wait for (or drop)
    /// the launch, or drop the guard, and try again.
    #[error(
        "byte {offset} of the buffer at {addr:#x} is held on the device by a kernel launch or pin"
    )]
    HeldOnDevice {
        /// The buffer's address.
        addr: VirtAddr,
        /// The byte offset in the buffer of the first held byte the access touches.
        offset: usize,
    },
    /// A page of a buffer could not be brought to the device and held there for a pin or a
    /// launch (other threads kept moving it, or its copies failed); nothing is pinned. Try
    /// again.
    #[error("byte {offset} of the buffer at {addr:#x} could not be brought to the device and held there")]
    BufferBusy {
        /// The buffer's address.
        addr: VirtAddr,
        /// The byte offset in the buffer of the page that could not be held.
        offset: usize,
    },
    /// This thread holds the address space's map lock shared (a migration between setup and
    /// finalize, or a fault callback): munmap, mremap, mprotect and fork, which need it
    /// exclusively, would wait for it forever, and so would an access to a page under
    /// migration (it may be the thread's own).
    #[error("this thread has a migration or fault of the address space in progress")]
    MigrationInProgress,
    /// A callback (a notifier told of a munmap, mprotect, mremap or fork) called back into
    /// the address space whose mappings this thread is changing: it would wait for itself.
    /// Also what a CPU fault through a pointer records when a notifier touched a page that
    /// cannot be served from inside its invalidation (see `mm::Notifier::invalidate`).
    #[error("called back into an address space while this thread changes its mappings")]
    Reentrant,
    /// No free range of the address space is large enough.
    #[error("no free range of {0:#x} bytes in the address space")]
    NoAddressSpace(u64),
    /// A fault made no progress: the page stayed where it was after every retry.
    #[error("fault at {addr:#x} made no progress after {tries} tries")]
    NoProgress {
        /// The faulting address.
        addr: VirtAddr,
        /// Attempts made.
        tries: u32,
    },
    /// A launch over this many invocations cannot be dispatched at once: more than
    /// 65 535 workgroups per dimension in all three, or more invocations than the `u32`
    /// index of `hm_invocation` reaches. Split the range over several launches.
    #[error("{invocations} invocations do not fit one launch (65 535 workgroups per dimension, 2^32 invocations)")]
    TooManyInvocations {
        /// Invocations the range needs.
        invocations: u64,
    },
    /// An argument out of its domain.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// CPU pointers into managed memory cannot be had here (no userfaultfd, not permitted,
    /// a kernel too old); the reason says which and what to do. `Buffer::read` and
    /// `Buffer::write` work regardless.
    #[error("CPU pointers are unavailable: {0}")]
    PointersUnavailable(String),
    /// The buffer was not allocated for CPU pointers (`Context::alloc_mapped` makes one that
    /// is).
    #[error("the buffer has no CPU mapping (allocate it with Context::alloc_mapped)")]
    NotCpuMapped,
    /// A view of the buffer's memory (`Buffer::view` / `view_mut`) is alive: the call would
    /// change or free bytes that a Rust reference is reading, or would alias a `&mut`.
    #[error("a view of the buffer is alive")]
    ViewActive,
    /// From the engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl Error {
    /// Classifies the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::ReadDenied(_)
            | Error::WriteDenied(_)
            | Error::NoAccess(_)
            | Error::KernelFault { .. } => ErrorKind::Access,
            Error::Busy(_) | Error::FaultFailed { .. } | Error::ViewActive => ErrorKind::Transient,
            Error::PointersUnavailable(_) => ErrorKind::Unavailable,
            Error::OverBudget { .. } | Error::NoAddressSpace(_) => ErrorKind::OutOfMemory,
            Error::NoProgress { .. } => ErrorKind::Transient,
            Error::HeldOnDevice { .. } | Error::BufferBusy { .. } => ErrorKind::Transient,
            Error::Engine(e) => match e.kind() {
                hetmem_engine::ErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
                hetmem_engine::ErrorKind::DeviceLost => ErrorKind::DeviceLost,
                hetmem_engine::ErrorKind::Misuse => ErrorKind::Misuse,
                _ => ErrorKind::Transient,
            },
            _ => ErrorKind::Misuse,
        }
    }
}

/// Shorthand for the crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;
