//! The host frame pool: the system memory that address spaces map, as numbered 4 KiB frames.
//!
//! One page-aligned arena is reserved up front (no memory is committed until used) and split
//! into segments; a segment is populated the first time one of its frames is handed out, and
//! each Vulkan device imports segments on demand so that copies read and write frames in place.
//! Raw pointers into the arena never leave this crate.
//!
//! The arena is a shared mapping of a memfd (an anonymous mapping where memfds are not to be
//! had), so that a frame can appear a second time elsewhere in the process: runs of frames
//! reserved as *homes* ([`HostFramePool::reserve_home`]) can be mapped by the CPU-pointer layer
//! at a fixed offset of the file ([`HostFramePool::home_file`]). The arena is not inherited by
//! `fork(2)` children (`MADV_DONTFORK`): a child sharing frames with its parent would write
//! into the parent's memory.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::copy::{MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::pfn::{reserve_pfn_range, Pfn, PfnRange, PAGE_SIZE};
use crate::slots::{AtomicBitmap, Slots};

/// Bytes in one segment of the arena: the unit of population and of import into a device.
pub(crate) const SEGMENT_BYTES: usize = 64 << 20;
/// Frames in one segment.
pub(crate) const FRAMES_PER_SEGMENT: usize = SEGMENT_BYTES / PAGE_SIZE;
/// Capacity of the process-wide pool (address space only; memory is committed as used).
/// `HETMEM_HOST_FRAMES_GIB` overrides it.
pub const DEFAULT_CAPACITY: usize = 32 << 30;

/// A pool of page-aligned host frames with process-unique frame numbers.
pub struct HostFramePool {
    base: NonNull<u8>,
    bytes: usize,
    /// The file behind the arena (offset 0 is frame 0), when the arena is a memfd.
    file: Option<OwnedFd>,
    range: PfnRange,
    slots: Mutex<Slots>,
    populated: AtomicBitmap,
    /// One bit lock per frame, held while `read`, `write` or `zero` copy bytes and while
    /// `free` returns the frame: those calls never race each other on a frame, nor copy into
    /// a frame that has been freed (and perhaps handed to another owner) meanwhile.
    busy: AtomicBitmap,
}

// SAFETY: the arena is plain memory owned by the pool; all bookkeeping is behind a mutex or atomics.
unsafe impl Send for HostFramePool {}
// SAFETY: see `Send`; shared access only copies bytes in and out of frames.
unsafe impl Sync for HostFramePool {}

impl HostFramePool {
    /// Reserves a pool of at least `capacity_bytes` (rounded up to whole segments).
    pub fn new(capacity_bytes: usize) -> Result<Arc<Self>> {
        if capacity_bytes == 0 {
            return Err(EngineError::InvalidConfig(
                "host frame pool of 0 bytes".into(),
            ));
        }
        let bytes = capacity_bytes
            .checked_next_multiple_of(SEGMENT_BYTES)
            .ok_or_else(|| EngineError::InvalidConfig("host frame pool too large".into()))?;
        let file = arena_file(bytes);
        let (flags, fd) = match &file {
            Some(f) => (libc::MAP_SHARED | libc::MAP_NORESERVE, f.as_raw_fd()),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
            ),
        };
        // SAFETY: a new mapping (of our own memfd, or anonymous) at an address of the kernel's
        // choosing touches no existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: advice on our own fresh mapping; it changes only what fork(2) inherits.
        if unsafe { libc::madvise(ptr, bytes, libc::MADV_DONTFORK) } != 0 {
            tracing::debug!("MADV_DONTFORK refused on the frame arena");
        }
        if file.is_some() {
            // Where the kernel allows huge pages for shared memory (`shmem_enabled` of
            // advise, within_size or always), the frame file is backed by 2 MiB pages: copies
            // miss the TLB less, and CPU-mapped buffers map 2 MiB with one entry. Without
            // that setting the advice changes nothing.
            // SAFETY: advice on our own fresh mapping; it changes only the page size the
            // kernel may use behind it.
            if unsafe { libc::madvise(ptr, bytes, libc::MADV_HUGEPAGE) } != 0 {
                tracing::debug!("MADV_HUGEPAGE refused on the frame arena");
            }
        }
        let frames = bytes / PAGE_SIZE;
        Ok(Arc::new(HostFramePool {
            base: NonNull::new(ptr.cast()).expect("mmap returned null"),
            bytes,
            file,
            range: reserve_pfn_range(frames as u64),
            slots: Mutex::new(Slots::new(frames)),
            populated: AtomicBitmap::new(bytes / SEGMENT_BYTES),
            busy: AtomicBitmap::new(frames),
        }))
    }

    /// The process-wide pool that devices use unless told otherwise.
    pub fn global() -> &'static Arc<HostFramePool> {
        static GLOBAL: OnceLock<Arc<HostFramePool>> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let gib = std::env::var("HETMEM_HOST_FRAMES_GIB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&g| g > 0);
            let bytes = gib.map_or(DEFAULT_CAPACITY, |g| g << 30);
            HostFramePool::new(bytes).expect("cannot reserve the host frame pool")
        })
    }

    /// The frame numbers of this pool.
    pub fn pfn_range(&self) -> PfnRange {
        self.range
    }

    /// True if `pfn` is a frame of this pool (allocated or not).
    pub fn contains(&self, pfn: Pfn) -> bool {
        self.range.contains(pfn)
    }

    /// True if `pfn` is a frame of this pool that is currently allocated.
    pub fn is_allocated(&self, pfn: Pfn) -> bool {
        self.range
            .index_of(pfn)
            .is_some_and(|i| self.slots.lock().is_used(i as usize))
    }

    /// Frames currently allocated.
    pub fn in_use(&self) -> usize {
        self.slots.lock().in_use()
    }

    /// Frames that can still be allocated.
    pub fn available(&self) -> usize {
        self.slots.lock().available()
    }

    /// Allocates one frame; `zeroed` guarantees it reads as zeros.
    pub fn alloc(&self, zeroed: bool) -> Result<Pfn> {
        Ok(self.alloc_batch(1, zeroed)?[0])
    }

    /// Allocates `n` frames, all or none, in ascending order.
    pub fn alloc_batch(&self, n: usize, zeroed: bool) -> Result<Vec<Pfn>> {
        let taken = {
            let mut slots = self.slots.lock();
            let taken = slots.take(n).map_err(|s| EngineError::OutOfHostFrames {
                requested: s.requested,
                available: s.available,
            })?;
            self.populate_up_to(slots.watermark());
            if zeroed {
                for &i in &taken {
                    if slots.is_dirty(i as usize) {
                        slots.mark_clean(i as usize);
                        // SAFETY: frame `i` is inside the arena and was just handed to us alone.
                        unsafe { self.frame_ptr(i as usize).write_bytes(0, PAGE_SIZE) };
                    }
                }
            }
            taken
        };
        Ok(taken
            .into_iter()
            .map(|i| self.range.start.add(i as u64))
            .collect())
    }

    /// Reserves `n` consecutive frames as a home run: frames that stay out of ordinary
    /// allocation until [`release_home`](Self::release_home), each claimed in place with
    /// [`claim_home`](Self::claim_home) and returned with [`free`](Self::free) like any
    /// other. The run is not in use until its frames are claimed.
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

    /// Claims frame `pfn` of a home run; `zeroed` guarantees it reads as zeros. Fails with
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

    /// Returns a frame to the pool.
    pub fn free(&self, pfn: Pfn) -> Result<()> {
        self.free_batch(&[pfn])
    }

    /// Returns frames to the pool; on error (unknown frame, double free) none is freed.
    pub fn free_batch(&self, pfns: &[Pfn]) -> Result<()> {
        let idx = pfns
            .iter()
            .map(|&p| {
                // A match, not `ok_or`: the error value would be built and dropped per frame.
                match self.range.index_of(p) {
                    Some(i) => Ok(i as usize),
                    None => Err(EngineError::UnknownPfn(p)),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // No `read`/`write` is copying into a frame while it goes back (they take the frame's
        // bit first, then check it is allocated).
        let words = busy_words(&idx);
        for &(w, mask) in &words {
            self.busy.lock_word(w, mask);
        }
        let r = self
            .slots
            .lock()
            .put_all(&idx)
            .map_err(|k| EngineError::DoubleFree(pfns[k]));
        for &(w, mask) in &words {
            self.busy.unlock_word(w, mask);
        }
        r
    }

    /// Copies bytes out of an allocated frame, from `offset` within it.
    ///
    /// Calls on one frame (`read`, `write`, `zero`, `free`) exclude each other for their
    /// duration; what they do not exclude is a device copy, which only the frame's owner
    /// starts.
    pub fn read(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_frame(pfn, offset, out.len(), |p| {
            // SAFETY: `with_frame` proved the span lies inside an allocated frame of the
            // arena and holds the frame's bit: no other call copies into it meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
        })
    }

    /// Copies bytes into an allocated frame, from `offset` within it.
    pub fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<()> {
        self.with_frame(pfn, offset, data.len(), |p| {
            // SAFETY: as in `read`: allocated, in the arena, and the frame's bit held.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
        })
    }

    /// Fills an allocated frame with zeros.
    pub fn zero(&self, pfn: Pfn) -> Result<()> {
        self.with_frame(pfn, 0, PAGE_SIZE, |p| {
            // SAFETY: as in `read`: the whole frame, allocated, its bit held.
            unsafe { p.write_bytes(0, PAGE_SIZE) }
        })
    }

    /// Runs `f` on the address of `offset` in allocated frame `pfn`, holding the frame's bit
    /// (so no `free`, `read`, `write` or `zero` of it runs meanwhile).
    fn with_frame<R>(
        &self,
        pfn: Pfn,
        offset: usize,
        len: usize,
        f: impl FnOnce(*mut u8) -> R,
    ) -> Result<R> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        let (w, mask) = (i / 64, 1u64 << (i % 64));
        self.busy.lock_word(w, mask);
        let r = self.checked_ptr(pfn, offset, len).map(f);
        self.busy.unlock_word(w, mask);
        r
    }

    /// A view of the allocation state that resolves many frames under one lock.
    pub(crate) fn locator(&self) -> FrameLocator<'_> {
        FrameLocator {
            pool: self,
            slots: self.slots.lock(),
        }
    }

    fn checked_ptr(&self, pfn: Pfn, offset: usize, len: usize) -> Result<*mut u8> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        if offset.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(EngineError::InvalidConfig(format!(
                "span {offset}+{len} does not fit in a page"
            )));
        }
        if !self.slots.lock().is_used(i) {
            return Err(EngineError::FreedPfn(pfn));
        }
        // SAFETY: frame `i` is inside the arena and `offset < PAGE_SIZE`.
        Ok(unsafe { self.frame_ptr(i).add(offset) })
    }

    /// Address of frame `i` of the arena.
    ///
    /// # Safety
    /// `i` must be less than the number of frames.
    pub(crate) unsafe fn frame_ptr(&self, i: usize) -> *mut u8 {
        debug_assert!(i * PAGE_SIZE < self.bytes);
        // SAFETY: the caller keeps `i` inside the arena.
        unsafe { self.base.as_ptr().add(i * PAGE_SIZE) }
    }

    /// Address and length of segment `s`, for import into a device.
    pub(crate) fn segment(&self, s: usize) -> (*mut u8, usize) {
        assert!(s < self.segments());
        // SAFETY: segment `s` starts inside the arena (checked above).
        (
            unsafe { self.frame_ptr(s * FRAMES_PER_SEGMENT) },
            SEGMENT_BYTES,
        )
    }

    /// The host address of a frame location (a segment and an offset in it), as the plan
    /// resolved it. Only the address is computed here; whoever reads or writes through it
    /// answers for the location naming an allocated frame.
    pub(crate) fn place_ptr(&self, at: Place) -> *mut u8 {
        let MemoryId::Frames(s) = at.memory else {
            unreachable!("a host address of device memory")
        };
        self.segment(s as usize).0.wrapping_add(at.offset as usize)
    }

    /// Number of segments in the arena.
    pub(crate) fn segments(&self) -> usize {
        self.bytes / SEGMENT_BYTES
    }

    /// Commits memory for every segment below frame `watermark` (and for home frames, their
    /// segment), so first copies do not fault.
    fn populate_up_to(&self, watermark: usize) {
        let first = if watermark > 0 && self.populated.get(0) {
            // Homes sit high in the arena: only the segment of the frame itself.
            (watermark - 1) / FRAMES_PER_SEGMENT
        } else {
            0
        };
        for s in first..watermark.div_ceil(FRAMES_PER_SEGMENT) {
            if !self.populated.set(s, true) {
                let (p, len) = self.segment(s);
                // SAFETY: the span is one whole segment of our own mapping; populating it
                // only commits memory and leaves its contents (zeros) unchanged.
                let r = unsafe { libc::madvise(p.cast(), len, libc::MADV_POPULATE_WRITE) };
                if r != 0 {
                    tracing::debug!(
                        "MADV_POPULATE_WRITE not available; frames commit on first touch"
                    );
                }
            }
        }
    }
}

/// The frames of `idx` as (word, mask) of the busy bitmap, one entry per word, in word order
/// (so two batches lock their words in the same order).
fn busy_words(idx: &[usize]) -> Vec<(usize, u64)> {
    // Frees come in ascending order almost always (migrations free in address order, the
    // pool hands out ascending runs): copy and sort only when they do not.
    let sorted: std::borrow::Cow<'_, [usize]> = if idx.is_sorted() {
        idx.into()
    } else {
        let mut v = idx.to_vec();
        v.sort_unstable();
        v.into()
    };
    let mut words: Vec<(usize, u64)> = Vec::new();
    for &i in sorted.iter() {
        match words.last_mut() {
            Some((w, m)) if *w == i / 64 => *m |= 1 << (i % 64),
            _ => words.push((i / 64, 1 << (i % 64))),
        }
    }
    words
}

/// A memfd of `bytes` for the arena, or `None` (with the reason logged) if one cannot be had.
fn arena_file(bytes: usize) -> Option<OwnedFd> {
    // SAFETY: the name is a NUL-terminated literal; the call creates a new file descriptor.
    let fd = unsafe { libc::memfd_create(c"hetmem-frames".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        tracing::debug!(
            "memfd_create: {}; frames stay anonymous memory",
            std::io::Error::last_os_error()
        );
        return None;
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a plain ftruncate on our own file descriptor.
    if unsafe { libc::ftruncate(fd, bytes as libc::off_t) } != 0 {
        tracing::debug!(
            "ftruncate of the frame memfd: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    Some(file)
}

/// Resolves frames to their segment and offset while holding the pool's allocation state.
pub(crate) struct FrameLocator<'a> {
    pool: &'a HostFramePool,
    slots: parking_lot::MutexGuard<'a, Slots>,
}

impl FrameLocator<'_> {
    /// True if `pfn` is a frame of the pool.
    pub(crate) fn owns(&self, pfn: Pfn) -> bool {
        self.pool.range.contains(pfn)
    }

    /// Where an allocated frame lives.
    pub(crate) fn locate(&self, pfn: Pfn) -> Result<Place> {
        let i = self
            .pool
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        if !self.slots.is_used(i) {
            return Err(EngineError::FreedPfn(pfn));
        }
        Ok(Place {
            memory: MemoryId::Frames((i / FRAMES_PER_SEGMENT) as u32),
            offset: ((i % FRAMES_PER_SEGMENT) * PAGE_SIZE) as u64,
        })
    }
}

impl Drop for HostFramePool {
    fn drop(&mut self) {
        // SAFETY: the mapping was made in `new` with this length and nothing refers to it now.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}

impl std::fmt::Debug for HostFramePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFramePool")
            .field("pfns", &self.range)
            .field("bytes", &self.bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_never_see_a_write_half_done_and_freeing_waits_for_them() {
        let pool = HostFramePool::new(SEGMENT_BYTES).unwrap();
        let pfn = pool.alloc(true).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                let (a, b) = (vec![0xAAu8; PAGE_SIZE], vec![0x55u8; PAGE_SIZE]);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    pool.write(pfn, 0, if n.is_multiple_of(2) { &a } else { &b })
                        .unwrap();
                    n += 1;
                }
            })
        };
        let mut page = vec![0u8; PAGE_SIZE];
        for _ in 0..20_000 {
            pool.read(pfn, 0, &mut page).unwrap();
            let first = page[0];
            assert!(
                page.iter().all(|&x| x == first),
                "a read saw two writes' bytes in one page"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        pool.free(pfn).unwrap();
        assert!(matches!(
            pool.read(pfn, 0, &mut page),
            Err(EngineError::FreedPfn(_))
        ));
    }
}
