//! A CPU fault on a device-private entry racing a migration of the same page.
//!
//! The fault (`AddressSpace::with_page`) tries the page lock *under the leaf lock*, where
//! the entry still names the page, and only then takes a reference; when the page is busy
//! it drops the leaf lock and waits for the unlock holding no reference, then looks again.
//! The migration (`collect_one` and finalize in `migration/vma.rs`) tries the page lock under
//! the leaf lock, replaces the entry by a migration entry (the mapping's reference passes to
//! it), goes on only if that reference is the page's only one, and at the end points the
//! entry at the new page and frees the old one under the leaf lock.
//!
//! The leaf is a mutex over the entry here; the page words and every lock, reference and
//! wake-up operation on them are the real ones (`page_lock.rs`).

use loom::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use crate::failure_of;
use crate::page_lock::{self, PageLock};

/// The entry of one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Maps the device-private page (its mapping holds one reference).
    Device,
    /// A migration holds the page (and the mapping's reference).
    Migration,
    /// Maps a host page: the device page is gone.
    Host,
}

/// One device-private page mapped at one address.
struct World {
    leaf: Mutex<Entry>,
    flags: AtomicU32,
    refcount: AtomicU32,
    freed: AtomicBool,
}

impl World {
    fn new() -> Arc<World> {
        Arc::new(World {
            leaf: Mutex::new(Entry::Device),
            flags: AtomicU32::new(0),
            refcount: AtomicU32::new(1),
            freed: AtomicBool::new(false),
        })
    }
    fn page_lock(&self) -> PageLock<'_> {
        PageLock::new(&self.flags, 1)
    }
    /// The last reference went: the page is free, its flags clear, its waiters woken.
    fn free(&self) {
        assert!(
            !self.freed.swap(true, Ordering::AcqRel),
            "device page freed twice"
        );
        self.page_lock().clear_all();
    }
    fn put(&self) {
        let old = page_lock::put(&self.refcount);
        assert!(old > 0, "reference dropped on a free page");
        if old == 1 {
            self.free();
        }
    }
    /// What the fault does with the page locked and referenced: the driver's
    /// `migrate_to_ram` moves it home (the entry maps a host page, the mapping's reference
    /// goes).
    fn migrate_to_ram(&self) {
        assert!(
            !self.freed.load(Ordering::Acquire),
            "the fault holds a freed page"
        );
        let mut entry = self.leaf.lock().unwrap();
        if *entry == Entry::Device {
            *entry = Entry::Host;
            drop(entry);
            self.put();
        }
    }
}

/// The fault as `with_page` runs it.
fn fault(w: &World) {
    loop {
        let entry = w.leaf.lock().unwrap();
        match *entry {
            Entry::Host => return,
            Entry::Migration => {
                drop(entry);
                w.page_lock().wait_unlocked();
            }
            Entry::Device => {
                if !w.page_lock().trylock() {
                    drop(entry);
                    w.page_lock().wait_unlocked();
                    continue;
                }
                page_lock::get(&w.refcount);
                drop(entry);
                w.migrate_to_ram();
                w.page_lock().unlock();
                w.put();
            }
        }
    }
}

/// The fault broken on purpose: it reads the entry under the leaf lock but locks and
/// references the page after dropping it, when the entry may no longer name the page.
fn fault_locking_outside_the_leaf(w: &World) {
    loop {
        let entry = *w.leaf.lock().unwrap();
        match entry {
            Entry::Host => return,
            Entry::Migration => w.page_lock().wait_unlocked(),
            Entry::Device => {
                if !w.page_lock().trylock() {
                    w.page_lock().wait_unlocked();
                    continue;
                }
                page_lock::get(&w.refcount);
                w.migrate_to_ram();
                w.page_lock().unlock();
                w.put();
            }
        }
    }
}

/// The migration of the page to host memory, from collect to finalize.
fn migration(w: &World) {
    let mut entry = w.leaf.lock().unwrap();
    if *entry != Entry::Device || !w.page_lock().trylock_taking(0, 0) {
        return;
    }
    *entry = Entry::Migration;
    if w.refcount.load(Ordering::Acquire) != 1 {
        // Held by someone else: put it back.
        *entry = Entry::Device;
        drop(entry);
        w.page_lock().unlock();
        return;
    }
    drop(entry);
    // (The copy runs here, with the page locked and unmapped.)
    let mut entry = w.leaf.lock().unwrap();
    *entry = Entry::Host;
    assert!(
        page_lock::drop_only_ref(&w.refcount),
        "the migration's reference is not the only one"
    );
    w.free();
    drop(entry);
}

fn fault_against_migration(fault: fn(&World)) {
    let w = World::new();
    let migrating = {
        let w = w.clone();
        thread::spawn(move || migration(&w))
    };
    fault(&w);
    migrating.join().unwrap();
    assert_eq!(*w.leaf.lock().unwrap(), Entry::Host);
    assert!(w.freed.load(Ordering::Acquire));
    assert_eq!(w.refcount.load(Ordering::Acquire), 0);
}

#[test]
fn fault_locks_under_the_leaf_then_references_and_waits_without_one() {
    loom::model(|| fault_against_migration(fault));
}

#[test]
#[ignore = "broken on purpose: run by fault_that_locks_outside_the_leaf_lock_takes_a_freed_page"]
fn broken_fault_locking_outside_the_leaf() {
    loom::model(|| fault_against_migration(fault_locking_outside_the_leaf));
}

#[test]
fn fault_that_locks_outside_the_leaf_lock_takes_a_freed_page() {
    let report = failure_of("fault::broken_fault_locking_outside_the_leaf");
    assert!(report.contains("freed page"), "{report}");
}
