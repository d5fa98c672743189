//! The migration API beyond the conformance table: the typestate wrapper, bad destinations,
//! pagemap registration, remap, fork of pinned and device-private pages, mirrors of another
//! owner's pages, and long-term pins of coherent memory.
//!
//! Long: a little over the limit; its tests share one fixture and read as the migration API's
//! specification, in the order of shared/HMM-SEMANTICS.md.

use std::sync::Arc;

use hetmem::migration::*;
use hetmem::mm::{flags, pin_pages, AddressSpace, MemoryKind, PageMap, PageState, Prot, Pte, PAGE};
use hetmem::Error;
use hetmem::{Owner, VirtAddr};
use hetmem_engine::{Device, DeviceKind, Pfn, PfnRange};
use hetmem_tests::dmirror::Dmirror;
use hetmem_tests::{open_for_test, KINDS};

fn setup(
    kind: DeviceKind,
    mem: MemoryKind,
    test: &str,
) -> Option<(Arc<PageMap>, Dmirror, AddressSpace)> {
    let device = open_for_test(kind, 256 * 4096, test)?;
    let pm = PageMap::new(device.frames().clone()).unwrap();
    let dev = Dmirror::new(device, mem, &pm);
    let space = AddressSpace::new(&pm);
    Some((pm, dev, space))
}

fn kinds() -> impl Iterator<Item = DeviceKind> {
    KINDS.into_iter().filter(|&k| k != DeviceKind::Wgpu)
}

fn alloc_locked(dev: &Device, pm: &PageMap, n: usize) -> Vec<Pfn> {
    dev.alloc_pages(n, true)
        .unwrap()
        .into_iter()
        .inspect(|&p| {
            pm.claim_device_page(p, true).unwrap().into_pfn();
        })
        .collect()
}

/// The driver's part of a migration to `dev`: a locked device page for each collected entry
/// (holes included), named in `dst`, and one batched copy of the pages that have data.
fn copy_collected(m: &mut Migration<'_, Collected>, dev: &Device, pm: &PageMap) {
    let entries: Vec<_> = m.collected().collect();
    let dst = alloc_locked(dev, pm, entries.len());
    let mut pairs = Vec::new();
    for (&(i, s), &d) in entries.iter().zip(&dst) {
        m.dst_mut()[i] = migrate_pfn(d);
        pairs.extend(s.map(|s| (s, d)));
    }
    dev.copy(&pairs).unwrap().wait().unwrap();
}

#[test]
fn typestate_runs_the_stages_in_order() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "typestate") else {
            continue;
        };
        let a = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[7u8; 3 * 4096]).unwrap(); // the fourth page stays a hole
        let mut m = Migration::setup(
            &space,
            a,
            a + 4 * PAGE,
            MIGRATE_VMA_SELECT_SYSTEM,
            dev.owner(),
            None,
        )
        .unwrap();
        assert_eq!(m.cpages(), 4);
        let entries: Vec<_> = m.collected().collect();
        assert_eq!(
            entries.iter().filter(|e| e.1.is_none()).count(),
            1,
            "one hole"
        );
        copy_collected(&mut m, dev.device(), &pm);
        let outcome = m.copied().unwrap().finalize();
        assert_eq!(
            outcome,
            Outcome {
                cpages: 4,
                migrated: 4,
                failed: 0,
                device_lost: false
            }
        );
        assert!(dev
            .snapshot(&space, a, 4)
            .iter()
            .all(|&s| s == PageState::DevicePrivateLocal));
        let mut got = vec![0; 4 * 4096];
        space.read(a, &mut got).unwrap();
        assert!(got[..3 * 4096].iter().all(|&b| b == 7) && got[3 * 4096..].iter().all(|&b| b == 0));
    }
}

#[test]
fn a_dropped_migration_restores_every_page() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "dropped_migration")
        else {
            continue;
        };
        let a = space.mmap(None, 8 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[9u8; 8 * 4096]).unwrap();
        let before: Vec<Pte> = (0..8).map(|i| space.pte(a + i * PAGE)).collect();
        {
            let mut m = Migration::setup(
                &space,
                a,
                a + 8 * PAGE,
                MIGRATE_VMA_SELECT_SYSTEM,
                dev.owner(),
                None,
            )
            .unwrap();
            let dst = alloc_locked(dev.device(), &pm, 8);
            for (i, d) in dst.iter().enumerate() {
                m.dst_mut()[i] = migrate_pfn(*d);
            }
            assert!(matches!(space.pte(a), Pte::Migration { .. }));
            // An early return: dropped while collected.
        }
        let after: Vec<Pte> = (0..8).map(|i| space.pte(a + i * PAGE)).collect();
        assert_eq!(before, after);
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "unused destinations are freed"
        );
        for p in &after {
            let page = pm.page(p.pfn().unwrap()).unwrap();
            assert!(!page.test(flags::LOCKED) && page.test(flags::LRU));
            assert_eq!(page.refcount(), 1);
        }
    }
}

/// Recognises the error a bad destination must give.
type ErrorIs = fn(&Error) -> bool;

#[test]
fn bad_destinations_are_refused_and_change_nothing() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "bad_destinations")
        else {
            continue;
        };
        let a = space.mmap(None, 2 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[1u8; 2 * 4096]).unwrap();
        let mut src = [0u64; 2];
        let mut dst = [0u64; 2];
        let mut m = MigrateVma::new(&space, a, a + 2 * PAGE, &mut src, &mut dst);
        m.flags = MIGRATE_VMA_SELECT_SYSTEM;
        migrate_vma_setup(&mut m).unwrap();
        let good = alloc_locked(dev.device(), &pm, 2);
        let unlocked = dev.device().alloc_page(false).unwrap();
        let unlocked_guard = pm.claim_device_page(unlocked, false).unwrap();
        let free = dev.device().alloc_page(false).unwrap();
        dev.device().free_page(free).unwrap();
        let bad: [(u64, ErrorIs); 4] = [
            (migrate_pfn(Pfn(12345)), |e| {
                matches!(e, Error::UnknownPfn(_))
            }),
            (migrate_pfn(free), |e| matches!(e, Error::PageFree(_))),
            (migrate_pfn(unlocked), |e| matches!(e, Error::NotLocked(_))),
            (migrate_pfn(good[0]), |e| matches!(e, Error::PageInUse(_))), // named twice
        ];
        for (w, is) in bad {
            m.dst[0] = migrate_pfn(good[0]);
            m.dst[1] = w;
            let e = migrate_vma_pages(&mut m).unwrap_err();
            assert!(is(&e), "{e}");
            assert!(
                m.src.iter().all(|&s| s & MIGRATE_PFN_MIGRATE != 0),
                "src untouched"
            );
        }
        m.dst[1] = migrate_pfn(good[1]);
        migrate_vma_pages(&mut m).unwrap();
        migrate_vma_finalize(&mut m);
        assert!(dev
            .snapshot(&space, a, 2)
            .iter()
            .all(|&s| s == PageState::DevicePrivateLocal));
        drop(unlocked_guard);
    }
}

#[test]
fn a_pfn_range_registers_once() {
    let device = open_for_test(DeviceKind::Host, 64 * 4096, "registers_once").unwrap();
    let pm = PageMap::new(device.frames().clone()).unwrap();
    let _first = Dmirror::new(device.clone(), MemoryKind::DevicePrivate, &pm);
    struct NoOps;
    impl hetmem::mm::PagemapOps for NoOps {
        fn page_free(&self, _: &hetmem::mm::Page) {}
        fn migrate_to_ram(&self, _: hetmem::mm::FaultContext<'_>) -> hetmem::Result<()> {
            Ok(())
        }
    }
    let again = pm.register_device(
        device.pfn_range(),
        MemoryKind::DevicePrivate,
        Owner(77),
        Arc::new(NoOps),
        None,
    );
    assert!(matches!(again, Err(Error::RangeRegistered(_))));
    let frames = pm.register_device(
        device.frames().pfn_range(),
        MemoryKind::DevicePrivate,
        Owner(77),
        Arc::new(NoOps),
        None,
    );
    assert!(matches!(frames, Err(Error::RangeRegistered(_))));
    let coherent = pm.register_device(
        // Frame numbers no memory of this process will reach (they are handed out upwards
        // from 2^20).
        PfnRange {
            start: Pfn(1 << 60),
            count: 8,
        },
        MemoryKind::DeviceCoherent,
        Owner(78),
        Arc::new(NoOps),
        None,
    );
    assert!(
        matches!(coherent, Err(Error::InvalidArgument(_))),
        "coherent memory needs CPU access"
    );
}

#[test]
fn remap_moves_entries_of_every_state() {
    for kind in kinds() {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let Some((_pm, dev, space)) = setup(kind, mem, "remap") else {
                continue;
            };
            let a = space.mmap(None, 8 * PAGE, Prot::RW, false).unwrap();
            let data: Vec<u8> = (0..8 * 4096).map(|i| (i % 253) as u8).collect();
            space.write(a, &data[..6 * 4096]).unwrap(); // pages 6, 7 stay holes
            dev.migrate_to_device(&space, a, 3).unwrap(); // pages 0..3 on the device
            let to = a + 64 * PAGE;
            space.mremap(a, 8 * PAGE, to).unwrap();
            assert!(space.vma(a).is_none());
            assert_eq!(space.pte(a), Pte::None);
            let mut got = vec![0; 8 * 4096];
            space.read(to, &mut got).unwrap();
            assert_eq!(&got[..6 * 4096], &data[..6 * 4096]);
            assert!(got[6 * 4096..].iter().all(|&b| b == 0));
            if mem == MemoryKind::DevicePrivate {
                assert_eq!(
                    dev.faults(),
                    3,
                    "device pages fault back at the new address"
                );
            }
            assert!(matches!(
                space.mremap(to, PAGE, to + PAGE),
                Err(Error::AlreadyMapped(_))
            ));
        }
    }
}

#[test]
fn fork_copies_pinned_pages_and_shares_device_entries() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "fork_pinned") else {
            continue;
        };
        let a = space.mmap(None, 2 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[5u8; 2 * 4096]).unwrap();
        let pin = pin_pages(&space, a, 1, true, false).unwrap();
        dev.migrate_to_device(&space, a + PAGE, 1).unwrap();
        let child = space.fork().unwrap();
        assert_ne!(
            child.pte(a).pfn(),
            space.pte(a).pfn(),
            "a pinned page is copied, not shared"
        );
        assert!(
            matches!(space.pte(a), Pte::Present { write: true, .. }),
            "the parent keeps write access"
        );
        assert_eq!(
            child.pte(a + PAGE).pfn(),
            space.pte(a + PAGE).pfn(),
            "device entries are shared"
        );
        assert!(matches!(
            child.pte(a + PAGE),
            Pte::DevicePrivate { write: false, .. }
        ));
        let device_page = pm.page(space.pte(a + PAGE).pfn().unwrap()).unwrap();
        assert_eq!(device_page.mapcount(), 2);
        assert!(!device_page.test(flags::ANON_EXCLUSIVE));
        // Evicting the shared device page brings both mappings back to the same host page.
        assert_eq!(dev.evict_all().unwrap(), 1);
        assert_eq!(child.pte(a + PAGE).pfn(), space.pte(a + PAGE).pfn());
        let mut b = [0u8; 4];
        child.read(a + PAGE, &mut b).unwrap();
        assert_eq!(b, [5; 4]);
        drop(pin);
        drop(child);
        assert_eq!(dev.device().pages_in_use(), 0);
    }
}

#[test]
fn a_mirror_faults_another_owners_pages_home() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "other_owner") else {
            continue;
        };
        let other = Dmirror::new(
            open_for_test(kind, 64 * 4096, "other_owner").unwrap(),
            MemoryKind::DevicePrivate,
            &pm,
        );
        let a = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[3u8; 4 * 4096]).unwrap();
        dev.migrate_to_device(&space, a, 4).unwrap();
        assert!(other
            .snapshot(&space, a, 4)
            .iter()
            .all(|&s| s == PageState::DevicePrivateRemote));
        assert_eq!(
            other.device_read(&space, a, 4 * 4096).unwrap(),
            vec![3u8; 4 * 4096]
        );
        assert_eq!(
            dev.faults(),
            4,
            "the other device's read brought the pages home"
        );
        assert!(dev
            .snapshot(&space, a, 4)
            .iter()
            .all(|s| matches!(s, PageState::Write)));
    }
}

#[test]
fn a_longterm_pin_moves_coherent_pages_out_first() {
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DeviceCoherent, "longterm_pin") else {
            continue;
        };
        let a = space.mmap(None, 2 * PAGE, Prot::RW, false).unwrap();
        space.write(a, &[4u8; 2 * 4096]).unwrap();
        dev.migrate_to_device(&space, a, 2).unwrap();
        assert!(matches!(
            pin_pages(&space, a, 2, false, true),
            Err(Error::CoherentPin(_))
        ));
        let pin = pin_pages_longterm(&space, a, 2, false).unwrap();
        for &pfn in pin.pfns() {
            assert_eq!(pm.page(pfn).unwrap().kind(), MemoryKind::System);
            assert_eq!(pm.page(pfn).unwrap().pincount(), 1);
        }
        assert_eq!(dev.device().pages_in_use(), 0);
        // Pinned pages are never migrated.
        assert_eq!(dev.migrate_to_device(&space, a, 2).unwrap().cpages, 0);
        drop(pin);
        let mut got = vec![0; 2 * 4096];
        space.read(a, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 4));
    }
}

#[test]
fn munmap_of_device_pages_frees_them() {
    for kind in kinds() {
        let Some((_pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "munmap") else {
            continue;
        };
        let a = space.mmap(None, 8 * PAGE, Prot::RW, false).unwrap();
        dev.migrate_to_device(&space, a, 8).unwrap();
        assert_eq!(dev.device().pages_in_use(), 8);
        space.munmap(a + 2 * PAGE, 4 * PAGE).unwrap();
        assert_eq!(
            dev.device().pages_in_use(),
            4,
            "page_free returned the unmapped pages"
        );
        assert!(space.vma(a + 3 * PAGE).is_none());
        assert!(
            space.vma(a).is_some() && space.vma(a + 7 * PAGE).is_some(),
            "the mapping split"
        );
        let mut m_src = [0u64; 8];
        let mut m_dst = [0u64; 8];
        let mut m = MigrateVma::new(&space, a, a + 8 * PAGE, &mut m_src, &mut m_dst);
        assert!(
            matches!(migrate_vma_setup(&mut m), Err(Error::AcrossVmas { .. })),
            "a gap is an error"
        );
    }
}

#[test]
fn notifiers_see_start_and_end_with_event_and_owner() {
    use hetmem::mm::{Notifier, NotifyEvent, NotifyRange, SpaceId};
    use parking_lot::Mutex;
    /// (start?, event, start, end, owner)
    type Event = (bool, NotifyEvent, VirtAddr, VirtAddr, Owner);
    #[derive(Default)]
    struct Log(Mutex<Vec<Event>>);
    impl Notifier for Log {
        fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
            self.0.lock().push((true, r.event, r.start, r.end, r.owner));
        }
        fn invalidate_end(&self, _: SpaceId, r: &NotifyRange) {
            self.0
                .lock()
                .push((false, r.event, r.start, r.end, r.owner));
        }
    }
    let Some((_pm, dev, space)) = setup(DeviceKind::Host, MemoryKind::DevicePrivate, "notifiers")
    else {
        return;
    };
    let log = Arc::new(Log::default());
    space.register_notifier(log.clone());
    let a = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
    space.write(a, &[1u8; 4 * 4096]).unwrap();
    let seq = space.invalidate_seq();
    dev.migrate_to_device(&space, a, 4).unwrap();
    assert!(space.invalidate_seq() > seq);
    let events = std::mem::take(&mut *log.0.lock());
    assert!(
        events.contains(&(true, NotifyEvent::Migrate, a, a + 4 * PAGE, dev.owner())),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&(false, NotifyEvent::Migrate, a, a + 4 * PAGE, dev.owner()))
    );
    space.mprotect(a, PAGE, Prot::READ).unwrap();
    space.munmap(a + PAGE, PAGE).unwrap();
    space.mremap(a + 2 * PAGE, 2 * PAGE, a + 16 * PAGE).unwrap();
    let events = std::mem::take(&mut *log.0.lock());
    let want = [
        (true, NotifyEvent::Protect, a, a + PAGE, Owner::NONE),
        (false, NotifyEvent::Protect, a, a + PAGE, Owner::NONE),
        (
            true,
            NotifyEvent::Unmap,
            a + PAGE,
            a + 2 * PAGE,
            Owner::NONE,
        ),
        (
            false,
            NotifyEvent::Unmap,
            a + PAGE,
            a + 2 * PAGE,
            Owner::NONE,
        ),
        (
            true,
            NotifyEvent::Remap,
            a + 2 * PAGE,
            a + 4 * PAGE,
            Owner::NONE,
        ),
        (
            false,
            NotifyEvent::Remap,
            a + 2 * PAGE,
            a + 4 * PAGE,
            Owner::NONE,
        ),
    ];
    assert_eq!(events, want);
}

/// A fork asked for between setup and finalize (before or after the pages stage) waits for
/// the migration, as the kernel's fork waits for the mmap lock that a migrating driver holds:
/// on the migrating thread it fails with `MigrationInProgress` (it would wait for itself); on
/// another thread it runs once the migration is finalized (or dropped), and the child then
/// shares the pages where the migration left them (the destination, shared and not
/// anon-exclusive; or the source). Either way both read the bytes of before, and a write on
/// one side stays on that side.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn fork_during_a_migration_waits_for_it() {
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum When {
        BeforePages,
        AfterPages,
        Dropped,
    }
    for kind in kinds() {
        for when in [When::BeforePages, When::AfterPages, When::Dropped] {
            let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "fork_mid") else {
                continue;
            };
            let a = space.mmap(None, 3 * PAGE, Prot::RW, false).unwrap();
            let bytes: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096 + 1) as u8).collect();
            space.write(a, &bytes).unwrap();
            let mut m = Migration::setup(
                &space,
                a,
                a + 3 * PAGE,
                MIGRATE_VMA_SELECT_SYSTEM,
                dev.owner(),
                None,
            )
            .unwrap();
            assert_eq!(m.cpages(), 3);
            assert!(matches!(space.fork(), Err(Error::MigrationInProgress)));
            let child = std::thread::scope(|scope| {
                let forking = scope.spawn(|| space.fork().unwrap());
                let mut waited = false;
                if when != When::AfterPages {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    assert!(
                        !forking.is_finished(),
                        "{when:?}: fork waits for the migration"
                    );
                    waited = true;
                }
                if when == When::Dropped {
                    drop(m);
                } else {
                    copy_collected(&mut m, dev.device(), &pm);
                    let m = m.copied().unwrap();
                    if !waited {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        assert!(!forking.is_finished(), "{when:?}: fork waits for finalize");
                    }
                    assert_eq!(m.finalize().migrated, 3);
                }
                forking.join().unwrap()
            });
            for k in 0..3 {
                let (p, c) = (space.pte(a + k * PAGE), child.pte(a + k * PAGE));
                assert_eq!(p, c, "{when:?} page {k}: both map the same page");
                if when == When::Dropped {
                    assert!(matches!(p, Pte::Present { write: false, .. }), "{p:?}");
                } else {
                    assert!(
                        matches!(p, Pte::DevicePrivate { write: false, .. }),
                        "{p:?}"
                    );
                    let page = pm.page(p.pfn().unwrap()).unwrap();
                    assert_eq!(page.mapcount(), 2);
                    assert!(
                        !page.test(flags::ANON_EXCLUSIVE),
                        "{when:?} page {k}: a shared destination is not anon-exclusive"
                    );
                }
            }
            let mut seen = vec![0u8; bytes.len()];
            child.read(a, &mut seen).unwrap();
            assert_eq!(seen, bytes, "{when:?}: the child reads the bytes of before");
            child.write(a, &[0xee; 4096]).unwrap();
            space.read(a, &mut seen).unwrap();
            assert_eq!(
                seen, bytes,
                "{when:?}: the child's write stays in the child"
            );
            space.write(a + PAGE, &[0xdd; 4096]).unwrap();
            child.read(a + PAGE, &mut seen[..4096]).unwrap();
            assert_eq!(
                seen[..4096],
                bytes[4096..8192],
                "{when:?}: and the parent's too"
            );
            drop(child);
            space.munmap(a, 3 * PAGE).unwrap();
            assert_eq!(dev.device().pages_in_use(), 0, "no device page leaked");
        }
    }
}

/// A mirror's sequence: `read_begin` waits while an invalidation runs and `read_retry` says
/// whether one started since; an unregistered notifier hears of nothing more.
#[test]
fn read_begin_waits_out_invalidations_and_notifiers_unregister() {
    use hetmem::mm::{Notifier, NotifyRange, SpaceId};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    /// Counts invalidations; the first one waits for `go` (while a reader tries to begin).
    struct Gate {
        starts: AtomicUsize,
        ends: AtomicUsize,
        entered: parking_lot::Mutex<Option<mpsc::Sender<()>>>,
        go: parking_lot::Mutex<Option<mpsc::Receiver<()>>>,
    }
    impl Notifier for Gate {
        fn invalidate(&self, _: SpaceId, _: &NotifyRange) {
            self.starts.fetch_add(1, Ordering::SeqCst);
            if let Some(tx) = self.entered.lock().take() {
                tx.send(()).unwrap();
                let rx = self.go.lock().take().unwrap();
                rx.recv_timeout(Duration::from_secs(5)).unwrap();
            }
        }
        fn invalidate_end(&self, _: SpaceId, _: &NotifyRange) {
            self.ends.fetch_add(1, Ordering::SeqCst);
        }
    }
    let Some((_pm, _dev, space)) = setup(DeviceKind::Host, MemoryKind::DevicePrivate, "seq") else {
        return;
    };
    let a = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let gate = Arc::new(Gate {
        starts: AtomicUsize::new(0),
        ends: AtomicUsize::new(0),
        entered: parking_lot::Mutex::new(Some(entered_tx)),
        go: parking_lot::Mutex::new(Some(go_rx)),
    });
    let id = space.register_notifier(gate.clone());
    let seq = space.read_begin();
    assert!(!space.read_retry(seq), "nothing happened since");
    std::thread::scope(|scope| {
        let protecting = scope.spawn(|| space.mprotect(a, PAGE, Prot::READ).unwrap());
        entered_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(space.read_retry(seq), "an invalidation is running");
        let reader = scope.spawn(|| space.read_begin());
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !reader.is_finished(),
            "read_begin waits for the invalidation"
        );
        go_tx.send(()).unwrap();
        protecting.join().unwrap();
        let seq2 = reader.join().unwrap();
        assert_ne!(seq2, seq);
        assert!(!space.read_retry(seq2));
    });
    assert_eq!(gate.starts.load(Ordering::SeqCst), 1);
    assert_eq!(gate.ends.load(Ordering::SeqCst), 1);
    assert!(space.unregister_notifier(id));
    assert!(!space.unregister_notifier(id), "already gone");
    space.munmap(a, PAGE).unwrap();
    assert_eq!(gate.starts.load(Ordering::SeqCst), 1, "unregistered");
}

/// `mremap_with`: `fixed_replace` unmaps what was at the destination (its pages freed), and
/// `dont_unmap` leaves the old range mapped and empty; the bytes move either way, device
/// pages included.
#[test]
fn mremap_with_replaces_and_keeps_the_old_range() {
    use hetmem::mm::MremapFlags;
    for kind in kinds() {
        let Some((pm, dev, space)) = setup(kind, MemoryKind::DevicePrivate, "mremap_with") else {
            continue;
        };
        let a = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
        let b = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
        let bytes: Vec<u8> = (0..4 * 4096).map(|i| (i % 253) as u8 + 1).collect();
        space.write(a, &bytes).unwrap();
        space.write(b, &[0x77; 4 * 4096]).unwrap();
        assert_eq!(dev.migrate_to_device(&space, a, 2).unwrap().migrated, 2);
        let frames = pm.frames().in_use();
        assert!(matches!(
            space.mremap(a, 4 * PAGE, b),
            Err(Error::AlreadyMapped(_))
        ));
        let replace = MremapFlags {
            fixed_replace: true,
            ..Default::default()
        };
        space.mremap_with(a, 4 * PAGE, b, replace).unwrap();
        assert!(space.vma(a).is_none(), "the old range is gone");
        assert_eq!(
            pm.frames().in_use(),
            frames - 4,
            "the replaced pages are freed"
        );
        let mut got = vec![0u8; bytes.len()];
        space.read(b, &mut got).unwrap();
        assert_eq!(got, bytes);
        assert_eq!(dev.migrate_to_device(&space, b, 4).unwrap().migrated, 4);
        let c = space.mmap(None, 4 * PAGE, Prot::RW, false).unwrap();
        space.munmap(c, 4 * PAGE).unwrap();
        let keep = MremapFlags {
            dont_unmap: true,
            ..Default::default()
        };
        space.mremap_with(b, 4 * PAGE, c, keep).unwrap();
        space.read(c, &mut got).unwrap();
        assert_eq!(got, bytes, "the bytes moved, from the device too");
        space.read(b, &mut got).unwrap();
        assert!(
            got.iter().all(|&x| x == 0),
            "the old range is mapped and empty"
        );
        let shared = space.mmap(None, PAGE, Prot::RW, true).unwrap();
        assert!(matches!(
            space.mremap_with(shared, PAGE, c + 8 * PAGE, keep),
            Err(Error::InvalidArgument(_))
        ));
        space.munmap(b, 4 * PAGE).unwrap();
        space.munmap(c, 4 * PAGE).unwrap();
        assert_eq!(dev.device().pages_in_use(), 0, "no device page leaked");
    }
}
