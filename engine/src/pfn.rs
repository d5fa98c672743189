//! Frame numbers, and the global space they are carved from.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes in one page, host frame or device page alike.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A frame number: names one page of some memory, unique across all memories of the process.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Pfn(pub u64);

impl Pfn {
    /// The frame number as a plain integer.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The frame `n` places after this one.
    pub const fn add(self, n: u64) -> Pfn {
        Pfn(self.0 + n)
    }
}

impl fmt::Debug for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pfn({:#x})", self.0)
    }
}

impl fmt::Display for Pfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A half-open range of frame numbers owned by one memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PfnRange {
    /// First frame number of the range.
    pub start: Pfn,
    /// Number of frames in the range.
    pub count: u64,
}

impl PfnRange {
    /// True if `pfn` lies in this range.
    pub const fn contains(&self, pfn: Pfn) -> bool {
        pfn.0 >= self.start.0 && pfn.0 - self.start.0 < self.count
    }
    /// One past the last frame number.
    pub const fn end(&self) -> Pfn {
        Pfn(self.start.0 + self.count)
    }
    /// The index of `pfn` inside the range, if it is inside.
    pub const fn index_of(&self, pfn: Pfn) -> Option<u64> {
        if self.contains(pfn) {
            Some(pfn.0 - self.start.0)
        } else {
            None
        }
    }
}

/// Frame numbers below this are never handed out, so that small integers are never valid pfns.
const FIRST_PFN: u64 = 1 << 20;
/// Ranges start on this alignment (in frames) to keep them readable in hex dumps.
const RANGE_ALIGN: u64 = 1 << 16;

static NEXT_PFN: AtomicU64 = AtomicU64::new(FIRST_PFN);

/// Reserves `count` frame numbers that no other memory of this process will ever use.
pub(crate) fn reserve_pfn_range(count: u64) -> PfnRange {
    let span = count.div_ceil(RANGE_ALIGN).max(1) * RANGE_ALIGN;
    let start = NEXT_PFN.fetch_add(span, Ordering::Relaxed);
    PfnRange {
        start: Pfn(start),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_ranges_are_disjoint() {
        let a = reserve_pfn_range(10);
        let b = reserve_pfn_range(RANGE_ALIGN + 1);
        let c = reserve_pfn_range(1);
        assert!(a.end().0 <= b.start.0);
        assert!(b.end().0 <= c.start.0);
        assert!(a.contains(a.start) && !a.contains(a.end()));
        assert_eq!(b.index_of(b.start.add(5)), Some(5));
        assert_eq!(b.index_of(c.start), None);
        assert!(a.start.0 >= FIRST_PFN);
    }
}
