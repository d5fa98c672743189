//! What a device's batches in flight hold: the bits of the frames and device pages they use,
//! released when they complete (see "Who may touch a frame's or a device page's bytes" in
//! docs/ARCHITECTURE.md).

use super::Shared;
use crate::bitmap::bit_words;
use crate::frames::Settle;
use crate::pfn::Pfn;

/// The bits a batch in flight holds.
pub(super) struct Hold {
    pub(super) value: u64,
    pub(super) frames: Vec<(usize, u64)>,
    pub(super) pages: Vec<(usize, u64)>,
}

impl Settle for Shared {
    fn settle(&self) {
        let done: Vec<Hold> = {
            let mut holds = self.holds.lock();
            if holds.is_empty() {
                return;
            }
            // A batch whose state cannot be had (a device lost) completes nothing more.
            let (done, left) = std::mem::take(&mut *holds)
                .into_iter()
                .partition(|h| self.backend.poll(h.value).unwrap_or(true));
            *holds = left;
            done
        };
        for h in done {
            self.release(&h);
        }
    }
}

impl Shared {
    /// Keeps `hold` until its batch completes (or releases it now if it has).
    pub(super) fn keep(&self, hold: Hold) {
        if self.backend.poll(hold.value).unwrap_or(true) {
            self.release(&hold);
        } else {
            self.holds.lock().push(hold);
        }
    }

    pub(super) fn release(&self, h: &Hold) {
        self.held.unlock_words(&h.pages);
        self.frames.release_frames(&h.frames);
    }

    /// Locks the bits of the device pages among `pfns` (others are skipped), retiring this
    /// device's completed batches while a bit is held.
    pub(super) fn hold_pages(&self, pfns: impl IntoIterator<Item = Pfn>) -> Vec<(usize, u64)> {
        let range = self.pages.lock().range();
        let idx = pfns
            .into_iter()
            .filter_map(|p| range.index_of(p).map(|i| i as usize));
        self.held
            .lock_words(bit_words(idx), &mut || self.settle())
            .keep()
    }
}
