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

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::bitmap::{bit_words, AtomicBitmap};
use crate::copy::{MemoryId, Place};
use crate::error::{EngineError, Result};
use crate::pfn::{reserve_pfn_range, Pfn, PfnRange, PAGE_SIZE};
use crate::slots::{PutRefused, Slots};

mod home;
mod owned;

mod holes;

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
    /// One bit lock per frame, held while `read`, `write` or `zero` copy bytes, while `free`
    /// returns the frame, and by a device copy from its submission until it has completed:
    /// no two of them race on a frame's bytes, and none copies into a frame that has been
    /// freed (and perhaps handed to another owner) meanwhile.
    busy: AtomicBitmap,
    /// The devices whose in-flight batches may hold frame bits.
    devices: Mutex<Vec<std::sync::Weak<dyn Settle>>>,
    /// Whether freed home frames give their memory back (`holes.rs`).
    punching: AtomicU8,
    /// Home frames punched so far.
    punched: AtomicU64,
    /// Frames punched and not refilled since (`holes.rs`).
    holes: AtomicBitmap,
}

/// Who reaches a frame's bytes: a safe call (refused on claimed home frames, and on sealed
/// frames if it writes), or the page map through an `_owned` accessor.
#[derive(Clone, Copy)]
pub(super) enum Reach {
    Safe { writes: bool },
    Owner,
}

/// A device that holds frame bits for its batches in flight.
pub(crate) trait Settle: Send + Sync {
    /// Retires the batches that have completed and unlocks what they held.
    fn settle(&self);
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
            devices: Mutex::new(Vec::new()),
            punching: AtomicU8::new(holes::PUNCH_OFF),
            punched: AtomicU64::new(0),
            holes: AtomicBitmap::new(frames),
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

    /// Returns a frame to the pool. A frame a page map adopted ([`HostFramePool::adopt`]),
    /// which includes every claimed home frame, is refused with [`EngineError::FrameOwned`]:
    /// its page may still be mapped or referenced, and only the page map frees it.
    pub fn free(&self, pfn: Pfn) -> Result<()> {
        self.free_batch(&[pfn])
    }

    /// Returns frames to the pool; on error (unknown frame, double free, a frame a page map
    /// adopted) none is freed.
    pub fn free_batch(&self, pfns: &[Pfn]) -> Result<()> {
        self.put_batch(pfns, false)
    }

    /// The pool indices of `pfns`, or the first unknown frame.
    pub(super) fn indices(&self, pfns: &[Pfn]) -> Result<Vec<usize>> {
        pfns.iter()
            .map(|&p| {
                // A match, not `ok_or`: the error value would be built and dropped per frame.
                match self.range.index_of(p) {
                    Some(i) => Ok(i as usize),
                    None => Err(EngineError::UnknownPfn(p)),
                }
            })
            .collect()
    }

    pub(super) fn put_batch(&self, pfns: &[Pfn], adopted: bool) -> Result<()> {
        let idx = self.indices(pfns)?;
        // No `read`/`write` is copying into a frame while it goes back (they take the frame's
        // bit first, then check it is allocated).
        let _busy = self
            .busy
            .lock_words(bit_words(idx.iter().copied()), &mut || {
                self.settle_devices()
            });
        self.punch_freed_homes(&idx, adopted);
        self.slots
            .lock()
            .put_all(&idx, adopted)
            .map_err(|(k, why)| match why {
                PutRefused::NotInUse => EngineError::DoubleFree(pfns[k]),
                PutRefused::Adoption if adopted => EngineError::InvalidConfig(format!(
                    "frame {} was not adopted by a page map",
                    pfns[k]
                )),
                PutRefused::Adoption => EngineError::FrameOwned(pfns[k]),
            })
    }

    /// Copies bytes out of an allocated frame, from `offset` within it.
    ///
    /// Every access to a frame's bytes (this pool's, and a device copy's from submission to
    /// completion) holds the frame's bit lock, so two of them never race on a frame: a read
    /// of a frame that a copy in flight uses waits for the copy. A claimed home frame is refused
    /// ([`EngineError::FrameOwned`]): a CPU mapping may show it, and only its page map,
    /// knowing the mapping's state, reaches its bytes ([`read_owned`](Self::read_owned)).
    pub fn read(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<()> {
        self.with_frame(pfn, offset, out.len(), Reach::Safe { writes: false }, |p| {
            // SAFETY: `with_frame` proved the span lies inside an allocated frame of the
            // arena and holds the frame's bit: no other call copies into it meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) }
        })
    }

    /// Copies bytes into an allocated frame, from `offset` within it. Refuses claimed home
    /// frames, as [`read`](Self::read) does.
    pub fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<()> {
        self.with_frame(pfn, offset, data.len(), Reach::Safe { writes: true }, |p| {
            // SAFETY: as in `read`: allocated, in the arena, and the frame's bit held.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) }
        })
    }

    /// Fills an allocated frame with zeros. Refuses claimed home frames, as
    /// [`read`](Self::read) does.
    pub fn zero(&self, pfn: Pfn) -> Result<()> {
        self.with_frame(pfn, 0, PAGE_SIZE, Reach::Safe { writes: true }, |p| {
            // SAFETY: as in `read`: the whole frame, allocated, its bit held.
            unsafe { p.write_bytes(0, PAGE_SIZE) }
        })
    }

    /// Runs `f` on the address of `offset` in allocated frame `pfn`, holding the frame's bit
    /// (so no `free`, `read`, `write` or `zero` of it runs meanwhile). Home frames only if
    /// `home`.
    pub(super) fn with_frame<R>(
        &self,
        pfn: Pfn,
        offset: usize,
        len: usize,
        reach: Reach,
        f: impl FnOnce(*mut u8) -> R,
    ) -> Result<R> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        let (w, mask) = (i / 64, 1u64 << (i % 64));
        self.busy
            .lock_word_or(w, mask, &mut || self.settle_devices());
        let r = self.checked_ptr(pfn, offset, len, reach).map(f);
        self.busy.unlock_word(w, mask);
        r
    }

    /// Locks the bits of the frames among `pfns` (others are skipped) for a device copy and
    /// returns them as (word, mask) pairs, to be unlocked with
    /// [`release_frames`](Self::release_frames) once the copy has completed. While waiting
    /// for a bit, it lets every device over this pool retire its completed batches (a bit
    /// may be held by one of them).
    pub(crate) fn hold_frames(&self, pfns: impl IntoIterator<Item = Pfn>) -> Vec<(usize, u64)> {
        let idx = pfns
            .into_iter()
            .filter_map(|p| self.range.index_of(p).map(|i| i as usize));
        self.busy
            .lock_words(bit_words(idx), &mut || self.settle_devices())
            .keep()
    }

    /// Unlocks frames that [`hold_frames`](Self::hold_frames) locked.
    pub(crate) fn release_frames(&self, words: &[(usize, u64)]) {
        self.busy.unlock_words(words);
    }

    /// Registers a device whose batches may hold frames of this pool.
    pub(crate) fn add_device(&self, d: std::sync::Weak<dyn Settle>) {
        let mut devices = self.devices.lock();
        devices.retain(|w| w.strong_count() > 0);
        devices.push(d);
    }

    /// Lets every device over this pool retire its completed batches and unlock their frames.
    fn settle_devices(&self) {
        let devices: Vec<_> = self
            .devices
            .lock()
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        for d in devices {
            d.settle();
        }
    }

    /// A view of the allocation state that resolves many frames under one lock.
    pub(crate) fn locator(&self) -> FrameLocator<'_> {
        FrameLocator {
            pool: self,
            slots: self.slots.lock(),
        }
    }

    fn checked_ptr(&self, pfn: Pfn, offset: usize, len: usize, reach: Reach) -> Result<*mut u8> {
        let i = self
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        if offset.checked_add(len).is_none_or(|e| e > PAGE_SIZE) {
            return Err(EngineError::InvalidConfig(format!(
                "span {offset}+{len} does not fit in a page"
            )));
        }
        {
            let slots = self.slots.lock();
            if !slots.is_used(i) {
                return Err(EngineError::FreedPfn(pfn));
            }
            if let Reach::Safe { writes } = reach {
                if slots.is_home(i) || (writes && slots.is_sealed(i)) {
                    return Err(EngineError::FrameOwned(pfn));
                }
            }
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

    /// Where an allocated frame lives; a claimed home frame only if `home`.
    pub(crate) fn locate(&self, pfn: Pfn, home: bool) -> Result<Place> {
        let i = self
            .pool
            .range
            .index_of(pfn)
            .ok_or(EngineError::UnknownPfn(pfn))? as usize;
        if !self.slots.is_used(i) {
            return Err(EngineError::FreedPfn(pfn));
        }
        if !home && self.slots.is_home(i) {
            return Err(EngineError::FrameOwned(pfn));
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
