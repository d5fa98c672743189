//! The harness the adversarial tests share: watchdogs that turn a hang into a failure, a
//! `GpuDriver` over a small host frame pool, byte patterns, and the check that nothing is
//! left locked or behind a migration entry.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{flags, AddressSpace, MemoryKind, PageMap, Prot, Pte, PAGE};
use hetmem::VirtAddr;
use hetmem_engine::{Device, DeviceKind, HostFramePool, Pfn};

use crate::{open_config, test_config};

/// How long a watched test body may run before it counts as a hang.
pub const WATCHDOG: Duration = Duration::from_secs(15);

/// Runs `f` on its own thread; a panic is raised here, a hang fails the test.
pub fn watchdog<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    watchdog_for(what, WATCHDOG, f)
}

/// As [`watchdog`], with its own limit.
pub fn watchdog_for<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    // The test's name (the harness names the test's thread) goes on, for skip messages.
    let mut builder = thread::Builder::new();
    if let Some(name) = thread::current().name() {
        builder = builder.name(name.to_string());
    }
    let h = builder
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn the watched thread");
    match rx.recv_timeout(limit) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!(),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: still running after {limit:?}: HANG")
        }
    }
}

/// Joins racing threads, each under the same deadline; panics (re-raised) and hangs fail.
pub fn join_all<T: Send + 'static>(
    what: &str,
    hs: Vec<thread::JoinHandle<T>>,
    limit: Duration,
) -> Vec<T> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    for h in hs {
        while !h.is_finished() {
            if Instant::now() > deadline {
                panic!("{what}: a racer is still running {limit:?} after the start: HANG");
            }
            thread::sleep(Duration::from_millis(5));
        }
        match h.join() {
            Ok(v) => out.push(v),
            Err(p) => std::panic::resume_unwind(p),
        }
    }
    out
}

/// The host device with a budget of `budget_pages`, over `frames`.
pub fn host_device(budget_pages: usize, frames: &Arc<HostFramePool>) -> Device {
    let mut config = test_config(DeviceKind::Host, (budget_pages * 4096) as u64);
    config.frames = Some(frames.clone());
    open_config(config, "harness").expect("the host device is always there")
}

/// A `GpuDriver` over its own host frame pool, with one address space.
#[derive(Clone)]
pub struct Gpu {
    /// The host frame pool.
    pub pool: Arc<HostFramePool>,
    /// The page map.
    pub pm: Arc<PageMap>,
    /// The driver.
    pub d: GpuDriver,
    /// An address space.
    pub space: AddressSpace,
}

/// A [`Gpu`] on the host device.
pub fn gpu(mem: MemoryKind, budget_pages: usize, fault_around: usize, pool_bytes: usize) -> Gpu {
    gpu_on(
        DeviceKind::Host,
        mem,
        budget_pages,
        fault_around,
        pool_bytes,
    )
    .unwrap()
}

/// A [`Gpu`] on a device of `kind` (`None`, said by name, when there is none).
pub fn gpu_on(
    kind: DeviceKind,
    mem: MemoryKind,
    budget_pages: usize,
    fault_around: usize,
    pool_bytes: usize,
) -> Option<Gpu> {
    let pool = HostFramePool::new(pool_bytes).unwrap();
    let mut config = test_config(kind, (budget_pages * 4096) as u64);
    config.frames = Some(pool.clone());
    let device = open_config(config, "harness")?;
    let pm = PageMap::new(pool.clone()).unwrap();
    let config = DriverConfig {
        kind: Some(mem),
        fault_around,
        budget_pages: Some(budget_pages),
    };
    let d = GpuDriver::new(device, &pm, config).unwrap();
    let space = AddressSpace::new(&pm);
    Some(Gpu { pool, pm, d, space })
}

/// A host frame pool small enough to exhaust.
pub const SMALL_POOL: usize = 64 << 20;

/// `pages` pages of bytes that differ from page to page.
pub fn pattern(pages: usize, seed: u8) -> Vec<u8> {
    (0..pages * 4096)
        .map(|i| (i / 4096) as u8 ^ seed ^ (i % 251) as u8 ^ 0x80)
        .collect()
}

/// Maps `pages` read-write pages anywhere.
pub fn map(space: &AddressSpace, pages: u64) -> VirtAddr {
    space.mmap(None, pages * PAGE, Prot::RW, false).unwrap()
}

/// Reads `len` bytes through the CPU access path.
pub fn read(space: &AddressSpace, addr: VirtAddr, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    space.read(addr, &mut v).unwrap();
    v
}

/// What is wrong with the entries of `npages` pages from `addr` once every operation on
/// them has returned: migration entries left behind, pages left locked or free.
pub fn unsettled(space: &AddressSpace, pm: &PageMap, addr: VirtAddr, npages: usize) -> Vec<String> {
    let mut out = Vec::new();
    for k in 0..npages {
        let pte = space.pte(addr + k as u64 * PAGE);
        if matches!(pte, Pte::Migration { .. }) {
            out.push(format!("page {k}: migration entry left behind: {pte:?}"));
        }
        if let Some(p) = pte.pfn().and_then(|pfn| pm.page(pfn)) {
            if p.test(flags::LOCKED) {
                out.push(format!("page {k}: {pte:?} left LOCKED"));
            }
            if p.refcount() == 0 && !p.test(flags::ZERO) {
                out.push(format!("page {k}: {pte:?} maps a FREE page"));
            }
        }
    }
    out
}

/// The device page behind `addr`.
pub fn dev_pfn(space: &AddressSpace, addr: VirtAddr) -> Pfn {
    match space.pte(addr) {
        Pte::DevicePrivate { pfn, .. } => pfn,
        Pte::Present { pfn, .. } => pfn,
        other => panic!("no page at {addr:#x}: {other:?}"),
    }
}

/// An offload context on `kind` with `budget` bytes of device memory, private device memory,
/// 1 MiB chunks and a fault-around of 16, over `frames` (the process-wide pool if `None`);
/// `None` (said by name) when there is no such device outside CI, a failure under
/// `CI=true`.
pub fn offload_context(
    kind: DeviceKind,
    budget: u64,
    frames: Option<Arc<HostFramePool>>,
    test: &str,
) -> Option<hetmem::offload::Context> {
    offload_context_with(1 << 20, 16, kind, budget, frames, test)
}

/// [`offload_context`] with device chunks of `chunk` bytes and `fault_around` pages per CPU
/// fault.
pub fn offload_context_with(
    chunk: u64,
    fault_around: usize,
    kind: DeviceKind,
    budget: u64,
    frames: Option<Arc<HostFramePool>>,
    test: &str,
) -> Option<hetmem::offload::Context> {
    use hetmem::offload::{Context, ContextConfig};
    let mut device = hetmem_engine::DeviceConfig::default()
        .kind(kind)
        .chunk(chunk);
    device.frames = frames;
    let config = ContextConfig {
        device,
        budget_bytes: budget,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around,
    };
    match Context::new(config) {
        Ok(c) => Some(c),
        Err(hetmem::Error::Engine(e @ hetmem_engine::EngineError::NoDevice { .. })) => {
            assert!(
                !crate::running_in_ci(),
                "{test}: CI=true and no Vulkan device: {e}"
            );
            crate::say_skipped(test, kind, &e);
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

/// A buffer of `ctx` mapped for CPU pointers; `None` (said by name) where userfaultfd cannot
/// be had, a failure under `CI=true` (root on Linux 6.x).
pub fn mapped_buffer(
    ctx: &hetmem::offload::Context,
    bytes: usize,
    test: &str,
) -> Option<hetmem::offload::Buffer> {
    match ctx.alloc_mapped(bytes) {
        Ok(b) => Some(b),
        Err(hetmem::Error::PointersUnavailable(why)) => {
            assert!(
                !crate::running_in_ci(),
                "{test}: CI=true and no CPU pointers: {why}"
            );
            crate::say_skipped(test, DeviceKind::Host, &why);
            None
        }
        Err(e) => panic!("{test}: alloc_mapped: {e}"),
    }
}

/// A WGSL kernel (entry `add`) that adds `hm_arg(0)` to every word of bound buffer 0, which
/// spans `hm_arg(1)` pages.
pub const ADD_KERNEL: &str = r#"
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let words = hm_arg(1) * HM_PAGE_WORDS;
    if (gid.x >= words) {
        return;
    }
    let p = hm_ptr(0u, gid.x * 4u);
    hm_store(p, hm_load(p) + hm_arg(0));
}
"#;

/// Runs the calling test binary again with only `test` (ignored ones included) and
/// `HETMEM_CHILD=mode`, killing it if it runs past `limit`; returns how it ended, or `None`
/// for a hang. For scenarios that end in a signal or may hang, which a test cannot survive
/// in its own process.
pub fn run_child(
    test: &str,
    mode: &str,
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    run_child_with(test, mode, &[], limit)
}

/// [`run_child`] with extra environment variables for the child.
pub fn run_child_with(
    test: &str,
    mode: &str,
    env: &[(&str, &str)],
    limit: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env("HETMEM_CHILD", mode)
        .envs(env.iter().copied())
        .spawn()
        .expect("starting the child");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Blocks `SIGBUS` for the calling thread only: a CPU fault the mirror refuses then ends in
/// no signal, and the thread faults again and again (a test reads the recorded error).
pub fn block_sigbus_here() {
    // SAFETY: a zeroed signal set filled by sigemptyset/sigaddset, applied to this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGBUS);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Adds `hm_arg(0)` to every word of `hm_arg(1)` pages of buffer 0, `hm_arg(2)` times over
/// (a kernel that runs long enough to be caught in flight). Entry point `add`.
pub const SLOW_ADD_KERNEL: &str = r#"
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let words = hm_arg(1) * HM_PAGE_WORDS;
    if (gid.x >= words) {
        return;
    }
    let p = hm_ptr(0u, gid.x * 4u);
    for (var i = 0u; i < hm_arg(2); i = i + 1u) {
        hm_store(p, hm_load(p) + hm_arg(0));
    }
}
"#;

/// The `u32` at word `w` from `base`, read volatile (so every load reaches memory and faults
/// where it must), for tests that touch CPU-mapped buffers through raw addresses.
///
/// # Safety
/// `base + 4 * w` must lie inside a live CPU-mapped buffer (`Context::alloc_mapped`).
pub unsafe fn load_word(base: usize, w: usize) -> u32 {
    // SAFETY: the caller's promise: the word lies in a live mapping of ours.
    unsafe { ((base + 4 * w) as *const u32).read_volatile() }
}

/// Stores `v` at word `w` from `base`, volatile.
///
/// # Safety
/// As for [`load_word`], and no other thread writes the word meanwhile.
pub unsafe fn store_word(base: usize, w: usize, v: u32) {
    // SAFETY: the caller's promise: the word lies in a live mapping of ours, written by this
    // thread alone.
    unsafe { ((base + 4 * w) as *mut u32).write_volatile(v) }
}

/// `migrate_vma_setup` of the system pages of `npages` pages from `a` to `owner`'s device,
/// over `src` and `dst` (which may be longer); panics if setup fails.
pub fn setup_system_migration<'a>(
    space: &'a AddressSpace,
    a: VirtAddr,
    npages: u64,
    owner: hetmem::Owner,
    src: &'a mut [u64],
    dst: &'a mut [u64],
) -> hetmem::migration::MigrateVma<'a> {
    use hetmem::migration::{migrate_vma_setup, MigrateVma, MIGRATE_VMA_SELECT_SYSTEM};
    let mut m = MigrateVma::new(space, a, a + npages * PAGE, src, dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = owner;
    migrate_vma_setup(&mut m).unwrap();
    m
}
