//! The copy engine against memcpy of the same bytes: 256 MiB host -> device -> host, as one
//! run of pages and as 65 536 scattered 4 KiB pages.

use criterion::{criterion_group, Criterion, Throughput};
use hetmem_bench::{print_ratios, Baseline, PAGE};
use hetmem_engine::{Device, DeviceConfig, Pfn};
use rand::seq::SliceRandom;
use rand::SeedableRng;

const BYTES: usize = 256 << 20;
const GROUP: &str = "copy_256MiB";

fn bench_copy(c: &mut Criterion) {
    let mut g = c.benchmark_group(GROUP);
    g.sample_size(10)
        .throughput(Throughput::Bytes(BYTES as u64));
    g.warm_up_time(std::time::Duration::from_secs(1));
    g.measurement_time(std::time::Duration::from_secs(4));

    let mut base = Baseline::new(BYTES);
    g.bench_function("memcpy_contiguous", |b| b.iter(|| base.contiguous()));
    g.bench_function("memcpy_scattered", |b| b.iter(|| base.scattered()));
    drop(base);

    let config = DeviceConfig::from_env()
        .expect("HETMEM_DEVICE")
        .budget(BYTES as u64 + (64 << 20));
    let dev = Device::open(config).expect("open device");
    eprintln!(
        "device: {} ({:?}, {:?})",
        dev.info().name,
        dev.info().kind,
        dev.info().host_access
    );
    let pages = BYTES / PAGE;
    let frames = dev.frames().alloc_batch(pages, false).expect("frames");
    let on_dev = dev.alloc_pages(pages, false).expect("device pages");
    let mut shuffled = on_dev.clone();
    shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let zip = |a: &[Pfn], b: &[Pfn]| a.iter().copied().zip(b.iter().copied()).collect::<Vec<_>>();
    let h2d = zip(&frames, &on_dev);
    let d2h = zip(&on_dev, &frames);
    let h2d_s = zip(&frames, &shuffled);
    let d2h_s = zip(&shuffled, &frames);
    for (name, pairs) in [
        ("h2d_contiguous", &h2d),
        ("d2h_contiguous", &d2h),
        ("h2d_scattered", &h2d_s),
        ("d2h_scattered", &d2h_s),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| dev.copy(pairs).unwrap().wait().unwrap())
        });
    }
    g.finish();
    dev.free_pages(&on_dev).unwrap();
    dev.frames().free_batch(&frames).unwrap();
}

criterion_group!(benches, bench_copy);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    print_ratios(
        "copy engine vs memcpy of the same 256 MiB (same run)",
        BYTES as u64,
        &[
            (
                "host->device, one run",
                GROUP,
                "h2d_contiguous",
                "memcpy_contiguous",
            ),
            (
                "device->host, one run",
                GROUP,
                "d2h_contiguous",
                "memcpy_contiguous",
            ),
            (
                "host->device, 65536 scattered 4 KiB",
                GROUP,
                "h2d_scattered",
                "memcpy_scattered",
            ),
            (
                "device->host, 65536 scattered 4 KiB",
                GROUP,
                "d2h_scattered",
                "memcpy_scattered",
            ),
        ],
    );
}
