//! Runs 256 MiB host -> device -> host round trips through `GpuDriver`, for profiling, and
//! prints each round's time and copy regions. With `churn` as argument, the host frame pool
//! is first allocated and freed in batches of growing sizes, as the size sweep leaves it.
use std::time::Instant;

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{AddressSpace, MemoryKind, PageMap, Prot};
use hetmem_engine::{Device, DeviceConfig};

fn main() {
    let bytes: usize = 256 << 20;
    let dev = Device::open(DeviceConfig::from_env().unwrap().budget(bytes as u64)).unwrap();
    if std::env::args().nth(1).as_deref() == Some("churn") {
        for size in [16usize, 256, 4096, 65536, 65536] {
            let f = dev.frames().alloc_batch(size, false).unwrap();
            dev.frames().free_batch(&f).unwrap();
        }
    }
    let pm = PageMap::new(dev.frames().clone()).unwrap();
    let d = GpuDriver::new(
        dev,
        &pm,
        DriverConfig {
            kind: Some(MemoryKind::DevicePrivate),
            ..Default::default()
        },
    )
    .unwrap();
    let space = AddressSpace::new(&pm);
    let n = bytes / 4096;
    let a = space.mmap(None, bytes as u64, Prot::RW, false).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for k in 0..(bytes >> 20) as u64 {
        space.write(a + (k << 20), &chunk).unwrap();
    }
    // ROUNDS=n runs more rounds (for a profiler's steady state).
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    for round in 0..rounds {
        let r0 = d.device().stats().regions;
        let t = Instant::now();
        d.migrate_to_device(&space, a, n).unwrap();
        let t1 = t.elapsed();
        let r1 = d.device().stats().regions;
        d.migrate_to_host(&space, a, n).unwrap();
        let r2 = d.device().stats().regions;
        println!(
            "round {round}: there {:?} ({} regions), back {:?} ({} regions)",
            t1,
            r1 - r0,
            t.elapsed() - t1,
            r2 - r1
        );
    }
    let s = d.stats();
    println!(
        "copy {} ms, bookkeeping {} ms",
        s.copy_ns / 1_000_000,
        s.bookkeeping_ns / 1_000_000
    );
}
