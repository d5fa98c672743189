//! Lock tracking, with the `lock-tracking` feature (the tests and the soak turn it on): every
//! thread's held locks by rank (the map lock, a VMA's lock, a page-table leaf's lock, the CPU
//! mirror's lock), so that a watchdog can say what a stuck thread holds, and a lock taken out
//! of rank order fails at once, naming both, instead of deadlocking some day.
//!
//! Ranks follow the lock order of `docs/ARCHITECTURE.md`, outermost first. Equal ranks may
//! nest (mremap and fork hold two leaves, fork two spaces' map locks). Page locks are not
//! tracked: a migration holds thousands, and they are only ever tried under a leaf lock.
//! Without the feature every call here compiles to nothing.

/// A tracked lock's place in the lock order, outermost first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rank {
    /// An address space's map lock.
    Map,
    /// A VMA's lock (migration walks, hole population).
    Vma,
    /// A page-table leaf's lock.
    Leaf,
    /// The CPU mirror's lock (mapping into, or dropping from, the process's page table).
    Mirror,
}

/// A tracked hold: dropping it records the release.
#[must_use]
pub(crate) struct Held {
    #[cfg(feature = "lock-tracking")]
    rank: Rank,
    _here: std::marker::PhantomData<*const ()>,
}

/// Records that this thread takes a lock of `rank`. With tracking on, taking it inside a lock
/// of a higher rank panics with both named.
#[inline]
pub(crate) fn acquire(rank: Rank) -> Held {
    #[cfg(feature = "lock-tracking")]
    imp::push(rank);
    #[cfg(not(feature = "lock-tracking"))]
    let _ = rank;
    Held {
        #[cfg(feature = "lock-tracking")]
        rank,
        _here: std::marker::PhantomData,
    }
}

impl Drop for Held {
    #[inline]
    fn drop(&mut self) {
        #[cfg(feature = "lock-tracking")]
        imp::pop(self.rank);
    }
}

/// True if this build tracks locks.
pub fn tracking() -> bool {
    cfg!(feature = "lock-tracking")
}

/// Every thread that holds a tracked lock now, by name, with its locks in the order taken
/// (empty without tracking).
pub fn held_by_threads() -> Vec<(String, Vec<Rank>)> {
    #[cfg(feature = "lock-tracking")]
    return imp::all();
    #[cfg(not(feature = "lock-tracking"))]
    Vec::new()
}

/// [`held_by_threads`] as one line per thread, for a watchdog's report.
pub fn report() -> String {
    if !tracking() {
        return "locks held: not tracked (build hetmem with the lock-tracking feature)".into();
    }
    let held = held_by_threads();
    if held.is_empty() {
        return "locks held: none".into();
    }
    held.iter()
        .map(|(t, ranks)| format!("{t} holds {ranks:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(feature = "lock-tracking")]
mod imp {
    use std::sync::{Arc, Mutex, OnceLock};

    use super::Rank;

    type Stack = Arc<Mutex<Vec<Rank>>>;

    /// Every thread's stack, by name (threads that ended keep an empty entry until pruned).
    fn registry() -> &'static Mutex<Vec<(String, Stack)>> {
        static R: OnceLock<Mutex<Vec<(String, Stack)>>> = OnceLock::new();
        R.get_or_init(|| Mutex::new(Vec::new()))
    }

    thread_local! {
        static MINE: Stack = {
            let s: Stack = Arc::new(Mutex::new(Vec::new()));
            let name = std::thread::current()
                .name()
                .map_or_else(|| format!("{:?}", std::thread::current().id()), str::to_owned);
            let mut r = registry().lock().unwrap_or_else(|e| e.into_inner());
            // Entries of threads that are gone (only the registry holds them) go.
            r.retain(|(_, s)| Arc::strong_count(s) > 1);
            r.push((name, s.clone()));
            s
        };
    }

    pub(super) fn push(rank: Rank) {
        MINE.with(|s| {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(&top) = s.iter().max() {
                if top > rank {
                    let held = s.clone();
                    drop(s);
                    panic!("lock order: {rank:?} taken while holding {held:?} (ranks: Map < Vma < Leaf < Mirror)");
                }
            }
            s.push(rank);
        });
    }

    pub(super) fn pop(rank: Rank) {
        let _ = MINE.try_with(|s| {
            let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = s.iter().rposition(|&r| r == rank) {
                s.remove(i);
            }
        });
    }

    pub(super) fn all() -> Vec<(String, Vec<Rank>)> {
        let r = registry().lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .filter_map(|(name, s)| {
                let s = s.lock().unwrap_or_else(|e| e.into_inner());
                (!s.is_empty()).then(|| (name.clone(), s.clone()))
            })
            .collect()
    }
}

#[cfg(all(test, feature = "lock-tracking"))]
mod tests {
    use super::*;

    #[test]
    fn holds_are_listed_and_out_of_order_locks_are_caught() {
        let a = acquire(Rank::Vma);
        let b = acquire(Rank::Leaf);
        let mine = held_by_threads()
            .into_iter()
            .find(|(_, r)| r == &vec![Rank::Vma, Rank::Leaf]);
        assert!(mine.is_some(), "{:?}", held_by_threads());
        drop(a);
        drop(b);
        let r = std::thread::spawn(|| {
            let _l = acquire(Rank::Leaf);
            let _m = acquire(Rank::Map);
        })
        .join();
        assert!(r.is_err(), "a map lock under a leaf lock must fail");
    }
}
