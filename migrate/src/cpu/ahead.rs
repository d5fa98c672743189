//! Read-ahead for sequential scans through a pointer. Between faults, while none waits, the
//! fault thread brings the window after the last one back from the device and maps it (or
//! leaves it to the kernel, `left.rs`), up to [`AHEAD_WINDOWS`] windows past the scan's last
//! fault, so the scan's loads find them present while the scan is still in the windows
//! before. Each window's first page stays unmapped: the scan's arrival there is a fault,
//! the only news of the scan's progress the read-ahead gets once the kernel maps the rest.
//!
//! Every page the read-ahead maps is mapped as a fault maps it: its bytes are in its home
//! frame (the migration back has finished), its entry is read after that, and the mapping
//! is made under the mirror lock only if no invalidation of the window started since
//! (`read_retry_range`), so an invalidation still removes it.
//!
//! Measured and not kept (`cargo run --release -p hetmem-bench --example
//! pointer_scan_ahead`, interleaved rounds on the 2-core VM): a read-ahead worker thread of
//! its own, bringing (and mapping, or leaving the mapping to the scan's faults) up to three
//! windows ahead while the fault thread served the scan's next fault, was slower than
//! reading ahead on the fault thread (163-192 ms against 113-153 ms per 256 MiB scan, under
//! a load of 6-7): both threads then migrated and mapped the same windows, waiting on each
//! other's page locks, and no core was left idle for the second one.
//! `HETMEM_CPU_READAHEAD=bring` brings one window back without mapping it (the scan's next
//! fault maps it).

use super::fault::Step;
use super::Shared;

/// Pages at the start of each window the read-ahead brings that it leaves unmapped, so the
/// scan's arrival there is a fault the read-ahead hears of.
const TRIPWIRE_PAGES: u64 = 1;

/// How many windows the read-ahead of a scan runs ahead of the scan's last fault.
const AHEAD_WINDOWS: u64 = 4;
use crate::mm::{VirtAddr, PAGE};

/// What the read-ahead does with the next window of a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Brings it back and maps it.
    Map,
    /// Brings it back; the scan's next fault maps it.
    Bring,
}

impl Mode {
    /// `HETMEM_CPU_READAHEAD`: `bring` for [`Mode::Bring`], anything else (or nothing) for
    /// [`Mode::Map`].
    pub(super) fn from_env() -> Mode {
        match std::env::var("HETMEM_CPU_READAHEAD").as_deref() {
            Ok("bring") => Mode::Bring,
            _ => Mode::Map,
        }
    }
}

impl Shared {
    /// While no fault waits, brings back (and maps) the window after the stream's last one,
    /// if faults have been sequential long enough to call it a scan and the read-ahead is
    /// less than [`AHEAD_WINDOWS`] windows past the last fault. True if it brought one (the
    /// next may follow).
    pub(super) fn read_ahead(&self) -> bool {
        let (at, from, n) = *self.stream.lock();
        if n < 2 * self.base_window || n < 2 {
            return false;
        }
        let last = self.last_fault.load(std::sync::atomic::Ordering::Relaxed);
        if from >= last.saturating_add(AHEAD_WINDOWS * n as u64 * PAGE) {
            return false;
        }
        // The scan's own region: the read-ahead stops at its end (the next region, which may
        // start right there, is another buffer the scan does not read).
        let Some((start, region)) = self.region_of(at) else {
            return false;
        };
        if from >= start + region.len {
            return false;
        }
        let Some(vma) = self.space.vma(VirtAddr(from)).filter(|v| v.home.is_some()) else {
            return false;
        };
        let hi = (from + n as u64 * PAGE)
            .min(vma.end.get())
            .min(start + region.len);
        if hi <= from {
            return false;
        }
        let (lo_va, hi_va) = (VirtAddr(from), VirtAddr(hi));
        // An invalidation of the window running now: leave the window to the faults.
        if self.space.try_read_begin_range(lo_va, hi_va).is_none() {
            return false;
        }
        if (self.bring)(from, ((hi - from) / PAGE) as usize).is_err() {
            self.stop_ahead();
            return false;
        }
        if self.ahead == Mode::Bring {
            // One window ahead: the scan's next fault maps it and moves the stream on.
            return false;
        }
        // Entries are read after this (the migration above is over): one that changes from
        // here on is seen by `read_retry_range` before anything is mapped.
        let Some(seq) = self.space.try_read_begin_range(lo_va, hi_va) else {
            self.stop_ahead();
            return false;
        };
        // The window's first page stays unmapped: the scan faults there when it arrives, which
        // tells the read-ahead how far the scan has come (it sees nothing of the pages it maps
        // or leaves to the kernel), and the fault, finding the window home, costs one round
        // trip.
        let trip = (from + TRIPWIRE_PAGES * PAGE).min(hi);
        let mapped =
            trip >= hi || matches!(self.map_window(&vma, trip, hi, seq, None), Ok(Step::Done));
        if mapped {
            let mut stream = self.stream.lock();
            if stream.1 == from {
                // The stream keeps its start: a fault anywhere in what it brought is the
                // scan arriving (at a window's tripwire), not a new stream.
                *stream = (stream.0, hi, n);
                return true;
            }
        }
        self.stop_ahead();
        false
    }

    /// Ends the read-ahead until the next fault of the scan: a window it could not bring or
    /// map is left to the faults (tried again every idle poll, it would cost a migration's
    /// setup each time while the scan stands still).
    fn stop_ahead(&self) {
        self.last_fault
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }
}
