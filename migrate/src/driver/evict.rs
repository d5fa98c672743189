//! Which device pages to evict: a clock over resident pages, least recently used first. A
//! page whose young bit (driver data bit 0, set when it is used) is set gets a second chance.
//! Pages that were freed meanwhile are dropped from the queue lazily, when the clock meets them.

use std::collections::VecDeque;

use hetmem_engine::Pfn;
use parking_lot::Mutex;

use crate::mm::PageMap;

/// Bit of a device page's driver data that marks it used since the clock last passed.
pub const YOUNG: u64 = 1;

/// The device pages in residence, oldest first.
#[derive(Default)]
pub(crate) struct Resident {
    queue: Mutex<VecDeque<Pfn>>,
}

impl Resident {
    /// Adds pages in residence, under one hold of the queue's lock. Pages freed since they
    /// joined (migrated home, unmapped) leave lazily; when the queue holds more than twice
    /// `resident` (the pages in use) plus some slack, they are swept out at once, so the
    /// queue stays bounded by what is resident.
    pub(crate) fn add_all(
        &self,
        pm: &PageMap,
        pfns: impl IntoIterator<Item = Pfn>,
        resident: usize,
    ) {
        let mut q = self.queue.lock();
        q.extend(pfns);
        if q.len() > 2 * resident + 1024 {
            let mut seen = std::collections::HashSet::new();
            q.retain(|&pfn| pm.page(pfn).is_some_and(|p| p.refcount() > 0) && seen.insert(pfn));
        }
    }

    /// Entries in the queue (tests and statistics).
    pub(crate) fn len(&self) -> usize {
        self.queue.lock().len()
    }

    pub(crate) fn clear(&self) {
        self.queue.lock().clear();
    }

    /// Up to `n` pages to evict: oldest first, young ones get a second chance, pinned ones
    /// are passed over.
    pub(crate) fn victims(&self, pm: &PageMap, n: usize) -> Vec<Pfn> {
        let mut q = self.queue.lock();
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut passes = q.len() * 2;
        let mut kept = VecDeque::new();
        while out.len() < n && passes > 0 {
            passes -= 1;
            let Some(pfn) = q.pop_front() else { break };
            let Some(page) = pm.page(pfn) else { continue };
            // Freed pages (unmapped, migrated away) leave the queue here rather than on free.
            if page.refcount() == 0 || !seen.insert(pfn) {
                continue;
            }
            if page.pincount() > 0 {
                kept.push_back(pfn);
            } else if page.driver_data() & YOUNG != 0 {
                page.set_driver_data(page.driver_data() & !YOUNG);
                q.push_back(pfn);
            } else {
                out.push(pfn);
            }
        }
        q.extend(kept);
        // Victims leave the queue; one that fails to move is put back with `restore`.
        out
    }

    /// Puts back pages that could not be evicted.
    pub(crate) fn restore(&self, pfns: &[Pfn]) {
        self.queue.lock().extend(pfns.iter().copied());
    }
}
