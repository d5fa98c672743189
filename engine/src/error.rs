//! The engine's one error type.

use crate::pfn::Pfn;

/// What a caller can do about an [`EngineError`], without matching every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The call was wrong (bad pfn, double free, bad configuration): fix the caller.
    Misuse,
    /// Not enough memory of some kind: free or evict, then retry.
    OutOfMemory,
    /// The device is gone; nothing more will run on it.
    DeviceLost,
    /// A failure that may pass on retry (a copy that failed, a busy resource).
    Transient,
    /// No device of the requested kind could be opened.
    Unavailable,
}

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The frame number belongs to no memory this device knows.
    #[error("pfn {0} belongs to no host frame pool or device memory known to this device")]
    UnknownPfn(Pfn),
    /// The frame number names a page that is not allocated.
    #[error("pfn {0} names a page that is free")]
    FreedPfn(Pfn),
    /// The page was freed twice.
    #[error("pfn {0} freed twice")]
    DoubleFree(Pfn),
    /// A home frame is claimed already, or is not part of a reserved home run; or a home run
    /// still has a claimed frame.
    #[error("pfn {0} is in use or is not a free frame of a reserved home run")]
    FrameInUse(Pfn),
    /// The frame belongs to a page map: a live page's frame cannot be freed through the
    /// pool, and a claimed home frame (one a CPU mapping may show) cannot be read, written,
    /// copied or freed by anyone but its page map.
    #[error("pfn {0} belongs to a page map (a live page, or a home frame a CPU mapping may show); only the page map reaches it")]
    FrameOwned(Pfn),
    /// A copy batch names a page twice as destination, or as both source and destination.
    #[error("pfn {0} is written twice, or both read and written, in one copy batch")]
    OverlappingCopy(Pfn),
    /// Device memory (its budget, or the driver's memory) cannot hold the request.
    #[error("out of device memory: {requested} pages requested, {available} available within a budget of {budget_pages}")]
    OutOfDeviceMemory {
        /// Pages asked for.
        requested: usize,
        /// Pages that could still be handed out.
        available: usize,
        /// The budget, in pages.
        budget_pages: usize,
    },
    /// The host frame pool is exhausted.
    #[error("out of host frames: {requested} requested, {available} available")]
    OutOfHostFrames {
        /// Frames asked for.
        requested: usize,
        /// Frames that could still be handed out.
        available: usize,
    },
    /// The device was lost (driver reset, removal).
    #[error("device lost: {0}")]
    DeviceLost(String),
    /// A copy batch did not complete; `failed` lists the indices of the pairs that did not.
    #[error("copy failed for {} of the batch's pairs: {reason}", failed.len())]
    CopyFailed {
        /// Indices into the batch of the pairs that did not complete.
        failed: Vec<usize>,
        /// What went wrong.
        reason: String,
    },
    /// No device of the requested kind is available.
    #[error("no {wanted} device available: {reason}")]
    NoDevice {
        /// The kind that was asked for.
        wanted: String,
        /// Why none could be opened.
        reason: String,
    },
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An error from the Vulkan driver.
    #[error("vulkan: {0}")]
    Vulkan(String),
    /// An error from wgpu.
    #[error("wgpu: {0}")]
    Wgpu(String),
    /// The device cannot do this (kernels on a device without compute, for one).
    #[error("not supported by this device: {0}")]
    Unsupported(String),
    /// A kernel's WGSL did not compile.
    #[error("kernel does not compile: {0}")]
    KernelCompile(String),
    /// A kernel's WGSL parsed but breaks hetmem's binding layout or the device's limits;
    /// refused before any pipeline was made.
    #[error("kernel refused: {0}")]
    KernelRejected(#[from] crate::inspect::KernelRejection),
    /// An operating-system call failed.
    #[error("os: {0}")]
    Os(#[from] std::io::Error),
}

impl EngineError {
    /// Classifies the error for retry decisions.
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::UnknownPfn(_)
            | EngineError::FreedPfn(_)
            | EngineError::DoubleFree(_)
            | EngineError::FrameInUse(_)
            | EngineError::FrameOwned(_)
            | EngineError::OverlappingCopy(_)
            | EngineError::InvalidConfig(_)
            | EngineError::KernelCompile(_)
            | EngineError::KernelRejected(_) => ErrorKind::Misuse,
            EngineError::OutOfDeviceMemory { .. } | EngineError::OutOfHostFrames { .. } => {
                ErrorKind::OutOfMemory
            }
            EngineError::DeviceLost(_) => ErrorKind::DeviceLost,
            EngineError::CopyFailed { .. } | EngineError::Vulkan(_) | EngineError::Wgpu(_) => {
                ErrorKind::Transient
            }
            EngineError::Os(_) => ErrorKind::Transient,
            EngineError::NoDevice { .. } | EngineError::Unsupported(_) => ErrorKind::Unavailable,
        }
    }
}

/// Shorthand for the engine's results.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
