//! Mirroring without migrating (`hmm_range_fault`): a device finds, and faults in, the
//! frames behind a range so it can read or write them in place; a snapshot reports each
//! page's state without faulting.

use hetmem_engine::Pfn;

use super::page::{flags, MemoryKind};
use super::pte::Pte;
use super::space::{check_aligned, AddressSpace, PAGE};
use crate::error::{Error, Result};
use crate::mm::{Owner, VirtAddr};

/// One page of a faulted range: its frame and whether the device may write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HmmPfn {
    /// The frame.
    pub pfn: Pfn,
    /// Writable through this mapping.
    pub write: bool,
}

/// A page's state as a snapshot sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// No access (unmapped, or mapped without permission).
    Error,
    /// A hole.
    None,
    /// Present, read-only.
    Read,
    /// Present, writable.
    Write,
    /// The shared zero page.
    Zero,
    /// Device-private page of the asking owner.
    DevicePrivateLocal,
    /// Device-private page of another owner.
    DevicePrivateRemote,
    /// Device-coherent page of the asking owner.
    DeviceCoherentLocal,
    /// Device-coherent page of another owner.
    DeviceCoherentRemote,
    /// Being migrated.
    Migrating,
}

/// Faults in `npages` pages from `start` for a device of `owner` and returns their frames:
/// holes are populated, write access breaks copy-on-write, device-private pages of another
/// owner come back to host, the owner's own device-private pages are returned as they are.
/// The caller brackets this with [`AddressSpace::read_begin_range`] (or `read_begin`) and
/// retries if [`AddressSpace::read_retry_range`] (or `read_retry`) says so before it commits
/// the frames to a mirror.
pub fn hmm_range_fault(
    space: &AddressSpace,
    start: VirtAddr,
    npages: usize,
    write: bool,
    owner: Owner,
) -> Result<Vec<HmmPfn>> {
    check_aligned(start.get())?;
    super::space::pages_end(start, npages)?;
    let mut out = Vec::with_capacity(npages.min(1 << 16));
    for k in 0..npages as u64 {
        let addr = start + k * PAGE;
        let vma = space.vma(addr).ok_or(Error::NotMapped(addr))?;
        if write && !vma.prot.write {
            return Err(Error::WriteDenied(addr));
        }
        if !vma.prot.read {
            return Err(Error::ReadDenied(addr));
        }
        loop {
            let pte = space.pte(addr);
            let ok = match pte {
                Pte::Present { pfn, write: w, .. } if w || !write => Some(HmmPfn { pfn, write: w }),
                Pte::DevicePrivate { pfn, write: w } if w || !write => {
                    let p = space.pagemap().page_or_err(pfn)?;
                    (p.owner() == owner).then_some(HmmPfn { pfn, write: w })
                }
                _ => None,
            };
            if let Some(h) = ok {
                out.push(h);
                break;
            }
            space.fault(addr, write)?;
        }
    }
    Ok(out)
}

/// Reports the state of `npages` pages from `start` as seen by a device of `owner`, without
/// faulting anything in. Pages past the top of the address space are reported as
/// [`PageState::Error`].
pub fn snapshot(
    space: &AddressSpace,
    start: VirtAddr,
    npages: usize,
    owner: Owner,
) -> Vec<PageState> {
    (0..npages as u64)
        .map(|k| {
            let Some(addr) = start.checked_add_pages(k) else {
                return PageState::Error;
            };
            match space.vma(addr) {
                Some(v) if v.prot.read || v.prot.write => {}
                _ => return PageState::Error,
            }
            let pm = space.pagemap();
            match space.pte(addr) {
                Pte::None | Pte::Swap { .. } => PageState::None,
                Pte::Migration { .. } => PageState::Migrating,
                Pte::DevicePrivate { pfn, .. } => match pm.page(pfn) {
                    Some(p) if p.owner() == owner => PageState::DevicePrivateLocal,
                    _ => PageState::DevicePrivateRemote,
                },
                Pte::Present { pfn, write, .. } => match pm.page(pfn) {
                    Some(p) if p.test(flags::ZERO) => PageState::Zero,
                    Some(p) if p.kind() == MemoryKind::DeviceCoherent => {
                        if p.owner() == owner {
                            PageState::DeviceCoherentLocal
                        } else {
                            PageState::DeviceCoherentRemote
                        }
                    }
                    _ if write => PageState::Write,
                    _ => PageState::Read,
                },
            }
        })
        .collect()
}
