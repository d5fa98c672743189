//! The offload context: one device, its driver, one address space for managed buffers.

use std::sync::Arc;

use std::ops::Range;

use hetmem_engine::{Device, DeviceConfig, DeviceInfo, DeviceType, HostAccess, Kernel};

use super::buffer::Buffer;
use crate::cpu::{CpuFaultError, CpuMirror, FaultScope};
use crate::driver::Launch;
use crate::driver::{DriverConfig, DriverStats, GpuDriver};
use crate::error::{Error, Result};
use crate::mm::{AddressSpace, MemoryKind, PageMap, Prot, VirtAddr, PAGE};

/// How to build a context.
#[derive(Clone, Debug)]
pub struct ContextConfig {
    /// The device (`DeviceConfig::from_env()` by default: `HETMEM_DEVICE`, `HETMEM_ADAPTER`).
    pub device: DeviceConfig,
    /// Device memory the context may use, in bytes (the device budget).
    pub budget_bytes: u64,
    /// Private or coherent device memory (`None`: coherent where the device offers it).
    pub memory: Option<MemoryKind>,
    /// Pages brought back per CPU fault.
    pub fault_around: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        ContextConfig {
            device: DeviceConfig::from_env().unwrap_or_default(),
            budget_bytes: 1 << 30,
            memory: Some(MemoryKind::DevicePrivate),
            fault_around: 16,
        }
    }
}

pub(crate) struct Inner {
    /// The mirror of CPU pointers, opened on the first `alloc_mapped` (first field: it goes
    /// first, stopping its fault thread and unmapping what is left while the driver lives).
    cpu: std::sync::OnceLock<std::result::Result<CpuMirror, String>>,
    pub(crate) driver: GpuDriver,
    pub(crate) space: AddressSpace,
    /// The context's background worker for prefetches (started on the first one; it ends
    /// when the context goes and the jobs sent before are done).
    prefetcher: parking_lot::Mutex<Option<std::sync::mpsc::Sender<Job>>>,
}

/// Work for the prefetch worker.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

impl Inner {
    /// Runs `job` on the context's prefetch worker (one thread per context, started on first
    /// use): prefetches run in the order they were asked for, without a thread each.
    pub(crate) fn background(&self, job: Job) -> Result<()> {
        let mut slot = self.prefetcher.lock();
        if slot.is_none() {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            std::thread::Builder::new()
                .name("hetmem-prefetch".into())
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .map_err(|e| Error::Engine(e.into()))?;
            *slot = Some(tx);
        }
        slot.as_ref()
            .expect("started above")
            .send(job)
            .map_err(|_| Error::InvalidArgument("the prefetch worker is gone"))
    }
}

/// A device with its driver and an address space for managed buffers. Cloning gives
/// another handle.
#[derive(Clone)]
pub struct Context {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.device_info().name)
            .finish()
    }
}

/// Home frames left empty by a migration to the device may give their memory back (a hole
/// punched in the frame file) where the device reaches host frames without pinning them: the
/// host device, a CPU device (lavapipe) that imports frames as plain pointers, or copies
/// through staging. It is off unless `HETMEM_RELEASE_HOMES=1` (or
/// `HostFramePool::allow_home_punching` on the context's pool): on the machines measured,
/// punching and refilling a frame costs several times more than copying it (see the README),
/// which a program that keeps its data on the device pays on every return. A GPU that
/// imports frames pins them, and a punched frame would no longer be the page it copies into:
/// such a device forbids punching on its pool for good.
fn release_empty_homes(device: &Device) {
    let info = device.info();
    let pins = info.host_access == HostAccess::Import && info.device_type != DeviceType::Cpu;
    let wanted = std::env::var("HETMEM_RELEASE_HOMES").is_ok_and(|v| v == "1");
    if pins {
        device.frames().forbid_home_punching();
    } else if wanted {
        device.frames().allow_home_punching();
    }
}

impl Context {
    /// Opens the device `config` selects (and says which, through `tracing`), registers its
    /// memory and makes an empty address space.
    pub fn new(config: ContextConfig) -> Result<Context> {
        if config.device.kind.is_none() {
            // Left to the environment: a bad `HETMEM_DEVICE` (or `HETMEM_GATHER`) is an
            // error here, not silently the automatic choice.
            DeviceConfig::from_env()?;
        }
        let device = Device::open(config.device.clone().budget(config.budget_bytes))?;
        release_empty_homes(&device);
        let pagemap = PageMap::new(device.frames().clone())?;
        let driver = GpuDriver::new(
            device,
            &pagemap,
            DriverConfig {
                kind: config.memory,
                fault_around: config.fault_around,
                budget_pages: None,
            },
        )?;
        let space = AddressSpace::new(&pagemap);
        Ok(Context {
            inner: Arc::new(Inner {
                cpu: std::sync::OnceLock::new(),
                driver,
                space,
                prefetcher: parking_lot::Mutex::new(None),
            }),
        })
    }

    /// Which device is used, and why it was chosen.
    pub fn device_info(&self) -> &DeviceInfo {
        self.inner.driver.device().info()
    }

    /// The driver (for its statistics, eviction, budget).
    pub fn driver(&self) -> &GpuDriver {
        &self.inner.driver
    }

    /// The address space the buffers live in.
    pub fn space(&self) -> &AddressSpace {
        &self.inner.space
    }

    /// Counters: bytes each way, faults, evictions, copy and bookkeeping time.
    pub fn stats(&self) -> DriverStats {
        self.inner.driver.stats()
    }

    /// Compiles a WGSL compute kernel for this context's device, with hetmem's helper
    /// (`shaders/hetmem.wgsl`) in front: the kernel reaches managed buffers through
    /// `hm_ptr(buffer, byte_offset)`, `hm_load` and `hm_store`, and its arguments through
    /// `hm_arg(i)`. Fails with an `Unsupported` engine error on devices that run no kernels
    /// (the host device, wgpu).
    pub fn compile_kernel(&self, wgsl: &str, entry: &str) -> Result<Kernel> {
        Ok(self.device().compile_kernel(wgsl, entry)?)
    }

    /// Whether kernels run on this context's device; `Err` says why not.
    pub fn kernel_support(&self) -> Result<()> {
        Ok(self.device().kernel_support()?)
    }

    /// Launches `kernel` over `groups` workgroups with `buffers` bound in order and `args`
    /// as its argument words. Kernel buffer `i` covers the pages of `buffers[i]`'s byte
    /// range; its offset 0 is the start of the page that holds the range's first byte. The ranges are brought to the device
    /// and pinned there until the launch is waited on or dropped; the device page table of
    /// the context's address space maps them for the kernel.
    ///
    /// ```
    /// use hetmem::offload::{Context, ContextConfig};
    ///
    /// # fn main() -> hetmem::Result<()> {
    /// let ctx = Context::new(ContextConfig { budget_bytes: 8 << 20, ..Default::default() })?;
    /// if let Err(e) = ctx.kernel_support() {
    ///     // The host device (no Vulkan here) runs no kernels; CI has lavapipe.
    ///     assert!(!std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"), "{e}");
    ///     return Ok(());
    /// }
    /// let k = ctx.compile_kernel(
    ///     r#"
    /// @compute @workgroup_size(64)
    /// fn triple(@builtin(global_invocation_id) g: vec3<u32>) {
    ///     let p = hm_ptr(0u, g.x * 4u);
    ///     hm_store(p, hm_load(p) * hm_arg(0));
    /// }"#,
    ///     "triple",
    /// )?;
    /// let buf = ctx.alloc(4096)?;
    /// buf.write(8, &7u32.to_le_bytes())?;
    /// ctx.launch(&k, &[(&buf, 0..4096)], &[3], [1024 / 64, 1, 1])?.wait()?;
    /// let mut w = [0u8; 4];
    /// buf.read(8, &mut w)?; // faults the page back from the device
    /// assert_eq!(u32::from_le_bytes(w), 21);
    /// # Ok(()) }
    /// ```
    pub fn launch(
        &self,
        kernel: &Kernel,
        buffers: &[(&Buffer, Range<usize>)],
        args: &[u32],
        groups: [u32; 3],
    ) -> Result<Launch> {
        // No view may watch the bytes change: a live view fails the launch, and none can be
        // made while the ranges are brought to the device and pinned (afterwards a view is
        // refused with `HeldOnDevice` until the launch is waited on or dropped).
        let _uses = buffers
            .iter()
            .map(|(b, _)| b.begin(super::view::Use::Write))
            .collect::<Result<Vec<_>>>()?;
        let ranges = buffers
            .iter()
            .map(|(b, r)| {
                if !b.belongs_to(self) {
                    return Err(Error::InvalidArgument("buffer of another context"));
                }
                b.page_range(r.clone())
            })
            .collect::<Result<Vec<_>>>()?;
        self.inner
            .driver
            .launch_unchecked(&self.inner.space, kernel, &ranges, args, groups)
            .map_err(|e| {
                // A page that could not be held names its buffer and offset, not its frame.
                let Error::Busy(pfn) = e else { return e };
                let held = buffers
                    .iter()
                    .find(|(b, r)| b.offset_of(pfn, r.clone()).is_some())
                    .or(buffers.first());
                match held {
                    Some((b, r)) => b.busy_in(e, r.clone()),
                    None => e,
                }
            })
    }

    fn device(&self) -> &Device {
        self.inner.driver.device()
    }

    /// A managed buffer of `bytes` (rounded up to whole pages), zero-filled, on the host
    /// until used elsewhere.
    pub fn alloc(&self, bytes: usize) -> Result<Buffer> {
        if bytes == 0 {
            return Err(Error::EmptyRange);
        }
        let len = (bytes as u64)
            .checked_next_multiple_of(PAGE)
            .ok_or(Error::NoAddressSpace(bytes as u64))?;
        let addr = self.inner.space.mmap(None, len, Prot::RW, false)?;
        Ok(Buffer::new(self.clone(), addr, bytes, false))
    }

    /// A managed buffer of `bytes` (rounded up to whole pages), zero-filled, that CPU code
    /// reaches through plain pointers too ([`Buffer::as_ptr`], [`Buffer::view`]): its address
    /// in the context's space is its address in the process, and a load or store on a page
    /// that is on the device faults it back (see [`crate::cpu`]). Fails with
    /// [`Error::PointersUnavailable`], saying why, where userfaultfd cannot be had; `alloc`
    /// and the `read`/`write` API work everywhere.
    pub fn alloc_mapped(&self, bytes: usize) -> Result<Buffer> {
        if bytes == 0 {
            return Err(Error::EmptyRange);
        }
        let len = (bytes as u64)
            .checked_next_multiple_of(PAGE)
            .ok_or(Error::NoAddressSpace(bytes as u64))?;
        let addr = self.cpu()?.map(len)?;
        Ok(Buffer::new(self.clone(), VirtAddr(addr), bytes, true))
    }

    /// Whether CPU pointers can be had here, and which faults they serve:
    /// [`FaultScope::All`] (system calls that touch a managed page are served too) or
    /// [`FaultScope::UserOnly`] (without privilege: such a system call fails with `EFAULT`).
    pub fn cpu_pointers(&self) -> Result<FaultScope> {
        Ok(self.cpu()?.scope())
    }

    /// The last CPU access through a pointer that could not be served (its thread got
    /// `SIGBUS`), taken: the address and the error.
    pub fn take_cpu_fault_error(&self) -> Option<CpuFaultError> {
        self.inner.cpu.get()?.as_ref().ok()?.take_error()
    }

    /// CPU faults through pointers served so far by hetmem's fault thread. Pages of long runs
    /// that are back in host memory are left to the kernel's own fault path until one of them
    /// changes, and accesses to those are not counted.
    pub fn cpu_faults(&self) -> u64 {
        match self.inner.cpu.get() {
            Some(Ok(m)) => m.served(),
            _ => 0,
        }
    }

    pub(crate) fn unmap_cpu(&self, addr: u64) -> Result<()> {
        self.cpu()?.unmap(addr)
    }

    fn cpu(&self) -> Result<&CpuMirror> {
        let m = self.inner.cpu.get_or_init(|| {
            let driver = self.inner.driver.clone();
            let space = self.inner.space.clone();
            let bring: crate::cpu::Bring = Box::new(move |addr, n| {
                driver
                    .migrate_to_host_unchecked(&space, VirtAddr(addr), n)
                    .map(|_| ())
            });
            CpuMirror::new(
                &self.inner.space,
                self.inner.driver.owner(),
                self.inner.driver.fault_around(),
                bring,
            )
            .map_err(|e| match e {
                Error::PointersUnavailable(why) => why,
                other => other.to_string(),
            })
        });
        m.as_ref()
            .map_err(|why| Error::PointersUnavailable(why.clone()))
    }
}
