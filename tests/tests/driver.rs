//! `GpuDriver`: budgets and eviction, the fault-around window, pins, statistics.

use std::sync::Arc;

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{pin_pages, AddressSpace, MemoryKind, PageMap, PageState, Prot, PAGE};
use hetmem_engine::DeviceKind;
use hetmem_tests::open_for_test;

fn driver(
    kind: DeviceKind,
    mem: MemoryKind,
    budget: usize,
    test: &str,
) -> Option<(Arc<PageMap>, GpuDriver, AddressSpace)> {
    let device = open_for_test(kind, 4 * budget as u64 * 4096, test)?;
    let pm = PageMap::new(device.frames().clone()).unwrap();
    let config = DriverConfig {
        kind: Some(mem),
        fault_around: 16,
        budget_pages: Some(budget),
    };
    let d = GpuDriver::new(device, &pm, config).unwrap();
    let space = AddressSpace::new(&pm);
    Some((pm, d, space))
}

fn kinds() -> [DeviceKind; 2] {
    [DeviceKind::Host, DeviceKind::Vulkan]
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n * 4096)
        .map(|i| (i / 4096) as u8 ^ seed ^ (i % 251) as u8)
        .collect()
}

#[test]
fn the_budget_holds_and_lru_pages_are_evicted() {
    for kind in kinds() {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let Some((_pm, d, space)) = driver(kind, mem, 64, "budget") else {
                continue;
            };
            let a = space.mmap(None, 256 * PAGE, Prot::RW, false).unwrap();
            let data = bytes(256, 3);
            space.write(a, &data).unwrap();
            for block in 0..4u64 {
                let moved = d
                    .migrate_to_device(&space, a + block * 64 * PAGE, 64)
                    .unwrap();
                assert_eq!(moved.migrated, 64);
                assert!(d.resident_pages() <= 64, "never more than the budget");
            }
            assert!(d.stats().evictions >= 3 * 64, "{:?}", d.stats());
            let snap = d.device().pages_in_use();
            assert_eq!(snap, 64);
            let mut got = vec![0; data.len()];
            space.read(a, &mut got).unwrap();
            assert_eq!(got, data);
        }
    }
}

#[test]
fn young_pages_get_a_second_chance() {
    let Some((_pm, d, space)) = driver(DeviceKind::Host, MemoryKind::DevicePrivate, 8, "young")
    else {
        return;
    };
    let a = space.mmap(None, 16 * PAGE, Prot::RW, false).unwrap();
    space.write(a, &bytes(16, 1)).unwrap();
    d.migrate_to_device(&space, a, 8).unwrap();
    d.touch(&space, a, 4); // the first half is in use
    d.migrate_to_device(&space, a + 8 * PAGE, 4).unwrap();
    let snap = hetmem::mm::snapshot(&space, a, 8, d.owner());
    assert!(
        snap[..4]
            .iter()
            .all(|&s| s == PageState::DevicePrivateLocal),
        "used pages stay: {snap:?}"
    );
    assert!(
        snap[4..].iter().all(|&s| s == PageState::Write),
        "unused pages went: {snap:?}"
    );
}

#[test]
fn a_fault_brings_back_its_window() {
    for kind in kinds() {
        let Some((_pm, d, space)) = driver(kind, MemoryKind::DevicePrivate, 128, "fault_around")
        else {
            continue;
        };
        let a = space.mmap(None, 64 * PAGE, Prot::RW, false).unwrap();
        let data = bytes(64, 5);
        space.write(a, &data).unwrap();
        d.migrate_to_device(&space, a, 64).unwrap();
        let mut b = [0u8; 8];
        space.read(a + 20 * PAGE + 8, &mut b).unwrap();
        assert_eq!(&b, &data[20 * 4096 + 8..20 * 4096 + 16]);
        assert_eq!(d.stats().faults, 1);
        let snap = hetmem::mm::snapshot(&space, a, 64, d.owner());
        for (i, s) in snap.iter().enumerate() {
            let back = (16..32).contains(&i);
            assert_eq!(*s == PageState::Write, back, "page {i}: {s:?}");
        }
        assert_eq!(d.resident_pages(), 48);
    }
}

#[test]
fn pinned_pages_are_never_evicted() {
    let Some((_pm, d, space)) = driver(DeviceKind::Host, MemoryKind::DeviceCoherent, 8, "pinned")
    else {
        return;
    };
    let a = space.mmap(None, 16 * PAGE, Prot::RW, false).unwrap();
    space.write(a, &bytes(16, 7)).unwrap();
    d.migrate_to_device(&space, a, 8).unwrap();
    let pin = pin_pages(&space, a, 2, false, false).unwrap();
    assert_eq!(d.evict_all().unwrap(), 6);
    let snap = hetmem::mm::snapshot(&space, a, 8, d.owner());
    assert!(
        snap[..2]
            .iter()
            .all(|&s| s == PageState::DeviceCoherentLocal),
        "{snap:?}"
    );
    drop(pin);
    assert_eq!(d.evict_all().unwrap(), 2);
    let mut got = vec![0; 16 * 4096];
    space.read(a, &mut got).unwrap();
    assert_eq!(got, bytes(16, 7));
}

#[test]
fn stats_count_bytes_each_way() {
    let Some((_pm, d, space)) = driver(DeviceKind::Host, MemoryKind::DevicePrivate, 64, "stats")
    else {
        return;
    };
    let a = space.mmap(None, 10 * PAGE, Prot::RW, false).unwrap();
    space.write(a, &bytes(10, 9)).unwrap();
    d.migrate_to_device(&space, a, 10).unwrap();
    d.migrate_to_host(&space, a, 4).unwrap();
    let s = d.stats();
    assert_eq!(s.bytes_to_device, 10 * 4096);
    assert_eq!(s.bytes_to_host, 4 * 4096);
    assert!(s.bookkeeping_ns > 0);
    drop(space);
    assert_eq!(d.resident_pages(), 0);
}

#[test]
fn large_ranges_move_in_pipelined_chunks() {
    use hetmem::driver::CHUNK_PAGES;
    for kind in kinds() {
        let n = 2 * CHUNK_PAGES + 300;
        let Some((_pm, d, space)) = driver(kind, MemoryKind::DevicePrivate, n, "pipelined") else {
            continue;
        };
        let a = space.mmap(None, n as u64 * PAGE, Prot::RW, false).unwrap();
        // Every third page stays a hole; the rest carry their index.
        for p in (0..n).filter(|p| p % 3 != 0) {
            space
                .write(a + p as u64 * PAGE, &(p as u32).to_le_bytes())
                .unwrap();
        }
        let moved = d.migrate_to_device(&space, a, n).unwrap();
        assert_eq!((moved.cpages, moved.migrated), (n, n));
        assert_eq!(
            d.stats().bytes_to_device,
            (n - n.div_ceil(3)) as u64 * 4096,
            "holes are not copied"
        );
        let back = d.migrate_to_host(&space, a, n).unwrap();
        assert_eq!(back.migrated, n);
        for p in 0..n {
            let mut b = [0u8; 4];
            space.read(a + p as u64 * PAGE, &mut b).unwrap();
            let want = if p % 3 == 0 { 0 } else { p as u32 };
            assert_eq!(u32::from_le_bytes(b), want, "{kind:?} page {p}");
        }
        assert_eq!(d.resident_pages(), 0);
    }
}
