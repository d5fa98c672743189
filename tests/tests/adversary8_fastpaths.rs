//! Eighth adversarial round: attacks on the migration core's fast paths (setup's `Collect`,
//! the pages stage's one-pass `take_dst`, finalize over cached pages, `PageCursor`, batched
//! frees in `mm/released.rs`, the frame pool's `put_ascending`). Drivers here misuse `src`
//! and `dst` between stages, race two pages stages for the same destinations, and move
//! batches large enough to cross a block of `Page` structs and a free batch of 1024.
//!
//! Every test asserts bytes, flags, counts or error kinds; `large.rs` holds the big batches.

use hetmem::migration::*;
use hetmem::mm::{flags, AddressSpace, MemoryKind, Pte, PAGE};
use hetmem::{Error, VirtAddr};
use hetmem_engine::{EngineError, HostFramePool, Pfn};

use hetmem_tests::harness::*;

#[path = "adversary8_fastpaths/large.rs"]
mod large;
#[path = "adversary8_fastpaths/race.rs"]
mod race;

fn setup() -> Gpu {
    gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL)
}

/// `n` written pages at a fresh mapping, with their bytes.
fn written(space: &AddressSpace, n: u64, seed: u8) -> (VirtAddr, Vec<u8>) {
    let a = map(space, n);
    let data = pattern(n as usize, seed);
    space.write(a, &data).unwrap();
    (a, data)
}

/// Fresh device pages of `g`'s driver, claimed and handed over (locked, unguarded).
fn device_dsts(g: &Gpu, n: usize) -> Vec<Pfn> {
    let pfns = g.d.device().alloc_pages(n, true).unwrap();
    pfns.into_iter()
        .map(|p| g.pm.claim_device_page(p, true).unwrap().into_pfn())
        .collect()
}

/// A collected source of a `migrate_vma_*` migration named as another entry's
/// destination is refused with nothing changed, and the migration can still be finished
/// with proper destinations.
#[test]
fn a_vma_source_named_as_another_entrys_destination_is_refused() {
    let g = setup();
    let (a, data) = written(&g.space, 2, 82);
    let (mut src, mut dst) = ([0u64; 2], [0u64; 2]);
    let mut m = MigrateVma::new(&g.space, a, a + 2 * PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!(m.cpages, 2);
    let s0 = migrate_pfn_to_pfn(m.src[0]).unwrap();
    let d = device_dsts(&g, 2);
    m.dst[0] = migrate_pfn(d[0]);
    m.dst[1] = migrate_pfn(s0);
    assert!(matches!(migrate_vma_pages(&mut m), Err(Error::PageInUse(p)) if p == s0));
    // Nothing taken: d[0] is as the driver handed it.
    let p0 = g.pm.page(d[0]).unwrap();
    assert_eq!(p0.flags(), flags::LOCKED, "mark and moved flags given back");
    m.dst[1] = migrate_pfn(d[1]);
    migrate_vma_pages(&mut m).unwrap();
    // The driver copies now (the pages stage does not look at bytes).
    g.d.device().copy(&[(s0, d[0])]).unwrap().wait().unwrap();
    let s1 = migrate_pfn_to_pfn(m.src[1]).unwrap();
    g.d.device().copy(&[(s1, d[1])]).unwrap().wait().unwrap();
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(dev_pfn(&g.space, a), d[0]);
    assert_eq!(dev_pfn(&g.space, a + PAGE), d[1]);
    assert!(unsettled(&g.space, &g.pm, a, 2).is_empty());
    assert_eq!(read(&g.space, a, 8192), data);
}

/// A refused pages stage gives back exactly what it changed: the mark, the source's
/// DIRTY|ANON_EXCLUSIVE and the driver word of every destination it took before the bad
/// entry (a page named twice, a free page, an unknown frame), so a retry with good words
/// succeeds and the bytes arrive.
#[test]
fn every_kind_of_refusal_gives_back_marks_flags_and_driver_words() {
    let g = setup();
    let n = 6;
    let (a, data) = written(&g.space, n as u64, 83);
    let (mut src, mut dst) = (vec![0u64; n], vec![0u64; n]);
    let mut m = MigrateVma::new(&g.space, a, a + n as u64 * PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!(m.cpages, n);
    let d = device_dsts(&g, n);
    let before: Vec<(u32, u64, u32)> = d
        .iter()
        .map(|&p| {
            let p = g.pm.page(p).unwrap();
            (p.flags(), p.driver_data(), p.refcount())
        })
        .collect();
    let free = g.d.device().alloc_pages(1, true).unwrap()[0];
    g.d.device().free_pages(&[free]).unwrap();
    let bad = [
        (migrate_pfn(d[1]), "named twice"),
        (migrate_pfn(free), "free"),
        (migrate_pfn(Pfn(1 << 49)), "unknown"),
    ];
    for (w, what) in bad {
        for (i, &p) in d.iter().enumerate() {
            m.dst[i] = migrate_pfn(p);
        }
        m.dst[n - 1] = w;
        let r = migrate_vma_pages(&mut m);
        assert!(r.is_err(), "{what}: accepted");
        for (k, &p) in d.iter().enumerate() {
            let p = g.pm.page(p).unwrap();
            assert_eq!(
                (p.flags(), p.driver_data(), p.refcount()),
                before[k],
                "{what}: destination {k} changed"
            );
        }
    }
    for (i, &p) in d.iter().enumerate() {
        m.dst[i] = migrate_pfn(p);
    }
    let pairs: Vec<(Pfn, Pfn)> = (0..n)
        .map(|i| (migrate_pfn_to_pfn(m.src[i]).unwrap(), d[i]))
        .collect();
    g.d.device().copy(&pairs).unwrap().wait().unwrap();
    migrate_vma_pages(&mut m).unwrap();
    for &p in &d {
        // Written pages are dirty; the source's dirtiness moved with the mark.
        assert!(g.pm.page(p).unwrap().test(flags::DIRTY));
    }
    migrate_vma_finalize(&mut m);
    drop(m);
    for (i, &p) in d.iter().enumerate() {
        assert_eq!(dev_pfn(&g.space, a + i as u64 * PAGE), p);
    }
    assert!(unsettled(&g.space, &g.pm, a, n).is_empty());
    assert_eq!(read(&g.space, a, n * 4096), data);
}

/// A driver that rewrites words after the pages stage (frames of `src` and `dst`, VALID
/// cleared, another live page named) changes nothing finalize does: the pages the stages
/// took are the ones finished, and the page named instead is not touched.
#[test]
fn words_rewritten_after_the_pages_stage_do_not_redirect_finalize() {
    let g = setup();
    let (a, data) = written(&g.space, 3, 84);
    let (b, other) = written(&g.space, 1, 85);
    let bystander = dev_pfn(&g.space, b);
    let by = g.pm.page(bystander).unwrap();
    let by_before = (by.refcount(), by.mapcount(), by.flags());
    let (mut src, mut dst) = ([0u64; 3], [0u64; 3]);
    let mut m = MigrateVma::new(&g.space, a, a + 3 * PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    let d = device_dsts(&g, 3);
    let mut pairs = Vec::new();
    for (i, &p) in d.iter().enumerate() {
        m.dst[i] = migrate_pfn(p);
        pairs.push((migrate_pfn_to_pfn(m.src[i]).unwrap(), p));
    }
    g.d.device().copy(&pairs).unwrap().wait().unwrap();
    migrate_vma_pages(&mut m).unwrap();
    // Entry 0: both frames rewritten to the bystander; entry 1: VALID cleared in both;
    // entry 2: MIGRATE cleared (the one change allowed: it stops migrating).
    m.src[0] = migrate_pfn(bystander) | MIGRATE_PFN_MIGRATE;
    m.dst[0] = migrate_pfn(bystander);
    m.src[1] &= !MIGRATE_PFN_VALID;
    m.dst[1] = 0;
    m.src[2] &= !MIGRATE_PFN_MIGRATE;
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(dev_pfn(&g.space, a), d[0]);
    assert_eq!(dev_pfn(&g.space, a + PAGE), d[1]);
    assert_eq!(
        dev_pfn(&g.space, a + 2 * PAGE),
        pairs[2].0,
        "entry 2 restored"
    );
    let d2 = g.pm.page(d[2]).unwrap();
    assert_eq!(
        (d2.refcount(), d2.flags()),
        (0, 0),
        "the unused destination freed"
    );
    assert_eq!((by.refcount(), by.mapcount(), by.flags()), by_before);
    assert!(unsettled(&g.space, &g.pm, a, 3).is_empty());
    assert_eq!(read(&g.space, a, 3 * 4096), data);
    assert_eq!(read(&g.space, b, 4096), other);
}

/// MIGRATE set by the driver on an entry setup did not collect (a pinned page: src 0) with
/// a destination: the pages stage must not map the destination over the pinned page, and
/// the destination is freed by finalize.
#[test]
fn migrate_set_on_an_uncollected_pinned_entry_does_not_replace_it() {
    let g = setup();
    let (a, data) = written(&g.space, 2, 86);
    let pinned = dev_pfn(&g.space, a + PAGE);
    let pin = hetmem::mm::pin_pages(&g.space, a + PAGE, 1, true, false).unwrap();
    let (mut src, mut dst) = ([0u64; 2], [0u64; 2]);
    let mut m = MigrateVma::new(&g.space, a, a + 2 * PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!(
        (m.cpages, m.src[1]),
        (1, 0),
        "the pinned page is not collected"
    );
    let d = device_dsts(&g, 2);
    m.dst[0] = migrate_pfn(d[0]);
    m.src[1] = migrate_pfn(pinned) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE;
    m.dst[1] = migrate_pfn(d[1]);
    let s0 = migrate_pfn_to_pfn(m.src[0]).unwrap();
    g.d.device().copy(&[(s0, d[0])]).unwrap().wait().unwrap();
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    drop(m);
    assert_eq!(dev_pfn(&g.space, a), d[0]);
    assert!(matches!(g.space.pte(a + PAGE), Pte::Present { pfn, .. } if pfn == pinned));
    let d1 = g.pm.page(d[1]).unwrap();
    assert_eq!(
        (d1.refcount(), d1.mapcount()),
        (0, 0),
        "unused destination freed"
    );
    drop(pin);
    assert!(unsettled(&g.space, &g.pm, a, 2).is_empty());
    assert_eq!(read(&g.space, a, 8192), data);
}

/// Frees through the frame pool's word-at-a-time path: an ascending batch that names a
/// frame twice, one not allocated, or crosses words with a bad frame in a later word is
/// refused whole (`DoubleFree` naming the frame), and a good batch then frees exactly its
/// frames.
#[test]
fn frame_pool_batches_that_repeat_or_name_free_frames_are_refused_whole() {
    let pool = HostFramePool::new(8 << 20).unwrap();
    let frames = pool.alloc_batch(200, false).unwrap();
    let mut sorted = frames.clone();
    sorted.sort();
    let used = pool.in_use();
    let (f, g) = (sorted[3], sorted[4]);
    for batch in [
        vec![f, f, g],
        vec![sorted[0], f, g, g],
        vec![f, g, sorted[150], sorted[150], sorted[199]],
    ] {
        let r = pool.free_batch(&batch);
        assert!(
            matches!(r, Err(EngineError::DoubleFree(p)) if batch.contains(&p)),
            "{batch:?}: {r:?}"
        );
        assert_eq!(pool.in_use(), used, "{batch:?}: nothing freed");
        assert!(batch.iter().all(|&p| pool.is_allocated(p)));
    }
    // Free one frame, then a batch across words that names it.
    pool.free(sorted[130]).unwrap();
    let batch: Vec<Pfn> = sorted[100..160].to_vec();
    assert!(matches!(
        pool.free_batch(&batch),
        Err(EngineError::DoubleFree(p)) if p == sorted[130]
    ));
    assert_eq!(pool.in_use(), used - 1);
    assert!(batch
        .iter()
        .all(|&p| pool.is_allocated(p) == (p != sorted[130])));
    // The good ascending batch frees exactly its frames; a second free of it is refused.
    let good: Vec<Pfn> = sorted[..100].to_vec();
    pool.free_batch(&good).unwrap();
    assert_eq!(pool.in_use(), used - 101);
    assert!(good.iter().all(|&p| !pool.is_allocated(p)));
    assert!(sorted[100..]
        .iter()
        .all(|&p| pool.is_allocated(p) == (p != sorted[130])));
    assert!(matches!(
        pool.free_batch(&good),
        Err(EngineError::DoubleFree(_))
    ));
    assert_eq!(pool.in_use(), used - 101);
}
/// A device migration whose driver names one collected source (mapped nowhere any more: its
/// range was unmapped after collection) as another entry's destination. The pages stage must
/// refuse it: finalize would release the page as entry 0's source and then map it as entry
/// 1's destination, leaving a free page mapped.
#[test]
fn a_device_source_unmapped_meanwhile_is_refused_as_another_entrys_destination() {
    let g = setup();
    let (a, data) = written(&g.space, 2, 81);
    assert_eq!(g.d.migrate_to_device(&g.space, a, 2).unwrap().migrated, 2);
    let (x0, x1) = (dev_pfn(&g.space, a), dev_pfn(&g.space, a + PAGE));
    let in_use = g.d.device().pages_in_use();
    let mut m = DeviceMigration::pfns(&g.pm, &[x0, x1]).unwrap();
    assert_eq!(m.cpages(), 2);
    // The first page's only mapping goes: its page is now locked, referenced by the
    // migration alone and mapped nowhere, like a destination.
    g.space.munmap(a, PAGE).unwrap();
    assert_eq!(g.pm.page(x0).unwrap().mapcount(), 0);
    m.dst_mut()[1] = migrate_pfn(x0);
    let r = m.copied();
    assert!(
        matches!(r, Err(Error::PageInUse(p)) if p == x0),
        "a source of the same migration was taken as a destination: {:?}",
        r.as_ref().err()
    );
    // The migration was dropped by the failed stage: nothing migrated, the unmapped page is
    // freed once, the other is back where it was.
    assert!(matches!(g.space.pte(a + PAGE), Pte::DevicePrivate { pfn, .. } if pfn == x1));
    assert_eq!(g.pm.page(x0).unwrap().refcount(), 0, "x0 freed");
    assert_eq!(g.pm.page(x0).unwrap().flags(), 0);
    assert!(!g.pm.page(x1).unwrap().is_locked());
    assert_eq!(g.d.device().pages_in_use(), in_use - 1);
    assert!(unsettled(&g.space, &g.pm, a + PAGE, 1).is_empty());
    assert_eq!(read(&g.space, a + PAGE, 4096), data[4096..]);
}

/// Across migrations: migration B's driver names a source of migration A (a device page
/// mapped nowhere since its range was unmapped) as B's destination. B must refuse it, in its
/// pages stage and in a finalize without one, and A then finishes with its page as it was.
#[test]
fn another_migrations_source_mapped_nowhere_is_refused_as_a_destination() {
    let g = setup();
    let (a, _) = written(&g.space, 1, 91);
    let (b, data_b) = written(&g.space, 1, 92);
    assert_eq!(g.d.migrate_to_device(&g.space, a, 1).unwrap().migrated, 1);
    assert_eq!(g.d.migrate_to_device(&g.space, b, 1).unwrap().migrated, 1);
    let (xa, xb) = (dev_pfn(&g.space, a), dev_pfn(&g.space, b));
    let in_use = g.d.device().pages_in_use();
    let first = DeviceMigration::pfns(&g.pm, &[xa]).unwrap();
    assert_eq!(first.cpages(), 1);
    g.space.munmap(a, PAGE).unwrap();
    assert_eq!(g.pm.page(xa).unwrap().mapcount(), 0);
    // B collects `b`'s page and names A's source as its destination.
    let mut second = DeviceMigration::pfns(&g.pm, &[xb]).unwrap();
    second.dst_mut()[0] = migrate_pfn(xa);
    let r = second.copied();
    assert!(
        matches!(r, Err(Error::PageInUse(p)) if p == xa),
        "another migration's source was taken as a destination: {:?}",
        r.as_ref().err()
    );
    // The raw calls, without a pages stage: the word is forgotten, nothing released.
    let mut src = [migrate_pfn(xb)];
    assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 1);
    let mut dst = [migrate_pfn(xa)];
    migrate_device_finalize(&g.pm, &mut src, &mut dst);
    let pa = g.pm.page(xa).unwrap();
    assert!(pa.is_locked(), "A's source is still A's");
    assert_eq!(pa.refcount(), 1);
    // A finishes: nothing maps its page, so it is freed, once.
    drop(first);
    assert_eq!(g.pm.page(xa).unwrap().refcount(), 0);
    assert_eq!(g.pm.page(xa).unwrap().flags(), 0);
    assert!(matches!(g.space.pte(b), Pte::DevicePrivate { pfn, .. } if pfn == xb));
    assert!(!g.pm.page(xb).unwrap().is_locked());
    assert_eq!(g.d.device().pages_in_use(), in_use - 1);
    assert_eq!(read(&g.space, b, 4096), data_b);
}

/// The raw calls, finalize without a pages stage: `migrate_device_finalize` must not release
/// a source unmapped meanwhile that the driver named as another entry's destination.
#[test]
fn raw_device_finalize_leaves_alone_a_source_named_as_a_destination() {
    let g = setup();
    let (a, data) = written(&g.space, 2, 87);
    assert_eq!(g.d.migrate_to_device(&g.space, a, 2).unwrap().migrated, 2);
    let (x0, x1) = (dev_pfn(&g.space, a), dev_pfn(&g.space, a + PAGE));
    let in_use = g.d.device().pages_in_use();
    let mut src = [migrate_pfn(x0), migrate_pfn(x1)];
    assert_eq!(migrate_device_pfns(&g.pm, &mut src).unwrap(), 2);
    g.space.munmap(a, PAGE).unwrap();
    let mut dst = [0, migrate_pfn(x0)];
    migrate_device_finalize(&g.pm, &mut src, &mut dst);
    assert_eq!(g.pm.page(x0).unwrap().refcount(), 0, "x0 freed once");
    assert!(matches!(g.space.pte(a + PAGE), Pte::DevicePrivate { pfn, .. } if pfn == x1));
    assert!(!g.pm.page(x1).unwrap().is_locked());
    assert_eq!(g.d.device().pages_in_use(), in_use - 1);
    assert_eq!(read(&g.space, a + PAGE, 4096), data[4096..]);
}
/// MIGRATE set on an entry that maps the zero page, in a migration that does not select
/// system memory (setup takes the zero page as a hole only with `SELECT_SYSTEM`), must not
/// make the pages stage replace the zero page.
#[test]
fn migrate_set_on_the_zero_page_without_select_system_inserts_nothing() {
    let g = setup();
    let a = g
        .space
        .mmap(None, PAGE, hetmem::mm::Prot::RW, false)
        .unwrap();
    assert_eq!(read(&g.space, a, 16), vec![0u8; 16]);
    let zero = g.pm.zero_pfn();
    assert!(
        matches!(g.space.pte(a), Pte::Present { pfn, .. } if pfn == zero),
        "a read of a hole maps the zero page: {:?}",
        g.space.pte(a)
    );
    let (mut src, mut dst) = ([0u64; 1], [0u64; 1]);
    let mut m = MigrateVma::new(&g.space, a, a + PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!((m.cpages, m.src[0]), (0, 0));
    let d = device_dsts(&g, 1);
    g.d.device().write_page(d[0], 0, &[7u8; 16]).unwrap();
    m.src[0] = MIGRATE_PFN_MIGRATE;
    m.dst[0] = migrate_pfn(d[0]);
    migrate_vma_pages(&mut m).unwrap();
    assert_eq!(
        m.src[0] & MIGRATE_PFN_MIGRATE,
        0,
        "the entry stopped migrating"
    );
    migrate_vma_finalize(&mut m);
    drop(m);
    assert!(
        matches!(g.space.pte(a), Pte::Present { pfn, .. } if pfn == zero),
        "the zero page was replaced: {:?}",
        g.space.pte(a)
    );
    assert_eq!(g.pm.page(d[0]).unwrap().refcount(), 0, "destination freed");
    assert_eq!(read(&g.space, a, 16), vec![0u8; 16]);
}

/// MIGRATE set on a hole of a shared mapping (which setup does not collect: shared memory
/// does not migrate) must not make the pages stage insert a page there.
#[test]
fn migrate_set_on_a_shared_mappings_hole_inserts_nothing() {
    let g = setup();
    let a = g
        .space
        .mmap(None, 2 * PAGE, hetmem::mm::Prot::RW, true)
        .unwrap();
    let (mut src, mut dst) = ([0u64; 2], [0u64; 2]);
    let mut m = MigrateVma::new(&g.space, a, a + 2 * PAGE, &mut src, &mut dst);
    m.flags = MIGRATE_VMA_SELECT_SYSTEM;
    m.pgmap_owner = g.d.owner();
    migrate_vma_setup(&mut m).unwrap();
    assert_eq!((m.cpages, m.src[0], m.src[1]), (0, 0, 0));
    let d = device_dsts(&g, 1);
    g.d.device().write_page(d[0], 0, &[7u8; 16]).unwrap();
    m.src[0] = MIGRATE_PFN_MIGRATE;
    m.dst[0] = migrate_pfn(d[0]);
    migrate_vma_pages(&mut m).unwrap();
    migrate_vma_finalize(&mut m);
    drop(m);
    assert!(
        matches!(g.space.pte(a), Pte::None),
        "a page was inserted into a shared mapping: {:?}",
        g.space.pte(a)
    );
    assert_eq!(g.pm.page(d[0]).unwrap().refcount(), 0, "destination freed");
    assert_eq!(read(&g.space, a, 16), vec![0u8; 16]);
}
