//! A page's counts, flags and lock are out of reach of code outside hetmem: what a driver
//! may do to pages goes through guards (`NewPage`, `LockedPage`) and checked calls, and the
//! misuses that used to be possible are typed errors that change nothing. (Calling the raw
//! operations themselves no longer compiles: see the `compile_fail` examples in
//! `hetmem::mm::page_guard`.)

use hetmem::migration::*;
use hetmem::mm::{flags, MemoryKind, Pte, PAGE};
use hetmem::Error;
use hetmem_tests::harness::{
    dev_pfn, gpu, map, pattern, read, setup_system_migration, watchdog, Gpu, SMALL_POOL,
};

fn setup() -> Gpu {
    gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL)
}

/// `claim_frame` (what `alloc_system_at` was for drivers) makes only a frame the caller
/// took from the pool live: a mapped page, the zero page, a free frame, a device page and
/// an unknown frame are refused, and the refused pages keep their counts and bytes.
#[test]
fn claim_frame_refuses_every_frame_not_freshly_taken_from_the_pool() {
    let Gpu { pool, pm, d, space } = setup();
    let a = map(&space, 1);
    let data = pattern(1, 41);
    space.write(a, &data).unwrap();
    let live = dev_pfn(&space, a);
    let before = (
        pm.page(live).unwrap().refcount(),
        pm.page(live).unwrap().mapcount(),
    );
    assert!(matches!(pm.claim_frame(live, true), Err(Error::PageInUse(p)) if p == live));
    assert!(matches!(
        pm.claim_frame(pm.zero_pfn(), false),
        Err(Error::PageInUse(_))
    ));
    let page = pm.page(live).unwrap();
    assert_eq!((page.refcount(), page.mapcount()), before);
    assert!(!page.is_locked());
    assert_eq!(read(&space, a, 4096), data);

    let free = pool.alloc(false).unwrap();
    pool.free(free).unwrap();
    assert!(matches!(pm.claim_frame(free, true), Err(Error::PageFree(p)) if p == free));
    assert_eq!(pm.page(free).unwrap().refcount(), 0);

    assert_eq!(d.migrate_to_device(&space, a, 1).unwrap().migrated, 1);
    let device = dev_pfn(&space, a);
    assert!(matches!(
        pm.claim_frame(device, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        pm.claim_frame(hetmem_engine::Pfn(1 << 40), true),
        Err(Error::UnknownPfn(_))
    ));
    assert_eq!(read(&space, a, 4096), data);
}

/// A frame taken from the pool is claimed once: the guard holds its one reference and its
/// lock, a second claim is refused, and dropping the guard gives the frame back to the pool.
#[test]
fn a_claimed_frame_is_claimed_once_and_its_guard_frees_it() {
    let Gpu { pool, pm, .. } = setup();
    let f = pool.alloc(false).unwrap();
    let guard = pm.claim_frame(f, true).unwrap();
    assert_eq!(guard.pfn(), f);
    assert_eq!(guard.page().refcount(), 1);
    assert!(guard.page().is_locked());
    assert!(matches!(pm.claim_frame(f, true), Err(Error::PageInUse(p)) if p == f));
    assert!(matches!(pm.claim_frame(f, false), Err(Error::PageInUse(_))));
    drop(guard);
    let page = pm.page(f).unwrap();
    assert_eq!(page.refcount(), 0);
    assert_eq!(page.flags(), 0, "a free page has clear flags");
    assert!(!pool.is_allocated(f), "the frame went back to the pool");
}

/// Two threads claiming one frame at once: exactly one gets it, every time (the check that
/// the page is not live and making it live are one step).
#[test]
fn racing_claims_of_one_frame_give_it_to_exactly_one() {
    let Gpu { pool, pm, .. } = setup();
    for _ in 0..2000 {
        let f = pool.alloc(false).unwrap();
        let (start, tried) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
        let won: usize = std::thread::scope(|s| {
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let guard = pm.claim_frame(f, false).ok();
                        // The winner keeps its guard until both have tried.
                        tried.wait();
                        guard.is_some()
                    })
                })
                .collect();
            racers
                .into_iter()
                .map(|r| r.join().unwrap())
                .filter(|&w| w)
                .count()
        });
        assert_eq!(won, 1, "frame {f}: {won} claims succeeded");
        assert!(
            !pool.is_allocated(f),
            "the winner's guard gave the frame back"
        );
    }
}

/// `claim_device_page` refuses a device page that maps data; the page stays mapped and its
/// bytes come home intact.
#[test]
fn claim_device_page_refuses_a_mapped_device_page() {
    let Gpu { pm, d, space, .. } = setup();
    let a = map(&space, 1);
    let data = pattern(1, 42);
    space.write(a, &data).unwrap();
    assert_eq!(d.migrate_to_device(&space, a, 1).unwrap().migrated, 1);
    let x = dev_pfn(&space, a);
    let refs = pm.page(x).unwrap().refcount();
    assert!(matches!(pm.claim_device_page(x, true), Err(Error::PageInUse(p)) if p == x));
    assert_eq!(pm.page(x).unwrap().refcount(), refs);
    assert!(!pm.page(x).unwrap().is_locked());
    assert_eq!(read(&space, a, 4096), data);
}

/// A destination whose guard is still held (its pfn named in `dst` without giving the guard
/// up) is refused: finalize would release the page and then the guard would release it
/// again, freeing a page the space maps. Given up with `into_pfn`, the same page migrates
/// and ends mapped with exactly the mapping's reference.
#[test]
fn a_destination_still_held_by_its_guard_is_refused() {
    let Gpu { pm, d, space, .. } = setup();
    let a = map(&space, 1);
    let data = pattern(1, 43);
    space.write(a, &data).unwrap();
    let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
    let mut m = setup_system_migration(&space, a, 1, d.owner(), &mut src, &mut dst);
    assert_eq!(m.cpages, 1);
    let x = d.device().alloc_page(false).unwrap();
    let guard = pm.claim_device_page(x, true).unwrap();
    m.dst[0] = migrate_pfn(guard.pfn());
    let e = migrate_vma_pages(&mut m).unwrap_err();
    assert!(matches!(e, Error::PageInUse(p) if p == x), "{e}");
    assert_ne!(m.src[0] & MIGRATE_PFN_MIGRATE, 0, "src untouched");
    let from = migrate_pfn_to_pfn(m.src[0]).unwrap();
    d.device().copy(&[(from, x)]).unwrap().wait().unwrap();
    m.dst[0] = migrate_pfn(guard.into_pfn());
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    assert!(matches!(space.pte(a), Pte::DevicePrivate { pfn, .. } if pfn == x));
    let page = pm.page(x).unwrap();
    assert_eq!((page.refcount(), page.mapcount()), (1, 1));
    assert!(!page.is_locked());
    assert_eq!(read(&space, a, 4096), data);
}

/// A guard dropped without being given up frees its page: a device page goes back to the
/// device, unlocked, with no reference left.
#[test]
fn a_dropped_new_page_goes_back() {
    let Gpu { pm, d, .. } = setup();
    let x = d.device().alloc_page(false).unwrap();
    let guard = pm.claim_device_page(x, true).unwrap();
    assert!(guard.page().test(flags::LOCKED));
    drop(guard);
    let page = pm.page(x).unwrap();
    assert_eq!((page.refcount(), page.flags()), (0, 0));
    // The device took it back: it can be claimed again.
    let again = d.device().alloc_page(false).unwrap();
    let guard = pm.claim_device_page(again, false).unwrap();
    assert!(!guard.page().is_locked());
    let page = pm.alloc_page(true, true).unwrap();
    assert_eq!(page.page().refcount(), 1);
}

/// `lock_page` holds a live page's lock and a reference: a migration leaves the page alone
/// meanwhile, unmapping it does not free it, and the drop frees it then. Free frames and
/// the zero page are refused.
#[test]
fn a_locked_page_stays_live_until_its_guard_drops() {
    watchdog("lock_page", || {
        let Gpu { pool, pm, d, space } = setup();
        let a = map(&space, 1);
        let data = pattern(1, 44);
        space.write(a, &data).unwrap();
        let p = dev_pfn(&space, a);
        let guard = pm.lock_page(p).unwrap();
        assert!(guard.page().is_locked());
        assert_eq!(guard.page().refcount(), 2, "the mapping's and the guard's");
        assert_eq!(d.migrate_to_device(&space, a, 1).unwrap().migrated, 0);
        assert_eq!(dev_pfn(&space, a), p, "a locked page is not migrated");
        let used = pool.in_use();
        space.munmap(a, PAGE).unwrap();
        assert_eq!(
            guard.page().refcount(),
            1,
            "the guard's reference keeps it live"
        );
        assert_eq!(pool.in_use(), used);
        drop(guard);
        let page = pm.page(p).unwrap();
        assert_eq!((page.refcount(), page.flags()), (0, 0));
        assert_eq!(
            pool.in_use(),
            used - 1,
            "the last reference freed the frame"
        );
        assert!(matches!(pm.lock_page(p), Err(Error::PageFree(q)) if q == p));
        assert!(matches!(
            pm.lock_page(pm.zero_pfn()),
            Err(Error::InvalidArgument(_))
        ));
    });
}

/// A driver that rewrites a source word's frame between setup and finalize (here: to a page
/// the migration never collected) changes nothing the migration does: finalize works on the
/// pages setup locked, so the collected page is restored and unlocked, and the named page
/// is neither unlocked, remapped nor released.
#[test]
fn a_source_word_rewritten_between_stages_does_not_redirect_finalize() {
    let Gpu { pm, d, space, .. } = setup();
    let a = map(&space, 1);
    let b = map(&space, 1);
    let (da, db) = (pattern(1, 44), pattern(1, 45));
    space.write(a, &da).unwrap();
    space.write(b, &db).unwrap();
    let other = dev_pfn(&space, b);
    let before = {
        let p = pm.page(other).unwrap();
        (p.refcount(), p.mapcount(), p.flags())
    };
    let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
    let mut m = setup_system_migration(&space, a, 1, d.owner(), &mut src, &mut dst);
    assert_eq!(m.cpages, 1);
    let collected = migrate_pfn_to_pfn(m.src[0]).unwrap();
    // No destination: the entry stays. The word now names `b`'s page.
    m.src[0] = migrate_pfn(other) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE;
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    drop(m);
    assert!(matches!(space.pte(a), Pte::Present { pfn, .. } if pfn == collected));
    let p = pm.page(collected).unwrap();
    assert!(!p.is_locked(), "the collected page is unlocked");
    assert_eq!((p.refcount(), p.mapcount()), (1, 1));
    let q = pm.page(other).unwrap();
    assert_eq!((q.refcount(), q.mapcount(), q.flags()), before);
    assert!(matches!(space.pte(b), Pte::Present { pfn, .. } if pfn == other));
    assert_eq!(read(&space, a, 4096), da);
    assert_eq!(read(&space, b, 4096), db);
}
