//! A device's kernels: compiling WGSL for it, page tables, dispatch.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::{Device, Hold, Ticket};
use crate::error::{EngineError, Result};
use crate::inspect::KernelLimits;
use crate::kernel::{Kernel, KernelHost, PageTable};
use crate::pfn::PAGE_SIZE;

/// Kernels: compiling, page tables, dispatch.
impl Device {
    /// Chunks a kernel binds on this device, once kernels are possible here.
    fn kernel_chunks(&self) -> Result<(u32, u32)> {
        self.kernel_layout().map(|(c, p, _)| (c, p))
    }

    /// Chunks a kernel binds on this device, their pages, and the device's kernel limits.
    fn kernel_layout(&self) -> Result<(u32, u32, KernelLimits)> {
        let limits = self.shared.backend.kernel_limits()?;
        let (limit, max_bytes) = (limits.max_chunks, limits.max_binding_bytes);
        let (chunks, chunk_pages) = {
            let p = self.shared.pages.lock();
            (p.max_chunks() as u32, p.chunk_pages() as u32)
        };
        if chunks > limit {
            return Err(EngineError::Unsupported(format!(
                "a kernel would bind {chunks} chunks of device memory, the device allows {limit}: use larger chunks or a smaller budget"
            )));
        }
        if chunk_pages as u64 * PAGE_SIZE as u64 > max_bytes {
            return Err(EngineError::Unsupported(format!(
                "chunks of {} bytes exceed the largest storage binding of {max_bytes} bytes",
                chunk_pages as u64 * PAGE_SIZE as u64
            )));
        }
        Ok((chunks, chunk_pages, limits))
    }

    /// Whether kernels can run on this device (the Vulkan backend): `Err` says why not.
    pub fn kernel_support(&self) -> Result<()> {
        self.kernel_chunks().map(|_| ())
    }

    /// Compiles a WGSL kernel whose compute entry point is `entry`. The source is compiled
    /// after hetmem's helper ([`crate::KERNEL_HELPER`]), so it can translate managed
    /// addresses with `hm_ptr`, `hm_load`, `hm_store`, and read its arguments with `hm_arg`.
    ///
    /// Before any pipeline is made, the kernel is checked against hetmem's layout and the
    /// device: one that declares resources of its own, uses the helper's bindings or
    /// internal (`hm__`) functions directly, or exceeds the device's workgroup memory or
    /// workgroup size is refused with [`EngineError::KernelRejected`]. Compile errors name
    /// lines of `wgsl` itself.
    pub fn compile_kernel(&self, wgsl: &str, entry: &str) -> Result<Kernel> {
        let (chunks, chunk_pages, limits) = self.kernel_layout()?;
        let spirv = crate::kernel::compile(wgsl, entry, chunks, chunk_pages, &limits)?;
        let id = self.shared.backend.create_kernel(&spirv, entry, chunks)?;
        Ok(Kernel::new(self.shared.clone(), id, entry))
    }

    /// A page table of `entries` entries, all empty, in memory this device's kernels read.
    pub fn page_table(&self, entries: usize) -> Result<PageTable> {
        self.kernel_chunks()?;
        if entries > u32::MAX as usize - crate::kernel::TABLE_HEADER_WORDS {
            return Err(EngineError::InvalidConfig(format!(
                "page table of {entries} entries"
            )));
        }
        let (id, words) = self
            .shared
            .backend
            .alloc_table(crate::kernel::TABLE_HEADER_WORDS + entries)?;
        Ok(PageTable::new(self.shared.clone(), id, words, entries))
    }

    /// Dispatches `kernel` over `groups` workgroups, translating through `table`. `buffers`
    /// are the ranges of table entries (virtual pages) the kernel's buffers cover, in the
    /// order it names them; `args` its argument words. The kernel's reads and writes land in
    /// device pages, and only in those of its buffers' ranges: an access outside them, or to
    /// a page the table does not map, reads zeros, writes nothing and is counted in the
    /// table (see [`PageTable::faults`]).
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        table: &PageTable,
        buffers: &[std::ops::Range<u32>],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Ticket> {
        if !self.is_host_of(&kernel.host) || !self.is_host_of(&table.host) {
            return Err(EngineError::InvalidConfig(
                "kernel or page table of another device".into(),
            ));
        }
        if groups.iter().any(|&g| g == 0 || g > 65_535) {
            return Err(EngineError::InvalidConfig(format!(
                "workgroup counts {groups:?} must each be 1..=65535"
            )));
        }
        if let Some(r) = buffers
            .iter()
            .find(|r| r.start > r.end || r.end as usize > table.len())
        {
            return Err(EngineError::InvalidConfig(format!(
                "buffer range {r:?} outside a page table of {} entries",
                table.len()
            )));
        }
        let (chunks, _) = self.kernel_chunks()?;
        let mut meta = Vec::with_capacity(1 + 2 * buffers.len() + args.len());
        meta.push(buffers.len() as u32);
        for r in buffers {
            meta.extend([r.start, r.end - r.start]);
        }
        meta.extend_from_slice(args);
        // The pages the bound entries name are held until the dispatch completes: reads,
        // writes, zeroing and copies of them wait for it. An entry inside a bound range
        // changes only after the dispatch (PageTable::set waits), so the kernel reaches no
        // page it does not hold. The table's lock keeps the entries still meanwhile.
        let sh = &self.shared;
        let mut running = table.running.lock();
        let named: Vec<_> = buffers
            .iter()
            .flat_map(|r| (r.start as usize..r.end as usize).filter_map(|i| table.get(i)))
            .collect();
        let hold = Hold {
            value: 0,
            frames: Vec::new(),
            pages: sh.hold_pages(named),
        };
        let value = match sh
            .backend
            .dispatch(kernel.id, table.id, chunks, &meta, groups)
        {
            Ok(v) => v,
            Err(e) => {
                sh.release(&hold);
                return Err(e);
            }
        };
        running.push((value, buffers.to_vec()));
        drop(running);
        sh.keep(Hold { value, ..hold });
        Ok(Ticket {
            shared: self.shared.clone(),
            value,
            settled: AtomicBool::new(false),
            pairs: 0,
            failed: Vec::new(),
            lost: None,
        })
    }

    /// Kernels, page tables and chunks dropped while a submission that used them had not
    /// completed, and not destroyed yet: they go once the device's timeline passes that
    /// submission (noticed when any wait or poll of the device retires work). Dropping a
    /// kernel or a table never waits for the device.
    pub fn deferred_destroys(&self) -> usize {
        self.shared.backend.deferred_destroys()
    }

    /// Whether `host` (a kernel's or a page table's) is this device.
    fn is_host_of(&self, host: &Arc<dyn KernelHost>) -> bool {
        std::ptr::addr_eq(Arc::as_ptr(host), Arc::as_ptr(&self.shared))
    }
}
