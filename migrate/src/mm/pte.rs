//! Page-table entries: one atomic word each, in leaves of 512 with one lock per leaf.

use std::sync::atomic::{AtomicU64, Ordering};

use hetmem_engine::Pfn;
use parking_lot::{Mutex, MutexGuard};

/// Entries per page-table leaf (a leaf covers 2 MiB).
pub const PTRS_PER_LEAF: usize = 512;

/// The access a migration entry stands in for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationKind {
    /// The PTE was read-only and the page shared.
    Read,
    /// The PTE was read-only and the page anon-exclusive.
    ReadExclusive,
    /// The PTE was writable.
    Write,
}

/// A decoded page-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pte {
    /// Nothing mapped (a hole).
    None,
    /// A CPU-accessible frame (system or device-coherent).
    Present {
        /// The frame.
        pfn: Pfn,
        /// Writable.
        write: bool,
        /// Written since mapped clean.
        dirty: bool,
        /// Accessed.
        young: bool,
    },
    /// A device-private page: a CPU access faults.
    DevicePrivate {
        /// The device page.
        pfn: Pfn,
        /// Writable.
        write: bool,
    },
    /// The page is being migrated: an access waits until the migration ends.
    Migration {
        /// The page being migrated.
        pfn: Pfn,
        /// What the original entry allowed.
        kind: MigrationKind,
        /// The original entry's young bit.
        young: bool,
        /// The original entry's dirty bit.
        dirty: bool,
    },
    /// Swapped out to `slot` (reserved for a swap tier).
    Swap {
        /// The swap slot.
        slot: u64,
    },
}

const T_NONE: u64 = 0;
const T_PRESENT: u64 = 1;
const T_DEVICE: u64 = 2;
const T_MIGRATION: u64 = 3;
const T_SWAP: u64 = 4;
const B_WRITE: u64 = 1 << 3;
const B_DIRTY: u64 = 1 << 4;
const B_YOUNG: u64 = 1 << 5;
const B_KIND_SHIFT: u32 = 6;
const SHIFT: u32 = 12;

impl Pte {
    /// Encodes the entry into its word.
    pub fn encode(self) -> u64 {
        let b = |c: bool, bit: u64| if c { bit } else { 0 };
        match self {
            Pte::None => T_NONE,
            Pte::Present {
                pfn,
                write,
                dirty,
                young,
            } => {
                pfn.0 << SHIFT
                    | T_PRESENT
                    | b(write, B_WRITE)
                    | b(dirty, B_DIRTY)
                    | b(young, B_YOUNG)
            }
            Pte::DevicePrivate { pfn, write } => pfn.0 << SHIFT | T_DEVICE | b(write, B_WRITE),
            Pte::Migration {
                pfn,
                kind,
                young,
                dirty,
            } => {
                let k = match kind {
                    MigrationKind::Read => 0,
                    MigrationKind::ReadExclusive => 1,
                    MigrationKind::Write => 2,
                };
                pfn.0 << SHIFT
                    | T_MIGRATION
                    | k << B_KIND_SHIFT
                    | b(dirty, B_DIRTY)
                    | b(young, B_YOUNG)
            }
            Pte::Swap { slot } => slot << SHIFT | T_SWAP,
        }
    }

    /// Decodes a word made by [`Pte::encode`].
    pub fn decode(w: u64) -> Pte {
        let pfn = Pfn(w >> SHIFT);
        let has = |bit: u64| w & bit != 0;
        match w & 7 {
            T_PRESENT => Pte::Present {
                pfn,
                write: has(B_WRITE),
                dirty: has(B_DIRTY),
                young: has(B_YOUNG),
            },
            T_DEVICE => Pte::DevicePrivate {
                pfn,
                write: has(B_WRITE),
            },
            T_MIGRATION => Pte::Migration {
                pfn,
                kind: match (w >> B_KIND_SHIFT) & 3 {
                    0 => MigrationKind::Read,
                    1 => MigrationKind::ReadExclusive,
                    _ => MigrationKind::Write,
                },
                young: has(B_YOUNG),
                dirty: has(B_DIRTY),
            },
            T_SWAP => Pte::Swap { slot: w >> SHIFT },
            _ => Pte::None,
        }
    }

    /// The frame the entry refers to, if any.
    pub fn pfn(self) -> Option<Pfn> {
        match self {
            Pte::Present { pfn, .. }
            | Pte::DevicePrivate { pfn, .. }
            | Pte::Migration { pfn, .. } => Some(pfn),
            _ => None,
        }
    }
}

/// 512 entries and the lock that serialises changes to them.
#[derive(Debug)]
pub(crate) struct Leaf {
    lock: Mutex<()>,
    ptes: [AtomicU64; PTRS_PER_LEAF],
}

impl Default for Leaf {
    fn default() -> Self {
        Leaf {
            lock: Mutex::new(()),
            ptes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Leaf {
    /// Reads entry `i` without the lock.
    pub fn get(&self, i: usize) -> Pte {
        Pte::decode(self.ptes[i].load(Ordering::Acquire))
    }
    /// Takes the leaf's lock: changes to its entries need the guard.
    pub fn lock(&self) -> LeafGuard<'_> {
        let track = super::locks::acquire(super::locks::Rank::Leaf);
        LeafGuard {
            leaf: self,
            _g: self.lock.lock(),
            _track: track,
        }
    }
}

/// A locked leaf.
pub(crate) struct LeafGuard<'a> {
    leaf: &'a Leaf,
    _g: MutexGuard<'a, ()>,
    _track: super::locks::Held,
}

impl LeafGuard<'_> {
    /// Reads entry `i`.
    pub fn get(&self, i: usize) -> Pte {
        self.leaf.get(i)
    }
    /// Writes entry `i`.
    pub fn set(&self, i: usize, pte: Pte) {
        self.leaf.ptes[i].store(pte.encode(), Ordering::Release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips() {
        let p = Pfn(0x12345);
        let all = [
            Pte::None,
            Pte::Present {
                pfn: p,
                write: true,
                dirty: false,
                young: true,
            },
            Pte::Present {
                pfn: p,
                write: false,
                dirty: true,
                young: false,
            },
            Pte::DevicePrivate {
                pfn: p,
                write: true,
            },
            Pte::Migration {
                pfn: p,
                kind: MigrationKind::ReadExclusive,
                young: true,
                dirty: true,
            },
            Pte::Migration {
                pfn: p,
                kind: MigrationKind::Write,
                young: false,
                dirty: false,
            },
            Pte::Migration {
                pfn: p,
                kind: MigrationKind::Read,
                young: false,
                dirty: true,
            },
            Pte::Swap { slot: 77 },
        ];
        for pte in all {
            assert_eq!(Pte::decode(pte.encode()), pte);
        }
        assert_eq!(all[1].pfn(), Some(p));
        assert_eq!(all[7].pfn(), None);
    }
}
