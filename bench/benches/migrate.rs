//! The migration layer: bookkeeping per page of setup + pages + finalize (copies and
//! destination allocation excluded), and 256 MiB of 4 KiB pages host -> device -> host end to
//! end through `GpuDriver`, beside two memcpys of the same bytes in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::migration::*;
use hetmem::mm::{AddressSpace, FaultContext, MemoryKind, Page, PageMap, PagemapOps, Prot, PAGE};
use hetmem::{Owner, VirtAddr};
use hetmem_bench::{criterion_mean_ns, print_ratios, Baseline};
use hetmem_engine::{Device, DeviceConfig, DeviceKind};

const SIZES: [usize; 6] = [1, 16, 512, 4096, 32_768, 262_144];

/// Frees device pages; never faults (the bench never touches device pages from the CPU).
struct FreeOnly(Device);

impl PagemapOps for FreeOnly {
    fn page_free(&self, page: &Page) {
        self.0.free_page(page.pfn()).expect("free device page");
    }
    fn pages_free(&self, pages: &[&Page]) {
        // One call for the batch, as GpuDriver does.
        let pfns: Vec<_> = pages.iter().map(|p| p.pfn()).collect();
        self.0.free_pages(&pfns).expect("free device page");
    }
    fn pfns_free(&self, _: &[&Page], pfns: &[hetmem_engine::Pfn]) {
        // As GpuDriver does: by frame number, which the page map read already.
        self.0.free_pages(pfns).expect("free device page");
    }
    fn migrate_to_ram(&self, f: FaultContext<'_>) -> hetmem::Result<()> {
        Err(hetmem::Error::FaultFailed {
            addr: f.addr,
            reason: "bench driver does not fault".into(),
        })
    }
}

/// What one bookkeeping run works on.
struct Range<'a> {
    space: &'a AddressSpace,
    dev: &'a Device,
    pm: &'a PageMap,
    addr: VirtAddr,
    pages: usize,
    owner: Owner,
}

/// One migration with the copy skipped; returns the time of setup + pages + finalize.
fn one_way(r: &Range<'_>, flags: u32, to_device: bool) -> Duration {
    let n = r.pages;
    let mut src = vec![0u64; n];
    let mut dst = vec![0u64; n];
    let mut m = MigrateVma::new(
        r.space,
        r.addr,
        r.addr + n as u64 * PAGE,
        &mut src,
        &mut dst,
    );
    m.flags = flags;
    m.pgmap_owner = r.owner;
    let t0 = Instant::now();
    migrate_vma_setup(&mut m).unwrap();
    let t1 = Instant::now();
    let pfns = if to_device {
        r.dev.alloc_pages(n, false).unwrap()
    } else {
        r.pm.frames().alloc_batch(n, false).unwrap()
    };
    for (i, &p) in pfns.iter().enumerate() {
        if to_device {
            r.pm.claim_device_page(p, true).unwrap().into_pfn();
        } else {
            r.pm.claim_frame(p, true).unwrap().into_pfn();
        }
        m.dst[i] = migrate_pfn(p);
    }
    let t2 = Instant::now();
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    (t1 - t0) + t2.elapsed()
}

fn bookkeeping(c: &mut Criterion) {
    let mut g = c.benchmark_group("bookkeeping");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let max = *SIZES.last().unwrap();
    let dev = Device::open(
        DeviceConfig::default()
            .kind(DeviceKind::Host)
            .budget((max * 4096) as u64),
    )
    .unwrap();
    let pm = PageMap::new(dev.frames().clone()).unwrap();
    let owner = Owner(0xb0);
    pm.register_device(
        dev.pfn_range(),
        MemoryKind::DevicePrivate,
        owner,
        Arc::new(FreeOnly(dev.clone())),
        None,
    )
    .unwrap();
    for n in SIZES {
        let space = AddressSpace::new(&pm);
        let a = space.mmap(None, n as u64 * PAGE, Prot::RW, false).unwrap();
        for k in 0..n as u64 {
            space.write(a + k * PAGE, &[1]).unwrap();
        }
        g.throughput(Throughput::Elements(2 * n as u64));
        let range = Range {
            space: &space,
            dev: &dev,
            pm: &pm,
            addr: a,
            pages: n,
            owner,
        };
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut t = Duration::ZERO;
                for _ in 0..iters {
                    t += one_way(&range, MIGRATE_VMA_SELECT_SYSTEM, true);
                    t += one_way(&range, MIGRATE_VMA_SELECT_DEVICE_PRIVATE, false);
                }
                t
            })
        });
    }
    g.finish();
}

const BYTES: usize = 256 << 20;

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("round_trip_256MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(2 * BYTES as u64));
    let mut base = Baseline::new(BYTES);
    g.bench_function("memcpy_there_and_back", |b| {
        b.iter(|| {
            base.contiguous();
            base.contiguous();
        })
    });
    drop(base);
    let config = DeviceConfig::from_env()
        .unwrap()
        .budget(BYTES as u64 + (64 << 20));
    let dev = Device::open(config).unwrap();
    eprintln!("device: {} ({:?})", dev.info().name, dev.info().kind);
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
    let n = BYTES / 4096;
    let a = space.mmap(None, BYTES as u64, Prot::RW, false).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 241) as u8).collect();
    for k in 0..(BYTES >> 20) as u64 {
        space.write(a + (k << 20), &chunk).unwrap();
    }
    g.bench_function("hetmem_4KiB_pages", |b| {
        b.iter(|| {
            assert_eq!(d.migrate_to_device(&space, a, n).unwrap().migrated, n);
            assert_eq!(d.migrate_to_host(&space, a, n).unwrap().migrated, n);
        })
    });
    g.finish();
    let mut check = vec![0u8; 1 << 20];
    space.read(a + (7 << 20), &mut check).unwrap();
    assert_eq!(check, chunk, "bytes survived the round trips");
}

criterion_group!(benches, round_trip, bookkeeping);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    println!("\nbookkeeping per page (setup + pages + finalize, both directions, copy excluded)");
    for n in SIZES {
        if let Some(t) = criterion_mean_ns("bookkeeping", &n.to_string()) {
            println!("{n:>8} pages: {:>8.1} ns/page", t / (2 * n) as f64);
        }
    }
    print_ratios(
        "256 MiB round trip vs two memcpys (same run)",
        2 * BYTES as u64,
        &[(
            "hetmem migrate_vma_* + GpuDriver",
            "round_trip_256MiB",
            "hetmem_4KiB_pages",
            "memcpy_there_and_back",
        )],
    );
}
