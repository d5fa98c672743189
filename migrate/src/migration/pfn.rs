//! Migrate pfn words and selection flags, with the kernel's values.

use hetmem_engine::Pfn;

use crate::mm::{Page, PageMap};

/// The word names a page.
pub const MIGRATE_PFN_VALID: u64 = 1 << 0;
/// The entry is to be (or was) migrated.
pub const MIGRATE_PFN_MIGRATE: u64 = 1 << 1;
/// Crate-private, in `src` words: `migrate_device_pages` took this entry's destination (so
/// `migrate_device_finalize` can tell its own taken destinations from another migration's).
/// Bit 2 is free in the kernel's words (it was `MIGRATE_PFN_LOCKED`).
pub(crate) const MIGRATE_PFN_PAGED: u64 = 1 << 2;
/// The page was mapped writable.
pub const MIGRATE_PFN_WRITE: u64 = 1 << 3;
/// Reserved for large folios.
pub const MIGRATE_PFN_COMPOUND: u64 = 1 << 4;
/// The frame number sits above this many flag bits.
pub const MIGRATE_PFN_SHIFT: u32 = 6;

/// Collect system pages.
pub const MIGRATE_VMA_SELECT_SYSTEM: u32 = 1 << 0;
/// Collect device-private pages of the caller's owner.
pub const MIGRATE_VMA_SELECT_DEVICE_PRIVATE: u32 = 1 << 1;
/// Collect device-coherent pages of the caller's owner.
pub const MIGRATE_VMA_SELECT_DEVICE_COHERENT: u32 = 1 << 2;
/// Reserved for large folios.
pub const MIGRATE_VMA_SELECT_COMPOUND: u32 = 1 << 3;

/// The word for `pfn`: `pfn << MIGRATE_PFN_SHIFT | MIGRATE_PFN_VALID`.
pub const fn migrate_pfn(pfn: Pfn) -> u64 {
    pfn.0 << MIGRATE_PFN_SHIFT | MIGRATE_PFN_VALID
}

/// The frame a word names, if `VALID` is set.
pub const fn migrate_pfn_to_pfn(w: u64) -> Option<Pfn> {
    if w & MIGRATE_PFN_VALID != 0 {
        Some(Pfn(w >> MIGRATE_PFN_SHIFT))
    } else {
        None
    }
}

/// The page a word names, if `VALID` is set and the frame is registered.
#[inline]
pub fn migrate_pfn_to_page(pm: &PageMap, w: u64) -> Option<&Page> {
    pm.page(migrate_pfn_to_pfn(w)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_carry_the_kernel_values() {
        assert_eq!(
            (MIGRATE_PFN_VALID, MIGRATE_PFN_MIGRATE, MIGRATE_PFN_WRITE),
            (1, 2, 8)
        );
        let w = migrate_pfn(Pfn(0xabc)) | MIGRATE_PFN_MIGRATE | MIGRATE_PFN_WRITE;
        assert_eq!(w, 0xabc << 6 | 0b1011);
        assert_eq!(migrate_pfn_to_pfn(w), Some(Pfn(0xabc)));
        assert_eq!(migrate_pfn_to_pfn(MIGRATE_PFN_MIGRATE), None);
    }
}
