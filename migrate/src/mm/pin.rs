//! Pins (the kernel's FOLL_PIN): a pinned page holds a reference and a pin, so no migration
//! can move it; the guard drops both.

use std::sync::Arc;

use hetmem_engine::Pfn;

use super::page::MemoryKind;
use super::pagemap::PageMap;
use super::space::{AddressSpace, PAGE};
use crate::error::{Error, Result};

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
    addr: u64,
    npages: usize,
    write: bool,
    longterm: bool,
) -> Result<PinGuard> {
    super::space::check_aligned(addr)?;
    let mut guard = PinGuard {
        pagemap: space.pagemap().clone(),
        pfns: Vec::with_capacity(npages),
    };
    for k in 0..npages as u64 {
        let at = addr + k * PAGE;
        // A read pin of a hole must not pin the shared zero page: pin a real page.
        let pfn = space.with_page(at, write || space.pte(at) == super::pte::Pte::None, |pfn| {
            let p = space.pagemap().page_or_err(pfn)?;
            if p.test(super::page::flags::ZERO) {
                return Err(Error::InvalidArgument("zero page"));
            }
            if longterm && p.kind() == MemoryKind::DeviceCoherent {
                return Err(Error::CoherentPin(pfn));
            }
            p.get();
            p.add_pin();
            Ok(pfn)
        });
        let pfn = match pfn {
            Err(Error::InvalidArgument("zero page")) => space.with_page(at, true, |pfn| {
                let p = space.pagemap().page_or_err(pfn)?;
                p.get();
                p.add_pin();
                Ok(pfn)
            })?,
            other => other?,
        };
        guard.pfns.push(pfn);
    }
    Ok(guard)
}
