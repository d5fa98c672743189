//! Runs of a CPU-mapped region left to the kernel's own fault path.
//!
//! Mapping a long run of pages through userfaultfd costs the fault thread about as much as
//! the kernel's own faults cost the thread that touches them (`UFFDIO_CONTINUE` or
//! `MADV_POPULATE_READ`: 300-450 ns per 4 KiB page on this project's VM). Where every page
//! of a run of at least `BULK_PAGES` is a present, writable page in its home frame, the
//! fault thread instead ends the run's registration: the page cache holds exactly the bytes
//! the process may see, so an access the process makes there is mapped by the kernel, on
//! the accessing thread, many pages per fault, while the fault thread brings the next
//! window back from the device.
//!
//! The rule that keeps this sound: a left run is registered again, under the mirror lock,
//! by the first invalidation that touches it, before that invalidation drops the process's
//! entries (`Shared::register_again`, called from `drop_view`). A page's entry cannot change
//! without an invalidation of its range, so no access to a left run maps a page whose entry
//! is no longer a present, writable home page. Each left run is a mapping of its own in the
//! process (which has a limited number): a region keeps at most [`MAX_LEFT_RUNS`] of them,
//! and an invalidation of a region that has more registers all of it again.

use std::collections::BTreeMap;

use super::{CpuFaultError, Error, Shared, VirtAddr};

/// The runs of each region (by its start) that are left to the kernel's fault path: their
/// registration ended (`Shared::leave`) because every page in them is a present, writable home
/// page; the next invalidation that touches a run registers it again.
#[derive(Default)]
pub(super) struct Left(pub(super) BTreeMap<u64, BTreeMap<u64, u64>>);

impl Left {
    /// Records `[s, e)` of the region at `region` as left (merging with touching runs).
    pub(super) fn add(&mut self, region: u64, mut s: u64, mut e: u64) {
        let runs = self.0.entry(region).or_default();
        while let Some((&a, &b)) = runs.range(..=e).next_back().filter(|(_, &b)| b >= s) {
            runs.remove(&a);
            (s, e) = (s.min(a), e.max(b));
        }
        runs.insert(s, e);
    }

    /// Takes the parts of the region's left runs that lie in `[lo, hi)` (for registering
    /// again); all of the region's runs where it has more than [`MAX_LEFT_RUNS`] (the whole
    /// region is registered again, which merges its mappings back into one).
    pub(super) fn take(&mut self, region: u64, lo: u64, hi: u64) -> Taken {
        let Some(runs) = self.0.get_mut(&region) else {
            return Taken::Parts(Vec::new());
        };
        if runs.len() > MAX_LEFT_RUNS {
            self.0.remove(&region);
            return Taken::All;
        }
        let mut parts = Vec::new();
        let hit: Vec<(u64, u64)> = runs
            .range(..hi)
            .filter(|(_, &e)| e > lo)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            runs.remove(&s);
            if s < lo {
                runs.insert(s, lo);
            }
            if e > hi {
                runs.insert(hi, e);
            }
            parts.push((s.max(lo), e.min(hi)));
        }
        if runs.is_empty() {
            self.0.remove(&region);
        }
        Taken::Parts(parts)
    }

    /// True if the region at `region` may leave one more run.
    pub(super) fn room(&self, region: u64) -> bool {
        self.0.get(&region).is_none_or(|r| r.len() < MAX_LEFT_RUNS)
    }

    /// True if `addr` lies in a run left to the kernel.
    pub(super) fn contains(&self, addr: u64) -> bool {
        self.0
            .range(..=addr)
            .next_back()
            .and_then(|(_, runs)| runs.range(..=addr).next_back())
            .is_some_and(|(_, &e)| addr < e)
    }
}

/// What an invalidation registers again.
pub(super) enum Taken {
    /// The whole region.
    All,
    /// These parts of it.
    Parts(Vec<(u64, u64)>),
}

/// Left runs a region may have before an invalidation of any part of it registers all of it
/// again (each run is a mapping of its own in the process, which has a limited number).
pub(super) const MAX_LEFT_RUNS: usize = 64;

impl Shared {
    /// Registers again the parts of `[lo, hi)` (of the region at `region`, `len` bytes)
    /// that were left to the kernel; the caller holds the mirror lock (`left`) and drops the
    /// range's entries next.
    pub(super) fn register_again(&self, left: &mut Left, region: u64, len: u64, lo: u64, hi: u64) {
        let again = match left.take(region, lo, hi) {
            Taken::All => vec![(region, region + len)],
            Taken::Parts(parts) => parts,
        };
        for (a, b) in again {
            if let Err(e) = self.uffd.register(a, b - a) {
                // Registering the whole region merges its mappings back into one (and covers
                // every other part, so nothing is left to do).
                match self.uffd.register(region, len) {
                    Ok(()) => {
                        left.0.remove(&region);
                        return;
                    }
                    Err(_) => self.seal_view(a, b, region, len, e),
                }
            }
        }
    }

    /// Leaves `[s, e)` of the region at `region` to the kernel's fault path: its
    /// registration ends, so an access to a page the process does not map there is mapped by
    /// the kernel from the page cache, on the accessing thread, with no message to the fault
    /// thread. The caller holds the mirror lock and checked that every page is a present,
    /// writable home page. The threads whose faults there are still queued are woken: the
    /// kernel wakes waiting threads before the registration ends, so one may have faulted
    /// again meanwhile.
    pub(super) fn leave(
        &self,
        left: &mut Left,
        region: u64,
        s: u64,
        e: u64,
    ) -> std::io::Result<()> {
        self.uffd.unregister(s, e - s)?;
        left.add(region, s, e);
        self.uffd.wake(s, e - s)
    }

    /// The last resort of an invalidation that cannot register its range again: the view's
    /// `[lo, hi)` becomes inaccessible (an access is a `SIGSEGV`, never stale bytes), or,
    /// where that needs a mapping the process cannot have, the whole region (`region`, `len`
    /// bytes: no split at its own ends); the error is kept where the mirror's owner reads
    /// fault errors.
    fn seal_view(&self, lo: u64, hi: u64, region: u64, len: u64, e: std::io::Error) {
        tracing::error!("registering {lo:#x}..{hi:#x} again: {e}; the range is sealed");
        for (a, n) in [(lo, hi - lo), (region, len)] {
            // SAFETY: `[a, a + n)` lies inside a view this mirror mapped and still owns;
            // removing access only makes later accesses fault.
            if unsafe { libc::mprotect(a as *mut libc::c_void, n as usize, 0) } == 0 {
                break;
            }
            tracing::error!(
                "sealing {a:#x}..{:#x}: {}",
                a + n,
                std::io::Error::last_os_error()
            );
        }
        *self.last_error.lock() = Some(CpuFaultError {
            addr: lo,
            error: Error::FaultFailed {
                addr: VirtAddr(lo),
                reason: format!("the view could not be registered again ({e}); sealed"),
            },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = 0x10_0000;

    #[test]
    fn runs_merge_split_and_answer_lookups() {
        let mut l = Left::default();
        l.add(R, R + 0x1000, R + 0x3000);
        l.add(R, R + 0x3000, R + 0x5000); // touching: one run
        l.add(R, R + 0x8000, R + 0x9000);
        assert_eq!(l.0[&R].len(), 2);
        assert!(l.contains(R + 0x1000) && l.contains(R + 0x4fff));
        assert!(!l.contains(R) && !l.contains(R + 0x5000) && !l.contains(R + 0x9000));
        // An invalidation inside the first run takes its middle and leaves both ends.
        let Taken::Parts(p) = l.take(R, R + 0x2000, R + 0x4000) else {
            panic!("parts expected")
        };
        assert_eq!(p, vec![(R + 0x2000, R + 0x4000)]);
        assert!(l.contains(R + 0x1000) && !l.contains(R + 0x2000) && l.contains(R + 0x4000));
        // One that covers everything takes every run, and the region is forgotten.
        let Taken::Parts(p) = l.take(R, R, R + 0x10000) else {
            panic!("parts expected")
        };
        assert_eq!(
            p,
            vec![
                (R + 0x1000, R + 0x2000),
                (R + 0x4000, R + 0x5000),
                (R + 0x8000, R + 0x9000)
            ]
        );
        assert!(l.0.is_empty() && l.room(R));
    }

    #[test]
    fn a_region_with_too_many_runs_is_registered_whole() {
        let mut l = Left::default();
        for k in 0..MAX_LEFT_RUNS as u64 {
            assert!(l.room(R));
            l.add(R, R + k * 0x2000, R + k * 0x2000 + 0x1000);
        }
        assert!(!l.room(R), "no room past the cap");
        // A split pushes it past the cap; the next invalidation takes the whole region.
        let Taken::Parts(_) = l.take(R, R + 0x200, R + 0x400) else {
            panic!("parts expected")
        };
        assert!(matches!(l.take(R, R, R + 0x1000), Taken::All));
        assert!(!l.contains(R + 0x2000));
    }
}
