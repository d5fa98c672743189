//! Runs migrations of 65 536 pages to the host device and back with copies skipped, for
//! profiling the bookkeeping (`perf record`), and prints ns per page.
use std::sync::Arc;
use std::time::{Duration, Instant};

use hetmem::migration::*;
use hetmem::mm::{AddressSpace, FaultContext, MemoryKind, Page, PageMap, PagemapOps, Prot, PAGE};
use hetmem::Owner;
use hetmem_engine::{Device, DeviceConfig, DeviceKind};

struct FreeOnly(Device);
impl PagemapOps for FreeOnly {
    fn page_free(&self, page: &Page) {
        self.0.free_page(page.pfn()).unwrap();
    }
    fn pages_free(&self, pages: &[&Page]) {
        // One call for the batch, as GpuDriver does.
        let pfns: Vec<_> = pages.iter().map(|p| p.pfn()).collect();
        self.0.free_pages(&pfns).unwrap();
    }
    fn pfns_free(&self, _: &[&Page], pfns: &[hetmem_engine::Pfn]) {
        // As GpuDriver does: by frame number, which the page map read already.
        self.0.free_pages(pfns).unwrap();
    }
    fn migrate_to_ram(&self, _: FaultContext<'_>) -> hetmem::Result<()> {
        unreachable!()
    }
}

fn main() {
    // Pages per migration and rounds: `bookkeeping_profile [pages] [rounds]`.
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(65_536);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let dev = Device::open(
        DeviceConfig::default()
            .kind(DeviceKind::Host)
            .budget((n * 4096) as u64),
    )
    .unwrap();
    let pm = PageMap::new(dev.frames().clone()).unwrap();
    pm.register_device(
        dev.pfn_range(),
        MemoryKind::DevicePrivate,
        Owner(9),
        Arc::new(FreeOnly(dev.clone())),
        None,
    )
    .unwrap();
    let space = AddressSpace::new(&pm);
    let a = space.mmap(None, n as u64 * PAGE, Prot::RW, false).unwrap();
    for k in 0..n as u64 {
        space.write(a + k * PAGE, &[1]).unwrap();
    }
    let mut sum = Duration::ZERO;
    let mut per_round = Vec::with_capacity(rounds);
    // The fastest time of each stage (setup, pages, finalize) per direction, over the last
    // half of the rounds: the floor, which noise from other tenants of the machine does
    // not move.
    let mut fastest = [[Duration::MAX; 3]; 2];
    for round in 0..rounds {
        let mut total = Duration::ZERO;
        for (flags, to_dev) in [
            (MIGRATE_VMA_SELECT_SYSTEM, true),
            (MIGRATE_VMA_SELECT_DEVICE_PRIVATE, false),
        ] {
            let mut src = vec![0u64; n];
            let mut dst = vec![0u64; n];
            let mut m = MigrateVma::new(&space, a, a + n as u64 * PAGE, &mut src, &mut dst);
            m.flags = flags;
            m.pgmap_owner = Owner(9);
            let t0 = Instant::now();
            migrate_vma_setup(&mut m).unwrap();
            let t1 = Instant::now();
            let pfns = if to_dev {
                dev.alloc_pages(n, false).unwrap()
            } else {
                pm.frames().alloc_batch(n, false).unwrap()
            };
            for (i, &p) in pfns.iter().enumerate() {
                if to_dev {
                    pm.claim_device_page(p, true).unwrap().into_pfn();
                } else {
                    pm.claim_frame(p, true).unwrap().into_pfn();
                }
                m.dst[i] = migrate_pfn(p);
            }
            let t2 = Instant::now();
            migrate_vma_pages(&mut m).unwrap();
            let t3 = Instant::now();
            migrate_vma_finalize(&mut m);
            let t4 = Instant::now();
            if round >= rounds / 2 {
                let best = &mut fastest[usize::from(!to_dev)];
                for (b, t) in best.iter_mut().zip([t1 - t0, t3 - t2, t4 - t3]) {
                    *b = (*b).min(t);
                }
            }
            total += (t1 - t0) + (t4 - t2);
        }
        if round >= rounds / 2 {
            sum += total;
            per_round.push(total);
        }
    }
    report(n, &fastest, per_round, sum);
}

/// Prints each stage's fastest time per direction, and the mean, median and fastest of the
/// rounds' totals (`per_round`, summing to `sum`).
fn report(n: usize, fastest: &[[Duration; 3]; 2], mut per_round: Vec<Duration>, sum: Duration) {
    for (dir, best) in ["to device", "to host  "].iter().zip(fastest) {
        println!(
            "{dir}: fastest setup {:.0} pages {:.0} finalize {:.0} ns/page",
            best[0].as_nanos() as f64 / n as f64,
            best[1].as_nanos() as f64 / n as f64,
            best[2].as_nanos() as f64 / n as f64
        );
    }
    per_round.sort_unstable();
    let per_page = |d: Duration| d.as_nanos() as f64 / (2 * n) as f64;
    let rounds = per_round.len();
    println!(
        "last {rounds} rounds, ns/page per direction: mean {:.0}, median {:.0}, fastest {:.0}",
        sum.as_nanos() as f64 / (2 * n * rounds) as f64,
        per_page(per_round[per_round.len() / 2]),
        per_page(per_round[0])
    );
}
