//! Defect 5: mremap, munmap and fork racing migrations in a loop.

use super::*;

/// Defect 5, mremap: first an mremap on another thread in the middle of a migration (after
/// setup, with holes in the range), then one thread migrating the range to the device and
/// back in a loop while another moves it back and forth, for two seconds. Neither may panic
/// or hang; afterwards the bytes at the final address are those written, no page is locked
/// and no migration entry is left, the vacated address has no entries, and once the range is
/// unmapped no device page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05a_mremap_racing_a_migration() {
    watchdog_for("d05a", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 4usize;
        let len = n as u64 * PAGE;
        let a = map(space, n as u64);
        let b = a + 64 * PAGE;

        // The move lands between setup and the pages stage, deterministically.
        let first = pattern(2, 5); // pages 2, 3 stay holes
        space.write(a, &first).unwrap();
        let mut moving = None;
        let moved = dev.migrate_to_device_with(space, a, n, Between::SetupAndCopy, || {
            let s = space.clone();
            moving = Some(start_elsewhere(move || s.mremap(a, len, b)));
        });
        moving.unwrap().finish("mremap").unwrap();
        if let Err(e) = moved {
            assert!(range_went_away(&e), "{e}");
        }
        let mut want = first;
        want.resize(n * 4096, 0);
        assert_eq!(
            differences(&read(space, b, n * 4096), &want),
            Vec::<String>::new()
        );
        let left = entries_left(space, a, n);
        assert!(
            left.is_empty(),
            "mremap during a migration: the vacated range has entries: {left:?}"
        );
        let bad = unsettled(space, pm, b, n);
        assert!(bad.is_empty(), "mremap during a migration: {bad:?}");

        // The race.
        let data = pattern(n, 6);
        space.write(b, &data).unwrap();
        let deadline = Instant::now() + RACE;
        let migrator = {
            let env = env.clone();
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    for at in [a, b] {
                        for back in [false, true] {
                            let r = if back {
                                env.dev.migrate_to_system(&env.space, at, n)
                            } else {
                                env.dev.migrate_to_device(&env.space, at, n)
                            };
                            match r {
                                Ok(_) => rounds += 1,
                                Err(e) if range_went_away(&e) => {}
                                Err(e) => panic!("migration at {at:#x}: {e}"),
                            }
                        }
                    }
                }
                rounds
            })
        };
        let mover = {
            let space = space.clone();
            spawn_watched(move || {
                let (mut at, mut moves) = (b, 0u64);
                while Instant::now() < deadline {
                    let to = if at == a { b } else { a };
                    space.mremap(at, len, to).unwrap();
                    at = to;
                    moves += 1;
                }
                (at, moves)
            })
        };
        let (rounds, (at, moves)) = join_racers(
            ("migrator", migrator),
            ("mover", mover),
            RACE + Duration::from_secs(5),
        );
        let gone = if at == a { b } else { a };
        let bad = unsettled(space, pm, at, n);
        assert!(
            bad.is_empty(),
            "after {rounds} migrations and {moves} moves: {bad:?}"
        );
        let diff = differences(&read(space, at, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} migrations and {moves} moves, bytes differ: {diff:?}"
        );
        let left = entries_left(space, gone, n);
        assert!(
            left.is_empty(),
            "after {rounds} migrations and {moves} moves, the vacated range has entries: {left:?}"
        );
        space.munmap(at, len).unwrap();
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} migrations and {moves} moves and an munmap, device pages leaked"
        );
    });
}

/// Defect 5, munmap: first an munmap, mmap and write of the range on another thread in the
/// middle of a migration (after setup, with holes), then one thread migrating the range to
/// the device and back in a loop while another unmaps, maps and writes it again, for two
/// seconds. Neither may panic or hang; afterwards the range holds the last bytes written (the
/// new mapping's holes are holes), no page is locked, no migration entry is left, and once
/// the range is unmapped no device page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05b_munmap_racing_a_migration() {
    watchdog_for("d05b", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 4usize;
        let len = n as u64 * PAGE;
        let a = map(space, n as u64);

        // The munmap lands between setup and the pages stage, deterministically.
        space.write(a, &pattern(2, 7)).unwrap(); // pages 2, 3 stay holes
        let second = pattern(2, 8);
        let mut remapping = None;
        let moved = dev.migrate_to_device_with(space, a, n, Between::SetupAndCopy, || {
            let (s, bytes) = (space.clone(), second.clone());
            remapping = Some(start_elsewhere(move || {
                s.munmap(a, len)?;
                s.mmap(Some(a), len, Prot::RW, false)?;
                s.write(a, &bytes) // the new mapping's pages 2, 3 stay holes
            }));
        });
        remapping.unwrap().finish("munmap, mmap, write").unwrap();
        if let Err(e) = moved {
            assert!(range_went_away(&e), "{e}");
        }
        assert_eq!(
            differences(&read(space, a, 2 * 4096), &second),
            Vec::<String>::new()
        );
        let left = entries_left(space, a + 2 * PAGE, 2);
        assert!(
            left.is_empty(),
            "munmap during a migration: the new mapping's untouched holes have entries: {left:?}"
        );
        let bad = unsettled(space, pm, a, n);
        assert!(bad.is_empty(), "munmap during a migration: {bad:?}");

        // The race.
        let data = Arc::new(pattern(n, 9));
        space.write(a, &data).unwrap();
        let deadline = Instant::now() + RACE;
        let migrator = {
            let env = env.clone();
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    for back in [false, true] {
                        let r = if back {
                            env.dev.migrate_to_system(&env.space, a, n)
                        } else {
                            env.dev.migrate_to_device(&env.space, a, n)
                        };
                        match r {
                            Ok(_) => rounds += 1,
                            Err(e) if range_went_away(&e) => {}
                            Err(e) => panic!("migration: {e}"),
                        }
                    }
                }
                rounds
            })
        };
        let unmapper = {
            let (space, data) = (space.clone(), data.clone());
            spawn_watched(move || {
                let mut unmaps = 0u64;
                while Instant::now() < deadline {
                    space.munmap(a, len).unwrap();
                    space.mmap(Some(a), len, Prot::RW, false).unwrap();
                    space.write(a, &data).unwrap();
                    unmaps += 1;
                }
                unmaps
            })
        };
        let (rounds, unmaps) = join_racers(
            ("migrator", migrator),
            ("unmapper", unmapper),
            RACE + Duration::from_secs(5),
        );
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "after {rounds} migrations and {unmaps} unmaps: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} migrations and {unmaps} unmaps, bytes differ: {diff:?}"
        );
        space.munmap(a, len).unwrap();
        let left = entries_left(space, a, n);
        assert!(
            left.is_empty(),
            "entries survived the last munmap: {left:?}"
        );
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} migrations and {unmaps} unmaps, device pages leaked"
        );
    });
}

/// A notifier that holds up the teardown of its address space at its first `Release`
/// invalidation (until told to go on, or for at most 500 ms) and says when it got there.
struct SlowRelease {
    entered: Mutex<Option<mpsc::Sender<()>>>,
    go: Mutex<Option<mpsc::Receiver<()>>>,
}

impl Notifier for SlowRelease {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        if r.event != NotifyEvent::Release {
            return;
        }
        if let Some(tx) = self.entered.lock().take() {
            let _ = tx.send(());
        }
        if let Some(rx) = self.go.lock().take() {
            let _ = rx.recv_timeout(Duration::from_millis(500));
        }
    }
}

/// Defect 5, fork: first a fork asked for in the middle of a migration (it fails on the
/// migrating thread and waits for finalize on another), its child dropped on another thread
/// while the device is evicted (its teardown held up, by a notifier that sleeps, right after
/// it started); then one thread migrating the range to the
/// device and back in a loop (checking a page's bytes with a CPU read every eighth round)
/// while another forks the space (reading a page in every eighth child) and drops the child,
/// for two seconds. Nothing may panic or hang, every read sees the bytes written; afterwards
/// no page is locked, no migration entry is left, and once the range is unmapped no device
/// page is in use.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn d05c_fork_racing_a_migration() {
    watchdog_for("d05c", WATCHDOG + RACE, || {
        let env = Arc::new(mirror(MemoryKind::DevicePrivate));
        let mut keep = KeepOnPanic::default();
        env.keep(&mut keep);
        let (pm, dev, space) = (&env.pm, &env.dev, &env.space);
        let n = 16usize;
        let a = map(space, n as u64);
        let data = Arc::new(pattern(n, 10));
        space.write(a, &data).unwrap();

        // A fork asked for in the middle of a migration: on the migrating thread it fails
        // (it would wait for itself); on another thread it waits for finalize.
        let forked = std::thread::scope(|scope| {
            let mut forking = None;
            let moved = dev.migrate_to_device_with(space, a, n, Between::PagesAndFinalize, || {
                assert!(matches!(
                    space.fork(),
                    Err(hetmem::Error::MigrationInProgress)
                ));
                forking = Some(scope.spawn(|| space.fork().unwrap()));
                std::thread::sleep(Duration::from_millis(20));
                assert!(
                    !forking.as_ref().unwrap().is_finished(),
                    "a fork waits for the migration"
                );
            });
            assert_eq!(moved.unwrap().cpages, n);
            forking.unwrap().join().unwrap()
        });
        // The child goes away while its pages are evicted (its teardown held up, by a
        // notifier that sleeps, right after it started).
        let (entered_tx, entered_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        forked.register_notifier(Arc::new(SlowRelease {
            entered: Mutex::new(Some(entered_tx)),
            go: Mutex::new(Some(go_rx)),
        }));
        let teardown = spawn_watched(move || drop(forked));
        let _ = entered_rx.recv_timeout(Duration::from_secs(2));
        dev.evict_all().unwrap();
        drop(go_tx);
        if teardown.wait(Duration::from_secs(5)).is_err() {
            panic!("a child dropped during an eviction: its teardown hangs");
        }
        dev.evict_all().unwrap();
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "a child dropped during an eviction: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "a child dropped during an eviction: bytes differ: {diff:?}"
        );

        // The race.
        let deadline = Instant::now() + RACE;
        let migrator = {
            let (env, data) = (env.clone(), data.clone());
            spawn_watched(move || {
                let mut rounds = 0u64;
                while Instant::now() < deadline {
                    env.dev.migrate_to_device(&env.space, a, n).unwrap();
                    env.dev.migrate_to_system(&env.space, a, n).unwrap();
                    if rounds.is_multiple_of(8) {
                        let k = rounds as usize / 8 % n;
                        let got = read(&env.space, a + k as u64 * PAGE, 64);
                        assert_eq!(
                            got,
                            data[k * 4096..k * 4096 + 64],
                            "round {rounds} page {k}"
                        );
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        let forker = {
            let (space, data) = (space.clone(), data.clone());
            spawn_watched(move || {
                let mut forks = 0u64;
                while Instant::now() < deadline {
                    let child = space.fork().unwrap();
                    if forks.is_multiple_of(8) {
                        let k = forks as usize / 8 % n;
                        let got = read(&child, a + k as u64 * PAGE, 64);
                        assert_eq!(got, data[k * 4096..k * 4096 + 64], "child {forks} page {k}");
                    }
                    drop(child);
                    forks += 1;
                }
                forks
            })
        };
        let (rounds, forks) = join_racers(
            ("migrator", migrator),
            ("forker", forker),
            RACE + Duration::from_secs(5),
        );
        let bad = unsettled(space, pm, a, n);
        assert!(
            bad.is_empty(),
            "after {rounds} rounds and {forks} forks: {bad:?}"
        );
        let diff = differences(&read(space, a, n * 4096), &data);
        assert!(
            diff.is_empty(),
            "after {rounds} rounds and {forks} forks, bytes differ: {diff:?}"
        );
        space.munmap(a, n as u64 * PAGE).unwrap();
        assert_eq!(
            dev.device().pages_in_use(),
            0,
            "after {rounds} rounds and {forks} forks and an munmap, device pages leaked"
        );
    });
}
