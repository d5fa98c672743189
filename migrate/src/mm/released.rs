//! Pages whose last reference is gone, gathered and given back in batches: host frames to
//! the frame pool in one call, device pages to their pagemap's driver a run at a time.

use hetmem_engine::Pfn;

use super::page::Page;
use super::pagemap::PageMap;

/// Pages whose last reference is gone and whose flags are clear, gathered for one
/// [`PageMap::free_gathered`]. Each page's frame number is read once, as it is gathered
/// (when a batch loop has the page's cache line at hand), so giving a large batch back
/// does not walk its `Page` structs again.
#[derive(Default)]
pub(crate) struct Released<'p> {
    frames: Vec<Pfn>,
    device: Vec<&'p Page>,
    /// The frame number of each of `device`.
    device_pfns: Vec<Pfn>,
}

impl<'p> Released<'p> {
    /// Room for `n` pages of either kind.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Released {
            frames: Vec::with_capacity(n),
            device: Vec::new(),
            device_pfns: Vec::new(),
        }
    }

    /// How many pages are gathered.
    pub(crate) fn len(&self) -> usize {
        self.frames.len() + self.device.len()
    }

    /// Gathers a page whose last reference is gone.
    #[inline]
    pub(crate) fn push(&mut self, p: &'p Page) {
        let pfn = p.pfn();
        if p.is_device() {
            self.device.push(p);
            self.device_pfns.push(pfn);
        } else {
            self.frames.push(pfn);
        }
    }
}

impl PageMap {
    /// Gives back the gathered pages: host frames in one call, device pages in runs of one
    /// registered range, each run with one call to its driver. `r` is left empty, with its
    /// room kept for the next batch.
    pub(crate) fn free_gathered(&self, r: &mut Released<'_>) {
        if !r.frames.is_empty() {
            // SAFETY: these pages' last reference is gone and nothing maps them: the page
            // map that adopted their frames gives them back.
            if let Err(e) = unsafe { self.frames().free_adopted(&r.frames) } {
                tracing::error!("freeing {} frames: {e}", r.frames.len());
            }
            r.frames.clear();
        }
        if r.device.is_empty() {
            return;
        }
        if !r.device_pfns.windows(2).all(|w| w[0] < w[1]) {
            let mut pairs: Vec<(Pfn, &Page)> =
                r.device_pfns.drain(..).zip(r.device.drain(..)).collect();
            pairs.sort_unstable_by_key(|&(pfn, _)| pfn);
            (r.device_pfns, r.device) = pairs.into_iter().unzip();
        }
        let (device, pfns) = (&r.device, &r.device_pfns);
        let (mut rest, mut rest_pfns) = (&device[..], &pfns[..]);
        while let Some(&first) = rest_pfns.first() {
            let Some(range) = self.range_of(first) else {
                (rest, rest_pfns) = (&rest[1..], &rest_pfns[1..]);
                continue;
            };
            let n = rest_pfns.partition_point(|&p| range.range.contains(p));
            if let Some(ops) = &range.ops {
                ops.pfns_free(&rest[..n], &rest_pfns[..n]);
            }
            (rest, rest_pfns) = (&rest[n..], &rest_pfns[n..]);
        }
        r.device.clear();
        r.device_pfns.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use hetmem_engine::{HostFramePool, PfnRange};

    use super::*;
    use crate::mm::{FaultContext, MemoryKind, Owner, PagemapOps};

    /// Records every call it gets: (pfns of `pages`, `pfns`).
    #[derive(Default)]
    struct Record(Mutex<Vec<(Vec<Pfn>, Vec<Pfn>)>>);

    impl PagemapOps for Record {
        fn page_free(&self, _: &Page) {
            unreachable!("freed in batches")
        }
        fn pfns_free(&self, pages: &[&Page], pfns: &[Pfn]) {
            let named = pages.iter().map(|p| p.pfn()).collect();
            self.0.lock().unwrap().push((named, pfns.to_vec()));
        }
        fn migrate_to_ram(&self, _: FaultContext<'_>) -> crate::Result<()> {
            unreachable!()
        }
    }

    /// Device pages gathered out of order, from two pagemaps, go back to each pagemap's
    /// driver in ascending runs, each page once, with its own frame number beside it.
    #[test]
    fn device_pages_go_back_to_their_own_driver_in_ascending_runs() {
        let pm = PageMap::new(HostFramePool::new(1 << 20).unwrap()).unwrap();
        let (a, b) = (Arc::new(Record::default()), Arc::new(Record::default()));
        let ra = PfnRange {
            start: Pfn(1 << 40),
            count: 8,
        };
        let rb = PfnRange {
            start: Pfn((1 << 40) + 8),
            count: 8,
        };
        pm.register_device(ra, MemoryKind::DevicePrivate, Owner(1), a.clone(), None)
            .unwrap();
        pm.register_device(rb, MemoryKind::DevicePrivate, Owner(2), b.clone(), None)
            .unwrap();
        let order = [9u64, 2, 15, 0, 8, 3];
        let mut r = Released::with_capacity(4);
        for k in order {
            r.push(pm.page(Pfn((1 << 40) + k)).unwrap());
        }
        assert_eq!(r.len(), order.len());
        pm.free_gathered(&mut r);
        assert_eq!(r.len(), 0, "left empty for the next batch");
        let pfns = |ks: &[u64]| ks.iter().map(|&k| Pfn((1 << 40) + k)).collect::<Vec<_>>();
        let want_a = pfns(&[0, 2, 3]);
        let want_b = pfns(&[8, 9, 15]);
        assert_eq!(*a.0.lock().unwrap(), vec![(want_a.clone(), want_a)]);
        assert_eq!(*b.0.lock().unwrap(), vec![(want_b.clone(), want_b)]);
    }
}
