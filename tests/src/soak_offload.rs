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

mod inject;
mod ops;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmem::mm::{hmm_range_fault, MemoryKind};
use hetmem::offload::{Buffer, Context, ContextConfig};
use hetmem::{Error, ErrorKind};
use hetmem_engine::{Device, DeviceConfig, DeviceKind, HostFramePool, Kernel};

use crate::harness::{pattern, unsettled};
use crate::soak::join_workers;

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
                .spawn(move || ops::worker(&w, k, seed, nbuf))
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
            return Err(format!(
                "stuck: {}\nevery thread: {}\n{}",
                stuck.join("; "),
                every.join("; "),
                hetmem::mm::locks::report()
            ));
        }
    }
}

/// The end of a run: every byte of every buffer and of the shared one, read through the
/// library and through pointers, and every entry settled.
fn finish(w: &World, all: &[Vec<Owned>]) -> Result<(), String> {
    let pm = w.ctx.space().pagemap().clone();
    for (k, owned) in all.iter().enumerate() {
        for (s, o) in owned.iter().enumerate() {
            let Some(b) = &o.buf else { continue };
            let at = |e: String| format!("at the end, thread {k} buffer {s}: {e}");
            check_read(w, b, &o.shadow).map_err(at)?;
            check_peek(w, b, &o.shadow).map_err(at)?;
            if o.mapped {
                let v = b.view::<u8>().map_err(|e| at(format!("view: {e}")))?;
                first_difference(&v, &o.shadow).map_err(|e| at(format!("through a view: {e}")))?;
            }
            let bad = unsettled(w.ctx.space(), &pm, b.addr(), b.len().div_ceil(4096));
            if !bad.is_empty() {
                return Err(at(bad.join("; ")));
            }
        }
    }
    check_read(w, &w.shared, &w.shared_bytes).map_err(|e| format!("the shared buffer: {e}"))?;
    let bad = unsettled(
        w.ctx.space(),
        &pm,
        w.shared.addr(),
        w.shared_bytes.len() / 4096,
    );
    if !bad.is_empty() {
        return Err(format!("the shared buffer: {}", bad.join("; ")));
    }
    Ok(())
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
            Err(e) if accepted(&e) && tries < 200 => {
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
                std::thread::yield_now();
            }
            Err(e) => {
                return Err(format!(
                    "{e} ({e:?}; {} host frames free, {} taken by an injected exhaustion)",
                    w.pool.available(),
                    w.hogged.lock().unwrap().len()
                ))
            }
        }
    }
}

/// Where `got` first differs from `want`, as an error.
fn first_difference(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} bytes, {} expected", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => {
            let wrong = got[i..]
                .iter()
                .zip(&want[i..])
                .filter(|(a, b)| a != b)
                .count();
            Err(format!(
                "byte {i} (page {}) reads {:#04x}, {:#04x} expected ({wrong} bytes wrong from there)",
                i / 4096,
                got[i],
                want[i]
            ))
        }
    }
}

/// Reads the whole buffer with `Buffer::read` (pages on the device come back) and compares.
fn check_read(w: &World, b: &Buffer, want: &[u8]) -> Result<(), String> {
    let mut got = vec![0u8; want.len()];
    retried(w, || b.read(0, &mut got)).map_err(|e| format!("reading it: {e}"))?;
    first_difference(&got, want)
}

/// Reads the whole buffer where its pages are, without moving them, as a device mirror
/// does: `hmm_range_fault` with the driver's owner gives each page's frame or device page,
/// read between `read_begin` and `read_retry` (retried if an invalidation ran meanwhile).
fn check_peek(w: &World, b: &Buffer, want: &[u8]) -> Result<(), String> {
    let space = w.ctx.space();
    let owner = w.ctx.driver().owner();
    let n = b.len().div_ceil(4096);
    let mut got = vec![0u8; n * 4096];
    for _ in 0..1000 {
        let seq = space.read_begin();
        let pfns = retried(w, || hmm_range_fault(space, b.addr(), n, false, owner))
            .map_err(|e| format!("hmm_range_fault: {e}"))?;
        let mut failed = None;
        for (k, p) in pfns.iter().enumerate() {
            let out = &mut got[k * 4096..(k + 1) * 4096];
            let r = if w.device.owns(p.pfn) {
                w.device.read_page(p.pfn, 0, out).map_err(Error::from)
            } else {
                space.pagemap().read_frame(p.pfn, 0, out)
            };
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if space.read_retry(seq) {
            continue;
        }
        if let Some(e) = failed {
            return Err(format!("reading a page in place: {e}"));
        }
        return first_difference(&got[..want.len()], want).map_err(|e| format!("in place: {e}"));
    }
    Err(format!(
        "in place: invalidated 1000 times running ({n} pages)"
    ))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(device: DeviceKind, sabotage: Option<Sabotage>) -> Result<OffloadSoakReport, String> {
        short_with(device, sabotage, 0.0)
    }

    /// A short run with host-frame exhaustion and device losses injected at `rate` each.
    fn short_with(
        device: DeviceKind,
        sabotage: Option<Sabotage>,
        rate: f64,
    ) -> Result<OffloadSoakReport, String> {
        run(&OffloadSoakConfig {
            host_exhaustion_rate: rate,
            device_loss_rate: rate,
            device,
            threads: 4,
            duration: Duration::from_millis(1500),
            // Short only for the stall it must catch. A panicking thread is not slow to
            // unwind (its buffers' unmaps take about 0.1 ms), but the first panic of a
            // process with RUST_BACKTRACE set spends 0.2-0.5 s in the default panic hook,
            // symbolising the backtrace from this debug build's DWARF, before unwinding
            // starts; the watchdog would call it stuck.
            stuck_after: Duration::from_millis(if matches!(sabotage, Some(Sabotage::Stall)) {
                500
            } else {
                20_000
            }),
            sabotage,
            ..OffloadSoakConfig::default()
        })
    }

    #[test]
    fn a_short_offload_soak_passes_on_every_device() {
        let report = short(DeviceKind::Host, None).unwrap();
        assert!(report.ops > 100, "{report:?}");
        // Under CI=true (as root) pointers must have been used; the run fails otherwise.
        if report.pointers_unavailable.is_none() {
            assert!(report.pointer_ops > 0, "{report:?}");
        }
        if crate::open_for_test(DeviceKind::Vulkan, 1 << 20, "offload_soak").is_some() {
            let report = short(DeviceKind::Vulkan, None).unwrap();
            assert!(report.launches > 0, "kernels ran on Vulkan: {report:?}");
        }
    }

    #[test]
    fn a_byte_changed_behind_the_shadow_fails_the_run() {
        let e = short(DeviceKind::Host, Some(Sabotage::CorruptByte)).unwrap_err();
        assert!(e.contains("shared buffer") && e.contains("expected"), "{e}");
    }

    #[test]
    fn a_stuck_thread_fails_the_run_naming_every_thread() {
        let e = short(DeviceKind::Host, Some(Sabotage::Stall)).unwrap_err();
        assert!(e.starts_with("stuck: thread 0:"), "{e}");
        for k in 0..4 {
            assert!(e.contains(&format!("thread {k}: ")), "{e}");
        }
        assert!(
            e.contains("soak-offload-0 holds [Map]"),
            "the locks it holds: {e}"
        );
    }

    #[test]
    fn a_panic_fails_the_run_with_its_message() {
        let e = short(DeviceKind::Host, Some(Sabotage::Panic)).unwrap_err();
        assert!(e.contains("thread 0 panicked: sabotage"), "{e}");
    }

    /// Under exhaustion and device losses, a run passes, and it did meet both: operations
    /// failed with `OutOfMemory` and with `DeviceLost`, and batches were lost mid-way.
    #[test]
    fn a_short_offload_soak_with_exhaustion_and_device_loss_passes() {
        let mut devices = vec![DeviceKind::Host];
        if crate::open_for_test(DeviceKind::Vulkan, 1 << 20, "offload_soak_injected").is_some() {
            devices.push(DeviceKind::Vulkan);
        }
        for device in devices {
            let r = short_with(device, None, 0.05).unwrap();
            assert!(r.exhaustions > 0 && r.loss_injections > 0, "{r:?}");
            assert!(r.lost_batches > 0, "no batch was lost: {r:?}");
            assert!(r.device_lost > 0, "no operation saw the loss: {r:?}");
            assert!(r.out_of_memory > 0, "no operation met exhaustion: {r:?}");
        }
    }

    #[test]
    fn a_byte_changed_behind_the_shadow_fails_a_run_with_exhaustion_and_device_loss() {
        let e = short_with(DeviceKind::Host, Some(Sabotage::CorruptByte), 0.05).unwrap_err();
        assert!(e.contains("shared buffer") && e.contains("expected"), "{e}");
    }

    #[test]
    fn a_leaked_host_frame_fails_a_run_with_exhaustion_and_device_loss() {
        let e = short_with(DeviceKind::Host, Some(Sabotage::LeakFrame), 0.05).unwrap_err();
        assert!(
            e.contains("host frames in use after the context was dropped"),
            "{e}"
        );
    }

    #[test]
    fn a_leaked_device_page_fails_a_run_with_exhaustion_and_device_loss() {
        let e = short_with(DeviceKind::Host, Some(Sabotage::LeakDevicePage), 0.05).unwrap_err();
        assert!(
            e.contains("device pages in use after the context was dropped"),
            "{e}"
        );
    }
}
