//! The soak: threads doing random operations on one address space through the mm and
//! migration API and `GpuDriver` at once (CPU reads and writes, migrations both ways,
//! evictions, mprotect, mremap, munmap, fork, pins, mirror reads through `hmm_range_fault`),
//! with failed copies and host-frame exhaustion injected, checked against a shadow model.
//!
//! Each thread owns a region of the space outright and knows its bytes exactly: after every
//! operation, and after every error, what the thread reads back must be what it wrote (an
//! error must have restored every page). Migrations, evictions and forks reach into the
//! other threads' regions too (evictions take any device page; a fork copies the whole
//! space), which is what makes it a soak rather than N separate tests. At the end every byte
//! is checked again, no page may be left locked or behind a migration entry, and once the
//! space is dropped no device page and no host frame (but the zero page) may be in use.
//!
//! A watchdog fails the run, naming each thread's operation, when a thread makes no progress
//! for `stuck_after`; a panic in any thread fails it with its message.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::migration::pin_pages_longterm;
use hetmem::mm::{
    flags, hmm_range_fault, pin_pages, AddressSpace, MemoryKind, PageMap, Prot, Pte, PAGE,
};
use hetmem::{Error, ErrorKind, VirtAddr};
use hetmem_engine::{Device, DeviceConfig, DeviceKind, HostFramePool, Pfn};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to soak.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// The device.
    pub device: DeviceKind,
    /// Device memory as private or coherent pages.
    pub memory: MemoryKind,
    /// Worker threads.
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Stop after this many operations in all (whichever comes first).
    pub max_ops: u64,
    /// Seed of the first thread (thread `k` uses `seed + k`).
    pub seed: u64,
    /// Pages each thread owns.
    pub pages_per_thread: usize,
    /// Device budget in pages (small: evictions all the time).
    pub budget_pages: usize,
    /// Host frames available beyond what the regions need (small: exhaustion).
    pub spare_host_frames: usize,
    /// Chance per operation that the device's next copies of some pages fail.
    pub copy_failure_rate: f64,
    /// A thread without progress for this long fails the run.
    pub stuck_after: Duration,
}

impl Default for SoakConfig {
    fn default() -> Self {
        SoakConfig {
            device: DeviceKind::Host,
            memory: MemoryKind::DevicePrivate,
            threads: 8,
            duration: Duration::from_secs(10),
            max_ops: u64::MAX,
            seed: 1,
            pages_per_thread: 16,
            budget_pages: 24,
            spare_host_frames: 24,
            copy_failure_rate: 0.02,
            stuck_after: Duration::from_secs(30),
        }
    }
}

/// What a soak did.
#[derive(Clone, Debug, Default)]
pub struct SoakReport {
    /// Operations completed (successfully or with an accepted error), all threads.
    pub ops: u64,
    /// Operations that ended in an accepted error (out of memory, busy, a failed copy).
    pub errors: u64,
    /// Times copy failures were injected.
    pub injected: u64,
    /// Wall time of the run.
    pub wall: Duration,
    /// Pages faulted back by the driver.
    pub faults: u64,
    /// Pages evicted by the driver.
    pub evictions: u64,
}

/// The operations, by name (for the watchdog's report).
const OPS: [&str; 12] = [
    "cpu write",
    "cpu read",
    "to device",
    "to host",
    "evict",
    "mprotect",
    "mremap",
    "munmap",
    "fork",
    "pin",
    "mirror read",
    "inject copy failures",
];

/// What every thread shares.
struct World {
    space: AddressSpace,
    pm: Arc<PageMap>,
    driver: GpuDriver,
    device: Device,
    stop: AtomicBool,
    ops: AtomicU64,
    errors: AtomicU64,
    injected: AtomicU64,
    max_ops: u64,
    copy_failure_rate: f64,
    /// Per thread: the operation it is in and when it started it.
    doing: Vec<Mutex<(usize, Instant)>>,
}

/// One thread's region: where it is now, and the byte each page holds.
struct Region {
    addr: VirtAddr,
    bytes: Vec<u8>,
    /// Read-only right now (after an mprotect, until the next one).
    read_only: bool,
}

/// Runs a soak; `Err` describes the first failure (a wrong byte, a page left locked, a leak,
/// an unexpected error, a panic or a stuck thread).
/// Long: sets up the world, starts the workers and the watchdog, and checks every invariant at
/// the end, in that order; the parts share the world and the workers' handles.
pub fn run(config: &SoakConfig) -> Result<SoakReport, String> {
    let n = config.pages_per_thread;
    let frames = config.threads * n + config.spare_host_frames + 32;
    let pool = HostFramePool::new(frames * 4096).map_err(|e| format!("frame pool: {e}"))?;
    let mut dc = DeviceConfig::default()
        .kind(config.device)
        .budget((config.budget_pages.max(n) * 4096) as u64)
        .chunk(1 << 20);
    dc.frames = Some(pool.clone());
    let device = Device::open(dc).map_err(|e| format!("opening {:?}: {e}", config.device))?;
    let pm = PageMap::new(pool.clone()).map_err(|e| e.to_string())?;
    let frames_at_start = pool.in_use();
    let driver = GpuDriver::new(
        device.clone(),
        &pm,
        DriverConfig {
            kind: Some(config.memory),
            fault_around: 4,
            budget_pages: Some(config.budget_pages.max(n)),
        },
    )
    .map_err(|e| e.to_string())?;
    let space = AddressSpace::new(&pm);
    let world = Arc::new(World {
        space,
        pm,
        driver,
        device,
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        injected: AtomicU64::new(0),
        max_ops: config.max_ops,
        copy_failure_rate: config.copy_failure_rate,
        doing: (0..config.threads)
            .map(|_| Mutex::new((0, Instant::now())))
            .collect(),
    });
    let t0 = Instant::now();
    let workers: Vec<_> = (0..config.threads)
        .map(|k| {
            let w = world.clone();
            let seed = config.seed.wrapping_add(k as u64);
            std::thread::Builder::new()
                .name(format!("soak-{k}"))
                .spawn(move || worker(&w, k, seed, n))
                .expect("spawn")
        })
        .collect();
    // The watchdog: the run's deadline, and threads that stop making progress.
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if t0.elapsed() >= config.duration || world.ops.load(Ordering::Relaxed) >= config.max_ops {
            world.stop.store(true, Ordering::Relaxed);
        }
        if workers.iter().all(|h| h.is_finished()) {
            break;
        }
        let stuck: Vec<String> = world
            .doing
            .iter()
            .enumerate()
            .filter_map(|(k, d)| {
                let (op, since) = *d.lock().unwrap();
                let h = &workers[k];
                (!h.is_finished() && since.elapsed() > config.stuck_after)
                    .then(|| format!("thread {k}: {} for {:?}", OPS[op], since.elapsed()))
            })
            .collect();
        if !stuck.is_empty() {
            let all: Vec<String> = world
                .doing
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    let (op, since) = *d.lock().unwrap();
                    format!("thread {k}: {} ({:?})", OPS[op], since.elapsed())
                })
                .collect();
            return Err(format!(
                "stuck: {}\nevery thread: {}\n{}",
                stuck.join("; "),
                all.join("; "),
                hetmem::mm::locks::report()
            ));
        }
    }
    let regions = join_workers(workers)?;
    let wall = t0.elapsed();
    world.device.inject_copy_failures(&[]);
    // Every byte, every entry settled.
    for (k, r) in regions.iter().enumerate() {
        check_region(&world, r).map_err(|e| format!("at the end, thread {k}: {e}"))?;
        for p in 0..n as u64 {
            let pte = world.space.pte(r.addr + p * PAGE);
            if matches!(pte, Pte::Migration { .. }) {
                return Err(format!("thread {k} page {p}: a migration entry is left"));
            }
            if let Some(page) = pte.pfn().and_then(|pfn| world.pm.page(pfn)) {
                if page.test(flags::LOCKED) {
                    return Err(format!("thread {k} page {p}: left locked"));
                }
            }
        }
    }
    let stats = world.driver.stats();
    let report = SoakReport {
        ops: world.ops.load(Ordering::Relaxed),
        errors: world.errors.load(Ordering::Relaxed),
        injected: world.injected.load(Ordering::Relaxed),
        wall,
        faults: stats.faults,
        evictions: stats.evictions,
    };
    // Nothing leaked: drop everything and count.
    let device = world.device.clone();
    drop(regions);
    drop(
        Arc::try_unwrap(world)
            .map_err(|_| "the world is still shared after the threads ended".to_string())?,
    );
    if device.pages_in_use() != 0 {
        return Err(format!(
            "{} device pages in use after teardown",
            device.pages_in_use()
        ));
    }
    if pool.in_use() > frames_at_start {
        return Err(format!(
            "{} host frames in use after teardown, {frames_at_start} before",
            pool.in_use()
        ));
    }
    Ok(report)
}

/// Joins the soak's workers and returns what each handed back, in order; fails with the
/// first thread's error or panic.
pub(crate) fn join_workers<T>(
    workers: Vec<std::thread::JoinHandle<Result<T, String>>>,
) -> Result<Vec<T>, String> {
    let mut failure = None;
    let mut out = Vec::with_capacity(workers.len());
    for (k, h) in workers.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(r)) => out.push(r),
            Ok(Err(e)) => {
                failure.get_or_insert(format!("thread {k}: {e}"));
            }
            Err(p) => {
                failure.get_or_insert(format!("thread {k} panicked: {}", panic_message(&*p)));
            }
        }
    }
    match failure {
        Some(f) => Err(f),
        None => Ok(out),
    }
}

/// The message a thread panicked with (a `String` or a `&str` payload; empty otherwise).
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Errors an operation may end in under the soak's pressure: the operation did nothing, and
/// the thread's bytes must be intact.
fn accepted(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::OutOfMemory | ErrorKind::Transient | ErrorKind::DeviceLost
    )
}

fn check_region(w: &World, r: &Region) -> Result<(), String> {
    let mut got = vec![0u8; r.bytes.len() * 4096];
    let mut tries = 0;
    loop {
        match w.space.read(r.addr, &mut got) {
            Ok(()) => break,
            // A read may itself meet exhaustion or a failed copy: try again.
            Err(e) if accepted(&e) && tries < 100 => {
                tries += 1;
                w.device.inject_copy_failures(&[]);
                std::thread::yield_now();
            }
            Err(e) => return Err(format!("reading its region: {e}")),
        }
    }
    for (p, &b) in r.bytes.iter().enumerate() {
        if let Some(i) = got[p * 4096..(p + 1) * 4096].iter().position(|&x| x != b) {
            return Err(format!(
                "page {p} byte {i} reads {:#x}, {b:#x} was written",
                got[p * 4096 + i]
            ));
        }
    }
    Ok(())
}

fn worker(w: &World, me: usize, seed: u64, n: usize) -> Result<Region, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let len = n as u64 * PAGE;
    let addr = w
        .space
        .mmap(None, len, Prot::RW, false)
        .map_err(|e| format!("mmap: {e}"))?;
    let mut r = Region {
        addr,
        bytes: vec![0; n],
        read_only: false,
    };
    while !w.stop.load(Ordering::Relaxed) && w.ops.load(Ordering::Relaxed) < w.max_ops {
        let op = if rng.random_bool(w.copy_failure_rate) {
            11
        } else {
            rng.random_range(0..11)
        };
        *w.doing[me].lock().unwrap() = (op, Instant::now());
        let result = step(w, &mut r, op, &mut rng, n);
        w.ops.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {}
            Err(e) if accepted(&e) => {
                w.errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(format!("{}: unexpected error {e:?}", OPS[op])),
        }
        // Whatever happened, the region holds what the thread wrote.
        if op != 1 && rng.random_bool(0.25) {
            check_region(w, &r).map_err(|e| format!("after {}: {e}", OPS[op]))?;
        }
    }
    if r.read_only {
        w.space
            .mprotect(r.addr, len, Prot::RW)
            .map_err(|e| format!("mprotect back: {e}"))?;
        r.read_only = false;
    }
    Ok(r)
}

/// Long: one match arm per operation; the arms share the world and the shadow model, and a
/// function per arm would only move the match.
fn step(w: &World, r: &mut Region, op: usize, rng: &mut StdRng, n: usize) -> hetmem::Result<()> {
    let len = n as u64 * PAGE;
    let page = rng.random_range(0..n);
    let at = r.addr + page as u64 * PAGE;
    match op {
        0 => {
            let v: u8 = rng.random();
            match w.space.write(at, &[v; 4096]) {
                Ok(()) => {
                    assert!(!r.read_only, "a write to a read-only page succeeded");
                    r.bytes[page] = v;
                }
                Err(Error::WriteDenied(_)) if r.read_only => {}
                Err(e) => return Err(e),
            }
        }
        1 => {
            let mut b = [0u8; 64];
            w.space.read(at + 64, &mut b)?;
            assert!(
                b.iter().all(|&x| x == r.bytes[page]),
                "page {page} reads {:#x}, {:#x} was written",
                b[0],
                r.bytes[page]
            );
        }
        2 => {
            let k = rng.random_range(1..=n - page);
            w.driver.migrate_to_device(&w.space, at, k)?;
        }
        3 => {
            let k = rng.random_range(1..=n - page);
            w.driver.migrate_to_host(&w.space, at, k)?;
        }
        4 => {
            w.driver.evict(rng.random_range(1..8))?;
        }
        5 => {
            let prot = if r.read_only { Prot::RW } else { Prot::READ };
            w.space.mprotect(r.addr, len, prot)?;
            r.read_only = !r.read_only;
        }
        6 => {
            // Somewhere new, then the region lives there.
            let to = w.space.mmap(None, len, Prot::RW, false)?;
            w.space.munmap(to, len)?;
            match w.space.mremap(r.addr, len, to) {
                Ok(()) => r.addr = to,
                // Another thread mapped the hole meanwhile.
                Err(Error::AlreadyMapped(_)) => {}
                Err(e) => return Err(e),
            }
        }
        7 => {
            if !r.read_only {
                w.space.munmap(at, PAGE)?;
                w.space.mmap(Some(at), PAGE, Prot::RW, false)?;
                r.bytes[page] = 0;
            }
        }
        8 => {
            let child = w.space.fork()?;
            let mut b = [0u8; 16];
            child.read(at, &mut b)?;
            assert!(
                b.iter().all(|&x| x == r.bytes[page]),
                "the child's page {page} reads {:#x}, {:#x} was written",
                b[0],
                r.bytes[page]
            );
            if !r.read_only {
                // The child's write stays in the child.
                child.write(at, &[!r.bytes[page]; 16])?;
            }
        }
        9 => {
            // A long-term pin moves a device-coherent page to host first.
            let pin = if rng.random_bool(0.5) {
                pin_pages_longterm(&w.space, at, 1, false)?
            } else {
                pin_pages(&w.space, at, 1, false, false)?
            };
            let mut b = [0u8; 8];
            w.pm.read_frame(pin.pfns()[0], 0, &mut b)?;
            assert!(
                b.iter().all(|&x| x == r.bytes[page]),
                "pinned page {page} holds {:#x}, {:#x} was written",
                b[0],
                r.bytes[page]
            );
        }
        10 => {
            // A mirror read, validated by the interval sequence.
            for _ in 0..100 {
                let seq = w.space.read_begin();
                let pfns = hmm_range_fault(&w.space, at, 1, false, w.driver.owner())?;
                let pfn = pfns[0].pfn;
                let mut b = [0u8; 8];
                let read = if w.device.owns(pfn) {
                    w.device.read_page(pfn, 0, &mut b).map_err(Error::from)
                } else {
                    w.pm.read_frame(pfn, 0, &mut b)
                };
                if w.space.read_retry(seq) {
                    continue;
                }
                read?;
                assert!(
                    b.iter().all(|&x| x == r.bytes[page]),
                    "mirror read of page {page}: {:#x}, {:#x} was written",
                    b[0],
                    r.bytes[page]
                );
                break;
            }
        }
        _ => {
            // Copies into a few device pages and host frames fail from now on (until a
            // thread clears them): migrations both ways, faults and evictions meet them.
            let dev = w.device.pfn_range();
            let host = w.pm.frames().pfn_range();
            let pfns: Vec<Pfn> = (0..4)
                .map(|k| {
                    let r = if k % 2 == 0 { dev } else { host };
                    r.start.add(rng.random_range(0..r.count))
                })
                .collect();
            w.device.inject_copy_failures(&pfns);
            w.injected.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}
