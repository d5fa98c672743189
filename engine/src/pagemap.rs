//! Device memory as numbered device pages: chunks added on demand up to a budget, carved into
//! 4 KiB pages that own a frame-number range no other memory uses.

use crate::copy::{MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::pfn::{reserve_pfn_range, Pfn, PfnRange, PAGE_SIZE};
use crate::slots::Slots;

/// Default size of one chunk of device memory.
pub const DEFAULT_CHUNK_BYTES: u64 = 64 << 20;

/// Bookkeeping of one device's pages: which are handed out, which chunks exist.
pub(crate) struct DevicePages {
    range: PfnRange,
    chunk_pages: usize,
    chunks: usize,
    slots: Slots,
}

/// What an allocation needs before its pages can be used.
pub(crate) struct Grant {
    /// Slot indices handed out, ascending.
    pub(crate) slots: Vec<u32>,
    /// Chunks that must be created first (indices), ascending.
    pub(crate) new_chunks: std::ops::Range<usize>,
}

impl DevicePages {
    pub(crate) fn new(budget_bytes: u64, chunk_bytes: u64) -> Result<Self> {
        let page = PAGE_SIZE as u64;
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(page) {
            return Err(EngineError::InvalidConfig(format!(
                "chunk size {chunk_bytes} is not a positive multiple of {PAGE_SIZE}"
            )));
        }
        if budget_bytes < page {
            return Err(EngineError::InvalidConfig(format!(
                "device budget {budget_bytes} is smaller than one page"
            )));
        }
        let pages = (budget_bytes / page) as usize;
        Ok(DevicePages {
            range: reserve_pfn_range(pages as u64),
            chunk_pages: (chunk_bytes / page) as usize,
            chunks: 0,
            slots: Slots::new(pages),
        })
    }

    pub(crate) fn range(&self) -> PfnRange {
        self.range
    }
    pub(crate) fn budget_pages(&self) -> usize {
        self.range.count as usize
    }
    pub(crate) fn in_use(&self) -> usize {
        self.slots.in_use()
    }
    pub(crate) fn available(&self) -> usize {
        self.slots.available()
    }
    /// Pages per chunk (the last chunk may hold fewer).
    pub(crate) fn chunk_pages(&self) -> usize {
        self.chunk_pages
    }

    /// Chunks the budget allows.
    pub(crate) fn max_chunks(&self) -> usize {
        self.budget_pages().div_ceil(self.chunk_pages)
    }

    pub(crate) fn chunks(&self) -> usize {
        self.chunks
    }

    /// Bytes of chunk `c` (the last chunk may be cut short by the budget).
    pub(crate) fn chunk_bytes(&self, c: usize) -> u64 {
        let first = c * self.chunk_pages;
        ((self.budget_pages() - first).min(self.chunk_pages) * PAGE_SIZE) as u64
    }

    pub(crate) fn slot_of(&self, pfn: Pfn) -> Result<usize> {
        // A match, not `ok_or`: the error value would be built and dropped per page.
        match self.range.index_of(pfn) {
            Some(i) => Ok(i as usize),
            None => Err(EngineError::UnknownPfn(pfn)),
        }
    }

    /// Where an allocated page lives.
    pub(crate) fn resolve(&self, pfn: Pfn) -> Result<Place> {
        let i = self.slot_of(pfn)?;
        if !self.slots.is_used(i) {
            return Err(EngineError::FreedPfn(pfn));
        }
        Ok(self.location(i))
    }

    pub(crate) fn location(&self, slot: usize) -> Place {
        Place {
            memory: MemoryId::Chunk((slot / self.chunk_pages) as u32),
            offset: ((slot % self.chunk_pages) * PAGE_SIZE) as u64,
        }
    }

    pub(crate) fn pfn(&self, slot: u32) -> Pfn {
        self.range.start.add(slot as u64)
    }

    pub(crate) fn is_dirty(&self, slot: usize) -> bool {
        self.slots.is_dirty(slot)
    }
    pub(crate) fn mark_clean(&self, slot: usize) {
        self.slots.mark_clean(slot)
    }

    /// Hands out `n` pages, all or none; the caller creates `new_chunks` before use, and calls
    /// [`DevicePages::chunks_created`] or [`DevicePages::untake`].
    pub(crate) fn take(&mut self, n: usize) -> Result<Grant> {
        let budget_pages = self.budget_pages();
        let slots = self
            .slots
            .take(n)
            .map_err(|s| EngineError::OutOfDeviceMemory {
                requested: s.requested,
                available: s.available,
                budget_pages,
            })?;
        let needed = self.slots.watermark().div_ceil(self.chunk_pages);
        Ok(Grant {
            slots,
            new_chunks: self.chunks..needed.max(self.chunks),
        })
    }

    pub(crate) fn chunks_created(&mut self, upto: usize) {
        self.chunks = self.chunks.max(upto);
    }

    pub(crate) fn untake(&mut self, slots: &[u32]) {
        self.slots.untake(slots)
    }

    /// Returns pages, all or none.
    pub(crate) fn put_all(&mut self, pfns: &[Pfn]) -> Result<()> {
        let idx = pfns
            .iter()
            .map(|&p| self.slot_of(p))
            .collect::<Result<Vec<_>>>()?;
        self.slots
            .put_all(&idx, false)
            .map_err(|(k, _)| EngineError::DoubleFree(pfns[k]))
    }

    pub(crate) fn is_allocated(&self, pfn: Pfn) -> bool {
        self.slot_of(pfn).is_ok_and(|i| self.slots.is_used(i))
    }
}
