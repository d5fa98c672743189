//! Runs 256 MiB host -> device -> host round trips through `GpuDriver`, for profiling, and
//! prints each round's time.
use std::time::Instant;

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::mm::{AddressSpace, MemoryKind, PageMap, Prot};
use hetmem_engine::{Device, DeviceConfig};

fn main() {
    let bytes: usize = 256 << 20;
    let dev = Device::open(
        DeviceConfig::from_env()
            .unwrap()
            .budget(bytes as u64 + (64 << 20)),
    )
    .unwrap();
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
    for round in 0..8 {
        let t = Instant::now();
        d.migrate_to_device(&space, a, n).unwrap();
        let t1 = t.elapsed();
        d.migrate_to_host(&space, a, n).unwrap();
        println!("round {round}: there {:?}, back {:?}", t1, t.elapsed() - t1);
    }
    let s = d.stats();
    println!(
        "copy {} ms, bookkeeping {} ms",
        s.copy_ns / 1_000_000,
        s.bookkeeping_ns / 1_000_000
    );
}
