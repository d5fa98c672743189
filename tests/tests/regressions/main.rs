//! Regression tests for the defects of the concurrency-and-exhaustion issue: the rules of
//! shared/HMM-SEMANTICS.md, "Rules that concurrency and exhaustion make sharp" (serialization
//! with munmap, mremap, mprotect and fork; invalidations that start and end, never under a
//! page-table leaf lock; out of memory as an error, not a loop; zero means zero).
//!
//! One test per defect, `d01_...` to `d11_...` (a defect with several paths has `a`, `b`,
//! `c` tests). Each asserts behaviour (bytes, entries, page flags, counters, error kinds) and
//! fails on the code the issue was filed against; a step that hangs there runs under a
//! watchdog, which turns the hang into a failure (and, where it can, lets the stuck thread
//! go). Everything runs on the host device with a private host frame pool, so no GPU is
//! needed and no test sees the frames another one frees or exhausts.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hetmem::driver::{DriverConfig, GpuDriver, CHUNK_PAGES};
use hetmem::migration::*;
use hetmem::mm::{
    flags, AddressSpace, MemoryKind, Notifier, NotifyEvent, NotifyRange, PageMap, Prot, Pte,
    SpaceId, PAGE,
};
use hetmem::VirtAddr;
use hetmem::{Error, ErrorKind};
use hetmem_engine::{Device, DeviceKind, HostFramePool, Pfn};
use hetmem_tests::dmirror::{Between, Dmirror};
use hetmem_tests::harness::{map, pattern, read, unsettled};
use hetmem_tests::{open_config, test_config};
use parking_lot::Mutex;

/// How long a step may take before it counts as hung.
const WATCHDOG: Duration = Duration::from_secs(10);
/// How long an operation started on another thread in the middle of a migration gets before
/// the migration goes on (once fixed, it may wait for the migration to finish).
const GRACE: Duration = Duration::from_millis(100);
/// How long racing loops run.
const RACE: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------
// Watchdogs
// ---------------------------------------------------------------------------------------

/// A closure running on a thread of its own.
struct Watched<T> {
    rx: mpsc::Receiver<T>,
    handle: Option<thread::JoinHandle<()>>,
}

/// Starts `f` on a thread of its own.
fn spawn_watched<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Watched<T> {
    let (tx, rx) = mpsc::channel();
    let handle = thread::spawn(move || {
        let _ = tx.send(f());
    });
    Watched {
        rx,
        handle: Some(handle),
    }
}

impl<T> Watched<T> {
    /// The closure's result if it finishes within `limit` (its panic, raised again here, if
    /// it panicked); `None` if it is still running.
    fn poll(&mut self, limit: Duration) -> Option<T> {
        match self.rx.recv_timeout(limit) {
            Ok(v) => Some(v),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let handle = self
                    .handle
                    .take()
                    .expect("a finished closure is polled once");
                match handle.join() {
                    Err(panic) => std::panic::resume_unwind(panic),
                    Ok(()) => unreachable!("the closure sends its result before its thread ends"),
                }
            }
        }
    }

    /// As [`Watched::poll`], giving the closure back if it is still running.
    fn wait(mut self, limit: Duration) -> Result<T, Self> {
        self.poll(limit).ok_or(self)
    }
}

/// Waits for two racing threads until `limit` from now: the first panic of either is raised
/// here at once (the other may be stuck behind what the panic left), and a thread still
/// running at `limit` fails the test as hung.
fn join_racers<A, B>(
    (an, mut a): (&str, Watched<A>),
    (bn, mut b): (&str, Watched<B>),
    limit: Duration,
) -> (A, B) {
    let deadline = Instant::now() + limit;
    let (mut ra, mut rb) = (None, None);
    while ra.is_none() || rb.is_none() {
        if Instant::now() > deadline {
            let stuck: Vec<&str> = [(an, ra.is_none()), (bn, rb.is_none())]
                .iter()
                .filter(|x| x.1)
                .map(|x| x.0)
                .collect();
            panic!("{stuck:?} still running {limit:?} after the race started: hung");
        }
        if ra.is_none() {
            ra = a.poll(Duration::from_millis(10));
        }
        if rb.is_none() {
            rb = b.poll(Duration::from_millis(10));
        }
    }
    (ra.unwrap(), rb.unwrap())
}

/// Runs `f` on a thread of its own and fails the test if it does not finish within `limit`.
fn watchdog_for<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    match spawn_watched(f).wait(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after {limit:?}: it hangs"),
    }
}

/// [`watchdog_for`] with the usual limit.
fn watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    watchdog_for(what, WATCHDOG, f)
}

/// An operation started on another thread in the middle of a migration: finished within
/// [`GRACE`], or still running (blocked until the migration ends, once the library
/// serializes them).
enum Elsewhere<T> {
    Done(T),
    Running(Watched<T>),
}

/// Starts `op` on another thread and gives it [`GRACE`] to finish.
fn start_elsewhere<T: Send + 'static>(op: impl FnOnce() -> T + Send + 'static) -> Elsewhere<T> {
    match spawn_watched(op).wait(GRACE) {
        Ok(v) => Elsewhere::Done(v),
        Err(w) => Elsewhere::Running(w),
    }
}

impl<T> Elsewhere<T> {
    /// The operation's result, once the migration it met has finished.
    fn finish(self, what: &str) -> T {
        match self {
            Elsewhere::Done(v) => v,
            Elsewhere::Running(w) => match w.wait(Duration::from_secs(5)) {
                Ok(v) => v,
                Err(_) => panic!("{what}: still blocked 5 s after the migration finished"),
            },
        }
    }
}

/// Holds handles to a test's objects and, if the test fails (its thread panics), leaks them
/// instead of dropping them: tearing down a state that a defect left inconsistent can panic
/// again during the unwind, which would abort the whole test binary.
#[derive(Default)]
struct KeepOnPanic(Vec<Box<dyn Any + Send>>);

impl KeepOnPanic {
    fn keep<T: Any + Send>(&mut self, x: T) {
        self.0.push(Box::new(x));
    }
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            for x in self.0.drain(..) {
                std::mem::forget(x);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Set-ups
// ---------------------------------------------------------------------------------------

/// The smallest private host frame pool: one 64 MiB segment (16384 frames).
const SMALL_POOL: usize = 64 << 20;

/// The host device with a budget of `budget_pages`, copying to and from `frames`.
fn host_device(budget_pages: usize, frames: &Arc<HostFramePool>) -> Device {
    let mut config = test_config(DeviceKind::Host, (budget_pages * 4096) as u64);
    config.frames = Some(frames.clone());
    open_config(config, "regressions").expect("the host device is always there")
}

/// A `GpuDriver` over the host device, with its own frame pool.
struct Gpu {
    pool: Arc<HostFramePool>,
    pm: Arc<PageMap>,
    d: GpuDriver,
    space: AddressSpace,
}

fn gpu(mem: MemoryKind, budget_pages: usize, fault_around: usize, pool_bytes: usize) -> Gpu {
    let pool = HostFramePool::new(pool_bytes).unwrap();
    let device = host_device(budget_pages, &pool);
    let pm = PageMap::new(pool.clone()).unwrap();
    let config = DriverConfig {
        kind: Some(mem),
        fault_around,
        budget_pages: Some(budget_pages),
    };
    let d = GpuDriver::new(device, &pm, config).unwrap();
    let space = AddressSpace::new(&pm);
    Gpu { pool, pm, d, space }
}

impl Gpu {
    fn keep(&self, keep: &mut KeepOnPanic) {
        keep.keep(self.pm.clone());
        keep.keep(self.d.clone());
        keep.keep(self.space.clone());
    }
}

/// The dmirror test driver over the host device, with its own frame pool.
struct Mirror {
    pm: Arc<PageMap>,
    dev: Dmirror,
    space: AddressSpace,
}

fn mirror(mem: MemoryKind) -> Mirror {
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let device = host_device(256, &pool);
    let pm = PageMap::new(pool).unwrap();
    let dev = Dmirror::new(device, mem, &pm);
    let space = AddressSpace::new(&pm);
    Mirror { pm, dev, space }
}

impl Mirror {
    fn keep(&self, keep: &mut KeepOnPanic) {
        keep.keep(self.pm.clone());
        keep.keep(self.dev.device().clone());
        keep.keep(self.space.clone());
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Where `got` differs from `want`, page by page, for a failure message.
fn differences(got: &[u8], want: &[u8]) -> Vec<String> {
    got.chunks(4096)
        .zip(want.chunks(4096))
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .map(|(p, (g, w))| {
            let i = (0..g.len()).find(|&i| g[i] != w[i]).unwrap();
            format!("page {p} byte {i}: {:#04x}, want {:#04x}", g[i], w[i])
        })
        .collect()
}

/// The entries of `npages` pages from `addr` that are not `Pte::None`.
fn entries_left(space: &AddressSpace, addr: VirtAddr, npages: usize) -> Vec<(usize, Pte)> {
    (0..npages)
        .map(|k| (k, space.pte(addr + k as u64 * PAGE)))
        .filter(|(_, p)| *p != Pte::None)
        .collect()
}

/// The driver's part of a migration to `device`: a locked device page for each collected
/// entry (holes included), named in `dst`, and one batched copy of the pages with data.
fn fill_dst(src: &[u64], dst: &mut [u64], device: &Device, pm: &PageMap) {
    let want: Vec<usize> = (0..src.len())
        .filter(|&i| src[i] & MIGRATE_PFN_MIGRATE != 0)
        .collect();
    if want.is_empty() {
        return;
    }
    let pages = device.alloc_pages(want.len(), true).unwrap();
    let mut pairs = Vec::new();
    for (&i, &d) in want.iter().zip(&pages) {
        pm.claim_device_page(d, true).unwrap().into_pfn();
        dst[i] = migrate_pfn(d);
        if let Some(s) = migrate_pfn_to_pfn(src[i]) {
            pairs.push((s, d));
        }
    }
    if !pairs.is_empty() {
        device.copy(&pairs).unwrap().wait().unwrap();
    }
}

/// The errors a migration may meet when another thread moved or unmapped its range.
fn range_went_away(e: &Error) -> bool {
    matches!(
        e,
        Error::NotMapped(_) | Error::AcrossVmas { .. } | Error::Busy(_)
    )
}

/// Every frame of a pool.
fn all_frames(pool: &HostFramePool) -> Vec<Pfn> {
    let r = pool.pfn_range();
    (0..r.count).map(|i| r.start.add(i)).collect()
}

// ---------------------------------------------------------------------------------------
// Notifiers
// ---------------------------------------------------------------------------------------

/// A notifier that records every call: `(true, range)` for `invalidate`, `(false, range)`
/// for `invalidate_end`.
#[derive(Default)]
struct Recorder(Mutex<Vec<(bool, NotifyRange)>>);

impl Notifier for Recorder {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        self.0.lock().push((true, *r));
    }
    fn invalidate_end(&self, _: SpaceId, r: &NotifyRange) {
        self.0.lock().push((false, *r));
    }
}

impl Recorder {
    /// The calls so far; the log starts again empty.
    fn take(&self) -> Vec<(bool, NotifyRange)> {
        std::mem::take(&mut *self.0.lock())
    }
}

/// Two calls name the same range.
fn same_range(a: &NotifyRange, b: &NotifyRange) -> bool {
    (a.start, a.end, a.event) == (b.start, b.end, b.event)
}

/// Problems with the pairing of `events`: invalidations that never ended, and ends of
/// ranges that never started.
fn unpaired(what: &str, events: &[(bool, NotifyRange)]) -> Vec<String> {
    let mut open: Vec<NotifyRange> = Vec::new();
    let mut out = Vec::new();
    for (start, r) in events {
        if *start {
            open.push(*r);
        } else if let Some(k) = open.iter().position(|o| same_range(o, r)) {
            open.remove(k);
        } else {
            out.push(format!(
                "{what}: invalidate_end of {:#x}..{:#x} ({:?}) that never started",
                r.start, r.end, r.event
            ));
        }
    }
    for r in open {
        out.push(format!(
            "{what}: invalidate of {:#x}..{:#x} ({:?}) never ended",
            r.start, r.end, r.event
        ));
    }
    out
}

/// Fails unless `events` hold an invalidation covering `addr` and, after it, its end.
fn invalidated(what: &str, events: &[(bool, NotifyRange)], addr: VirtAddr) -> Option<String> {
    let Some(k) = events
        .iter()
        .position(|(s, r)| *s && r.start <= addr && addr < r.end)
    else {
        return Some(format!(
            "{what}: no invalidation covers {addr:#x} (calls: {events:?})"
        ));
    };
    let r = events[k].1;
    let ended = events[k + 1..]
        .iter()
        .any(|(s, e)| !*s && same_range(e, &r));
    (!ended).then(|| format!("{what}: the invalidation {r:?} covering {addr:#x} never ended"))
}

// The tests: zeros and serialization with munmap, mprotect and fork (d01 to d04, d11); mremap,
// munmap and fork racing migrations (d05); exhaustion, invalidations, failed and dropped
// migrations (d06 to d10).
mod exhaustion;
mod races;
mod serialization;
