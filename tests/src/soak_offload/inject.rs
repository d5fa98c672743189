//! The faults the offload soak injects: failed copies, host frames run out, and copy
//! batches lost mid-way by a device that goes away.
//!
//! Home frames of CPU-mapped buffers are spared by all three: a CPU fault through a pointer
//! that cannot be served is `SIGBUS` by contract, which would end the soak rather than test
//! it. Home runs are reserved from the pool up front, so taking every free frame leaves
//! them alone, and the device loss spares batches that write a home frame.

use std::sync::atomic::Ordering;

use hetmem_engine::Pfn;
use rand::rngs::StdRng;
use rand::Rng;

use super::World;

/// Copies into a few device pages and host frames fail from now on (until the next
/// injection, or a clear): migrations both ways, faults, prefetches, evictions and launches
/// meet them. Home runs are carved from the top of the pool, so only the lower half is
/// chosen.
pub(super) fn copy_failures(w: &World, rng: &mut StdRng) {
    if rng.random_bool(0.2) {
        w.device.inject_copy_failures(&[]);
        return;
    }
    let dev = w.device.pfn_range();
    let host = w.pool.pfn_range();
    let mut pfns: Vec<Pfn> = (0..2)
        .map(|_| dev.start.add(rng.random_range(0..dev.count)))
        .collect();
    for _ in 0..2 {
        let p = host.start.add(rng.random_range(0..host.count / 2));
        if !w.pool.is_home(p) {
            pfns.push(p);
        }
    }
    w.device.inject_copy_failures(&pfns);
    w.injected.fetch_add(1, Ordering::Relaxed);
}

/// The next copy batch of any thread (one that writes no home frame) is lost mid-way: half
/// of it copied, its ticket failing with `DeviceLost`.
pub(super) fn device_loss(w: &World) {
    w.device.inject_device_loss(1, true);
    w.loss_injections.fetch_add(1, Ordering::Relaxed);
}

/// Takes every free host frame of the pool into `World::hogged`, so that nobody gets one
/// until [`release_frames`]: every thread's operations meanwhile meet exhaustion. Racing
/// threads may free more meanwhile: those are taken too, a few rounds long.
pub(super) fn exhaust_frames(w: &World) {
    let mut hogged = w.hogged.lock().unwrap();
    if w.holding_off.load(Ordering::Acquire) > 0 {
        return;
    }
    for _ in 0..4 {
        let n = w.pool.available();
        if n == 0 {
            break;
        }
        match w.pool.alloc_batch(n, false) {
            Ok(mut more) => hogged.append(&mut more),
            // Another thread took some first: one at a time, then.
            Err(_) => {
                while let Ok(p) = w.pool.alloc(false) {
                    hogged.push(p);
                }
            }
        }
    }
    w.exhaustions.fetch_add(1, Ordering::Relaxed);
}

/// Gives the taken frames back: after the operation that `exhaust_frames` preceded, and
/// whenever a thread needs frames to check its bytes (`retried`).
pub(super) fn release_frames(w: &World) -> Result<(), String> {
    let frames = std::mem::take(&mut *w.hogged.lock().unwrap());
    w.pool
        .free_batch(&frames)
        .map_err(|e| format!("giving back {} hogged frames: {e}", frames.len()))
}

/// Holds off new exhaustions while it lives (a thread retrying a check of its bytes).
pub(super) struct HoldOff<'w>(&'w World);

impl<'w> HoldOff<'w> {
    pub(super) fn new(w: &'w World) -> Self {
        w.holding_off.fetch_add(1, Ordering::AcqRel);
        HoldOff(w)
    }
}

impl Drop for HoldOff<'_> {
    fn drop(&mut self) {
        self.0.holding_off.fetch_sub(1, Ordering::AcqRel);
    }
}
