//! The address space's two plain numbers as types: `VirtAddr`, an address in an address
//! space (`mm::AddressSpace`), and `Owner`, the cookie that names a device pagemap's driver
//! (the kernel's `pgmap_owner`). Frame numbers are the engine's `Pfn`. Below every other
//! module of the crate (`error` and `mm` both use it), and re-exported by `mm` and the root.

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};

/// Bytes in a page, as a `u64` (`mm::PAGE`; this module sits below `mm`).
const PAGE: u64 = hetmem_engine::PAGE_SIZE as u64;

/// A virtual address in an address space. Arithmetic is in bytes: `a + n` and `a - n` move
/// by `n` bytes, `b - a` is the distance from `a` to `b`. Shown in hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct VirtAddr(pub u64);

impl VirtAddr {
    /// The address as a plain integer.
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The start of the page that holds this address.
    pub const fn page_down(self) -> VirtAddr {
        VirtAddr(self.0 & !(PAGE - 1))
    }
    /// The byte offset of this address in its page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE - 1)
    }
    /// The number of the page that holds this address (the address over the page size).
    pub const fn page_number(self) -> u64 {
        self.0 / PAGE
    }
    /// True if the address starts a page.
    pub const fn is_page_aligned(self) -> bool {
        self.page_offset() == 0
    }
    /// The address `n` pages further on, or `None` past the end of the address type.
    pub fn checked_add_pages(self, n: u64) -> Option<VirtAddr> {
        n.checked_mul(PAGE)
            .and_then(|b| self.0.checked_add(b))
            .map(VirtAddr)
    }
    /// The address `bytes` further on, or the last address if that is past the end.
    pub const fn saturating_add(self, bytes: u64) -> VirtAddr {
        VirtAddr(self.0.saturating_add(bytes))
    }
    /// The address `bytes` further on, or `None` past the end of the address type.
    pub fn checked_add(self, bytes: u64) -> Option<VirtAddr> {
        self.0.checked_add(bytes).map(VirtAddr)
    }
}

/// The page addresses of `[start, end)`, from `start` on in steps of a page.
pub(crate) fn page_addrs(start: VirtAddr, end: VirtAddr) -> impl Iterator<Item = VirtAddr> {
    (start.0..end.0).step_by(PAGE as usize).map(VirtAddr)
}

impl From<u64> for VirtAddr {
    fn from(a: u64) -> VirtAddr {
        VirtAddr(a)
    }
}

impl From<VirtAddr> for u64 {
    fn from(a: VirtAddr) -> u64 {
        a.0
    }
}

impl Add<u64> for VirtAddr {
    type Output = VirtAddr;
    fn add(self, bytes: u64) -> VirtAddr {
        VirtAddr(self.0 + bytes)
    }
}

impl AddAssign<u64> for VirtAddr {
    fn add_assign(&mut self, bytes: u64) {
        self.0 += bytes;
    }
}

impl Sub<u64> for VirtAddr {
    type Output = VirtAddr;
    fn sub(self, bytes: u64) -> VirtAddr {
        VirtAddr(self.0 - bytes)
    }
}

impl SubAssign<u64> for VirtAddr {
    fn sub_assign(&mut self, bytes: u64) {
        self.0 -= bytes;
    }
}

impl Sub<VirtAddr> for VirtAddr {
    type Output = u64;
    /// The distance in bytes from `other` up to `self`.
    fn sub(self, other: VirtAddr) -> u64 {
        self.0 - other.0
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// The owner of a device pagemap: the cookie a driver registers its pages under and names
/// in its migrations, so that it selects its own device pages and not another driver's
/// (the kernel's `pgmap_owner`). [`Owner::NONE`] is no driver: system pages and
/// invalidations that no driver started carry it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(transparent)]
pub struct Owner(pub u64);

impl Owner {
    /// No driver (0, which no pagemap may register under).
    pub const NONE: Owner = Owner(0);
    /// The cookie as a plain integer.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl From<u64> for Owner {
    fn from(o: u64) -> Owner {
        Owner(o)
    }
}

impl From<Owner> for u64 {
    fn from(o: Owner) -> u64 {
        o.0
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner({})", self.0)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_move_by_bytes_and_show_in_hex() {
        let a = VirtAddr::from(0x1_0000_1234);
        assert_eq!((a + 0x10).get(), 0x1_0000_1244);
        assert_eq!(a - 0x234, VirtAddr(0x1_0000_1000));
        assert_eq!((a + 3 * PAGE) - a, 3 * PAGE);
        let mut b = a;
        b += PAGE;
        b -= 1;
        assert_eq!(u64::from(b), 0x1_0000_2233);
        assert_eq!(a.page_down(), VirtAddr(0x1_0000_1000));
        assert_eq!(a.page_offset(), 0x234);
        assert_eq!(a.page_number(), 0x1_0000_1234 / PAGE);
        assert!(!a.is_page_aligned() && a.page_down().is_page_aligned());
        assert_eq!(a.checked_add_pages(2), Some(a + 2 * PAGE));
        assert_eq!(VirtAddr(u64::MAX - 1).checked_add_pages(1), None);
        assert_eq!(VirtAddr(u64::MAX).checked_add(1), None);
        assert_eq!(VirtAddr(u64::MAX - 1).saturating_add(5), VirtAddr(u64::MAX));
        assert_eq!(format!("{a}"), "0x100001234");
        assert_eq!(format!("{a:?}"), "VirtAddr(0x100001234)");
        assert_eq!(format!("{a:#x}"), "0x100001234");
        assert!(VirtAddr(1) < VirtAddr(2));
    }

    #[test]
    fn owners_convert_and_none_is_zero() {
        assert_eq!(Owner::NONE, Owner::default());
        assert_eq!(Owner::from(7).get(), 7);
        assert_eq!(u64::from(Owner(9)), 9);
        assert_eq!(format!("{} {:?}", Owner(3), Owner(3)), "3 Owner(3)");
    }
}
