//! Fifth adversarial round: attacks on the invalidation change (ranged read sequences,
//! `read_begin_range` / `try_read_begin_range` / `read_retry_range`; munmap's notifiers and
//! zap under the map lock held shared; CPU faults that never sleep on an invalidation).
//!
//! Every test either holds (a regression test asserting bytes, frames, counters or error
//! kinds) or found a bug; one that still finds it is `#[ignore]`d with the bug named. Every
//! racing test runs under a deadline (`watchdog`, `join_all`): a hang fails.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use hetmem::mm::{
    hmm_range_fault, AddressSpace, MemoryKind, Notifier, NotifyEvent, NotifyRange, PageMap, Prot,
    SpaceId, PAGE,
};
use hetmem::{Error, Owner, VirtAddr};
use hetmem_engine::DeviceKind;
use hetmem_tests::dmirror::Dmirror;
use hetmem_tests::harness::*;
use hetmem_tests::open_for_test;

/// How long a racing scenario may run before it counts as a hang.
const RACE_LIMIT: Duration = Duration::from_secs(90);

/// The device kinds these attacks run on: the built-in host device and Vulkan (lavapipe).
const ON: [DeviceKind; 2] = [DeviceKind::Host, DeviceKind::Vulkan];

/// A page map over a device of `kind` (256 pages), a test driver on it and a space; `None`
/// where there is no such device outside CI.
fn setup(kind: DeviceKind, test: &str) -> Option<(Arc<PageMap>, Dmirror, AddressSpace)> {
    let device = open_for_test(kind, 256 * PAGE, test)?;
    let pm = PageMap::new(device.frames().clone()).unwrap();
    let dev = Dmirror::new(device, MemoryKind::DevicePrivate, &pm);
    let space = AddressSpace::new(&pm);
    Some((pm, dev, space))
}

/// A space over the host device alone, for the sequence arithmetic.
fn host_space(test: &str) -> (Arc<PageMap>, Dmirror, AddressSpace) {
    setup(DeviceKind::Host, test).expect("the host device is always there")
}

fn pages(a: VirtAddr, n: u64) -> VirtAddr {
    a + n * PAGE
}

/// An invalidation of exactly `[a, a + n pages)` (mprotect always sends one).
fn protect(space: &AddressSpace, a: VirtAddr, n: u64) {
    space.mprotect(a, n * PAGE, Prot::RW).unwrap();
}

/// Ranges that share an edge with an invalidation do not retry; one page of overlap does,
/// at either end.
#[test]
fn range_retry_counts_overlaps_at_the_edges_only() {
    let (_pm, _dev, space) = host_space("range_retry_edges");
    let a = map(&space, 8);
    let (lo, hi) = (pages(a, 2), pages(a, 4));
    let seq = space.read_begin_range(lo, hi);
    protect(&space, a, 2);
    assert!(
        !space.read_retry_range(seq, lo, hi),
        "ends where the range starts"
    );
    protect(&space, pages(a, 4), 2);
    assert!(
        !space.read_retry_range(seq, lo, hi),
        "starts where the range ends"
    );
    assert!(space.read_retry(seq), "the whole-space sequence saw both");
    protect(&space, pages(a, 3), 2);
    assert!(
        space.read_retry_range(seq, lo, hi),
        "its last page overlaps"
    );
    let seq = space.read_begin_range(lo, hi);
    protect(&space, pages(a, 1), 2);
    assert!(
        space.read_retry_range(seq, lo, hi),
        "its first page overlaps"
    );
    let seq = space.read_begin_range(lo, hi);
    protect(&space, a, 8);
    assert!(space.read_retry_range(seq, lo, hi), "covered whole");
    let seq = space.read_begin_range(lo, hi);
    protect(&space, pages(a, 2), 2);
    assert!(space.read_retry_range(seq, lo, hi), "exactly the range");
    // A range of no page, with nothing running, begins at once at the current sequence.
    assert_eq!(
        space.try_read_begin_range(lo, lo),
        Some(space.invalidate_seq())
    );
}

/// A notifier that blocks its invalidation (once armed) until told to go, so the test can
/// look at the sequence while it runs.
struct Gate {
    armed: AtomicBool,
    entered: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
    go: parking_lot::Mutex<Option<mpsc::Receiver<()>>>,
}

impl Gate {
    fn new() -> (Arc<Gate>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (etx, erx) = mpsc::channel();
        let (gtx, grx) = mpsc::channel();
        let g = Arc::new(Gate {
            armed: AtomicBool::new(true),
            entered: parking_lot::Mutex::new(Some(etx)),
            go: parking_lot::Mutex::new(Some(grx)),
        });
        (g, erx, gtx)
    }
}

impl Notifier for Gate {
    fn invalidate(&self, _: SpaceId, _: &NotifyRange) {
        if !self.armed.swap(false, Ordering::AcqRel) {
            return;
        }
        if let Some(tx) = self.entered.lock().take() {
            tx.send(()).unwrap();
        }
        let rx = self.go.lock().take().unwrap();
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
    }
}

/// While an invalidation runs (its notifier held): a begin of an overlapping range is
/// refused (`try_`) or waits, one of a disjoint or adjacent range goes through; a read begun
/// before it retries if and only if it overlaps. The same holds with munmap (shared hold).
#[test]
fn running_invalidations_hold_up_only_overlapping_reads() {
    for unmap in [false, true] {
        let (_pm, _dev, space) = host_space("running_invalidations");
        let a = map(&space, 8);
        let (victim, v_end) = (pages(a, 2), pages(a, 4));
        let before_in = space.read_begin_range(pages(a, 3), pages(a, 6));
        let before_out = space.read_begin_range(v_end, pages(a, 6));
        let (gate, entered, go) = Gate::new();
        let id = space.register_notifier(gate);
        thread::scope(|s| {
            let changer = s.spawn(|| {
                if unmap {
                    space.munmap(victim, 2 * PAGE).unwrap()
                } else {
                    space.mprotect(victim, 2 * PAGE, Prot::READ).unwrap()
                }
            });
            entered.recv_timeout(Duration::from_secs(20)).unwrap();
            assert_eq!(space.try_read_begin_range(pages(a, 3), pages(a, 4)), None);
            assert_eq!(space.try_read_begin_range(a, pages(a, 3)), None);
            assert!(
                space.try_read_begin_range(a, victim).is_some(),
                "adjacent below"
            );
            assert!(space.try_read_begin_range(v_end, pages(a, 8)).is_some());
            assert!(space.read_retry_range(before_in, pages(a, 3), pages(a, 6)));
            assert!(!space.read_retry_range(before_out, v_end, pages(a, 6)));
            let waiter = s.spawn(|| space.read_begin_range(a, pages(a, 8)));
            thread::sleep(Duration::from_millis(30));
            assert!(!waiter.is_finished(), "an overlapping begin waits");
            go.send(()).unwrap();
            changer.join().unwrap();
            let seq = waiter.join().unwrap();
            assert!(!space.read_retry_range(seq, a, pages(a, 8)));
        });
        assert!(space.read_retry_range(before_in, pages(a, 3), pages(a, 6)));
        assert!(!space.read_retry_range(before_out, v_end, pages(a, 6)));
        space.unregister_notifier(id);
    }
}

/// The space remembers the ranges of the last 256 starts: 256 unrelated starts after a
/// begin are told apart, the 257th makes the read retry, and an overlapping start followed
/// by 255 or by 300 unrelated ones is never forgotten.
#[test]
fn more_starts_than_remembered_make_the_read_retry() {
    let (_pm, _dev, space) = host_space("more_starts_than_remembered");
    let a = map(&space, 4);
    let (lo, hi) = (pages(a, 2), pages(a, 4));
    let seq = space.read_begin_range(lo, hi);
    for _ in 0..256 {
        protect(&space, a, 1);
    }
    assert!(!space.read_retry_range(seq, lo, hi), "256 unrelated starts");
    protect(&space, a, 1);
    assert!(
        space.read_retry_range(seq, lo, hi),
        "257: one was forgotten"
    );
    for tail in [255, 300] {
        let seq = space.read_begin_range(lo, hi);
        protect(&space, pages(a, 3), 1);
        for _ in 0..tail {
            protect(&space, a, 1);
        }
        assert!(space.read_retry_range(seq, lo, hi), "overlap then {tail}");
    }
    // A fresh begin after all that is clean again.
    let seq = space.read_begin_range(lo, hi);
    assert!(!space.read_retry_range(seq, lo, hi));
}

/// A read sequence over an inverted range (`end` below `start`, as a mirror computing
/// `start + len` with wrapping arithmetic gets at the top of the address space) must not be
/// a blind spot: an invalidation of the page at `start` has to make it retry (or the call
/// has to refuse the range). Found: `read_begin_range` never waited and `read_retry_range`
/// never retried there, so a stale frame was accepted; an inverted range now counts as the
/// whole space.
#[test]
fn an_inverted_range_is_not_a_blind_spot() {
    let (_pm, _dev, space) = host_space("inverted_range");
    let a = map(&space, 4);
    let (start, end) = (pages(a, 1), a);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let seq = space.read_begin_range(start, end);
        protect(&space, a, 2);
        space.read_retry_range(seq, start, end)
    }));
    if let Ok(retry) = r {
        assert!(
            retry,
            "an invalidation of the range's first page was missed"
        );
    }
}

/// What a notifier of munmap did when it called back into its space.
#[derive(Default)]
struct Calls {
    mmap: Option<Result<VirtAddr, Error>>,
    munmap: Option<Result<(), Error>>,
    mprotect: Option<Result<(), Error>>,
    read: Option<Result<Vec<u8>, Error>>,
    mirror: Option<Result<usize, Error>>,
}

/// A notifier that, told of the unmap of `[watch, watch + 1 page)`, calls back into the
/// space: changes of mappings (which must be refused as reentrant), a read and a mirror
/// fault of `other` (which may be served: the unmapped range is already out of the space).
struct CallBack {
    space: parking_lot::Mutex<Option<AddressSpace>>,
    watch: VirtAddr,
    other: VirtAddr,
    calls: parking_lot::Mutex<Calls>,
}

impl Notifier for CallBack {
    fn invalidate(&self, _: SpaceId, range: &NotifyRange) {
        if range.event != NotifyEvent::Unmap || range.start != self.watch {
            return;
        }
        let guard = self.space.lock();
        let space = guard.as_ref().unwrap();
        let mut c = self.calls.lock();
        c.mmap = Some(space.mmap(None, PAGE, Prot::RW, false));
        c.munmap = Some(space.munmap(self.other + PAGE, PAGE));
        c.mprotect = Some(space.mprotect(self.other, PAGE, Prot::READ));
        let mut v = vec![0u8; PAGE as usize];
        c.read = Some(space.read(self.other, &mut v).map(|()| v));
        c.mirror = Some(hmm_range_fault(space, self.other, 1, false, Owner::NONE).map(|p| p.len()));
    }
}

/// A notifier of munmap runs under the map lock held shared now. It may read the rest of
/// the space; a change of mappings from it would wait for its own thread and must be
/// refused with `Error::Reentrant`, as the error's documentation and `docs/ARCHITECTURE.md`
/// ("a notifier that calls back into the space whose mappings its thread is changing gets
/// `Error::Reentrant`") say, and as mprotect's notifiers get it. Found: munmap's notifiers
/// got `Error::MigrationInProgress` (the downgraded hold looked like a migration's).
#[test]
fn a_munmap_notifier_changing_mappings_is_refused_as_reentrant() {
    watchdog("munmap notifier callbacks", || {
        let (_pm, _dev, space) = host_space("munmap_notifier_callbacks");
        let a = map(&space, 4);
        let other = pages(a, 2);
        space.write(other, &[0x5A; PAGE as usize]).unwrap();
        let cb = Arc::new(CallBack {
            space: parking_lot::Mutex::new(None),
            watch: a,
            other,
            calls: parking_lot::Mutex::new(Calls::default()),
        });
        // The notifier's own handle on the space (a clone shares it).
        *cb.space.lock() = Some(space.clone());
        let id = space.register_notifier(cb.clone());
        space.munmap(a, PAGE).unwrap();
        space.unregister_notifier(id);
        cb.space.lock().take();
        let c = std::mem::take(&mut *cb.calls.lock());
        assert_eq!(
            c.read.unwrap().unwrap(),
            vec![0x5A; PAGE as usize],
            "read served"
        );
        assert_eq!(c.mirror.unwrap().unwrap(), 1, "mirror fault served");
        assert!(
            matches!(c.mmap, Some(Err(Error::Reentrant))),
            "mmap: {:?}",
            c.mmap
        );
        assert!(
            matches!(c.munmap, Some(Err(Error::Reentrant))),
            "munmap: {:?}",
            c.munmap
        );
        assert!(
            matches!(c.mprotect, Some(Err(Error::Reentrant))),
            "mprotect: {:?}",
            c.mprotect
        );
        // Nothing changed behind the unmap: the neighbour is still there and writable.
        assert_eq!(read(&space, pages(a, 3), 1), vec![0]);
        space.write(other, &[1]).unwrap();
    });
}

/// A device mirror of one range as a driver writes it: frames committed under its lock
/// after `read_retry_range` said no, dropped by its notifier (which takes the same lock)
/// when an overlapping invalidation starts.
struct RangeMirror {
    start: VirtAddr,
    end: VirtAddr,
    view: parking_lot::Mutex<Option<Vec<hetmem_engine::Pfn>>>,
    dropped: AtomicUsize,
}

impl Notifier for RangeMirror {
    fn invalidate(&self, _: SpaceId, range: &NotifyRange) {
        if range.start < self.end && self.start < range.end {
            *self.view.lock() = None;
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl RangeMirror {
    fn new(start: VirtAddr, npages: u64) -> Arc<RangeMirror> {
        Arc::new(RangeMirror {
            start,
            end: pages(start, npages),
            view: parking_lot::Mutex::new(None),
            dropped: AtomicUsize::new(0),
        })
    }

    /// One read of the range: `Some(frames)` if committed. While the commit holds the lock,
    /// every committed frame must be what the space maps there (else an invalidation was
    /// missed), and `check` sees the frames' bytes.
    fn read_once(
        &self,
        space: &AddressSpace,
        check: &dyn Fn(&[hetmem_engine::Pfn]),
    ) -> Option<Vec<hetmem_engine::Pfn>> {
        let n = ((self.end.get() - self.start.get()) / PAGE) as usize;
        let seq = space.read_begin_range(self.start, self.end);
        let got = hmm_range_fault(space, self.start, n, false, Owner::NONE).ok()?;
        let frames: Vec<_> = got.iter().map(|h| h.pfn).collect();
        let mut view = self.view.lock();
        if space.read_retry_range(seq, self.start, self.end) {
            return None;
        }
        for (k, &f) in frames.iter().enumerate() {
            let pte = space.pte(pages(self.start, k as u64));
            assert_eq!(
                pte.pfn(),
                Some(f),
                "page {k}: committed frame {f:?} but the space maps {pte:?}: a missed invalidation"
            );
        }
        check(&frames);
        *view = Some(frames.clone());
        Some(frames)
    }
}

/// Bytes of `n` pages through their frames.
fn frame_bytes(pm: &PageMap, frames: &[hetmem_engine::Pfn]) -> Vec<u8> {
    let mut out = vec![0u8; frames.len() * PAGE as usize];
    for (k, &f) in frames.iter().enumerate() {
        let at = k * PAGE as usize;
        pm.read_frame(f, 0, &mut out[at..at + PAGE as usize])
            .unwrap();
    }
    out
}

/// Mirrors of a churned range and of a stable one race munmap and mmap of the same
/// addresses (pinned across the unmap), mprotect splits, migrations to the device and back
/// and evictions by pfn. Every commit must name the frames the space maps (the invalidation
/// of an unmap whose zap runs under the shared hold is never missed), the stable range's
/// committed frames must hold its bytes, a pin must keep the unmapped bytes, and nothing is
/// left locked or leaked.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn range_mirrors_race_unmap_remap_migrations_and_pins() {
    for kind in ON {
        let test = "range_mirrors_race_unmap";
        let Some((pm, dev, space)) = setup(kind, test) else {
            continue;
        };
        let frames = pm.frames().clone();
        let churn = map(&space, 8);
        let stable = map(&space, 8);
        let shadow = pattern(8, 0x21);
        space.write(stable, &shadow).unwrap();
        let (cm, sm) = (RangeMirror::new(churn, 8), RangeMirror::new(stable, 8));
        let ids = [
            space.register_notifier(cm.clone()),
            space.register_notifier(sm.clone()),
        ];
        let (space, pm, dev) = (Arc::new(space), pm.clone(), Arc::new(dev));
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicUsize::new(0));
        let mut hs = Vec::new();
        {
            let (space, pm, stop, commits) =
                (space.clone(), pm.clone(), stop.clone(), commits.clone());
            let (cm, sm, shadow) = (cm.clone(), sm.clone(), shadow.clone());
            hs.push(thread::spawn(move || {
                let check = |f: &[hetmem_engine::Pfn]| {
                    assert_eq!(
                        frame_bytes(&pm, f),
                        shadow,
                        "stable bytes through committed frames"
                    )
                };
                while !stop.load(Ordering::Acquire) {
                    if cm.read_once(&space, &|_| {}).is_some() {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                    if sm.read_once(&space, &check).is_some() {
                        commits.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        {
            let (space, dev, stop) = (space.clone(), dev.clone(), stop.clone());
            hs.push(thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let _ = dev.migrate_to_device(&space, stable, 8);
                    let _ = dev.migrate_to_device(&space, churn, 8);
                    let _ = dev.evict_all();
                    let _ = dev.migrate_to_system(&space, stable, 8);
                }
            }));
        }
        {
            let (space, pm, stop) = (space.clone(), pm.clone(), stop.clone());
            hs.push(thread::spawn(move || {
                for round in 0..200u8 {
                    let bytes = pattern(8, round);
                    space.write(churn, &bytes).unwrap();
                    space
                        .mprotect(pages(churn, 2), 2 * PAGE, Prot::READ)
                        .unwrap();
                    space.mprotect(pages(churn, 2), 2 * PAGE, Prot::RW).unwrap();
                    let pin = hetmem::mm::pin_pages(&space, churn, 8, false, false).unwrap();
                    space.munmap(churn, 8 * PAGE).unwrap();
                    assert_eq!(
                        frame_bytes(&pm, pin.pfns()),
                        bytes,
                        "round {round}: pinned bytes"
                    );
                    drop(pin);
                    assert_eq!(
                        space.mmap(Some(churn), 8 * PAGE, Prot::RW, false).unwrap(),
                        churn
                    );
                    assert_eq!(
                        read(&space, churn, 8 * PAGE as usize),
                        vec![0; 8 * PAGE as usize]
                    );
                }
                stop.store(true, Ordering::Release);
            }));
        }
        join_all(test, hs, RACE_LIMIT);
        eprintln!(
            "{kind:?}: {} commits, {} + {} views dropped",
            commits.load(Ordering::Relaxed),
            cm.dropped.load(Ordering::Relaxed),
            sm.dropped.load(Ordering::Relaxed)
        );
        assert!(
            commits.load(Ordering::Relaxed) > 0,
            "{kind:?}: the mirror committed"
        );
        assert_eq!(
            read(&space, stable, shadow.len()),
            shadow,
            "{kind:?}: stable bytes"
        );
        let mut bad = unsettled(&space, &pm, stable, 8);
        bad.extend(unsettled(&space, &pm, churn, 8));
        assert!(bad.is_empty(), "{kind:?}: {bad:#?}");
        for id in ids {
            space.unregister_notifier(id);
        }
        let space = Arc::into_inner(space).expect("the racers are gone");
        let in_use_mapped = frames.in_use();
        space.munmap(stable, 8 * PAGE).unwrap();
        space.munmap(churn, 8 * PAGE).unwrap();
        let freed = in_use_mapped - frames.in_use();
        assert!(
            freed >= 8,
            "{kind:?}: the stable range's frames went back ({freed})"
        );
        drop(space);
        assert_eq!(
            dev.evict_all().unwrap(),
            0,
            "{kind:?}: no device page left behind"
        );
    }
}

#[path = "adversary5_invalidate/cpu.rs"]
mod cpu;
