//! The pages stage's holes: mapping a migration's new page where setup found none (or the
//! zero page).

use super::unmap::entry_for;
use crate::mm::notifier::{NotifyEvent, NotifyRange};
use crate::mm::page::{flags, MemoryKind, Page};
use crate::mm::pte::Pte;
use crate::mm::space::{leaf_index, AddressSpace, Vma, PAGE};
use crate::mm::{Owner, VirtAddr};

/// Maps a new page into a hole (or over the zero page, if `zero_ok`); false if the address
/// was populated meanwhile. The mapping cannot have changed since setup (the migration holds the map lock).
/// Replacing the zero page changes the frame a mirror may hold: that is invalidated first,
/// outside the VMA and leaf locks (a notifier may use other address spaces).
pub(super) fn insert_page(
    space: &AddressSpace,
    vma: &Vma,
    addr: VirtAddr,
    page: &Page,
    zero_ok: bool,
) -> bool {
    let leaf = space.leaf(addr, true).expect("created");
    let li = leaf_index(addr);
    let zero = space.pagemap().zero_pfn();
    // Declared before the locks: notifiers (user code, which may use other spaces) run with
    // no VMA or leaf lock held, at the start and at the end.
    let mut inv = None;
    loop {
        let vt = crate::mm::locks::acquire(crate::mm::locks::Rank::Vma);
        let v = vma.lock.lock();
        let g = leaf.lock();
        match g.get(li) {
            Pte::None => {}
            Pte::Present { pfn, .. } if pfn == zero && zero_ok => {
                if inv.is_none() {
                    drop((g, v, vt));
                    inv = Some(space.invalidate(NotifyRange {
                        start: addr,
                        end: addr + PAGE,
                        event: NotifyEvent::Migrate,
                        owner: Owner::NONE,
                    }));
                    // The entry is looked at again under the locks.
                    continue;
                }
            }
            _ => return false,
        }
        let access = if vma.prot.write {
            crate::mm::MigrationKind::Write
        } else {
            crate::mm::MigrationKind::ReadExclusive
        };
        let pte = entry_for(page, access, false, false);
        page.set(
            flags::ANON_EXCLUSIVE
                | if page.kind() == MemoryKind::System {
                    flags::LRU
                } else {
                    0
                },
        );
        space.install(&g, li, addr, pte, page, true);
        return true;
    }
}
