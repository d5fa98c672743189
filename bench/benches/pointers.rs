//! CPU pointers into managed memory (`Context::alloc_mapped`), measured in one run beside
//! their floors:
//! - the fault-back of one 4 KiB device page through a plain load (p50, p99), beside the same
//!   fault through `Buffer::read` and a bare userfaultfd round trip (register, touch,
//!   `UFFDIO_ZEROPAGE` from a handler thread), the floor any userfaultfd design pays;
//! - a sequential scan of a 256 MiB device-resident buffer through a pointer, beside the scan
//!   of the same buffer resident in host memory, and beside the same device-resident scan
//!   over a frame pool that punches the home frames of device-resident pages (opt-in: the
//!   cost of giving their memory back: the prefetch punches, and the pages coming back land
//!   in fresh frames of the file).
//!
//! The device is `HETMEM_DEVICE` (lavapipe where there is no GPU). Percentiles go to
//! `target/criterion/hetmem-pointers.json` for `cargo xtask bench-report`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion, Throughput};
use hetmem::mm::MemoryKind;
use hetmem::offload::{Buffer, Context, ContextConfig, Location};
use hetmem_bench::{criterion_mean_ns, save_results};
use hetmem_engine::{DeviceConfig, HostFramePool};

const PAGE: usize = 4096;
/// Pages whose single-page faults are timed per round.
const FAULT_PAGES: usize = 2048;
const SCAN_BYTES: usize = 256 << 20;

fn context(budget: u64, fault_around: usize) -> Context {
    context_over(budget, fault_around, None)
}

/// A context over `frames` (the process-wide pool if `None`).
fn context_over(budget: u64, fault_around: usize, frames: Option<Arc<HostFramePool>>) -> Context {
    let mut device = DeviceConfig::from_env().expect("HETMEM_DEVICE");
    device.frames = frames;
    Context::new(ContextConfig {
        device,
        budget_bytes: budget,
        memory: Some(MemoryKind::DevicePrivate),
        fault_around,
    })
    .expect("a device")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// The order single-page faults are taken in: every other page, backwards (no two faults
/// are neighbours, so no window grows and no fault-around brings the next one).
fn scattered(pages: usize) -> impl Iterator<Item = usize> {
    (0..pages).rev().step_by(2)
}

/// Times the fault of each page of `buf` (moved to the device first) through `touch`.
fn fault_latencies(buf: &Buffer, mut touch: impl FnMut(usize)) -> Vec<Duration> {
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    let mut out = Vec::with_capacity(FAULT_PAGES / 2);
    for i in scattered(buf.len() / PAGE) {
        let t = Instant::now();
        touch(i * PAGE);
        out.push(t.elapsed());
    }
    out.sort();
    out
}

/// Round trips of a bare userfaultfd: an anonymous region registered for missing faults, a
/// handler thread that answers each with `UFFDIO_ZEROPAGE` (`copy` false: the floor of any
/// userfaultfd design) or with `UFFDIO_COPY` of a 4 KiB page (`copy` true: the floor of the
/// design hetmem did not take, anonymous memory filled by copying each faulting page in).
fn bare_uffd(pages: usize, copy: bool) -> Vec<Duration> {
    const UFFDIO_API: u64 = 0xc018_aa3f;
    const UFFDIO_REGISTER: u64 = 0xc020_aa00;
    const UFFDIO_COPY: u64 = 0xc028_aa03;
    const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
    // SAFETY: raw system calls on descriptors and a mapping this function owns; the handler
    // thread only reads messages and answers them; the region is unmapped after it stops.
    unsafe {
        let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32;
        assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
        let mut api = [0xAAu64, 0, 0];
        assert_eq!(libc::ioctl(fd, UFFDIO_API as _, api.as_mut_ptr()), 0);
        let len = pages * PAGE;
        let base = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as usize;
        let mut reg = [base as u64, len as u64, 1, 0];
        assert_eq!(libc::ioctl(fd, UFFDIO_REGISTER as _, reg.as_mut_ptr()), 0);
        let handler = std::thread::spawn(move || {
            let src = vec![0x5Au8; PAGE];
            let mut served = 0;
            let mut msg = [0u64; 4];
            while served < pages.div_ceil(2) {
                if libc::read(fd, msg.as_mut_ptr().cast(), 32) != 32 {
                    continue;
                }
                let addr = msg[2] & !(PAGE as u64 - 1);
                if copy {
                    // dst, src, len, mode, copy (result)
                    let mut c = [addr, src.as_ptr() as u64, PAGE as u64, 0, 0];
                    libc::ioctl(fd, UFFDIO_COPY as _, c.as_mut_ptr());
                } else {
                    let mut z = [addr, PAGE as u64, 0, 0];
                    libc::ioctl(fd, UFFDIO_ZEROPAGE as _, z.as_mut_ptr());
                }
                served += 1;
            }
        });
        let mut out = Vec::new();
        for i in scattered(pages) {
            let t = Instant::now();
            std::ptr::read_volatile((base + i * PAGE) as *const u8);
            out.push(t.elapsed());
        }
        handler.join().unwrap();
        libc::munmap(base as *mut libc::c_void, len);
        libc::close(fd);
        out.sort();
        out
    }
}

fn faults(c: &mut Criterion) {
    let ctx = context(64 << 20, 1);
    let buf = match ctx.alloc_mapped(FAULT_PAGES * PAGE) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pointers bench skipped: {e}");
            return;
        }
    };
    let p = buf.as_ptr().unwrap() as usize;
    let mut rounds: [Vec<Duration>; 4] = Default::default();
    for _ in 0..5 {
        // SAFETY: reads inside the buffer; nothing writes it meanwhile.
        let load = fault_latencies(&buf, |off| unsafe {
            std::ptr::read_volatile((p + off) as *const u8);
        });
        let mut b = [0u8; 1];
        let read = fault_latencies(&buf, |off| buf.read(off, &mut b).unwrap());
        let bare = bare_uffd(FAULT_PAGES, false);
        let copied = bare_uffd(FAULT_PAGES, true);
        rounds[0].extend(load);
        rounds[1].extend(read);
        rounds[2].extend(bare);
        rounds[3].extend(copied);
    }
    for r in &mut rounds {
        r.sort();
    }
    let names = [
        "plain load",
        "Buffer::read",
        "bare userfaultfd round trip",
        "bare UFFDIO_COPY round trip (design not taken)",
    ];
    println!(
        "\nfault-back of one 4 KiB device page ({}):",
        ctx.device_info().name
    );
    println!("{:<48} {:>10} {:>10}", "path", "p50 us", "p99 us");
    let mut json = serde_json::Map::new();
    for (name, r) in names.iter().zip(&rounds) {
        let (p50, p99) = (percentile(r, 0.5), percentile(r, 0.99));
        println!("{name:<48} {p50:>10.1} {p99:>10.1}");
        json.insert(
            name.to_string(),
            serde_json::json!({"p50_us": p50, "p99_us": p99}),
        );
    }
    let ratio = percentile(&rounds[0], 0.5) / percentile(&rounds[2], 0.5);
    println!("plain load p50 / bare round trip p50: {ratio:.2}x");
    json.insert("load_over_bare_p50".into(), ratio.into());
    json.insert("device".into(), ctx.device_info().name.clone().into());
    let _ = save_results("pointers", &serde_json::Value::Object(json));

    // The same through criterion, for its statistics (mean of 64 scattered faults).
    let mut g = c.benchmark_group("pointer-fault");
    g.sample_size(10);
    g.bench_function("plain-load-64-faults", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += fault_latencies(&buf, |off| unsafe {
                    // SAFETY: as above.
                    std::ptr::read_volatile((p + off) as *const u8);
                })
                .iter()
                .take(64)
                .sum::<Duration>();
            }
            total
        })
    });
    g.finish();
}

/// A context (fault-around 16) over a frame pool of its own and a 256 MiB CPU-mapped
/// buffer filled with its word indices; `punch`: the pool gives home frames of
/// device-resident pages back; `ahead`: `HETMEM_CPU_READAHEAD` for its mirror.
fn scan_buffer(punch: bool, ahead: &str) -> Option<(Context, Buffer)> {
    let pool = HostFramePool::new(2 * SCAN_BYTES).expect("a frame pool");
    if punch {
        pool.allow_home_punching();
    } else {
        pool.forbid_home_punching();
    }
    std::env::set_var("HETMEM_CPU_READAHEAD", ahead);
    let ctx = context_over(2 * SCAN_BYTES as u64, 16, Some(pool));
    let buf = match ctx.alloc_mapped(SCAN_BYTES) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("pointers bench skipped: {e}");
            return None;
        }
    };
    std::env::remove_var("HETMEM_CPU_READAHEAD");
    buf.view_mut::<u64>()
        .unwrap()
        .iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w = i as u64);
    Some((ctx, buf))
}

/// The sum of the buffer's words through a view, checked against what `scan_buffer` wrote
/// (a page mapped with the wrong bytes fails the bench).
fn sum(buf: &Buffer) -> u64 {
    let words = (SCAN_BYTES / 8) as u64;
    let got = buf
        .view::<u64>()
        .unwrap()
        .iter()
        .fold(0u64, |a, &w| a.wrapping_add(w));
    assert_eq!(got, words * (words - 1) / 2, "a scan read wrong words");
    got
}

/// `iters` rounds of: prefetch to the device, then a timed scan; returns the scans' time
/// and the prefetches'.
fn device_resident(buf: &Buffer, iters: u64) -> (Duration, Duration) {
    let (mut scan, mut out) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..iters {
        let t = Instant::now();
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        out += t.elapsed();
        let t = Instant::now();
        std::hint::black_box(sum(buf));
        scan += t.elapsed();
    }
    (scan, out)
}

/// The scan variants: criterion name, whether home frames are punched, read-ahead mode.
/// The default is the first (no punching, mapping ahead). Punching (opt-in) runs last: it
/// churns the system's memory, which slowed whatever ran right after it. Variants run one after another in blocks, so a
/// shared machine's load drifts between them: the `pointer_scan_ahead` example compares
/// read-ahead modes in interleaved rounds.
const SCANS: [(&str, bool, &str); 3] = [
    ("device-resident", false, "map"),
    ("device-resident-bring-ahead", false, "bring"),
    ("device-resident-punching", true, "map"),
];

fn scan(c: &mut Criterion) {
    let mut g = c.benchmark_group("pointer-scan");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SCAN_BYTES as u64));
    {
        let Some((_ctx, buf)) = scan_buffer(false, "map") else {
            return;
        };
        g.bench_function("host-resident", |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    std::hint::black_box(sum(&buf));
                }
                t.elapsed()
            })
        });
    }
    // Mean prefetch to the device (ms) and frames punched, per variant.
    let mut prefetch = [(0f64, 0u64); SCANS.len()];
    for (k, &(name, punch, ahead)) in SCANS.iter().enumerate() {
        let Some((ctx, buf)) = scan_buffer(punch, ahead) else {
            return;
        };
        let (mut out, mut rounds) = (Duration::ZERO, 0u64);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let (scan, o) = device_resident(&buf, iters);
                out += o;
                rounds += iters;
                scan
            })
        });
        let punched = ctx.driver().device().frames().punched_frames();
        prefetch[k] = (out.as_secs_f64() * 1e3 / rounds.max(1) as f64, punched);
    }
    g.finish();
    report_scans(&prefetch);
}

/// Prints the scans' figures (same run) and saves them for `cargo xtask bench-report`.
fn report_scans(prefetch: &[(f64, u64); SCANS.len()]) {
    let Some(host) = criterion_mean_ns("pointer-scan", "host-resident") else {
        return;
    };
    let gbs = |ns: f64| SCAN_BYTES as f64 / ns;
    println!(
        "\nsequential scan of 256 MiB through a pointer: host-resident {:.2} GB/s",
        gbs(host)
    );
    let mut json = serde_json::Map::new();
    json.insert("host_gbs".into(), gbs(host).into());
    for (&(name, _, _), &(ms, punched)) in SCANS.iter().zip(prefetch) {
        let Some(dev) = criterion_mean_ns("pointer-scan", name) else {
            continue;
        };
        println!(
            "{name:<44} {:>6.2} GB/s ({:.2}x of host-resident); prefetch to the device \
             {ms:.1} ms, {punched} frames punched",
            gbs(dev),
            host / dev
        );
        json.insert(
            name.into(),
            serde_json::json!({"gbs": gbs(dev), "ratio": host / dev, "prefetch_ms": ms}),
        );
    }
    if let Some(dev) = criterion_mean_ns("pointer-scan", "device-resident") {
        json.insert("device_gbs".into(), gbs(dev).into());
        json.insert("ratio".into(), (host / dev).into());
    }
    let _ = save_results("pointer-scan", &serde_json::Value::Object(json));
}

criterion_group!(benches, faults, scan);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
