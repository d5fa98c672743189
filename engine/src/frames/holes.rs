//! Giving back the memory of home frames left empty: a page of a CPU-mapped range that
//! moves to the device leaves its home frame (a page of the frame file) holding bytes nobody
//! reads any more. Where that is safe, [`HostFramePool::free_batch`] punches such frames out
//! of the file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`, runs of neighbours as one range), so
//! device-resident data does not cost host memory twice. A punched frame reads as zeros;
//! whoever takes it next fills it (a copy back from the device, or the zeros a claim asks
//! for), and the file grows a fresh page there on the first write.
//!
//! It is off until a user of the pool allows it ([`HostFramePool::allow_home_punching`]),
//! and off for good once one forbids it: a device that imports host frames by pinning them
//! (a GPU through `VK_EXT_external_memory_host`) keeps the old page after a punch while the
//! file gets a new one, so the device and the CPU would see different bytes there.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::HostFramePool;
use crate::pfn::{Pfn, PAGE_SIZE};

/// [`HostFramePool::punching`] values.
pub(super) const PUNCH_OFF: u8 = 0;
const PUNCH_ON: u8 = 1;
const PUNCH_FORBIDDEN: u8 = 2;

impl HostFramePool {
    /// Lets freed home frames give their memory back to the system (unless a user of the pool
    /// has forbidden it). Returns whether punching is on. A pool that is not a memfd never
    /// punches.
    pub fn allow_home_punching(&self) -> bool {
        let _ = self.punching.compare_exchange(
            PUNCH_OFF,
            PUNCH_ON,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.file.is_some() && self.punching.load(Ordering::Acquire) == PUNCH_ON
    }

    /// Stops freed home frames from giving their memory back, for good (a device that pins
    /// the host frames it imports uses this pool).
    pub fn forbid_home_punching(&self) {
        self.punching.store(PUNCH_FORBIDDEN, Ordering::Release);
    }

    /// Home frames whose memory has been given back so far.
    pub fn punched_frames(&self) -> u64 {
        self.punched.load(Ordering::Relaxed)
    }

    /// Bytes of memory the frame file holds now (`None` where the arena is anonymous).
    pub fn file_allocated_bytes(&self) -> Option<u64> {
        let f = self.file.as_ref()?;
        // SAFETY: fstat on our own open descriptor into a zeroed stat buffer.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; the buffer is valid for writes of its size.
        if unsafe { libc::fstat(f.as_raw_fd(), &mut st) } != 0 {
            return None;
        }
        Some(st.st_blocks as u64 * 512)
    }

    /// Punches the home frames among `idx` (slots being freed, their busy bits held by the
    /// caller, not yet returned) out of the frame file, runs of neighbours together. Does
    /// nothing unless punching is on, or if the batch would not free cleanly (a slot not
    /// handed out, or named twice, or adopted when the call is not the adopter's: `put_all`
    /// refuses it and the frames keep their bytes).
    pub(super) fn punch_freed_homes(&self, idx: &[usize], adopted: bool) {
        if self.punching.load(Ordering::Acquire) != PUNCH_ON {
            return;
        }
        let Some(file) = self.file.as_ref() else {
            return;
        };
        let mut homes: Vec<usize> = {
            let slots = self.slots.lock();
            let homes: Vec<usize> = idx.iter().copied().filter(|&i| slots.is_home(i)).collect();
            let clean = idx
                .iter()
                .all(|&i| slots.is_used(i) && slots.is_adopted(i) == adopted);
            if homes.is_empty() || !clean {
                return;
            }
            homes
        };
        // A repeat anywhere in the batch (not only among its home frames) makes `put_all`
        // refuse it, and a refused batch must keep every frame's bytes.
        // (A strictly ascending batch, the common case, has none: no copy, no sort.)
        if !idx.windows(2).all(|w| w[0] < w[1]) {
            let mut all = idx.to_vec();
            all.sort_unstable();
            if all.windows(2).any(|w| w[0] == w[1]) {
                return;
            }
        }
        homes.sort_unstable();
        for (first, n) in runs(&homes) {
            // SAFETY: a punch of whole frames of our own memfd that are being freed: their
            // owner gave them up, their busy bits are held (no read or write copies into
            // them), and no claim can take them before they are returned.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (first * PAGE_SIZE) as libc::off_t,
                    (n * PAGE_SIZE) as libc::off_t,
                )
            };
            if r == 0 {
                self.punched.fetch_add(n as u64, Ordering::Relaxed);
                for i in first..first + n {
                    self.holes.set(i, true);
                }
            } else {
                tracing::debug!(
                    "punching freed home frames: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }

    /// Gives the punched frames among `pfns` (claimed by the caller, about to be filled by a
    /// copy) their memory back in one call per run of neighbours, instead of one page fault
    /// per frame as the copy first writes each. Frames that were not punched are left alone;
    /// unknown ones are ignored.
    pub fn refill_punched(&self, pfns: &[Pfn]) {
        let mut idx: Vec<usize> = pfns
            .iter()
            .filter_map(|&p| self.range.index_of(p))
            .map(|i| i as usize)
            .filter(|&i| self.holes.get(i))
            .collect();
        if idx.is_empty() {
            return;
        }
        idx.sort_unstable();
        idx.dedup();
        for (first, n) in runs(&idx) {
            for i in first..first + n {
                self.holes.set(i, false);
            }
            // SAFETY: frames of our own arena (indices of this pool's range), claimed by the
            // caller; populating only commits memory behind them and leaves their contents
            // (zeros, after the punch) unchanged.
            let r = unsafe {
                libc::madvise(
                    self.frame_ptr(first).cast(),
                    n * PAGE_SIZE,
                    libc::MADV_POPULATE_WRITE,
                )
            };
            if r != 0 {
                tracing::debug!(
                    "refilling punched frames: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

/// The runs of consecutive values of `sorted` (ascending, no repeats), as (first, length).
fn runs(sorted: &[usize]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at == sorted.len() {
            return None;
        }
        let mut end = at + 1;
        while end < sorted.len() && sorted[end] == sorted[end - 1] + 1 {
            end += 1;
        }
        let run = (sorted[at], end - at);
        at = end;
        Some(run)
    })
}
