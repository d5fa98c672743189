//! Planning a copy batch: frame numbers resolved to (memory object, offset), runs of
//! consecutive pages coalesced into regions, regions grouped by (source, destination) object.
//!
//! Every backend executes the same plan, so the plan is where coalescing is decided and
//! where it can be observed (`CopyStats::regions`; the `testing` feature also exposes
//! `Device::plan` and these types, under `hetmem_engine::testing`). They are the engine's
//! internals, not its API.

use crate::error::{EngineError, Result};
use crate::pfn::{Pfn, PAGE_SIZE};

/// One memory object that frames live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemoryId {
    /// Segment `n` of the host frame pool.
    Frames(u32),
    /// Chunk `n` of the device's memory.
    Chunk(u32),
}

impl MemoryId {
    /// True for device memory.
    pub fn is_device(self) -> bool {
        matches!(self, MemoryId::Chunk(_))
    }
}

/// Where a frame lives: its memory object and byte offset in it (the engine's own notion of
/// place; not to be confused with `hetmem::offload::Location`, host or device).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    /// The memory object.
    pub memory: MemoryId,
    /// Byte offset of the frame inside the object.
    pub offset: u64,
}

/// A contiguous span copied in one piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Byte offset in the source object.
    pub src_offset: u64,
    /// Byte offset in the destination object.
    pub dst_offset: u64,
    /// Bytes to copy, a multiple of the page size.
    pub size: u64,
}

/// The regions that go from one source object to one destination object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyGroup {
    /// Source object.
    pub src: MemoryId,
    /// Destination object.
    pub dst: MemoryId,
    /// Regions in ascending destination order, none adjacent to the next in both objects.
    pub regions: Vec<Region>,
}

impl CopyGroup {
    /// Pages this group copies.
    pub fn pages(&self) -> usize {
        self.regions
            .iter()
            .map(|r| r.size as usize / PAGE_SIZE)
            .sum()
    }

    /// (source page, destination page) index pairs inside the two objects, one per page:
    /// what the gather kernel reads.
    pub fn page_pairs(&self) -> Vec<[u32; 2]> {
        let page = PAGE_SIZE as u64;
        let mut out = Vec::with_capacity(self.pages());
        for r in &self.regions {
            for k in 0..r.size / page {
                out.push([
                    (r.src_offset / page + k) as u32,
                    (r.dst_offset / page + k) as u32,
                ]);
            }
        }
        out
    }
}

/// A resolved, coalesced copy batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopyPlan {
    /// Groups, one per (source object, destination object) pair.
    pub groups: Vec<CopyGroup>,
    /// Pages in the batch.
    pub pages: usize,
}

impl CopyPlan {
    /// Number of regions over all groups: the number of copy commands a region copy records.
    pub fn region_count(&self) -> usize {
        self.groups.iter().map(|g| g.regions.len()).sum()
    }
    /// Bytes the batch moves.
    pub fn bytes(&self) -> u64 {
        (self.pages * PAGE_SIZE) as u64
    }
}

/// A location packed into one integer: memory object in the high half, page in the low half.
/// Within one object, key order is offset order, and no two frames share a key.
fn key(l: Place) -> u64 {
    let mem = match l.memory {
        MemoryId::Frames(s) => s as u64,
        MemoryId::Chunk(c) => (1 << 31) | c as u64,
    };
    (mem << 32) | (l.offset / PAGE_SIZE as u64)
}

fn unkey(k: u64) -> Place {
    let mem = (k >> 32) as u32;
    Place {
        memory: if mem & (1 << 31) != 0 {
            MemoryId::Chunk(mem & !(1 << 31))
        } else {
            MemoryId::Frames(mem)
        },
        offset: (k & 0xffff_ffff) * PAGE_SIZE as u64,
    }
}

/// Builds the plan for `pairs` of `(source, destination)` frames, resolving each frame with
/// `resolve`. Refuses a batch that writes a frame twice or both reads and writes one.
///
/// Regions come out in source order (reads stream, writes scatter: measured faster than
/// the reverse on lavapipe); sorting is skipped where the input is already in order.
pub(crate) fn plan_batch(
    pairs: &[(Pfn, Pfn)],
    mut resolve: impl FnMut(Pfn) -> Result<Place>,
) -> Result<CopyPlan> {
    // (source key, destination key)
    let mut entries: Vec<(u64, u64)> = Vec::with_capacity(pairs.len());
    for &(s, d) in pairs {
        entries.push((key(resolve(s)?), key(resolve(d)?)));
    }
    check_overlap(pairs, &entries)?;
    if !entries.is_sorted_by_key(|e| e.0) {
        entries.sort_unstable_by_key(|e| e.0);
    }
    let mut groups: Vec<CopyGroup> = Vec::new();
    let mut current = usize::MAX;
    let size = PAGE_SIZE as u64;
    for &(sk, dk) in &entries {
        let (s, d) = (unkey(sk), unkey(dk));
        let fits = |g: &CopyGroup| g.src == s.memory && g.dst == d.memory;
        if current == usize::MAX || !fits(&groups[current]) {
            current = match groups.iter().position(fits) {
                Some(i) => i,
                None => {
                    groups.push(CopyGroup {
                        src: s.memory,
                        dst: d.memory,
                        regions: Vec::new(),
                    });
                    groups.len() - 1
                }
            };
        }
        let regions = &mut groups[current].regions;
        match regions.last_mut() {
            Some(r) if r.src_offset + r.size == s.offset && r.dst_offset + r.size == d.offset => {
                r.size += size;
            }
            _ => regions.push(Region {
                src_offset: s.offset,
                dst_offset: d.offset,
                size,
            }),
        }
    }
    Ok(CopyPlan {
        groups,
        pages: pairs.len(),
    })
}

/// Refuses a batch in which a frame is written twice, or is both read and written.
fn check_overlap(pairs: &[(Pfn, Pfn)], entries: &[(u64, u64)]) -> Result<()> {
    let mut dst: Vec<u64> = entries.iter().map(|e| e.1).collect();
    if !dst.is_sorted() {
        dst.sort_unstable();
    }
    let named = |k: u64, src: bool| {
        let i = entries
            .iter()
            .position(|e| if src { e.0 == k } else { e.1 == k })
            .expect("key comes from the batch");
        EngineError::OverlappingCopy(if src { pairs[i].0 } else { pairs[i].1 })
    };
    if let Some(w) = dst.windows(2).find(|w| w[0] == w[1]) {
        return Err(named(w[0], false));
    }
    let (Some(&lo), Some(&hi)) = (dst.first(), dst.last()) else {
        return Ok(());
    };
    for &(sk, _) in entries {
        if sk >= lo && sk <= hi && dst.binary_search(&sk).is_ok() {
            return Err(named(sk, true));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames 0..1000 live in segment 0, device pages 5000.. in chunk 0 then chunk 1 by 100s.
    fn resolve(p: Pfn) -> Result<Place> {
        let n = p.0;
        if n < 1000 {
            Ok(Place {
                memory: MemoryId::Frames(0),
                offset: n * PAGE_SIZE as u64,
            })
        } else if (5000..5200).contains(&n) {
            let i = n - 5000;
            Ok(Place {
                memory: MemoryId::Chunk((i / 100) as u32),
                offset: (i % 100) * PAGE_SIZE as u64,
            })
        } else {
            Err(EngineError::UnknownPfn(p))
        }
    }

    #[test]
    fn a_run_of_consecutive_pages_is_one_region() {
        let pairs: Vec<_> = (0..64).map(|i| (Pfn(10 + i), Pfn(5000 + i))).collect();
        let plan = plan_batch(&pairs, resolve).unwrap();
        assert_eq!(plan.region_count(), 1);
        assert_eq!(plan.pages, 64);
        assert_eq!(
            plan.groups[0].regions[0],
            Region {
                src_offset: 10 * 4096,
                dst_offset: 0,
                size: 64 * 4096
            }
        );
    }

    #[test]
    fn runs_split_at_chunk_boundaries_and_gaps() {
        // 90..110 crosses from chunk 0 into chunk 1; the pair order is shuffled.
        let mut pairs: Vec<_> = (90..110).map(|i| (Pfn(i), Pfn(5000 + i))).collect();
        pairs.push((Pfn(500), Pfn(5150)));
        pairs.reverse();
        let plan = plan_batch(&pairs, resolve).unwrap();
        assert_eq!(plan.groups.len(), 2);
        assert_eq!(plan.groups[0].regions.len(), 1);
        assert_eq!(plan.groups[1].regions.len(), 2);
        assert_eq!(plan.groups.iter().map(CopyGroup::pages).sum::<usize>(), 21);
    }

    #[test]
    fn overlapping_batches_are_refused() {
        let dup = [(Pfn(1), Pfn(5001)), (Pfn(2), Pfn(5001))];
        assert!(matches!(
            plan_batch(&dup, resolve),
            Err(EngineError::OverlappingCopy(Pfn(5001)))
        ));
        let chain = [(Pfn(1), Pfn(2)), (Pfn(2), Pfn(3))];
        assert!(matches!(
            plan_batch(&chain, resolve),
            Err(EngineError::OverlappingCopy(Pfn(2)))
        ));
        let same = [(Pfn(7), Pfn(7))];
        assert!(plan_batch(&same, resolve).is_err());
        let unknown = [(Pfn(1), Pfn(4000))];
        assert!(matches!(
            plan_batch(&unknown, resolve),
            Err(EngineError::UnknownPfn(Pfn(4000)))
        ));
    }
}
