//! A typestate wrapper over `migrate_vma_*`: the stages run in order or not at all, and a
//! migration dropped before it finishes restores every page.
//!
//! ```compile_fail
//! # fn f(m: hetmem::migration::Migration<'_, hetmem::migration::Collected>) {
//! m.finalize(); // a collected migration must be copied first
//! # }
//! ```

use std::marker::PhantomData;
use std::sync::Arc;

use hetmem_engine::Pfn;

use super::pfn::*;
use super::vma::{finalize, migrate_vma_pages, migrate_vma_setup, MigrateVma};
use crate::error::Result;
use crate::mm::page::flags;
use crate::mm::{AddressSpace, Vma};

/// State: pages are collected, locked and unmapped; the driver fills destinations and copies.
pub struct Collected;
/// State: destinations are in place; finalizing (or dropping) completes the migration.
pub struct Copied;

/// A migration of one range in state `S`.
pub struct Migration<'a, S> {
    space: &'a AddressSpace,
    start: u64,
    src: Vec<u64>,
    dst: Vec<u64>,
    fault_page: Option<Pfn>,
    cpages: usize,
    vma: Option<Arc<Vma>>,
    finished: bool,
    _state: PhantomData<S>,
}

/// What a finished migration did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Entries collected by setup (holes included).
    pub cpages: usize,
    /// Entries that moved.
    pub migrated: usize,
}

impl<'a> Migration<'a, Collected> {
    /// Runs `migrate_vma_setup` over `[start, end)` with the selection `flags` and `owner`.
    pub fn setup(
        space: &'a AddressSpace,
        start: u64,
        end: u64,
        flags: u32,
        owner: u64,
        fault_page: Option<Pfn>,
    ) -> Result<Self> {
        let n = (end.saturating_sub(start) / crate::mm::PAGE) as usize;
        let mut src = vec![0; n];
        let mut dst = vec![0; n];
        let mut m = MigrateVma::new(space, start, end, &mut src, &mut dst);
        m.pgmap_owner = owner;
        m.flags = flags;
        m.fault_page = fault_page;
        migrate_vma_setup(&mut m)?;
        let (cpages, vma) = (m.cpages, m.vma());
        Ok(Migration {
            space,
            start,
            src,
            dst,
            fault_page,
            cpages,
            vma,
            finished: false,
            _state: PhantomData,
        })
    }

    /// The entries to migrate: index and source page (`None` for a hole).
    pub fn collected(&self) -> impl Iterator<Item = (usize, Option<Pfn>)> + '_ {
        self.src
            .iter()
            .enumerate()
            .filter(|(_, &w)| w & MIGRATE_PFN_MIGRATE != 0)
            .map(|(i, &w)| (i, migrate_pfn_to_pfn(w)))
    }

    /// Destination words for the driver to fill (`migrate_pfn` of a locked page, or 0).
    pub fn dst_mut(&mut self) -> &mut [u64] {
        &mut self.dst
    }

    /// Runs `migrate_vma_pages`. On error (a bad destination) the migration is dropped,
    /// which restores every page.
    pub fn copied(mut self) -> Result<Migration<'a, Copied>> {
        let end = self.start + self.src.len() as u64 * crate::mm::PAGE;
        let mut m = MigrateVma::resume(
            self.space,
            self.start,
            end,
            &mut self.src,
            &mut self.dst,
            self.fault_page,
            self.vma.clone(),
        );
        migrate_vma_pages(&mut m)?;
        let next = Migration {
            space: self.space,
            start: self.start,
            src: std::mem::take(&mut self.src),
            dst: std::mem::take(&mut self.dst),
            fault_page: self.fault_page,
            cpages: self.cpages,
            vma: self.vma.take(),
            finished: false,
            _state: PhantomData,
        };
        self.finished = true;
        Ok(next)
    }
}

impl<S> Migration<'_, S> {
    /// Source words as setup left them.
    pub fn src(&self) -> &[u64] {
        &self.src
    }
    /// Entries collected by setup.
    pub fn cpages(&self) -> usize {
        self.cpages
    }

    fn finish(&mut self) -> Outcome {
        self.finished = true;
        let pm = self.space.pagemap().clone();
        let migrated = (0..self.src.len())
            .filter(|&i| {
                self.src[i] & MIGRATE_PFN_MIGRATE != 0 && self.dst[i] & MIGRATE_PFN_VALID != 0
            })
            .count();
        finalize(
            &pm,
            &mut self.src,
            &self.dst,
            self.fault_page,
            Some((self.space, self.start)),
        );
        Outcome {
            cpages: self.cpages,
            migrated,
        }
    }
}

impl Migration<'_, Copied> {
    /// Runs `migrate_vma_finalize`.
    pub fn finalize(mut self) -> Outcome {
        self.finish()
    }
}

impl<S> Drop for Migration<'_, S> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        // Unfinished: nothing migrates. Destinations that are live, locked, unmapped pages are
        // released by finalize; anything else in `dst` is not ours to touch.
        let pm = self.space.pagemap().clone();
        for (s, d) in self.src.iter_mut().zip(self.dst.iter_mut()) {
            *s &= !MIGRATE_PFN_MIGRATE;
            let ok = migrate_pfn_to_page(&pm, *d)
                .is_some_and(|p| p.refcount() > 0 && p.mapcount() == 0 && p.test(flags::LOCKED));
            if !ok {
                *d = 0;
            }
        }
        self.finish();
    }
}
