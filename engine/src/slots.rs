//! Bookkeeping of which pages of a memory are handed out: shared by the host frame pool and
//! device memory.
//!
//! Pages are handed out from a free list (most recently freed first) and, once it is empty,
//! from a watermark that moves up through never-used pages, so that a fresh memory hands out
//! runs of consecutive pages that the copy engine can coalesce.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bitmap whose bits can be read without a lock.
pub(crate) struct AtomicBitmap {
    words: Box<[AtomicU64]>,
}

impl AtomicBitmap {
    pub(crate) fn new(bits: usize) -> Self {
        AtomicBitmap {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub(crate) fn get(&self, i: usize) -> bool {
        self.words[i / 64].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
    /// Sets bit `i` to `v` through exclusive access (no locked instruction), returning its
    /// old value.
    pub(crate) fn set_mut(&mut self, i: usize, v: bool) -> bool {
        let mask = 1u64 << (i % 64);
        let w = self.words[i / 64].get_mut();
        let old = *w & mask != 0;
        if v {
            *w |= mask;
        } else {
            *w &= !mask;
        }
        old
    }
    /// Sets bit `i` to `v`, returning its old value.
    pub(crate) fn set(&self, i: usize, v: bool) -> bool {
        let mask = 1u64 << (i % 64);
        let old = if v {
            self.words[i / 64].fetch_or(mask, Ordering::AcqRel)
        } else {
            self.words[i / 64].fetch_and(!mask, Ordering::AcqRel)
        };
        old & mask != 0
    }
}

/// Why a request for slots could not be met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub(crate) requested: usize,
    pub(crate) available: usize,
}

/// Allocation state of `limit` page slots.
pub(crate) struct Slots {
    limit: usize,
    watermark: usize,
    free: Vec<u32>,
    used: AtomicBitmap,
    /// Slots that may hold bytes of an earlier user.
    dirty: AtomicBitmap,
}

impl Slots {
    pub(crate) fn new(limit: usize) -> Self {
        Slots {
            limit,
            watermark: 0,
            free: Vec::new(),
            used: AtomicBitmap::new(limit),
            dirty: AtomicBitmap::new(limit),
        }
    }

    /// Slots that could still be handed out.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + (self.limit - self.watermark)
    }

    /// Slots handed out and not yet returned.
    pub(crate) fn in_use(&self) -> usize {
        self.watermark - self.free.len()
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

    /// Returns every slot of `idx`, or none: `Err(k)` names the first entry that was not
    /// handed out or appears twice.
    pub(crate) fn put_all(&mut self, idx: &[usize]) -> Result<(), usize> {
        // Clear the used bits; meeting a clear bit means the slot was not handed out or the
        // batch names it twice, and the bits cleared so far are set again.
        for (k, &i) in idx.iter().enumerate() {
            if i >= self.limit || !self.used.set_mut(i, false) {
                for &j in &idx[..k] {
                    self.used.set_mut(j, true);
                }
                return Err(k);
            }
        }
        self.free.reserve(idx.len());
        // Highest first: the free list is popped from its end, so slots taken one at a time
        // (a range populated page by page) come out ascending, in runs the copy engine can
        // coalesce (pushed ascending, they came out descending: one region per page).
        for &i in idx.iter().rev() {
            self.dirty.set_mut(i, true);
            self.free.push(i as u32);
        }
        Ok(())
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
        s.put_all(&[1]).unwrap();
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
        assert_eq!(s.put_all(&[7]), Err(0));
        s.put_all(&[0]).unwrap();
        assert_eq!(s.put_all(&[0]), Err(0));
        assert_eq!(s.put_all(&[2, 2]), Err(1));
        assert!(s.is_used(2), "a refused batch frees nothing");
    }

    #[test]
    fn a_freed_batch_is_taken_back_one_by_one_in_ascending_order() {
        let mut s = Slots::new(16);
        let all = s.take(16).unwrap();
        let idx: Vec<usize> = all[4..12].iter().map(|&i| i as usize).collect();
        s.put_all(&idx).unwrap();
        let singles: Vec<u32> = (0..8).map(|_| s.take(1).unwrap()[0]).collect();
        assert_eq!(singles, (4..12).collect::<Vec<u32>>());
    }

    #[test]
    fn untake_restores_the_state() {
        let mut s = Slots::new(4);
        s.take(1).unwrap();
        s.put_all(&[0]).unwrap();
        let t = s.take(3).unwrap();
        assert_eq!(t, vec![0, 1, 2]);
        s.untake(&t);
        assert_eq!(s.available(), 4);
        assert_eq!(s.in_use(), 0);
        assert!(!s.is_used(0) && !s.is_used(1));
    }
}
