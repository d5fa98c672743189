//! Pins (the kernel's FOLL_PIN): a pinned page holds a reference and a pin, so no migration
//! can move it; the guard drops both.

use std::sync::Arc;

use hetmem_engine::Pfn;

use super::page::MemoryKind;
use super::pagemap::PageMap;
use super::space::{AddressSpace, PAGE};
use crate::error::{Error, Result};
use crate::mm::VirtAddr;

/// Pinned pages; unpinned on drop.
#[must_use = "pages are unpinned when the guard drops"]
pub struct PinGuard {
    pagemap: Arc<PageMap>,
    pfns: Vec<Pfn>,
}

impl PinGuard {
    /// The pinned frames, one per page of the range.
    pub fn pfns(&self) -> &[Pfn] {
        &self.pfns
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("pfns", &self.pfns)
            .finish()
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        for &pfn in &self.pfns {
            if let Some(p) = self.pagemap.page(pfn) {
                p.remove_pin();
                self.pagemap.put_page(p);
            }
        }
    }
}

/// Pins `npages` pages from `addr`, faulting them in first (for `write`, breaking COW;
/// device-private pages come back to host). A `longterm` pin refuses device-coherent pages
/// with [`Error::CoherentPin`]: the caller migrates them out first (`hetmem::migration::
/// pin_pages_longterm` does). On error nothing stays pinned.
pub fn pin_pages(
    space: &AddressSpace,
    addr: VirtAddr,
    npages: usize,
    write: bool,
    longterm: bool,
) -> Result<PinGuard> {
    super::space::check_aligned(addr.get())?;
    super::space::pages_end(addr, npages)?;
    let mut guard = PinGuard {
        pagemap: space.pagemap().clone(),
        pfns: Vec::with_capacity(npages.min(1 << 16)),
    };
    for k in 0..npages as u64 {
        let at = addr + k * PAGE;
        let mut tries = 0;
        let pfn = loop {
            // A pin holds a real page: a read pin of a hole or of the zero page gets one of
            // its own first (a write access would replace them anyway).
            tries += 1;
            if tries > 16 {
                return Err(Error::Busy(space.pte(at).pfn().unwrap_or(Pfn(0))));
            }
            if !write {
                space.fault_own_page(at)?;
            }
            let private = space.vma(at).is_some_and(|v| !v.shared);
            let pinned = space.with_page(at, write, |pfn| {
                let p = space.pagemap().page_or_err(pfn)?;
                if p.test(super::page::flags::ZERO) {
                    return Ok(None);
                }
                // A page of a private mapping that is still shared (it came back from a
                // device shared after fork, say): unshare it first, then pin.
                if private
                    && p.kind() == MemoryKind::System
                    && !p.test(super::page::flags::ANON_EXCLUSIVE)
                {
                    return Ok(None);
                }
                if longterm && p.kind() == MemoryKind::DeviceCoherent {
                    return Err(Error::CoherentPin(pfn));
                }
                p.get();
                p.add_pin();
                Ok(Some(pfn))
            })?;
            if let Some(pfn) = pinned {
                break pfn;
            }
        };
        guard.pfns.push(pfn);
    }
    Ok(guard)
}
