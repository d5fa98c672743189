//! Bitmaps whose bits are read without a lock, and bit locks over up to 64 bits at once.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size bitmap whose bits can be read without a lock.
pub(crate) struct AtomicBitmap {
    words: Box<[AtomicU64]>,
}

/// Bits of an [`AtomicBitmap`] held as locks; dropping the guard unlocks them.
pub(crate) struct WordLocks<'a> {
    map: &'a AtomicBitmap,
    words: Vec<(usize, u64)>,
}

impl WordLocks<'_> {
    /// Keeps the bits locked past the guard: the caller unlocks them later with
    /// [`AtomicBitmap::unlock_words`].
    pub(crate) fn keep(mut self) -> Vec<(usize, u64)> {
        std::mem::take(&mut self.words)
    }
}

impl Drop for WordLocks<'_> {
    fn drop(&mut self) {
        self.map.unlock_words(&self.words);
    }
}

/// Calls `f(word, mask)` for each run of `idx` that falls in one word (ascending `idx` gives
/// each word once), stopping at the first `false`; returns whether every call said `true`.
pub(crate) fn for_each_word(idx: &[usize], mut f: impl FnMut(usize, u64) -> bool) -> bool {
    let mut k = 0;
    while k < idx.len() {
        let w = idx[k] / 64;
        let mut mask = 0u64;
        while k < idx.len() && idx[k] / 64 == w {
            mask |= 1 << (idx[k] % 64);
            k += 1;
        }
        if !f(w, mask) {
            return false;
        }
    }
    true
}

/// Bits `idx` as (word, mask) pairs, one per word, in ascending word order (the order
/// [`AtomicBitmap::lock_words`] takes them in). Duplicates are harmless.
pub(crate) fn bit_words(idx: impl IntoIterator<Item = usize>) -> Vec<(usize, u64)> {
    let mut words: Vec<(usize, u64)> = Vec::new();
    let mut sorted = true;
    for i in idx {
        match words.last_mut() {
            Some((w, m)) if *w == i / 64 => *m |= 1 << (i % 64),
            Some((w, _)) if *w > i / 64 => {
                sorted = false;
                words.push((i / 64, 1 << (i % 64)));
            }
            _ => words.push((i / 64, 1 << (i % 64))),
        }
    }
    if !sorted {
        words.sort_unstable_by_key(|&(w, _)| w);
        words.dedup_by(|b, a| {
            if a.0 == b.0 {
                a.1 |= b.1;
                true
            } else {
                false
            }
        });
    }
    words
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
    /// Word `w`: bits `64 * w ..= 64 * w + 63`.
    pub(crate) fn word(&self, w: usize) -> u64 {
        self.words[w].load(Ordering::Acquire)
    }
    /// Word `w` through exclusive access.
    pub(crate) fn word_mut(&mut self, w: usize) -> &mut u64 {
        self.words[w].get_mut()
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
    /// Sets every bit of `mask` in word `w`, waiting (yielding) while any of them is set
    /// already: a bit lock over up to 64 bits at once.
    /// `on_wait` runs before each wait.
    pub(crate) fn lock_word_or(&self, w: usize, mask: u64, on_wait: &mut dyn FnMut()) {
        loop {
            let old = self.words[w].fetch_or(mask, Ordering::Acquire);
            if old & mask == 0 {
                return;
            }
            // Give back the bits this attempt set, then wait for the holder.
            let ours = mask & !old;
            if ours != 0 {
                self.words[w].fetch_and(!ours, Ordering::Release);
            }
            on_wait();
            std::thread::yield_now();
        }
    }

    /// Locks the bits of `words` ((word, mask) pairs in ascending word order, as
    /// [`bit_words`] makes them) and returns a guard that unlocks them; `on_wait` runs each
    /// time a bit is found held (to retire the batches that may hold it). Every caller that
    /// holds several words of one bitmap takes them in that order, so two callers never wait
    /// for each other in a cycle.
    pub(crate) fn lock_words(
        &self,
        words: Vec<(usize, u64)>,
        on_wait: &mut dyn FnMut(),
    ) -> WordLocks<'_> {
        debug_assert!(words.windows(2).all(|w| w[0].0 < w[1].0));
        for &(w, mask) in &words {
            self.lock_word_or(w, mask, on_wait);
        }
        WordLocks { map: self, words }
    }

    /// Clears the bits of every (word, mask) of `words`.
    pub(crate) fn unlock_words(&self, words: &[(usize, u64)]) {
        for &(w, mask) in words {
            self.unlock_word(w, mask);
        }
    }

    /// Clears the bits of `mask` in word `w` (locked by [`AtomicBitmap::lock_word`]).
    pub(crate) fn unlock_word(&self, w: usize, mask: u64) {
        self.words[w].fetch_and(!mask, Ordering::Release);
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
