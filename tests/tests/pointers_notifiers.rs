//! Notifiers (safe code: `ctx.space().register_notifier`) that touch CPU-mapped memory while
//! they are told of an invalidation. The rule (`hetmem::cpu`, `docs/ARCHITECTURE.md`): the
//! fault path waits only for invalidations that overlap the faulting window, so a notifier
//! may read a CPU-mapped page of another range and its load is served; a load of a page of a
//! range being invalidated, by the thread running that invalidation (or any load by a thread
//! that holds the map lock exclusively: mprotect, mremap, fork), cannot be served: the thread
//! gets `SIGBUS` and the error (`Error::Reentrant`) is recorded. Nothing hangs. Each scenario
//! runs in a child process of this binary (a hang or a signal ends it).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hetmem::mm::{Notifier, NotifyEvent, NotifyRange, Prot, SpaceId};
use hetmem::offload::{Buffer, Context, Location};
use hetmem::{Error, VirtAddr};
use hetmem_engine::DeviceKind;
use hetmem_tests::harness::{block_sigbus_here, mapped_buffer, offload_context, run_child};

const PAGE: usize = 4096;
/// Exit code of a child that found the error it expected recorded.
const RECORDED: i32 = 77;

/// A notifier that, once armed, loads the byte at `target` (a CPU pointer) whenever it is
/// told of an invalidation of `event` that overlaps `[watch, watch_end)`, and counts them.
struct Peek {
    armed: AtomicBool,
    event: NotifyEvent,
    watch: VirtAddr,
    watch_end: VirtAddr,
    target: usize,
    want: u8,
    seen: AtomicU64,
}

impl Notifier for Peek {
    fn invalidate(&self, _space: SpaceId, range: &NotifyRange) {
        let hit =
            range.event == self.event && range.start < self.watch_end && self.watch < range.end;
        if !hit || !self.armed.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: `target` lies in a live CPU-mapped buffer that the test keeps until the
        // notifier is disarmed; no other thread writes it.
        let b = unsafe { (self.target as *const u8).read_volatile() };
        assert_eq!(b, self.want, "the notifier read a wrong byte");
        self.seen.fetch_add(1, Ordering::Relaxed);
    }
}

fn peek(event: NotifyEvent, watch: &Buffer, target: &Buffer, want: u8) -> Arc<Peek> {
    Arc::new(Peek {
        armed: AtomicBool::new(false),
        event,
        watch: watch.addr(),
        watch_end: watch.addr() + watch.len() as u64,
        target: target.as_ptr().unwrap() as usize,
        want,
        seen: AtomicU64::new(0),
    })
}

/// A context on the host device and a two-page CPU-mapped buffer whose first byte is
/// `byte`, resident on the device; `None` where CPU pointers cannot be had (outside CI).
fn device_resident(test: &str, byte: u8) -> Option<(Context, Buffer)> {
    let ctx = offload_context(DeviceKind::Host, 1 << 20, None, test).unwrap();
    let buf = mapped_buffer(&ctx, 2 * PAGE, test)?;
    buf.write(0, &[byte]).unwrap();
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    Some((ctx, buf))
}

/// Runs `test` in a child per mode and checks how each ended: `Ok(code)` an exit code,
/// `Err(signal)` a signal.
fn expect_children(test: &str, modes: &[(&str, Result<i32, i32>)]) {
    use std::os::unix::process::ExitStatusExt;
    for &(mode, want) in modes {
        let status = run_child(test, mode, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{mode}: the child hung"));
        let got = status.code().ok_or_else(|| status.signal().unwrap_or(0));
        assert_eq!(got, want, "{mode}: child {status:?}");
    }
}

/// Found as a deadlock: a notifier that read a device-resident CPU-mapped buffer while an
/// unrelated range was unmapped hung the fault thread (it waited for every invalidation in
/// progress, and munmap ran its notifiers under the exclusive map lock every fault needs).
/// Now the load is served with the right byte, and so is a later fault.
#[test]
fn a_notifier_reading_a_view_during_an_unrelated_unmap_is_served() {
    let test = "a_notifier_reading_a_view_during_an_unrelated_unmap_is_served";
    if std::env::var("HETMEM_CHILD").is_err() {
        return expect_children(test, &[("unmap", Ok(0))]);
    }
    let Some((ctx, buf)) = device_resident(test, 0x3C) else {
        std::process::exit(0);
    };
    let plain = ctx.alloc(PAGE).unwrap();
    let p = peek(NotifyEvent::Unmap, &plain, &buf, 0x3C);
    let id = ctx.space().register_notifier(p.clone());
    p.armed.store(true, Ordering::Release);
    plain.free().unwrap();
    p.armed.store(false, Ordering::Release);
    ctx.space().unregister_notifier(id);
    assert_eq!(p.seen.load(Ordering::Relaxed), 1, "the notifier ran once");
    assert!(ctx.take_cpu_fault_error().is_none());
    // The mirror still serves faults: the second page comes back through a view.
    buf.prefetch(0..buf.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(buf.view::<u8>().unwrap()[PAGE], 0);
    std::process::exit(0);
}

/// A notifier told of one buffer's migration to the device (an invalidation that holds the
/// map lock shared, as every migration does) reads another, device-resident buffer through
/// a pointer: served with the right byte (the fault thread used to wait for the migration's
/// invalidation, which waited for the notifier).
#[test]
fn a_notifier_reading_a_view_during_an_unrelated_migration_is_served() {
    let test = "a_notifier_reading_a_view_during_an_unrelated_migration_is_served";
    if std::env::var("HETMEM_CHILD").is_err() {
        return expect_children(test, &[("migrate", Ok(0))]);
    }
    let Some((ctx, buf)) = device_resident(test, 0x5A) else {
        std::process::exit(0);
    };
    let other = ctx.alloc(4 * PAGE).unwrap();
    other.write(0, &[1; 4 * PAGE]).unwrap();
    let p = peek(NotifyEvent::Migrate, &other, &buf, 0x5A);
    let id = ctx.space().register_notifier(p.clone());
    p.armed.store(true, Ordering::Release);
    other
        .prefetch(0..other.len(), Location::Device)
        .unwrap()
        .wait()
        .unwrap();
    p.armed.store(false, Ordering::Release);
    ctx.space().unregister_notifier(id);
    assert!(
        p.seen.load(Ordering::Relaxed) >= 1,
        "the notifier never ran"
    );
    assert!(ctx.take_cpu_fault_error().is_none());
    let mut back = [0u8; 4 * PAGE];
    other.read(0, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 1));
    std::process::exit(0);
}

/// A notifier that reads a page of the very range it is told is being invalidated (a
/// migration of that buffer to the device), or any device-resident page while its thread
/// holds the map lock exclusively (an mprotect of another range), cannot be served: its
/// thread gets `SIGBUS` (the child dies of it), and with the signal blocked the error is
/// recorded as `Reentrant` at the loaded address. It used to hang (the fault waited for the
/// invalidation that waited for the notifier).
#[test]
fn a_notifier_reading_the_range_being_invalidated_gets_sigbus_with_the_error_recorded() {
    let test = "a_notifier_reading_the_range_being_invalidated_gets_sigbus_with_the_error_recorded";
    let Ok(mode) = std::env::var("HETMEM_CHILD") else {
        return expect_children(
            test,
            &[
                ("own-default", Err(libc::SIGBUS)),
                ("own-blocked", Ok(RECORDED)),
                ("protect-default", Err(libc::SIGBUS)),
                ("protect-blocked", Ok(RECORDED)),
            ],
        );
    };
    let ctx = offload_context(DeviceKind::Host, 1 << 20, None, test).unwrap();
    let Some(buf) = mapped_buffer(&ctx, 2 * PAGE, test) else {
        // No CPU pointers here (outside CI): say what the parent expects.
        if mode.ends_with("default") {
            // SAFETY: raising a signal in our own process, as the scenario would.
            unsafe { libc::raise(libc::SIGBUS) };
        }
        std::process::exit(RECORDED);
    };
    buf.write(0, &[0x42; 2 * PAGE]).unwrap();
    let own = mode.starts_with("own");
    let plain = ctx.alloc(PAGE).unwrap();
    let p = if own {
        // The buffer's own migration: the load is of a page being invalidated.
        peek(NotifyEvent::Migrate, &buf, &buf, 0x42)
    } else {
        buf.prefetch(0..buf.len(), Location::Device)
            .unwrap()
            .wait()
            .unwrap();
        peek(NotifyEvent::Protect, &plain, &buf, 0x42)
    };
    let target = p.target as u64;
    ctx.space().register_notifier(p.clone());
    let (space, plain_addr, b) = (ctx.space().clone(), plain.addr(), buf.clone());
    let act = move || {
        p.armed.store(true, Ordering::Release);
        if own {
            let _ = b.prefetch(0..b.len(), Location::Device).map(|t| t.wait());
        } else {
            let _ = space.mprotect(plain_addr, PAGE as u64, Prot::READ);
        }
    };
    if mode.ends_with("default") {
        act();
        unreachable!("the notifier's load must not complete");
    }
    std::thread::spawn(move || {
        block_sigbus_here();
        act();
    });
    for _ in 0..1000 {
        if let Some(e) = ctx.take_cpu_fault_error() {
            assert_eq!(e.addr, target);
            assert!(matches!(e.error, Error::Reentrant), "{:?}", e.error);
            std::process::exit(RECORDED);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no fault error recorded");
}
