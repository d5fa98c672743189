//! The interface between a device and its backend (Vulkan, wgpu, host): the [`Backend`]
//! trait, and what every backend decides or does the same way (whether a group goes through
//! the gather kernel, host-to-host copies, the kernels' fixed bindings).

use crate::config::GatherMode;
use crate::copy::{CopyGroup, CopyPlan, Place};
use crate::error::{EngineError, Result};
use crate::frames::HostFramePool;
use crate::inspect::KernelLimits;
use crate::memcopy::{copy_spans, Span, STREAM_MIN_BYTES};

/// What a backend reports about a batch it accepted.
pub(crate) struct Submitted {
    /// Completion value to wait for.
    pub(crate) value: u64,
    /// Pages copied by the gather kernel rather than by copy regions.
    pub(crate) gathered_pages: usize,
}

/// The operations every backend (vulkan, wgpu, host) provides.
pub(crate) trait Backend: Send + Sync {
    /// Creates chunk `index` of `bytes`, zero-filled and committed.
    fn alloc_chunk(&self, index: usize, bytes: u64) -> Result<()>;
    /// Releases chunk `index` once no submitted work uses it.
    fn free_chunk(&self, index: usize);
    /// Records and submits a batch. With `queue_only`, the calling thread does none of the
    /// copying (a CPU device may otherwise share it).
    fn submit(&self, plan: &CopyPlan, queue_only: bool) -> Result<Submitted>;
    /// True once the batch with this value has completed (and its results are visible).
    fn poll(&self, value: u64) -> Result<bool>;
    /// Blocks until the batch with this value has completed.
    fn wait(&self, value: u64) -> Result<()>;
    /// Fills whole device pages with zeros before returning.
    fn zero_pages(&self, pages: &[Place]) -> Result<()>;
    /// Copies bytes out of device memory, synchronously.
    fn read(&self, at: Place, out: &mut [u8]) -> Result<()>;
    /// Copies bytes into device memory, synchronously.
    fn write(&self, at: Place, data: &[u8]) -> Result<()>;

    /// What one kernel may bind and use on this device; an error says why kernels cannot
    /// run on it.
    fn kernel_limits(&self) -> Result<KernelLimits> {
        Err(EngineError::Unsupported(
            "kernels run on the Vulkan backend only".into(),
        ))
    }
    /// Builds the pipeline of `entry` in `spirv`, binding `chunks` chunks; returns its id.
    fn create_kernel(&self, spirv: &[u32], entry: &str, chunks: u32) -> Result<u64> {
        let _ = (spirv, entry, chunks);
        Err(EngineError::Unsupported(
            "kernels run on the Vulkan backend only".into(),
        ))
    }
    /// Destroys a kernel once no dispatch uses it.
    fn destroy_kernel(&self, id: u64) {
        let _ = id;
    }
    /// Allocates a zeroed table of `words` 32-bit words that the host writes and kernels
    /// read; returns its id and host address.
    fn alloc_table(&self, words: usize) -> Result<(u64, std::ptr::NonNull<u32>)> {
        let _ = words;
        Err(EngineError::Unsupported(
            "kernels run on the Vulkan backend only".into(),
        ))
    }
    /// Frees a table once no dispatch uses it.
    fn free_table(&self, id: u64) {
        let _ = id;
    }
    /// Objects (kernels, tables, chunks) let go of but not destroyed yet, because a
    /// submission that may use them has not completed.
    fn deferred_destroys(&self) -> usize {
        0
    }
    /// Submits one dispatch of `kernel` over `groups`, binding `table`, `meta` and chunks
    /// `0..chunks`; returns the completion value.
    fn dispatch(
        &self,
        kernel: u64,
        table: u64,
        chunks: u32,
        meta: &[u32],
        groups: [u32; 3],
    ) -> Result<u64> {
        let _ = (kernel, table, chunks, meta, groups);
        Err(EngineError::Unsupported(
            "kernels run on the Vulkan backend only".into(),
        ))
    }
}

/// Bindings every kernel has before the device's chunks: the page table and the launch's
/// metadata (the helper declares them; the chunks follow).
pub(crate) const FIXED_BINDINGS: u32 = 2;

/// Gather pays off for a group of at least this many regions...
const GATHER_MIN_REGIONS: usize = 64;
/// ...whose regions average at most this many pages (longer runs copy faster as regions).
const GATHER_MAX_PAGES_PER_REGION: usize = 4;

/// Whether group `g`, which the backend is able to gather (it has the kernel and can bind
/// both objects), goes through the gather kernel rather than copy regions. This is where the
/// choice is made for every backend: `GatherMode::Auto` uses the thresholds above, measured
/// on lavapipe with `cargo bench --bench copy` (scattered 4 KiB pages: kernel vs regions).
pub(crate) fn gather_wanted(mode: GatherMode, cpu_device: bool, g: &CopyGroup) -> bool {
    match mode {
        GatherMode::Never => false,
        GatherMode::Always => true,
        // On a CPU device the kernel measured slower than regions (lavapipe, 65 536
        // scattered pages: 126 ms against 82 ms), so Auto keeps it for GPUs.
        GatherMode::Auto => {
            !cpu_device
                && g.regions.len() >= GATHER_MIN_REGIONS
                && g.pages() <= g.regions.len() * GATHER_MAX_PAGES_PER_REGION
        }
    }
}

/// Copies group `g`, whose source and destination are both host frames, on the calling
/// thread now: no device takes part in a host-to-host copy.
pub(crate) fn copy_frames(frames: &HostFramePool, g: &CopyGroup) {
    debug_assert!(!g.src.is_device() && !g.dst.is_device());
    let spans: Vec<Span> = g
        .regions
        .iter()
        .map(|r| Span {
            src: frames.place_ptr(Place {
                memory: g.src,
                offset: r.src_offset,
            }),
            dst: frames.place_ptr(Place {
                memory: g.dst,
                offset: r.dst_offset,
            }),
            len: r.size as usize,
        })
        .collect();
    let bytes: u64 = g.regions.iter().map(|r| r.size).sum();
    // SAFETY: both sides of each span are allocated frames that the plan resolved; the plan
    // refused batches in which a frame is both read and written, so they do not overlap.
    unsafe { copy_spans(&spans, bytes >= STREAM_MIN_BYTES) };
}
