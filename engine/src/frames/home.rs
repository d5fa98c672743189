//! Home runs: frames reserved at fixed places of the frame file, for the CPU-pointer layer to
//! map a second time.

use std::os::fd::{AsFd, BorrowedFd};

use super::HostFramePool;
use crate::error::{EngineError, Result};
use crate::pfn::{Pfn, PfnRange, PAGE_SIZE};

impl HostFramePool {
    /// Reserves `n` consecutive frames as a home run: frames that stay out of ordinary
    /// allocation until [`release_home`](Self::release_home), each claimed in place with
    /// [`claim_home`](Self::claim_home) and returned with [`free_adopted`](Self::free_adopted)
    /// (a claimed home frame is adopted: it belongs to the page map whose CPU mapping shows
    /// it). The run is not in use until its frames are claimed.
    pub fn reserve_home(&self, n: usize) -> Result<PfnRange> {
        if n == 0 {
            return Err(EngineError::InvalidConfig("a home run of 0 frames".into()));
        }
        let start =
            self.slots
                .lock()
                .reserve_home(n)
                .map_err(|s| EngineError::OutOfHostFrames {
                    requested: s.requested,
                    available: s.available,
                })?;
        Ok(PfnRange {
            start: self.range.start.add(start as u64),
            count: n as u64,
        })
    }

    /// Ends a home run's reservation. Every frame of it must be unclaimed (freed).
    pub fn release_home(&self, run: PfnRange) -> Result<()> {
        let start = self
            .range
            .index_of(run.start)
            .ok_or(EngineError::UnknownPfn(run.start))? as usize;
        // Checked: the run is the caller's (its fields are public), not one we handed out.
        let last = run
            .count
            .checked_sub(1)
            .and_then(|k| run.start.get().checked_add(k))
            .map(Pfn);
        match last {
            Some(l) if self.range.contains(l) => {}
            Some(l) => return Err(EngineError::UnknownPfn(l)),
            None => {
                return Err(EngineError::InvalidConfig(format!(
                    "a home run of {} frames from {}",
                    run.count, run.start
                )))
            }
        }
        self.slots
            .lock()
            .release_home(start, run.count as usize)
            .map_err(|i| EngineError::FrameInUse(self.range.start.add(i as u64)))
    }

    /// Claims frame `pfn` of a home run for a page map, adopted (see
    /// [`adopt`](Self::adopt)); `zeroed` guarantees it reads as zeros. Fails with
    /// [`EngineError::FrameInUse`] if it is claimed already or is not a reserved home frame.
    pub fn claim_home(&self, pfn: Pfn, zeroed: bool) -> Result<()> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        let mut slots = self.slots.lock();
        slots
            .claim_home(i)
            .map_err(|()| EngineError::FrameInUse(pfn))?;
        self.populate_up_to(i + 1);
        if zeroed && slots.is_dirty(i) {
            slots.mark_clean(i);
            // SAFETY: frame `i` is inside the arena and was just claimed by the caller alone.
            unsafe { self.frame_ptr(i).write_bytes(0, PAGE_SIZE) };
        }
        Ok(())
    }

    /// True if `pfn` belongs to a reserved home run.
    pub fn is_home(&self, pfn: Pfn) -> bool {
        self.range
            .index_of(pfn)
            .is_some_and(|i| self.slots.lock().is_home(i as usize))
    }

    /// The file behind the arena and the byte offset of `pfn` in it, for mapping a home run a
    /// second time (`None` where the arena is anonymous memory).
    pub fn home_file(&self, pfn: Pfn) -> Option<(BorrowedFd<'_>, u64)> {
        let i = self.range.index_of(pfn)?;
        Some((self.file.as_ref()?.as_fd(), i * PAGE_SIZE as u64))
    }
}
