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
use crate::mm::page::{flags, Page, ANY_GUARD, COLLECTED, TAKEN_AS_DST};
use crate::mm::PageMap;

/// The flags a migrating page hands to its destination (see [`take_dst`]).
pub(crate) const MOVED_FLAGS: u32 = flags::DIRTY | flags::ANON_EXCLUSIVE;

/// What [`take_dst`] changed on one destination, to take back if a later one is refused:
/// the moved flags the page did not have before (the mark is always its own), and the
/// driver word it cleared (0: none).
#[derive(Clone, Copy, Default)]
struct Taken {
    added: u32,
    data: u64,
}

/// What [`take_dst`] took so far: the added flags of every entry (a byte each, the flags
/// shifted down to fit), and the few driver words it cleared.
#[derive(Default)]
struct TakenSoFar {
    added: Vec<u8>,
    data: Vec<(usize, u64)>,
}

/// The flag bits [`TakenSoFar`] keeps in a byte: [`MOVED_FLAGS`] shifted down by this.
const ADDED_SHIFT: u32 = MOVED_FLAGS.trailing_zeros();
const _: () = assert!(MOVED_FLAGS >> ADDED_SHIFT < 256);

impl TakenSoFar {
    fn push(&mut self, i: usize, t: Taken) {
        self.added.push((t.added >> ADDED_SHIFT) as u8);
        if t.data != 0 {
            self.data.push((i, t.data));
        }
    }
}

/// Checks the driver's `dst` entries and takes each page they name for this migration, in
/// one pass: every named page must be a live, locked, unmapped page, not the entry's own
/// source, held by no guard and taken by no other pages stage (finalize releases them all:
/// they are the driver's pages); it is then marked taken ([`TAKEN_AS_DST`]) and, where the
/// entry migrates from a page (`moved(i)` is `Some` with that page's [`MOVED_FLAGS`]), given
/// those flags in the same atomic step, with its driver word cleared. A page named twice is
/// found taken the second time.
///
/// Two pages stages that validated the same page at once race on the mark: the second fails
/// with `PageInUse`. On any error every page taken so far is given back exactly as it was
/// (mark, flags and driver word), so nothing is changed. Returns the page of each entry.
pub(crate) fn take_dst<'p>(
    pm: &'p PageMap,
    src: &[u64],
    dst: &[u64],
    moved: impl Fn(usize) -> Option<u32>,
) -> Result<Vec<Option<&'p Page>>> {
    let mut pages: Vec<Option<&'p Page>> = Vec::with_capacity(dst.len());
    let mut taken = TakenSoFar {
        added: Vec::with_capacity(dst.len()),
        data: Vec::new(),
    };
    let mut cursor = pm.cursor();
    for (i, &w) in dst.iter().enumerate() {
        let Some(pfn) = migrate_pfn_to_pfn(w) else {
            pages.push(None);
            taken.push(i, Taken::default());
            continue;
        };
        let took = cursor
            .page_or_err(pfn)
            .and_then(|p| take_one(p, src[i], moved(i)).map(|t| (p, t)));
        match took {
            Ok((p, t)) => {
                pages.push(Some(p));
                taken.push(i, t);
            }
            Err(e) => {
                give_back(&pages, &taken);
                return Err(e);
            }
        }
    }
    Ok(pages)
}

/// Checks one destination page and takes it (see [`take_dst`]).
fn take_one(p: &Page, src: u64, moved: Option<u32>) -> Result<Taken> {
    let pfn = p.pfn();
    if p.refcount() == 0 {
        return Err(Error::PageFree(pfn));
    }
    if p.mapcount() != 0 || migrate_pfn_to_pfn(src) == Some(pfn) {
        return Err(Error::PageInUse(pfn));
    }
    if !p.test(flags::LOCKED) {
        return Err(Error::NotLocked(pfn));
    }
    // Refused in the same atomic step as the mark: a page still held by a guard of the
    // driver's (which would release it after us), taken by another migration's pages stage
    // (which will map or release it) or by this one, or a migration's source (this one's or
    // another's, which may be mapped nowhere).
    let moving = moved.unwrap_or(0);
    let was = p.take_as_dst(moving).ok_or(Error::PageInUse(pfn))?;
    let mut data = 0;
    if moved.is_some() {
        data = p.driver_data();
        if data != 0 {
            p.set_driver_data(0);
        }
    }
    Ok(Taken {
        added: moving & !was,
        data,
    })
}

/// Gives back what [`take_dst`] took: the mark, the moved flags each page did not have
/// before, and the driver words.
fn give_back(pages: &[Option<&Page>], taken: &TakenSoFar) {
    for (p, &added) in pages.iter().zip(&taken.added) {
        if let Some(p) = p {
            p.clear(TAKEN_AS_DST | (added as u32) << ADDED_SHIFT);
        }
    }
    for &(i, data) in &taken.data {
        if let Some(p) = pages[i] {
            p.set_driver_data(data);
        }
    }
}

/// Zeroes the `dst` words that a finalize must not release: pages that are not live,
/// locked and unmapped, pages a guard holds, a page named a second time, and (unless
/// `taken_is_ours`, for a caller that cannot tell whether its own pages stage ran) pages a
/// pages stage took. Finalize restores the source of an entry whose word is zeroed. Where
/// `taken_is_ours(i)` is false, a page kept is marked taken in the same atomic step as the
/// last check (its release's unlock ends the mark), so only one finalize releases it.
pub(crate) fn forget_foreign_dst(
    pm: &PageMap,
    dst: &mut [u64],
    taken_is_ours: impl Fn(usize) -> bool,
) {
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
        // A finalize whose pages stage did not run claims each page it keeps: two of them
        // (a driver that named one page in two migrations, both refused) or one and a
        // racing pages stage would otherwise both release it.
        let keep = if taken_is_ours(i) && p.test(TAKEN_AS_DST) {
            releasable(p, true)
        } else {
            releasable(p, false) && p.take_as_dst(0).is_some()
        };
        if repeat || !keep {
            dst[i] = 0;
        }
    }
}

/// True if `p` looks like a destination its driver handed over: live, locked, unmapped,
/// held by no guard, no migration's source, and taken by no pages stage unless
/// `taken_is_ours`.
fn releasable(p: &Page, taken_is_ours: bool) -> bool {
    let f = p.flags();
    p.refcount() > 0
        && p.mapcount() == 0
        && f & flags::LOCKED != 0
        && f & (ANY_GUARD | COLLECTED) == 0
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
    fn take_one_moves_flags_with_the_mark_and_give_back_takes_back_exactly_its_own_bits() {
        // A page with DIRTY already, given DIRTY and a driver word; one given ANON_EXCLUSIVE;
        // one taken without migrating (its driver word stays); one another migration's.
        let a = page(1, flags::DIRTY);
        a.set_driver_data(7);
        let b = page(2, 0);
        let c = page(3, 0);
        c.set_driver_data(9);
        let d = page(4, TAKEN_AS_DST);
        let before = [a.flags(), b.flags(), c.flags(), d.flags()];
        let ta = take_one(&a, 0, Some(flags::DIRTY)).unwrap();
        let tb = take_one(&b, 0, Some(flags::ANON_EXCLUSIVE)).unwrap();
        let tc = take_one(&c, 0, None).unwrap();
        assert_eq!(a.flags(), flags::LOCKED | flags::DIRTY | TAKEN_AS_DST);
        assert_eq!(
            b.flags(),
            flags::LOCKED | flags::ANON_EXCLUSIVE | TAKEN_AS_DST
        );
        assert_eq!(c.flags(), flags::LOCKED | TAKEN_AS_DST);
        assert_eq!((a.driver_data(), c.driver_data()), (0, 9));
        assert!(matches!(
            take_one(&d, 0, None),
            Err(Error::PageInUse(Pfn(4)))
        ));
        assert!(
            matches!(take_one(&a, 0, None), Err(Error::PageInUse(Pfn(1)))),
            "a page named twice is found taken"
        );
        let mut so_far = TakenSoFar::default();
        for (i, t) in [ta, tb, Taken::default(), tc].into_iter().enumerate() {
            so_far.push(i, t);
        }
        give_back(&[Some(&a), Some(&b), None, Some(&c)], &so_far);
        assert_eq!([a.flags(), b.flags(), c.flags(), d.flags()], before);
        assert_eq!((a.driver_data(), c.driver_data()), (7, 9));
    }

    #[test]
    fn take_one_refuses_a_page_that_cannot_be_a_destination() {
        let free = Page::new(Pfn(5), MemoryKind::System, Owner(0));
        assert!(matches!(take_one(&free, 0, None), Err(Error::PageFree(_))));
        let unlocked = page(6, 0);
        unlocked.unlock();
        assert!(matches!(
            take_one(&unlocked, 0, None),
            Err(Error::NotLocked(_))
        ));
        let guarded = page(7, crate::mm::page::GUARDED);
        assert!(matches!(
            take_one(&guarded, 0, None),
            Err(Error::PageInUse(_))
        ));
        let own = page(8, 0);
        assert!(matches!(
            take_one(&own, migrate_pfn(Pfn(8)), None),
            Err(Error::PageInUse(_))
        ));
        for p in [&unlocked, &guarded, &own] {
            assert_eq!(p.flags() & TAKEN_AS_DST, 0, "nothing taken");
        }
    }
}
