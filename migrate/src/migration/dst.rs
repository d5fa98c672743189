//! The driver's `dst` words: what a pages stage accepts as destinations, how it takes them
//! (so no other migration can take the same page while this one holds it), and which named
//! pages a finalize may release when no pages stage of its own took them.
//!
//! A destination is a frame number, a plain `Copy` value: nothing stops a driver from
//! naming a page it does not own (another migration's source or destination, a page a guard
//! holds). The pages stage accepts only live, locked, unmapped pages that no guard holds and
//! no other pages stage has taken, and marks each it accepts ([`TAKEN_AS_DST`]) until the
//! finalize that maps or releases it unlocks it.

use std::collections::HashSet;

use hetmem_engine::Pfn;

use super::pfn::*;
use crate::error::{Error, Result};
use crate::mm::page::{flags, Page, ANY_GUARD, TAKEN_AS_DST};
use crate::mm::PageMap;

/// Checks the driver's `dst` entries; nothing is changed on error. Returns the page each
/// entry names, looked up once here for the stage's later passes.
pub(crate) fn validate_dst<'p>(
    pm: &'p PageMap,
    src: &[u64],
    dst: &[u64],
) -> Result<Vec<Option<&'p Page>>> {
    // Destinations allocated in a batch come ascending: then no pfn repeats and nothing
    // needs collecting; otherwise they are collected and sorted to find repeats.
    let mut last: Option<Pfn> = None;
    let mut ascending = true;
    let mut named = Vec::new();
    let mut pages = Vec::with_capacity(dst.len());
    let mut cursor = pm.cursor();
    for (i, &w) in dst.iter().enumerate() {
        // Every named destination is checked, collected entry or not: finalize releases
        // them all (the driver's pages), so each must be a live, locked, unmapped page.
        let Some(pfn) = migrate_pfn_to_pfn(w) else {
            pages.push(None);
            continue;
        };
        let p = cursor.page_or_err(pfn)?;
        pages.push(Some(p));
        if p.refcount() == 0 {
            return Err(Error::PageFree(pfn));
        }
        if p.mapcount() != 0 || migrate_pfn_to_pfn(src[i]) == Some(pfn) {
            return Err(Error::PageInUse(pfn));
        }
        if !p.test(flags::LOCKED) {
            return Err(Error::NotLocked(pfn));
        }
        // Still held by a guard of the driver's (which would release it after us), or taken
        // by another migration's pages stage (which will map or release it).
        if p.flags() & (ANY_GUARD | TAKEN_AS_DST) != 0 {
            return Err(Error::PageInUse(pfn));
        }
        if ascending && last.is_some_and(|l| l >= pfn) {
            ascending = false;
            // Everything named so far was ascending: rebuild the list once.
            named.extend(dst[..i].iter().filter_map(|&d| migrate_pfn_to_pfn(d)));
        }
        if ascending {
            last = Some(pfn);
        } else {
            named.push(pfn);
        }
    }
    if ascending {
        return Ok(pages);
    }
    named.sort_unstable();
    match named.windows(2).find(|w| w[0] == w[1]) {
        Some(w) => Err(Error::PageInUse(w[0])),
        None => Ok(pages),
    }
}

/// The flags a migrating page hands to its destination (see [`take_dst`]).
pub(crate) const MOVED_FLAGS: u32 = flags::DIRTY | flags::ANON_EXCLUSIVE;

/// Marks every destination page (as [`validate_dst`] returned them) as taken by this
/// migration and, in the same atomic step, gives it the flags `moved(i)` names (the
/// [`MOVED_FLAGS`] of the page entry `i` migrates from; 0 where nothing migrates). Two pages
/// stages that validated the same page at once race here: the second to mark it fails with
/// `PageInUse` and takes back its own marks and flags, so nothing is changed on error.
pub(crate) fn take_dst(dst: &[Option<&Page>], moved: impl Fn(usize) -> u32) -> Result<()> {
    // The flag words before, for taking back on error.
    let mut before = Vec::with_capacity(dst.len());
    for (i, p) in dst.iter().enumerate() {
        let Some(p) = p else {
            before.push(0);
            continue;
        };
        let f = moved(i);
        if let Some(was) = p.take_as_dst(f) {
            before.push(was);
            continue;
        }
        for (j, (q, &was)) in dst[..i].iter().zip(&before).enumerate() {
            if let Some(q) = q {
                // The bits this call set: the mark, and moved flags the page did not have.
                q.clear(TAKEN_AS_DST | (moved(j) & !was));
            }
        }
        return Err(Error::PageInUse(p.pfn()));
    }
    Ok(())
}

/// Zeroes the `dst` words that a finalize must not release: pages that are not live,
/// locked and unmapped, pages a guard holds, a page named a second time, and (unless
/// `taken_is_ours`, for a caller that cannot tell whether its own pages stage ran) pages a
/// pages stage took. Finalize restores the source of an entry whose word is zeroed.
pub(crate) fn forget_foreign_dst(pm: &PageMap, dst: &mut [u64], taken_is_ours: bool) {
    let mut last: Option<Pfn> = None;
    // Built only when the named pages stop ascending (batches come ascending).
    let mut seen: Option<HashSet<Pfn>> = None;
    for i in 0..dst.len() {
        let Some(p) = migrate_pfn_to_page(pm, dst[i]) else {
            continue;
        };
        let pfn = p.pfn();
        let repeat = match (&mut seen, last) {
            (Some(s), _) => !s.insert(pfn),
            (None, Some(l)) if l >= pfn => {
                let mut s: HashSet<Pfn> = dst[..i]
                    .iter()
                    .filter_map(|&d| migrate_pfn_to_pfn(d))
                    .collect();
                let repeat = !s.insert(pfn);
                seen = Some(s);
                repeat
            }
            _ => {
                last = Some(pfn);
                false
            }
        };
        if repeat || !releasable(p, taken_is_ours) {
            dst[i] = 0;
        }
    }
}

/// True if `p` looks like a destination its driver handed over: live, locked, unmapped,
/// held by no guard, and taken by no pages stage unless `taken_is_ours`.
fn releasable(p: &Page, taken_is_ours: bool) -> bool {
    let f = p.flags();
    p.refcount() > 0
        && p.mapcount() == 0
        && f & flags::LOCKED != 0
        && f & ANY_GUARD == 0
        && (taken_is_ours || f & TAKEN_AS_DST == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{MemoryKind, Owner};

    fn page(pfn: u64, f: u32) -> Page {
        let p = Page::new(Pfn(pfn), MemoryKind::System, Owner(0));
        p.init_allocated(true);
        p.set(f);
        p
    }

    #[test]
    fn take_dst_moves_flags_with_the_mark_and_takes_back_exactly_its_own_bits() {
        // Entry 0 moves DIRTY onto a page that has it already; entry 1 moves
        // ANON_EXCLUSIVE; entry 2 names no page; entry 3 is another migration's.
        let a = page(1, flags::DIRTY);
        let b = page(2, 0);
        let c = page(3, TAKEN_AS_DST);
        let before = [a.flags(), b.flags(), c.flags()];
        let moved = [flags::DIRTY, flags::ANON_EXCLUSIVE, 0, flags::DIRTY];
        let dst = [Some(&a), Some(&b), None, Some(&c)];
        assert!(matches!(
            take_dst(&dst, |i| moved[i]),
            Err(Error::PageInUse(Pfn(3)))
        ));
        assert_eq!([a.flags(), b.flags(), c.flags()], before, "nothing changed");
        // Without the foreign page every destination is taken, with its flags.
        take_dst(&dst[..3], |i| moved[i]).unwrap();
        assert_eq!(a.flags(), flags::LOCKED | flags::DIRTY | TAKEN_AS_DST);
        assert_eq!(
            b.flags(),
            flags::LOCKED | flags::ANON_EXCLUSIVE | TAKEN_AS_DST
        );
        // A second pages stage naming them is refused, and changes nothing.
        let again = [Some(&b)];
        assert!(take_dst(&again, |_| flags::DIRTY).is_err());
        assert_eq!(
            b.flags(),
            flags::LOCKED | flags::ANON_EXCLUSIVE | TAKEN_AS_DST
        );
    }
}
