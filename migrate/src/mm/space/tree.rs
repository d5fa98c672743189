//! The VMA tree of an address space and the searches and splits over it: which mapping
//! covers an address, where a new one fits, the mappings a range touches.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{check_aligned, Vma, MMAP_TOP, PAGE};
use crate::error::{Error, Result};
use crate::mm::VirtAddr;

/// The VMA tree, keyed by start address.
pub(crate) type VmaTree = BTreeMap<VirtAddr, Arc<Vma>>;

/// The mapping covering `addr`.
pub(crate) fn find_vma(map: &VmaTree, addr: VirtAddr) -> Option<Arc<Vma>> {
    map.range(..=addr)
        .next_back()
        .filter(|(_, v)| addr < v.end)
        .map(|(_, v)| v.clone())
}

pub(super) fn range_of(addr: VirtAddr, len: u64) -> Result<(VirtAddr, VirtAddr)> {
    check_aligned(addr.get())?;
    check_aligned(len)?;
    if len == 0 {
        return Err(Error::EmptyRange);
    }
    Ok((
        addr,
        addr.checked_add(len)
            .ok_or(Error::InvalidArgument("range wraps"))?,
    ))
}

/// One past the last byte of `npages` pages from `addr`, or an error if that passes the
/// top of the address space.
pub(crate) fn pages_end(addr: VirtAddr, npages: usize) -> Result<VirtAddr> {
    addr.checked_add_pages(npages as u64)
        .filter(|&e| e <= MMAP_TOP)
        .ok_or(Error::InvalidArgument(
            "range past the top of the address space",
        ))
}

/// True if any mapping overlaps `[start, end)`.
pub(super) fn overlaps(map: &VmaTree, start: VirtAddr, end: VirtAddr) -> bool {
    map.range(..end)
        .next_back()
        .is_some_and(|(_, v)| v.end > start)
}

/// The first address from `from` where `len` bytes fit below [`MMAP_TOP`], with a guard
/// page after each mapping it passes.
pub(super) fn free_range(map: &VmaTree, from: VirtAddr, len: u64) -> Option<VirtAddr> {
    let mut at = from;
    loop {
        let end = at.checked_add(len).filter(|&e| e <= MMAP_TOP)?;
        match map.range(..end).next_back() {
            Some((_, v)) if v.end > at => at = v.end.checked_add(PAGE)?,
            _ => return Some(at),
        }
    }
}

/// True if a mapping of `[start, end)` is mapped for CPU pointers.
pub(super) fn any_homed(map: &VmaTree, start: VirtAddr, end: VirtAddr) -> bool {
    map.range(..end)
        .rev()
        .take_while(|(_, v)| v.end > start)
        .any(|(_, v)| v.home.is_some())
}

/// Fails unless `[start, end)` is mapped without gaps.
pub(super) fn covered(map: &VmaTree, start: VirtAddr, end: VirtAddr) -> Result<()> {
    let mut at = start;
    while at < end {
        let v = find_vma(map, at).ok_or(Error::NotMapped(at))?;
        at = v.end;
    }
    Ok(())
}

/// Splits the mappings that straddle the edges of `[start, end)` and lists (by start) the
/// mappings inside it.
pub(super) fn split_range(map: &mut VmaTree, start: VirtAddr, end: VirtAddr) -> Vec<VirtAddr> {
    split_at(map, start);
    split_at(map, end);
    map.range(start..end).map(|(&k, _)| k).collect()
}

/// Splits the mapping that straddles `addr`, if one does.
pub(super) fn split_at(map: &mut VmaTree, addr: VirtAddr) {
    if let Some(v) = find_vma(map, addr) {
        if v.start < addr {
            map.insert(v.start, v.part(v.start, addr, v.prot));
            map.insert(addr, v.part(addr, v.end, v.prot));
        }
    }
}
