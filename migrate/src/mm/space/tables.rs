//! The page tables of one address space: leaves of 512 entries by leaf number, in a hash map
//! whose keys need no hashing beyond one multiplication.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{SpaceId, PAGE};
use crate::mm::page::{Mapping, Page};
use crate::mm::pte::{Leaf, LeafGuard, Pte, PTRS_PER_LEAF};
use crate::mm::VirtAddr;

/// Bytes of address space one leaf maps.
pub(super) const LEAF_SPAN: u64 = PAGE * PTRS_PER_LEAF as u64;

/// Hashes leaf numbers (already well spread) with one multiplication.
#[derive(Default, Clone, Copy)]
pub(crate) struct LeafHasher(u64);

impl std::hash::Hasher for LeafHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(super) type LeafTable = HashMap<u64, Arc<Leaf>, std::hash::BuildHasherDefault<LeafHasher>>;

/// The page tables of one address space: its leaves by leaf number. The page map's registry
/// holds them too, so that a reverse-map walk reaches the entries of a space that is being
/// torn down.
pub(crate) struct PageTables {
    pub(crate) id: SpaceId,
    pub(super) leaves: RwLock<LeafTable>,
}

impl PageTables {
    /// The leaf holding `addr`'s entry, created if `create`.
    pub(crate) fn leaf(&self, addr: VirtAddr, create: bool) -> Option<Arc<Leaf>> {
        let key = addr.get() / LEAF_SPAN;
        if let Some(l) = self.leaves.read().get(&key) {
            return Some(l.clone());
        }
        if !create {
            return None;
        }
        Some(self.leaves.write().entry(key).or_default().clone())
    }

    /// Sets entry `i` of a locked leaf to map `page` at `addr`: records the mapping and,
    /// with `take_ref`, a reference (an allocation's own reference is otherwise handed over).
    pub(crate) fn install(
        &self,
        g: &LeafGuard<'_>,
        i: usize,
        addr: VirtAddr,
        pte: Pte,
        page: &Page,
        take_ref: bool,
    ) {
        if take_ref {
            page.get();
        }
        page.add_rmap(Mapping {
            space: self.id,
            addr,
        });
        g.set(i, pte);
    }
}

/// The index of `addr`'s entry in its leaf.
pub(crate) fn leaf_index(addr: VirtAddr) -> usize {
    ((addr.get() / PAGE) % PTRS_PER_LEAF as u64) as usize
}

/// One past the last address of the leaf that holds `addr`.
pub(super) fn leaf_end(addr: VirtAddr) -> VirtAddr {
    VirtAddr((addr.get() / LEAF_SPAN + 1).saturating_mul(LEAF_SPAN))
}
