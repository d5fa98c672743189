//! The offload soak: threads doing random operations on managed buffers of one
//! `hetmem::offload::Context` under a small device budget, with faults injected (failed
//! copies, host frames run out, copy batches lost with the device mid-way: see `inject`),
//! checked against a shadow copy of every byte.
//!
//! Each thread owns its buffers outright (half of them CPU-mapped by `Context::alloc_mapped`
//! where userfaultfd can be had) and keeps their bytes in a shadow: `Buffer::write`/`read`,
//! plain loads and stores through the buffer's pointer, views, prefetches both ways,
//! evictions, advice, pins on the device, `free` and reallocation (a fresh buffer reads as
//! zeros), and WGSL kernel launches on Vulkan change or move them. After every operation,
//! and after every error the soak accepts (out of memory, a busy page, a failed copy, a lost
//! device), the
//! buffer the operation touched must read back as its shadow, which is checked without
//! moving a page (through `hmm_range_fault`, as a device mirror reads) or with
//! `Buffer::read`. Evictions by the driver (`evict(n)`, `evict_all`) reach every thread's
//! pages, and one shared buffer with a fixed pattern is moved around and read by all.
//!
//! At the end every byte is checked again, no page may be left locked or behind a migration
//! entry, and once every buffer is freed and the context dropped, the device and the host
//! frame pool must hold as many pages as before the context existed.
//!
//! A watchdog fails the run, naming each thread's operation, when a thread makes no progress
//! for `stuck_after`; a panic in any thread fails it with its message. (A thread's first
//! panic in a process with `RUST_BACKTRACE` set sits for a few hundred milliseconds in the
//! panic hook, symbolising its backtrace, before it unwinds: keep `stuck_after` above that.)

mod check;
mod inject;
mod ops;
mod sabotage;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmem::mm::MemoryKind;
use hetmem::offload::{Buffer, Context, ContextConfig};
use hetmem::{Error, ErrorKind};
use hetmem_engine::{Device, DeviceConfig, DeviceKind, HostFramePool, Kernel};

use crate::harness::pattern;
use crate::soak::join_workers;
use check::{check_peek, check_read, finish, first_difference};

/// How to soak the offload API.
#[derive(Clone, Debug)]
pub struct OffloadSoakConfig {
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
    /// Buffers each thread owns (every other one CPU-mapped where pointers work).
    pub buffers_per_thread: usize,
    /// Pages of each buffer (at most the budget).
    pub pages_per_buffer: usize,
    /// Pages of the buffer every thread shares.
    pub shared_pages: usize,
    /// Device budget in pages (small: evictions all the time).
    pub budget_pages: usize,
    /// Host frames beyond what the buffers need.
    pub spare_host_frames: usize,
    /// Chance per operation that the device's next copies into some pages fail.
    pub copy_failure_rate: f64,
    /// Chance per operation that the thread takes every free host frame and holds them
    /// through its next operation: it, and whatever other threads do meanwhile, meet
    /// exhaustion (`ErrorKind::OutOfMemory`).
    pub host_exhaustion_rate: f64,
    /// Chance per operation that the next copy batch (of any thread) is lost mid-way, half
    /// copied, with `ErrorKind::DeviceLost` (the device keeps working afterwards).
    pub device_loss_rate: f64,
    /// A thread without progress for this long fails the run.
    pub stuck_after: Duration,
    /// Breaks the run on purpose, to show that its checks catch it (`None` for a real run).
    pub sabotage: Option<Sabotage>,
}

/// What a sabotaged run does wrong: thread 0, after its 50th operation, ...
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sabotage {
    /// ... changes a byte of the shared buffer behind the soak's back.
    CorruptByte,
    /// ... stays in an operation for three times `stuck_after`.
    Stall,
    /// ... panics.
    Panic,
    /// ... takes a host frame from the pool and never gives it back.
    LeakFrame,
    /// ... allocates a device page and never frees it.
    LeakDevicePage,
}

impl Default for OffloadSoakConfig {
    fn default() -> Self {
        OffloadSoakConfig {
            device: DeviceKind::Host,
            memory: MemoryKind::DevicePrivate,
            threads: 8,
            duration: Duration::from_secs(10),
            max_ops: u64::MAX,
            seed: 1,
            buffers_per_thread: 2,
            pages_per_buffer: 8,
            shared_pages: 8,
            budget_pages: 24,
            spare_host_frames: 64,
            copy_failure_rate: 0.02,
            host_exhaustion_rate: 0.0,
            device_loss_rate: 0.0,
            stuck_after: Duration::from_secs(30),
            sabotage: None,
        }
    }
}

/// What an offload soak did.
#[derive(Clone, Debug, Default)]
pub struct OffloadSoakReport {
    /// Operations completed (successfully or with an accepted error), all threads.
    pub ops: u64,
    /// Operations that ended in an accepted error (out of memory, busy, a failed copy).
    pub errors: u64,
    /// Accepted errors that were out of memory (device or host), the retries of the
    /// soak's own checks included.
    pub out_of_memory: u64,
    /// Accepted errors that were a lost device, the retries of checks included.
    pub device_lost: u64,
    /// The accepted errors by operation and error variant (`"kernel launch: BufferBusy"`).
    pub error_counts: std::collections::BTreeMap<String, u64>,
    /// Times copy failures were injected.
    pub injected: u64,
    /// Times a thread took every free host frame through one operation.
    pub exhaustions: u64,
    /// Times the loss of the next copy batch was armed.
    pub loss_injections: u64,
    /// Copy batches lost mid-way (armed losses that a batch met).
    pub lost_batches: u64,
    /// Kernel launches that ran (0 where the device runs no kernels).
    pub launches: u64,
    /// Loads, stores and views through CPU pointers.
    pub pointer_ops: u64,
    /// CPU faults through pointers that the context served.
    pub cpu_faults: u64,
    /// Why CPU pointers were not used (`None`: they were).
    pub pointers_unavailable: Option<String>,
    /// Why kernels were not launched (`None`: they were).
    pub kernels_unavailable: Option<String>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Pages faulted back by the driver.
    pub faults: u64,
    /// Pages evicted by the driver.
    pub evictions: u64,
}

/// What every thread shares.
struct World {
    ctx: Context,
    device: Device,
    pool: Arc<HostFramePool>,
    /// The kernel that adds `hm_arg(0)` to every word of a range (Vulkan only).
    kernel: Option<Kernel>,
    /// CPU pointers work here.
    pointers: bool,
    /// The buffer every thread moves and reads, and the bytes it always holds.
    shared: Buffer,
    shared_bytes: Vec<u8>,
    pages: usize,
    stop: AtomicBool,
    ops: AtomicU64,
    errors: AtomicU64,
    out_of_memory: AtomicU64,
    device_lost: AtomicU64,
    /// Host frames taken from the pool by an injected exhaustion, until given back.
    hogged: Mutex<Vec<hetmem_engine::Pfn>>,
    /// Failures of threads that ended with one (the watchdog's report names them).
    failed: Mutex<Vec<String>>,
    /// Threads retrying a check (see `retried`): no exhaustion starts meanwhile.
    holding_off: std::sync::atomic::AtomicUsize,
    error_counts: Mutex<std::collections::BTreeMap<String, u64>>,
    injected: AtomicU64,
    exhaustions: AtomicU64,
    loss_injections: AtomicU64,
    launches: AtomicU64,
    pointer_ops: AtomicU64,
    max_ops: u64,
    copy_failure_rate: f64,
    host_exhaustion_rate: f64,
    device_loss_rate: f64,
    sabotage: Option<Sabotage>,
    stuck_after: Duration,
    /// Per thread: what it is doing and since when.
    doing: Vec<Mutex<Doing>>,
}

/// A thread's current operation, for the watchdog.
#[derive(Clone, Copy)]
struct Doing {
    op: ops::Op,
    /// The buffer slot (or `usize::MAX` for the shared buffer / none).
    slot: usize,
    since: Instant,
}

/// One buffer a thread owns, and the bytes it must hold.
struct Owned {
    /// `None` between a `free` and a successful reallocation.
    buf: Option<Buffer>,
    shadow: Vec<u8>,
    /// Allocated by `alloc_mapped` (reached through pointers too).
    mapped: bool,
}

/// The kernel the soak launches: adds `hm_arg(0)` to each u32 word of bound buffer 0, which
/// spans `hm_arg(1)` pages.
const ADD: &str = r#"
@compute @workgroup_size(64)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lane: u32) {
    let i = hm_invocation(wg, nwg, lane, 64u);
    if (i >= hm_arg(1) * HM_PAGE_WORDS) {
        return;
    }
    let p = hm_ptr(0u, i * 4u);
    hm_store(p, hm_load(p) + hm_arg(0));
}
"#;

/// Runs an offload soak; `Err` describes the first failure (a wrong byte, a page left
/// locked, a leak, an unexpected error, a panic or a stuck thread).
/// Long: sets up the world, starts the workers and the watchdog, and checks every invariant at
/// the end, in that order; the parts share the world and the workers' handles.
pub fn run(config: &OffloadSoakConfig) -> Result<OffloadSoakReport, String> {
    let pages = config.pages_per_buffer.clamp(1, config.budget_pages.max(1));
    let budget = config.budget_pages.max(pages);
    let owned = config.threads * config.buffers_per_thread * pages;
    // Every buffer's pages (a mapped buffer's home run), the shared buffer, the context's
    // own few frames, and the spare: a page of a mapped buffer evicted by frame number
    // comes back to any frame, so with little spare the pool runs out now and then.
    let frames = owned + config.shared_pages + config.spare_host_frames + 32;
    let pool = HostFramePool::new(frames * 4096).map_err(|e| format!("frame pool: {e}"))?;
    let frames_at_start = pool.in_use();
    let mut device = DeviceConfig::default().kind(config.device).chunk(1 << 20);
    device.frames = Some(pool.clone());
    let ctx = Context::new(ContextConfig {
        device,
        budget_bytes: (budget * 4096) as u64,
        memory: Some(config.memory),
        fault_around: 4,
    })
    .map_err(|e| format!("opening {:?}: {e}", config.device))?;
    let dev = ctx.driver().device().clone();
    let pages_at_start = dev.pages_in_use();
    let (kernel, kernels_unavailable) = match ctx.kernel_support() {
        Ok(()) => (
            Some(
                ctx.compile_kernel(ADD, "add")
                    .map_err(|e| format!("compiling the soak's kernel: {e}"))?,
            ),
            None,
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    let pointers_unavailable = match ctx.cpu_pointers() {
        Ok(_) => None,
        Err(e) if crate::running_in_ci() && is_root() => {
            return Err(format!("CI=true as root and no CPU pointers: {e}"));
        }
        Err(e) => Some(e.to_string()),
    };
    let shared_bytes = pattern(config.shared_pages.max(1), 0x5C);
    let shared = ctx
        .alloc(shared_bytes.len())
        .map_err(|e| format!("shared buffer: {e}"))?;
    shared
        .write(0, &shared_bytes)
        .map_err(|e| format!("writing the shared buffer: {e}"))?;
    let world = Arc::new(World {
        ctx,
        device: dev.clone(),
        pool: pool.clone(),
        kernel,
        pointers: pointers_unavailable.is_none(),
        shared,
        shared_bytes,
        pages,
        stop: AtomicBool::new(false),
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        out_of_memory: AtomicU64::new(0),
        device_lost: AtomicU64::new(0),
        hogged: Mutex::default(),
        failed: Mutex::default(),
        holding_off: Default::default(),
        error_counts: Mutex::default(),
        injected: AtomicU64::new(0),
        exhaustions: AtomicU64::new(0),
        loss_injections: AtomicU64::new(0),
        launches: AtomicU64::new(0),
        pointer_ops: AtomicU64::new(0),
        max_ops: config.max_ops,
        copy_failure_rate: config.copy_failure_rate,
        host_exhaustion_rate: config.host_exhaustion_rate,
        device_loss_rate: config.device_loss_rate,
        sabotage: config.sabotage,
        stuck_after: config.stuck_after,
        doing: (0..config.threads)
            .map(|_| {
                Mutex::new(Doing {
                    op: ops::Op::Write,
                    slot: usize::MAX,
                    since: Instant::now(),
                })
            })
            .collect(),
    });
    let t0 = Instant::now();
    let workers: Vec<_> = (0..config.threads)
        .map(|k| {
            let w = world.clone();
            let seed = config.seed.wrapping_add(k as u64);
            let nbuf = config.buffers_per_thread.max(1);
            std::thread::Builder::new()
                .name(format!("soak-offload-{k}"))
                .spawn(move || {
                    let r = ops::worker(&w, k, seed, nbuf);
                    if let Err(e) = &r {
                        // The others stop too, and a watchdog report names the cause.
                        w.failed.lock().unwrap().push(format!("thread {k}: {e}"));
                        w.stop.store(true, Ordering::Relaxed);
                        let _ = inject::release_frames(&w);
                    }
                    r
                })
                .expect("spawn")
        })
        .collect();
    watch(&world, &workers, config, t0)?;
    let all = join_workers(workers)?;
    let wall = t0.elapsed();
    world.device.inject_copy_failures(&[]);
    world.device.inject_device_loss(0, true);
    let lost_batches = world.device.lost_batches();
    let device_lost = world.device_lost.load(Ordering::Relaxed);
    if device_lost > 0 && lost_batches == 0 {
        return Err(format!(
            "{device_lost} operations failed with a lost device, and no loss was injected"
        ));
    }
    finish(&world, &all)?;
    let stats = world.ctx.stats();
    let report = OffloadSoakReport {
        ops: world.ops.load(Ordering::Relaxed),
        errors: world.errors.load(Ordering::Relaxed),
        out_of_memory: world.out_of_memory.load(Ordering::Relaxed),
        device_lost,
        error_counts: world.error_counts.lock().unwrap().clone(),
        injected: world.injected.load(Ordering::Relaxed),
        exhaustions: world.exhaustions.load(Ordering::Relaxed),
        loss_injections: world.loss_injections.load(Ordering::Relaxed),
        lost_batches,
        launches: world.launches.load(Ordering::Relaxed),
        pointer_ops: world.pointer_ops.load(Ordering::Relaxed),
        cpu_faults: world.ctx.cpu_faults(),
        pointers_unavailable,
        kernels_unavailable,
        wall,
        faults: stats.faults,
        evictions: stats.evictions,
    };
    // Nothing leaked: free everything, drop the context, and count.
    for (k, owned) in all.iter().enumerate() {
        for (s, o) in owned.iter().enumerate() {
            if let Some(b) = &o.buf {
                b.free()
                    .map_err(|e| format!("thread {k} buffer {s}: free at the end: {e}"))?;
            }
        }
    }
    drop(all);
    let world = Arc::try_unwrap(world)
        .map_err(|_| "the world is still shared after the threads ended".to_string())?;
    world
        .shared
        .free()
        .map_err(|e| format!("freeing the shared buffer: {e}"))?;
    drop(world);
    if dev.pages_in_use() != pages_at_start {
        return Err(format!(
            "{} device pages in use after the context was dropped, {pages_at_start} before",
            dev.pages_in_use()
        ));
    }
    drop(dev);
    if pool.in_use() != frames_at_start {
        return Err(format!(
            "{} host frames in use after the context was dropped, {frames_at_start} before",
            pool.in_use()
        ));
    }
    Ok(report)
}

/// Watches the workers until they end: stops them at the deadline (or the operation count),
/// and fails the run, naming every thread's operation, if one makes no progress.
fn watch(
    world: &World,
    workers: &[std::thread::JoinHandle<Result<Vec<Owned>, String>>],
    config: &OffloadSoakConfig,
    t0: Instant,
) -> Result<(), String> {
    loop {
        std::thread::sleep(Duration::from_millis(50));
        if t0.elapsed() >= config.duration || world.ops.load(Ordering::Relaxed) >= config.max_ops {
            world.stop.store(true, Ordering::Relaxed);
        }
        if workers.iter().all(|h| h.is_finished()) {
            return Ok(());
        }
        let now: Vec<Doing> = world.doing.iter().map(|d| *d.lock().unwrap()).collect();
        let describe = |k: usize, d: &Doing| {
            let on = match d.slot {
                usize::MAX => String::new(),
                s => format!(" on buffer {s}"),
            };
            format!(
                "thread {k}: {}{on} for {:?}",
                d.op.name(),
                d.since.elapsed()
            )
        };
        let stuck: Vec<String> = now
            .iter()
            .enumerate()
            .filter(|(k, d)| !workers[*k].is_finished() && d.since.elapsed() > config.stuck_after)
            .map(|(k, d)| describe(k, d))
            .collect();
        if !stuck.is_empty() {
            world.stop.store(true, Ordering::Relaxed);
            let every: Vec<String> = now
                .iter()
                .enumerate()
                .map(|(k, d)| {
                    let state = if workers[k].is_finished() {
                        " (ended)"
                    } else {
                        ""
                    };
                    format!("{}{state}", describe(k, d))
                })
                .collect();
            let failed = world.failed.lock().unwrap().join("; ");
            let failed = if failed.is_empty() {
                String::new()
            } else {
                format!("\nfailed before: {failed}")
            };
            return Err(format!(
                "stuck: {}\nevery thread: {}{failed}\n{}",
                stuck.join("; "),
                every.join("; "),
                hetmem::mm::locks::report()
            ));
        }
    }
}

/// Errors an operation may end in under the soak's pressure. A live view is not one: every
/// buffer has one owner, which drops its views before its next call. A lost device is one
/// only where a loss was injected (the run checks at its end).
fn accepted(e: &Error) -> bool {
    !matches!(e, Error::ViewActive)
        && matches!(
            e.kind(),
            ErrorKind::OutOfMemory | ErrorKind::Transient | ErrorKind::DeviceLost
        )
}

impl World {
    /// Counts an accepted error by kind.
    fn count_kind(&self, e: &Error) {
        match e.kind() {
            ErrorKind::OutOfMemory => self.out_of_memory.fetch_add(1, Ordering::Relaxed),
            ErrorKind::DeviceLost => self.device_lost.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

/// Retries `f` while it fails with an accepted error (a read may meet exhaustion or a failed
/// copy itself); clears the injected failures after a few tries, so that it ends.
/// While it retries, no thread exhausts the host frames anew.
fn retried<T>(w: &World, mut f: impl FnMut() -> hetmem::Result<T>) -> Result<T, String> {
    let mut tries = 0;
    let mut _holding_off = None;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if accepted(&e) && tries < 2000 => {
                tries += 1;
                w.count_kind(&e);
                // Checking bytes needs frames: an injected exhaustion ends here, and no new
                // one starts until this thread is through.
                _holding_off.get_or_insert_with(|| inject::HoldOff::new(w));
                inject::release_frames(w)?;
                if tries % 20 == 0 {
                    w.device.inject_copy_failures(&[]);
                    w.device.inject_device_loss(0, true);
                }
                if tries < 200 {
                    std::thread::yield_now();
                } else {
                    // Other threads' operations may hold frames a while (eight threads on
                    // two cores): give them time, about two seconds in all.
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            Err(e) => {
                return Err(format!(
                    "{e} ({e:?}) after {tries} tries; {} host frames free, {} in use, {} \
                     taken by an injected exhaustion",
                    w.pool.available(),
                    w.pool.in_use(),
                    w.hogged.lock().unwrap().len()
                ))
            }
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests;
