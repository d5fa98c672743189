//! The scenarios of shared/CONFORMANCE.md, each on the host and Vulkan devices, with the
//! device's memory registered as device-private and as device-coherent.

use std::sync::Arc;

use hetmem::migration::*;
use hetmem::mm::{flags, pin_pages, AddressSpace, MemoryKind, PageMap, PageState, Prot, Pte, PAGE};
use hetmem::Error;
use hetmem::VirtAddr;
use hetmem_engine::DeviceKind;
use hetmem_tests::dmirror::Dmirror;
use hetmem_tests::open_for_test;

/// One combination a scenario runs on.
struct Env {
    kind: DeviceKind,
    mem: MemoryKind,
    pm: Arc<PageMap>,
    dev: Dmirror,
    space: AddressSpace,
}

impl Env {
    fn private(&self) -> bool {
        self.mem == MemoryKind::DevicePrivate
    }
}

/// Runs `f` on host and Vulkan, private and coherent.
fn each(test: &str, budget_pages: usize, f: impl Fn(&Env)) {
    for kind in [DeviceKind::Host, DeviceKind::Vulkan] {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            let Some(device) = open_for_test(kind, (budget_pages * 4096) as u64, test) else {
                continue;
            };
            let pm = PageMap::new(device.frames().clone()).unwrap();
            let dev = Dmirror::new(device, mem, &pm);
            let space = AddressSpace::new(&pm);
            let env = Env {
                kind,
                mem,
                pm,
                dev,
                space,
            };
            f(&env);
            // Nothing leaks: with the space gone, every device page is free again.
            let Env { dev, space, .. } = env;
            drop(space);
            assert_eq!(
                dev.device().pages_in_use(),
                0,
                "{test} on {kind:?}/{mem:?}: device pages leaked"
            );
        }
    }
}

fn pattern(addr: VirtAddr, len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((addr.get() as usize / 4096 * 131 + i * 7) as u8) ^ seed)
        .collect()
}

fn fill(env: &Env, addr: VirtAddr, npages: usize, seed: u8) -> Vec<u8> {
    let data = pattern(addr, npages * 4096, seed);
    env.space.write(addr, &data).unwrap();
    data
}

fn cpu_read(env: &Env, addr: VirtAddr, npages: usize) -> Vec<u8> {
    let mut v = vec![0; npages * 4096];
    env.space.read(addr, &mut v).unwrap();
    v
}

fn map(env: &Env, npages: usize) -> VirtAddr {
    env.space
        .mmap(None, npages as u64 * PAGE, Prot::RW, false)
        .unwrap()
}

fn on_device(env: &Env, addr: VirtAddr, npages: usize) -> bool {
    let want = if env.private() {
        PageState::DevicePrivateLocal
    } else {
        PageState::DeviceCoherentLocal
    };
    env.dev
        .snapshot(&env.space, addr, npages)
        .iter()
        .all(|&s| s == want)
}

fn on_host(env: &Env, addr: VirtAddr, npages: usize) -> bool {
    env.dev
        .snapshot(&env.space, addr, npages)
        .iter()
        .all(|s| matches!(s, PageState::Write | PageState::Read))
}

#[test]
fn open_close() {
    each("open_close", 64, |env| {
        let a = map(env, 8);
        fill(env, a, 8, 1);
        env.dev.migrate_to_device(&env.space, a, 8).unwrap();
        assert_eq!(env.dev.device().pages_in_use(), 8);
    });
}

#[test]
fn anon_read() {
    each("anon_read", 64, |env| {
        let a = map(env, 2);
        let data = fill(env, a, 2, 3);
        assert_eq!(
            env.dev.device_read(&env.space, a, data.len()).unwrap(),
            data
        );
        assert!(on_host(env, a, 2));
        // An unaligned span inside one page, too.
        assert_eq!(
            env.dev.device_read(&env.space, a + 100, 50).unwrap(),
            data[100..150].to_vec()
        );
    });
}

#[test]
fn anon_read_prot() {
    each("anon_read_prot", 64, |env| {
        let a = map(env, 4);
        let data = fill(env, a, 4, 5);
        env.space.mprotect(a, 4 * PAGE, Prot::NONE).unwrap();
        let e = env.dev.device_read(&env.space, a, 4096).unwrap_err();
        assert!(matches!(e, Error::ReadDenied(x) if x == a), "{e}");
        assert_eq!(e.kind(), hetmem::ErrorKind::Access);
        env.space.mprotect(a, 4 * PAGE, Prot::RW).unwrap();
        assert_eq!(cpu_read(env, a, 4), data);
    });
}

#[test]
fn anon_write() {
    each("anon_write", 64, |env| {
        let a = map(env, 3);
        let data = pattern(a, 3 * 4096, 7);
        env.dev.device_write(&env.space, a, &data).unwrap();
        assert_eq!(cpu_read(env, a, 3), data);
    });
}

#[test]
fn anon_write_prot() {
    each("anon_write_prot", 64, |env| {
        let a = env.space.mmap(None, 2 * PAGE, Prot::READ, false).unwrap();
        let data = pattern(a, 2 * 4096, 9);
        let e = env.dev.device_write(&env.space, a, &data).unwrap_err();
        assert!(matches!(e, Error::WriteDenied(_)), "{e}");
        assert_eq!(cpu_read(env, a, 2), vec![0; 2 * 4096]);
        env.space.mprotect(a, 2 * PAGE, Prot::RW).unwrap();
        env.dev.device_write(&env.space, a, &data).unwrap();
        assert_eq!(cpu_read(env, a, 2), data);
    });
}

#[test]
fn migrate() {
    for n in [1usize, 2, 511, 512, 513, 1024] {
        each("migrate", 2048, |env| {
            let a = map(env, n);
            let data = fill(env, a, n, 11);
            let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
            assert_eq!(moved.cpages, n);
            assert_eq!(moved.migrated, n);
            assert!(on_device(env, a, n), "{:?}/{:?} n={n}", env.kind, env.mem);
            for i in 0..n as u64 {
                match env.space.pte(a + i * PAGE) {
                    Pte::DevicePrivate { write, .. } => assert!(env.private() && write),
                    Pte::Present { write, .. } => assert!(!env.private() && write),
                    other => panic!("page {i}: {other:?}"),
                }
            }
            assert_eq!(env.dev.device().pages_in_use(), n);
            assert_eq!(env.dev.device_read(&env.space, a, n * 4096).unwrap(), data);
        });
    }
}

#[test]
fn migrate_fault() {
    each("migrate_fault", 256, |env| {
        let n = 100;
        let a = map(env, n);
        let data = fill(env, a, n, 13);
        env.dev.migrate_to_device(&env.space, a, n).unwrap();
        assert_eq!(cpu_read(env, a, n), data);
        if env.private() {
            assert_eq!(env.dev.faults(), n as u64, "one fault per page");
            assert!(on_host(env, a, n));
            assert_eq!(env.dev.device().pages_in_use(), 0);
        } else {
            assert_eq!(env.dev.faults(), 0, "coherent memory is read in place");
            assert!(on_device(env, a, n));
        }
        // And again.
        let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
        assert_eq!(moved.migrated, if env.private() { n } else { 0 });
        assert!(on_device(env, a, n));
        assert_eq!(cpu_read(env, a, n), data);
    });
}

#[test]
fn migrate_holes() {
    each("migrate_holes", 1024, |env| {
        let n = 513;
        let a = map(env, n);
        let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
        assert_eq!(moved.cpages, n, "holes count in cpages");
        assert!(on_device(env, a, n));
        assert_eq!(
            env.dev.device_read(&env.space, a, n * 4096).unwrap(),
            vec![0; n * 4096]
        );
        assert_eq!(cpu_read(env, a, n), vec![0; n * 4096]);
    });
}

#[test]
fn migrate_multiple() {
    each("migrate_multiple", 128, |env| {
        let n = 64;
        let a = map(env, n);
        let mut data = fill(env, a, n, 0);
        for round in 0..50u8 {
            let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
            assert_eq!(moved.migrated, n, "round {round}");
            assert_eq!(
                env.dev.device_read(&env.space, a, n * 4096).unwrap(),
                data,
                "round {round}"
            );
            if !env.private() {
                env.dev.migrate_to_system(&env.space, a, n).unwrap();
            }
            assert_eq!(cpu_read(env, a, n), data, "round {round}");
            data = fill(env, a, n, round + 1);
            assert!(env.dev.device().pages_in_use() <= n);
        }
        assert_eq!(env.dev.device().pages_in_use(), 0);
    });
}

#[test]
fn migrate_shared() {
    each("migrate_shared", 64, |env| {
        let a = env.space.mmap(None, 4 * PAGE, Prot::RW, true).unwrap();
        let data = fill(env, a, 4, 17);
        let moved = env.dev.migrate_to_device(&env.space, a, 4).unwrap();
        assert_eq!(moved.cpages, 0);
        assert_eq!(cpu_read(env, a, 4), data);
        assert!(on_host(env, a, 4));
    });
}

#[test]
fn migrate_partial() {
    each("migrate_partial", 256, |env| {
        let n = 16;
        let a = map(env, n);
        let data = fill(env, a, n, 19);
        let moved = env
            .dev
            .migrate_to_device(&env.space, a + 4 * PAGE, 8)
            .unwrap();
        assert_eq!(moved.cpages, 8);
        assert!(on_host(env, a, 4));
        assert!(on_device(env, a + 4 * PAGE, 8));
        assert!(on_host(env, a + 12 * PAGE, 4));
        let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
        assert_eq!(moved.cpages, 8, "only the host pages are collected again");
        assert!(on_device(env, a, n));
        assert_eq!(env.dev.device_read(&env.space, a, n * 4096).unwrap(), data);
    });
}

#[test]
fn migrate_pinned() {
    each("migrate_pinned", 64, |env| {
        let a = map(env, 4);
        let data = fill(env, a, 4, 23);
        let pin = pin_pages(&env.space, a + PAGE, 1, true, false).unwrap();
        let pinned = pin.pfns()[0];
        let moved = env.dev.migrate_to_device(&env.space, a, 4).unwrap();
        assert_eq!(moved.cpages, 3);
        assert_eq!(
            env.space.pte(a + PAGE).pfn(),
            Some(pinned),
            "the pinned page stays"
        );
        assert!(on_device(env, a, 1) && on_device(env, a + 2 * PAGE, 2));
        drop(pin);
        assert_eq!(cpu_read(env, a, 4), data);
    });
}

#[test]
fn migrate_fault_page_race() {
    each("migrate_fault_page_race", 64, |env| {
        let n = 32;
        let a = map(env, n);
        let data = fill(env, a, n, 29);
        for _ in 0..20 {
            env.dev.migrate_to_device(&env.space, a, n).unwrap();
            std::thread::scope(|s| {
                s.spawn(|| assert_eq!(cpu_read(env, a, n), data));
                s.spawn(|| env.dev.evict_all().unwrap());
            });
            assert_eq!(cpu_read(env, a, n), data);
            assert!(on_host(env, a, n) || !env.private());
        }
    });
}

#[test]
fn select_owner() {
    each("select_owner", 64, |env| {
        let other_dev = open_for_test(env.kind, 64 * 4096, "select_owner").unwrap();
        let other = Dmirror::new(other_dev, env.mem, &env.pm);
        let a = map(env, 8);
        let data = fill(env, a, 8, 31);
        env.dev.migrate_to_device(&env.space, a, 8).unwrap();
        // The other device asks for its own pages back: none of ours are collected.
        let moved = other.migrate_to_system(&env.space, a, 8).unwrap();
        assert_eq!(moved.cpages, 0);
        assert!(on_device(env, a, 8));
        assert_eq!(env.dev.device_read(&env.space, a, 8 * 4096).unwrap(), data);
    });
}

#[test]
fn release() {
    each("release", 1024, |env| {
        let n = 512;
        let a = map(env, n);
        let data = fill(env, a, n, 37);
        env.dev.migrate_to_device(&env.space, a, n).unwrap();
        assert_eq!(env.dev.evict_all().unwrap(), n);
        assert_eq!(env.dev.device().pages_in_use(), 0);
        assert!(on_host(env, a, n));
        assert_eq!(env.dev.faults(), 0);
        assert_eq!(cpu_read(env, a, n), data);
    });
}

#[test]
fn dirty_kept() {
    each("dirty_kept", 64, |env| {
        let n = 8;
        let a = map(env, n);
        let data = fill(env, a, n, 41);
        let failing: Vec<VirtAddr> = (0..n as u64).step_by(2).map(|i| a + i * PAGE).collect();
        env.dev.fail_copies_at(&failing);
        let moved = env.dev.migrate_to_device(&env.space, a, n).unwrap();
        env.dev.fail_copies_at(&[]);
        assert_eq!(moved.cpages, n);
        assert_eq!(moved.migrated, n / 2);
        for i in 0..n as u64 {
            let addr = a + i * PAGE;
            let pte = env.space.pte(addr);
            if i % 2 == 0 {
                let Pte::Present {
                    pfn, dirty, write, ..
                } = pte
                else {
                    panic!("{pte:?}")
                };
                assert!(dirty && write);
                let page = env.pm.page(pfn).unwrap();
                assert!(page.test(flags::DIRTY), "failed page keeps its dirty bit");
                assert!(!page.test(flags::LOCKED), "failed page is unlocked");
                assert_eq!(page.kind(), MemoryKind::System);
            } else {
                assert!(on_device(env, addr, 1));
            }
        }
        assert_eq!(cpu_read(env, a, n), data);
    });
}

#[test]
fn young_dirty() {
    each("young_dirty", 64, |env| {
        let a = map(env, 2);
        fill(env, a, 2, 43);
        // A clean, old entry and a dirty, young one: force the bits by a failed migration.
        let before: Vec<Pte> = (0..2).map(|i| env.space.pte(a + i * PAGE)).collect();
        env.dev.limit_allocations(Some(0));
        let moved = env.dev.migrate_to_device(&env.space, a, 2).unwrap();
        env.dev.limit_allocations(None);
        assert_eq!((moved.cpages, moved.migrated), (2, 0));
        let after: Vec<Pte> = (0..2).map(|i| env.space.pte(a + i * PAGE)).collect();
        assert_eq!(
            before, after,
            "a restored entry keeps write, young and dirty"
        );
        // Round trip: the dirty state comes back with the page.
        env.dev.migrate_to_device(&env.space, a, 2).unwrap();
        env.dev.migrate_to_system(&env.space, a, 2).unwrap();
        for i in 0..2 {
            let Pte::Present { pfn, write, .. } = env.space.pte(a + i * PAGE) else {
                panic!()
            };
            assert!(write);
            assert!(env.pm.page(pfn).unwrap().test(flags::DIRTY));
        }
    });
}

#[test]
fn fork_cow() {
    each("fork_cow", 64, |env| {
        let a = map(env, 4);
        let data = fill(env, a, 4, 47);
        let child = env.space.fork().unwrap();
        let shared = env.space.pte(a).pfn();
        assert_eq!(child.pte(a).pfn(), shared, "pages are shared after fork");
        assert!(matches!(
            env.space.pte(a),
            Pte::Present { write: false, .. }
        ));
        let child_data = pattern(a, 4096, 99);
        child.write(a, &child_data).unwrap();
        assert_ne!(
            child.pte(a).pfn(),
            shared,
            "the child's write copied the page"
        );
        assert_eq!(cpu_read(env, a, 4), data);
        let mut got = vec![0; 4096];
        child.read(a, &mut got).unwrap();
        assert_eq!(got, child_data);
        // The parent's write reuses its page now that it is the only user.
        env.space.write(a, &data[..4096]).unwrap();
        assert_eq!(env.space.pte(a).pfn(), shared);
    });
}

/// Recognises the error a bad argument must give.
type ErrorIs = fn(&Error) -> bool;

#[test]
fn setup_einval() {
    each("setup_einval", 64, |env| {
        let a = map(env, 4);
        let b = env
            .space
            .mmap(Some(a + 4 * PAGE), 4 * PAGE, Prot::RW, false)
            .unwrap();
        let data = fill(env, a, 4, 53);
        let mut src = vec![0xdead; 8];
        let mut dst = vec![0xbeef; 8];
        let cases: Vec<(VirtAddr, VirtAddr, usize, ErrorIs)> = vec![
            (a + 1, a + PAGE, 8, |e| matches!(e, Error::Unaligned(_))),
            (a, a + PAGE + 7, 8, |e| matches!(e, Error::Unaligned(_))),
            (a, a, 8, |e| matches!(e, Error::EmptyRange)),
            (a + PAGE, a, 8, |e| matches!(e, Error::EmptyRange)),
            (a, b + PAGE, 8, |e| matches!(e, Error::AcrossVmas { .. })),
            (a, a + 4 * PAGE, 3, |e| {
                matches!(e, Error::ShortArray { which: "src", .. })
            }),
            (VirtAddr(0x1000), VirtAddr(0x3000), 8, |e| {
                matches!(e, Error::NotMapped(_))
            }),
        ];
        for (start, end, len, ok) in cases {
            let mut m = MigrateVma::new(&env.space, start, end, &mut src[..len], &mut dst);
            m.flags = MIGRATE_VMA_SELECT_SYSTEM;
            let e = migrate_vma_setup(&mut m).unwrap_err();
            assert!(ok(&e), "{start:#x}..{end:#x}: {e}");
            assert_eq!(e.kind(), hetmem::ErrorKind::Misuse);
        }
        assert!(
            src.iter().all(|&w| w == 0xdead) && dst.iter().all(|&w| w == 0xbeef),
            "nothing written"
        );
        let mut m = MigrateVma::new(&env.space, a, a + 4 * PAGE, &mut src, &mut dst[..2]);
        assert!(matches!(
            migrate_vma_setup(&mut m),
            Err(Error::ShortArray { which: "dst", .. })
        ));
        drop(m);
        // A fault page that is not a locked device-private page.
        let host_pfn = env.space.pte(a).pfn().unwrap();
        let mut m = MigrateVma::new(&env.space, a, a + PAGE, &mut src, &mut dst);
        m.fault_page = Some(host_pfn);
        assert!(matches!(
            migrate_vma_setup(&mut m),
            Err(Error::BadFaultPage(_))
        ));
        drop(m);
        // A mapping with no access at all.
        env.space.mprotect(b, 4 * PAGE, Prot::NONE).unwrap();
        let mut m = MigrateVma::new(&env.space, b, b + PAGE, &mut src, &mut dst);
        assert!(matches!(migrate_vma_setup(&mut m), Err(Error::NoAccess(_))));
        assert_eq!(cpu_read(env, a, 4), data);
        assert!(on_host(env, a, 4));
    });
}
