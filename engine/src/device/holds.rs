//! What a device's batches in flight hold: the bits of the frames and device pages they use,
//! released when they complete (see "Who may touch a frame's or a device page's bytes" in
//! docs/ARCHITECTURE.md).

use super::Shared;
use crate::bitmap::bit_words;
use crate::error::EngineError;
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
                .partition(|h| self.finished(h.value));
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
    /// True once batch `value` has completed, or can never complete (its device was lost).
    /// Any other error of the poll (wgpu reports errors of unrelated work there) leaves the
    /// batch in flight: its bits stay held until a later poll sees it done.
    pub(super) fn finished(&self, value: u64) -> bool {
        match self.backend.poll(value) {
            Ok(done) => done,
            Err(EngineError::DeviceLost(_)) => true,
            Err(e) => {
                tracing::debug!("polling batch {value}: {e}");
                false
            }
        }
    }

    /// Releases what batch `value` holds after a wait for it returned with an error (the
    /// batch will not run any further, whatever a later poll says).
    pub(super) fn give_up(&self, value: u64) {
        let gone: Vec<Hold> = {
            let mut holds = self.holds.lock();
            let (gone, left) = std::mem::take(&mut *holds)
                .into_iter()
                .partition(|h| h.value == value);
            *holds = left;
            gone
        };
        for h in gone {
            self.release(&h);
        }
    }

    pub(super) fn keep(&self, hold: Hold) {
        if self.finished(hold.value) {
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
        let range = self.page_range;
        let idx = pfns
            .into_iter()
            .filter_map(|p| range.index_of(p).map(|i| i as usize));
        self.held
            .lock_words(bit_words(idx), &mut || self.settle())
            .keep()
    }
}
