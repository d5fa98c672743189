//! Third adversarial round, engine half (issue 11): the bytes of host frames and device
//! pages from safe code (races between the frame pool's accessors, device copies and
//! views; frames freed under the page map), and engine, migration and offload calls with
//! arguments at the edges of their types.
//!
//! Every test here either held from the start (a regression test that asserts bytes, error
//! kinds or counters) or failed before its fix in the library; an attack that still finds a
//! bug is `#[ignore]`d with the bug named.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use hetmem::migration::*;
use hetmem::mm::{AddressSpace, MemoryKind};
use hetmem::Error;
use hetmem_engine::DeviceKind;

use hetmem_tests::harness::*;

fn setup() -> Gpu {
    gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL)
}

// ---------------------------------------------------------------------------------------
// C. Bytes of frames and device pages from safe code.
// ---------------------------------------------------------------------------------------

/// Runs `write_a`, `write_b` (each writing a whole page of one byte value) on two threads
/// and `read` on a third for up to `rounds` reads; returns the first page read that holds
/// both values (a write half done: the accesses raced).
fn torn_page(
    rounds: usize,
    write_a: impl Fn() + Send + 'static,
    write_b: impl Fn() + Send + 'static,
    read: impl Fn() -> Vec<u8> + Send + 'static,
) -> Option<(usize, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let spawn = |f: Box<dyn Fn() + Send>| {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                f();
            }
        })
    };
    let hs = vec![spawn(Box::new(write_a)), spawn(Box::new(write_b))];
    let reader = thread::spawn(move || {
        // At most `rounds` reads, and no longer than a few seconds of them: under a loaded
        // machine the writers' busy loops slow every read (races showed within a few hundred
        // reads when they were there), and the join below counts anything past 20 s a hang.
        let until = std::time::Instant::now() + Duration::from_secs(8);
        for _ in 0..rounds {
            if std::time::Instant::now() > until {
                break;
            }
            let p = read();
            let a = p.iter().filter(|&&x| x == 0xAA).count();
            if a != 0 && a != p.len() {
                return Some((a, p.len() - a));
            }
        }
        None
    });
    let torn = join_all("torn page reader", vec![reader], Duration::from_secs(20)).remove(0);
    stop.store(true, Ordering::Relaxed);
    join_all("torn page writers", hs, Duration::from_secs(20));
    torn
}

/// `HostFramePool::write` and `read` exclude each other per frame, but a device copy into
/// the same frame (`Device::copy`, safe and public, on the host device a plain memcpy on a
/// worker or the calling thread) takes no part in that lock: safe code races two
/// non-atomic writes of one frame and a read sees half of each.
#[test]
fn frame_pool_write_races_a_device_copy_into_the_frame() {
    for kind in KINDS {
        if let Some(g) = gpu_on(kind, MemoryKind::DevicePrivate, 64, 1, SMALL_POOL) {
            pool_write_races_a_copy(g, kind);
        }
    }
}

/// Reads a torn-page attack makes: fewer where each access is a queue submission (every
/// torn read found before the fix came within the first few hundred).
fn rounds(kind: DeviceKind) -> usize {
    match kind {
        DeviceKind::Host => 200_000,
        _ => 10_000,
    }
}

/// Every kind of device the torn-page attacks run on.
const KINDS: [DeviceKind; 3] = [DeviceKind::Host, DeviceKind::Vulkan, DeviceKind::Wgpu];

fn pool_write_races_a_copy(g: Gpu, kind: DeviceKind) {
    let dev = g.d.device().clone();
    let f = g.pool.alloc(true).unwrap();
    let src = g.pool.alloc(false).unwrap();
    g.pool.write(src, 0, &[0xAA; 4096]).unwrap();
    let (p1, p2) = (g.pool.clone(), g.pool.clone());
    let torn = torn_page(
        rounds(kind),
        move || dev.copy(&[(src, f)]).unwrap().wait().unwrap(),
        move || p1.write(f, 0, &[0x55; 4096]).unwrap(),
        move || {
            let mut v = vec![0u8; 4096];
            p2.read(f, 0, &mut v).unwrap();
            v
        },
    );
    assert_eq!(
        torn, None,
        "{kind:?}: a read saw a copy and a write of the frame half done"
    );
}

/// `Device::write_page` and `read_page` of one device page from several threads: on the
/// host device each is a memcpy under the chunk list's read lock only, so two writes and a
/// read of one page race (non-atomic accesses of the same bytes from safe code).
#[test]
fn device_page_writes_race_each_other() {
    for kind in KINDS {
        if let Some(g) = gpu_on(kind, MemoryKind::DevicePrivate, 64, 1, SMALL_POOL) {
            device_page_writes_race(g, kind);
        }
    }
}

fn device_page_writes_race(g: Gpu, kind: DeviceKind) {
    let x = g.d.device().alloc_page(true).unwrap();
    let (d1, d2, d3) = (
        g.d.device().clone(),
        g.d.device().clone(),
        g.d.device().clone(),
    );
    let torn = torn_page(
        rounds(kind),
        move || d1.write_page(x, 0, &[0xAA; 4096]).unwrap(),
        move || d2.write_page(x, 0, &[0x55; 4096]).unwrap(),
        move || {
            let mut v = vec![0u8; 4096];
            d3.read_page(x, 0, &mut v).unwrap();
            v
        },
    );
    assert_eq!(
        torn, None,
        "{kind:?}: a read saw two writes of a device page half done"
    );
}

// ---------------------------------------------------------------------------------------
// E. Bad input the list did not name: each call returns (an error or a harmless
//    answer), never panics, and what was there before is intact afterwards.
// ---------------------------------------------------------------------------------------

/// Runs `f`, turning a panic into its message.
fn no_panic<T>(what: &str, panics: &mut Vec<String>, f: impl FnOnce() -> T) -> Option<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(v) => Some(v),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panics.push(format!("{what}: {msg}"));
            None
        }
    }
}

/// Frame-pool and device calls with counts, offsets and ranges at the edges of their types.
///
/// Long: a list of independent calls, each with its expected error; one function keeps the
/// list in one place.
#[test]
fn engine_calls_at_the_edges_of_their_types_are_errors() {
    use hetmem_engine::{Pfn, PfnRange};
    watchdog("engine edges", || {
        let g = setup();
        let mut panics = Vec::new();
        let f = g.pool.alloc(false).unwrap();
        g.pool.write(f, 0, b"kept").unwrap();
        let used = g.pool.in_use();
        let p = &mut panics;
        let pool = &g.pool;
        let dev = g.d.device();
        let mut b = [0u8; 4];
        let r = no_panic("pool.read at usize::MAX", p, || {
            pool.read(f, usize::MAX, &mut b)
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("pool.alloc_batch(usize::MAX)", p, || {
            pool.alloc_batch(usize::MAX, true).map(|v| v.len())
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("pool.reserve_home(usize::MAX)", p, || {
            pool.reserve_home(usize::MAX)
        });
        assert!(!matches!(r, Some(Ok(_))));
        let huge = PfnRange {
            start: pool.pfn_range().start,
            count: u64::MAX,
        };
        let r = no_panic("pool.release_home(count u64::MAX)", p, || {
            pool.release_home(huge)
        });
        assert!(!matches!(r, Some(Ok(_))), "{r:?}");
        let top = PfnRange {
            start: Pfn(u64::MAX),
            count: 2,
        };
        let r = no_panic("pool.release_home(start u64::MAX)", p, || {
            pool.release_home(top)
        });
        assert!(!matches!(r, Some(Ok(_))), "{r:?}");
        let r = no_panic("pool.claim_home(u64::MAX)", p, || {
            pool.claim_home(Pfn(u64::MAX), true)
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("pool.free(u64::MAX)", p, || pool.free(Pfn(u64::MAX)));
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("HostFramePool::new(usize::MAX)", p, || {
            hetmem_engine::HostFramePool::new(usize::MAX).map(|_| ())
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("dev.alloc_pages(usize::MAX)", p, || {
            dev.alloc_pages(usize::MAX, true).map(|v| v.len())
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("dev.page_table(usize::MAX)", p, || {
            dev.page_table(usize::MAX).map(|_| ())
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("dev.read_page(u64::MAX)", p, || {
            dev.read_page(Pfn(u64::MAX), 0, &mut b)
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("dev.copy(u64::MAX -> f)", p, || {
            dev.copy(&[(Pfn(u64::MAX), f)]).map(|_| ())
        });
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("dev.copy(f -> f)", p, || dev.copy(&[(f, f)]).map(|_| ()));
        assert!(!matches!(r, Some(Ok(_))));
        let r = no_panic("DeviceMigration::range at the top", p, || {
            DeviceMigration::range(&g.pm, Pfn(u64::MAX - 1), 4).map(|m| m.cpages())
        });
        assert!(!matches!(r, Some(Ok(_))), "{r:?}");
        let first = g.d.device().pfn_range().start;
        let r = no_panic("DeviceMigration::range of usize::MAX pages", p, || {
            DeviceMigration::range(&g.pm, first, usize::MAX).map(|m| m.cpages())
        });
        assert!(!matches!(r, Some(Ok(_))), "{r:?}");
        let mut src = vec![0u64; 2];
        let r = no_panic("migrate_device_range(u64::MAX - 1, 2)", p, || {
            migrate_device_range(&g.pm, &mut src, Pfn(u64::MAX - 1), 2)
        });
        assert!(!matches!(r, Some(Ok(_))), "{r:?}");
        let mut w = [0u64; 1];
        let mut d = [migrate_pfn(Pfn(u64::MAX >> 7))];
        no_panic("migrate_device_finalize of an unknown pfn", p, || {
            migrate_device_finalize(&g.pm, &mut w, &mut d)
        });
        let mut out = [0u8; 4];
        pool.read(f, 0, &mut out).unwrap();
        assert_eq!(&out, b"kept");
        assert_eq!(
            pool.in_use(),
            used,
            "a failed call took or gave back frames"
        );
        assert!(panics.is_empty(), "panics: {panics:#?}");
    });
}

/// Offload calls with reversed, empty and huge ranges, and views of odd sizes.
#[test]
fn offload_ranges_at_the_edges_are_errors() {
    use hetmem::offload::Location;
    watchdog("offload edges", || {
        let ctx = offload_context(DeviceKind::Host, 16 * 4096, None, "offload edges").unwrap();
        let mut panics = Vec::new();
        let p = &mut panics;
        let b = ctx.alloc(3 * 4096).unwrap();
        b.write(0, b"kept").unwrap();
        #[allow(clippy::reversed_empty_ranges)]
        let bad = [
            5..3,
            0..usize::MAX,
            usize::MAX - 1..usize::MAX,
            4096 * 3..4096 * 3 + 1,
        ];
        for r in bad {
            let what = format!("{r:?}");
            let e = no_panic(&format!("prefetch {what}"), p, || {
                b.prefetch(r.clone(), Location::Device).map(|_| ())
            });
            assert!(matches!(e, Some(Err(_))), "prefetch {what}: {e:?}");
            let e = no_panic(&format!("evict {what}"), p, || {
                b.evict(r.clone()).map(|_| ())
            });
            assert!(matches!(e, Some(Err(_))), "evict {what}: {e:?}");
            let e = no_panic(&format!("pin {what}"), p, || {
                b.pin_on_device(r.clone()).map(|_| ())
            });
            assert!(matches!(e, Some(Err(_))), "pin {what}: {e:?}");
        }
        let e = no_panic("view::<[u8; 5000]>", p, || {
            b.view::<[u8; 5000]>().map(|_| ())
        });
        assert!(matches!(e, Some(Err(_))), "{e:?}");
        let e = no_panic("workgroups(usize::MAX, 1, 1)", p, || {
            hetmem::offload::workgroups(usize::MAX, 1, 1)
        });
        assert!(matches!(e, Some(Err(_))), "{e:?}");
        let mut out = [0u8; 4];
        b.read(0, &mut out).unwrap();
        assert_eq!(&out, b"kept");
        assert!(panics.is_empty(), "panics: {panics:#?}");
    });
}

// ---------------------------------------------------------------------------------------
// J. The frame pool under the page map.
// ---------------------------------------------------------------------------------------

/// The page map's pages are frames of a `HostFramePool` that safe code also holds
/// (`PageMap::frames`, `Device::frames`): `HostFramePool::free` of the frame of a page that a
/// space maps succeeds, the next allocation gets the same frame, and two owners share it
/// (one's writes show in the other's page).
#[test]
fn freeing_a_mapped_pages_frame_through_the_pool_is_refused() {
    let g = setup();
    let a = map(&g.space, 1);
    g.space.write(a, &[0x42; 4096]).unwrap();
    let pfn = g.space.pte(a).pfn().expect("present");
    let r = g.pool.free(pfn);
    assert!(
        matches!(r, Err(hetmem_engine::EngineError::FrameOwned(f)) if f == pfn),
        "{r:?}"
    );
    let r = g.pool.free_batch(&[pfn]);
    if r.is_ok() {
        // Show what it costs: the next page shares the frame.
        let other = AddressSpace::new(&g.pm);
        let b = map(&other, 1);
        other.write(b, &[0x17; 4096]).unwrap();
        let shared = other.pte(b).pfn() == Some(pfn);
        let mine = read(&g.space, a, 1);
        std::mem::forget(other);
        std::mem::forget(g);
        panic!("the pool freed a mapped page's frame; reused: {shared}, first byte now {mine:?}");
    }
    assert_eq!(read(&g.space, a, 4096), vec![0x42; 4096]);
}

/// `register_device` with a caller-made range whose end overflows, or that overlaps the
/// host frames: a typed error, no panic.
#[test]
fn register_device_with_a_bad_range_is_an_error() {
    use hetmem_engine::{Pfn, PfnRange};
    let g = setup();
    struct NoOps;
    impl hetmem::mm::PagemapOps for NoOps {
        fn page_free(&self, _page: &hetmem::mm::Page) {}
        fn migrate_to_ram(&self, _f: hetmem::mm::FaultContext<'_>) -> hetmem::Result<()> {
            Err(Error::InvalidArgument("no faults"))
        }
    }
    let ops = Arc::new(NoOps);
    let mut panics = Vec::new();
    let host = g.pool.pfn_range();
    for range in [
        PfnRange {
            start: Pfn(1 << 45),
            count: u64::MAX,
        },
        PfnRange {
            start: Pfn(u64::MAX - 4),
            count: 8,
        },
        PfnRange {
            start: host.start,
            count: 4,
        },
    ] {
        let r = no_panic(&format!("register_device({range:?})"), &mut panics, || {
            g.pm.register_device(
                range,
                MemoryKind::DevicePrivate,
                hetmem::Owner(9),
                ops.clone(),
                None,
            )
            .map(|_| ())
        });
        assert!(!matches!(r, Some(Ok(()))), "{range:?} registered");
    }
    assert!(panics.is_empty(), "panics: {panics:#?}");
}

/// A shared view (`&[u8]`) of a CPU-mapped buffer is promised unchanging bytes, but the
/// buffer's pages live in home frames of the host frame pool, and `HostFramePool::write`
/// (safe, public) writes any allocated frame: the bytes behind a live `&[u8]` change (a
/// data race and a broken aliasing promise, from safe code). `PageMap::write_frame` and
/// `Device::copy` into the frame do the same.
#[test]
fn a_frame_write_changes_the_bytes_under_a_view() {
    let test = "a_frame_write_changes_the_bytes_under_a_view";
    let pool = hetmem_engine::HostFramePool::new(SMALL_POOL).unwrap();
    let ctx = offload_context(DeviceKind::Host, 64 * 4096, Some(pool.clone()), test).unwrap();
    let Some(buf) = mapped_buffer(&ctx, 4096, test) else {
        return;
    };
    buf.write(0, &[1u8; 4096]).unwrap();
    let view = buf.view::<u8>().unwrap();
    // SAFETY: a plain read of an element of the live view.
    let before = unsafe { std::ptr::read_volatile(&view[0]) };
    let frame = ctx.space().pte(buf.addr()).pfn().expect("mapped");
    let w = pool.write(frame, 0, &[0xEE; 4]);
    assert!(
        matches!(w, Err(hetmem_engine::EngineError::FrameOwned(f)) if f == frame),
        "{w:?}"
    );
    let z = pool.zero(frame);
    assert!(
        matches!(z, Err(hetmem_engine::EngineError::FrameOwned(_))),
        "{z:?}"
    );
    let pw = ctx.space().pagemap().write_frame(frame, 0, &[0xEE; 4]);
    assert!(
        pw.is_err(),
        "PageMap::write_frame of a viewed frame: {pw:?}"
    );
    // A device copy into the frame (from a frame of one's own) is refused before it starts.
    let dev = ctx.driver().device().clone();
    let mine = pool.alloc(false).unwrap();
    pool.write(mine, 0, &[0xEE; 4096]).unwrap();
    let c = dev.copy(&[(mine, frame)]).map(|t| t.wait());
    assert!(
        matches!(c, Err(hetmem_engine::EngineError::FrameOwned(f)) if f == frame),
        "{:?}",
        c.map(|_| ())
    );
    let back = dev.alloc_page(false).unwrap();
    let c = dev.copy_queued(&[(frame, back)]).map(|t| t.wait());
    assert!(c.is_err(), "a copy out of a home frame");
    // Freeing it through the pool is refused too.
    let f = pool.free(frame);
    assert!(
        matches!(f, Err(hetmem_engine::EngineError::FrameOwned(_))),
        "{f:?}"
    );
    // SAFETY: as above.
    let after = unsafe { std::ptr::read_volatile(&view[0]) };
    drop(view);
    assert_eq!(after, before, "a viewed byte changed");
    let mut out = [0u8; 4096];
    buf.read(0, &mut out).unwrap();
    assert_eq!(out, [1u8; 4096], "the buffer's bytes changed");
    dev.free_page(back).unwrap();
    pool.free(mine).unwrap();
}

/// A frame freed (or read) while a queued copy into it is in flight, by the very thread that
/// holds the unwaited ticket: the free waits for the copy instead of handing the frame to a
/// new owner under it, and does not wait for itself (the ticket is never waited here).
#[test]
fn freeing_frames_under_a_copy_in_flight_waits_for_the_copy() {
    for kind in KINDS {
        let Some(g) = gpu_on(kind, MemoryKind::DevicePrivate, 4096, 1, SMALL_POOL) else {
            continue;
        };
        let dev = g.d.device().clone();
        let n = 2048; // 8 MiB: long enough to be in flight on a CPU Vulkan device
        let src = dev.alloc_pages(n, false).unwrap();
        for (i, &p) in src.iter().enumerate() {
            dev.write_page(p, 0, &[(i % 251) as u8; 4096]).unwrap();
        }
        let dst = g.pool.alloc_batch(n, false).unwrap();
        let pairs: Vec<_> = src.iter().copied().zip(dst.iter().copied()).collect();
        let ticket = dev.copy_queued(&pairs).unwrap();
        let mut last = vec![0u8; 4096];
        g.pool.read(dst[n - 1], 0, &mut last).unwrap();
        assert_eq!(
            last,
            vec![((n - 1) % 251) as u8; 4096],
            "{kind:?}: a read of a frame under a copy did not wait for it"
        );
        g.pool.free_batch(&dst).unwrap();
        assert!(
            ticket.is_done().unwrap(),
            "{kind:?}: frames freed under a copy in flight"
        );
        drop(ticket);
        dev.free_pages(&src).unwrap();
    }
}
