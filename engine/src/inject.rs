//! Faults a device can be told to inject into its copy batches (the `testing` feature sets
//! them; without it they stay empty and cost one uncontended lock per batch): copies into
//! chosen pages that fail, and batches lost mid-way as a device that goes away would lose
//! them.

use std::collections::HashSet;

use crate::frames::HostFramePool;
use crate::pfn::Pfn;

/// The faults armed on one device.
#[derive(Default)]
pub(crate) struct Injections {
    /// Copies whose destination is one of these fail.
    pub(crate) fail_dst: HashSet<Pfn>,
    /// Copy batches still to be lost mid-way.
    lose_batches: usize,
    /// Batches with a destination in a home frame (a CPU fault through a pointer waits for
    /// them) are left alone.
    spare_home: bool,
    /// Batches lost so far.
    lost: u64,
}

/// What the injections make of one batch: the pairs that are submitted, and how its ticket
/// ends.
pub(crate) struct Injected {
    /// Indices of the pairs that are copied, in order.
    pub(crate) kept: Vec<usize>,
    /// Indices of the pairs that fail (a failed copy).
    pub(crate) failed: Vec<usize>,
    /// The batch is lost mid-way: only `kept` (its first part) is copied, and its ticket
    /// reports [`crate::EngineError::DeviceLost`] with this reason for all of it.
    pub(crate) lost: Option<String>,
}

impl Injections {
    /// True when nothing is armed (the common case: the batch goes as it is).
    pub(crate) fn is_empty(&self) -> bool {
        self.fail_dst.is_empty() && self.lose_batches == 0
    }

    /// Arms the loss of the next `batches` copy batches (see [`crate::Device::inject_device_loss`]).
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn lose(&mut self, batches: usize, spare_home: bool) {
        self.lose_batches = batches;
        self.spare_home = spare_home;
    }

    /// Batches lost so far.
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub(crate) fn lost(&self) -> u64 {
        self.lost
    }

    /// Decides the fate of a batch of `pairs` (valid: the caller resolved it already).
    pub(crate) fn apply(&mut self, pairs: &[(Pfn, Pfn)], frames: &HostFramePool) -> Injected {
        let (kept, failed): (Vec<usize>, Vec<usize>) =
            (0..pairs.len()).partition(|&i| !self.fail_dst.contains(&pairs[i].1));
        let spared = self.spare_home && pairs.iter().any(|&(_, d)| frames.is_home(d));
        if self.lose_batches == 0 || pairs.is_empty() || spared {
            return Injected {
                kept,
                failed,
                lost: None,
            };
        }
        self.lose_batches -= 1;
        self.lost += 1;
        // The first half of what would have been copied is; the rest never is.
        let copied = kept.len() / 2;
        let lost = Some(format!(
            "injected: lost mid-batch after {copied} of {} pairs",
            pairs.len()
        ));
        Injected {
            kept: kept[..copied].to_vec(),
            failed,
            lost,
        }
    }
}
