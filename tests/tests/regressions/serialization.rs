//! Defects 1 to 4 and 11: holes read as zeros, copy-on-write invalidates, munmap and
//! mprotect during a migration, mmap in a forked space.

use super::*;

/// Defect 1: every hole that a GpuDriver migration fills reads as zeros, even when the free
/// list holds frames of an unmapped range full of 0xAB. Three paths: the scenario
/// (page 0 written, pages 0..16 migrated to the device, the range read back), fault-around
/// (only page 0 on the device: the fault brings back a 16-page window of which 15 are
/// holes), and `migrate_to_host` of a range whose pages 1..15 are holes.
#[test]
fn d01_holes_filled_by_a_migration_read_as_zeros() {
    watchdog("d01", || {
        let g = gpu(MemoryKind::DevicePrivate, 256, 16, SMALL_POOL);
        let mut keep = KeepOnPanic::default();
        g.keep(&mut keep);
        let (d, space) = (&g.d, &g.space);
        let mut bad = Vec::new();
        for path in [
            "pages 0..16 to the device, then a CPU read",
            "page 0 to the device, then a CPU read (fault-around)",
            "page 0 to the device, then migrate_to_host of pages 0..16",
        ] {
            // Stale bytes on the free list: a range full of 0xAB, unmapped.
            let junk = map(space, 64);
            space.write(junk, &[0xab; 64 * 4096]).unwrap();
            space.munmap(junk, 64 * PAGE).unwrap();
            let a = map(space, 16);
            space.write(a, &[0x11; 4096]).unwrap();
            let to_device = if path.starts_with("pages 0..16") {
                16
            } else {
                1
            };
            d.migrate_to_device(space, a, to_device).unwrap();
            if path.contains("migrate_to_host") {
                d.migrate_to_host(space, a, 16).unwrap();
            }
            let got = read(space, a, 16 * 4096);
            let mut want = vec![0u8; 16 * 4096];
            want[..4096].fill(0x11);
            for diff in differences(&got, &want) {
                bad.push(format!("{path}: {diff}"));
            }
        }
        assert!(
            bad.is_empty(),
            "holes filled by a migration must read as zeros:\n{}",
            bad.join("\n")
        );
    });
}

/// Defect 2: a CPU write that copies on write (to a page shared after fork, or to the zero
/// page a read mapped) installs a new frame, so it must invalidate the address (start and
/// end) for the device mirrors, after whatever fork itself notified.
#[test]
fn d02_a_copy_on_write_invalidates_the_address() {
    watchdog("d02", || {
        let pool = HostFramePool::new(SMALL_POOL).unwrap();
        let pm = PageMap::new(pool).unwrap();
        let space = AddressSpace::new(&pm);
        let rec = Arc::new(Recorder::default());
        space.register_notifier(rec.clone());
        let mut bad = Vec::new();

        // The zero page: a read of a hole maps it, a write replaces it.
        let a = map(&space, 2);
        assert_eq!(read(&space, a, 1), [0]);
        assert!(
            matches!(space.pte(a), Pte::Present { pfn, write: false, .. } if pfn == pm.zero_pfn()),
            "a read of a hole of a private mapping maps the zero page: {:?}",
            space.pte(a)
        );
        rec.take();
        space.write(a, &[1]).unwrap();
        bad.extend(invalidated("a write over the zero page", &rec.take(), a));

        // Fork: both sides share the page read-only; a write on either side copies it.
        let b = map(&space, 2);
        space.write(b, &[2; 2 * 4096]).unwrap();
        let child = space.fork().unwrap();
        let crec = Arc::new(Recorder::default());
        child.register_notifier(crec.clone());
        rec.take(); // fork's own notifications
        space.write(b, &[3]).unwrap();
        bad.extend(invalidated("the parent's write after fork", &rec.take(), b));
        child.write(b + PAGE, &[4]).unwrap();
        bad.extend(invalidated(
            "the child's write after fork",
            &crec.take(),
            b + PAGE,
        ));
        // The copies happened: each write stayed on its side.
        assert_eq!(read(&child, b, 1), [2]);
        assert_eq!(read(&space, b + PAGE, 1), [2]);
        assert!(
            bad.is_empty(),
            "copy on write without invalidation:\n{}",
            bad.join("\n")
        );
    });
}

/// Defect 3: a munmap of the range on another thread between `migrate_vma_setup` and
/// `migrate_vma_pages` (which may wait, once fixed, until finalize): afterwards the range
/// mapped again has no entry at all (no page came back into the unmapped range) and every
/// device page the migration allocated is free again.
#[test]
fn d03_munmap_during_a_migration_gets_no_pages_back() {
    watchdog("d03", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 8);
        space.write(a, &pattern(5, 3)).unwrap(); // pages 5..8 stay holes
        let before = dev.device().pages_in_use();
        let mut src = vec![0u64; 8];
        let mut dst = vec![0u64; 8];
        let mut m = MigrateVma::new(space, a, a + 8 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.cpages, 8);
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        let other = space.clone();
        let unmap = start_elsewhere(move || other.munmap(a, 8 * PAGE));
        // A fixed library may refuse the pages stage of a range that is gone.
        let _ = migrate_vma_pages(&mut m);
        migrate_vma_finalize(&mut m);
        unmap.finish("munmap").unwrap();
        space.mmap(Some(a), 8 * PAGE, Prot::RW, false).unwrap();
        let left = entries_left(space, a, 8);
        assert!(
            left.is_empty(),
            "the range unmapped during the migration has entries again: {left:?}"
        );
        assert_eq!(
            dev.device().pages_in_use(),
            before,
            "device pages of the migration are still in use"
        );
    });
}

/// Defect 4: an mprotect(READ) of the range on another thread after `migrate_vma_setup`:
/// once the migration is over, no entry of the range is writable and a CPU write is denied.
#[test]
fn d04_mprotect_during_a_migration_leaves_entries_read_only() {
    watchdog("d04", || {
        let env = mirror(MemoryKind::DevicePrivate);
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let a = map(space, 8);
        let data = pattern(6, 4);
        space.write(a, &data).unwrap(); // pages 6, 7 stay holes
        let mut src = vec![0u64; 8];
        let mut dst = vec![0u64; 8];
        let mut m = MigrateVma::new(space, a, a + 8 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = dev.owner();
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        assert_eq!(m.cpages, 8);
        fill_dst(&*m.src, &mut *m.dst, dev.device(), pm);
        let other = space.clone();
        let protect = start_elsewhere(move || other.mprotect(a, 8 * PAGE, Prot::READ));
        // A fixed library may refuse the pages stage of a range whose protection changed.
        let _ = migrate_vma_pages(&mut m);
        migrate_vma_finalize(&mut m);
        protect.finish("mprotect").unwrap();
        let mut bad: Vec<String> = Vec::new();
        for k in 0..8u64 {
            let pte = space.pte(a + k * PAGE);
            let ok = match pte {
                Pte::Present { write, .. } | Pte::DevicePrivate { write, .. } => !write,
                Pte::None => k >= 6, // a hole may stay one
                _ => false,
            };
            if !ok {
                bad.push(format!("page {k}: {pte:?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "entries must come back read-only after mprotect(READ): {bad:?}"
        );
        let e = space.write(a, &[1]).unwrap_err();
        assert!(matches!(e, Error::WriteDenied(_)), "{e}");
        let got = read(space, a, 8 * 4096);
        let mut want = data;
        want.resize(8 * 4096, 0);
        assert_eq!(differences(&got, &want), Vec::<String>::new());
    });
}

/// Defect 11: `mmap(None, ..)` in a space forked from one with a mapping made by
/// `mmap(None, ..)` succeeds, at a range that does not overlap the inherited mapping.
#[test]
fn d11_mmap_anywhere_in_a_forked_space() {
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let pm = PageMap::new(pool).unwrap();
    let space = AddressSpace::new(&pm);
    let a = map(&space, 4);
    space.write(a, b"parent").unwrap();
    let child = space.fork().unwrap();
    let c = child
        .mmap(None, 4 * PAGE, Prot::RW, false)
        .expect("mmap(None) in a forked space");
    assert!(
        c + 4 * PAGE <= a || a + 4 * PAGE <= c,
        "the new mapping {c:#x} overlaps the inherited one at {a:#x}"
    );
    assert_eq!(read(&child, a, 6), b"parent");
    child.write(c, b"child").unwrap();
    assert_eq!(read(&child, c, 5), b"child");
}
