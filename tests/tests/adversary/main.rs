//! Adversarial tests: sequences of public API calls that try to lose bytes, leave pages
//! locked or migration entries behind, leak frames, hang or panic.
//!
//! Every test runs its body under a watchdog (a hang is reported, not stuck). Tests named
//! `bug_*` reproduce defects that an adversarial review of the migration core found (each
//! failed before its fix, and guards it now); `testdriver_*` one of the test driver
//! `tests/src/dmirror.rs` (a mirror that used its frames before checking for an
//! invalidation); `held_*` are attacks the library survived from the start: chaos runs of
//! migrations, evictions, forks, protection changes, exhaustion and failed copies over both
//! memory kinds, checked byte for byte.
//!
//! Findings (see each test's doc comment for the scenario):
//! - reverse-map walks: `bug_device_restore_walk_misses_entry_moved_back`,
//!   `bug_vma_restore_walk_misses_child_entry_moved_back` (a migration entry moved away and
//!   back by mremap while a restore walked the reverse map was missed; now a walk holds the
//!   page's walk bit, which mremap and fork wait for);
//! - dying address spaces: `bug_dying_space_device_restore_releases_mapped_page`,
//!   `bug_dying_space_device_remap_gives_up`, `bug_evict_restore_races_space_drop` (a walk
//!   now reaches a dying space's page tables, which its teardown clears under leaf locks);
//! - destinations: `bug_bad_dst_on_uncollected_entry_is_accepted`,
//!   `bug_duplicate_dst_is_released_twice`, `bug_device_finalize_twice_double_releases`;
//! - device kernels: `bug_kernel_writes_read_only_buffer`,
//!   `bug_kernel_write_after_fork_reaches_child` (Vulkan: lavapipe in CI);
//! - pins: `bug_read_pin_of_read_only_hole_is_denied`, `bug_read_pin_after_fork_goes_stale`,
//!   `bug_pin_on_device_of_other_devices_page`, `bug_full_device_and_no_host_frames_is_busy_not_oom`;
//! - other: `bug_driver_drop_loses_device_pages`, `bug_notifier_reading_space_in_munmap_hangs`,
//!   `bug_huge_npages_overflows`, `bug_buffer_offset_overflow_panics`.

#![allow(clippy::type_complexity)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use hetmem::driver::{DriverConfig, GpuDriver};
use hetmem::migration::*;
use hetmem::mm::{
    flags, pin_pages, AddressSpace, MemoryKind, MremapFlags, Notifier, NotifyEvent, NotifyRange,
    PageMap, Prot, Pte, SpaceId, PAGE,
};
use hetmem::VirtAddr;
use hetmem::{Error, ErrorKind};
use hetmem_engine::{DeviceKind, HostFramePool, Pfn};
use hetmem_tests::dmirror::Dmirror;

use hetmem_tests::harness::*;

/// A notifier that sleeps in `invalidate` for events of `event` (a mirror waiting for the
/// device kernel that reads the range, as `GpuDriver`'s table does).
struct Sleepy {
    event: NotifyEvent,
    nap: Duration,
    entered: AtomicBool,
}

impl Notifier for Sleepy {
    fn invalidate(&self, _: SpaceId, r: &NotifyRange) {
        if r.event == self.event {
            self.entered.store(true, Ordering::SeqCst);
            thread::sleep(self.nap);
        }
    }
}

/// Errors a racing operation may legitimately meet.
fn benign(e: &Error) -> bool {
    matches!(
        e,
        Error::NotMapped(_)
            | Error::AcrossVmas { .. }
            | Error::Busy(_)
            | Error::NoAccess(_)
            | Error::MigrationInProgress
    ) || e.kind() == ErrorKind::OutOfMemory
        || e.kind() == ErrorKind::Transient
}

mod chaos;
mod owning_and_pins;
mod races;
mod teardown_and_input;
