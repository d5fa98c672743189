//! The page map's side of the pool: frames it adopts as live pages, and the accessors that
//! reach home frames, which only it may call.

use super::{HostFramePool, Reach};
use crate::error::{EngineError, Result};
use crate::pfn::Pfn;

impl HostFramePool {
    /// Marks allocated frames as a page map's (its live pages): from then on the safe
    /// [`free`](Self::free) refuses them, and only [`free_adopted`](Self::free_adopted) returns
    /// them. All or none: a frame that is not allocated, or adopted already, fails the call
    /// ([`EngineError::FreedPfn`], [`EngineError::FrameOwned`]).
    pub fn adopt(&self, pfns: &[Pfn]) -> Result<()> {
        let idx = self.indices(pfns)?;
        let mut slots = self.slots.lock();
        slots.adopt(&idx).map_err(|k| {
            if slots.is_used(idx[k]) {
                EngineError::FrameOwned(pfns[k])
            } else {
                EngineError::FreedPfn(pfns[k])
            }
        })
    }

    /// Seals an adopted frame: from then on no safe call changes its bytes (`write`, `zero`,
    /// a copy into it fail with [`EngineError::FrameOwned`]), though safe calls still read
    /// it; the seal ends when the frame is freed. For the shared zero page, which every hole
    /// of every address space reads. Fails on a frame that is not adopted.
    pub fn seal(&self, pfn: Pfn) -> Result<()> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        self.slots
            .lock()
            .seal(i)
            .map_err(|()| EngineError::InvalidConfig(format!("frame {pfn} is not adopted")))
    }

    /// Fails with [`EngineError::FrameOwned`] on the first of `pfns` that is sealed or a
    /// claimed home frame (a safe copy must not write it); frames of no pool are left to
    /// the copy's own checks.
    pub(crate) fn check_writable(&self, pfns: impl IntoIterator<Item = Pfn>) -> Result<()> {
        let slots = self.slots.lock();
        for p in pfns {
            if let Some(i) = self.range.index_of(p) {
                if slots.is_sealed(i as usize) {
                    return Err(EngineError::FrameOwned(p));
                }
            }
        }
        Ok(())
    }

    /// True if a page map adopted `pfn` (a live page's frame, or a claimed home frame).
    pub fn is_adopted(&self, pfn: Pfn) -> bool {
        self.range
            .index_of(pfn)
            .is_some_and(|i| self.slots.lock().is_adopted(i as usize))
    }

    /// Returns adopted frames to the pool, all or none.
    ///
    /// # Safety
    /// The caller is the page map that adopted the frames, and nothing reaches them any more:
    /// no address space maps them, no CPU mapping shows them, no copy is in flight and no
    /// reference to their pages is left. The next owner gets them.
    pub unsafe fn free_adopted(&self, pfns: &[Pfn]) -> Result<()> {
        self.put_batch(pfns, true)
    }

    /// [`read`](Self::read) for the page map, home frames included.
    ///
    /// # Safety
    /// If `pfn` is a home frame, no CPU mapping of it may be written while the call runs
    /// (the page is not mapped writable for CPU pointers, and no mutable view of it lives).
    pub unsafe fn read_owned(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_frame(pfn, offset, out.len(), Reach::Owner, |p| {
            // SAFETY: as in `read`; a CPU mapping does not write the frame meanwhile (the
            // caller's promise).
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
        })
    }

    /// [`write`](Self::write) for the page map, home frames included.
    ///
    /// # Safety
    /// If `pfn` is a home frame, no CPU mapping of it may be read or written while the call
    /// runs, and no view of it lives (the page is not mapped for CPU pointers, or is mapped
    /// only by a caller that lets nothing touch it until the call returns).
    pub unsafe fn write_owned(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<()> {
        self.with_frame(pfn, offset, data.len(), Reach::Owner, |p| {
            // SAFETY: as in `write`; no CPU mapping touches the frame meanwhile (the
            // caller's promise).
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
        })
    }
}
