//! Read-ahead for sequential scans through a pointer. After a fault of a scan has been served
//! (its thread runs again), the fault thread brings the next window back from the device and
//! maps it, so the scan's loads find it present while the thread is still scanning the
//! window before.
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
//! reading one window ahead on the fault thread (163-192 ms against 113-153 ms per 256 MiB
//! scan, under a load of 6-7): both threads then migrated and mapped the same windows,
//! waiting on each other's page locks, and no core was left idle for the second one.
//! `HETMEM_CPU_READAHEAD=bring` brings the window back without mapping it (what the
//! read-ahead did before: its mapping was always refused, since it took its sequence number
//! before its own migration); mapping it as well scanned 4-9% faster in interleaved rounds on
//! a quieter machine (67.8-72.4 ms against 73.0-77.4 ms, with 40% fewer faults).

use super::{Shared, Step};
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
    /// After a fault of a sequential scan has been served (its thread runs again), brings
    /// back (and maps) the window after the stream's last one, if faults have been
    /// sequential long enough to call it a scan.
    pub(super) fn read_ahead(&self) {
        let (_, from, n) = *self.stream.lock();
        if n < 2 * self.base_window || n < 2 {
            return;
        }
        let Some((start, region)) = self.region_of(from) else {
            return;
        };
        let Some(vma) = self.space.vma(VirtAddr(from)).filter(|v| v.home.is_some()) else {
            return;
        };
        let hi = (from + n as u64 * PAGE)
            .min(vma.end.get())
            .min(start + region.len);
        if hi <= from {
            return;
        }
        let (lo_va, hi_va) = (VirtAddr(from), VirtAddr(hi));
        // An invalidation of the window running now: leave the window to the faults.
        if self.space.try_read_begin_range(lo_va, hi_va).is_none() {
            return;
        }
        if (self.bring)(from, ((hi - from) / PAGE) as usize).is_err() || self.ahead == Mode::Bring {
            return;
        }
        // Entries are read after this (the migration above is over): one that changes from
        // here on is seen by `read_retry_range` before anything is mapped.
        let Some(seq) = self.space.try_read_begin_range(lo_va, hi_va) else {
            return;
        };
        if let Ok(Step::Done) = self.map_window(&vma, from, hi, seq, None) {
            let mut stream = self.stream.lock();
            if stream.1 == from {
                *stream = (from, hi, n);
            }
        }
    }
}
