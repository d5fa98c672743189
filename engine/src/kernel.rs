//! User compute kernels over device pages: WGSL source with hetmem's helper
//! (`shaders/hetmem.wgsl`) in front, compiled to SPIR-V with naga, and page tables that
//! map a window of virtual pages to device pages for them.

use std::fmt::Write as _;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::backend::FIXED_BINDINGS;
use crate::error::{EngineError, Result};
use crate::inspect::{inspect, KernelLimits, Origin};
use crate::pfn::{Pfn, PfnRange};

/// The helper every kernel is compiled with.
pub const KERNEL_HELPER: &str = include_str!("../../shaders/hetmem.wgsl");

/// Words of a page table before its first entry (fault count, then the first fault's
/// buffer, page and word).
pub(crate) const TABLE_HEADER_WORDS: usize = 4;

/// Where a kernel's first faulting access was: outside the ranges its launch bound, or on a
/// page the table did not map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultSite {
    /// The bound buffer: its index in the launch's list (it may be one the launch did not
    /// bind).
    pub buffer: u32,
    /// The byte offset in that buffer.
    pub offset: u64,
}

/// The marker in the helper that the device's chunk bindings replace.
const CHUNKS_MARKER: &str = "//@hetmem-chunks";

/// The full WGSL of a kernel for a device with `chunks` chunks of `chunk_pages` pages, and
/// the bytes of it that are the user's source (its beginning).
pub(crate) fn assemble(user: &str, chunks: u32, chunk_pages: u32) -> (String, Range<usize>) {
    let mut gen = String::new();
    let _ = writeln!(gen, "const HM_CHUNK_PAGES: u32 = {chunk_pages}u;");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "@group(0) @binding({}) var<storage, read_write> hm_chunk{c}: array<vec4<u32>>;",
            c + FIXED_BINDINGS
        );
    }
    gen.push_str("fn hm__chunk_load(c: u32, i: u32) -> u32 {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "        case {c}u: {{ return hm_chunk{c}[i >> 2u][i & 3u]; }}"
        );
    }
    gen.push_str("        default: { return 0u; }\n    }\n}\n");
    gen.push_str("fn hm__chunk_load4(c: u32, q: u32) -> vec4<u32> {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(gen, "        case {c}u: {{ return hm_chunk{c}[q]; }}");
    }
    gen.push_str("        default: { return vec4<u32>(); }\n    }\n}\n");
    gen.push_str("fn hm__chunk_store4(c: u32, q: u32, v: vec4<u32>) {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(gen, "        case {c}u: {{ hm_chunk{c}[q] = v; }}");
    }
    gen.push_str("        default: {}\n    }\n}\n");
    gen.push_str("fn hm__chunk_store(c: u32, i: u32, v: u32) {\n    switch c {\n");
    for c in 0..chunks {
        let _ = writeln!(
            gen,
            "        case {c}u: {{ hm_chunk{c}[i >> 2u][i & 3u] = v; }}"
        );
    }
    gen.push_str("        default: {}\n    }\n}\n");
    let helper = KERNEL_HELPER.replacen(CHUNKS_MARKER, &gen, 1);
    // The user's source comes first, so that naga's line numbers are the user's own (and
    // its directives, such as `enable`, stay at the top); WGSL declarations may come in any
    // order, so the helper can follow.
    let source = format!("{user}\n// ---- hetmem helper ----\n{helper}");
    (source, 0..user.len())
}

/// Compiles the user's WGSL `user` (with the helper) to SPIR-V words for entry point
/// `entry`, after checking it against hetmem's binding layout and `limits`.
pub(crate) fn compile(
    user: &str,
    entry: &str,
    chunks: u32,
    chunk_pages: u32,
    limits: &KernelLimits,
) -> Result<Vec<u32>> {
    let (source, user_range) = assemble(user, chunks, chunk_pages);
    let origin = Origin {
        source: &source,
        user: user_range,
    };
    let module = crate::spirv::parse(&source).map_err(|f| compile_error(&origin, f))?;
    inspect(&module, &origin, entry, limits)?;
    crate::spirv::to_spirv(&module, &source, entry).map_err(|f| compile_error(&origin, f))
}

/// A compile error that says where it is: a line of the user's source, or the helper.
fn compile_error(origin: &Origin<'_>, (message, at): crate::spirv::Failure) -> EngineError {
    let user = at.iter().find(|o| origin.user.contains(o));
    EngineError::KernelCompile(match (user, at.first()) {
        (Some(&o), _) => format!("line {}: {message}", origin.line(o)),
        (None, Some(_)) => format!("in hetmem's helper: {message}"),
        (None, None) => message,
    })
}

/// What a kernel or a page table needs of the device that made it: to be released there,
/// and the device's page numbers. The device implements it for its shared state, so this
/// module knows no `Device` and the two modules do not import each other (`device` uses
/// `kernel`, not the other way round).
pub(crate) trait KernelHost: Send + Sync {
    /// Destroys kernel `id` once no submission uses it.
    fn destroy_kernel(&self, id: u64);
    /// Frees page table `id` once no submission uses it.
    fn free_table(&self, id: u64);
    /// The frame numbers of the device's pages.
    fn pfn_range(&self) -> PfnRange;
    /// Waits until the submission with completion value `value` has completed, and retires
    /// what it held.
    fn wait_for(&self, value: u64);
    /// True once the submission with completion value `value` has completed.
    fn completed(&self, value: u64) -> bool;
}

/// A compiled kernel, ready to dispatch on the device that compiled it.
pub struct Kernel {
    /// The device that compiled it (kept open while the kernel lives).
    pub(crate) host: std::sync::Arc<dyn KernelHost>,
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
    pub(crate) fn new(host: std::sync::Arc<dyn KernelHost>, id: u64, entry: &str) -> Kernel {
        Kernel {
            host,
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
        self.host.destroy_kernel(self.id);
    }
}

/// A page table in memory the device reads: entry `i` names the device page that holds
/// virtual page `i` of some window, or nothing. Kernels translate through it (see
/// [`KERNEL_HELPER`]); whoever moves pages keeps it current.
pub struct PageTable {
    /// The device whose kernels read it (kept open while the table lives).
    pub(crate) host: std::sync::Arc<dyn KernelHost>,
    pub(crate) id: u64,
    words: NonNull<AtomicU32>,
    entries: usize,
    /// Dispatches through this table that may still run: their completion values and bound
    /// entry ranges. An entry inside one of them changes only once that dispatch is done
    /// (the dispatch holds the pages its bound entries named when it started).
    pub(crate) running: parking_lot::Mutex<Vec<(u64, Vec<std::ops::Range<u32>>)>>,
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
    pub(crate) fn new(
        host: std::sync::Arc<dyn KernelHost>,
        id: u64,
        words: NonNull<u32>,
        entries: usize,
    ) -> PageTable {
        PageTable {
            host,
            id,
            words: words.cast(),
            entries,
            running: parking_lot::Mutex::new(Vec::new()),
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

    /// Points entry `index` at device page `page`, or clears it with `None`. If a dispatch
    /// that binds the entry may still be running, this waits for it first (the dispatch
    /// holds the pages its bound entries named, and only those).
    pub fn set(&self, index: usize, page: Option<Pfn>) -> Result<()> {
        if index >= self.entries {
            return Err(EngineError::InvalidConfig(format!(
                "page table entry {index} of {}",
                self.entries
            )));
        }
        self.wait_for_dispatches(index..index + 1);
        let v = match page {
            None => 0,
            Some(p) => {
                let range = self.host.pfn_range();
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

    /// Waits for every dispatch that may still run and binds an entry of `entries`.
    fn wait_for_dispatches(&self, entries: std::ops::Range<usize>) {
        loop {
            let pending = {
                let mut running = self.running.lock();
                running.retain(|(v, _)| !self.host.completed(*v));
                running
                    .iter()
                    .find(|(_, bound)| {
                        bound.iter().any(|b| {
                            (b.start as usize) < entries.end && entries.start < b.end as usize
                        })
                    })
                    .map(|&(v, _)| v)
            };
            match pending {
                Some(v) => {
                    // Waited for (done, or failed for good): it runs no more.
                    self.host.wait_for(v);
                    self.running.lock().retain(|&(w, _)| w != v);
                }
                None => return,
            }
        }
    }

    /// Clears every entry of `range` (clipped to the table); waits as [`PageTable::set`]
    /// does for dispatches that bind one of them.
    pub fn clear(&self, range: std::ops::Range<usize>) {
        self.wait_for_dispatches(range.clone());
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
        (v != 0).then(|| Pfn(self.host.pfn_range().start.0 + u64::from(v - 1)))
    }

    /// Accesses by kernels outside their launch's bound ranges or to pages the table did not
    /// map, since the last [`PageTable::reset_faults`], and where the first one was.
    pub fn faults(&self) -> (u32, Option<FaultSite>) {
        let n = self.word(0).load(Ordering::Acquire);
        let site = (n > 0).then(|| {
            let [buffer, page, word] = [1, 2, 3].map(|i| self.word(i).load(Ordering::Acquire));
            FaultSite {
                buffer,
                offset: u64::from(page) * crate::pfn::PAGE_SIZE as u64 + u64::from(word) * 4,
            }
        });
        (n, site)
    }

    /// Zeroes the fault counters.
    pub fn reset_faults(&self) {
        for i in 0..TABLE_HEADER_WORDS {
            self.word(i).store(0, Ordering::Release);
        }
    }
}

impl Drop for PageTable {
    fn drop(&mut self) {
        self.host.free_table(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::KernelRejection;

    const LIMITS: KernelLimits = KernelLimits {
        max_chunks: 8,
        max_binding_bytes: 1 << 27,
        workgroup_memory: 32 << 10,
        workgroup_size: [1024, 1024, 64],
        workgroup_invocations: 1024,
    };

    fn build(user: &str) -> Result<Vec<u32>> {
        compile(user, "main", 2, 256, &LIMITS)
    }

    fn rejection(user: &str) -> KernelRejection {
        match build(user) {
            Err(EngineError::KernelRejected(r)) => r,
            Err(e) => panic!("expected a rejection, got {e}"),
            Ok(_) => panic!("expected a rejection, it compiled"),
        }
    }

    #[test]
    fn a_kernel_within_the_layout_compiles() {
        let words = build(
            "var<workgroup> tile: array<u32, 1024>;\n\
             var<private> seen: u32;\n\
             @compute @workgroup_size(32, 32)\n\
             fn main(@builtin(local_invocation_index) i: u32) {\n\
                 tile[i] = hm_load(hm_ptr(0u, i * 4u));\n\
                 workgroupBarrier();\n\
                 seen = tile[1023u - i];\n\
                 hm_store(hm_ptr(0u, i * 4u), seen);\n\
             }\n",
        )
        .unwrap();
        assert_eq!(words[0], 0x0723_0203, "SPIR-V magic");
    }

    #[test]
    fn own_bindings_are_refused_with_their_line() {
        let r = rejection(
            "@compute @workgroup_size(1)\n\
             fn main() { mine[0] = 1u; }\n\
             @group(1) @binding(0) var<storage, read_write> mine: array<u32>;\n",
        );
        assert!(
            matches!(&r, KernelRejection::OwnResource { name, line: 3, what } if name == "mine" && what.contains("@group(1) @binding(0)")),
            "{r:?}"
        );
        // In group 0 too (where the helper's bindings are), and uniforms alike.
        let r = rejection(
            "@group(0) @binding(0) var<storage, read> t: array<u32>;\n\
             @compute @workgroup_size(1)\n\
             fn main() { let x = t[0]; }\n",
        );
        assert!(
            matches!(&r, KernelRejection::OwnResource { line: 1, .. }),
            "{r:?}"
        );
        let r = rejection(
            "@group(2) @binding(3) var<uniform> u: vec4<u32>;\n\
             @compute @workgroup_size(1)\n\
             fn main() { let x = u.x; }\n",
        );
        assert!(matches!(&r, KernelRejection::OwnResource { .. }), "{r:?}");
    }

    #[test]
    fn workgroup_memory_and_size_are_held_to_the_device() {
        // 16 MiB of workgroup memory.
        let r = rejection(
            "var<workgroup> big: array<u32, 4194304>;\n\
             @compute @workgroup_size(64)\n\
             fn main(@builtin(local_invocation_index) i: u32) { big[i] = i; }\n",
        );
        assert_eq!(
            r,
            KernelRejection::WorkgroupMemory {
                bytes: Some(16 << 20),
                limit: 32 << 10
            }
        );
        // Two variables that fit alone but not together.
        let r = rejection(
            "var<workgroup> a: array<u32, 6144>;\n\
             var<workgroup> b: array<u32, 3072>;\n\
             @compute @workgroup_size(64)\n\
             fn main(@builtin(local_invocation_index) i: u32) { a[i] = b[i]; }\n",
        );
        assert!(
            matches!(
                r,
                KernelRejection::WorkgroupMemory {
                    bytes: Some(36864),
                    ..
                }
            ),
            "{r:?}"
        );
        for (size, bad) in [
            ("1024, 1024, 1", true),
            ("2048", true),
            ("1, 1, 65", true),
            ("64, 16", false),
            ("1024", false),
        ] {
            let src = format!(
                "@compute @workgroup_size({size})\nfn main() {{ hm_store(hm_ptr(0u, 0u), 1u); }}\n"
            );
            match build(&src) {
                Err(EngineError::KernelRejected(KernelRejection::WorkgroupSize {
                    max_invocations: 1024,
                    ..
                })) => assert!(bad, "{size} refused"),
                Ok(_) => assert!(!bad, "{size} compiled"),
                Err(e) => panic!("{size}: {e}"),
            }
        }
    }

    #[test]
    fn the_helpers_internals_are_out_of_reach() {
        let r = rejection(
            "@compute @workgroup_size(1)\n\
             fn main() {\n\
                 let stolen = hm__chunk_load(0u, 12345u);\n\
                 hm_store(hm_ptr(0u, 0u), stolen);\n\
             }\n",
        );
        assert_eq!(
            r,
            KernelRejection::HelperInternals {
                name: "hm__chunk_load".into(),
                line: 3
            }
        );
        let r = rejection(
            "fn helper() { hm__chunk_store(1u, 0u, 7u); }\n\
             @compute @workgroup_size(1)\n\
             fn main() { helper(); }\n",
        );
        assert!(
            matches!(&r, KernelRejection::HelperInternals { name, line: 1 } if name == "hm__chunk_store"),
            "{r:?}"
        );
        let r = rejection(
            "@compute @workgroup_size(1)\n\
             fn main() {\n\
                 if (true) { atomicStore(&hm_table.faults, 0u); }\n\
             }\n",
        );
        assert!(
            matches!(&r, KernelRejection::HelperInternals { name, .. } if name == "hm_table"),
            "{r:?}"
        );
    }

    #[test]
    fn page_handles_come_only_from_the_helper() {
        build(
            "@compute @workgroup_size(1)\n\
             fn main() { let p = hm_page(0u, 1u); hm_page_store(p, 3u, hm_page_load(p, 2u)); }\n",
        )
        .unwrap();
        for (src, line) in [
            (
                "@compute @workgroup_size(1)\n\
                 fn main() {\n\
                     let p = HmPage(3u, 4096u, true);\n\
                     hm_page_store(p, 0u, 1u);\n\
                 }\n",
                3,
            ),
            (
                "@compute @workgroup_size(1)\n\
                 fn main() {\n\
                     var p = hm_page(0u, 0u);\n\
                     p.first = 4096u;\n\
                     hm_page_store(p, 0u, 1u);\n\
                 }\n",
                3,
            ),
            (
                "var<private> kept: array<HmPage, 2>;\n\
                 @compute @workgroup_size(1)\n\
                 fn main() { hm_page_store(kept[1], 0u, 1u); }\n",
                1,
            ),
        ] {
            assert_eq!(
                rejection(src),
                KernelRejection::PageHandle { line },
                "{src}"
            );
        }
    }

    fn compile_message(user: &str) -> String {
        match build(user) {
            Err(EngineError::KernelCompile(m)) => m,
            Err(e) => panic!("expected a compile error, got {e}"),
            Ok(_) => panic!("expected a compile error, it compiled"),
        }
    }

    #[test]
    fn compile_errors_name_the_users_lines() {
        // A parse error on line 3.
        let m = compile_message(
            "@compute @workgroup_size(1)\n\
             fn main() {\n\
                 let x = ;\n\
             }\n",
        );
        assert!(m.starts_with("line 3: "), "{m}");
        assert!(
            m.contains("wgsl:3:"),
            "naga's own rendering points at line 3 too: {m}"
        );
        // An unknown identifier on line 4.
        let m = compile_message(
            "// a comment\n\
             @compute @workgroup_size(1)\n\
             fn main() {\n\
                 hm_store(hm_ptr(0u, 0u), nothing);\n\
             }\n",
        );
        assert!(m.starts_with("line 4: "), "{m}");
        // A validation error (not a parse error) on line 2.
        let m = compile_message(
            "@compute @workgroup_size(1)\n\
             fn main() { var x: u32 = 1u; x = 2.5f; }\n",
        );
        assert!(m.starts_with("line 2: "), "{m}");
        // Redefining a helper function: the error is the user's, at the user's line.
        let m = compile_message(
            "@compute @workgroup_size(1)\n\
             fn main() {}\n\
             fn hm_load(p: HmPtr) -> u32 { return 0u; }\n",
        );
        assert!(m.starts_with("line 3: "), "{m}");
    }
}
