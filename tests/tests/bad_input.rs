//! Bad input gives a typed error, never a panic (the dev profile checks overflow), a hang or
//! a silent wrong answer, and leaves nothing lost or leaked behind.

use std::time::Duration;

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::migration::*;
use hetmem::mm::{hmm_range_fault, pin_pages, snapshot, AddressSpace, MemoryKind, PageMap, Prot};
use hetmem::offload::{Context, ContextConfig};
use hetmem::{Error, ErrorKind};
use hetmem::{Owner, VirtAddr};
use hetmem_engine::{DeviceConfig, DeviceKind, HostFramePool, Pfn};

/// Runs `f` on a thread and fails if it does not return within 10 s (a hang is a failure).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"))
}

fn host_context() -> Context {
    Context::new(ContextConfig {
        device: DeviceConfig::default().kind(DeviceKind::Host),
        budget_bytes: 64 * 4096,
        ..ContextConfig::default()
    })
    .unwrap()
}

/// Huge sizes, offsets and page counts are errors of the misuse kind (or out of memory for
/// an allocation), with everything still usable afterwards.
#[test]
fn huge_sizes_and_offsets_are_errors() {
    within("huge sizes", || {
        let ctx = host_context();
        let e = ctx.alloc(usize::MAX).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Misuse | ErrorKind::OutOfMemory),
            "{e}"
        );
        for _ in 0..3 {
            let _ = ctx.alloc(1 << 62);
        }
        let b = ctx.alloc(4096).expect("a small allocation after huge ones");
        b.write(0, b"still fine").unwrap();
        let mut out = [0u8; 10];
        assert!(matches!(
            b.read(usize::MAX, &mut out),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            b.write(usize::MAX, b"x"),
            Err(Error::OutOfBounds { .. })
        ));
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"still fine");

        let pm = ctx.driver().pagemap().clone();
        let space = ctx.space().clone();
        let a = b.addr();
        let d = ctx.driver();
        assert_eq!(
            d.migrate_to_device(&space, a, usize::MAX)
                .unwrap_err()
                .kind(),
            ErrorKind::Misuse
        );
        assert_eq!(
            d.migrate_to_host(&space, a, usize::MAX).unwrap_err().kind(),
            ErrorKind::Misuse
        );
        assert!(pin_pages(&space, a, usize::MAX, false, false).is_err());
        assert!(hmm_range_fault(&space, a, usize::MAX, false, Owner::NONE).is_err());
        let top = VirtAddr(!4095);
        let states = snapshot(&space, top, 4, Owner::NONE);
        assert_eq!(states.len(), 4, "one state per page asked for");
        d.touch(&space, a, usize::MAX);
        let mut src = vec![0u64; 4];
        let e = migrate_device_range(&pm, &mut src, Pfn(u64::MAX), 4).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Misuse);
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"still fine");
    });
}

/// A driver's fault-around window out of range is clamped, never a hang or a division by
/// zero; the faulting page comes back with its bytes.
#[test]
fn fault_around_out_of_range_is_clamped() {
    for fault_around in [0, 1 << 52, usize::MAX] {
        within("fault_around", move || {
            let pool = HostFramePool::new(64 << 20).unwrap();
            let mut config = DeviceConfig::default()
                .kind(DeviceKind::Host)
                .budget(1 << 20);
            config.frames = Some(pool.clone());
            let dev = hetmem_engine::Device::open(config).unwrap();
            let pm = PageMap::new(pool).unwrap();
            let d = GpuDriver::new(
                dev,
                &pm,
                DriverConfig {
                    kind: Some(MemoryKind::DevicePrivate),
                    fault_around,
                    budget_pages: None,
                },
            )
            .unwrap();
            let space = AddressSpace::new(&pm);
            let a = space.mmap(None, 8 * 4096, Prot::RW, false).unwrap();
            space.write(a + 4096, b"page one").unwrap();
            assert_eq!(d.migrate_to_device(&space, a, 8).unwrap().migrated, 8);
            let mut out = [0u8; 8];
            space.read(a + 4096, &mut out).unwrap();
            assert_eq!(&out, b"page one");
        });
    }
}

/// A context created and dropped gives back every host frame it took (its zero page too).
#[test]
fn contexts_leak_no_host_frame() {
    let pool = HostFramePool::new(64 << 20).unwrap();
    let make = || {
        let mut device = DeviceConfig::default().kind(DeviceKind::Host);
        device.frames = Some(pool.clone());
        Context::new(ContextConfig {
            device,
            budget_bytes: 64 * 4096,
            ..ContextConfig::default()
        })
        .unwrap()
    };
    drop(make());
    let before = pool.in_use();
    for _ in 0..5 {
        let ctx = make();
        let b = ctx.alloc(8 * 4096).unwrap();
        b.write(0, &[1; 8 * 4096]).unwrap();
        drop(b);
        drop(ctx);
    }
    assert_eq!(pool.in_use(), before, "host frames leaked by contexts");
}

/// A `HETMEM_DEVICE` that names no backend is an error when the context leaves the choice
/// to the environment (not silently the automatic choice).
#[test]
fn a_bad_hetmem_device_is_an_error() {
    // The other tests of this file name their device, so the variable does not reach them.
    std::env::set_var("HETMEM_DEVICE", "cuda");
    let r = Context::new(ContextConfig::default());
    std::env::remove_var("HETMEM_DEVICE");
    let Err(e) = r else {
        panic!("HETMEM_DEVICE=cuda was accepted");
    };
    assert_eq!(e.kind(), ErrorKind::Misuse, "{e}");
    assert!(
        e.to_string().contains("cuda"),
        "the error names the value: {e}"
    );
}

/// Advice that fails records nothing; a write across a page held on the device fails before
/// writing any byte.
#[test]
fn failed_advice_and_a_write_across_a_pin_change_nothing() {
    use hetmem::offload::{Advice, Location};
    let ctx = host_context();
    // Larger than the device budget (64 pages): the prefetch the advice implies is refused.
    let big = ctx.alloc(128 * 4096).unwrap();
    assert!(big
        .advise(Advice::PreferredLocation(Location::Device))
        .is_err());
    assert_eq!(big.preferred(), None, "failed advice is not recorded");

    let b = ctx.alloc(4 * 4096).unwrap();
    b.write(0, &[1; 4 * 4096]).unwrap();
    let pin = b.pin_on_device(3 * 4096..4 * 4096).unwrap();
    assert!(matches!(
        b.write(0, &[2; 4 * 4096]),
        Err(Error::HeldOnDevice { addr, offset }) if addr == b.addr() && offset == 3 * 4096
    ));
    drop(pin);
    let mut out = vec![0u8; 4 * 4096];
    b.read(0, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 1), "no byte was written");
}

/// Prefetches run on the context's one worker thread, not a thread each.
#[test]
fn prefetches_share_one_worker_thread() {
    use hetmem::offload::Location;
    fn prefetch_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .map(|d| {
                d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                    .filter(|name| name.trim() == "hetmem-prefetch")
                    .count()
            })
            .unwrap_or(0)
    }
    let ctx = host_context();
    let b = ctx.alloc(32 * 4096).unwrap();
    b.write(0, &[5; 32 * 4096]).unwrap();
    let before = prefetch_threads();
    let pending: Vec<_> = (0..64)
        .map(|k| {
            let to = if k % 2 == 0 {
                Location::Device
            } else {
                Location::Host
            };
            b.prefetch(0..32 * 4096, to).unwrap()
        })
        .collect();
    let during = prefetch_threads();
    for p in pending {
        p.wait().unwrap();
    }
    assert!(
        during <= before + 1,
        "{during} prefetch threads with 64 prefetches in flight ({before} before)"
    );
    let mut out = vec![0u8; 32 * 4096];
    b.read(0, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 5));
}

/// The driver's eviction queue stays bounded by what is resident, however often pages go to
/// the device and back.
#[test]
fn the_eviction_queue_stays_bounded() {
    let ctx = host_context();
    let d = ctx.driver();
    let space = ctx.space();
    let b = ctx.alloc(16 * 4096).unwrap();
    b.write(0, &[3; 16 * 4096]).unwrap();
    for _ in 0..200 {
        assert_eq!(
            d.migrate_to_device(space, b.addr(), 16).unwrap().migrated,
            16
        );
        assert_eq!(d.migrate_to_host(space, b.addr(), 16).unwrap().migrated, 16);
    }
    let bound = 2 * d.resident_pages() + 1024;
    assert!(
        d.eviction_queue_len() <= bound,
        "{} entries for {} resident pages",
        d.eviction_queue_len(),
        d.resident_pages()
    );
}
