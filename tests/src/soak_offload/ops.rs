//! The offload soak's operations: what each does to a thread's buffers and shadows, and
//! what it must find.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hetmem::mm::MemoryKind;
use hetmem::offload::{workgroups, Advice, Buffer, Location};
use hetmem::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{accepted, check_peek, check_read, first_difference, inject, Doing, Owned, World};

/// The operations, with their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    Write,
    Read,
    PointerStore,
    PointerLoad,
    View,
    ViewMut,
    PrefetchDevice,
    PrefetchHost,
    Evict,
    Advise,
    Pin,
    Realloc,
    DriverEvict,
    DriverEvictAll,
    Launch,
    SharedMove,
    SharedRead,
    Inject,
    Exhaust,
    LoseDevice,
}

/// Every operation but the injections (each chosen at its own rate), with its weight.
const MIX: [(Op, u32); 17] = [
    (Op::Write, 12),
    (Op::Read, 7),
    (Op::PointerStore, 8),
    (Op::PointerLoad, 6),
    (Op::View, 4),
    (Op::ViewMut, 4),
    (Op::PrefetchDevice, 9),
    (Op::PrefetchHost, 5),
    (Op::Evict, 5),
    (Op::Advise, 4),
    (Op::Pin, 4),
    (Op::Realloc, 4),
    (Op::DriverEvict, 5),
    (Op::DriverEvictAll, 1),
    (Op::Launch, 8),
    (Op::SharedMove, 6),
    (Op::SharedRead, 6),
];

impl Op {
    /// The operation's name, for reports.
    pub(super) fn name(self) -> &'static str {
        match self {
            Op::Write => "Buffer::write",
            Op::Read => "Buffer::read",
            Op::PointerStore => "store through the pointer",
            Op::PointerLoad => "load through the pointer",
            Op::View => "view",
            Op::ViewMut => "view_mut",
            Op::PrefetchDevice => "prefetch to the device",
            Op::PrefetchHost => "prefetch to the host",
            Op::Evict => "Buffer::evict",
            Op::Advise => "advise",
            Op::Pin => "pin_on_device",
            Op::Realloc => "free and allocate again",
            Op::DriverEvict => "driver evict(n)",
            Op::DriverEvictAll => "driver evict_all",
            Op::Launch => "kernel launch",
            Op::SharedMove => "move the shared buffer",
            Op::SharedRead => "read the shared buffer",
            Op::Inject => "inject copy failures",
            Op::Exhaust => "exhaust the host frames",
            Op::LoseDevice => "lose the device mid-batch",
        }
    }

    /// A random operation: an injection at its rate, or else one of [`MIX`].
    fn pick(rng: &mut StdRng, w: &World) -> Op {
        for (op, rate) in [
            (Op::Inject, w.copy_failure_rate),
            (Op::Exhaust, w.host_exhaustion_rate),
            (Op::LoseDevice, w.device_loss_rate),
        ] {
            if rate > 0.0 && rng.random_bool(rate) {
                return op;
            }
        }
        Op::pick_plain(rng)
    }

    /// One of [`MIX`], by weight.
    fn pick_plain(rng: &mut StdRng) -> Op {
        let total: u32 = MIX.iter().map(|(_, w)| w).sum();
        let mut x = rng.random_range(0..total);
        for (op, weight) in MIX {
            if x < weight {
                return op;
            }
            x -= weight;
        }
        unreachable!("the weights sum to total")
    }

    /// True for the operations on a buffer the thread owns.
    fn on_owned(self) -> bool {
        !matches!(
            self,
            Op::DriverEvict
                | Op::DriverEvictAll
                | Op::SharedMove
                | Op::SharedRead
                | Op::Inject
                | Op::Exhaust
                | Op::LoseDevice
        )
    }
}

/// A thread of the soak: allocates its buffers, runs operations until told to stop, and
/// hands its buffers and shadows back for the final check.
///
/// Long: the loop keeps the thread's state (buffers, shadows, the watchdog's view of the
/// current operation) together with the retry and exhaustion hand-back rules it applies.
pub(super) fn worker(w: &World, me: usize, seed: u64, nbuf: usize) -> Result<Vec<Owned>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut owned: Vec<Owned> = (0..nbuf)
        .map(|s| Owned {
            buf: None,
            shadow: vec![0; w.pages * 4096],
            mapped: w.pointers && s % 2 == 0,
        })
        .collect();
    for o in owned.iter_mut() {
        // Another thread may have exhausted the host frames: retried until it ends.
        o.buf = Some(
            super::retried(w, || allocate(w, o.mapped)).map_err(|e| format!("allocating: {e}"))?,
        );
    }
    let mut done = 0u64;
    while !w.stop.load(Ordering::Relaxed) && w.ops.load(Ordering::Relaxed) < w.max_ops {
        done += 1;
        if me == 0 && done == 50 {
            super::sabotage::sabotage(w);
        }
        let mut op = Op::pick(&mut rng, w);
        // Host frames run out for this thread's next operation (and everyone else's
        // meanwhile); a device loss hits whichever thread copies next.
        let exhausted = op == Op::Exhaust;
        match op {
            Op::Exhaust => inject::exhaust_frames(w),
            Op::LoseDevice => inject::device_loss(w),
            _ => {}
        }
        if matches!(op, Op::Exhaust | Op::LoseDevice) {
            op = Op::pick_plain(&mut rng);
        }
        let slot = rng.random_range(0..nbuf);
        *w.doing[me].lock().unwrap() = Doing {
            op,
            slot: if op.on_owned() { slot } else { usize::MAX },
            since: Instant::now(),
        };
        let o = &mut owned[slot];
        let result = if o.buf.is_none() && op.on_owned() {
            // Freed, and the allocation after it failed: allocate before anything else.
            realloc(w, o, &mut rng)
        } else {
            step(w, o, op, &mut rng)
        };
        if exhausted {
            inject::release_frames(w)?;
        }
        w.ops.fetch_add(1, Ordering::Relaxed);
        let failed = match result {
            Ok(()) => false,
            Err(Failure::Accepted(e)) => {
                w.errors.fetch_add(1, Ordering::Relaxed);
                w.count_kind(&e);
                let variant = |debug: String| {
                    let end = debug.find(['(', ' ', '{']).unwrap_or(debug.len());
                    debug[..end].to_string()
                };
                let variant = match &e {
                    Error::Engine(inner) => format!("Engine::{}", variant(format!("{inner:?}"))),
                    _ => variant(format!("{e:?}")),
                };
                *w.error_counts
                    .lock()
                    .unwrap()
                    .entry(format!("{}: {variant}", op.name()))
                    .or_default() += 1;
                true
            }
            Err(Failure::Wrong(e)) => return Err(format!("{} on buffer {slot}: {e}", op.name())),
        };
        // Whatever happened, the buffer holds its shadow: in place after most operations
        // (moving nothing), through `Buffer::read` after some and after every error.
        if op.on_owned() {
            if let Some(b) = &o.buf {
                let through = if failed || rng.random_bool(0.25) {
                    check_read(w, b, &o.shadow)
                } else {
                    check_peek(w, b, &o.shadow)
                };
                through.map_err(|e| {
                    let after = if failed { "an accepted error of " } else { "" };
                    format!("buffer {slot} after {after}{}: {e}", op.name())
                })?;
            }
        }
    }
    Ok(owned)
}

/// How an operation went wrong.
enum Failure {
    /// An error the soak accepts: the operation did nothing (or what it did is known).
    Accepted(Error),
    /// A wrong byte, a wrong error, a broken promise.
    Wrong(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        // An offload user gets the buffer and an offset, never an internal frame number.
        if let Error::Busy(pfn) = e {
            return Failure::Wrong(format!("an error that names frame {pfn}: {e}"));
        }
        if accepted(&e) {
            Failure::Accepted(e)
        } else {
            Failure::Wrong(format!("unexpected error {e} ({e:?})"))
        }
    }
}

fn wrong<T>(msg: String) -> Result<T, Failure> {
    Err(Failure::Wrong(msg))
}

fn allocate(w: &World, mapped: bool) -> hetmem::Result<Buffer> {
    let bytes = w.pages * 4096;
    if mapped {
        w.ctx.alloc_mapped(bytes)
    } else {
        w.ctx.alloc(bytes)
    }
}

/// A random range of whole pages of a buffer of `pages` pages, at most `most` long.
fn page_range(rng: &mut StdRng, pages: usize, most: usize) -> std::ops::Range<usize> {
    let n = rng.random_range(1..=pages.min(most).max(1));
    let first = rng.random_range(0..=pages - n);
    first * 4096..(first + n) * 4096
}

/// A random byte range of `len` bytes, up to two pages long.
fn byte_range(rng: &mut StdRng, len: usize) -> std::ops::Range<usize> {
    let n = rng.random_range(1..=len.min(2 * 4096));
    let at = rng.random_range(0..=len - n);
    at..at + n
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let salt: u8 = rng.random();
    let step: u8 = rng.random_range(1..=255);
    (0..n)
        .map(|i| salt ^ (i as u8).wrapping_mul(step) ^ (i >> 8) as u8)
        .collect()
}

/// Runs `op`. The slot's buffer may be missing (freed, and its reallocation failed) only
/// for operations that are not on it.
///
/// Long: one match arm per operation; the arms share the world and the shadow model, and a
/// function per arm would only move the match.
fn step(w: &World, o: &mut Owned, op: Op, rng: &mut StdRng) -> Result<(), Failure> {
    let Some(b) = o.buf.clone() else {
        return step_shared(w, op, rng);
    };
    let pages = w.pages;
    match op {
        Op::Write => write(w, &b, o, rng)?,
        Op::Read => {
            let r = byte_range(rng, b.len());
            let mut got = vec![0u8; r.len()];
            b.read(r.start, &mut got)?;
            if let Err(e) = first_difference(&got, &o.shadow[r.clone()]) {
                return wrong(format!("read of {r:?}: {e}"));
            }
        }
        Op::PointerStore if o.mapped => {
            let r = byte_range(rng, b.len());
            let data = random_bytes(rng, r.len());
            let p = b.as_mut_ptr()?;
            // SAFETY: `r` lies inside the buffer, which is alive (the thread holds a handle)
            // and reached by no other thread and no view now.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(r.start), r.len()) };
            o.shadow[r].copy_from_slice(&data);
            w.pointer_ops.fetch_add(1, Ordering::Relaxed);
        }
        Op::PointerLoad if o.mapped => {
            let r = byte_range(rng, b.len());
            let mut got = vec![0u8; r.len()];
            let p = b.as_ptr()?;
            // SAFETY: as for the store: inside the live buffer, no concurrent writer.
            unsafe { std::ptr::copy_nonoverlapping(p.add(r.start), got.as_mut_ptr(), r.len()) };
            w.pointer_ops.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = first_difference(&got, &o.shadow[r.clone()]) {
                return wrong(format!("load of {r:?}: {e}"));
            }
        }
        Op::View if o.mapped => {
            let v = b.view::<u8>()?;
            w.pointer_ops.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = first_difference(&v, &o.shadow) {
                return wrong(format!("through a view: {e}"));
            }
            // A view keeps the bytes as they are: changing or freeing them is refused.
            if !matches!(b.write(0, &[1]), Err(Error::ViewActive)) {
                return wrong("a write under a live view was not refused".into());
            }
            if !matches!(b.free(), Err(Error::ViewActive)) {
                return wrong("a free under a live view was not refused".into());
            }
        }
        Op::ViewMut if o.mapped => {
            let mut v = b.view_mut::<u32>()?;
            w.pointer_ops.fetch_add(1, Ordering::Relaxed);
            if !matches!(b.read(0, &mut [0u8; 4]), Err(Error::ViewActive)) {
                return wrong("a read under a live view_mut was not refused".into());
            }
            let words = page_range(rng, pages, 2);
            let add: u32 = rng.random();
            for i in words.start / 4..words.end / 4 {
                v[i] = v[i].wrapping_add(add);
                let s = &mut o.shadow[i * 4..i * 4 + 4];
                let old = u32::from_le_bytes(s.try_into().expect("four bytes"));
                s.copy_from_slice(&old.wrapping_add(add).to_le_bytes());
            }
        }
        // Without pointers (a plain buffer): the library's calls instead.
        Op::PointerStore | Op::ViewMut => write(w, &b, o, rng)?,
        Op::PointerLoad | Op::View => {
            let mut got = vec![0u8; b.len()];
            b.read(0, &mut got)?;
            if let Err(e) = first_difference(&got, &o.shadow) {
                return wrong(format!("read of the whole buffer: {e}"));
            }
        }
        Op::PrefetchDevice | Op::PrefetchHost => {
            let to = if op == Op::PrefetchDevice {
                Location::Device
            } else {
                Location::Host
            };
            b.prefetch(page_range(rng, pages, pages), to)?.wait()?;
        }
        Op::Evict => {
            b.evict(page_range(rng, pages, pages))?;
        }
        Op::Advise => {
            let loc = if rng.random_bool(0.5) {
                Location::Device
            } else {
                Location::Host
            };
            let before = b.preferred();
            let advice = if rng.random_bool(0.6) {
                Advice::PreferredLocation(loc)
            } else {
                Advice::AccessedBy(loc)
            };
            let r = b.advise(advice);
            let want = match (&r, advice) {
                (Ok(()), Advice::PreferredLocation(l)) => Some(l),
                _ => before,
            };
            if b.preferred() != want {
                return wrong(format!(
                    "{advice:?} ended in {r:?}: the preferred location is {:?}, {want:?} expected",
                    b.preferred()
                ));
            }
            r?;
        }
        Op::Pin => {
            let r = page_range(rng, pages, 4);
            let pin = b.pin_on_device(r.clone())?;
            if pin.pfns().len() != r.len() / 4096 {
                return wrong(format!("pinned {} pages of {r:?}", pin.pfns().len()));
            }
            if w.ctx.driver().kind() == MemoryKind::DevicePrivate {
                // A write across a pinned page is refused before any byte is written, naming
                // the buffer and an offset inside the write.
                match b.write(r.start, &[0xEE; 8]) {
                    Err(Error::HeldOnDevice { addr, offset })
                        if addr == b.addr() && (r.start..r.start + 8).contains(&offset) => {}
                    other => return wrong(format!("a write to a pinned page gave {other:?}")),
                }
            }
            std::thread::sleep(Duration::from_micros(rng.random_range(0..200)));
            drop(pin);
        }
        Op::Realloc => {
            b.free()?;
            if !matches!(b.read(0, &mut [0u8; 1]), Err(Error::Freed)) {
                return wrong("a freed buffer's handle still reads".into());
            }
            o.buf = None;
            o.shadow.fill(0);
            realloc(w, o, rng)?;
        }
        Op::Launch => match &w.kernel {
            Some(kernel) => launch(w, kernel, &b, o, rng)?,
            None => write(w, &b, o, rng)?,
        },
        // Not on an owned buffer: `step_shared`.
        Op::DriverEvict
        | Op::DriverEvictAll
        | Op::SharedMove
        | Op::SharedRead
        | Op::Inject
        | Op::Exhaust
        | Op::LoseDevice => step_shared(w, op, rng)?,
    }
    Ok(())
}

/// The operations on no buffer a thread owns: the driver's evictions, the shared buffer,
/// injections.
fn step_shared(w: &World, op: Op, rng: &mut StdRng) -> Result<(), Failure> {
    match op {
        Op::DriverEvict => {
            w.ctx.driver().evict(rng.random_range(1..8))?;
        }
        Op::DriverEvictAll => {
            w.ctx.driver().evict_all()?;
        }
        Op::SharedMove => {
            let r = page_range(rng, w.shared_bytes.len() / 4096, usize::MAX);
            match rng.random_range(0..3) {
                0 => drop(w.shared.prefetch(r, Location::Device)?.wait()?),
                1 => drop(w.shared.prefetch(r, Location::Host)?.wait()?),
                _ => drop(w.shared.evict(r)?),
            }
        }
        Op::SharedRead => {
            let r = byte_range(rng, w.shared_bytes.len());
            let mut got = vec![0u8; r.len()];
            w.shared.read(r.start, &mut got)?;
            if let Err(e) = first_difference(&got, &w.shared_bytes[r.clone()]) {
                return wrong(format!("the shared buffer's {r:?}: {e}"));
            }
        }
        Op::Inject => inject::copy_failures(w, rng),
        // Chosen as the companions of another operation (see `worker`), never run alone.
        Op::Exhaust | Op::LoseDevice => {}
        op => return wrong(format!("{} needs a buffer of the thread's own", op.name())),
    }
    Ok(())
}

/// `Buffer::write` of random bytes. On an accepted error, the pages before the one that
/// failed may hold the new bytes (a write goes page by page): each page of the range must
/// hold wholly its old or its new bytes, the new ones a prefix of the range.
fn write(w: &World, b: &Buffer, o: &mut Owned, rng: &mut StdRng) -> Result<(), Failure> {
    let r = byte_range(rng, b.len());
    let data = random_bytes(rng, r.len());
    let e = match b.write(r.start, &data) {
        Ok(()) => {
            o.shadow[r].copy_from_slice(&data);
            return Ok(());
        }
        Err(e) => Failure::from(e),
    };
    let Failure::Accepted(_) = e else {
        return Err(e);
    };
    let mut now = vec![0u8; b.len()];
    super::retried(w, || b.read(0, &mut now))
        .map_err(|e| Failure::Wrong(format!("reading back after a failed write: {e}")))?;
    let mut old_seen = false;
    let mut at = r.start;
    while at < r.end {
        let end = ((at / 4096 + 1) * 4096).min(r.end);
        let is_new = now[at..end] == data[at - r.start..end - r.start];
        let is_old = now[at..end] == o.shadow[at..end];
        match (is_new, is_old) {
            (_, true) => old_seen = true,
            (true, false) if !old_seen => {}
            _ => {
                return wrong(format!(
                    "a write of {r:?} that failed ({e:?}) left bytes {at}..{end} neither old \
                     nor new, or new after an old page",
                    e = match &e {
                        Failure::Accepted(x) => x.to_string(),
                        Failure::Wrong(x) => x.clone(),
                    }
                ))
            }
        }
        o.shadow[at..end].copy_from_slice(&now[at..end]);
        at = end;
    }
    Err(e)
}

/// Frees nothing; allocates the slot's buffer anew, which must read as zeros (recycled
/// memory never shows an earlier owner's bytes), sometimes after a trip to the device.
fn realloc(w: &World, o: &mut Owned, rng: &mut StdRng) -> Result<(), Failure> {
    let b = allocate(w, o.mapped)?;
    o.shadow.fill(0);
    o.buf = Some(b.clone());
    match rng.random_range(0..3) {
        0 => drop(b.prefetch(0..b.len(), Location::Device)?.wait()?),
        1 => drop(b.evict(0..b.len())?),
        _ => {}
    }
    let mut got = vec![0u8; b.len()];
    b.read(0, &mut got)?;
    if let Err(e) = first_difference(&got, &o.shadow) {
        return wrong(format!("a fresh buffer is not zeros: {e}"));
    }
    Ok(())
}

/// Launches the kernel that adds a constant to each word of a range of the buffer, and
/// waits for it. A launch refused before it runs changes nothing.
fn launch(
    w: &World,
    kernel: &hetmem_engine::Kernel,
    b: &Buffer,
    o: &mut Owned,
    rng: &mut StdRng,
) -> Result<(), Failure> {
    let r = page_range(rng, w.pages, 4);
    let n = (r.len() / 4096) as u32;
    let add: u32 = rng.random();
    let groups = workgroups(r.len(), 4, 64)?;
    let l = w.ctx.launch(kernel, &[(b, r.clone())], &[add, n], groups)?;
    if let Err(e) = l.wait() {
        return wrong(format!(
            "a launch over {r:?} failed after it started: {e} ({e:?})"
        ));
    }
    w.launches.fetch_add(1, Ordering::Relaxed);
    for s in o.shadow[r].chunks_exact_mut(4) {
        let old = u32::from_le_bytes((&*s).try_into().expect("four bytes"));
        s.copy_from_slice(&old.wrapping_add(add).to_le_bytes());
    }
    Ok(())
}
