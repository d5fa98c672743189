//! Byte helpers for tests of the copy engine: pages of a pattern that depends on a seed and on
//! every byte position, written to and read from host frames and device pages.

use hetmem_engine::{Device, Pfn, PAGE_SIZE};
use rand::{Rng, SeedableRng};

/// A page of bytes that depends on `seed` and on every byte position.
pub fn pattern(seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..PAGE_SIZE).map(|_| rng.random()).collect()
}

/// Writes `pattern(seed + i)` into the `i`-th of `frames`.
pub fn write_frames(dev: &Device, frames: &[Pfn], seed: u64) {
    for (i, &f) in frames.iter().enumerate() {
        dev.frames().write(f, 0, &pattern(seed + i as u64)).unwrap();
    }
}

/// The bytes of host frame `f`.
pub fn read_frame(dev: &Device, f: Pfn) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    dev.frames().read(f, 0, &mut v).unwrap();
    v
}

/// The bytes of device page `p`.
pub fn read_device(dev: &Device, p: Pfn) -> Vec<u8> {
    let mut v = vec![0; PAGE_SIZE];
    dev.read_page(p, 0, &mut v).unwrap();
    v
}

/// The pairs `(a[i], b[i])`.
pub fn zip(a: &[Pfn], b: &[Pfn]) -> Vec<(Pfn, Pfn)> {
    a.iter().copied().zip(b.iter().copied()).collect()
}
