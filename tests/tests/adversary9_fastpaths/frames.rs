//! Frees through the frame pool's word-at-a-time path (`put_ascending`) and the slot-by-slot
//! path it falls back to: a batch that is refused changes nothing, whichever path saw it.

use hetmem_engine::{EngineError, HostFramePool, Pfn};

/// Everything a refused free must leave alone, per frame: allocated, adopted, and whether
/// a safe write reaches it (sealed and home frames refuse one).
fn state(pool: &HostFramePool, pfns: &[Pfn]) -> Vec<(bool, bool, bool)> {
    pfns.iter()
        .map(|&p| {
            let writable = pool.write(p, 0, &[]).is_ok();
            (pool.is_allocated(p), pool.is_adopted(p), writable)
        })
        .collect()
}

/// Ascending batches (the fast path) and unsorted ones (the slot-by-slot path) that name a
/// frame twice or a free frame are refused with `DoubleFree` naming that frame, and every
/// frame of the batch stays allocated; the same batch without the fault then frees.
#[test]
fn double_frees_are_refused_on_both_paths_with_nothing_freed() {
    let pool = HostFramePool::new(8 << 20).unwrap();
    let pfns = pool.alloc_batch(300, false).unwrap();
    let base = pool.in_use();
    let gone = pool.alloc(false).unwrap();
    pool.free(gone).unwrap();
    // Ascending with a frame that was freed, across several bitmap words.
    let mut with_free: Vec<Pfn> = pfns[..200].to_vec();
    with_free.push(gone);
    with_free.sort_unstable();
    let before = state(&pool, &pfns);
    assert!(matches!(pool.free_batch(&with_free), Err(EngineError::DoubleFree(p)) if p == gone));
    // One frame twice, adjacent (not strictly ascending).
    let mut twice = pfns[..130].to_vec();
    twice.insert(70, pfns[69]);
    assert!(matches!(pool.free_batch(&twice), Err(EngineError::DoubleFree(p)) if p == pfns[69]));
    // One frame twice, far apart (descending order: the slow path from the start).
    let mut rev: Vec<Pfn> = pfns.iter().rev().copied().collect();
    rev.push(pfns[299]);
    assert!(matches!(pool.free_batch(&rev), Err(EngineError::DoubleFree(p)) if p == pfns[299]));
    assert_eq!(state(&pool, &pfns), before, "a refused batch frees nothing");
    assert_eq!(pool.in_use(), base);
    // Now freed for real, ascending; a second free of any of them is refused.
    pool.free_batch(&pfns).unwrap();
    assert_eq!(pool.in_use(), base - 300);
    assert!(pfns.iter().all(|&p| !pool.is_allocated(p)));
    assert!(
        matches!(pool.free_batch(&pfns[5..9]), Err(EngineError::DoubleFree(p)) if p == pfns[5])
    );
    assert_eq!(pool.in_use(), base - 300);
}

/// A sealed adopted frame (the zero page's kind) in a batch of adopted frees that is
/// refused, because a later frame of the batch is not adopted or is named twice, stays
/// sealed: a safe write to it is still refused.
#[test]
fn a_refused_adopted_batch_leaves_a_sealed_frame_sealed() {
    let pool = HostFramePool::new(8 << 20).unwrap();
    let f = pool.alloc_batch(4, true).unwrap();
    pool.adopt(&f[..3]).unwrap();
    pool.seal(f[0]).unwrap();
    assert!(matches!(
        pool.write(f[0], 0, &[1]),
        Err(EngineError::FrameOwned(_))
    ));
    let before = state(&pool, &f);
    // Ascending, the last frame not adopted (the fast path declines, the slow one refuses).
    // SAFETY: the batch is refused (f[3] was never adopted), so nothing is freed; nothing
    // else uses this pool.
    let r = unsafe { pool.free_adopted(&[f[0], f[1], f[3]]) };
    assert!(matches!(r, Err(EngineError::InvalidConfig(_))), "{r:?}");
    assert_eq!(state(&pool, &f), before, "not adopted: nothing changed");
    // Not ascending: f[1] twice.
    // SAFETY: refused (a frame named twice); nothing is freed.
    let r = unsafe { pool.free_adopted(&[f[0], f[1], f[2], f[1]]) };
    assert!(
        matches!(r, Err(EngineError::DoubleFree(p)) if p == f[1]),
        "{r:?}"
    );
    assert_eq!(state(&pool, &f), before, "named twice: nothing changed");
    let mut out = [0u8; 1];
    pool.read(f[0], 0, &mut out).unwrap();
    assert_eq!(out, [0], "the sealed frame still reads as zeros");
}

/// A claimed home frame in an adopted batch that is refused for a frame named twice keeps
/// its bytes: with punching on, nothing may be punched before the batch is known to free.
#[test]
fn a_refused_batch_does_not_punch_its_home_frames() {
    let pool = HostFramePool::new(8 << 20).unwrap();
    assert!(
        pool.allow_home_punching(),
        "the pool is a memfd, so freed home frames can be punched"
    );
    let run = pool.reserve_home(2).unwrap();
    let h = run.start;
    pool.claim_home(h, true).unwrap();
    let data: Vec<u8> = (0..4096).map(|i| (i % 253) as u8 | 1).collect();
    // SAFETY: no CPU mapping of this pool's frames exists in this test.
    unsafe { pool.write_owned(h, 0, &data).unwrap() };
    let x = pool.alloc(false).unwrap();
    pool.adopt(&[x]).unwrap();
    // SAFETY: refused (x named twice), so nothing is freed; nothing maps these frames.
    let r = unsafe { pool.free_adopted(&[h, x, x]) };
    assert!(
        matches!(r, Err(EngineError::DoubleFree(p)) if p == x),
        "{r:?}"
    );
    assert_eq!(pool.punched_frames(), 0, "a refused batch punches nothing");
    let mut back = vec![0u8; 4096];
    // SAFETY: as above.
    unsafe { pool.read_owned(h, 0, &mut back).unwrap() };
    assert!(
        back == data,
        "the home frame lost its bytes to a refused free"
    );
    assert!(pool.is_adopted(h) && pool.is_adopted(x));
    // The same frames freed properly: the home frame is punched then.
    // SAFETY: nothing reaches either frame any more.
    unsafe { pool.free_adopted(&[h, x]).unwrap() };
    assert_eq!(pool.punched_frames(), 1);
}

/// An ascending adopted batch mixing claimed home frames and ordinary ones, across bitmap
/// words (the word-at-a-time path): the ordinary frames go back to the pool, the home
/// frames stay in their run (never handed out by `alloc`, claimable again in place), and
/// a second free of any of them is refused with nothing changed.
#[test]
fn an_ascending_batch_with_home_frames_keeps_the_homes_in_their_run() {
    let pool = HostFramePool::new(4 << 20).unwrap();
    let run = pool.reserve_home(70).unwrap();
    let homes: Vec<Pfn> = (0..70).step_by(3).map(|k| run.start.add(k)).collect();
    for &h in &homes {
        pool.claim_home(h, true).unwrap();
    }
    let plain = pool.alloc_batch(130, false).unwrap();
    pool.adopt(&plain).unwrap();
    let mut batch: Vec<Pfn> = homes.iter().chain(&plain).copied().collect();
    batch.sort_unstable();
    let in_use = pool.in_use();
    // SAFETY: nothing maps or references these frames.
    unsafe { pool.free_adopted(&batch).unwrap() };
    assert_eq!(pool.in_use(), in_use - batch.len());
    assert!(batch
        .iter()
        .all(|&p| !pool.is_allocated(p) && !pool.is_adopted(p)));
    assert!(
        homes.iter().all(|&h| pool.is_home(h)),
        "home frames stay in their run"
    );
    // SAFETY: refused (freed already); nothing is freed.
    let r = unsafe { pool.free_adopted(&batch[..40]) };
    assert!(
        matches!(r, Err(EngineError::DoubleFree(p)) if p == batch[0]),
        "{r:?}"
    );
    // Everything the pool can hand out: no home frame among it.
    let all = pool.alloc_batch(pool.available(), false).unwrap();
    let got: std::collections::HashSet<Pfn> = all.iter().copied().collect();
    assert!(
        plain.iter().all(|p| got.contains(p)),
        "ordinary frames came back"
    );
    assert!(
        homes.iter().all(|h| !got.contains(h)),
        "a home frame was handed out"
    );
    for &h in &homes {
        pool.claim_home(h, false).unwrap();
    }
}
