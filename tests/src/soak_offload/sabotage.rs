//! Sabotage: breaking a run on purpose, to show that the soak's checks catch it.

use std::time::{Duration, Instant};

use super::{Sabotage, World};

/// Breaks the run as the configuration asks (tests of the soak's own checks).
pub(super) fn sabotage(w: &World) {
    match w.sabotage {
        None => {}
        Some(Sabotage::CorruptByte) => {
            // Through the address space, as no operation of the soak writes; into the shared
            // buffer, which no operation rewrites (so nothing can hide the change).
            let at = w.shared.addr() + 5;
            w.ctx
                .space()
                .write(at, &[!w.shared_bytes[5]])
                .expect("the sabotage's write");
        }
        Some(Sabotage::Stall) => {
            // Stuck holding a lock: a migration between its stages holds the map lock, which
            // the watchdog's report must name.
            let at = w.shared.addr();
            let held = hetmem::migration::Migration::setup(
                w.ctx.space(),
                at,
                at + 4096,
                hetmem::migration::MIGRATE_VMA_SELECT_SYSTEM,
                hetmem::Owner::NONE,
                None,
            );
            std::thread::sleep(w.stuck_after * 3);
            drop(held);
        }
        Some(Sabotage::Panic) => panic!("sabotage"),
        // Leaks as an error path that forgets its page would; tried until it succeeds (the
        // pool or the budget may be exhausted right now).
        Some(Sabotage::LeakFrame) => {
            leak_one(|| w.pool.alloc(false).is_ok());
        }
        Some(Sabotage::LeakDevicePage) => leak_one(|| {
            let ok = w.device.alloc_page(false).is_ok();
            if !ok {
                let _ = w.ctx.driver().evict(1);
            }
            ok
        }),
    }
}

/// Calls `leak` until it says it leaked something.
fn leak_one(mut leak: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !leak() {
        assert!(
            Instant::now() < deadline,
            "the sabotage found nothing to leak"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
