//! Bookkeeping of which pages of a memory are handed out: shared by the host frame pool and
//! device memory.
//!
//! Pages are handed out from a free list (most recently freed first) and, once it is empty,
//! from a watermark that moves up through never-used pages, so that a fresh memory hands out
//! runs of consecutive pages that the copy engine can coalesce.

use crate::bitmap::{for_each_word, AtomicBitmap};

/// Why a request for slots could not be met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub(crate) requested: usize,
    pub(crate) available: usize,
}

/// Home runs of at least this many slots (2 MiB of frames) start at a multiple of it.
pub(crate) const HOME_ALIGN: usize = 512;

/// Allocation state of `limit` page slots.
///
/// Besides slots handed out one by one, runs of slots can be *reserved* as homes (for memory
/// that must sit at a fixed slot, such as the frames behind a CPU-mapped region): homes are
/// carved from the top, below `limit`, and lower the `ceiling` under which ordinary slots are
/// handed out. A home slot is claimed and released in place; it never reaches the free list.
pub(crate) struct Slots {
    limit: usize,
    /// Ordinary slots are handed out below it; slots from it up are homes or free home space.
    ceiling: usize,
    watermark: usize,
    free: Vec<u32>,
    used: AtomicBitmap,
    /// Slots that may hold bytes of an earlier user.
    dirty: AtomicBitmap,
    /// Slots that belong to a reserved home run.
    homed: AtomicBitmap,
    /// Slots adopted by a page map (live pages): only the page map's own (unsafe) calls
    /// free them.
    adopted: AtomicBitmap,
    /// Adopted slots whose bytes no safe call may change (the shared zero page).
    sealed: AtomicBitmap,
    /// Runs above the ceiling whose reservation ended: (start, len).
    home_free: Vec<(usize, usize)>,
    /// Home slots claimed and not yet put back.
    homes_live: usize,
}

/// Why [`Slots::put_all`] refused a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PutRefused {
    /// The slot is not handed out (or the batch names it twice).
    NotInUse,
    /// The slot is adopted and the call is not the adopter's, or the other way round.
    Adoption,
}

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Slots {
            limit,
            ceiling: limit,
            watermark: 0,
            free: Vec::new(),
            used: AtomicBitmap::new(limit),
            dirty: AtomicBitmap::new(limit),
            homed: AtomicBitmap::new(limit),
            adopted: AtomicBitmap::new(limit),
            sealed: AtomicBitmap::new(limit),
            home_free: Vec::new(),
            homes_live: 0,
        }
    }

    /// Slots that could still be handed out.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + (self.ceiling - self.watermark)
    }

    /// Slots handed out (ordinary or home slots claimed) and not yet returned.
    pub(crate) fn in_use(&self) -> usize {
        self.watermark - self.free.len() + self.homes_live
    }

    /// Reserves a run of `n` consecutive home slots and returns its first index; the slots are
    /// not in use until claimed. A run of at least [`HOME_ALIGN`] slots starts at a multiple
    /// of it, so that where the kernel backs the frame file with huge pages, the run's CPU
    /// mapping can use them (one page-table entry per 2 MiB instead of 512).
    pub(crate) fn reserve_home(&mut self, n: usize) -> Result<usize, Shortfall> {
        let align = if n >= HOME_ALIGN { HOME_ALIGN } else { 1 };
        // The first free home run with room for an aligned start.
        let fit = self
            .home_free
            .iter()
            .enumerate()
            .find_map(|(k, &(start, len))| {
                let at = start.next_multiple_of(align);
                (at + n <= start + len).then_some((k, at))
            });
        let start = if let Some((k, at)) = fit {
            let (start, len) = self.home_free.swap_remove(k);
            if at > start {
                self.home_free.push((start, at - start));
            }
            if at + n < start + len {
                self.home_free.push((at + n, start + len - at - n));
            }
            at
        } else {
            match self.lower_ceiling(n, align) {
                Some(at) => at,
                None => {
                    return Err(Shortfall {
                        requested: n,
                        available: self.ceiling - self.watermark,
                    })
                }
            }
        };
        for i in start..start + n {
            self.homed.set_mut(i, true);
        }
        Ok(start)
    }

    /// Lowers the ceiling to make room for a run of `n` slots starting at a multiple of
    /// `align` below it, and returns the run's start; the slots between the run's end and the
    /// old ceiling become free home space. The room is never-used space above the watermark,
    /// or, once the watermark has met the ceiling (say under a passing exhaustion, though the
    /// free list may hold most of the memory), ordinary slots that are all free now: those
    /// leave the free list and the watermark comes down to the run. `None` if a slot of that
    /// span is in use.
    fn lower_ceiling(&mut self, n: usize, align: usize) -> Option<usize> {
        let low = self.ceiling.checked_sub(n)? / align * align;
        if low < self.watermark {
            if (low..self.watermark).any(|i| self.used.get(i)) {
                return None;
            }
            self.free.retain(|&i| (i as usize) < low);
            self.watermark = low;
        }
        if low + n < self.ceiling {
            self.home_free.push((low + n, self.ceiling - low - n));
        }
        self.ceiling = low;
        Some(low)
    }

    /// Ends the reservation of the home run `start..start + n`; every slot of it must be
    /// unclaimed. `Err(i)` names the first slot that is not an unclaimed home slot.
    pub(crate) fn release_home(&mut self, start: usize, n: usize) -> Result<(), usize> {
        if let Some(i) = (start..start + n).find(|&i| !self.is_home(i) || self.used.get(i)) {
            return Err(i);
        }
        for i in start..start + n {
            self.homed.set_mut(i, false);
        }
        self.home_free.push((start, n));
        // Free neighbours become one run (alignment leaves gaps that later releases fill).
        self.home_free.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.home_free.len());
        for &(s, l) in &self.home_free {
            match merged.last_mut() {
                Some((ms, ml)) if *ms + *ml == s => *ml += l,
                _ => merged.push((s, l)),
            }
        }
        self.home_free = merged;
        // Runs that reach down to the ceiling give their space back to ordinary slots.
        while let Some(k) = self.home_free.iter().position(|&(s, _)| s == self.ceiling) {
            let (_, len) = self.home_free.swap_remove(k);
            self.ceiling += len;
        }
        Ok(())
    }

    /// True if slot `i` belongs to a reserved home run.
    pub(crate) fn is_home(&self, i: usize) -> bool {
        i < self.limit && self.homed.get(i)
    }

    /// Claims home slot `i`, adopted (a claimed home slot always belongs to a page map).
    /// `Err(())` if it is not a reserved home slot or is claimed already.
    pub(crate) fn claim_home(&mut self, i: usize) -> Result<(), ()> {
        if !self.is_home(i) || self.used.set_mut(i, true) {
            return Err(());
        }
        self.adopted.set_mut(i, true);
        self.homes_live += 1;
        Ok(())
    }

    /// True if slot `i` is adopted by a page map.
    pub(crate) fn is_adopted(&self, i: usize) -> bool {
        i < self.limit && self.adopted.get(i)
    }

    /// Seals adopted slot `i` (see `sealed`); `Err(())` if it is not adopted.
    pub(crate) fn seal(&mut self, i: usize) -> Result<(), ()> {
        if !self.is_adopted(i) {
            return Err(());
        }
        self.sealed.set_mut(i, true);
        Ok(())
    }

    /// True if slot `i` is sealed.
    pub(crate) fn is_sealed(&self, i: usize) -> bool {
        i < self.limit && self.sealed.get(i)
    }

    /// Marks every slot of `idx` adopted, or none: `Err(k)` names the first entry that is not
    /// handed out or is adopted already (or appears twice).
    pub(crate) fn adopt(&mut self, idx: &[usize]) -> Result<(), usize> {
        for (k, &i) in idx.iter().enumerate() {
            if !self.is_used(i) || self.adopted.set_mut(i, true) {
                for &j in &idx[..k] {
                    self.adopted.set_mut(j, false);
                }
                return Err(k);
            }
        }
        Ok(())
    }

    /// Highest slot index ever handed out, plus one.
    pub(crate) fn watermark(&self) -> usize {
        self.watermark
    }

    pub(crate) fn is_used(&self, i: usize) -> bool {
        i < self.limit && self.used.get(i)
    }

    pub(crate) fn is_dirty(&self, i: usize) -> bool {
        self.dirty.get(i)
    }

    /// Marks a slot as holding only zeros.
    pub(crate) fn mark_clean(&self, i: usize) {
        self.dirty.set(i, false);
    }

    /// Hands out `n` slots, all or none, in ascending order.
    pub(crate) fn take(&mut self, n: usize) -> Result<Vec<u32>, Shortfall> {
        if n > self.available() {
            return Err(Shortfall {
                requested: n,
                available: self.available(),
            });
        }
        let from_free = n.min(self.free.len());
        let mut out: Vec<u32> = self.free.split_off(self.free.len() - from_free);
        let fresh = n - from_free;
        out.extend((self.watermark..self.watermark + fresh).map(|i| i as u32));
        self.watermark += fresh;
        out.sort_unstable();
        for &i in &out {
            self.used.set_mut(i as usize, true);
        }
        Ok(out)
    }

    /// Returns every slot of `idx`, or none. With `adopted`, the slots must be adopted (and
    /// stop being so); without, they must not be. `Err(k, why)` names the first entry that was
    /// not handed out or appears twice ([`PutRefused::NotInUse`]), or whose adoption is not
    /// what the call says ([`PutRefused::Adoption`]).
    pub(crate) fn put_all(
        &mut self,
        idx: &[usize],
        adopted: bool,
    ) -> Result<(), (usize, PutRefused)> {
        if self.put_ascending(idx, adopted) {
            return Ok(());
        }
        // Clear the used bits; meeting a clear bit means the slot was not handed out or the
        // batch names it twice, and the bits cleared so far are set again (seals too: a
        // refused batch must leave the zero page sealed).
        let mut unsealed = Vec::new();
        for (k, &i) in idx.iter().enumerate() {
            let why = if i >= self.limit || !self.used.get(i) {
                Some(PutRefused::NotInUse)
            } else if self.adopted.get(i) != adopted {
                Some(PutRefused::Adoption)
            } else {
                None
            };
            if let Some(why) = why {
                for &j in &idx[..k] {
                    self.used.set_mut(j, true);
                    self.adopted.set_mut(j, adopted);
                }
                for &j in &unsealed {
                    self.sealed.set_mut(j, true);
                }
                return Err((k, why));
            }
            self.used.set_mut(i, false);
            self.adopted.set_mut(i, false);
            if self.sealed.set_mut(i, false) {
                unsealed.push(i);
            }
        }
        self.free.reserve(idx.len());
        // Home slots stay where they are: unclaimed, possibly holding an earlier user's bytes.
        let homes = idx.iter().filter(|&&i| self.homed.get(i)).count();
        self.homes_live -= homes;
        // Highest first: the free list is popped from its end, so slots taken one at a time
        // (a range populated page by page) come out ascending, in runs the copy engine can
        // coalesce (pushed ascending, they came out descending: one region per page).
        for &i in idx.iter().rev() {
            self.dirty.set_mut(i, true);
            if !self.homed.get(i) {
                self.free.push(i as u32);
            }
        }
        Ok(())
    }

    /// [`Slots::put_all`]'s common case, a word of slots at a time: `idx` strictly ascending
    /// (so no slot is named twice), every slot handed out and adopted as the call says. False,
    /// with nothing changed, otherwise: the slot-by-slot path then finds the entry to report.
    fn put_ascending(&mut self, idx: &[usize], adopted: bool) -> bool {
        let Some(&last) = idx.last() else {
            return false;
        };
        if last >= self.limit || !idx.windows(2).all(|w| w[0] < w[1]) {
            return false;
        }
        let fits = for_each_word(idx, |w, m| {
            let want = if adopted { m } else { 0 };
            self.used.word(w) & m == m && self.adopted.word(w) & m == want
        });
        if !fits {
            return false;
        }
        let mut homes = 0;
        for_each_word(idx, |w, m| {
            *self.used.word_mut(w) &= !m;
            *self.adopted.word_mut(w) &= !m;
            *self.sealed.word_mut(w) &= !m;
            *self.dirty.word_mut(w) |= m;
            homes += (self.homed.word(w) & m).count_ones() as usize;
            true
        });
        self.homes_live -= homes;
        // Highest first, as in `put_all`; home slots stay where they are.
        if homes == 0 {
            self.free.extend(idx.iter().rev().map(|&i| i as u32));
        } else {
            for &i in idx.iter().rev() {
                if !self.homed.get(i) {
                    self.free.push(i as u32);
                }
            }
        }
        true
    }

    /// Gives back the slots of a `take` that could not be completed, leaving them as they were.
    pub(crate) fn untake(&mut self, taken: &[u32]) {
        for &i in taken.iter().rev() {
            self.used.set(i as usize, false);
            if i as usize + 1 == self.watermark {
                self.watermark -= 1;
            } else {
                self.free.push(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_slots_come_out_in_runs_and_freed_ones_first() {
        let mut s = Slots::new(8);
        assert_eq!(s.take(3).unwrap(), vec![0, 1, 2]);
        s.put_all(&[1], false).unwrap();
        assert!(s.is_dirty(1) && !s.is_used(1));
        assert_eq!(s.take(2).unwrap(), vec![1, 3]);
        assert_eq!(s.in_use(), 4);
        assert_eq!(
            s.take(5),
            Err(Shortfall {
                requested: 5,
                available: 4
            })
        );
        assert_eq!(s.in_use(), 4);
        assert_eq!(s.put_all(&[7], false), Err((0, PutRefused::NotInUse)));
        s.put_all(&[0], false).unwrap();
        assert_eq!(s.put_all(&[0], false), Err((0, PutRefused::NotInUse)));
        assert_eq!(s.put_all(&[2, 2], false), Err((1, PutRefused::NotInUse)));
        assert!(s.is_used(2), "a refused batch frees nothing");
    }

    #[test]
    fn adopted_slots_go_back_only_through_the_adopter() {
        let mut s = Slots::new(8);
        s.take(4).unwrap();
        assert_eq!(s.adopt(&[1, 5]), Err(1), "slot 5 is not handed out");
        assert!(!s.is_adopted(1), "a refused adoption adopts nothing");
        s.adopt(&[1, 2]).unwrap();
        assert_eq!(s.adopt(&[2]), Err(0), "adopted twice");
        assert_eq!(s.put_all(&[0, 1], false), Err((1, PutRefused::Adoption)));
        assert!(s.is_used(0), "a refused batch frees nothing");
        assert_eq!(s.put_all(&[0], true), Err((0, PutRefused::Adoption)));
        s.put_all(&[1, 2], true).unwrap();
        assert!(!s.is_adopted(1) && !s.is_used(1));
        let h = s.reserve_home(2).unwrap();
        s.claim_home(h).unwrap();
        assert!(s.is_adopted(h), "a claimed home slot is the page map's");
        assert_eq!(s.put_all(&[h], false), Err((0, PutRefused::Adoption)));
        s.put_all(&[h], true).unwrap();
    }

    /// The word-at-a-time path and the slot-by-slot one leave the same state, and a batch
    /// the fast path cannot take (a slot not in use, sealed or homed slots, an order that is
    /// not ascending) is still refused or freed exactly as before.
    #[test]
    fn ascending_batches_across_words_match_the_slot_by_slot_path() {
        let state = |s: &Slots| {
            (0..200)
                .map(|i| (s.is_used(i), s.is_dirty(i), s.is_adopted(i), s.is_sealed(i)))
                .collect::<Vec<_>>()
        };
        let mut fast = Slots::new(200);
        let mut slow = Slots::new(200);
        fast.take(200).unwrap();
        slow.take(200).unwrap();
        let idx: Vec<usize> = (30..170).step_by(3).collect();
        fast.adopt(&idx).unwrap();
        slow.adopt(&idx).unwrap();
        fast.seal(33).unwrap();
        slow.seal(33).unwrap();
        fast.put_all(&idx, true).unwrap();
        // Descending: the slot-by-slot path.
        let rev: Vec<usize> = idx.iter().rev().copied().collect();
        slow.put_all(&rev, true).unwrap();
        assert_eq!(state(&fast), state(&slow));
        assert_eq!(fast.available(), slow.available());
        // Refused: slot 30 is free now; nothing changes, and the entry is named.
        let before = state(&fast);
        assert_eq!(
            fast.put_all(&[10, 20, 30, 40], false),
            Err((2, PutRefused::NotInUse))
        );
        assert_eq!(
            fast.put_all(&[10, 20, 31], true),
            Err((0, PutRefused::Adoption))
        );
        assert_eq!(state(&fast), before);
        // Freed slots come back lowest first, one at a time.
        fast.put_all(&[64, 65, 130], false).unwrap();
        let singles: Vec<u32> = (0..3).map(|_| fast.take(1).unwrap()[0]).collect();
        assert_eq!(singles, vec![64, 65, 130]);
    }

    /// A refused batch leaves a sealed slot sealed, whether the refusal comes from a slot
    /// that is not adopted (ascending: the fast path declines first) or one named twice.
    #[test]
    fn a_refused_batch_keeps_its_seals() {
        let mut s = Slots::new(8);
        s.take(3).unwrap();
        s.adopt(&[0, 1]).unwrap();
        s.seal(0).unwrap();
        assert_eq!(s.put_all(&[0, 1, 2], true), Err((2, PutRefused::Adoption)));
        assert!(s.is_sealed(0));
        assert_eq!(s.put_all(&[0, 1, 0], true), Err((2, PutRefused::NotInUse)));
        assert!(s.is_sealed(0) && s.is_used(0) && s.is_adopted(0));
        s.put_all(&[0, 1], true).unwrap();
        assert!(!s.is_sealed(0), "a freed slot's seal ends");
    }

    #[test]
    fn a_freed_batch_is_taken_back_one_by_one_in_ascending_order() {
        let mut s = Slots::new(16);
        let all = s.take(16).unwrap();
        let idx: Vec<usize> = all[4..12].iter().map(|&i| i as usize).collect();
        s.put_all(&idx, false).unwrap();
        let singles: Vec<u32> = (0..8).map(|_| s.take(1).unwrap()[0]).collect();
        assert_eq!(singles, (4..12).collect::<Vec<u32>>());
    }

    #[test]
    fn homes_come_from_the_top_and_are_claimed_in_place() {
        let mut s = Slots::new(16);
        assert_eq!(s.take(4).unwrap(), vec![0, 1, 2, 3]);
        let h = s.reserve_home(8).unwrap();
        assert_eq!(h, 8);
        assert_eq!(s.available(), 4, "ordinary slots stop under the homes");
        assert_eq!(s.in_use(), 4, "a reservation is not a use");
        s.claim_home(9).unwrap();
        assert_eq!(s.claim_home(9), Err(()), "claimed twice");
        assert_eq!(s.claim_home(3), Err(()), "not a home slot");
        assert_eq!(s.in_use(), 5);
        assert_eq!(s.release_home(8, 8), Err(9), "a claimed slot keeps its run");
        s.put_all(&[9], true).unwrap();
        assert!(s.is_dirty(9) && !s.is_used(9) && s.is_home(9));
        assert_eq!(
            s.take(5).unwrap_err().available,
            4,
            "a put home slot stays a home"
        );
        s.release_home(8, 8).unwrap();
        assert!(!s.is_home(9));
        assert_eq!(
            s.available(),
            12,
            "a run at the ceiling gives its space back"
        );
        assert_eq!(s.reserve_home(13).unwrap_err().available, 12);
    }

    /// Runs of 2 MiB or more start on a 2 MiB boundary; the gaps alignment leaves are reused
    /// by smaller runs, and releasing everything gives every slot back.
    #[test]
    fn large_home_runs_are_aligned_and_gaps_come_back() {
        let mut s = Slots::new(4 * HOME_ALIGN + 100);
        s.take(10).unwrap();
        let small = s.reserve_home(3).unwrap();
        assert_eq!(small, 4 * HOME_ALIGN + 97, "small runs are not aligned");
        let big = s.reserve_home(HOME_ALIGN + 1).unwrap();
        assert_eq!(big % HOME_ALIGN, 0);
        assert!(big + HOME_ALIGN < small, "below the small run");
        // The gap between the big run's end and the small run serves a later small run.
        let gap = s.reserve_home(50).unwrap();
        assert!(
            gap > big + HOME_ALIGN && gap + 50 <= small,
            "{gap} in the gap"
        );
        let big2 = s.reserve_home(HOME_ALIGN).unwrap();
        assert_eq!(big2 % HOME_ALIGN, 0);
        for (start, n) in [
            (gap, 50),
            (big, HOME_ALIGN + 1),
            (small, 3),
            (big2, HOME_ALIGN),
        ] {
            s.release_home(start, n).unwrap();
        }
        assert_eq!(s.available(), 4 * HOME_ALIGN + 90, "every slot is back");
        assert_eq!(s.reserve_home(3 * HOME_ALIGN).unwrap(), HOME_ALIGN);
    }

    #[test]
    fn a_home_run_fits_in_slots_given_back_after_the_watermark_met_the_ceiling() {
        let mut s = Slots::new(16);
        let all = s.take(16).unwrap();
        assert_eq!(s.reserve_home(4).unwrap_err().available, 0);
        // Everything but slot 9 comes back: the top seven are free, slot 9 is not.
        let back: Vec<usize> = all
            .iter()
            .map(|&i| i as usize)
            .filter(|&i| i != 9)
            .collect();
        s.put_all(&back, false).unwrap();
        assert_eq!(s.available(), 15);
        assert_eq!(s.reserve_home(4).unwrap(), 12);
        assert_eq!(s.reserve_home(2).unwrap(), 10);
        assert!(
            s.reserve_home(1).is_err(),
            "slot 9 is in use: no run reaches down past it"
        );
        assert_eq!(s.in_use(), 1);
        assert_eq!(s.available(), 9, "slots 0..9 stay ordinary");
        let taken = s.take(9).unwrap();
        assert_eq!(taken, (0..9).collect::<Vec<u32>>());
        assert!(s.take(1).is_err());
        s.release_home(10, 2).unwrap();
        s.release_home(12, 4).unwrap();
        assert_eq!(s.available(), 6, "the runs' space is ordinary again");
    }

    #[test]
    fn untake_restores_the_state() {
        let mut s = Slots::new(4);
        s.take(1).unwrap();
        s.put_all(&[0], false).unwrap();
        let t = s.take(3).unwrap();
        assert_eq!(t, vec![0, 1, 2]);
        s.untake(&t);
        assert_eq!(s.available(), 4);
        assert_eq!(s.in_use(), 0);
        assert!(!s.is_used(0) && !s.is_used(1));
    }
}
