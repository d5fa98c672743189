//! The page map's frames from safe code (claimed home frames, live pages' frames, the shared
//! zero page, migrations of a viewed buffer's range) and kernel dispatches against the
//! device-page bit locks: the second half of `adversary4_frames`.

use hetmem::mm::MemoryKind;

use super::*;

// ---------------------------------------------------------------------------------------
// C. The page map's frames: claimed home frames, live pages' frames, the zero page.
// ---------------------------------------------------------------------------------------

/// `r` failed with `FrameOwned(pfn)`.
fn owned<T: std::fmt::Debug>(r: Result<T, EngineError>, pfn: Pfn, what: &str) {
    assert!(
        matches!(r, Err(EngineError::FrameOwned(p)) if p == pfn),
        "{what}: {r:?}"
    );
}

/// A claimed home frame (behind a CPU-mapped buffer) is refused by every safe call that
/// names it: the pool's read, write, zero, free (alone or in a batch, which then frees
/// nothing), adopt and claim_home; device copies into and out of it, host-to-host too, by
/// `copy`, `copy_queued` and `copy_sync`; the page map's read_frame, write_frame and
/// claim_frame. Its bytes and its owner are unchanged afterwards.
///
/// Long: one list of refused calls on one frame.
#[test]
fn a_claimed_home_frame_is_refused_by_every_safe_call() {
    let test = "a_claimed_home_frame_is_refused_by_every_safe_call";
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let ctx = offload_context(DeviceKind::Host, 64 * 4096, Some(pool.clone()), test).unwrap();
    let Some(buf) = mapped_buffer(&ctx, PAGE_SIZE, test) else {
        return;
    };
    buf.write(0, &page_of(7)).unwrap();
    let home = ctx.space().pte(buf.addr()).pfn().expect("mapped");
    assert!(
        pool.is_home(home) && pool.is_adopted(home),
        "not a claimed home frame"
    );
    let pm = ctx.space().pagemap().clone();
    let dev = ctx.driver().device().clone();
    let mine = pool.alloc(false).unwrap();
    pool.write(mine, 0, &page_of(0xEE)).unwrap();
    let dpage = dev.alloc_page(false).unwrap();
    dev.write_page(dpage, 0, &page_of(0xEE)).unwrap();
    let used = pool.in_use();

    let mut b = [0u8; 8];
    owned(pool.read(home, 0, &mut b), home, "pool.read");
    owned(pool.write(home, 0, &[1]), home, "pool.write");
    owned(pool.zero(home), home, "pool.zero");
    owned(pool.free(home), home, "pool.free");
    owned(pool.free_batch(&[mine, home]), home, "pool.free_batch");
    assert!(pool.is_allocated(mine), "a refused batch freed a frame");
    owned(pool.adopt(&[home]), home, "pool.adopt");
    let c = pool.claim_home(home, true);
    assert!(
        matches!(c, Err(EngineError::FrameInUse(p)) if p == home),
        "claim_home: {c:?}"
    );
    for (what, pairs) in [
        ("to a device page", [(home, dpage)]),
        ("from a device page", [(dpage, home)]),
        ("to a frame", [(home, mine)]),
        ("from a frame", [(mine, home)]),
    ] {
        owned(dev.copy(&pairs).map(|_| ()), home, &format!("copy {what}"));
        owned(
            dev.copy_queued(&pairs).map(|_| ()),
            home,
            &format!("copy_queued {what}"),
        );
        owned(dev.copy_sync(&pairs), home, &format!("copy_sync {what}"));
    }
    let r = pm.read_frame(home, 0, &mut b);
    assert!(r.is_err(), "PageMap::read_frame of a home frame: {r:?}");
    let w = pm.write_frame(home, 0, &[1]);
    assert!(w.is_err(), "PageMap::write_frame of a home frame: {w:?}");
    let c = pm.claim_frame(home, false).map(|p| p.pfn());
    assert!(
        matches!(c, Err(hetmem::Error::PageInUse(p)) if p == home),
        "PageMap::claim_frame of a home frame: {c:?}"
    );
    let mut back = page_of(0);
    buf.read(0, &mut back).unwrap();
    assert_eq!(back, page_of(7), "the home frame's bytes changed");
    assert_eq!(
        page_bytes(&dev, dpage),
        page_of(0xEE),
        "a refused copy wrote"
    );
    assert_eq!(
        frame_bytes(&pool, mine),
        page_of(0xEE),
        "a refused copy wrote"
    );
    assert_eq!(
        pool.in_use(),
        used,
        "a refused call took or gave back frames"
    );
    assert!(pool.is_adopted(home) && pool.is_allocated(home));
    pool.free(mine).unwrap();
    dev.free_page(dpage).unwrap();
}

/// A live page's frame (not a home frame) in a batch with a free-able frame: `free_batch`
/// refuses the whole batch with `FrameOwned`, frees nothing, and the page keeps its bytes.
#[test]
fn a_live_pages_frame_in_a_batch_is_refused_and_the_batch_frees_nothing() {
    let g = gpu(MemoryKind::DevicePrivate, 16, 1, SMALL_POOL);
    let a = map(&g.space, 2);
    g.space.write(a, &pattern(2, 3)).unwrap();
    let live = g.space.pte(a + 4096).pfn().expect("present");
    let mine = g.pool.alloc(false).unwrap();
    let used = g.pool.in_use();
    owned(g.pool.free_batch(&[mine, live]), live, "free_batch");
    owned(
        g.pool.free_batch(&[live, mine]),
        live,
        "free_batch, live first",
    );
    assert_eq!(g.pool.in_use(), used, "a refused batch freed frames");
    assert!(g.pool.is_allocated(mine) && g.pool.is_adopted(live));
    g.pool.free(mine).unwrap();
    assert_eq!(read(&g.space, a, 2 * 4096), pattern(2, 3));
}

/// The shared zero page (what every untouched page of every address space of the page map
/// reads through) is a frame of the pool that the page map adopted but that is no home
/// frame, so the safe `HostFramePool::write` (and `Device::copy` into it) writes it: every
/// untouched page of every space then reads the writer's bytes instead of zeros.
#[test]
fn the_shared_zero_page_cannot_be_written_from_safe_code() {
    let g = gpu(MemoryKind::DevicePrivate, 16, 1, SMALL_POOL);
    let zero = g.pm.zero_pfn();
    let w = g.pool.write(zero, 0, &page_of(0xBD));
    let dev = g.d.device().clone();
    let mine = g.pool.alloc(false).unwrap();
    g.pool.write(mine, 0, &page_of(0xBE)).unwrap();
    let c = dev.copy_sync(&[(mine, zero)]);
    let other = hetmem::mm::AddressSpace::new(&g.pm);
    let a = map(&other, 1);
    let seen = read(&other, a, PAGE_SIZE);
    // Put the zeros back for whatever else uses this page map.
    let _ = g.pool.zero(zero);
    let nonzero = seen.iter().filter(|&&b| b != 0).count();
    assert_eq!(
        nonzero, 0,
        "an untouched page reads {nonzero} non-zero bytes ({:#x}): the zero page was written (pool.write: {w:?}, copy: {c:?})",
        seen[0]
    );
    assert!(w.is_err() && c.is_err(), "pool.write: {w:?}, copy: {c:?}");
    g.pool.free(mine).unwrap();
}

/// The public migration API (`hetmem::migration::Migration`, safe) run by a user over a
/// CPU-mapped buffer while a shared view of it lives: if setup collects the home page and
/// the user's own destination replaces it, the home frame goes back to the pool (free) under
/// the live `&[u8]` and the buffer's bytes are no longer the view's. The buffer's page must
/// stay its home frame (the migration refused or the page skipped).
#[test]
fn a_user_migration_cannot_move_a_viewed_home_page() {
    use hetmem::migration::{migrate_pfn, Migration, MIGRATE_VMA_SELECT_SYSTEM};
    let test = "a_user_migration_cannot_move_a_viewed_home_page";
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let ctx = offload_context(DeviceKind::Host, 64 * 4096, Some(pool.clone()), test).unwrap();
    let Some(buf) = mapped_buffer(&ctx, PAGE_SIZE, test) else {
        return;
    };
    buf.write(0, &page_of(1)).unwrap();
    let view = buf.view::<u8>().unwrap();
    let home = ctx.space().pte(buf.addr()).pfn().expect("mapped");
    let pm = ctx.space().pagemap().clone();
    let end = buf.addr() + PAGE_SIZE as u64;
    let moved = match Migration::setup(
        ctx.space(),
        buf.addr(),
        end,
        MIGRATE_VMA_SELECT_SYSTEM,
        hetmem::Owner::NONE,
        None,
    ) {
        Err(_) => 0,
        Ok(mut m) => {
            if m.collected().next().is_some() {
                let new = pm.alloc_page(true, true).unwrap().into_pfn();
                m.dst_mut()[0] = migrate_pfn(new);
            }
            m.copied().map(|m| m.finalize().migrated).unwrap_or(0)
        }
    };
    let now = ctx.space().pte(buf.addr()).pfn();
    let still_claimed = pool.is_allocated(home);
    // SAFETY: a plain read of an element of the live view.
    let seen = unsafe { std::ptr::read_volatile(&view[0]) };
    drop(view);
    assert_eq!(
        (seen, moved, now, still_claimed),
        (1, 0, Some(home), true),
        "a user migration moved a viewed home page (home frame {home}): (byte under the view, pages migrated, page mapped now, home frame still claimed)"
    );
}

// ---------------------------------------------------------------------------------------
// D. Kernels: a dispatch's pages and the bit locks.
// ---------------------------------------------------------------------------------------

/// A dispatch writes device pages, and `Device::dispatch`, `PageTable::set` (any page of the
/// device's range, free or not), `read_page` and `alloc_pages` are all safe: a `read_page` of
/// a page a running kernel writes must wait for it (else it reads the bytes while the kernel
/// writes them: a data race from safe code), and a page freed under the kernel and allocated
/// zeroed by a new owner must not show the kernel's writes after the zeroing.
#[test]
fn device_pages_under_a_running_kernel_are_not_touched_by_others() {
    let Some(dev) = hetmem_tests::open_for_test(DeviceKind::Vulkan, 4 << 20, "kernel bits") else {
        return;
    };
    watchdog("kernel bits", move || {
        let kernel = dev
            .compile_kernel(SLOW_ADD_KERNEL, "add")
            .expect("compiles");
        let n = 16usize;
        let pages = dev.alloc_pages(n, true).unwrap();
        let table = dev.page_table(n).unwrap();
        for (i, &p) in pages.iter().enumerate() {
            table.set(i, Some(p)).unwrap();
        }
        let groups = (n * PAGE_SIZE / 4).div_ceil(64) as u32;
        let reps = 100u32;
        let whole = 0..n as u32;
        let ticket = dev
            .dispatch(
                &kernel,
                &table,
                std::slice::from_ref(&whole),
                &[1, n as u32, reps],
                [groups, 1, 1],
            )
            .unwrap();
        let early = page_bytes(&dev, pages[n - 1]);
        ticket.wait().unwrap();
        let words: Vec<u32> = early
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let done = words.iter().filter(|&&w| w == reps).count();
        // The second half: free a page under a dispatch, allocate it zeroed at once.
        let ticket = dev
            .dispatch(
                &kernel,
                &table,
                std::slice::from_ref(&whole),
                &[1, n as u32, reps],
                [groups, 1, 1],
            )
            .unwrap();
        dev.free_pages(&pages).unwrap();
        let again = dev.alloc_pages(n, true).unwrap();
        ticket.wait().unwrap();
        let dirty = again
            .iter()
            .filter(|&&p| page_bytes(&dev, p) != page_of(0))
            .count();
        dev.free_pages(&again).unwrap();
        assert_eq!(
            (done, dirty),
            (words.len(), 0),
            "a read_page under a running kernel saw {done} of {} words finished; {dirty} pages allocated zeroed under a dispatch read non-zero",
            words.len()
        );
    });
}

/// The driver's public migrations (`GpuDriver::migrate_to_device`, `migrate_to_host`, safe)
/// of a CPU-mapped buffer's range while a shared view of it lives: the page goes to the
/// device, a careless `write_page` there (safe: a live device page is not guarded by
/// ownership) changes its bytes, and the migration home copies them into the home frame
/// behind the live `&[u8]`. The driver must refuse ranges mapped for CPU pointers, as its
/// `pin_on_device` and `launch` do.
#[test]
fn the_drivers_public_migrations_cannot_move_a_viewed_home_page() {
    let test = "the_drivers_public_migrations_cannot_move_a_viewed_home_page";
    let pool = HostFramePool::new(SMALL_POOL).unwrap();
    let ctx = offload_context(DeviceKind::Host, 64 * 4096, Some(pool.clone()), test).unwrap();
    let Some(buf) = mapped_buffer(&ctx, PAGE_SIZE, test) else {
        return;
    };
    buf.write(0, &page_of(1)).unwrap();
    let view = buf.view::<u8>().unwrap();
    let home = ctx.space().pte(buf.addr()).pfn().expect("mapped");
    let to_device = ctx.driver().migrate_to_device(ctx.space(), buf.addr(), 1);
    let on_device = ctx.space().pte(buf.addr()).pfn().filter(|&p| p != home);
    if let Some(p) = on_device {
        let _ = ctx.driver().device().write_page(p, 0, &page_of(0x99));
    }
    let to_host = ctx.driver().migrate_to_host(ctx.space(), buf.addr(), 1);
    // SAFETY: a plain read of an element of the live view.
    let seen = unsafe { std::ptr::read_volatile(&view[0]) };
    drop(view);
    assert_eq!(
        (seen, on_device),
        (1, None),
        "the driver moved a viewed home page (to device: {to_device:?}, to host: {to_host:?})"
    );
    assert!(
        matches!(to_device, Err(hetmem::Error::InvalidArgument(_))),
        "{to_device:?}"
    );
}

/// Re-pointing an entry that a running dispatch binds waits for the dispatch (the kernel
/// reaches only the pages its entries named when it started, which it holds); an entry
/// outside every bound range changes at once.
#[test]
fn a_bound_table_entry_changes_only_after_the_dispatch() {
    let Some(dev) = hetmem_tests::open_for_test(DeviceKind::Vulkan, 4 << 20, "table entries")
    else {
        return;
    };
    watchdog("table entries", move || {
        let kernel = dev
            .compile_kernel(SLOW_ADD_KERNEL, "add")
            .expect("compiles");
        let n = 16usize;
        let pages = dev.alloc_pages(n + 1, true).unwrap();
        let table = dev.page_table(n + 1).unwrap();
        for (i, &p) in pages.iter().enumerate() {
            table.set(i, Some(p)).unwrap();
        }
        let groups = (n * PAGE_SIZE / 4).div_ceil(64) as u32;
        let whole = 0..n as u32;
        let ticket = dev
            .dispatch(
                &kernel,
                &table,
                std::slice::from_ref(&whole),
                &[1, n as u32, 100],
                [groups, 1, 1],
            )
            .unwrap();
        // Entry n is bound by no range: no wait needed (the dispatch may or may not be done).
        table.set(n, None).unwrap();
        table.set(0, None).unwrap();
        assert!(
            ticket.is_done().unwrap(),
            "a bound entry changed under a running dispatch"
        );
        drop(ticket);
        dev.free_pages(&pages).unwrap();
    });
}
