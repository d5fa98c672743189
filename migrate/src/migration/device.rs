//! `migrate_device_range`, `migrate_device_pfns`, `migrate_device_pages`,
//! `migrate_device_finalize`: migrating device pages by frame number, wherever they are
//! mapped (eviction, device removal), and `migrate_device_coherent_page` for long-term pins.

use hetmem_engine::{Pfn, PAGE_SIZE};

use super::dst::{forget_foreign_dst, take_dst, MOVED_FLAGS};
use super::finalize::{finalize, resolve};
use super::pfn::*;
use super::staged::DeviceMigration;
use super::unmap::{restore_page, unmap_page, Unmapped};
use super::vma::Collect;
use crate::error::{Error, Result};
use crate::mm::page::MemoryKind;
use crate::mm::{AddressSpace, PageMap, VirtAddr};

/// Collects the device pages `start..start + npages` into `src`: free pages are skipped,
/// busy (locked) ones too; the rest are referenced, locked and unmapped from every address
/// space (`src = migrate_pfn | MIGRATE`, `| WRITE` if a writable entry mapped it).
pub fn migrate_device_range(
    pm: &PageMap,
    src: &mut [u64],
    start: Pfn,
    npages: usize,
) -> Result<usize> {
    if src.len() < npages {
        return Err(Error::ShortArray {
            which: "src",
            needed: npages,
            got: src.len(),
        });
    }
    if start
        .0
        .checked_add(npages as u64)
        .is_none_or(|end| end > 1 << 50)
    {
        return Err(Error::InvalidArgument("device pfn range out of bounds"));
    }
    for (i, w) in src[..npages].iter_mut().enumerate() {
        *w = migrate_pfn(start.add(i as u64));
    }
    migrate_device_pfns(pm, &mut src[..npages])
}

/// Like [`migrate_device_range`] for a caller-filled array of device pfns (as `migrate_pfn`
/// words) that need not be contiguous. Returns how many were collected.
pub fn migrate_device_pfns(pm: &PageMap, src: &mut [u64]) -> Result<usize> {
    for &w in src.iter() {
        if let Some(pfn) = migrate_pfn_to_pfn(w) {
            if !pm.page_or_err(pfn)?.is_device() {
                return Err(Error::InvalidArgument(
                    "migrate_device_* takes device pages only",
                ));
            }
        }
    }
    let mut collected = 0;
    for w in src.iter_mut() {
        let Some(page) = migrate_pfn_to_page(pm, *w) else {
            *w = 0;
            continue;
        };
        *w = 0;
        if !page.try_get() {
            continue;
        }
        if !page.trylock_isolate() {
            pm.put_page(page);
            continue;
        }
        let writable = page
            .mappings()
            .iter()
            .filter_map(|m| {
                pm.spaces()
                    .get(m.space)
                    .map(|s| AddressSpace::from_inner(s).pte(m.addr))
            })
            .any(|pte| {
                matches!(
                    pte,
                    crate::mm::Pte::Present { write: true, .. }
                        | crate::mm::Pte::DevicePrivate { write: true, .. }
                )
            });
        match unmap_page(pm, page, 1, None, false) {
            Unmapped::Ready => {
                *w = migrate_pfn(page.pfn())
                    | MIGRATE_PFN_MIGRATE
                    | if writable { MIGRATE_PFN_WRITE } else { 0 };
                collected += 1;
            }
            Unmapped::Busy => restore_page(pm, page, true, None),
        }
    }
    Ok(collected)
}

/// Stage 2 of a device migration: entries without a destination stop migrating; state moves
/// to the destinations. A bad `dst` entry fails the call with nothing changed. Each entry
/// whose destination it took is marked in `src` (a crate-private bit), for
/// [`migrate_device_finalize`] to tell its destinations from another migration's.
pub fn migrate_device_pages(pm: &PageMap, src: &mut [u64], dst: &[u64]) -> Result<()> {
    device_pages_stage(pm, src, dst).map(drop)
}

/// [`migrate_device_pages`], returning the pages it looked up: each entry's source and the
/// destination it took, for a caller that finalizes next (`DeviceMigration`).
pub(crate) fn device_pages_stage<'p>(
    pm: &'p PageMap,
    src: &mut [u64],
    dst: &[u64],
) -> Result<(Collect<'p>, Collect<'p>)> {
    if dst.len() < src.len() {
        return Err(Error::ShortArray {
            which: "dst",
            needed: src.len(),
            got: dst.len(),
        });
    }
    let old = resolve(pm, src);
    let new = take_dst(pm, src, &dst[..src.len()], |i| match old[i] {
        Some(o) if src[i] & MIGRATE_PFN_MIGRATE != 0 => Some(o.flags() & MOVED_FLAGS),
        _ => None,
    })?;
    for i in 0..src.len() {
        // `take_dst` moved the state of each entry with both pages; the rest stay.
        if old[i].is_none() || new[i].is_none() {
            src[i] &= !MIGRATE_PFN_MIGRATE;
        }
        if new[i].is_some() {
            src[i] |= MIGRATE_PFN_PAGED;
        }
    }
    Ok((old, new))
}

/// Stage 3 of a device migration: as `migrate_vma_finalize`. Entries past the end of a
/// short `dst` have no destination: their pages are restored. The arrays are consumed: every
/// word finalize finished is cleared (in `src` and `dst`), so a second call on the same
/// arrays does nothing (device pages carry no migration of their own to tell a second call
/// by, and the pages may since belong to another migration).
pub fn migrate_device_finalize(pm: &PageMap, src: &mut [u64], dst: &mut [u64]) {
    // A destination counts as ours where `migrate_device_pages` marked the entry (it took
    // that page); anything else a driver could not have handed over, another migration's
    // taken destination included, is left alone (and its entry restored).
    let n = src.len().min(dst.len());
    forget_foreign_dst(pm, &mut dst[..n], |i| src[i] & MIGRATE_PFN_PAGED != 0);
    // Entries past the end of a short `dst` have no destination.
    let mut new = resolve(pm, &dst[..n]);
    new.resize(src.len(), None);
    finalize(pm, src, &resolve(pm, src), &new, None, None);
    src.fill(0);
    dst[..n].fill(0);
}

/// Moves one device-coherent page to a new system page (CPU copy), so that a long-term pin
/// can be granted. Fails with [`Error::Busy`] if the page cannot move, and with the
/// allocation's error (out of host frames) if no system page can be had; either way the
/// page stays where it was, unlocked.
pub fn migrate_device_coherent_page(pm: &PageMap, pfn: Pfn) -> Result<Pfn> {
    let page = pm.page_or_err(pfn)?;
    if page.kind() != MemoryKind::DeviceCoherent {
        return Err(Error::InvalidArgument("not a device-coherent page"));
    }
    let mut m = DeviceMigration::pfns(pm, &[pfn])?;
    if m.cpages() == 0 {
        return Err(Error::Busy(pfn));
    }
    let new = pm.alloc_system(false, true)?;
    let copied = (|| -> Result<()> {
        let mut buf = vec![0u8; PAGE_SIZE];
        pm.read_frame(pfn, 0, &mut buf)?;
        pm.write_frame(new.pfn(), 0, &buf)
    })();
    if let Err(e) = copied {
        new.unlock();
        pm.put_page(new);
        return Err(e);
    }
    m.dst_mut()[0] = migrate_pfn(new.pfn());
    let m = m.copied()?;
    let moved = m.moving().count() == 1;
    m.finalize();
    if moved {
        Ok(new.pfn())
    } else {
        Err(Error::Busy(pfn))
    }
}

/// Rounds of migrating device-coherent pages out before a long-term pin gives up.
const LONGTERM_ROUNDS: usize = 8;

/// Pins pages for the long term: device-coherent pages are first migrated to system memory
/// (as the kernel does for FOLL_LONGTERM), then pinned.
pub fn pin_pages_longterm(
    space: &AddressSpace,
    addr: VirtAddr,
    npages: usize,
    write: bool,
) -> Result<crate::mm::PinGuard> {
    let mut last = None;
    for _ in 0..LONGTERM_ROUNDS.max(npages.saturating_mul(2)) {
        match crate::mm::pin_pages(space, addr, npages, write, true) {
            Err(Error::CoherentPin(pfn)) => {
                migrate_device_coherent_page(space.pagemap(), pfn)?;
                last = Some(pfn);
            }
            other => return other,
        }
    }
    Err(Error::Busy(last.expect("at least one round")))
}
