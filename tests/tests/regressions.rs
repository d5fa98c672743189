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
//!
//! Long: one test per defect of the issue (d01 to d11), sharing the watchdogs and fixtures
//! above; splitting it into a folder of modules is left for later.

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

// ---------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------

/// Defect 1: every hole that a GpuDriver migration fills reads as zeros, even when the free
/// list holds frames of an unmapped range full of 0xAB. Three paths: the scenario
/// (page 0 written, pages 0..16 migrated to the device, the range read back), fault-around
/// (only page 0 on the device: the fault brings back a 16-page window of which 15 are
/// holes), and `migrate_to_host` of a range whose pages 1..15 are holes.
#[test]
fn d01_holes_filled_by_a_migration_read_as_zeros() {
    watchdog("d01", || {
        let g = gpu(MemoryKind::DevicePrivate, 256, 16, SMALL_POOL);
        let mut keep = KeepOnPanic::default();
        g.keep(&mut keep);
        let (d, space) = (&g.d, &g.space);
        let mut bad = Vec::new();
        for path in [
            "pages 0..16 to the device, then a CPU read",
            "page 0 to the device, then a CPU read (fault-around)",
            "page 0 to the device, then migrate_to_host of pages 0..16",
        ] {
            // Stale bytes on the free list: a range full of 0xAB, unmapped.
            let junk = map(space, 64);
            space.write(junk, &[0xab; 64 * 4096]).unwrap();
            space.munmap(junk, 64 * PAGE).unwrap();
            let a = map(space, 16);
            space.write(a, &[0x11; 4096]).unwrap();
            let to_device = if path.starts_with("pages 0..16") {
                16
            } else {
                1
            };
            d.migrate_to_device(space, a, to_device).unwrap();
            if path.contains("migrate_to_host") {
                d.migrate_to_host(space, a, 16).unwrap();
            }
            let got = read(space, a, 16 * 4096);
            let mut want = vec![0u8; 16 * 4096];
            want[..4096].fill(0x11);
            for diff in differences(&got, &want) {
                bad.push(format!("{path}: {diff}"));
            }
        }
        assert!(
            bad.is_empty(),
            "holes filled by a migration must read as zeros:\n{}",
            bad.join("\n")
        );
    });
}

/// Defect 2: a CPU write that copies on write (to a page shared after fork, or to the zero
/// page a read mapped) installs a new frame, so it must invalidate the address (start and
/// end) for the device mirrors, after whatever fork itself notified.
#[test]
fn d02_a_copy_on_write_invalidates_the_address() {
    watchdog("d02", || {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let pm = PageMap::new(pool).unwrap();
        let space = AddressSpace::new(&pm);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let mut bad = Vec::new();

        // The zero page: a read of a hole maps it, a write replaces it.
        let a = map(&space, 2);
        assert_eq!(read(&space, a, 1), [0]);
        assert!(
            matches!(space.pte(a), Pte::Present { pfn, write: false, .. } if pfn == pm.zero_pfn()),
            "a read of a hole of a private mapping maps the zero page: {:?}",
            space.pte(a)
        );
        rec.take();
        space.write(a, &[1]).unwrap();
        bad.extend(invalidated("a write over the zero page", &rec.take(), a));

        // Fork: both sides share the page read-only; a write on either side copies it.
        let b = map(&space, 2);
        space.write(b, &[2; 2 * 4096]).unwrap();
        let child = space.fork().unwrap();
        let crec = Arc::new(Recorder::default());
        child.register_notifier(crec.clone());
        rec.take(); // fork's own notifications
        space.write(b, &[3]).unwrap();
        bad.extend(invalidated("the parent's write after fork", &rec.take(), b));
        child.write(b + PAGE, &[4]).unwrap();
        bad.extend(invalidated(
            "the child's write after fork",
            &crec.take(),
            b + PAGE,
        ));
        // The copies happened: each write stayed on its side.
        assert_eq!(read(&child, b, 1), [2]);
        assert_eq!(read(&space, b + PAGE, 1), [2]);
        assert!(
            bad.is_empty(),
            "copy on write without invalidation:\n{}",
            bad.join("\n")
        );
    });
}

/// Defect 3: a munmap of the range on another thread between `migrate_vma_setup` and
/// `migrate_vma_pages` (which may wait, once fixed, until finalize): afterwards the range
/// mapped again has no entry at all (no page came back into the unmapped range) and every
/// device page the migration allocated is free again.
#[test]
fn d03_munmap_during_a_migration_gets_no_pages_back() {
    watchdog("d03", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 8);
        space.write(a, &pattern(5, 3)).unwrap(); // pages 5..8 stay holes
        let before = dev.device().pages_in_use();
        let mut src = vec![0u64; 8];
        let mut dst = vec![0u64; 8];
        let mut m = MigrateVma::new(space, a, a + 8 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.cpages, 8);
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        let other = space.clone();
        let unmap = start_elsewhere(move || other.munmap(a, 8 * PAGE));
        // A fixed library may refuse the pages stage of a range that is gone.
        let _ = migrate_vma_pages(&mut m);
        migrate_vma_finalize(&mut m);
        unmap.finish("munmap").unwrap();
        space.mmap(Some(a), 8 * PAGE, Prot::RW, false).unwrap();
        let left = entries_left(space, a, 8);
        assert!(
            left.is_empty(),
            "the range unmapped during the migration has entries again: {left:?}"
        );
        assert_eq!(
            dev.device().pages_in_use(),
            before,
            "device pages of the migration are still in use"
        );
    });
}

/// Defect 4: an mprotect(READ) of the range on another thread after `migrate_vma_setup`:
/// once the migration is over, no entry of the range is writable and a CPU write is denied.
#[test]
fn d04_mprotect_during_a_migration_leaves_entries_read_only() {
    watchdog("d04", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 8);
        let data = pattern(6, 4);
        space.write(a, &data).unwrap(); // pages 6, 7 stay holes
        let mut src = vec![0u64; 8];
        let mut dst = vec![0u64; 8];
        let mut m = MigrateVma::new(space, a, a + 8 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.cpages, 8);
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        let other = space.clone();
        let protect = start_elsewhere(move || other.mprotect(a, 8 * PAGE, Prot::READ));
        // A fixed library may refuse the pages stage of a range whose protection changed.
        let _ = migrate_vma_pages(&mut m);
        migrate_vma_finalize(&mut m);
        protect.finish("mprotect").unwrap();
        let mut bad: Vec<String> = Vec::new();
        for k in 0..8u64 {
            let pte = space.pte(a + k * PAGE);
            let ok = match pte {
                Pte::Present { write, .. } | Pte::DevicePrivate { write, .. } => !write,
                Pte::None => k >= 6, // a hole may stay one
                _ => false,
            };
            if !ok {
                bad.push(format!("page {k}: {pte:?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "entries must come back read-only after mprotect(READ): {bad:?}"
        );
        let e = space.write(a, &[1]).unwrap_err();
        assert!(matches!(e, Error::WriteDenied(_)), "{e}");
        let got = read(space, a, 8 * 4096);
        let mut want = data;
        want.resize(8 * 4096, 0);
        assert_eq!(differences(&got, &want), Vec::<String>::new());
    });
}

/// Defect 5, mremap: first an mremap on another thread in the middle of a migration (after
/// setup, with holes in the range), then one thread migrating the range to the device and
/// back in a loop while another moves it back and forth, for two seconds. Neither may panic
/// or hang; afterwards the bytes at the final address are those written, no page is locked
/// and no migration entry is left, the vacated address has no entries, and once the range is
/// unmapped no device page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05a_mremap_racing_a_migration() {
    watchdog_for("d05a", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 4usize;
        let len = n as u64 * PAGE;
        let a = map(space, n as u64);
        let b = a + 64 * PAGE;

        // The move lands between setup and the pages stage, deterministically.
        let first = pattern(2, 5); // pages 2, 3 stay holes
        space.write(a, &first).unwrap();
        let mut moving = None;
        let moved = dev.migrate_to_device_with(space, a, n, Between::SetupAndCopy, || {
            let s = space.clone();
            moving = Some(start_elsewhere(move || s.mremap(a, len, b)));
        });
        moving.unwrap().finish("mremap").unwrap();
        if let Err(e) = moved {
            assert!(range_went_away(&e), "{e}");
        }
        let mut want = first;
        want.resize(n * 4096, 0);
        assert_eq!(
            differences(&read(space, b, n * 4096), &want),
            Vec::<String>::new()
        );
        let left = entries_left(space, a, n);
        assert!(
            left.is_empty(),
            "mremap during a migration: the vacated range has entries: {left:?}"
        );
        let bad = unsettled(space, pm, b, n);
        assert!(bad.is_empty(), "mremap during a migration: {bad:?}");

        // The race.
        let data = pattern(n, 6);
        space.write(b, &data).unwrap();
        let deadline = Instant::now() + RACE;
        let migrator = {
            let env = env.clone();
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    for at in [a, b] {
                        for back in [false, true] {
                            let r = if back {
                                env.dev.migrate_to_system(&env.space, at, n)
                            } else {
                                env.dev.migrate_to_device(&env.space, at, n)
                            };
                            match r {
                                Ok(_) => rounds += 1,
                                Err(e) if range_went_away(&e) => {}
                                Err(e) => panic!("migration at {at:#x}: {e}"),
                            }
                        }
                    }
                }
                rounds
            })
        };
        let mover = {
            let space = space.clone();
            spawn_watched(move || {
                let (mut at, mut moves) = (b, 0u64);
                while Instant::now() < deadline {
                    let to = if at == a { b } else { a };
                    space.mremap(at, len, to).unwrap();
                    at = to;
                    moves += 1;
                }
                (at, moves)
            })
        };
        let (rounds, (at, moves)) = join_racers(
            ("migrator", migrator),
            ("mover", mover),
            RACE + Duration::from_secs(5),
        );
        let gone = if at == a { b } else { a };
        let bad = unsettled(space, pm, at, n);
        assert!(
            bad.is_empty(),
            "after {rounds} migrations and {moves} moves: {bad:?}"
        );
        let diff = differences(&read(space, at, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} migrations and {moves} moves, bytes differ: {diff:?}"
        );
        let left = entries_left(space, gone, n);
        assert!(
            left.is_empty(),
            "after {rounds} migrations and {moves} moves, the vacated range has entries: {left:?}"
        );
        space.munmap(at, len).unwrap();
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} migrations and {moves} moves and an munmap, device pages leaked"
        );
    });
}

/// Defect 5, munmap: first an munmap, mmap and write of the range on another thread in the
/// middle of a migration (after setup, with holes), then one thread migrating the range to
/// the device and back in a loop while another unmaps, maps and writes it again, for two
/// seconds. Neither may panic or hang; afterwards the range holds the last bytes written (the
/// new mapping's holes are holes), no page is locked, no migration entry is left, and once
/// the range is unmapped no device page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05b_munmap_racing_a_migration() {
    watchdog_for("d05b", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 4usize;
        let len = n as u64 * PAGE;
        let a = map(space, n as u64);

        // The munmap lands between setup and the pages stage, deterministically.
        space.write(a, &pattern(2, 7)).unwrap(); // pages 2, 3 stay holes
        let second = pattern(2, 8);
        let mut remapping = None;
        let moved = dev.migrate_to_device_with(space, a, n, Between::SetupAndCopy, || {
            let (s, bytes) = (space.clone(), second.clone());
            remapping = Some(start_elsewhere(move || {
                s.munmap(a, len)?;
                s.mmap(Some(a), len, Prot::RW, false)?;
                s.write(a, &bytes) // the new mapping's pages 2, 3 stay holes
            }));
        });
        remapping.unwrap().finish("munmap, mmap, write").unwrap();
        if let Err(e) = moved {
            assert!(range_went_away(&e), "{e}");
        }
        assert_eq!(
            differences(&read(space, a, 2 * 4096), &second),
            Vec::<String>::new()
        );
        let left = entries_left(space, a + 2 * PAGE, 2);
        assert!(
            left.is_empty(),
            "munmap during a migration: the new mapping's untouched holes have entries: {left:?}"
        );
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "munmap during a migration: {bad:?}");

        // The race.
        let data = Arc::new(pattern(n, 9));
        space.write(a, &data).unwrap();
        let deadline = Instant::now() + RACE;
        let migrator = {
            let env = env.clone();
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    for back in [false, true] {
                        let r = if back {
                            env.dev.migrate_to_system(&env.space, a, n)
                        } else {
                            env.dev.migrate_to_device(&env.space, a, n)
                        };
                        match r {
                            Ok(_) => rounds += 1,
                            Err(e) if range_went_away(&e) => {}
                            Err(e) => panic!("migration: {e}"),
                        }
                    }
                }
                rounds
            })
        };
        let unmapper = {
            let (space, data) = (space.clone(), data.clone());
            spawn_watched(move || {
                let mut unmaps = 0u64;
                while Instant::now() < deadline {
                    space.munmap(a, len).unwrap();
                    space.mmap(Some(a), len, Prot::RW, false).unwrap();
                    space.write(a, &data).unwrap();
                    unmaps += 1;
                }
                unmaps
            })
        };
        let (rounds, unmaps) = join_racers(
            ("migrator", migrator),
            ("unmapper", unmapper),
            RACE + Duration::from_secs(5),
        );
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "after {rounds} migrations and {unmaps} unmaps: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} migrations and {unmaps} unmaps, bytes differ: {diff:?}"
        );
        space.munmap(a, len).unwrap();
        let left = entries_left(space, a, n);
        assert!(
            left.is_empty(),
            "entries survived the last munmap: {left:?}"
        );
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} migrations and {unmaps} unmaps, device pages leaked"
        );
    });
}

/// A notifier that holds up the teardown of its address space at its first `Release`
/// invalidation (until told to go on, or for at most 500 ms) and says when it got there.
struct SlowRelease {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    go: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Notifier for SlowRelease {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        if r.event != NotifyEvent::Release {
            return;
        }
        if let Some(tx) = self.entered.lock().take() {
            let _ = tx.send(());
        }
        if let Some(rx) = self.go.lock().take() {
            let _ = rx.recv_timeout(Duration::from_millis(500));
        }
    }
}

/// Defect 5, fork: first a fork asked for in the middle of a migration (it fails on the
/// migrating thread and waits for finalize on another), its child dropped on another thread
/// while the device is evicted (its teardown held up, by a notifier that sleeps, right after
/// it started); then one thread migrating the range to the
/// device and back in a loop (checking a page's bytes with a CPU read every eighth round)
/// while another forks the space (reading a page in every eighth child) and drops the child,
/// for two seconds. Nothing may panic or hang, every read sees the bytes written; afterwards
/// no page is locked, no migration entry is left, and once the range is unmapped no device
/// page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05c_fork_racing_a_migration() {
    watchdog_for("d05c", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 16usize;
        let a = map(space, n as u64);
        let data = Arc::new(pattern(n, 10));
        space.write(a, &data).unwrap();

        // A fork asked for in the middle of a migration: on the migrating thread it fails
        // (it would wait for itself); on another thread it waits for finalize.
        let forked = std::thread::scope(|scope| {
            let mut forking = None;
            let moved = dev.migrate_to_device_with(space, a, n, Between::PagesAndFinalize, || {
                assert!(matches!(
                    space.fork(),
                    Err(hetmem::Error::MigrationInProgress)
                ));
                forking = Some(scope.spawn(|| space.fork().unwrap()));
                std::thread::sleep(Duration::from_millis(20));
                assert!(
                    !forking.as_ref().unwrap().is_finished(),
                    "a fork waits for the migration"
                );
            });
            assert_eq!(moved.unwrap().cpages, n);
            forking.unwrap().join().unwrap()
        });
        // The child goes away while its pages are evicted (its teardown held up, by a
        // notifier that sleeps, right after it started).
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        forked.register_notifier(Arc::new(SlowRelease {
            entered: Mutex::new(Some(entered_tx)),
            go: Mutex::new(Some(go_rx)),
        }));
        let teardown = spawn_watched(move || drop(forked));
        let _ = entered_rx.recv_timeout(Duration::from_secs(2));
        dev.evict_all().unwrap();
        drop(go_tx);
        if teardown.wait(Duration::from_secs(5)).is_err() {
            panic!("a child dropped during an eviction: its teardown hangs");
        }
        dev.evict_all().unwrap();
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "a child dropped during an eviction: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "a child dropped during an eviction: bytes differ: {diff:?}"
        );

        // The race.
        let deadline = Instant::now() + RACE;
        let migrator = {
            let (env, data) = (env.clone(), data.clone());
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    env.dev.migrate_to_device(&env.space, a, n).unwrap();
                    env.dev.migrate_to_system(&env.space, a, n).unwrap();
                    if rounds.is_multiple_of(8) {
                        let k = rounds as usize / 8 % n;
                        let got = read(&env.space, a + k as u64 * PAGE, 64);
                        assert_eq!(
                            got,
                            data[k * 4096..k * 4096 + 64],
                            "round {rounds} page {k}"
                        );
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        let forker = {
            let (space, data) = (space.clone(), data.clone());
            spawn_watched(move || {
                let mut forks = 0u64;
                while Instant::now() < deadline {
                    let child = space.fork().unwrap();
                    if forks.is_multiple_of(8) {
                        let k = forks as usize / 8 % n;
                        let got = read(&child, a + k as u64 * PAGE, 64);
                        assert_eq!(got, data[k * 4096..k * 4096 + 64], "child {forks} page {k}");
                    }
                    drop(child);
                    forks += 1;
                }
                forks
            })
        };
        let (rounds, forks) = join_racers(
            ("migrator", migrator),
            ("forker", forker),
            RACE + Duration::from_secs(5),
        );
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "after {rounds} rounds and {forks} forks: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} rounds and {forks} forks, bytes differ: {diff:?}"
        );
        space.munmap(a, n as u64 * PAGE).unwrap();
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} rounds and {forks} forks and an munmap, device pages leaked"
        );
    });
}

/// Defect 6a: a CPU fault on a device-private page when no host frame is free returns an
/// error of kind `OutOfMemory` (not a retry loop); once frames are free again the page reads
/// back with its bytes.
#[test]
fn d06a_a_fault_with_no_free_host_frame_is_out_of_memory() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 4);
    let data = pattern(4, 11);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 4).unwrap().migrated, 4);
    let hoard = g.pool.alloc_batch(g.pool.available(), false).unwrap();
    let s = g.space.clone();
    let reader = spawn_watched(move || {
        let mut v = vec![0u8; 16];
        s.read(a, &mut v).map(|()| v)
    });
    let r = match reader.wait(WATCHDOG) {
        Ok(r) => r,
        Err(stuck) => {
            // Frames again, so that the stuck reader finishes rather than spin on.
            g.pool.free_batch(&hoard).unwrap();
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a CPU fault with no free host frame did not return within {WATCHDOG:?}: it retries forever");
        }
    };
    g.pool.free_batch(&hoard).unwrap();
    let e = r.expect_err("a fault with no free host frame succeeded");
    assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{e}");
    let s = g.space.clone();
    let got = watchdog("d06a: a read once frames are free", move || {
        read(&s, a, 4 * 4096)
    });
    assert_eq!(differences(&got, &data), Vec::<String>::new());
}

/// Defect 6b: a long-term pin of a device-coherent page when no host frame is free (so the
/// page cannot move out first) returns an error and leaves the page mapped and unlocked: a
/// CPU read then returns its bytes.
#[test]
fn d06b_a_longterm_pin_with_no_free_host_frame_leaves_the_page_usable() {
    let g = gpu(MemoryKind::DeviceCoherent, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 2);
    let data = pattern(2, 12);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 2).unwrap().migrated, 2);
    let pfn = g.space.pte(a).pfn().unwrap();
    assert_eq!(g.pm.page(pfn).unwrap().kind(), MemoryKind::DeviceCoherent);
    let hoard = g.pool.alloc_batch(g.pool.available(), false).unwrap();
    let s = g.space.clone();
    let pin = spawn_watched(move || pin_pages_longterm(&s, a, 1, false));
    let r = match pin.wait(WATCHDOG) {
        Ok(r) => r,
        Err(stuck) => {
            g.pool.free_batch(&hoard).unwrap();
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a long-term pin with no free host frame did not return within {WATCHDOG:?}");
        }
    };
    assert!(
        r.is_err(),
        "a long-term pin of a coherent page succeeded with no free host frame"
    );
    let pte = g.space.pte(a);
    assert!(
        matches!(pte, Pte::Present { pfn: p, .. } if p == pfn),
        "the coherent page must stay mapped where it was: {pte:?}"
    );
    assert!(
        !g.pm.page(pfn).unwrap().test(flags::LOCKED),
        "the coherent page was left LOCKED"
    );
    let s = g.space.clone();
    let got = watchdog("d06b: a read after the failed pin", move || {
        read(&s, a, 2 * 4096)
    });
    assert_eq!(differences(&got, &data), Vec::<String>::new());
    g.pool.free_batch(&hoard).unwrap();
}

/// Defect 7: a `Migration<Copied>` dropped without finalize, whose range has a hole that got
/// a destination: afterwards no page of the range is locked, no migration entry is left, a
/// CPU read of the hole returns zeros (within the watchdog) and the other pages their bytes.
#[test]
fn d07_a_dropped_copied_migration_unlocks_its_holes() {
    watchdog("d07", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 4);
        let data = pattern(2, 13);
        space.write(a, &data).unwrap(); // pages 2, 3 stay holes
        let mut m = Migration::setup(
            space,
            a,
            a + 4 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            dev.owner(),
            None,
        )
        .unwrap();
        assert_eq!(m.cpages(), 4);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        let copied = m.copied().unwrap();
        drop(copied); // an early return: never finalized
        let bad = unsettled(space, pm, a, 4);
        assert!(bad.is_empty(), "after dropping a copied migration: {bad:?}");
        let s = space.clone();
        let hole = watchdog("d07: a CPU read of the hole", move || {
            read(&s, a + 2 * PAGE, 2 * 4096)
        });
        assert!(hole.iter().all(|&b| b == 0), "the holes must read as zeros");
        assert_eq!(
            differences(&read(space, a, 2 * 4096), &data),
            Vec::<String>::new()
        );
        space.munmap(a, 4 * PAGE).unwrap();
        assert_eq!(dev.device().pages_in_use(), 0, "device pages leaked");
    });
}

/// Defect 8a: every `invalidate` made by a migration of one range is matched by an
/// `invalidate_end` of the same range by the time the migration returns: through the
/// typestate wrapper (finished, dropped after setup, dropped after the pages stage) and
/// through `migrate_vma_*`, each over a range with a hole.
#[test]
fn d08a_every_invalidation_of_a_vma_migration_ends() {
    watchdog("d08a", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let setup = |a: VirtAddr| {
            Migration::setup(
                space,
                a,
                a + 4 * PAGE,
                MIGRATE_VMA_SELECT_SYSTEM,
                dev.owner(),
                None,
            )
            .unwrap()
        };
        let mut bad = Vec::new();
        // Each case gets its own range: pages 0..3 written, page 3 a hole.
        let fresh = || {
            let a = map(space, 4);
            space.write(a, &pattern(3, 14)).unwrap();
            rec.take();
            a
        };

        let a = fresh();
        let mut m = setup(a);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        assert_eq!(m.copied().unwrap().finalize().migrated, 4);
        bad.extend(unpaired("Migration finalized", &rec.take()));

        let a = fresh();
        drop(setup(a));
        bad.extend(unpaired("Migration dropped after setup", &rec.take()));

        let a = fresh();
        let mut m = setup(a);
        let src = m.src().to_vec();
        fill_dst(&src, m.dst_mut(), dev.device(), pm);
        drop(m.copied().unwrap());
        bad.extend(unpaired("Migration dropped after copied", &rec.take()));

        let a = fresh();
        let mut src = vec![0u64; 4];
        let mut dst = vec![0u64; 4];
        let mut m = MigrateVma::new(space, a, a + 4 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        bad.extend(unpaired("migrate_vma_setup/pages/finalize", &rec.take()));

        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// Defect 8b: every `invalidate` made by `migrate_device_range` / `migrate_device_pages` /
/// `migrate_device_finalize` is matched by an `invalidate_end` of the same range by the time
/// finalize returns, whether the pages moved (eviction) or not (no destinations).
#[test]
fn d08b_every_invalidation_of_a_device_migration_ends() {
    watchdog("d08b", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let a = map(space, 4);
        let data = pattern(4, 15);
        space.write(a, &data).unwrap();
        let mut bad = Vec::new();

        assert_eq!(dev.migrate_to_device(space, a, 4).unwrap().migrated, 4);
        rec.take();
        assert_eq!(dev.evict_all().unwrap(), 4);
        bad.extend(unpaired(
            "migrate_device_range/pages/finalize (eviction)",
            &rec.take(),
        ));

        assert_eq!(dev.migrate_to_device(space, a, 4).unwrap().migrated, 4);
        rec.take();
        let range = dev.pgmap.range;
        let n = range.count as usize;
        let mut src = vec![0u64; n];
        assert_eq!(
            migrate_device_range(pm, &mut src, range.start, n).unwrap(),
            4
        );
        let mut dst = vec![0u64; n];
        migrate_device_pages(pm, &mut src, &dst).unwrap();
        migrate_device_finalize(pm, &mut src, &mut dst);
        bad.extend(unpaired(
            "migrate_device_range/pages/finalize with no destinations",
            &rec.take(),
        ));

        let s = space.clone();
        let got = watchdog("d08b: a read after the device migrations", move || {
            read(&s, a, 4 * 4096)
        });
        assert_eq!(differences(&got, &data), Vec::<String>::new());
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// A notifier whose `invalidate` (of a migration) checks that no page-table leaf lock is
/// held: it has another thread read a page in the same 2 MiB leaf (outside the range) and
/// waits for it; if the read cannot finish in 2 s, the leaf's lock was held.
struct LeafProbe {
    space: Mutex<Option<AddressSpace>>,
    probe: VirtAddr,
    armed: AtomicBool,
    failures: Mutex<Vec<String>>,
}

impl Notifier for LeafProbe {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        if r.event != NotifyEvent::Migrate || !self.armed.load(Ordering::Acquire) {
            return;
        }
        let Some(space) = self.space.lock().clone() else {
            return;
        };
        let probe = self.probe;
        let reader = spawn_watched(move || {
            let mut b = [0u8; 1];
            space.read(probe, &mut b).map(|()| b[0])
        });
        if reader.wait(Duration::from_secs(2)).is_err() {
            self.failures.lock().push(format!(
                "invalidate of {:#x}..{:#x} ran with the leaf lock held: a read of {probe:#x} \
                 in the same leaf waited 2 s",
                r.start, r.end
            ));
            // One failure per operation is enough.
            self.armed.store(false, Ordering::Release);
        }
    }
}

/// Defect 8c: `invalidate` is never called under a page-table leaf lock (it may sleep):
/// while it runs, a CPU read of another page of the same leaf proceeds. Checked for
/// `migrate_vma_setup` (through a migration to the device), for the insertion of a hole's
/// page by `migrate_vma_pages`, and for `migrate_device_range` (through eviction).
#[test]
fn d08c_invalidate_runs_without_the_leaf_lock() {
    watchdog_for("d08c", Duration::from_secs(20), || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        // One 2 MiB leaf: the migrated ranges and, in a mapping of its own, the probe page.
        let base = VirtAddr(0x2000_0000_0000);
        let (a, h, probe) = (base, base + 16 * PAGE, base + 256 * PAGE);
        for (at, pages) in [(a, 8), (h, 4), (probe, 1)] {
            space.mmap(Some(at), pages * PAGE, Prot::RW, false).unwrap();
        }
        space.write(a, &pattern(8, 16)).unwrap();
        space.write(h, &pattern(2, 17)).unwrap(); // pages 2, 3 of h stay holes
        space.write(probe, &[0x5a]).unwrap();
        let n = Arc::new(LeafProbe {
            space: Mutex::new(Some(space.clone())),
            probe,
            armed: AtomicBool::new(false),
            failures: Mutex::new(Vec::new()),
        });
        space.register_notifier(n.clone());

        n.armed.store(true, Ordering::Release);
        assert_eq!(dev.migrate_to_device(space, a, 8).unwrap().migrated, 8);
        n.armed.store(false, Ordering::Release);

        let mut src = vec![0u64; 4];
        let mut dst = vec![0u64; 4];
        let mut m = MigrateVma::new(space, h, h + 4 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        n.armed.store(true, Ordering::Release);
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        n.armed.store(false, Ordering::Release);

        n.armed.store(true, Ordering::Release);
        dev.evict_all().unwrap();
        n.armed.store(false, Ordering::Release);

        // The notifier holds the space: let it go.
        *n.space.lock() = None;
        let failures = n.failures.lock().clone();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Defect 9: `GpuDriver::migrate_to_device` of more than `CHUNK_PAGES` pages whose copies
/// fail (injected): whatever it returns, no page of the range is left locked, no migration
/// entry is left, and every page reads back its bytes.
#[test]
fn d09_a_failed_chunk_strands_no_page() {
    watchdog_for("d09", Duration::from_secs(30), || {
        let n = CHUNK_PAGES + 64;
        let g = gpu(MemoryKind::DevicePrivate, n, 16, 256 << 20);
        let mut keep = KeepOnPanic::default();
        g.keep(&mut keep);
        let (pm, d, space) = (&g.pm, &g.d, &g.space);
        let a = map(space, n as u64);
        for p in 0..n as u64 {
            space
                .write(a + p * PAGE, &(p as u32 + 1).to_le_bytes())
                .unwrap();
        }
        let device = d.device();
        let r = device.pfn_range();
        let mut bad = Vec::new();
        for (what, fail) in [
            ("the first chunk", 0..CHUNK_PAGES as u64),
            ("the second chunk", CHUNK_PAGES as u64..r.count),
            ("every chunk", 0..r.count),
        ] {
            let pfns: Vec<Pfn> = fail.map(|i| r.start.add(i)).collect();
            device.inject_copy_failures(&pfns);
            let moved = d.migrate_to_device(space, a, n);
            device.inject_copy_failures(&[]);
            assert!(
                !matches!(moved, Ok(m) if m.migrated == n),
                "copies of {what} failing: the injected failures did not bite"
            );
            let problems = unsettled(space, pm, a, n);
            if !problems.is_empty() {
                bad.push(format!(
                    "copies of {what} failing ({moved:?}): {} problems, first {:?}",
                    problems.len(),
                    &problems[..problems.len().min(4)]
                ));
                continue;
            }
            for p in 0..n as u64 {
                let got = read(space, a + p * PAGE, 4);
                if got != (p as u32 + 1).to_le_bytes() {
                    bad.push(format!("copies of {what} failing: page {p} reads {got:?}"));
                    break;
                }
            }
            d.migrate_to_host(space, a, n).unwrap();
            if d.resident_pages() != 0 {
                bad.push(format!(
                    "copies of {what} failing: {} device pages still in use with the range back on the host",
                    d.resident_pages()
                ));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    });
}

/// Defect 9, the mechanism: a migration dropped with its copy in flight (what a driver's
/// early return does to a chunk it holds) waits for the copy, then restores every page: no
/// page locked, no migration entry, the bytes in place, the destinations freed; the same for
/// a device migration (eviction) dropped mid-copy. The space's mappings can change again
/// once it is dropped.
#[test]
fn d09b_a_migration_dropped_mid_copy_restores_every_page() {
    watchdog_for("d09b", WATCHDOG, || {
        let env = mirror(MemoryKind::DevicePrivate);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 24usize;
        let a = map(space, n as u64);
        let data = pattern(n, 29);
        // Pages 0..20 written, the last 4 holes.
        space.write(a, &data[..20 * 4096]).unwrap();
        let in_use = dev.device().pages_in_use();
        let mut m = Migration::setup(
            space,
            a,
            a + n as u64 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            dev.owner(),
            None,
        )
        .unwrap();
        assert_eq!(m.cpages(), n);
        let idx: Vec<usize> = m.collected().map(|(i, _)| i).collect();
        let pfns = dev.device().alloc_pages(idx.len(), true).unwrap();
        for (&i, &d) in idx.iter().zip(&pfns) {
            pm.claim_device_page(d, true).unwrap().into_pfn();
            m.dst_mut()[i] = migrate_pfn(d);
        }
        let device = dev.device().clone();
        let inflight = m.submit(|pairs| device.copy_queued(pairs));
        drop(inflight);
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "a migration dropped mid-copy: {bad:?}");
        let mut want = data.clone();
        want[20 * 4096..].fill(0);
        let diff = differences(&read(space, a, n * 4096), &want);
        assert!(diff.is_empty(), "bytes differ: {diff:?}");
        assert_eq!(dev.device().pages_in_use(), in_use, "destinations freed");
        for i in 0..n as u64 {
            assert!(
                !matches!(space.pte(a + i * PAGE), Pte::DevicePrivate { .. }),
                "page {i} stayed on the host"
            );
        }

        // Now on the device, and an eviction dropped mid-copy.
        assert_eq!(dev.migrate_to_device(space, a, n).unwrap().migrated, n);
        let range = dev.pgmap.range;
        let mut m = DeviceMigration::range(pm, range.start, range.count as usize).unwrap();
        let idx: Vec<usize> = m.collected().map(|(i, _)| i).collect();
        assert_eq!(idx.len(), n, "every device page collected");
        for &i in &idx {
            let host = pm.alloc_page(false, true).unwrap();
            m.dst_mut()[i] = migrate_pfn(host.into_pfn());
        }
        let inflight = m.submit(|pairs| device.copy(pairs));
        drop(inflight);
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "an eviction dropped mid-copy: {bad:?}");
        for i in 0..n as u64 {
            assert!(
                matches!(space.pte(a + i * PAGE), Pte::DevicePrivate { .. }),
                "page {i} stayed on the device"
            );
        }
        let diff = differences(&read(space, a, n * 4096), &want);
        assert!(diff.is_empty(), "bytes differ after the eviction: {diff:?}");
        space.munmap(a, n as u64 * PAGE).unwrap();
        assert_eq!(dev.device().pages_in_use(), in_use);
    });
}

/// Defect 10a: three threads read one device-private page (GpuDriver) at once: all return
/// its bytes within the watchdog, after a few faults (today each fault sees the others'
/// references, restores the page and retries: hundreds of thousands of faults until the
/// scheduler happens to break the livelock, or forever). To have them at once every time,
/// the test holds the page's lock while the readers start, and lets it go once all three
/// wait for it (or after 200 ms, if they wait some other way).
#[test]
fn d10a_three_readers_of_one_device_page_all_return() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let Gpu { d, space, pm, .. } = g;
    let mut keep = KeepOnPanic::default();
    keep.keep(pm.clone());
    keep.keep(space.clone());
    let a = map(&space, 1);
    let data = pattern(1, 18);
    space.write(a, &data).unwrap();
    for round in 0..3 {
        assert_eq!(d.migrate_to_device(&space, a, 1).unwrap().migrated, 1);
        let faults = d.stats().faults;
        let page = pm.page(space.pte(a).pfn().unwrap()).unwrap();
        let locked = pm.lock_page(page.pfn()).unwrap();
        let refs = page.refcount();
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let s = space.clone();
                spawn_watched(move || {
                    let mut v = vec![0u8; 4096];
                    s.read(a, &mut v).map(|()| v)
                })
            })
            .collect();
        let waiting = Instant::now() + Duration::from_millis(200);
        while page.refcount() < refs + 3 && Instant::now() < waiting {
            thread::sleep(Duration::from_millis(1));
        }
        drop(locked);
        let deadline = Instant::now() + WATCHDOG;
        let mut results = Vec::new();
        let mut stuck = Vec::new();
        for r in readers {
            match r.wait(deadline.saturating_duration_since(Instant::now())) {
                Ok(v) => results.push(v),
                Err(w) => stuck.push(w),
            }
        }
        if !stuck.is_empty() {
            // With the driver gone their faults fail, and the stuck readers stop spinning.
            drop(d);
            for w in stuck.drain(..) {
                let _ = w.wait(Duration::from_secs(5));
            }
            panic!(
                "round {round}: 3 readers of one device page, {} of them still faulting after {WATCHDOG:?} (livelock)",
                3 - results.len()
            );
        }
        for r in results {
            let v = r.unwrap_or_else(|e| panic!("round {round}: a reader failed: {e}"));
            assert_eq!(
                differences(&v, &data),
                Vec::<String>::new(),
                "round {round}"
            );
        }
        // Three reads need a few faults, not a livelock that happens to end.
        let faults = d.stats().faults - faults;
        assert!(
            faults <= 30,
            "round {round}: 3 reads of one device page took {faults} faults (a livelock until the scheduler broke it)"
        );
    }
}

/// Defect 10b: a CPU read of a device-private page whose copy back to host fails
/// (injected) returns an error within the watchdog instead of retrying forever; once copies
/// work again, it returns the page's bytes.
#[test]
fn d10b_a_fault_whose_copy_fails_returns_an_error() {
    let g = gpu(MemoryKind::DevicePrivate, 64, 16, SMALL_POOL);
    let mut keep = KeepOnPanic::default();
    g.keep(&mut keep);
    let a = map(&g.space, 1);
    let data = pattern(1, 19);
    g.space.write(a, &data).unwrap();
    assert_eq!(g.d.migrate_to_device(&g.space, a, 1).unwrap().migrated, 1);
    let device = g.d.device().clone();
    device.inject_copy_failures(&all_frames(&g.pool));
    let s = g.space.clone();
    let reader = spawn_watched(move || {
        let mut v = vec![0u8; 16];
        s.read(a, &mut v).map(|()| v)
    });
    let r = reader.wait(WATCHDOG);
    device.inject_copy_failures(&[]);
    let r = match r {
        Ok(r) => r,
        Err(stuck) => {
            let _ = stuck.wait(Duration::from_secs(5));
            panic!("a CPU read whose copy back fails did not return within {WATCHDOG:?}: it retries forever");
        }
    };
    assert!(r.is_err(), "a read whose copy back failed returned {r:?}");
    let s = g.space.clone();
    let got = watchdog("d10b: a read once copies work", move || read(&s, a, 4096));
    assert_eq!(differences(&got, &data), Vec::<String>::new());
}

/// Defect 11: `mmap(None, ..)` in a space forked from one with a mapping made by
/// `mmap(None, ..)` succeeds, at a range that does not overlap the inherited mapping.
#[test]
fn d11_mmap_anywhere_in_a_forked_space() {
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let pm = PageMap::new(pool).unwrap();
    let space = AddressSpace::new(&pm);
    let a = map(&space, 4);
    space.write(a, b"parent").unwrap();
    let child = space.fork().unwrap();
    let c = child
        .mmap(None, 4 * PAGE, Prot::RW, false)
        .expect("mmap(None) in a forked space");
    assert!(
        c + 4 * PAGE <= a || a + 4 * PAGE <= c,
        "the new mapping {c:#x} overlaps the inherited one at {a:#x}"
    );
    assert_eq!(read(&child, a, 6), b"parent");
    child.write(c, b"child").unwrap();
    assert_eq!(read(&child, c, 5), b"child");
}
