//! Section 6: chaos runs, everything at once, with a byte-exact model of what each writer
//! owns, on the host device and on Vulkan.

use super::*;

// ---------------------------------------------------------------------------------------
// 6. Chaos: everything at once, with a byte-exact model of what each writer owns.
// ---------------------------------------------------------------------------------------

struct Chaos {
    seen: Arc<parking_lot::Mutex<std::collections::BTreeMap<String, usize>>>,
    g: Gpu,
    /// Writers' pages: each writer owns `PER` pages from its base.
    base: VirtAddr,
    writers: usize,
    per: usize,
    stop: Arc<AtomicBool>,
    errors: Arc<parking_lot::Mutex<Vec<String>>>,
}

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

#[derive(Clone, Copy, Default)]
struct Knobs {
    fork: bool,
    protect: bool,
    /// Leave only this many host frames free (the test holds the rest).
    free_frames: Option<usize>,
    /// A thread injects copy failures now and then.
    sabotage: bool,
}

fn chaos(mem: MemoryKind, budget: usize, pool: usize, secs: u64, fork: bool, protect: bool) {
    chaos_with(
        mem,
        budget,
        pool,
        secs,
        Knobs {
            fork,
            protect,
            ..Knobs::default()
        },
    )
}

fn chaos_with(mem: MemoryKind, budget: usize, pool: usize, secs: u64, knobs: Knobs) {
    chaos_on(DeviceKind::Host, mem, budget, pool, secs, knobs)
}

/// Long: sets up the world, starts the workers and the watchdog, and checks every invariant at
/// the end, in that order; the parts share the world and the workers' handles.
fn chaos_on(
    kind: DeviceKind,
    mem: MemoryKind,
    budget: usize,
    pool: usize,
    secs: u64,
    knobs: Knobs,
) {
    let (fork, protect) = (knobs.fork, knobs.protect);
    let Some(g) = gpu_on(kind, mem, budget, 4, pool) else {
        return;
    };
    let hog = knobs.free_frames.map(|k| {
        let n = g.pool.available() - k;
        g.pool.alloc_batch(n, false).unwrap()
    });
    let writers = 3;
    let per = 8;
    let total = writers * per;
    let base = map(&g.space, total as u64);
    let c = Arc::new(Chaos {
        seen: Default::default(),
        g: g.clone(),
        base,
        writers,
        per,
        stop: Arc::new(AtomicBool::new(false)),
        errors: Arc::new(parking_lot::Mutex::new(Vec::new())),
    });
    let mut hs: Vec<thread::JoinHandle<()>> = Vec::new();
    // Writers: write a page, read it back, now and then read all their pages.
    for w in 0..writers {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 1 + w as u64;
            let mut want: Vec<Vec<u8>> = vec![vec![0u8; 4096]; c.per];
            let first = c.base + (w * c.per) as u64 * PAGE;
            let mut n = 0u32;
            while !c.stop.load(Ordering::Relaxed) {
                let k = (lcg(&mut rng) % c.per as u64) as usize;
                let addr = first + k as u64 * PAGE;
                n = n.wrapping_add(1);
                let data: Vec<u8> = (0..4096)
                    .map(|i| (i as u32 ^ n ^ (w as u32 * 77)) as u8 | 1)
                    .collect();
                match c.g.space.write(addr, &data) {
                    Ok(()) => want[k] = data,
                    Err(e) if benign(&e) => {
                        let name = format!("write {:?}", e)
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == ' ')
                            .collect::<String>();
                        *c.seen.lock().entry(name).or_default() += 1;
                        continue;
                    }
                    Err(e) => {
                        c.errors.lock().push(format!("writer {w} write: {e:?}"));
                        continue;
                    }
                }
                let mut got = vec![0u8; 4096];
                for (k, want) in want.iter().enumerate() {
                    let addr = first + k as u64 * PAGE;
                    match c.g.space.read(addr, &mut got) {
                        Ok(()) => {
                            if &got != want {
                                let i = (0..4096).find(|&i| got[i] != want[i]).unwrap();
                                c.errors.lock().push(format!(
                                    "writer {w} page {k}: byte {i} is {:#x}, want {:#x}",
                                    got[i], want[i]
                                ));
                            }
                        }
                        Err(e) if benign(&e) => {}
                        Err(e) => c.errors.lock().push(format!("writer {w} read: {e:?}")),
                    }
                }
            }
        }));
    }
    // Migrators, to the device and back.
    for m in 0..2 {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 100 + m as u64;
            let total = (c.writers * c.per) as u64;
            while !c.stop.load(Ordering::Relaxed) {
                let s = lcg(&mut rng) % total;
                let n = 1 + lcg(&mut rng) % (total - s);
                let addr = c.base + s * PAGE;
                let r = match lcg(&mut rng) % 3 {
                    0 | 1 => {
                        c.g.d
                            .migrate_to_device(&c.g.space, addr, n as usize)
                            .map(|_| ())
                    }
                    _ => {
                        c.g.d
                            .migrate_to_host(&c.g.space, addr, n as usize)
                            .map(|_| ())
                    }
                };
                if let Err(e) = r {
                    if !benign(&e) {
                        c.errors.lock().push(format!("migrator {m}: {e:?}"));
                    }
                }
            }
        }));
    }
    // Evictor.
    {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 7;
            while !c.stop.load(Ordering::Relaxed) {
                let r = if lcg(&mut rng).is_multiple_of(4) {
                    c.g.d.evict_all()
                } else {
                    c.g.d.evict(1 + (lcg(&mut rng) % 8) as usize)
                };
                if let Err(e) = r {
                    if !benign(&e) {
                        c.errors.lock().push(format!("evictor: {e:?}"));
                    }
                }
                thread::yield_now();
            }
        }));
    }
    // Forker: fork, the child reads and writes, then goes.
    if fork {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 9;
            let total = (c.writers * c.per) as u64;
            while !c.stop.load(Ordering::Relaxed) {
                let child = match c.g.space.fork() {
                    Ok(ch) => ch,
                    Err(e) => {
                        if !benign(&e) {
                            c.errors.lock().push(format!("fork: {e:?}"));
                        }
                        continue;
                    }
                };
                for _ in 0..4 {
                    let k = lcg(&mut rng) % total;
                    let addr = c.base + k * PAGE;
                    let mut buf = vec![0u8; 64];
                    if let Err(e) = child.read(addr, &mut buf) {
                        if !benign(&e) {
                            c.errors.lock().push(format!("child read: {e:?}"));
                        }
                    }
                    if let Err(e) = child.write(addr, &[0xee; 64]) {
                        if !benign(&e) {
                            c.errors.lock().push(format!("child write: {e:?}"));
                        }
                    }
                    if lcg(&mut rng).is_multiple_of(2) {
                        let _ = c.g.d.migrate_to_device(&child, addr, 1);
                    }
                }
                drop(child);
            }
        }));
    }
    // Protector: mprotect and munmap/mmap of a separate region that a migrator also hits.
    if protect {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 11;
            let other = c.g.space.mmap(None, 8 * PAGE, Prot::RW, false).unwrap();
            while !c.stop.load(Ordering::Relaxed) {
                let _ = c.g.space.write(other, &[5; 8192]);
                let _ = c.g.d.migrate_to_device(&c.g.space, other, 8);
                let prot = match lcg(&mut rng) % 3 {
                    0 => Prot::READ,
                    1 => Prot::NONE,
                    _ => Prot::RW,
                };
                let k = lcg(&mut rng) % 8;
                if let Err(e) = c.g.space.mprotect(other + k * PAGE, PAGE, prot) {
                    c.errors.lock().push(format!("mprotect: {e:?}"));
                }
                if lcg(&mut rng).is_multiple_of(4) {
                    c.g.space.munmap(other, 8 * PAGE).unwrap();
                    c.g.space
                        .mmap(Some(other), 8 * PAGE, Prot::RW, false)
                        .unwrap();
                }
            }
        }));
    }
    if knobs.sabotage {
        let c = c.clone();
        hs.push(thread::spawn(move || {
            let mut rng = 13;
            let dev = c.g.d.device().clone();
            let r = dev.pfn_range();
            let host = c.g.pool.pfn_range();
            while !c.stop.load(Ordering::Relaxed) {
                let fail: Vec<Pfn> = match lcg(&mut rng) % 4 {
                    0 => (0..r.count.min(64)).map(|i| r.start.add(i)).collect(),
                    1 => (0..host.count)
                        .filter(|_| lcg(&mut rng).is_multiple_of(2))
                        .map(|i| host.start.add(i))
                        .collect(),
                    _ => Vec::new(),
                };
                dev.inject_copy_failures(&fail);
                thread::sleep(Duration::from_millis(1 + lcg(&mut rng) % 5));
            }
            dev.inject_copy_failures(&[]);
        }));
    }
    thread::sleep(Duration::from_secs(secs));
    c.stop.store(true, Ordering::Relaxed);
    join_all("chaos", hs, Duration::from_secs(10));
    if let Some(h) = hog {
        g.pool.free_batch(&h).unwrap();
    }
    let errors = c.errors.lock().clone();
    eprintln!(
        "chaos {mem:?}: {:?}\n  writer errors: {:?}",
        g.d.stats(),
        c.seen.lock()
    );
    let bad = unsettled(&g.space, &g.pm, base, total);
    assert!(
        errors.is_empty() && bad.is_empty(),
        "errors: {errors:#?}\nunsettled: {bad:#?}"
    );
    // No leaks: with everything unmapped and the spaces gone, no device page and no host
    // frame but the zero page stays allocated.
    drop(c);
    let Gpu { pool, pm, d, space } = g;
    drop(space);
    let dev_left = d.resident_pages();
    let host_left = pool.in_use();
    drop(d);
    drop(pm);
    assert_eq!(
        (dev_left, host_left),
        (0, 1),
        "device pages / host frames left after teardown"
    );
}

#[test]
fn held_chaos_private() {
    watchdog_for("chaos private", Duration::from_secs(40), || {
        chaos(MemoryKind::DevicePrivate, 16, SMALL_POOL, 4, true, true)
    });
}

#[test]
fn held_chaos_coherent() {
    watchdog_for("chaos coherent", Duration::from_secs(40), || {
        chaos(MemoryKind::DeviceCoherent, 16, SMALL_POOL, 4, true, true)
    });
}

#[test]
fn held_chaos_exhausted_host() {
    watchdog_for("chaos exhausted", Duration::from_secs(40), || {
        chaos_with(
            MemoryKind::DevicePrivate,
            16,
            SMALL_POOL,
            4,
            Knobs {
                fork: true,
                protect: true,
                free_frames: Some(40),
                sabotage: false,
            },
        )
    });
}

#[test]
fn held_chaos_sabotaged_copies() {
    watchdog_for("chaos sabotaged", Duration::from_secs(40), || {
        chaos_with(
            MemoryKind::DevicePrivate,
            16,
            SMALL_POOL,
            4,
            Knobs {
                fork: true,
                protect: true,
                free_frames: None,
                sabotage: true,
            },
        )
    });
}

#[test]
fn held_chaos_sabotaged_coherent_exhausted() {
    watchdog_for("chaos sabotaged coherent", Duration::from_secs(40), || {
        chaos_with(
            MemoryKind::DeviceCoherent,
            16,
            SMALL_POOL,
            4,
            Knobs {
                fork: true,
                protect: true,
                free_frames: Some(10),
                sabotage: true,
            },
        )
    });
}

#[test]
fn held_chaos_vulkan() {
    watchdog_for("chaos vulkan", Duration::from_secs(60), || {
        for mem in [MemoryKind::DevicePrivate, MemoryKind::DeviceCoherent] {
            chaos_on(
                DeviceKind::Vulkan,
                mem,
                16,
                SMALL_POOL,
                4,
                Knobs {
                    fork: true,
                    protect: true,
                    free_frames: Some(60),
                    sabotage: true,
                },
            )
        }
    });
}
