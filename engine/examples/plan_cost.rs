//! Times planning vs copying for 65 536 scattered pages (a development aid).
use hetmem_engine::{Device, DeviceConfig};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::time::Instant;

fn main() {
    let dev = Device::open(DeviceConfig::from_env().unwrap().budget(320 << 20)).unwrap();
    let n = 65536;
    let frames = dev.frames().alloc_batch(n, false).unwrap();
    let mut pages = dev.alloc_pages(n, false).unwrap();
    pages.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let pairs: Vec<_> = frames.iter().copied().zip(pages.iter().copied()).collect();
    for _ in 0..3 {
        let t = Instant::now();
        let plan = dev.plan(&pairs).unwrap();
        let tp = t.elapsed();
        let t = Instant::now();
        dev.copy(&pairs).unwrap().wait().unwrap();
        let tc = t.elapsed();
        println!(
            "plan {:?} ({} regions), plan+copy {:?}",
            tp,
            plan.region_count(),
            tc
        );
    }
}
