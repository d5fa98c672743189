//! User compute kernels over device pages: WGSL source with hetmem's helper
//! (`shaders/hetmem.wgsl`) in front, compiled to SPIR-V with naga, and page tables that
//! map a window of virtual pages to device pages for them.

use std::fmt::Write as _;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::device::Device;
use crate::error::{EngineError, Result};
use crate::pfn::Pfn;

/// The helper every kernel is compiled with.
pub const KERNEL_HELPER: &str = include_str!("../../shaders/hetmem.wgsl");

/// Words of a page table before its first entry (fault count, first fault, two reserved).
pub(crate) const TABLE_HEADER_WORDS: usize = 4;

/// The marker in the helper that the device's chunk bindings replace.
const CHUNKS_MARKER: &str = "//@hetmem-chunks";

/// Bindings the helper declares before the chunks.
pub(crate) const FIXED_BINDINGS: u32 = 2;

/// The full WGSL of a kernel for a device with `chunks` chunks of `chunk_pages` pages.
pub(crate) fn assemble(user: &str, chunks: u32, chunk_pages: u32) -> String {
    let mut gen = String::new();
    let _ = writeln!(gen, "const HM_CHUNK_PAGES: u32 = {chunk_pages}u;");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "@group(0) @binding({}) var<storage, read_write> hm_chunk{c}: array<vec4<u32>>;",
            c + FIXED_BINDINGS
        );
    }
    gen.push_str("fn hm_chunk_load(c: u32, i: u32) -> u32 {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "        case {c}u: {{ return hm_chunk{c}[i >> 2u][i & 3u]; }}"
        );
    }
    gen.push_str("        default: { return 0u; }\n    }\n}\n");
    gen.push_str("fn hm_chunk_load4(c: u32, q: u32) -> vec4<u32> {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(gen, "        case {c}u: {{ return hm_chunk{c}[q]; }}");
    }
    gen.push_str("        default: { return vec4<u32>(); }\n    }\n}\n");
    gen.push_str("fn hm_chunk_store4(c: u32, q: u32, v: vec4<u32>) {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(gen, "        case {c}u: {{ hm_chunk{c}[q] = v; }}");
    }
    gen.push_str("        default: {}\n    }\n}\n");
    gen.push_str("fn hm_chunk_store(c: u32, i: u32, v: u32) {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "        case {c}u: {{ hm_chunk{c}[i >> 2u][i & 3u] = v; }}"
        );
    }
    gen.push_str("        default: {}\n    }\n}\n");
    let helper = KERNEL_HELPER.replacen(CHUNKS_MARKER, &gen, 1);
    format!("{helper}\n// ---- user kernel ----\n{user}")
}

/// Compiles WGSL to SPIR-V words for entry point `entry`.
pub(crate) fn compile(source: &str, entry: &str) -> Result<Vec<u32>> {
    crate::spirv::wgsl_to_spirv(source, entry).map_err(EngineError::KernelCompile)
}

/// A compiled kernel, ready to dispatch on the device that compiled it.
pub struct Kernel {
    pub(crate) device: Device,
    pub(crate) id: u64,
    entry: String,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("entry", &self.entry)
            .finish()
    }
}

impl Kernel {
    pub(crate) fn new(device: Device, id: u64, entry: &str) -> Kernel {
        Kernel {
            device,
            id,
            entry: entry.to_string(),
        }
    }

    /// The entry point.
    pub fn entry(&self) -> &str {
        &self.entry
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.device.destroy_kernel(self.id);
    }
}

/// A page table in memory the device reads: entry `i` names the device page that holds
/// virtual page `i` of some window, or nothing. Kernels translate through it (see
/// [`KERNEL_HELPER`]); whoever moves pages keeps it current.
pub struct PageTable {
    pub(crate) device: Device,
    pub(crate) id: u64,
    words: NonNull<AtomicU32>,
    entries: usize,
}

// SAFETY: the table's words are only touched through atomics, and the memory lives until the
// table is dropped.
unsafe impl Send for PageTable {}
// SAFETY: as for `Send`.
unsafe impl Sync for PageTable {}

impl std::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageTable")
            .field("entries", &self.entries)
            .finish()
    }
}

impl PageTable {
    pub(crate) fn new(device: Device, id: u64, words: NonNull<u32>, entries: usize) -> PageTable {
        PageTable {
            device,
            id,
            words: words.cast(),
            entries,
        }
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < TABLE_HEADER_WORDS + self.entries);
        // SAFETY: the mapping holds the header and every entry, is 4-byte aligned, and lives
        // as long as `self`; all host access goes through atomics.
        unsafe { &*self.words.as_ptr().add(i) }
    }

    /// Number of entries (virtual pages covered).
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True if the table covers no page.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Points entry `index` at device page `page`, or clears it with `None`.
    pub fn set(&self, index: usize, page: Option<Pfn>) -> Result<()> {
        if index >= self.entries {
            return Err(EngineError::InvalidConfig(format!(
                "page table entry {index} of {}",
                self.entries
            )));
        }
        let v = match page {
            None => 0,
            Some(p) => {
                let range = self.device.pfn_range();
                if !range.contains(p) {
                    return Err(EngineError::UnknownPfn(p));
                }
                (p.0 - range.start.0) as u32 + 1
            }
        };
        self.word(TABLE_HEADER_WORDS + index)
            .store(v, Ordering::Release);
        Ok(())
    }

    /// Clears every entry of `range` (clipped to the table).
    pub fn clear(&self, range: std::ops::Range<usize>) {
        for i in range.start.min(self.entries)..range.end.min(self.entries) {
            self.word(TABLE_HEADER_WORDS + i)
                .store(0, Ordering::Release);
        }
    }

    /// The device page entry `index` names.
    pub fn get(&self, index: usize) -> Option<Pfn> {
        if index >= self.entries {
            return None;
        }
        let v = self
            .word(TABLE_HEADER_WORDS + index)
            .load(Ordering::Acquire);
        (v != 0).then(|| Pfn(self.device.pfn_range().start.0 + u64::from(v - 1)))
    }

    /// Accesses by kernels that found no device page since the last [`PageTable::reset_faults`],
    /// and the first such virtual page.
    pub fn faults(&self) -> (u32, Option<u32>) {
        let n = self.word(0).load(Ordering::Acquire);
        (n, (n > 0).then(|| self.word(1).load(Ordering::Acquire)))
    }

    /// Zeroes the fault counters.
    pub fn reset_faults(&self) {
        self.word(0).store(0, Ordering::Release);
        self.word(1).store(0, Ordering::Release);
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        self.device.free_table(self.id);
    }
}
