//! Third adversarial round (issue 11, "a public API that safe code cannot misuse"): attacks
//! by someone who did not write the fixes, on what they added. This file: the page guards
//! and the checks of a hand-made `dst`, and lock ranks against user callbacks (notifiers, a
//! device pagemap's `page_free`). `adversary3_engine.rs`: frame and device-page bytes, bad
//! input; `adversary3_offload.rs`: launches, kernels, views and buffer handles.
//!
//! Every test here either held from the start (a regression test that asserts bytes, error
//! kinds or counters) or failed before its fix in the library; an attack that still finds a
//! bug is `#[ignore]`d with the bug named.

use std::sync::Arc;

use hetmem::migration::*;
use hetmem::mm::{AddressSpace, MemoryKind, Pte, PAGE};
use hetmem::{Error, Owner, VirtAddr};

use hetmem_tests::harness::*;

fn setup() -> Gpu {
    gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL)
}

/// A `MigrateVma` of one page of `space` selecting system memory, set up.
fn set_up<'a>(
    g: &Gpu,
    space: &'a AddressSpace,
    a: VirtAddr,
    src: &'a mut [u64],
    dst: &'a mut [u64],
) -> MigrateVma<'a> {
    let mut m = MigrateVma::new(space, a, a + PAGE, src, dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!(m.cpages, 1);
    m
}

// ---------------------------------------------------------------------------------------
// A. Hand-made `dst` arrays.
// ---------------------------------------------------------------------------------------

/// A second migration names, as its destination, the source page that a first migration
/// (of another address space) collected: that page is live, locked (by the first
/// migration), unmapped (its entry is a migration entry) and held by no guard, which is
/// everything `validate_dst` asks of a driver's fresh page. Taken, it would end mapped in
/// both spaces (the second space reading the first one's bytes) and be unlocked and
/// released twice. It must be refused with `PageInUse`, and both spaces keep their bytes.
#[test]
fn dst_naming_another_migrations_source_is_refused() {
    watchdog("dst = another migration's source", || {
        let g = setup();
        let other = AddressSpace::new(&g.pm);
        let (a1, a2) = (map(&g.space, 1), map(&other, 1));
        let (d1, d2) = (pattern(1, 51), pattern(1, 52));
        g.space.write(a1, &d1).unwrap();
        other.write(a2, &d2).unwrap();
        let (mut s1, mut t1) = ([0u64; 1], [0u64; 1]);
        let m1 = set_up(&g, &g.space, a1, &mut s1, &mut t1);
        let p1 = migrate_pfn_to_pfn(m1.src[0]).unwrap();
        let (mut s2, mut t2) = ([0u64; 1], [0u64; 1]);
        let mut m2 = set_up(&g, &other, a2, &mut s2, &mut t2);
        m2.dst[0] = migrate_pfn(p1);
        let r = migrate_vma_pages(&mut m2);
        // Whatever happened, finish both before looking (their drops finalize).
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(m2);
            drop(m1);
        }));
        assert!(
            matches!(r, Err(Error::PageInUse(p)) if p == p1),
            "a collected source accepted as another migration's destination: {r:?}"
        );
        assert!(finished.is_ok(), "finalizing both panicked");
        assert_eq!(read(&g.space, a1, 4096), d1);
        assert_eq!(read(&other, a2, 4096), d2);
        assert!(unsettled(&g.space, &g.pm, a1, 1).is_empty());
        assert!(unsettled(&other, &g.pm, a2, 1).is_empty());
    });
}

/// The same with the device flavour: an eviction by frame number names a page that a
/// `migrate_vma` migration has collected.
#[test]
fn device_dst_naming_a_collected_source_is_refused() {
    watchdog("device dst = collected source", || {
        let g = setup();
        let (a1, a2) = (map(&g.space, 1), map(&g.space, 1));
        let (d1, d2) = (pattern(1, 53), pattern(1, 54));
        g.space.write(a1, &d1).unwrap();
        g.space.write(a2, &d2).unwrap();
        g.d.migrate_to_device(&g.space, a2, 1).unwrap();
        let dev = dev_pfn(&g.space, a2);
        let (mut s1, mut t1) = ([0u64; 1], [0u64; 1]);
        let m1 = set_up(&g, &g.space, a1, &mut s1, &mut t1);
        let p1 = migrate_pfn_to_pfn(m1.src[0]).unwrap();
        let mut src = [migrate_pfn(dev)];
        assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
        let mut dst = [migrate_pfn(p1)];
        let r = migrate_device_pages(&g.pm, &mut src, &dst);
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst);
            drop(m1);
        }));
        assert!(
            matches!(r, Err(Error::PageInUse(p)) if p == p1),
            "a collected source accepted as an eviction's destination: {r:?}"
        );
        assert!(finished.is_ok(), "finalizing both panicked");
        assert_eq!(read(&g.space, a1, 4096), d1);
        assert_eq!(read(&g.space, a2, 4096), d2);
        assert!(unsettled(&g.space, &g.pm, a1, 1).is_empty());
        assert!(unsettled(&g.space, &g.pm, a2, 1).is_empty());
    });
}

/// One guard's drop clears the mark that another guard of the same page set: a `NewPage`
/// (unlocked) and a `LockedPage` of it, the `NewPage` dropped first. The page is then live,
/// locked and unmarked while the `LockedPage` still holds its reference and lock; named in
/// `dst` it would be mapped, unlocked and released by finalize, and then unlocked and
/// released again by the `LockedPage` (a page freed while mapped). It must be refused.
#[test]
fn a_locked_page_guard_outliving_a_new_page_guard_still_guards() {
    watchdog("guard mark cleared by the other guard", || {
        let g = setup();
        let a = map(&g.space, 1);
        let data = pattern(1, 55);
        g.space.write(a, &data).unwrap();
        let n = g.pm.alloc_page(true, false).unwrap();
        let l = g.pm.lock_page(n.pfn()).unwrap();
        drop(n);
        let x = l.pfn();
        let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
        let mut m = set_up(&g, &g.space, a, &mut src, &mut dst);
        m.dst[0] = migrate_pfn(x);
        let r = migrate_vma_pages(&mut m);
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(m);
            drop(l);
        }));
        assert!(
            matches!(r, Err(Error::PageInUse(p)) if p == x),
            "a page a LockedPage holds accepted as a destination: {r:?}"
        );
        assert!(finished.is_ok(), "finalize or the guard's drop panicked");
        assert_eq!(read(&g.space, a, 4096), data);
        assert!(unsettled(&g.space, &g.pm, a, 1).is_empty());
        let page = g.pm.page(x).unwrap();
        assert_eq!(
            (page.refcount(), page.flags()),
            (0, 0),
            "the guarded page went back"
        );
    });
}

/// A page held by a `LockedPage` named in `dst`, then the migration abandoned (finalized
/// without a pages stage, as a drop does): the abandon path releases the destinations the
/// driver named, and must not release one that a guard holds (the guard's drop would
/// then unlock and release it a second time).
#[test]
fn abandoning_a_migration_leaves_a_guarded_dst_alone() {
    watchdog("abandon with a guarded dst", || {
        let g = setup();
        let a = map(&g.space, 1);
        let data = pattern(1, 56);
        g.space.write(a, &data).unwrap();
        let n = g.pm.alloc_page(true, true).unwrap();
        let x = n.pfn();
        let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
        let mut m = set_up(&g, &g.space, a, &mut src, &mut dst);
        m.dst[0] = migrate_pfn(x);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_vma_finalize(&mut m);
            drop(m);
            let page = g.pm.page(x).unwrap();
            let kept = (page.refcount(), page.is_locked());
            drop(n);
            kept
        }));
        let kept = r.expect("finalize or the guard's drop panicked");
        assert_eq!(kept, (1, true), "finalize released the guard's page");
        let page = g.pm.page(x).unwrap();
        assert_eq!((page.refcount(), page.flags()), (0, 0));
        assert_eq!(read(&g.space, a, 4096), data);
        assert!(unsettled(&g.space, &g.pm, a, 1).is_empty());
    });
}

/// `migrate_device_finalize` called on a collected eviction whose `dst` names a page the
/// driver does not own (here a mapped page of the space, and a page a `LockedPage` holds),
/// without a pages stage that would have refused them: finalize must leave both alone
/// (no "unlock of unlocked page", no reference dropped) and restore the device page.
#[test]
fn device_finalize_leaves_a_foreign_dst_alone() {
    watchdog("device finalize with a foreign dst", || {
        let g = setup();
        let (a1, a2, a3) = (map(&g.space, 1), map(&g.space, 1), map(&g.space, 1));
        let (d1, d2, d3) = (pattern(1, 57), pattern(1, 58), pattern(1, 59));
        g.space.write(a1, &d1).unwrap();
        g.space.write(a2, &d2).unwrap();
        g.space.write(a3, &d3).unwrap();
        g.d.migrate_to_device(&g.space, a1, 1).unwrap();
        g.d.migrate_to_device(&g.space, a3, 1).unwrap();
        let (dev1, dev3) = (dev_pfn(&g.space, a1), dev_pfn(&g.space, a3));
        let mapped = dev_pfn(&g.space, a2);
        let fresh = g.pm.alloc_page(true, false).unwrap();
        let held = g.pm.lock_page(fresh.pfn()).unwrap();
        drop(fresh);
        let hx = held.pfn();
        let refs = g.pm.page(mapped).unwrap().refcount();
        let mut src = [migrate_pfn(dev1), migrate_pfn(dev3)];
        assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 2);
        let mut dst = [migrate_pfn(mapped), migrate_pfn(hx)];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            migrate_device_finalize(&g.pm, &mut src, &mut dst);
        }));
        assert!(r.is_ok(), "finalize panicked on a foreign dst");
        let page = g.pm.page(mapped).unwrap();
        assert_eq!(page.refcount(), refs, "a mapped page lost a reference");
        assert!(held.page().is_locked(), "a held page was unlocked");
        assert_eq!(held.page().refcount(), 1);
        drop(held);
        assert_eq!(g.pm.page(hx).unwrap().refcount(), 0);
        assert!(matches!(g.space.pte(a1), Pte::DevicePrivate { .. }));
        assert_eq!(read(&g.space, a1, 4096), d1);
        assert_eq!(read(&g.space, a2, 4096), d2);
        assert_eq!(read(&g.space, a3, 4096), d3);
        for a in [a1, a2, a3] {
            assert!(unsettled(&g.space, &g.pm, a, 1).is_empty());
        }
    });
}

/// A destination given up with `into_pfn` is one reference; naming its pfn (a plain
/// `Copy` number) in two migrations' `dst` gives that reference twice. The second
/// migration's pages stage must refuse it while the first migration holds it; otherwise the
/// page ends mapped at both addresses and is unlocked and released twice.
#[test]
fn one_destination_named_by_two_migrations_is_refused() {
    watchdog("one dst, two migrations", || {
        let g = setup();
        let (a1, a2) = (map(&g.space, 1), map(&g.space, 1));
        let (d1, d2) = (pattern(1, 60), pattern(1, 61));
        g.space.write(a1, &d1).unwrap();
        g.space.write(a2, &d2).unwrap();
        let x = g.pm.alloc_page(false, true).unwrap().into_pfn();
        let (mut s1, mut t1) = ([0u64; 1], [0u64; 1]);
        let mut m1 = set_up(&g, &g.space, a1, &mut s1, &mut t1);
        let from = migrate_pfn_to_pfn(m1.src[0]).unwrap();
        g.d.device().copy(&[(from, x)]).unwrap().wait().unwrap();
        m1.dst[0] = migrate_pfn(x);
        migrate_vma_pages(&mut m1).unwrap();
        let (mut s2, mut t2) = ([0u64; 1], [0u64; 1]);
        let mut m2 = set_up(&g, &g.space, a2, &mut s2, &mut t2);
        m2.dst[0] = migrate_pfn(x);
        let r = migrate_vma_pages(&mut m2);
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(m2);
            drop(m1);
        }));
        assert!(
            matches!(r, Err(Error::PageInUse(p)) if p == x),
            "a destination already given to a migration was accepted again: {r:?}"
        );
        assert!(finished.is_ok(), "finalizing both panicked");
        assert_eq!(read(&g.space, a1, 4096), d1);
        assert_eq!(read(&g.space, a2, 4096), d2);
        assert!(matches!(g.space.pte(a1), Pte::Present { pfn, .. } if pfn == x));
        assert_ne!(dev_pfn(&g.space, a2), x);
        for a in [a1, a2] {
            assert!(unsettled(&g.space, &g.pm, a, 1).is_empty());
        }
    });
}

// ---------------------------------------------------------------------------------------
// B. Lock ranks: a notifier is user code, and may use another address space.
// ---------------------------------------------------------------------------------------

/// A notifier on space A that reads space B when A's range migrates (a mirror that keeps
/// its bookkeeping in another space, say). A migration that maps a new page over A's
/// zero page (a hole that was read) invalidated with A's VMA lock held: the notifier then
/// took B's map lock inside A's VMA lock: under `lock-tracking` (on in this crate) "lock
/// order: Map taken while holding [Map, Vma]" panicked; without it, a lock-order inversion
/// against any thread that holds B's map lock and faults a hole of A. Notifiers must run
/// with no VMA or leaf lock held.
#[test]
fn a_notifier_may_use_another_space_during_a_hole_migration() {
    use hetmem::mm::{Notifier, NotifyEvent, NotifyRange, SpaceId};
    struct ReadsOther {
        other: AddressSpace,
        at: VirtAddr,
        seen: std::sync::Mutex<Vec<Result<u8, String>>>,
    }
    impl Notifier for ReadsOther {
        fn invalidate(&self, _: SpaceId, range: &NotifyRange) {
            if range.event == NotifyEvent::Migrate {
                let mut b = [0u8; 1];
                let r = self.other.read(self.at, &mut b).map(|()| b[0]);
                self.seen.lock().unwrap().push(r.map_err(|e| e.to_string()));
            }
        }
    }
    watchdog("notifier reads another space", || {
        let g = setup();
        let other = AddressSpace::new(&g.pm);
        let b = map(&other, 1);
        other.write(b, &[0x5A; 4096]).unwrap();
        let n = Arc::new(ReadsOther {
            other: other.clone(),
            at: b,
            seen: std::sync::Mutex::new(Vec::new()),
        });
        g.space.register_notifier(n.clone());
        let a = map(&g.space, 1);
        assert_eq!(read(&g.space, a, 4096), vec![0u8; 4096]);
        assert!(matches!(g.space.pte(a), Pte::Present { pfn, .. } if pfn == g.pm.zero_pfn()));
        let r = g.d.migrate_to_device(&g.space, a, 1).unwrap();
        assert_eq!(r.migrated, 1);
        assert!(matches!(g.space.pte(a), Pte::DevicePrivate { .. }));
        let seen = n.seen.lock().unwrap().clone();
        assert!(!seen.is_empty());
        assert!(seen.iter().all(|r| r == &Ok(0x5A)), "{seen:?}");
        assert_eq!(read(&g.space, a, 4096), vec![0u8; 4096]);
    });
}

// ---------------------------------------------------------------------------------------
// H. A driver's own pagemap callbacks are user code too.
// ---------------------------------------------------------------------------------------

/// Callbacks of a user's device pagemap: `page_free` reads another address space (a driver
/// that keeps its bookkeeping there); faults are refused.
struct ReadingOps {
    other: AddressSpace,
    at: VirtAddr,
    seen: std::sync::Mutex<Vec<Result<u8, String>>>,
}

impl hetmem::mm::PagemapOps for ReadingOps {
    fn page_free(&self, _page: &hetmem::mm::Page) {
        let mut b = [0u8; 1];
        let r = self.other.read(self.at, &mut b).map(|()| b[0]);
        self.seen.lock().unwrap().push(r.map_err(|e| e.to_string()));
    }
    fn migrate_to_ram(&self, _f: hetmem::mm::FaultContext<'_>) -> hetmem::Result<()> {
        Err(Error::InvalidArgument(
            "this test's device serves no faults",
        ))
    }
}

/// A user's `PagemapOps::page_free` that uses another address space, called when a munmap
/// (or a space's teardown) drops the last mapping of one of its device pages: it must run
/// with no leaf lock held (under `lock-tracking`, taking the other space's map lock inside a
/// leaf lock panics "lock order"; without it, an inversion), and must see the other
/// space's bytes.
#[test]
fn a_device_page_free_callback_may_use_another_space() {
    use hetmem_engine::{Pfn, PfnRange};
    watchdog("page_free reads another space", || {
        let g = setup();
        let other = AddressSpace::new(&g.pm);
        let b = map(&other, 1);
        other.write(b, &[0x3C; 4096]).unwrap();
        let ops = Arc::new(ReadingOps {
            other: other.clone(),
            at: b,
            seen: std::sync::Mutex::new(Vec::new()),
        });
        // Frame numbers far above what the engine reserves.
        let range = PfnRange {
            start: Pfn(1 << 44),
            count: 64,
        };
        let owner = 0x5EED;
        g.pm.register_device(
            range,
            MemoryKind::DevicePrivate,
            Owner(owner),
            ops.clone(),
            None,
        )
        .unwrap();
        for (round, teardown) in [(0, false), (1, true)] {
            let space = AddressSpace::new(&g.pm);
            let a = map(&space, 1);
            space.write(a, &[7; 4096]).unwrap();
            let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
            let mut m = MigrateVma::new(&space, a, a + PAGE, &mut src, &mut dst);
            m.flags = MIGRATE_VMA_SELECT_SYSTEM;
            m.pgmap_owner = Owner(owner);
            migrate_vma_setup(&mut m).unwrap();
            let x =
                g.pm.claim_device_page(range.start.add(round), true)
                    .unwrap();
            m.dst[0] = migrate_pfn(x.into_pfn());
            migrate_vma_pages(&mut m).unwrap();
            migrate_vma_finalize(&mut m);
            drop(m);
            assert!(matches!(space.pte(a), Pte::DevicePrivate { .. }));
            if teardown {
                drop(space);
            } else {
                space.munmap(a, PAGE).unwrap();
            }
            let seen = ops.seen.lock().unwrap().clone();
            assert_eq!(seen.len(), round as usize + 1, "page_free calls");
            assert!(seen.iter().all(|r| r == &Ok(0x3C)), "{seen:?}");
        }
    });
}
