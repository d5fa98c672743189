//! A test driver in the spirit of the kernel's `test_hmm` dmirror device: it mirrors address
//! spaces the way a GPU would, migrates ranges to its memory and back with one engine batch
//! per migration, snapshots page state, counts `cpages` and `faults`, and evicts itself.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hetmem::migration::*;
use hetmem::mm::{
    hmm_range_fault, snapshot, AddressSpace, DevicePagemap, FaultContext, FrameAccess, MemoryKind,
    NewPage, Page, PageMap, PageState, PagemapOps, PAGE,
};
use hetmem::{Error, Owner, Result, VirtAddr};
use hetmem_engine::{Device, EngineError, Pfn, PAGE_SIZE};
use parking_lot::Mutex;

/// What the device's pagemap callbacks share with the mirror.
struct Shared {
    device: Device,
    owner: Owner,
    faults: AtomicU64,
    /// Addresses whose next copy to or from the device fails.
    fail_addrs: Mutex<HashSet<VirtAddr>>,
    /// Pages the next migration may allocate on the device (usize::MAX: no limit).
    alloc_limit: AtomicUsize,
    /// Held while the device reads or writes frames it got from `hmm_range_fault`; an
    /// invalidation of a mirrored space takes it too, so it waits for such an access.
    mirror: Mutex<()>,
    /// Address spaces whose invalidations this device hears.
    mirrored: Mutex<HashSet<hetmem::mm::SpaceId>>,
}

/// The device's notifier: an invalidation waits for the device access in progress.
struct MirrorLock(Arc<Shared>);

impl hetmem::mm::Notifier for MirrorLock {
    fn invalidate(&self, _: hetmem::mm::SpaceId, _: &hetmem::mm::NotifyRange) {
        drop(self.0.mirror.lock());
    }
}

struct Ops(Arc<Shared>);

impl PagemapOps for Ops {
    fn page_free(&self, page: &Page) {
        if let Err(e) = self.0.device.free_page(page.pfn()) {
            panic!("page_free of {}: {e}", page.pfn());
        }
    }

    fn migrate_to_ram(&self, f: FaultContext<'_>) -> Result<()> {
        self.0.faults.fetch_add(1, Ordering::Relaxed);
        let mut src = [0u64; 1];
        let mut dst = [0u64; 1];
        let mut m = MigrateVma::new(f.space, f.addr, f.addr + PAGE, &mut src, &mut dst);
        m.pgmap_owner = self.0.owner;
        m.flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
        m.fault_page = Some(f.page.pfn());
        migrate_vma_setup(&mut m)?;
        copy_pages(&self.0, f.space.pagemap(), &mut m, Direction::ToSystem);
        migrate_vma_pages(&mut m)?;
        migrate_vma_finalize(&mut m);
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToDevice,
    ToSystem,
}

/// Allocates destinations for every `MIGRATE` entry of `m` and copies in one engine batch;
/// entries that cannot be allocated or copied get `dst = 0` (they stay where they are).
fn copy_pages(s: &Shared, pm: &PageMap, m: &mut MigrateVma<'_>, dir: Direction) {
    let want: Vec<usize> = (0..m.npages)
        .filter(|&i| m.src[i] & MIGRATE_PFN_MIGRATE != 0)
        .collect();
    let limit = s.alloc_limit.load(Ordering::Relaxed);
    let want = &want[..want.len().min(limit)];
    // Destinations are held as guards until the copy's outcome is known: those that
    // failed are given back, the others go to the migration.
    let dsts: Vec<NewPage<'_>> = match dir {
        Direction::ToDevice => match s.device.alloc_pages(want.len(), true) {
            Ok(v) => v
                .into_iter()
                .map(|d| pm.claim_device_page(d, true).expect("fresh device page"))
                .collect(),
            Err(_) => return,
        },
        Direction::ToSystem => {
            let mut v = Vec::with_capacity(want.len());
            for _ in want {
                match pm.alloc_page(true, true) {
                    Ok(p) => v.push(p),
                    Err(_) => break,
                }
            }
            v
        }
    };
    let mut pairs = Vec::new();
    let mut idx = Vec::new();
    let mut held = Vec::with_capacity(dsts.len());
    for (&i, page) in want.iter().zip(dsts) {
        if let Some(src) = migrate_pfn_to_pfn(m.src[i]) {
            pairs.push((src, page.pfn()));
            idx.push(i);
        }
        held.push((i, page));
    }
    let fail: Vec<Pfn> = {
        let f = s.fail_addrs.lock();
        idx.iter()
            .zip(&pairs)
            .filter(|(&i, _)| f.contains(&m.addr(i)))
            .map(|(_, p)| p.1)
            .collect()
    };
    s.device.inject_copy_failures(&fail);
    let result = s.device.copy(&pairs).and_then(|t| t.wait());
    s.device.inject_copy_failures(&[]);
    let failed: Vec<usize> = match result {
        Ok(()) => Vec::new(),
        Err(EngineError::CopyFailed { failed, .. }) => failed,
        Err(_) => (0..pairs.len()).collect(),
    };
    let failed: HashSet<usize> = failed.into_iter().map(|k| idx[k]).collect();
    for (i, page) in held {
        if failed.contains(&i) {
            m.dst[i] = 0;
            drop(page);
        } else {
            m.dst[i] = migrate_pfn(page.into_pfn());
        }
    }
}

/// The test device.
/// Where in a migration [`Dmirror::migrate_to_device_with`] runs its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Between {
    /// After `migrate_vma_setup`, before the copy.
    SetupAndCopy,
    /// After `migrate_vma_pages`, before `migrate_vma_finalize`.
    PagesAndFinalize,
}

/// The test driver (the kernel's `test_hmm` dmirror in userspace): pages of an engine
/// `Device`, migrations through `migrate_vma_*`, and mirror reads through `hmm_range_fault`.
pub struct Dmirror {
    shared: Arc<Shared>,
    /// The page map the mirror's address spaces live in.
    pub pagemap: Arc<PageMap>,
    /// The registered device pagemap.
    pub pgmap: DevicePagemap,
    /// `cpages` of the last migration.
    pub cpages: AtomicUsize,
}

static NEXT_OWNER: AtomicU64 = AtomicU64::new(0x1000);

/// What a migration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    /// Entries collected by setup (holes included).
    pub cpages: usize,
    /// Entries that ended migrated.
    pub migrated: usize,
}

impl Dmirror {
    /// Registers `device`'s memory in `pagemap` as `kind` with a fresh owner.
    pub fn new(device: Device, kind: MemoryKind, pagemap: &Arc<PageMap>) -> Dmirror {
        let owner = Owner(NEXT_OWNER.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(Shared {
            device: device.clone(),
            owner,
            faults: AtomicU64::new(0),
            fail_addrs: Mutex::new(HashSet::new()),
            alloc_limit: AtomicUsize::new(usize::MAX),
            mirror: Mutex::new(()),
            mirrored: Mutex::new(HashSet::new()),
        });
        let access: Option<Arc<dyn FrameAccess>> =
            (kind == MemoryKind::DeviceCoherent).then(|| Arc::new(device.clone()) as _);
        let pgmap = pagemap
            .register_device(
                device.pfn_range(),
                kind,
                owner,
                Arc::new(Ops(shared.clone())),
                access,
            )
            .expect("register device pagemap");
        Dmirror {
            shared,
            pagemap: pagemap.clone(),
            pgmap,
            cpages: AtomicUsize::new(0),
        }
    }

    /// The engine device.
    pub fn device(&self) -> &Device {
        &self.shared.device
    }
    /// The pagemap owner.
    pub fn owner(&self) -> Owner {
        self.shared.owner
    }
    /// CPU faults the device has served.
    pub fn faults(&self) -> u64 {
        self.shared.faults.load(Ordering::Relaxed)
    }
    /// Makes the next copies of these addresses fail.
    pub fn fail_copies_at(&self, addrs: &[VirtAddr]) {
        *self.shared.fail_addrs.lock() = addrs.iter().copied().collect();
    }
    /// Limits how many pages the next migrations may allocate (None: no limit).
    pub fn limit_allocations(&self, n: Option<usize>) {
        self.shared
            .alloc_limit
            .store(n.unwrap_or(usize::MAX), Ordering::Relaxed);
    }

    fn flags_to_device(&self) -> u32 {
        MIGRATE_VMA_SELECT_SYSTEM
    }

    /// Migrates `npages` pages from `addr` to the device.
    pub fn migrate_to_device(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Moved> {
        self.migrate(
            space,
            addr,
            npages,
            self.flags_to_device(),
            Direction::ToDevice,
            None,
        )
    }

    /// Migrates this device's pages of `npages` pages from `addr` back to system memory.
    pub fn migrate_to_system(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
    ) -> Result<Moved> {
        let flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE | MIGRATE_VMA_SELECT_DEVICE_COHERENT;
        self.migrate(space, addr, npages, flags, Direction::ToSystem, None)
    }

    /// As [`Dmirror::migrate_to_device`], running `hook` at point `at` of the migration (a
    /// fork, an unmap, another thread's access: whatever may meet pages under migration).
    pub fn migrate_to_device_with(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
        at: Between,
        hook: impl FnOnce(),
    ) -> Result<Moved> {
        self.migrate(
            space,
            addr,
            npages,
            self.flags_to_device(),
            Direction::ToDevice,
            Some((at, Box::new(hook))),
        )
    }

    fn migrate(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        npages: usize,
        flags: u32,
        dir: Direction,
        hook: Option<(Between, Box<dyn FnOnce() + '_>)>,
    ) -> Result<Moved> {
        let (early, late) = match hook {
            Some((Between::SetupAndCopy, f)) => (Some(f), None),
            Some((Between::PagesAndFinalize, f)) => (None, Some(f)),
            None => (None, None),
        };
        let mut src = vec![0u64; npages];
        let mut dst = vec![0u64; npages];
        let mut m = MigrateVma::new(space, addr, addr + npages as u64 * PAGE, &mut src, &mut dst);
        m.pgmap_owner = self.owner();
        m.flags = flags;
        migrate_vma_setup(&mut m)?;
        let cpages = m.cpages;
        self.cpages.store(cpages, Ordering::Relaxed);
        if let Some(f) = early {
            f();
        }
        copy_pages(&self.shared, &self.pagemap, &mut m, dir);
        migrate_vma_pages(&mut m)?;
        let migrated = (0..npages)
            .filter(|&i| m.src[i] & MIGRATE_PFN_MIGRATE != 0 && m.dst[i] & MIGRATE_PFN_VALID != 0)
            .count();
        if let Some(f) = late {
            f();
        }
        migrate_vma_finalize(&mut m);
        Ok(Moved { cpages, migrated })
    }

    /// Reads `len` bytes at `addr` as the device would: through `hmm_range_fault`, reading its
    /// own pages in place and host pages where they are.
    pub fn device_read(&self, space: &AddressSpace, addr: VirtAddr, len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        self.device_access(space, addr, len, false, |dev, pm, pfn, off, range| {
            if dev.owns(pfn) {
                dev.read_page(pfn, off, &mut out[range])
                    .map_err(Error::from)
            } else {
                pm.read_frame(pfn, off, &mut out[range])
            }
        })?;
        Ok(out)
    }

    /// Writes `data` at `addr` as the device would.
    pub fn device_write(&self, space: &AddressSpace, addr: VirtAddr, data: &[u8]) -> Result<()> {
        self.device_access(space, addr, data.len(), true, |dev, pm, pfn, off, range| {
            if dev.owns(pfn) {
                dev.write_page(pfn, off, &data[range]).map_err(Error::from)
            } else {
                pm.write_frame(pfn, off, &data[range])
            }
        })
    }

    fn device_access(
        &self,
        space: &AddressSpace,
        addr: VirtAddr,
        len: usize,
        write: bool,
        mut f: impl FnMut(&Device, &PageMap, Pfn, usize, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let start = addr.page_down();
        let npages = ((addr + len as u64).get().div_ceil(PAGE) * PAGE - start.get()) / PAGE;
        self.mirror_space(space);
        loop {
            // As a real mirror does: the view is built between read_begin and read_retry,
            // and used under the lock that this device's notifier takes, so an invalidation
            // waits until the access that used the old frames is over.
            let seq = space.read_begin();
            let pfns = hmm_range_fault(space, start, npages as usize, write, self.owner())?;
            let _g = self.shared.mirror.lock();
            if space.read_retry(seq) {
                continue;
            }
            let mut done = 0usize;
            let mut k = 0usize;
            while done < len {
                let at = addr + done as u64;
                let off = at.page_offset() as usize;
                let n = (PAGE_SIZE - off).min(len - done);
                f(
                    self.device(),
                    &self.pagemap,
                    pfns[k].pfn,
                    off,
                    done..done + n,
                )?;
                done += n;
                k += 1;
            }
            return Ok(());
        }
    }

    /// Registers this device's notifier on `space` once.
    fn mirror_space(&self, space: &AddressSpace) {
        if self.shared.mirrored.lock().insert(space.id()) {
            space.register_notifier(Arc::new(MirrorLock(self.shared.clone())));
        }
    }

    /// Per-page state as this device sees it.
    pub fn snapshot(&self, space: &AddressSpace, addr: VirtAddr, npages: usize) -> Vec<PageState> {
        snapshot(space, addr, npages, self.owner())
    }

    /// Evicts every page of the device to system memory with `migrate_device_range` (the raw
    /// calls: the kernel's protocol as a driver writes it). If host frames run out or the copy
    /// fails, every collected page is restored and the error returned.
    pub fn evict_all(&self) -> Result<usize> {
        let range = self.pgmap.range;
        let n = range.count as usize;
        let mut src = vec![0u64; n];
        migrate_device_range(&self.pagemap, &mut src, range.start, n)?;
        let mut dst = vec![0u64; n];
        let mut pairs = Vec::new();
        let mut held = Vec::new();
        let mut failed = None;
        for (i, &w) in src.iter().enumerate() {
            if w & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            match self.pagemap.alloc_page(false, true) {
                Ok(page) => {
                    pairs.push((migrate_pfn_to_pfn(w).expect("collected"), page.pfn()));
                    held.push((i, page));
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if failed.is_none() {
            if let Err(e) = self.device().copy(&pairs).and_then(|t| t.wait()) {
                failed = Some(e.into());
            }
        }
        if failed.is_none() {
            for (i, page) in held {
                dst[i] = migrate_pfn(page.into_pfn());
            }
        } else {
            // Nothing moves: the destinations go back (the guards drop), finalize restores
            // every page.
            drop(held);
        }
        migrate_device_pages(&self.pagemap, &mut src, &dst)?;
        let moved = (0..n)
            .filter(|&i| src[i] & MIGRATE_PFN_MIGRATE != 0)
            .count();
        migrate_device_finalize(&self.pagemap, &mut src, &mut dst);
        match failed {
            Some(e) => Err(e),
            None => Ok(moved),
        }
    }
}
