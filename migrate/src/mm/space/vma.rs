//! `Vma`: one mapping of an address space (its range, protection, sharing and lock), its
//! `Prot`, and the `Home` frames of a range the process also reaches through a CPU pointer.

use std::sync::Arc;

use hetmem_engine::Pfn;
use parking_lot::Mutex;

use super::PAGE;
use crate::mm::VirtAddr;

/// Access a mapping allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Prot {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const RW: Prot = Prot {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ: Prot = Prot {
        read: true,
        write: false,
    };
    /// No access.
    pub const NONE: Prot = Prot {
        read: false,
        write: false,
    };
}

/// One mapping: an anonymous range, private (copy-on-write after fork) or shared.
#[derive(Debug)]
pub struct Vma {
    /// First address.
    pub start: VirtAddr,
    /// One past the last address.
    pub end: VirtAddr,
    /// Allowed access.
    pub prot: Prot,
    /// Shared between forked spaces (no copy-on-write).
    pub shared: bool,
    /// Taken by migration walks, so that no fault populates the range behind them.
    pub(crate) lock: Mutex<()>,
    /// For a mapping the process can also reach through a CPU pointer: the host frame each
    /// address must live in while it is in host memory (see [`Home`]).
    pub(crate) home: Option<Home>,
}

/// The fixed frames of a CPU-mapped range: address `addr + i * PAGE` lives, while in host
/// memory, in frame `pfn + i` (the frame the process's own mapping shows at that address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Home {
    /// An address of the range.
    pub addr: VirtAddr,
    /// The home frame of `addr`.
    pub pfn: Pfn,
}

impl Home {
    /// The home frame of `addr`.
    pub fn of(&self, addr: VirtAddr) -> Pfn {
        Pfn(self.pfn.0 + (addr - self.addr) / PAGE)
    }
}

impl Vma {
    pub(super) fn new(start: VirtAddr, end: VirtAddr, prot: Prot, shared: bool) -> Arc<Vma> {
        Vma::with_home(start, end, prot, shared, None)
    }
    pub(super) fn with_home(
        start: VirtAddr,
        end: VirtAddr,
        prot: Prot,
        shared: bool,
        home: Option<Home>,
    ) -> Arc<Vma> {
        Arc::new(Vma {
            start,
            end,
            prot,
            shared,
            lock: Mutex::new(()),
            home,
        })
    }
    /// This mapping's `[start, end)` part with protection `prot` (a split or a protect).
    pub(super) fn part(&self, start: VirtAddr, end: VirtAddr, prot: Prot) -> Arc<Vma> {
        Vma::with_home(start, end, prot, self.shared, self.home)
    }
    /// The home frame of `addr`, for a mapping the process also reaches through a CPU
    /// pointer (`None` for any other).
    pub fn home_of(&self, addr: VirtAddr) -> Option<Pfn> {
        Some(self.home?.of(addr))
    }
    /// True if the mapping is anonymous (every mapping hetmem makes is).
    pub fn is_anonymous(&self) -> bool {
        true
    }
}
