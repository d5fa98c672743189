//! Long: one differential model (the model, its generator, the applier, the checks, the
//! runner), which a reader follows as one algorithm; splitting it into modules is left for
//! later.
//!
//! A seeded, randomized differential test of hetmem against a byte-level model.
//!
//! Each seed builds a fresh page map, host frame pool and host device (even seeds register
//! the device's memory as device-private, odd seeds as device-coherent), then runs a random
//! sequence of operations over 1 to 4 address spaces of a few pages each: CPU reads and
//! writes, device reads and writes through a mirror (fresh `hmm_range_fault`s, and a cached
//! mirror that trusts its frames until the space's invalidation sequence moves), migrations
//! to the device and back (whole and partial ranges, through the test driver and through the
//! raw `migrate_vma_*` stages with another operation between them), eviction, `mmap`,
//! `munmap`, `mremap`, `mprotect`, `fork`, dropping a space, and pins. The model keeps, per
//! address space, its mappings and the bytes of every mapped page; forked spaces are modelled
//! separately (copy on write: later writes in either are private).
//!
//! After every operation its outcome must match the model (the right error variant, or Ok)
//! and the page tables must be sane (no migration entry or locked page left, no writable
//! entry in a read-only mapping or of a page mapped twice, nothing mapped where the model has
//! no mapping, device and host frames in use equal to the frames mapped or pinned). Every
//! `CHECK_EVERY` operations and at the end every byte of every mapped page of every space is
//! compared, without faulting anything in; at the end through CPU and device reads too, and
//! after dropping everything no device page and no host frame (but the zero page) is in use.
//!
//! Everything runs on one thread per seed, so nothing races; operations that meet a
//! migration half done run between its stages: inside the driver's migration (after setup,
//! or between `migrate_vma_pages` and `migrate_vma_finalize`), or between the driver's copy
//! and `migrate_vma_pages` of a raw one. What runs there never touches the migration's own
//! pages (it would wait on their lock forever). A change of the migrating space's mappings
//! (munmap, mremap, mprotect, mmap, fork) waits for the migration, which holds the map lock
//! from setup to finalize: on the migrating thread it must fail and change nothing, and it
//! is applied (and checked against the model) once the migration is over.
//!
//! Environment: `HETMEM_MODEL_SEEDS` (default 200), `HETMEM_MODEL_OPS` (default 2000),
//! `HETMEM_MODEL_SEED=<n>` (run only seed n, to reproduce a failure),
//! `HETMEM_MODEL_SKIP_KNOWN=1` (avoid the operations that exposed the bugs listed in
//! [`KNOWN`], all fixed since; or a comma-separated list of their names, to bisect a
//! regression one class at a time),
//! `HETMEM_MODEL_STATS=1` (print how often each call gave each outcome).

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hetmem::migration::{
    migrate_pfn, migrate_pfn_to_pfn, migrate_vma_finalize, migrate_vma_pages, migrate_vma_setup,
    pin_pages_longterm, MigrateVma, MIGRATE_PFN_MIGRATE, MIGRATE_VMA_SELECT_DEVICE_COHERENT,
    MIGRATE_VMA_SELECT_DEVICE_PRIVATE, MIGRATE_VMA_SELECT_SYSTEM,
};
use hetmem::mm::{
    flags, hmm_range_fault, pin_pages, snapshot, AddressSpace, HmmPfn, MemoryKind, PageMap,
    PageState, PinGuard, Prot, Pte, PAGE,
};
use hetmem::Error;
use hetmem::VirtAddr;
use hetmem_engine::{DeviceKind, HostFramePool, Pfn, PAGE_SIZE};
use hetmem_tests::dmirror::{Between, Dmirror};
use hetmem_tests::{open_config, test_config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PG: usize = PAGE_SIZE;
const MAX_SPACES: usize = 4;
/// Pages a space may have mapped (mmap stops adding beyond this).
const MAX_MAPPED: usize = 16;
const MAX_PINS: usize = 3;
const CHECK_EVERY: usize = 50;
/// Operations shown before a failure.
const TAIL: usize = 30;

// ---------------------------------------------------------------------------------------
// Outcomes

/// An operation's outcome, as the model predicts it or the library reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Ok,
    NotMapped,
    ReadDenied,
    WriteDenied,
    NoAccess,
    AcrossVmas,
    AlreadyMapped,
    Busy,
}

fn outcome<T>(r: &hetmem::Result<T>) -> Option<Want> {
    Some(match r {
        Ok(_) => Want::Ok,
        Err(Error::NotMapped(_)) => Want::NotMapped,
        Err(Error::ReadDenied(_)) => Want::ReadDenied,
        Err(Error::WriteDenied(_)) => Want::WriteDenied,
        Err(Error::NoAccess(_)) => Want::NoAccess,
        Err(Error::AcrossVmas { .. }) => Want::AcrossVmas,
        Err(Error::AlreadyMapped(_)) => Want::AlreadyMapped,
        Err(Error::Busy(_)) => Want::Busy,
        Err(_) => return None,
    })
}

static STATS_ON: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Outcomes seen, per call (with `HETMEM_MODEL_STATS=1`).
    static STATS: std::cell::RefCell<BTreeMap<String, u64>> = Default::default();
}

/// Checks `r` against the outcomes the model allows; returns the value if Ok.
fn expect<T>(what: &str, r: hetmem::Result<T>, want: &[Want]) -> Result<Option<T>, String> {
    if STATS_ON.load(Ordering::Relaxed) {
        let key = format!("{what}: {:?}", outcome(&r));
        STATS.with(|s| *s.borrow_mut().entry(key).or_default() += 1);
    }
    match outcome(&r) {
        Some(got) if want.contains(&got) => Ok(r.ok()),
        _ => Err(format!(
            "{what}: library gave {}, model says {want:?}",
            match &r {
                Ok(_) => "Ok".to_string(),
                Err(e) => format!("Err({e}) [{e:?}]"),
            }
        )),
    }
}

fn compare(what: &str, addr: u64, got: &[u8], want: &[u8]) -> Result<(), String> {
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => {
            let at = addr + i as u64;
            let bad = got.iter().zip(want).filter(|(g, w)| g != w).count();
            Err(format!(
                "{what}: byte at {} (page {}, offset {}) is {:#04x}, model says {:#04x} \
                 ({bad} of {} bytes differ)",
                A(at),
                A(at & !(PAGE - 1)),
                at % PAGE,
                got[i],
                want[i],
                got.len()
            ))
        }
    }
}

/// The bytes a write with `seed` puts down: a pattern that does not repeat at page bounds.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8) ^ ((i / 4093) as u8))
        .collect()
}

fn page_of(addr: u64) -> u64 {
    addr & !(PAGE - 1)
}

/// The pages `[addr, addr + len)` touches.
fn pages_of(addr: u64, len: usize) -> impl Iterator<Item = u64> {
    let first = page_of(addr);
    let last = page_of(addr + len as u64 - 1);
    (0..=(last - first) / PAGE).map(move |k| first + k * PAGE)
}

/// An address, shown in hex.
#[derive(Clone, Copy, PartialEq, Eq)]
struct A(u64);

impl fmt::Debug for A {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
impl fmt::Display for A {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

fn prot_name(p: Prot) -> &'static str {
    match (p.read, p.write) {
        (true, true) => "RW",
        (true, false) => "READ",
        (false, false) => "NONE",
        (false, true) => "WRITE",
    }
}

// ---------------------------------------------------------------------------------------
// The model

#[derive(Clone, Debug)]
struct MVma {
    end: u64,
    prot: Prot,
}

/// One address space as the model sees it.
#[derive(Clone, Default)]
struct Model {
    /// Mappings by start address, split exactly where the operations split them.
    vmas: BTreeMap<u64, MVma>,
    /// The bytes of every mapped page (a hole reads as zeros).
    pages: BTreeMap<u64, Vec<u8>>,
    /// Every page address ever mapped here: the ones unmapped now must have no entry.
    touched: BTreeSet<u64>,
}

impl Model {
    fn vma_at(&self, a: u64) -> Option<(u64, &MVma)> {
        self.vmas
            .range(..=a)
            .next_back()
            .filter(|(_, v)| a < v.end)
            .map(|(&s, v)| (s, v))
    }

    fn prot_at(&self, a: u64) -> Option<Prot> {
        self.vma_at(a).map(|(_, v)| v.prot)
    }

    fn first_unmapped(&self, a: u64, n: usize) -> Option<u64> {
        (0..n as u64)
            .map(|k| a + k * PAGE)
            .find(|&p| self.vma_at(p).is_none())
    }

    fn overlaps(&self, a: u64, n: usize) -> bool {
        (0..n as u64).any(|k| self.vma_at(a + k * PAGE).is_some())
    }

    fn split(&mut self, a: u64) {
        if let Some((s, v)) = self.vma_at(a) {
            if s < a {
                let v = v.clone();
                self.vmas.insert(
                    s,
                    MVma {
                        end: a,
                        prot: v.prot,
                    },
                );
                self.vmas.insert(a, v);
            }
        }
    }

    fn map(&mut self, a: u64, n: usize, prot: Prot) {
        let end = a + n as u64 * PAGE;
        self.vmas.insert(a, MVma { end, prot });
        for k in 0..n as u64 {
            self.pages.insert(a + k * PAGE, vec![0; PG]);
            self.touched.insert(a + k * PAGE);
        }
    }

    fn unmap(&mut self, a: u64, n: usize) {
        let end = a + n as u64 * PAGE;
        self.split(a);
        self.split(end);
        let keys: Vec<u64> = self.vmas.range(a..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.vmas.remove(&k);
        }
        let keys: Vec<u64> = self.pages.range(a..end).map(|(&k, _)| k).collect();
        for k in keys {
            self.pages.remove(&k);
        }
    }

    fn protect(&mut self, a: u64, n: usize, prot: Prot) {
        let end = a + n as u64 * PAGE;
        self.split(a);
        self.split(end);
        for (_, v) in self.vmas.range_mut(a..end) {
            v.prot = prot;
        }
    }

    fn remap(&mut self, a: u64, n: usize, to: u64) {
        let end = a + n as u64 * PAGE;
        self.split(a);
        self.split(end);
        let keys: Vec<u64> = self.vmas.range(a..end).map(|(&k, _)| k).collect();
        for k in keys {
            let v = self.vmas.remove(&k).expect("listed");
            self.vmas.insert(
                to + (k - a),
                MVma {
                    end: to + (v.end - a),
                    prot: v.prot,
                },
            );
        }
        let keys: Vec<u64> = self.pages.range(a..end).map(|(&k, _)| k).collect();
        let moved: Vec<(u64, Vec<u8>)> = keys
            .into_iter()
            .map(|k| (k, self.pages.remove(&k).expect("listed")))
            .collect();
        for (k, bytes) in moved {
            self.pages.insert(to + (k - a), bytes);
            self.touched.insert(to + (k - a));
        }
    }

    /// The outcome of a CPU or device access of one page.
    fn access(&self, page: u64, write: bool) -> Want {
        match self.prot_at(page) {
            None => Want::NotMapped,
            Some(p) if write && !p.write => Want::WriteDenied,
            Some(p) if !write && !p.read => Want::ReadDenied,
            Some(_) => Want::Ok,
        }
    }

    /// The outcome of an access of every page of `[addr, addr + len)`: that of the first
    /// page that fails.
    fn access_range(&self, addr: u64, len: usize, write: bool) -> Want {
        pages_of(addr, len)
            .map(|p| self.access(p, write))
            .find(|&w| w != Want::Ok)
            .unwrap_or(Want::Ok)
    }

    /// The outcomes `migrate_vma_setup` of `[a, a + n pages)` may have. A range over several
    /// mappings fails, except that mappings split apart with the same protection may as
    /// well have been merged again (the kernel merges them; hetmem need not).
    fn migrate(&self, a: u64, n: usize) -> Vec<Want> {
        let end = a + n as u64 * PAGE;
        let by_prot = |p: Prot| {
            if p.read || p.write {
                Want::Ok
            } else {
                Want::NoAccess
            }
        };
        let Some((_, v)) = self.vma_at(a) else {
            return vec![Want::NotMapped];
        };
        if v.end >= end {
            return vec![by_prot(v.prot)];
        }
        let prot = v.prot;
        let mut at = v.end;
        let mut same = true;
        while at < end {
            match self.vma_at(at) {
                None => return vec![Want::AcrossVmas],
                Some((_, w)) => {
                    same &= w.prot == prot;
                    at = w.end;
                }
            }
        }
        if same {
            vec![Want::AcrossVmas, by_prot(prot)]
        } else {
            vec![Want::AcrossVmas]
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        for p in pages_of(addr, len) {
            let bytes = &self.pages[&p];
            let from = addr.max(p) - p;
            let to = (addr + len as u64).min(p + PAGE) - p;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        out
    }

    /// Writes the part of `data` (which starts at `addr`) that falls in page `p`.
    fn write_page(&mut self, addr: u64, data: &[u8], p: u64) {
        let from = addr.max(p);
        let to = (addr + data.len() as u64).min(p + PAGE);
        let bytes = self.pages.get_mut(&p).expect("mapped");
        bytes[(from - p) as usize..(to - p) as usize]
            .copy_from_slice(&data[(from - addr) as usize..(to - addr) as usize]);
    }
}

// ---------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug)]
enum Op {
    CpuWrite {
        sp: usize,
        addr: A,
        len: usize,
        v: u8,
    },
    CpuRead {
        sp: usize,
        addr: A,
        len: usize,
    },
    /// A device read through the mirror; `cached`: through frames it got earlier, as long as
    /// no invalidation ran since.
    DevRead {
        sp: usize,
        addr: A,
        len: usize,
        cached: bool,
    },
    DevWrite {
        sp: usize,
        addr: A,
        len: usize,
        v: u8,
        cached: bool,
    },
    ToDevice {
        sp: usize,
        addr: A,
        n: usize,
    },
    ToSystem {
        sp: usize,
        addr: A,
        n: usize,
    },
    Evict,
    Munmap {
        sp: usize,
        addr: A,
        n: usize,
    },
    Mremap {
        sp: usize,
        addr: A,
        n: usize,
        to: A,
    },
    Mprotect {
        sp: usize,
        addr: A,
        n: usize,
        prot: &'static str,
    },
    Mmap {
        sp: usize,
        n: usize,
        prot: &'static str,
    },
    MmapFixed {
        sp: usize,
        addr: A,
        n: usize,
        prot: &'static str,
    },
    Fork {
        sp: usize,
    },
    DropSpace {
        sp: usize,
    },
    Pin {
        sp: usize,
        addr: A,
        longterm: bool,
    },
    Unpin {
        k: usize,
    },
    /// A migration to the device through the driver, running `inner` at `at`.
    Hooked {
        sp: usize,
        addr: A,
        n: usize,
        at: Between,
        inner: Box<Op>,
    },
    /// Operations in a row (on the same pages, to make some interleavings likely).
    Seq(Vec<Op>),
    /// A migration through the raw stages: setup, the driver's allocation and copy, `mid`,
    /// pages, finalize.
    Staged {
        sp: usize,
        addr: A,
        n: usize,
        to_device: bool,
        mid: Box<Op>,
    },
}

fn prot_of(name: &str) -> Prot {
    match name {
        "RW" => Prot::RW,
        "READ" => Prot::READ,
        _ => Prot::NONE,
    }
}

impl Op {
    /// The space and address the operation works on, if one.
    fn target(&self) -> Option<(usize, u64)> {
        match *self {
            Op::CpuWrite { sp, addr, .. }
            | Op::CpuRead { sp, addr, .. }
            | Op::DevRead { sp, addr, .. }
            | Op::DevWrite { sp, addr, .. }
            | Op::ToDevice { sp, addr, .. }
            | Op::ToSystem { sp, addr, .. }
            | Op::Munmap { sp, addr, .. }
            | Op::Mprotect { sp, addr, .. }
            | Op::MmapFixed { sp, addr, .. }
            | Op::Pin { sp, addr, .. }
            | Op::Hooked { sp, addr, .. }
            | Op::Staged { sp, addr, .. } => Some((sp, addr.0)),
            Op::Mremap { sp, to, .. } => Some((sp, to.0)),
            Op::Seq(ref ops) => ops.first().and_then(Op::target),
            _ => None,
        }
    }

    fn name(&self) -> String {
        match self {
            Op::Hooked { at, inner, .. } => format!("Hooked({at:?}, {})", inner.name()),
            Op::Seq(ops) => format!(
                "Seq({})",
                ops.iter().map(Op::name).collect::<Vec<_>>().join(", ")
            ),
            Op::Staged { to_device, mid, .. } => format!(
                "Staged({}, {})",
                if *to_device { "to device" } else { "to host" },
                mid.name()
            ),
            other => {
                let s = format!("{other:?}");
                s.split([' ', '{']).next().unwrap_or("").to_string()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The world: the library's objects and the model side by side

/// Frames a cached mirror trusts while the space's invalidation sequence stays `seq`.
#[derive(Default)]
struct Tlb {
    seq: Option<u64>,
    map: BTreeMap<u64, HmmPfn>,
}

struct Sp {
    s: AddressSpace,
    m: Model,
    tlb: Tlb,
    /// Where the first mapping was: ranges are picked around it when nothing is mapped.
    home: u64,
}

struct World {
    frames: Arc<HostFramePool>,
    pm: Arc<PageMap>,
    dev: Arc<Dmirror>,
    spaces: Vec<Sp>,
    pins: Vec<PinGuard>,
    /// The known bugs (names from [`KNOWN`]) whose operations are avoided.
    skip: Vec<&'static str>,
    /// Where the last operation was (space, address).
    focus: Option<(usize, u64)>,
}

impl World {
    fn new(seed: u64, skip: Vec<&'static str>) -> World {
        let mem = mem_of(seed);
        let frames = HostFramePool::new(64 << 20).expect("host frame pool");
        let mut config = test_config(DeviceKind::Host, 512 * PAGE);
        config.frames = Some(frames.clone());
        let device = open_config(config, "model2").expect("the host device is always there");
        let pm = PageMap::new(frames.clone()).expect("page map");
        let dev = Arc::new(Dmirror::new(device, mem, &pm));
        let s = AddressSpace::new(&pm);
        let n = 8 + (seed % 5) as usize;
        let base = s
            .mmap(None, n as u64 * PAGE, Prot::RW, false)
            .unwrap()
            .get();
        let mut m = Model::default();
        m.map(base, n, Prot::RW);
        World {
            frames,
            pm,
            dev,
            spaces: vec![Sp {
                s,
                m,
                tlb: Tlb::default(),
                home: base,
            }],
            pins: Vec::new(),
            skip,
            focus: None,
        }
    }

    // -- picking operations ------------------------------------------------------------

    /// A page range around what `sp` maps: mostly inside one mapping, sometimes over its
    /// end or around a mapped page.
    fn pick_range(&self, sp: usize, rng: &mut StdRng, maxn: usize) -> (u64, usize) {
        let m = &self.spaces[sp].m;
        let n = rng.random_range(1..=maxn);
        if let Some((_, at)) = self.focus.filter(|f| f.0 == sp) {
            if m.vma_at(page_of(at)).is_some() && rng.random_bool(0.5) {
                let off = rng.random_range(-1i64..=1) * PAGE as i64;
                return (page_of(at).wrapping_add_signed(off), n);
            }
        }
        if !m.vmas.is_empty() && rng.random_bool(0.85) {
            let k = rng.random_range(0..m.vmas.len());
            let (&s, v) = m.vmas.iter().nth(k).expect("k < len");
            let pages = ((v.end - s) / PAGE) as usize;
            let first = rng.random_range(0..pages);
            let room = pages - first;
            let n = if rng.random_bool(0.85) {
                n.min(room)
            } else {
                n
            };
            (s + first as u64 * PAGE, n)
        } else {
            let anchor = self.anchor(sp, rng);
            let off = rng.random_range(-4i64..=4) * PAGE as i64;
            (anchor.wrapping_add_signed(off), n)
        }
    }

    /// A mapped page of `sp`, or its home when nothing is mapped.
    fn anchor(&self, sp: usize, rng: &mut StdRng) -> u64 {
        let m = &self.spaces[sp].m;
        if m.pages.is_empty() {
            self.spaces[sp].home
        } else {
            let k = rng.random_range(0..m.pages.len());
            *m.pages.keys().nth(k).expect("k < len")
        }
    }

    /// A byte range of up to three pages (possibly unaligned at either end).
    fn pick_bytes(&self, sp: usize, rng: &mut StdRng) -> (u64, usize) {
        let (a, n) = self.pick_range(sp, rng, 3);
        bytes_in(rng, a, n)
    }

    /// A byte range within one page of `sp` outside `[addr, addr + n pages)` (so that an
    /// access cannot meet the pages a migration of that range holds locked), if there is one.
    fn pick_disjoint(
        &self,
        sp: usize,
        rng: &mut StdRng,
        addr: u64,
        n: usize,
    ) -> Option<(u64, usize)> {
        let end = addr + n as u64 * PAGE;
        let m = &self.spaces[sp].m;
        let outside: Vec<u64> = m
            .pages
            .keys()
            .copied()
            .filter(|&p| p < addr || p >= end)
            .collect();
        if outside.is_empty() {
            return None;
        }
        let p = outside[rng.random_range(0..outside.len())];
        Some(bytes_in(rng, p, 1))
    }

    fn pick_prot(rng: &mut StdRng) -> &'static str {
        match rng.random_range(0..20) {
            0..5 => "READ",
            5..17 => "RW",
            _ => "NONE",
        }
    }

    fn gen(&self, rng: &mut StdRng) -> Op {
        loop {
            let op = self.gen_any(rng);
            if !self.known_bug(&op).is_some_and(|b| self.skip.contains(&b)) {
                return op;
            }
        }
    }

    /// Long: one arm per operation the generator can draw, with its weights; the arms share the
    /// model's view of what exists.
    fn gen_any(&self, rng: &mut StdRng) -> Op {
        // Half the time, stay where the last operation was: a page gets written, moved,
        // read, protected, shared in quick succession more often than by chance.
        let sp = match self.focus {
            Some((sp, _)) if sp < self.spaces.len() && rng.random_bool(0.5) => sp,
            _ => rng.random_range(0..self.spaces.len()),
        };
        let m = &self.spaces[sp].m;
        let room = MAX_MAPPED.saturating_sub(m.pages.len());
        // A space with little mapped gets more: an mmap, or a fixed one at a free address
        // near home (the only kind when mmap(None) is skipped as a known bug).
        if m.pages.len() < 6 && room > 0 && rng.random_bool(0.3) {
            let n = rng.random_range(1..=room.min(4));
            let prot = Self::pick_prot(rng);
            if rng.random_bool(0.5) && !self.skip.contains(&"mmap") {
                return Op::Mmap { sp, n, prot };
            }
            let home = self.spaces[sp].home;
            let free = (0..64)
                .map(|k| home.wrapping_add_signed((k - 16) * PAGE as i64))
                .find(|&a| !m.overlaps(a, n));
            if let Some(a) = free {
                return Op::MmapFixed {
                    sp,
                    addr: A(a),
                    n,
                    prot,
                };
            }
        }
        let w = rng.random_range(0..100);
        match w {
            0..3 => {
                // A mirror that holds the frames of what it read, a CPU write there (a copy
                // on write if the page is shared or the zero page), the mirror again.
                let (addr, len) = self.pick_bytes(sp, rng);
                let read = Op::DevRead {
                    sp,
                    addr: A(addr),
                    len,
                    cached: true,
                };
                let write = Op::CpuWrite {
                    sp,
                    addr: A(addr),
                    len,
                    v: rng.random(),
                };
                Op::Seq(vec![read.clone(), write, read])
            }
            3..14 => {
                let (addr, len) = self.pick_bytes(sp, rng);
                Op::CpuWrite {
                    sp,
                    addr: A(addr),
                    len,
                    v: rng.random(),
                }
            }
            14..20 => {
                let (addr, len) = self.pick_bytes(sp, rng);
                Op::CpuRead {
                    sp,
                    addr: A(addr),
                    len,
                }
            }
            20..26 => {
                let (addr, len) = self.pick_bytes(sp, rng);
                Op::DevRead {
                    sp,
                    addr: A(addr),
                    len,
                    cached: rng.random_bool(0.75),
                }
            }
            26..34 => {
                let (addr, len) = self.pick_bytes(sp, rng);
                Op::DevWrite {
                    sp,
                    addr: A(addr),
                    len,
                    v: rng.random(),
                    cached: rng.random_bool(0.75),
                }
            }
            34..46 => {
                let (addr, n) = self.pick_range(sp, rng, 8);
                Op::ToDevice {
                    sp,
                    addr: A(addr),
                    n,
                }
            }
            46..52 => {
                let (addr, n) = self.pick_range(sp, rng, 8);
                Op::ToSystem {
                    sp,
                    addr: A(addr),
                    n,
                }
            }
            52..55 => Op::Evict,
            55..58 => {
                let (addr, n) = self.pick_range(sp, rng, 4);
                Op::Munmap {
                    sp,
                    addr: A(addr),
                    n,
                }
            }
            58..62 => self.gen_mremap(sp, rng, None),
            62..68 => {
                let (addr, n) = self.pick_range(sp, rng, 6);
                Op::Mprotect {
                    sp,
                    addr: A(addr),
                    n,
                    prot: Self::pick_prot(rng),
                }
            }
            68..70 if room > 0 => Op::Mmap {
                sp,
                n: rng.random_range(1..=room.min(4)),
                prot: Self::pick_prot(rng),
            },
            70..72 => {
                let anchor = self.anchor(sp, rng);
                let addr = anchor.wrapping_add_signed(rng.random_range(-8i64..=8) * PAGE as i64);
                let n = rng.random_range(1..=3);
                if !m.overlaps(addr, n) && n > room {
                    return Op::Evict;
                }
                Op::MmapFixed {
                    sp,
                    addr: A(addr),
                    n,
                    prot: Self::pick_prot(rng),
                }
            }
            72..75 if self.spaces.len() < MAX_SPACES => Op::Fork { sp },
            75..76 if self.spaces.len() > 1 => Op::DropSpace { sp },
            76..79 if self.pins.len() < MAX_PINS => {
                let (addr, _) = self.pick_range(sp, rng, 1);
                Op::Pin {
                    sp,
                    addr: A(addr),
                    longterm: rng.random_bool(0.5),
                }
            }
            79..82 if !self.pins.is_empty() => Op::Unpin {
                k: rng.random_range(0..self.pins.len()),
            },
            82..91 => {
                let (addr, n) = self.pick_range(sp, rng, 6);
                let at = if rng.random_bool(0.5) {
                    Between::SetupAndCopy
                } else {
                    Between::PagesAndFinalize
                };
                let inner = self.gen_inner(sp, rng, addr, n);
                Op::Hooked {
                    sp,
                    addr: A(addr),
                    n,
                    at,
                    inner: Box::new(inner),
                }
            }
            91..100 => {
                let (addr, n) = self.pick_range(sp, rng, 6);
                let mid = self.gen_inner(sp, rng, addr, n);
                Op::Staged {
                    sp,
                    addr: A(addr),
                    n,
                    to_device: rng.random_bool(0.65),
                    mid: Box::new(mid),
                }
            }
            _ => {
                let (addr, len) = self.pick_bytes(sp, rng);
                Op::CpuRead {
                    sp,
                    addr: A(addr),
                    len,
                }
            }
        }
    }

    /// An mremap of a range (of `around`, a page range, if given) of `sp` to an address
    /// near what it maps (free or not).
    fn gen_mremap(&self, sp: usize, rng: &mut StdRng, around: Option<(u64, usize)>) -> Op {
        let (addr, n) = match around {
            Some((a, n)) => {
                let start = rng.random_range(0..n) as u64;
                let len = rng.random_range(1..=n - start as usize);
                (a + start * PAGE, len)
            }
            None => self.pick_range(sp, rng, 4),
        };
        let anchor = self.anchor(sp, rng);
        let to = if rng.random_bool(0.7) {
            anchor.wrapping_add_signed(rng.random_range(-24i64..=24) * PAGE as i64)
        } else {
            self.spaces[sp].home + rng.random_range(32..96) * PAGE
        };
        Op::Mremap {
            sp,
            addr: A(addr),
            n,
            to: A(to),
        }
    }

    /// The operation run in the middle of a migration of `[addr, addr + n pages)` of `sp`.
    /// Accesses go to other pages of the same space only: the migration holds its pages
    /// locked, and an access of them (here, or in a space sharing them after fork) would
    /// wait for it forever on this thread. It may also evict, or unmap, move, protect (the
    /// migration's range included) or fork the space.
    fn gen_inner(&self, sp: usize, rng: &mut StdRng, addr: u64, n: usize) -> Op {
        match rng.random_range(0..9) {
            k @ 0..4 => match self.pick_disjoint(sp, rng, addr, n) {
                Some((a, len)) => match k {
                    0 => Op::CpuRead {
                        sp,
                        addr: A(a),
                        len,
                    },
                    1 => Op::CpuWrite {
                        sp,
                        addr: A(a),
                        len,
                        v: rng.random(),
                    },
                    2 => Op::DevRead {
                        sp,
                        addr: A(a),
                        len,
                        cached: rng.random_bool(0.5),
                    },
                    _ if self.pins.len() < MAX_PINS => Op::Pin {
                        sp,
                        addr: A(page_of(a)),
                        longterm: rng.random_bool(0.5),
                    },
                    _ => Op::DevWrite {
                        sp,
                        addr: A(a),
                        len,
                        v: rng.random(),
                        cached: rng.random_bool(0.5),
                    },
                },
                None => Op::Evict,
            },
            4 => Op::Evict,
            5 => {
                let start = rng.random_range(-1i64..n as i64);
                let a = addr.wrapping_add_signed(start * PAGE as i64);
                Op::Munmap {
                    sp,
                    addr: A(a),
                    n: rng.random_range(1..=n + 1),
                }
            }
            6 => self.gen_mremap(sp, rng, Some((addr, n))),
            7 => {
                let start = rng.random_range(0..n) as u64;
                Op::Mprotect {
                    sp,
                    addr: A(addr + start * PAGE),
                    n: rng.random_range(1..=n - start as usize),
                    prot: Self::pick_prot(rng),
                }
            }
            _ if self.spaces.len() < MAX_SPACES => Op::Fork { sp },
            _ => Op::Evict,
        }
    }

    /// The known bug (a name from [`KNOWN`]) that `op` exposes, if it does: the ones named
    /// in `HETMEM_MODEL_SKIP_KNOWN` are not generated. (`cow` is avoided differently: see
    /// [`World::apply`].)
    fn known_bug(&self, op: &Op) -> Option<&'static str> {
        match op {
            Op::Mmap { .. } => Some("mmap"),
            Op::Seq(ops) => ops.iter().find_map(|o| self.known_bug(o)),
            Op::Hooked { inner: mid, .. } | Op::Staged { mid, .. } => match **mid {
                Op::Mprotect { .. } => Some("protect"),
                Op::Munmap { .. } | Op::Mremap { .. } => Some("unmap"),
                _ => None,
            },
            _ => None,
        }
    }

    // -- helpers over the library's state ------------------------------------------------

    fn dev_local(&self, pte: Pte) -> bool {
        let owner = self.dev.owner();
        match pte {
            Pte::DevicePrivate { pfn, .. } => self.pm.page(pfn).is_some_and(|p| p.owner() == owner),
            Pte::Present { pfn, .. } => self
                .pm
                .page(pfn)
                .is_some_and(|p| p.kind() == MemoryKind::DeviceCoherent && p.owner() == owner),
            _ => false,
        }
    }

    fn pinned(&self, pte: Pte) -> bool {
        pte.pfn()
            .and_then(|pfn| self.pm.page(pfn))
            .is_some_and(|p| p.pincount() > 0)
    }

    /// The entry of `a` in `sp` and the counts of the page it maps, for failure reports.
    fn describe(&self, sp: usize, a: u64) -> String {
        let pte = self.spaces[sp].s.pte(VirtAddr(a));
        match pte.pfn().and_then(|pfn| self.pm.page(pfn)) {
            Some(p) => format!(
                "{pte:?}: {:?} page, refcount {}, mapcount {}, pincount {}, flags {:#x}",
                p.kind(),
                p.refcount(),
                p.mapcount(),
                p.pincount(),
                p.flags()
            ),
            None => format!("{pte:?}"),
        }
    }

    /// Held locked (by a migration this operation runs in the middle of).
    fn locked(&self, pte: Pte) -> bool {
        pte.pfn()
            .and_then(|pfn| self.pm.page(pfn))
            .is_some_and(|p| p.test(flags::LOCKED))
    }

    /// What `migrate_vma_setup` of `[addr, addr + n pages)` must collect: to the device,
    /// every page not already there and not pinned (holes and the zero page included); to
    /// host, the holes and this device's pages that are not pinned.
    fn expected_cpages(&self, sp: usize, addr: u64, n: usize, to_device: bool) -> usize {
        let s = &self.spaces[sp].s;
        (0..n as u64)
            .map(|k| s.pte(VirtAddr(addr + k * PAGE)))
            .filter(|&pte| {
                if to_device {
                    !self.dev_local(pte) && !self.pinned(pte)
                } else {
                    pte == Pte::None || (self.dev_local(pte) && !self.pinned(pte))
                }
            })
            .count()
    }

    /// After a migration of `[addr, addr + n pages)`: every page is where it was sent,
    /// unless it is pinned.
    fn check_placed(&self, sp: usize, addr: u64, n: usize, on_device: bool) -> Result<(), String> {
        let s = &self.spaces[sp].s;
        for k in 0..n as u64 {
            let a = addr + k * PAGE;
            let pte = s.pte(VirtAddr(a));
            if self.dev_local(pte) != on_device && !self.pinned(pte) {
                return Err(format!(
                    "page {} of space {sp} is not on the {} after its migration: {pte:?}",
                    A(a),
                    if on_device { "device" } else { "host" }
                ));
            }
        }
        Ok(())
    }

    /// Reads one page through its entry, without faulting anything in.
    fn peek(&self, sp: usize, a: u64) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; PG];
        match self.spaces[sp].s.pte(VirtAddr(a)) {
            Pte::None => {}
            Pte::Present { pfn, .. } | Pte::DevicePrivate { pfn, .. } => {
                self.read_frame(pfn, 0, &mut buf)
                    .map_err(|e| format!("peek of {} (pfn {pfn:?}): {e}", A(a)))?;
            }
            other => return Err(format!("peek of {}: entry {other:?}", A(a))),
        }
        Ok(buf)
    }

    fn read_frame(&self, pfn: Pfn, off: usize, out: &mut [u8]) -> hetmem::Result<()> {
        if self.dev.device().owns(pfn) {
            self.dev
                .device()
                .read_page(pfn, off, out)
                .map_err(Error::from)
        } else {
            self.pm.read_frame(pfn, off, out)
        }
    }

    fn write_frame(&self, pfn: Pfn, off: usize, data: &[u8]) -> hetmem::Result<()> {
        if self.dev.device().owns(pfn) {
            self.dev
                .device()
                .write_page(pfn, off, data)
                .map_err(Error::from)
        } else {
            self.pm.write_frame(pfn, off, data)
        }
    }

    /// The frames a cached device mirror uses for `[addr, addr + len)`: the ones it holds
    /// while no invalidation ran since it got them, faulted in (`hmm_range_fault`) otherwise.
    fn mirror_pfns(
        &mut self,
        sp: usize,
        addr: u64,
        len: usize,
        write: bool,
    ) -> Result<hetmem::Result<Vec<HmmPfn>>, String> {
        let owner = self.dev.owner();
        for _ in 0..16 {
            let Sp { s, tlb, .. } = &mut self.spaces[sp];
            let seq = s.invalidate_seq();
            if tlb.seq != Some(seq) {
                tlb.map.clear();
                tlb.seq = Some(seq);
            }
            let mut out = Vec::new();
            for p in pages_of(addr, len) {
                match tlb.map.get(&p) {
                    Some(h) if h.write || !write => out.push(*h),
                    _ => match hmm_range_fault(s, VirtAddr(p), 1, write, owner) {
                        Ok(v) => {
                            tlb.map.insert(p, v[0]);
                            out.push(v[0]);
                        }
                        Err(e) => return Ok(Err(e)),
                    },
                }
            }
            if s.invalidate_seq() == seq {
                return Ok(Ok(out));
            }
        }
        Err("the cached mirror never saw a quiet sequence number".into())
    }

    // -- applying operations -------------------------------------------------------------

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let r = self.apply_op(op);
        // Known bug: a copy on write (a CPU write, a write pin, a device write faulting
        // through `hmm_range_fault`) replaces the frame without invalidating mirrors. With
        // the known bugs skipped, the cached mirror forgets what it holds of the space after
        // such an operation, as if it had been told.
        if self.skip.contains(&"cow") {
            match *op {
                Op::CpuWrite { sp, .. }
                | Op::Pin { sp, .. }
                | Op::DevWrite {
                    sp, cached: false, ..
                } => self.spaces[sp].tlb.seq = None,
                _ => {}
            }
        }
        r
    }

    /// Long: one match arm per operation; the arms share the world and the shadow model, and a
    /// function per arm would only move the match.
    fn apply_op(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::CpuWrite {
                sp,
                addr: A(addr),
                len,
                v,
            } => {
                // A CPU store sequence: the pages before the first one that faults are written.
                let data = pattern(v, len);
                let m = &mut self.spaces[sp].m;
                let mut want = Want::Ok;
                for p in pages_of(addr, len) {
                    want = m.access(p, true);
                    if want != Want::Ok {
                        break;
                    }
                    m.write_page(addr, &data, p);
                }
                let r = self.spaces[sp].s.write(VirtAddr(addr), &data);
                expect("cpu write", r, &[want])?;
            }
            Op::CpuRead {
                sp,
                addr: A(addr),
                len,
            } => {
                let want = self.spaces[sp].m.access_range(addr, len, false);
                let mut buf = vec![0u8; len];
                let r = self.spaces[sp].s.read(VirtAddr(addr), &mut buf);
                if expect("cpu read", r, &[want])?.is_some() {
                    compare("cpu read", addr, &buf, &self.spaces[sp].m.read(addr, len))?;
                }
            }
            Op::DevRead {
                sp,
                addr: A(addr),
                len,
                cached,
            } => {
                let want = self.spaces[sp].m.access_range(addr, len, false);
                let r = if cached {
                    match self.mirror_pfns(sp, addr, len, false)? {
                        Ok(pfns) => {
                            let mut buf = vec![0u8; len];
                            let mut done = 0;
                            let mut r = Ok(());
                            for (p, h) in pages_of(addr, len).zip(pfns) {
                                let from = addr.max(p);
                                let to = (addr + len as u64).min(p + PAGE);
                                let n = (to - from) as usize;
                                r = r.and_then(|()| {
                                    self.read_frame(
                                        h.pfn,
                                        (from - p) as usize,
                                        &mut buf[done..done + n],
                                    )
                                });
                                done += n;
                            }
                            r.map(|()| buf)
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    self.dev
                        .device_read(&self.spaces[sp].s, VirtAddr(addr), len)
                };
                if let Some(buf) = expect("device read", r, &[want])? {
                    compare(
                        "device read",
                        addr,
                        &buf,
                        &self.spaces[sp].m.read(addr, len),
                    )?;
                }
            }
            Op::DevWrite {
                sp,
                addr: A(addr),
                len,
                v,
                cached,
            } => {
                // The device faults the whole range in first: all or nothing.
                let data = pattern(v, len);
                let want = self.spaces[sp].m.access_range(addr, len, true);
                let r = if cached {
                    match self.mirror_pfns(sp, addr, len, true)? {
                        Ok(pfns) => {
                            let mut done = 0;
                            let mut r = Ok(());
                            for (p, h) in pages_of(addr, len).zip(pfns) {
                                let from = addr.max(p);
                                let to = (addr + len as u64).min(p + PAGE);
                                let n = (to - from) as usize;
                                r = r.and_then(|()| {
                                    self.write_frame(
                                        h.pfn,
                                        (from - p) as usize,
                                        &data[done..done + n],
                                    )
                                });
                                done += n;
                            }
                            r
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    self.dev
                        .device_write(&self.spaces[sp].s, VirtAddr(addr), &data)
                };
                if want == Want::Ok {
                    let m = &mut self.spaces[sp].m;
                    for p in pages_of(addr, len) {
                        m.write_page(addr, &data, p);
                    }
                }
                expect("device write", r, &[want])?;
            }
            Op::ToDevice {
                sp,
                addr: A(addr),
                n,
            }
            | Op::ToSystem {
                sp,
                addr: A(addr),
                n,
            } => {
                let to_device = matches!(op, Op::ToDevice { .. });
                let want = self.spaces[sp].m.migrate(addr, n);
                let cpages = self.expected_cpages(sp, addr, n, to_device);
                let s = &self.spaces[sp].s;
                let r = if to_device {
                    self.dev.migrate_to_device(s, VirtAddr(addr), n)
                } else {
                    self.dev.migrate_to_system(s, VirtAddr(addr), n)
                };
                if let Some(moved) = expect("migration", r, &want)? {
                    if moved.cpages != cpages || moved.migrated != cpages {
                        return Err(format!(
                            "migration collected {} and migrated {} pages, {cpages} expected",
                            moved.cpages, moved.migrated
                        ));
                    }
                    self.check_placed(sp, addr, n, to_device)?;
                }
            }
            Op::Evict => {
                // Every allocated device page moves, but those pinned or locked (by a
                // migration this one runs in the middle of).
                let range = self.dev.pgmap.range;
                let want = (0..range.count)
                    .filter_map(|i| self.pm.page(range.start.add(i)))
                    .filter(|p| p.refcount() > 0 && p.pincount() == 0 && !p.test(flags::LOCKED))
                    .count();
                let moved = self
                    .dev
                    .evict_all()
                    .map_err(|e| format!("evict_all: {e:?}"))?;
                if moved != want {
                    return Err(format!(
                        "evict_all moved {moved} pages; {want} are in use and not pinned"
                    ));
                }
                for sp in 0..self.spaces.len() {
                    for &a in self.spaces[sp].m.pages.keys() {
                        let pte = self.spaces[sp].s.pte(VirtAddr(a));
                        if self.dev_local(pte) && !self.pinned(pte) && !self.locked(pte) {
                            return Err(format!(
                                "page {} of space {sp} is on the device after evict_all: {pte:?}",
                                A(a)
                            ));
                        }
                    }
                }
            }
            Op::Munmap {
                sp,
                addr: A(addr),
                n,
            } => {
                self.spaces[sp].m.unmap(addr, n);
                let r = self.spaces[sp].s.munmap(VirtAddr(addr), n as u64 * PAGE);
                expect("munmap", r, &[Want::Ok])?;
            }
            Op::Mremap {
                sp,
                addr: A(addr),
                n,
                to: A(to),
            } => {
                let m = &mut self.spaces[sp].m;
                let want = if m.first_unmapped(addr, n).is_some() {
                    Want::NotMapped
                } else if m.overlaps(to, n) {
                    Want::AlreadyMapped
                } else {
                    m.remap(addr, n, to);
                    Want::Ok
                };
                let r = self.spaces[sp]
                    .s
                    .mremap(VirtAddr(addr), n as u64 * PAGE, VirtAddr(to));
                expect("mremap", r, &[want])?;
            }
            Op::Mprotect {
                sp,
                addr: A(addr),
                n,
                prot,
            } => {
                let m = &mut self.spaces[sp].m;
                let want = if m.first_unmapped(addr, n).is_some() {
                    Want::NotMapped
                } else {
                    m.protect(addr, n, prot_of(prot));
                    Want::Ok
                };
                let r = self.spaces[sp]
                    .s
                    .mprotect(VirtAddr(addr), n as u64 * PAGE, prot_of(prot));
                expect("mprotect", r, &[want])?;
            }
            Op::Mmap { sp, n, prot } => {
                let r = self.spaces[sp]
                    .s
                    .mmap(None, n as u64 * PAGE, prot_of(prot), false)
                    .map(VirtAddr::get);
                if let Some(a) = expect("mmap(None)", r, &[Want::Ok])? {
                    let m = &mut self.spaces[sp].m;
                    if a % PAGE != 0 || m.overlaps(a, n) {
                        return Err(format!("mmap(None) gave {}, which is taken", A(a)));
                    }
                    m.map(a, n, prot_of(prot));
                }
            }
            Op::MmapFixed {
                sp,
                addr: A(addr),
                n,
                prot,
            } => {
                let m = &mut self.spaces[sp].m;
                let want = if m.overlaps(addr, n) {
                    Want::AlreadyMapped
                } else {
                    m.map(addr, n, prot_of(prot));
                    Want::Ok
                };
                let r = self.spaces[sp]
                    .s
                    .mmap(Some(VirtAddr(addr)), n as u64 * PAGE, prot_of(prot), false)
                    .map(VirtAddr::get);
                if let Some(a) = expect("mmap(Some)", r, &[want])? {
                    if a != addr {
                        return Err(format!("mmap(Some({})) mapped {}", A(addr), A(a)));
                    }
                }
            }
            Op::Fork { sp } => {
                let r = self.spaces[sp].s.fork();
                if let Some(child) = expect("fork", r, &[Want::Ok])? {
                    let parent = &self.spaces[sp];
                    let sp = Sp {
                        s: child,
                        m: parent.m.clone(),
                        tlb: Tlb::default(),
                        home: parent.home,
                    };
                    self.spaces.push(sp);
                }
            }
            Op::DropSpace { sp } => {
                self.spaces.remove(sp);
            }
            Op::Pin {
                sp,
                addr: A(addr),
                longterm,
            } => {
                let mut want = self.spaces[sp].m.access(addr, true);
                // A long-term pin must move a device-coherent page to host first, which a
                // page pinned already cannot do (a pinned page is exclusive: no copy on
                // write gets in the way).
                let pte = self.spaces[sp].s.pte(VirtAddr(addr));
                if longterm && want == Want::Ok && self.pinned(pte) {
                    let pfn = pte.pfn().expect("pinned");
                    if self.pm.page(pfn).map(|p| p.kind()) == Some(MemoryKind::DeviceCoherent) {
                        want = Want::Busy;
                    }
                }
                let s = &self.spaces[sp].s;
                let r = if longterm {
                    pin_pages_longterm(s, VirtAddr(addr), 1, true)
                } else {
                    pin_pages(s, VirtAddr(addr), 1, true, false)
                };
                let r = expect("pin", r, &[want])
                    .map_err(|e| format!("{e}; the page: {}", self.describe(sp, addr)))?;
                let s = &self.spaces[sp].s;
                if let Some(g) = r {
                    let pte = s.pte(VirtAddr(addr));
                    let pfn = g.pfns()[0];
                    let ok = matches!(pte, Pte::Present { pfn: p, write: true, .. } if p == pfn);
                    let kind = self.pm.page(pfn).map(|p| p.kind());
                    self.pins.push(g);
                    if !ok {
                        return Err(format!(
                            "a write pin of {} pinned {pfn:?}, but the entry is {pte:?}",
                            A(addr)
                        ));
                    }
                    if longterm && kind != Some(MemoryKind::System) {
                        return Err(format!("a long-term pin pinned a {kind:?} page"));
                    }
                }
            }
            Op::Unpin { k } => {
                drop(self.pins.remove(k));
            }
            Op::Hooked {
                sp,
                addr: A(addr),
                n,
                at,
                ref inner,
            } => {
                let want = self.spaces[sp].m.migrate(addr, n);
                let cpages = self.expected_cpages(sp, addr, n, true);
                let dev = self.dev.clone();
                let space = self.spaces[sp].s.clone();
                let mut inner_result = None;
                // A change of the mappings waits for the migration (it holds the map lock
                // from setup to finalize): on the migrating thread it fails, and it is
                // applied once the migration is over.
                let deferred = defers(inner, sp);
                let r = dev.migrate_to_device_with(&space, VirtAddr(addr), n, at, || {
                    inner_result = Some(if deferred {
                        self.refused_mid_migration(inner)
                    } else {
                        self.apply(inner)
                    });
                });
                let moved = expect("migration with a hook", r, &want)?;
                match (&moved, inner_result) {
                    (Some(_), None) => return Err("the hook did not run".into()),
                    (None, Some(_)) => return Err("the hook ran for a failed migration".into()),
                    (_, Some(Err(e))) => return Err(format!("in the hook: {e}")),
                    _ => {}
                }
                if let Some(moved) = moved {
                    if moved.cpages != cpages {
                        return Err(format!(
                            "migration collected {} pages, {cpages} expected",
                            moved.cpages
                        ));
                    }
                    if deferred || !unsettled(inner) {
                        if moved.migrated != cpages {
                            return Err(format!(
                                "migration migrated {} of {cpages} pages",
                                moved.migrated
                            ));
                        }
                        self.check_placed(sp, addr, n, true)?;
                    }
                    if deferred {
                        self.apply(inner)
                            .map_err(|e| format!("after the migration: {e}"))?;
                    }
                }
            }
            Op::Staged {
                sp,
                addr: A(addr),
                n,
                to_device,
                ref mid,
            } => self.staged(sp, addr, n, to_device, mid)?,
            Op::Seq(ref ops) => {
                for (k, op) in ops.iter().enumerate() {
                    self.apply(op)
                        .map_err(|e| format!("step {k} ({}): {e}", op.name()))?;
                }
            }
        }
        Ok(())
    }

    /// A migration through the raw API, with `mid` between the driver's copy and
    /// `migrate_vma_pages`.
    /// Long: the raw migration API's stages in order (setup, the driver's copy, the hook,
    /// pages, finalize), checked against the model as they go.
    fn staged(
        &mut self,
        sp: usize,
        addr: u64,
        n: usize,
        to_device: bool,
        mid: &Op,
    ) -> Result<(), String> {
        let want = self.spaces[sp].m.migrate(addr, n);
        let cpages = self.expected_cpages(sp, addr, n, to_device);
        let space = self.spaces[sp].s.clone();
        let pm = self.pm.clone();
        let dev = self.dev.clone();
        let mut src = vec![0u64; n];
        let mut dst = vec![0u64; n];
        let mut m = MigrateVma::new(
            &space,
            VirtAddr(addr),
            VirtAddr(addr + n as u64 * PAGE),
            &mut src,
            &mut dst,
        );
        m.pgmap_owner = dev.owner();
        m.flags = if to_device {
            MIGRATE_VMA_SELECT_SYSTEM
        } else {
            MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT
        };
        let r = migrate_vma_setup(&mut m);
        if expect("migrate_vma_setup", r, &want)?.is_none() {
            return Ok(());
        }
        // From here on the migration is finished whatever goes wrong (no page is left locked
        // behind a failure report); what went wrong is reported after.
        let mut wrong: Vec<String> = Vec::new();
        if m.cpages != cpages {
            wrong.push(format!(
                "migrate_vma_setup collected {} pages, {cpages} expected",
                m.cpages
            ));
        }
        // The driver: a locked destination for every collected entry, one batched copy.
        let wanted: Vec<usize> = (0..n)
            .filter(|&i| m.src[i] & MIGRATE_PFN_MIGRATE != 0)
            .collect();
        let mut pairs = Vec::new();
        // Destinations stay guarded until the copy's outcome is known.
        let mut held = Vec::new();
        if to_device && !wanted.is_empty() {
            match dev.device().alloc_pages(wanted.len(), true) {
                Ok(pfns) => {
                    for (&i, &d) in wanted.iter().zip(&pfns) {
                        match pm.claim_device_page(d, true) {
                            Ok(page) => {
                                pairs.extend(migrate_pfn_to_pfn(m.src[i]).map(|s| (s, d)));
                                held.push((i, page));
                            }
                            Err(e) => wrong.push(format!("claim_device_page: {e}")),
                        }
                    }
                }
                Err(e) => wrong.push(format!("device allocation: {e}")),
            }
        } else if !to_device {
            for &i in &wanted {
                match pm.alloc_page(true, true) {
                    Ok(page) => {
                        pairs.extend(migrate_pfn_to_pfn(m.src[i]).map(|s| (s, page.pfn())));
                        held.push((i, page));
                    }
                    Err(e) => wrong.push(format!("host allocation: {e}")),
                }
            }
        }
        if let Err(e) = dev.device().copy(&pairs).and_then(|t| t.wait()) {
            wrong.push(format!("copy: {e}"));
            // The destinations go back as their guards drop.
            drop(held);
        } else {
            for (i, page) in held {
                m.dst[i] = migrate_pfn(page.into_pfn());
            }
        }
        // The operation in the middle (a change of the mappings waits for the migration: on
        // this thread it fails, and it is applied after finalize).
        let deferred = defers(mid, sp);
        let between = if deferred {
            self.refused_mid_migration(mid)
        } else {
            self.apply(mid)
        };
        if let Err(e) = between {
            wrong.push(format!("between the stages: {e}"));
        }
        let paged = migrate_vma_pages(&mut m);
        migrate_vma_finalize(&mut m);
        if !wrong.is_empty() {
            return Err(wrong.join("; "));
        }
        expect("migrate_vma_pages", paged, &[Want::Ok])?;
        let migrated = (0..n)
            .filter(|&i| m.src[i] & MIGRATE_PFN_MIGRATE != 0)
            .count();
        if deferred || !unsettled(mid) {
            if migrated != cpages {
                return Err(format!("{migrated} of {cpages} collected pages migrated"));
            }
            self.check_placed(sp, addr, n, to_device)?;
        }
        if deferred {
            self.apply(mid)
                .map_err(|e| format!("after finalize: {e}"))?;
        }
        Ok(())
    }

    /// Runs a change of the mappings of a space whose migration this thread has in progress:
    /// it must fail (with `MigrationInProgress`, or a bad argument) and change nothing (the
    /// model is not touched).
    fn refused_mid_migration(&self, op: &Op) -> Result<(), String> {
        let r = match *op {
            Op::Munmap {
                sp,
                addr: A(addr),
                n,
            } => self.spaces[sp].s.munmap(VirtAddr(addr), n as u64 * PAGE),
            Op::Mremap {
                sp,
                addr: A(addr),
                n,
                to: A(to),
            } => self.spaces[sp]
                .s
                .mremap(VirtAddr(addr), n as u64 * PAGE, VirtAddr(to)),
            Op::Mprotect {
                sp,
                addr: A(addr),
                n,
                prot,
            } => self.spaces[sp]
                .s
                .mprotect(VirtAddr(addr), n as u64 * PAGE, prot_of(prot)),
            Op::Mmap { sp, n, prot } => self.spaces[sp]
                .s
                .mmap(None, n as u64 * PAGE, prot_of(prot), false)
                .map(|_| ()),
            Op::MmapFixed {
                sp,
                addr: A(addr),
                n,
                prot,
            } => self.spaces[sp]
                .s
                .mmap(Some(VirtAddr(addr)), n as u64 * PAGE, prot_of(prot), false)
                .map(|_| ()),
            Op::Fork { sp } => self.spaces[sp].s.fork().map(|_| ()),
            _ => unreachable!("{} does not change the mappings", op.name()),
        };
        // Bad arguments may be reported first; what matters is that nothing ran (the op is
        // checked against the model when it is applied after the migration).
        match r {
            Err(_) => Ok(()),
            Ok(()) => Err(format!(
                "{} ran mid-migration on the migrating thread (it must wait for the migration)",
                op.name()
            )),
        }
    }

    // -- checks ----------------------------------------------------------------------------

    /// Page tables against the model, after every operation.
    /// Long: one pass over every page table and page, checking each invariant against the
    /// model; the checks share the walk.
    fn check_structure(&self) -> Result<(), String> {
        let mut dev_pfns: HashSet<Pfn> = HashSet::new();
        let mut host_pfns: HashSet<Pfn> = HashSet::new();
        let owner = self.dev.owner();
        for (k, sp) in self.spaces.iter().enumerate() {
            for &a in &sp.m.touched {
                let pte = sp.s.pte(VirtAddr(a));
                let vma = sp.s.vma(VirtAddr(a));
                let Some(prot) = sp.m.prot_at(a) else {
                    if pte != Pte::None || vma.is_some() {
                        return Err(format!(
                            "space {k}: {} is unmapped, but its entry is {pte:?} and its \
                             mapping {vma:?}",
                            A(a)
                        ));
                    }
                    continue;
                };
                match &vma {
                    Some(v) if v.prot == prot => {}
                    _ => {
                        return Err(format!(
                            "space {k}: {} should be mapped {}, the mapping is {vma:?}",
                            A(a),
                            prot_name(prot)
                        ))
                    }
                }
                let (pfn, write) = match pte {
                    Pte::None => continue,
                    Pte::Present { pfn, write, .. } | Pte::DevicePrivate { pfn, write } => {
                        (pfn, write)
                    }
                    other => {
                        return Err(format!("space {k}: {} has entry {other:?}", A(a)));
                    }
                };
                let at = || format!("space {k}: {} ({pte:?})", A(a));
                let page = self
                    .pm
                    .page(pfn)
                    .ok_or_else(|| format!("{}: unknown frame", at()))?;
                if page.test(flags::ZERO) {
                    if write || matches!(pte, Pte::DevicePrivate { .. }) {
                        return Err(format!("{}: the zero page, writable", at()));
                    }
                    continue;
                }
                if page.refcount() == 0 {
                    return Err(format!("{}: maps a free page", at()));
                }
                if page.test(flags::LOCKED) {
                    return Err(format!("{}: page left locked", at()));
                }
                if write && !prot.write {
                    return Err(format!(
                        "{}: writable entry in a {} mapping",
                        at(),
                        prot_name(prot)
                    ));
                }
                if write && page.mapcount() != 1 {
                    return Err(format!(
                        "{}: writable entry of a page mapped {} times",
                        at(),
                        page.mapcount()
                    ));
                }
                let kind_ok = match pte {
                    Pte::DevicePrivate { .. } => {
                        page.kind() == MemoryKind::DevicePrivate && page.owner() == owner
                    }
                    _ => page.kind() != MemoryKind::DevicePrivate,
                };
                if !kind_ok {
                    return Err(format!("{}: entry for a {:?} page", at(), page.kind()));
                }
                if self.dev.device().owns(pfn) {
                    dev_pfns.insert(pfn);
                } else {
                    host_pfns.insert(pfn);
                }
            }
        }
        for g in &self.pins {
            for &pfn in g.pfns() {
                if self.dev.device().owns(pfn) {
                    dev_pfns.insert(pfn);
                } else {
                    host_pfns.insert(pfn);
                }
            }
        }
        let in_use = self.dev.device().pages_in_use();
        if in_use != dev_pfns.len() {
            return Err(format!(
                "{in_use} device pages in use, {} mapped or pinned",
                dev_pfns.len()
            ));
        }
        // The zero page is the one host frame nobody maps as its own.
        let frames = self.frames.in_use();
        if frames != host_pfns.len() + 1 {
            return Err(format!(
                "{frames} host frames in use, {} mapped or pinned (+ the zero page)",
                host_pfns.len()
            ));
        }
        Ok(())
    }

    /// Every byte of every mapped page, read through the page tables (nothing faults in), and
    /// the device's view of each page's state.
    fn check_bytes(&self) -> Result<(), String> {
        let owner = self.dev.owner();
        for (k, sp) in self.spaces.iter().enumerate() {
            for (&a, want) in &sp.m.pages {
                let got = self.peek(k, a)?;
                compare(&format!("space {k}, page {}", A(a)), a, &got, want)?;
            }
            for &a in &sp.m.touched {
                let state = snapshot(&sp.s, VirtAddr(a), 1, owner)[0];
                let readable = sp.m.prot_at(a).is_some_and(|p| p.read);
                if (state == PageState::Error) == readable || state == PageState::Migrating {
                    return Err(format!(
                        "space {k}: snapshot of {} says {state:?}, the model maps it {:?}",
                        A(a),
                        sp.m.prot_at(a).map(prot_name)
                    ));
                }
            }
        }
        Ok(())
    }

    /// At the end: every readable page read by the CPU and by the device.
    fn check_reads(&mut self) -> Result<(), String> {
        for k in 0..self.spaces.len() {
            let pages: Vec<u64> = self.spaces[k].m.pages.keys().copied().collect();
            for a in pages {
                if !self.spaces[k].m.prot_at(a).is_some_and(|p| p.read) {
                    continue;
                }
                let want = self.spaces[k].m.pages[&a].clone();
                let got = self
                    .dev
                    .device_read(&self.spaces[k].s, VirtAddr(a), PG)
                    .map_err(|e| format!("final device read of {}: {e}", A(a)))?;
                compare(&format!("final device read, space {k}"), a, &got, &want)?;
                let mut got = vec![0u8; PG];
                self.spaces[k]
                    .s
                    .read(VirtAddr(a), &mut got)
                    .map_err(|e| format!("final cpu read of {}: {e}", A(a)))?;
                compare(&format!("final cpu read, space {k}"), a, &got, &want)?;
            }
        }
        self.check_structure()
    }
}

/// Whether `mid`, run in the middle of a migration, leaves open where the migration's pages
/// end: unmapped, moved, evicted, or protected (the spec says only that the entries come
/// back read-only: migrated or restored) in the middle. The structure and byte checks still
/// apply; only the placement check is off.
/// True if `op` changes the mappings of space `sp` (which a migration of `sp` has locked).
fn defers(op: &Op, sp: usize) -> bool {
    match *op {
        Op::Munmap { sp: s, .. }
        | Op::Mremap { sp: s, .. }
        | Op::Mprotect { sp: s, .. }
        | Op::Mmap { sp: s, .. }
        | Op::MmapFixed { sp: s, .. }
        | Op::Fork { sp: s } => s == sp,
        _ => false,
    }
}

fn unsettled(mid: &Op) -> bool {
    matches!(
        mid,
        Op::Munmap { .. } | Op::Mremap { .. } | Op::Mprotect { .. } | Op::Evict
    )
}

fn bytes_in(rng: &mut StdRng, a: u64, n: usize) -> (u64, usize) {
    let off = if rng.random_bool(0.5) {
        0
    } else {
        rng.random_range(0..PG)
    };
    let mut len = n * PG - off;
    if rng.random_bool(0.5) {
        len -= rng.random_range(0..len.min(PG));
    }
    (a + off as u64, len.max(1))
}

fn mem_of(seed: u64) -> MemoryKind {
    if seed.is_multiple_of(2) {
        MemoryKind::DevicePrivate
    } else {
        MemoryKind::DeviceCoherent
    }
}

// ---------------------------------------------------------------------------------------
// Running seeds

/// Bugs this test found in the migration core before its fixes (all fixed), by the name
/// `HETMEM_MODEL_SKIP_KNOWN` takes (`1` or `all`: every one).
const KNOWN: [(&str, &str); 4] = [
    (
        "mmap",
        "mmap(None) does not look for a free range: it fails with AlreadyMapped in a forked \
         child, or once a fixed mmap or an mremap took the address it would pick",
    ),
    (
        "protect",
        "mprotect in the middle of a migration does not downgrade its migration entries: \
         the pages come back writable in a READ or NONE mapping",
    ),
    (
        "unmap",
        "munmap or mremap in the middle of a migration: a hole of the range still gets its \
         new page, at an address that is no longer mapped",
    ),
    (
        "cow",
        "a copy on write (CPU write, write pin, device write fault) does not invalidate \
         device mirrors: a mirror that keeps its frames reads the old one",
    ),
];

struct Failure {
    seed: u64,
    /// The failing operation's kind (`Op::name`).
    kind: String,
    index: usize,
    op: String,
    msg: String,
    tail: Vec<String>,
}

/// What each worker is doing, for the watchdog.
struct Progress {
    ticks: AtomicU64,
    current: Mutex<Vec<String>>,
}

/// Long: sets up the world, starts the workers and the watchdog, and checks every invariant at
/// the end, in that order; the parts share the world and the workers' handles.
fn run_seed(
    seed: u64,
    nops: usize,
    skip: &[&'static str],
    worker: usize,
    progress: &Progress,
) -> Option<Failure> {
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL + 1);
    let index = AtomicUsize::new(0);
    let current = Mutex::new(String::new());
    let kind = Mutex::new(String::new());
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w = World::new(seed, skip.to_vec());
        w.check_structure()
            .map_err(|e| format!("at the start: {e}"))?;
        for i in 0..nops {
            let op = w.gen(&mut rng);
            w.focus = op.target().or(w.focus);
            let shown = format!("#{i} {op:?}");
            index.store(i, Ordering::Relaxed);
            *current.lock().unwrap() = format!("{op:?}");
            *kind.lock().unwrap() = op.name();
            progress.current.lock().unwrap()[worker] = format!("seed {seed} {shown}");
            tail.push_back(shown);
            if tail.len() > TAIL {
                tail.pop_front();
            }
            w.apply(&op)?;
            w.check_structure()?;
            if (i + 1) % CHECK_EVERY == 0 {
                w.check_bytes()?;
            }
            progress.ticks.fetch_add(1, Ordering::Relaxed);
        }
        index.store(nops, Ordering::Relaxed);
        *current.lock().unwrap() = "final checks".into();
        *kind.lock().unwrap() = "final checks".into();
        w.check_bytes()?;
        w.check_reads()?;
        let World {
            frames,
            dev,
            spaces,
            pins,
            pm,
            ..
        } = w;
        drop(pins);
        drop(spaces);
        let in_use = dev.device().pages_in_use();
        if in_use != 0 {
            return Err(format!(
                "{in_use} device pages in use after dropping everything"
            ));
        }
        // The page map keeps its zero page.
        if frames.in_use() != 1 {
            return Err(format!(
                "{} host frames in use after dropping everything (the zero page is one)",
                frames.in_use()
            ));
        }
        drop((dev, pm));
        Ok(())
    }));
    let msg = match result {
        Ok(Ok(())) => return None,
        Ok(Err(e)) => e,
        Err(p) => {
            let s = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            format!("panic: {s}")
        }
    };
    let op = current.lock().map(|c| c.clone()).unwrap_or_default();
    let kind = kind.lock().map(|c| c.clone()).unwrap_or_default();
    Some(Failure {
        seed,
        kind,
        index: index.load(Ordering::Relaxed),
        op,
        msg,
        tail: tail.into(),
    })
}

fn env_num(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// Long: sets up the world, starts the workers and the watchdog, and checks every invariant at
/// the end, in that order; the parts share the world and the workers' handles.
#[test]
fn model2_differential() {
    let nseeds = env_num("HETMEM_MODEL_SEEDS").unwrap_or(200);
    let nops = env_num("HETMEM_MODEL_OPS").unwrap_or(2000) as usize;
    let skip: Vec<&'static str> = match std::env::var("HETMEM_MODEL_SKIP_KNOWN") {
        Err(_) => Vec::new(),
        Ok(v) if matches!(v.trim(), "1" | "all") => KNOWN.iter().map(|k| k.0).collect(),
        Ok(v) if matches!(v.trim(), "" | "0") => Vec::new(),
        Ok(v) => v
            .split(',')
            .map(|name| {
                KNOWN
                    .iter()
                    .map(|k| k.0)
                    .find(|&k| k == name.trim())
                    .unwrap_or_else(|| {
                        panic!("HETMEM_MODEL_SKIP_KNOWN: no known bug {name:?} (known: {KNOWN:?})")
                    })
            })
            .collect(),
    };
    let seeds: Vec<u64> = match env_num("HETMEM_MODEL_SEED") {
        Some(s) => vec![s],
        None => (0..nseeds).collect(),
    };
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4)
        .min(seeds.len().max(1));
    let progress = Progress {
        ticks: AtomicU64::new(0),
        current: Mutex::new(vec![String::new(); workers]),
    };
    let next = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let failures: Mutex<Vec<Failure>> = Mutex::new(Vec::new());
    let stats_on = std::env::var("HETMEM_MODEL_STATS").is_ok_and(|v| v.trim() == "1");
    STATS_ON.store(stats_on, Ordering::Relaxed);
    let stats: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        // A watchdog: an operation that waits forever (a page left locked, a migration entry
        // nobody finishes) is reported with what each worker was doing, then aborts.
        let watchdog = s.spawn(|| {
            let mut last = (0, Instant::now());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let t = progress.ticks.load(Ordering::Relaxed);
                if t != last.0 {
                    last = (t, Instant::now());
                } else if last.1.elapsed() > Duration::from_secs(120) {
                    eprintln!("model2: no progress for 120 s; workers are at:");
                    for c in progress.current.lock().unwrap().iter() {
                        eprintln!("  {c}");
                    }
                    std::process::abort();
                }
            }
        });
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let (seeds, next, failures, progress, stats, skip) =
                    (&seeds, &next, &failures, &progress, &stats, &skip);
                s.spawn(move || {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&seed) = seeds.get(k) else { break };
                        if let Some(f) = run_seed(seed, nops, skip, worker, progress) {
                            failures.lock().unwrap().push(f);
                        }
                    }
                    let mine = STATS.with(|s| std::mem::take(&mut *s.borrow_mut()));
                    let mut all = stats.lock().unwrap();
                    for (k, v) in mine {
                        *all.entry(k).or_default() += v;
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
        watchdog.join().unwrap();
    });
    if stats_on {
        for (k, v) in stats.into_inner().unwrap() {
            eprintln!("  {v:>9}  {k}");
        }
    }
    let mut failures = failures.into_inner().unwrap();
    failures.sort_by_key(|f| f.seed);
    eprintln!(
        "model2: {} seeds x {nops} ops{} in {:.1} s on {workers} threads: {} failed",
        seeds.len(),
        if skip.is_empty() {
            String::new()
        } else {
            format!(" (skipping known bugs {skip:?})")
        },
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    if failures.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for f in &failures {
        by_kind.entry(f.kind.clone()).or_default().push(f.seed);
    }
    for (kind, seeds) in &by_kind {
        eprintln!("  failing op {kind}: seeds {seeds:?}");
    }
    for f in failures.iter().take(6) {
        eprintln!(
            "\nseed {} ({:?}) failed at op #{}: {}\n  op: {}\n  last ops:",
            f.seed,
            mem_of(f.seed),
            f.index,
            f.msg,
            f.op
        );
        for t in &f.tail {
            eprintln!("    {t}");
        }
    }
    eprintln!("\nbug classes this test has found before (HETMEM_MODEL_SKIP_KNOWN=1, or a list of names, avoids them):");
    for (name, what) in KNOWN {
        eprintln!("  {name}: {what}");
    }
    let f = &failures[0];
    panic!(
        "model2: {} of {} seeds failed; first: seed {} at op #{}: {} \
         (reproduce with HETMEM_MODEL_SEED={})",
        failures.len(),
        seeds.len(),
        f.seed,
        f.index,
        f.msg,
        f.seed
    );
}
