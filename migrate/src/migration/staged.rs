//! The owning migration types: [`Migration`] over `migrate_vma_*` and [`DeviceMigration`]
//! over `migrate_device_*`. Each owns its `src`/`dst` arrays, the map lock between stages and
//! the copy in flight; the stages run in order or not at all, and a migration dropped at any
//! point leaves every page in one valid place, unlocked:
//!
//! - dropped [`Collected`]: nothing migrates; every page is restored and the destinations
//!   the driver named are released;
//! - dropped [`InFlight`]: the copy is waited for first (the device may still be writing the
//!   destinations), then as for `Collected`;
//! - dropped [`Copied`]: the migration completes, as `finalize` would.
//!
//! ```compile_fail
//! # fn f(m: hetmem::migration::Migration<'_, hetmem::migration::Collected>) {
//! m.finalize(); // a collected migration must be copied first
//! # }
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use hetmem_engine::{EngineError, Pfn, Ticket};

use super::device::{device_pages_stage, migrate_device_pfns};
use super::finalize::{finalize, resolve};
use super::pfn::*;
use super::vma::{abandon, pages_stage, setup_holding, Collect, Held, MigrateVma, Stage};
use crate::error::{Error, Result};
use crate::mm::space::MapHold;
use crate::mm::{AddressSpace, Owner, PageMap, VirtAddr, Vma, PAGE};

/// State: pages are collected, locked and unmapped; the driver fills destinations, then
/// copies ([`Migration::submit`]) or says it has copied ([`Migration::copied`]).
pub struct Collected;
/// State: the copy is in flight on the device; [`Migration::wait`] waits for it.
pub struct InFlight;
/// State: the copy is done and the pages stage has run; finalizing (or dropping) completes
/// the migration.
pub struct Copied;

/// What a finished migration did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Entries collected by setup (holes included).
    pub cpages: usize,
    /// Entries that moved.
    pub migrated: usize,
    /// Entries whose copy failed (they stayed where they were).
    pub failed: usize,
    /// The copy failed because the device was lost (every entry of it stayed where it
    /// was): a caller reports [`crate::ErrorKind::DeviceLost`] rather than a count.
    pub device_lost: bool,
}

/// A copy submitted for a migration: its ticket (or the error that kept it from being
/// submitted) and, for each of its pairs, the entry it belongs to.
struct Copy {
    ticket: std::result::Result<Ticket, EngineError>,
    entries: Vec<usize>,
}

/// The parts both owning types share: the arrays and the copy.
struct Arrays {
    src: Vec<u64>,
    dst: Vec<u64>,
    copy: Option<Copy>,
    failed: usize,
    /// The copy's error was a lost device.
    device_lost: bool,
}

impl Arrays {
    /// The copy pairs: (source, destination) of every collected entry that has both (holes
    /// have no source: the driver gave them zeroed pages), with the entry of each.
    fn pairs(&self) -> (Vec<(Pfn, Pfn)>, Vec<usize>) {
        let mut pairs = Vec::new();
        let mut entries = Vec::new();
        for (i, (&s, &d)) in self.src.iter().zip(&self.dst).enumerate() {
            if s & MIGRATE_PFN_MIGRATE == 0 {
                continue;
            }
            if let (Some(s), Some(d)) = (migrate_pfn_to_pfn(s), migrate_pfn_to_pfn(d)) {
                pairs.push((s, d));
                entries.push(i);
            }
        }
        (pairs, entries)
    }

    fn submit(
        &mut self,
        copy: impl FnOnce(&[(Pfn, Pfn)]) -> std::result::Result<Ticket, EngineError>,
    ) {
        let (pairs, entries) = self.pairs();
        let ticket = copy(&pairs);
        self.copy = Some(Copy { ticket, entries });
    }

    /// Waits for the copy; the destinations of pairs that failed are released and forgotten,
    /// so those entries stay where they were. Returns the copy's error, if any.
    fn wait(&mut self, pm: &PageMap) -> Option<EngineError> {
        let c = self.copy.take()?;
        let err = c.ticket.and_then(|t| t.wait()).err()?;
        self.device_lost |= matches!(err, EngineError::DeviceLost(_));
        let failed: Vec<usize> = match &err {
            EngineError::CopyFailed { failed, .. } => failed.clone(),
            _ => (0..c.entries.len()).collect(),
        };
        for k in failed {
            let Some(&i) = c.entries.get(k) else { continue };
            if let Some(p) = migrate_pfn_to_page(pm, self.dst[i]) {
                p.unlock();
                pm.put_page(p);
            }
            self.dst[i] = 0;
            self.failed += 1;
        }
        Some(err)
    }

    fn migrated(&self) -> usize {
        self.src
            .iter()
            .zip(&self.dst)
            .filter(|(&s, &d)| s & MIGRATE_PFN_MIGRATE != 0 && d & MIGRATE_PFN_VALID != 0)
            .count()
    }

    /// Entries that migrate (after the pages stage): index and destination.
    fn moving(&self) -> impl Iterator<Item = (usize, Pfn)> + '_ {
        self.src
            .iter()
            .zip(&self.dst)
            .enumerate()
            .filter(|(_, (&s, _))| s & MIGRATE_PFN_MIGRATE != 0)
            .filter_map(|(i, (_, &d))| Some((i, migrate_pfn_to_pfn(d)?)))
    }
}

/// A migration of one range of one mapping, in state `S` (see the module docs).
pub struct Migration<'a, S> {
    space: &'a AddressSpace,
    start: VirtAddr,
    owner: Owner,
    flags: u32,
    fault_page: Option<Pfn>,
    cpages: usize,
    arrays: Arrays,
    /// The space's map lock, held from setup to finalize.
    map: Option<MapHold<'a>>,
    vma: Option<Arc<Vma>>,
    stage: Stage,
    /// The pages setup collected and the destinations the pages stage took, by entry.
    src_pages: Collect<'a>,
    dst_pages: Collect<'a>,
    _state: PhantomData<S>,
}

impl<'a> Migration<'a, Collected> {
    /// Runs `migrate_vma_setup` over `[start, end)` with the selection `flags` and `owner`.
    /// The migration holds the space's map lock until it is finalized or dropped (see
    /// [`crate::migration::migrate_vma_setup`]). A range mapped for CPU pointers (an offload
    /// buffer's) is refused with [`Error::InvalidArgument`], as `migrate_vma_setup` refuses
    /// it: its pages move only through its buffer.
    pub fn setup(
        space: &'a AddressSpace,
        start: VirtAddr,
        end: VirtAddr,
        flags: u32,
        owner: Owner,
        fault_page: Option<Pfn>,
    ) -> Result<Self> {
        Self::setup_checked(space, start, end, flags, owner, fault_page, false)
    }

    /// [`Migration::setup`] for the crate's own migrations, which may move the pages of a
    /// range mapped for CPU pointers (`homed`: the caller keeps the pointer mapping in step).
    pub(crate) fn setup_checked(
        space: &'a AddressSpace,
        start: VirtAddr,
        end: VirtAddr,
        flags: u32,
        owner: Owner,
        fault_page: Option<Pfn>,
        homed: bool,
    ) -> Result<Self> {
        let n = (end.get().saturating_sub(start.get()) / PAGE) as usize;
        let mut src = vec![0; n];
        let mut dst = vec![0; n];
        let mut m = MigrateVma::new(space, start, end, &mut src, &mut dst);
        m.pgmap_owner = owner;
        m.flags = flags;
        m.fault_page = fault_page;
        let (map, vma, src_pages) = setup_holding(&mut m, space, homed)?;
        let cpages = m.cpages;
        drop(m);
        Ok(Migration {
            space,
            start,
            owner,
            flags,
            fault_page,
            cpages,
            arrays: Arrays {
                src,
                dst,
                copy: None,
                failed: 0,
                device_lost: false,
            },
            map: Some(map),
            vma: Some(vma),
            stage: Stage::SetUp,
            src_pages,
            dst_pages: Vec::new(),
            _state: PhantomData,
        })
    }

    /// The entries to migrate: index and source page (`None` for a hole).
    pub fn collected(&self) -> impl Iterator<Item = (usize, Option<Pfn>)> + '_ {
        self.arrays
            .src
            .iter()
            .enumerate()
            .filter(|(_, &w)| w & MIGRATE_PFN_MIGRATE != 0)
            .map(|(i, &w)| (i, migrate_pfn_to_pfn(w)))
    }

    /// Destination words for the driver to fill (`migrate_pfn` of a locked page, or 0). A
    /// hole's destination must already read as zeros.
    pub fn dst_mut(&mut self) -> &mut [u64] {
        &mut self.arrays.dst
    }

    /// The copies the destinations call for: (source, destination) of every collected page
    /// that has a destination (holes have no source).
    pub fn pairs(&self) -> Vec<(Pfn, Pfn)> {
        self.arrays.pairs().0
    }

    /// Hands the copy of [`Migration::pairs`] to `copy` (for example
    /// `|p| device.copy_queued(p)`), which returns its ticket; the migration owns the ticket
    /// from here. An error from `copy` counts as every pair failing.
    pub fn submit(
        mut self,
        copy: impl FnOnce(&[(Pfn, Pfn)]) -> std::result::Result<Ticket, EngineError>,
    ) -> Migration<'a, InFlight> {
        self.arrays.submit(copy);
        self.into_state()
    }

    /// For a driver that has copied by itself (synchronously): runs `migrate_vma_pages`. On
    /// error (a bad destination) the migration is dropped, which restores every page.
    pub fn copied(self) -> Result<Migration<'a, Copied>> {
        self.pages()
    }
}

impl<'a> Migration<'a, InFlight> {
    /// True once the copy has finished (or failed); does not block.
    pub fn is_done(&self) -> bool {
        match &self.arrays.copy {
            Some(Copy { ticket: Ok(t), .. }) => t.is_done().unwrap_or(true),
            _ => true,
        }
    }

    /// Waits for the copy, then runs `migrate_vma_pages`. Pages whose copy failed stay where
    /// they were (counted in [`Outcome::failed`]). Fails only on a bad destination, with
    /// every page restored.
    pub fn wait(mut self) -> Result<Migration<'a, Copied>> {
        let pm = self.space.pagemap().clone();
        if let Some(e) = self.arrays.wait(&pm) {
            tracing::debug!("migration copy failed: {e}");
        }
        self.pages()
    }
}

impl<'a, S> Migration<'a, S> {
    /// Source words as setup left them.
    pub fn src(&self) -> &[u64] {
        &self.arrays.src
    }
    /// Destination words.
    pub fn dst(&self) -> &[u64] {
        &self.arrays.dst
    }
    /// Entries collected by setup.
    pub fn cpages(&self) -> usize {
        self.cpages
    }
    /// The address of entry `i`.
    pub fn addr(&self, i: usize) -> VirtAddr {
        self.start + i as u64 * PAGE
    }

    fn into_state<T>(mut self) -> Migration<'a, T> {
        let next = Migration {
            space: self.space,
            start: self.start,
            owner: self.owner,
            flags: self.flags,
            fault_page: self.fault_page,
            cpages: self.cpages,
            arrays: Arrays {
                src: std::mem::take(&mut self.arrays.src),
                dst: std::mem::take(&mut self.arrays.dst),
                copy: self.arrays.copy.take(),
                failed: self.arrays.failed,
                device_lost: self.arrays.device_lost,
            },
            map: self.map.take(),
            vma: self.vma.take(),
            stage: self.stage,
            src_pages: std::mem::take(&mut self.src_pages),
            dst_pages: std::mem::take(&mut self.dst_pages),
            _state: PhantomData,
        };
        self.stage = Stage::Idle;
        next
    }

    /// Runs a stage function of `vma.rs` over this migration's arrays.
    fn with_vma<R>(&mut self, f: impl FnOnce(&mut MigrateVma<'_>) -> R) -> R {
        let end = self.start + self.arrays.src.len() as u64 * PAGE;
        let mut m = MigrateVma::new(
            self.space,
            self.start,
            end,
            &mut self.arrays.src,
            &mut self.arrays.dst,
        );
        m.pgmap_owner = self.owner;
        m.flags = self.flags;
        m.fault_page = self.fault_page;
        m.cpages = self.cpages;
        m.npages = m.src.len();
        m.held = Held {
            map: None,
            vma: self.vma.clone(),
            stage: self.stage,
            src_pages: Vec::new(),
            dst_pages: Vec::new(),
            at: Some((self.space, self.start, self.fault_page)),
        };
        let r = f(&mut m);
        self.stage = m.held.stage;
        // The stage is recorded here: the temporary must not finalize on drop.
        m.held.stage = Stage::Idle;
        r
    }

    fn pages(mut self) -> Result<Migration<'a, Copied>> {
        let space = self.space;
        let src_pages = std::mem::take(&mut self.src_pages);
        let done = self.with_vma(|m| pages_stage(m, space, &src_pages));
        self.src_pages = src_pages;
        self.dst_pages = done?;
        Ok(self.into_state())
    }

    /// Finalizes whatever state the migration is in (see the module docs).
    fn finish(&mut self) -> Outcome {
        if self.stage == Stage::Idle {
            return Outcome::default();
        }
        let space: &'a AddressSpace = self.space;
        let pm = space.pagemap();
        if self.arrays.copy.is_some() {
            let _ = self.arrays.wait(pm);
        }
        if self.stage == Stage::SetUp {
            abandon(pm, &mut self.arrays.src, &mut self.arrays.dst);
            self.dst_pages = resolve(pm, &self.arrays.dst);
        }
        let migrated = self.arrays.migrated();
        finalize(
            pm,
            &self.arrays.src,
            &self.src_pages,
            &self.dst_pages,
            self.fault_page,
            Some((self.space, self.start)),
        );
        self.stage = Stage::Idle;
        self.map = None;
        Outcome {
            cpages: self.cpages,
            migrated,
            failed: self.arrays.failed,
            device_lost: self.arrays.device_lost,
        }
    }
}

impl Migration<'_, Copied> {
    /// The entries that migrate when finalized: index and destination page.
    pub fn moving(&self) -> impl Iterator<Item = (usize, Pfn)> + '_ {
        self.arrays.moving()
    }

    /// Runs `migrate_vma_finalize`; the map lock is released.
    pub fn finalize(mut self) -> Outcome {
        self.finish()
    }
}

impl<S> Drop for Migration<'_, S> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A migration of device pages by frame number (`migrate_device_*`: eviction, device
/// removal), in state `S`. Same stages and drop rules as [`Migration`]; it holds no map lock
/// (device pages may be mapped in several address spaces, which keep changing meanwhile:
/// finalize finds their entries through the reverse map).
pub struct DeviceMigration<'p, S> {
    pm: &'p PageMap,
    cpages: usize,
    arrays: Arrays,
    stage: Stage,
    /// The sources and the destinations the pages stage looked up and took, by entry
    /// (empty before it ran).
    pages: (Collect<'p>, Collect<'p>),
    _state: PhantomData<S>,
}

impl<'p> DeviceMigration<'p, Collected> {
    /// Collects the device pages `start..start + npages` (`migrate_device_range`).
    pub fn range(pm: &'p PageMap, start: Pfn, npages: usize) -> Result<Self> {
        if npages == 0 {
            return Self::pfns(pm, &[]);
        }
        // Both ends must be pages of the map before anything is built: the range is the
        // caller's, and `start + npages` may wrap or name more pages than exist.
        let last = start
            .0
            .checked_add(npages as u64 - 1)
            .ok_or(Error::InvalidArgument("device pfn range out of bounds"))?;
        pm.page_or_err(start)?;
        pm.page_or_err(Pfn(last))?;
        let pfns: Vec<Pfn> = (0..npages as u64).map(|i| start.add(i)).collect();
        Self::pfns(pm, &pfns)
    }

    /// Collects the given device pages (`migrate_device_pfns`).
    pub fn pfns(pm: &'p PageMap, pfns: &[Pfn]) -> Result<Self> {
        let mut src: Vec<u64> = pfns.iter().map(|&p| migrate_pfn(p)).collect();
        let cpages = migrate_device_pfns(pm, &mut src)?;
        let n = src.len();
        Ok(DeviceMigration {
            pm,
            cpages,
            arrays: Arrays {
                src,
                dst: vec![0; n],
                copy: None,
                failed: 0,
                device_lost: false,
            },
            stage: Stage::SetUp,
            pages: Default::default(),
            _state: PhantomData,
        })
    }

    /// The collected entries: index and device page.
    pub fn collected(&self) -> impl Iterator<Item = (usize, Pfn)> + '_ {
        self.arrays
            .src
            .iter()
            .enumerate()
            .filter(|(_, &w)| w & MIGRATE_PFN_MIGRATE != 0)
            .filter_map(|(i, &w)| Some((i, migrate_pfn_to_pfn(w)?)))
    }

    /// Destination words for the driver to fill (`migrate_pfn` of a locked page, or 0).
    pub fn dst_mut(&mut self) -> &mut [u64] {
        &mut self.arrays.dst
    }

    /// The copies the destinations call for.
    pub fn pairs(&self) -> Vec<(Pfn, Pfn)> {
        self.arrays.pairs().0
    }

    /// Hands the copy to `copy`, which returns its ticket (see [`Migration::submit`]).
    pub fn submit(
        mut self,
        copy: impl FnOnce(&[(Pfn, Pfn)]) -> std::result::Result<Ticket, EngineError>,
    ) -> DeviceMigration<'p, InFlight> {
        self.arrays.submit(copy);
        self.into_state()
    }

    /// For a driver that has copied by itself: runs `migrate_device_pages`.
    pub fn copied(self) -> Result<DeviceMigration<'p, Copied>> {
        self.pages()
    }
}

impl<'p> DeviceMigration<'p, InFlight> {
    /// Waits for the copy, then runs `migrate_device_pages` (failed pages stay).
    pub fn wait(mut self) -> Result<DeviceMigration<'p, Copied>> {
        if let Some(e) = self.arrays.wait(self.pm) {
            tracing::debug!("device migration copy failed: {e}");
        }
        self.pages()
    }
}

impl<'p, S> DeviceMigration<'p, S> {
    /// Source words.
    pub fn src(&self) -> &[u64] {
        &self.arrays.src
    }
    /// Destination words.
    pub fn dst(&self) -> &[u64] {
        &self.arrays.dst
    }
    /// Pages collected.
    pub fn cpages(&self) -> usize {
        self.cpages
    }

    fn into_state<T>(mut self) -> DeviceMigration<'p, T> {
        let next = DeviceMigration {
            pm: self.pm,
            cpages: self.cpages,
            arrays: Arrays {
                src: std::mem::take(&mut self.arrays.src),
                dst: std::mem::take(&mut self.arrays.dst),
                copy: self.arrays.copy.take(),
                failed: self.arrays.failed,
                device_lost: self.arrays.device_lost,
            },
            stage: self.stage,
            pages: std::mem::take(&mut self.pages),
            _state: PhantomData,
        };
        self.stage = Stage::Idle;
        next
    }

    fn pages(mut self) -> Result<DeviceMigration<'p, Copied>> {
        self.pages = device_pages_stage(self.pm, &mut self.arrays.src, &self.arrays.dst)?;
        self.stage = Stage::Paged;
        Ok(self.into_state())
    }

    fn finish(&mut self) -> Outcome {
        if self.stage == Stage::Idle {
            return Outcome::default();
        }
        if self.arrays.copy.is_some() {
            let _ = self.arrays.wait(self.pm);
        }
        if self.stage == Stage::SetUp {
            abandon(self.pm, &mut self.arrays.src, &mut self.arrays.dst);
            let (src, dst) = (&self.arrays.src, &self.arrays.dst);
            self.pages = (resolve(self.pm, src), resolve(self.pm, dst));
        }
        let migrated = self.arrays.migrated();
        let (old, new) = &self.pages;
        finalize(self.pm, &self.arrays.src, old, new, None, None);
        self.stage = Stage::Idle;
        Outcome {
            cpages: self.cpages,
            migrated,
            failed: self.arrays.failed,
            device_lost: self.arrays.device_lost,
        }
    }
}

impl DeviceMigration<'_, Copied> {
    /// The entries that migrate when finalized: index and destination page.
    pub fn moving(&self) -> impl Iterator<Item = (usize, Pfn)> + '_ {
        self.arrays.moving()
    }

    /// Runs `migrate_device_finalize`.
    pub fn finalize(mut self) -> Outcome {
        self.finish()
    }
}

impl<S> Drop for DeviceMigration<'_, S> {
    fn drop(&mut self) {
        self.finish();
    }
}
