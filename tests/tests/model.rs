//! Random sequences of CPU writes, migrations, evictions, forks (some in the middle of a
//! migration) and pins over several address spaces, checked after every step against a plain byte model; and a concurrent
//! stress run of faults, migrations and evictions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hetmem::mm::{flags, pin_pages, AddressSpace, MemoryKind, PageMap, PinGuard, Prot, PAGE};
use hetmem::VirtAddr;
use hetmem_engine::DeviceKind;
use hetmem_tests::dmirror::{Between, Dmirror};
use hetmem_tests::open_for_test;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use rand::{Rng, SeedableRng};

const PAGES: usize = 12;

#[derive(Clone, Debug)]
enum Op {
    Write {
        space: usize,
        page: usize,
        value: u8,
    },
    ToDevice {
        space: usize,
        start: usize,
        len: usize,
    },
    ToSystem {
        space: usize,
        start: usize,
        len: usize,
    },
    Evict,
    Fork {
        space: usize,
    },
    /// A fork while some of the space's pages are under migration to the device.
    ForkMidMigration {
        space: usize,
        start: usize,
        len: usize,
        late: bool,
    },
    Pin {
        space: usize,
        page: usize,
    },
    Unpin,
    Read {
        space: usize,
        page: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0usize..4;
    let p = 0usize..PAGES;
    prop_oneof![
        4 => (s.clone(), p.clone(), any::<u8>()).prop_map(|(space, page, value)| Op::Write { space, page, value }),
        3 => (s.clone(), p.clone(), 1usize..PAGES).prop_map(|(space, start, len)| Op::ToDevice { space, start, len }),
        2 => (s.clone(), p.clone(), 1usize..PAGES).prop_map(|(space, start, len)| Op::ToSystem { space, start, len }),
        1 => Just(Op::Evict),
        1 => s.clone().prop_map(|space| Op::Fork { space }),
        1 => (s.clone(), p.clone(), 1usize..PAGES, any::<bool>())
            .prop_map(|(space, start, len, late)| Op::ForkMidMigration { space, start, len, late }),
        1 => (s.clone(), p.clone()).prop_map(|(space, page)| Op::Pin { space, page }),
        1 => Just(Op::Unpin),
        2 => (s, p).prop_map(|(space, page)| Op::Read { space, page }),
    ]
}

struct World {
    pm: std::sync::Arc<PageMap>,
    dev: Dmirror,
    spaces: Vec<(AddressSpace, VirtAddr, Vec<u8>)>,
    pins: Vec<PinGuard>,
}

impl World {
    fn check(&self) {
        for (k, (space, base, model)) in self.spaces.iter().enumerate() {
            let mut got = vec![0u8; PAGES * 4096];
            space.read(*base, &mut got).unwrap();
            for p in 0..PAGES {
                let page = &got[p * 4096..(p + 1) * 4096];
                assert!(
                    page.iter().all(|&b| b == model[p]),
                    "space {k} page {p}: want {}",
                    model[p]
                );
            }
            for p in 0..PAGES as u64 {
                if let Some(pfn) = space.pte(*base + p * PAGE).pfn() {
                    assert!(
                        !self.pm.page(pfn).unwrap().test(flags::LOCKED),
                        "space {k} page {p} left locked"
                    );
                }
            }
        }
        let mapped = self.spaces.len() * PAGES;
        assert!(
            self.dev.device().pages_in_use() <= mapped,
            "device pages leaked"
        );
    }

    /// Long: one match arm per operation; the arms share the world and the shadow model, and a
    /// function per arm would only move the match.
    fn apply(&mut self, op: &Op) {
        let n = self.spaces.len();
        match *op {
            Op::Write { space, page, value } => {
                let (s, base, model) = &mut self.spaces[space % n];
                s.write(*base + page as u64 * PAGE, &[value; 4096]).unwrap();
                model[page] = value;
            }
            Op::ToDevice { space, start, len } => {
                let (s, base, _) = &self.spaces[space % n];
                let len = len.min(PAGES - start);
                self.dev
                    .migrate_to_device(s, *base + start as u64 * PAGE, len)
                    .unwrap();
            }
            Op::ToSystem { space, start, len } => {
                let (s, base, _) = &self.spaces[space % n];
                let len = len.min(PAGES - start);
                self.dev
                    .migrate_to_system(s, *base + start as u64 * PAGE, len)
                    .unwrap();
            }
            Op::Evict => {
                self.dev.evict_all().unwrap();
            }
            Op::Fork { space } => {
                if n < 4 {
                    let (s, base, model) = &self.spaces[space % n];
                    let child = s.fork().unwrap();
                    self.spaces.push((child, *base, model.clone()));
                }
            }
            Op::ForkMidMigration {
                space,
                start,
                len,
                late,
            } => {
                let (s, base, model) = &self.spaces[space % n];
                let len = len.min(PAGES - start);
                let at = if late {
                    Between::PagesAndFinalize
                } else {
                    Between::SetupAndCopy
                };
                // The fork asked for mid-migration waits for it (on this thread it would wait
                // for itself, and fails instead); it runs once the migration is finalized.
                let dev = &self.dev;
                let child = std::thread::scope(|scope| {
                    let mut forking = None;
                    dev.migrate_to_device_with(s, *base + start as u64 * PAGE, len, at, || {
                        assert!(matches!(s.fork(), Err(hetmem::Error::MigrationInProgress)));
                        if n < 4 {
                            forking = Some(scope.spawn(|| s.fork().unwrap()));
                        }
                    })
                    .unwrap();
                    forking.map(|f| f.join().unwrap())
                });
                if let Some(child) = child {
                    let (base, model) = (*base, model.clone());
                    self.spaces.push((child, base, model));
                }
            }
            Op::Pin { space, page } => {
                if self.pins.len() < 3 {
                    let (s, base, _) = &self.spaces[space % n];
                    self.pins
                        .push(pin_pages(s, *base + page as u64 * PAGE, 1, true, false).unwrap());
                }
            }
            Op::Unpin => {
                self.pins.pop();
            }
            Op::Read { space, page } => {
                let (s, base, model) = &self.spaces[space % n];
                let got = self
                    .dev
                    .device_read(s, *base + page as u64 * PAGE, 4096)
                    .unwrap();
                assert!(
                    got.iter().all(|&b| b == model[page]),
                    "device read of page {page}"
                );
            }
        }
    }
}

fn run(kind: DeviceKind, mem: MemoryKind, ops: &[Op]) {
    let Some(device) = open_for_test(kind, 128 * 4096, "model") else {
        return;
    };
    let pm = PageMap::new(device.frames().clone()).unwrap();
    let dev = Dmirror::new(device, mem, &pm);
    let space = AddressSpace::new(&pm);
    let base = space
        .mmap(None, PAGES as u64 * PAGE, Prot::RW, false)
        .unwrap();
    let mut w = World {
        pm: pm.clone(),
        dev,
        spaces: vec![(space, base, vec![0; PAGES])],
        pins: Vec::new(),
    };
    for op in ops {
        w.apply(op);
        w.check();
    }
    w.pins.clear();
    w.spaces.clear();
    assert_eq!(
        w.dev.device().pages_in_use(),
        0,
        "device pages leaked at the end"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn no_byte_lost_private(ops in proptest::collection::vec(op(), 1..40)) {
        run(DeviceKind::Host, MemoryKind::DevicePrivate, &ops);
    }

    #[test]
    fn no_byte_lost_coherent(ops in proptest::collection::vec(op(), 1..40)) {
        run(DeviceKind::Host, MemoryKind::DeviceCoherent, &ops);
    }
}

#[test]
fn no_byte_lost_on_vulkan() {
    // One long fixed-seed sequence on the Vulkan device (the random cases use the host one).
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let ops: Vec<Op> = (0..300)
        .map(|_| op().new_tree(&mut runner).unwrap().current())
        .collect();
    for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
        run(DeviceKind::Vulkan, mem, &ops);
    }
}

/// Threads fault, migrate and evict overlapping ranges for a bounded time; afterwards every
/// byte is what its writer last wrote.
/// Long: one scenario read top to bottom (the fixture, the racing threads, the checks after);
/// its steps share the fixture and the threads' handles.
#[test]
fn concurrent_faults_migrations_and_evictions() {
    for (kind, mem) in [
        (DeviceKind::Host, MemoryKind::DevicePrivate),
        (DeviceKind::Vulkan, MemoryKind::DevicePrivate),
        (DeviceKind::Host, MemoryKind::DeviceCoherent),
    ] {
        let Some(device) = open_for_test(kind, 256 * 4096, "concurrent") else {
            continue;
        };
        let pm = PageMap::new(device.frames().clone()).unwrap();
        let dev = Dmirror::new(device, mem, &pm);
        let space = AddressSpace::new(&pm);
        const N: usize = 64;
        const THREADS: usize = 4;
        let base = space.mmap(None, N as u64 * PAGE, Prot::RW, false).unwrap();
        let stop = AtomicBool::new(false);
        let models: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (space, dev, stop) = (&space, &dev, &stop);
                    s.spawn(move || {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                        // Thread t writes only pages p with p % THREADS == t.
                        let mut model = vec![0u8; N];
                        while !stop.load(Ordering::Relaxed) {
                            let p = rng.random_range(0..N / THREADS) * THREADS + t;
                            let addr = base + p as u64 * PAGE;
                            match rng.random_range(0..10) {
                                0..=3 => {
                                    let v = rng.random::<u8>() | 1;
                                    space.write(addr, &[v; 4096]).unwrap();
                                    model[p] = v;
                                }
                                4..=5 => {
                                    let start = rng.random_range(0..N);
                                    let len = rng.random_range(1..=N - start);
                                    dev.migrate_to_device(space, base + start as u64 * PAGE, len)
                                        .unwrap();
                                }
                                6 => {
                                    dev.migrate_to_system(space, base, N).unwrap();
                                }
                                7 => {
                                    dev.evict_all().unwrap();
                                }
                                _ => {
                                    let mut got = vec![0u8; 4096];
                                    space.read(addr, &mut got).unwrap();
                                    assert!(
                                        got.iter().all(|&b| b == model[p]),
                                        "thread {t} page {p}"
                                    );
                                }
                            }
                        }
                        model
                    })
                })
                .collect();
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for p in 0..N {
            let want = models[p % THREADS][p];
            let mut got = vec![0u8; 4096];
            space.read(base + p as u64 * PAGE, &mut got).unwrap();
            assert!(
                got.iter().all(|&b| b == want),
                "{kind:?}/{mem:?} page {p}: want {want}"
            );
        }
        if mem == MemoryKind::DevicePrivate {
            assert!(
                dev.faults() > 0,
                "the run must exercise CPU faults on device pages"
            );
        }
        drop(space);
        assert_eq!(dev.device().pages_in_use(), 0);
    }
}
