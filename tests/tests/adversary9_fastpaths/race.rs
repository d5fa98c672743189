//! Two pages stages racing for overlapping destination sets, then both finalizing: every
//! page must end in exactly one valid place, unlocked, with its bytes, and each destination
//! must be mapped once or released once.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use hetmem::migration::*;
use hetmem::mm::{AddressSpace, MemoryKind, Owner, PAGE};
use hetmem::{Error, VirtAddr};
use hetmem_engine::Pfn;
use hetmem_tests::harness::{
    dev_pfn, gpu, join_all, map, read, unsettled, watchdog_for, Gpu, SMALL_POOL,
};

/// Entries per migration; the destinations are `2 * N - N / 2` pages, the middle `N / 2`
/// named by both.
const N: usize = 64;
const D: usize = 2 * N - N / 2;

/// The bytes destination `k` is given (and the page each entry that names it holds).
fn content(k: usize, round: usize) -> Vec<u8> {
    (0..4096)
        .map(|i| (k as u8).wrapping_mul(31) ^ (round as u8) ^ (i % 239) as u8)
        .collect()
}

/// One migration of `N` pages from `a` in `space`, naming `dst(i)` for entry `i`, whose
/// pages stage starts with the other's. Returns how many entries migrated, or the error.
fn racer(
    space: AddressSpace,
    a: VirtAddr,
    dst: Vec<Pfn>,
    go: Arc<Barrier>,
) -> std::result::Result<usize, Error> {
    let mut m = Migration::setup(
        &space,
        a,
        a + N as u64 * PAGE,
        MIGRATE_VMA_SELECT_SYSTEM,
        Owner(9),
        None,
    )?;
    assert_eq!(m.cpages(), N);
    for (i, &p) in dst.iter().enumerate() {
        m.dst_mut()[i] = migrate_pfn(p);
    }
    go.wait();
    let out = m.copied()?.finalize();
    Ok(out.migrated)
}

/// Migration 1 names destinations `0..N` ascending, migration 2 names `D-1` down to
/// `D-N` (so they meet in the middle from opposite ends); both run at once, many rounds.
/// At most one can win the shared pages; a loser restores its pages and must release only
/// the destinations nobody took.
///
/// Long: one round's setup, race and per-page accounting read best in one place.
#[test]
fn overlapping_pages_stages_leave_every_page_in_one_place() {
    watchdog_for("racing pages stages", Duration::from_secs(120), || {
        let g: Gpu = gpu(MemoryKind::DevicePrivate, 64, 1, SMALL_POOL);
        let mut tally = [0usize; 3];
        for round in 0..150 {
            let (s1, s2) = (AddressSpace::new(&g.pm), AddressSpace::new(&g.pm));
            let (a1, a2) = (map(&s1, N as u64), map(&s2, N as u64));
            let want1: Vec<u8> = (0..N).flat_map(|i| content(i, round)).collect();
            let want2: Vec<u8> = (0..N).flat_map(|j| content(D - 1 - j, round)).collect();
            s1.write(a1, &want1).unwrap();
            s2.write(a2, &want2).unwrap();
            let base = g.pool.in_use();
            let d: Vec<Pfn> = (0..D)
                .map(|k| {
                    let p = g.pm.alloc_page(true, true).unwrap().into_pfn();
                    g.pm.write_frame(p, 0, &content(k, round)).unwrap();
                    p
                })
                .collect();
            let go = Arc::new(Barrier::new(2));
            let d1 = d[..N].to_vec();
            let d2: Vec<Pfn> = (0..N).map(|j| d[D - 1 - j]).collect();
            let h1 = {
                let (s, go) = (s1.clone(), go.clone());
                thread::spawn(move || racer(s, a1, d1, go))
            };
            let h2 = {
                let (s, go) = (s2.clone(), go.clone());
                thread::spawn(move || racer(s, a2, d2, go))
            };
            let r = join_all("racers", vec![h1, h2], Duration::from_secs(30));
            for x in &r {
                match x {
                    Ok(n) => assert_eq!(*n, N, "a winner migrates every entry"),
                    Err(e) => assert!(
                        matches!(
                            e,
                            Error::PageInUse(_) | Error::PageFree(_) | Error::NotLocked(_)
                        ),
                        "{e:?}"
                    ),
                }
            }
            tally[r.iter().filter(|x| x.is_ok()).count()] += 1;
            assert!(
                r.iter().any(|x| x.is_err()),
                "both cannot take the shared pages"
            );
            assert_eq!(read(&s1, a1, N * 4096), want1, "round {round}: space 1");
            assert_eq!(read(&s2, a2, N * 4096), want2, "round {round}: space 2");
            assert!(unsettled(&s1, &g.pm, a1, N).is_empty(), "round {round}");
            assert!(unsettled(&s2, &g.pm, a2, N).is_empty(), "round {round}");
            let mapped: Vec<Pfn> = (0..N)
                .map(|i| dev_pfn(&s1, a1 + i as u64 * PAGE))
                .chain((0..N).map(|j| dev_pfn(&s2, a2 + j as u64 * PAGE)))
                .collect();
            let distinct: HashSet<Pfn> = mapped.iter().copied().collect();
            assert_eq!(distinct.len(), 2 * N, "round {round}: a page mapped twice");
            for (k, &p) in d.iter().enumerate() {
                let page = g.pm.page(p).unwrap();
                if distinct.contains(&p) {
                    assert_eq!(
                        (page.refcount(), page.mapcount(), page.is_locked()),
                        (1, 1, false),
                        "round {round}: mapped destination {k}"
                    );
                } else {
                    assert_eq!(
                        (page.refcount(), page.flags()),
                        (0, 0),
                        "round {round}: unused destination {k} not released exactly once"
                    );
                    assert!(!g.pool.is_allocated(p), "round {round}: destination {k}");
                }
            }
            assert_eq!(
                g.pool.in_use(),
                base,
                "round {round}: frames leaked or freed twice"
            );
        }
        eprintln!("rounds by winners (none, one): {:?}", &tally[..2]);
    });
}
