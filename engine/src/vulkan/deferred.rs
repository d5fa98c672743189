//! Destruction deferred by timeline value: an object the device may still be using (a
//! kernel's pipeline, a page table, a chunk) is not destroyed when its owner lets go of it,
//! but kept with the timeline values of the last submissions that used it (one per queue)
//! and destroyed once every queue's timeline has passed them. Nothing here waits for the
//! device, so dropping a kernel or a table never stalls other threads' work.

use parking_lot::Mutex;

use super::context::Context;
use super::memory::Buffer;
use super::pipeline::Pipeline;

/// Queues a backend submits on (transfer, compute), the index of [`LastUse`].
pub(crate) const QUEUES: usize = 2;

/// Per queue, the timeline value of the last submission that used an object (0: none).
pub(crate) type LastUse = [u64; QUEUES];

/// An object and the submissions that used it, while its owner still has it.
pub(crate) struct Tracked<T> {
    /// The object.
    pub(crate) obj: T,
    /// Last submission per queue that used it.
    pub(crate) last_use: LastUse,
}

impl<T> Tracked<T> {
    /// An object no submission has used yet.
    pub(crate) fn new(obj: T) -> Tracked<T> {
        Tracked {
            obj,
            last_use: [0; QUEUES],
        }
    }

    /// Records that the submission with `value` on queue `q` uses the object.
    pub(crate) fn used(&mut self, q: usize, value: u64) {
        self.last_use[q] = self.last_use[q].max(value);
    }
}

/// An object whose owner let go of it.
pub(crate) enum Doomed {
    /// A kernel's pipeline and layouts.
    Pipeline(Pipeline),
    /// A buffer with its memory (a page table, a chunk).
    Buffer(Buffer),
}

struct Grave<T> {
    doomed: T,
    last_use: LastUse,
}

/// Objects waiting for the timelines to pass their last use.
pub(crate) struct Graveyard<T = Doomed> {
    graves: Mutex<Vec<Grave<T>>>,
}

impl<T> Default for Graveyard<T> {
    fn default() -> Self {
        Graveyard {
            graves: Mutex::new(Vec::new()),
        }
    }
}

impl<T> Graveyard<T> {
    /// Keeps `doomed` until every queue has completed `last_use`.
    pub(crate) fn bury(&self, doomed: T, last_use: LastUse) {
        self.graves.lock().push(Grave { doomed, last_use });
    }

    /// Objects still waiting.
    pub(crate) fn len(&self) -> usize {
        self.graves.lock().len()
    }

    /// Takes out the objects whose last use every queue has completed (`completed()[q]` is
    /// queue `q`'s timeline value, asked only when some object waits); all of them when it
    /// is `None` (the device is idle).
    pub(crate) fn ready(&self, completed: impl FnOnce() -> Option<LastUse>) -> Vec<T> {
        let mut graves = self.graves.lock();
        if graves.is_empty() {
            return Vec::new();
        }
        let completed = completed();
        let passed = |g: &Grave<T>| match completed {
            None => true,
            Some(c) => g.last_use.iter().zip(c).all(|(&used, done)| used <= done),
        };
        let mut out = Vec::new();
        let mut i = 0;
        while i < graves.len() {
            if passed(&graves[i]) {
                out.push(graves.swap_remove(i).doomed);
            } else {
                i += 1;
            }
        }
        out
    }
}

/// The completed timeline value of each queue (a queue that does not exist counts as having
/// completed everything; a query that fails, as having completed nothing).
pub(crate) fn completed(ctx: &Context) -> LastUse {
    let query = |q: Option<&super::queue::Queue>| match q {
        None => u64::MAX,
        Some(q) => q.completed(&ctx.device).unwrap_or(0),
    };
    [query(Some(&ctx.transfer)), query(ctx.compute.as_ref())]
}

/// The last submitted value of each queue: what a conservative key for an object used by
/// any submission so far is.
pub(crate) fn submitted(ctx: &Context) -> LastUse {
    [
        ctx.transfer.last_submitted(),
        ctx.compute.as_ref().map_or(0, |q| q.last_submitted()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_waits_for_every_queue() {
        let g = Graveyard::<&str>::default();
        g.bury("never used", [0, 0]);
        g.bury("transfer 3", [3, 0]);
        g.bury("both", [3, 5]);
        assert_eq!(g.ready(|| Some([0, 0])), vec!["never used"]);
        assert!(g.ready(|| Some([2, u64::MAX])).is_empty());
        assert_eq!(g.ready(|| Some([3, 4])), vec!["transfer 3"]);
        assert_eq!(g.len(), 1);
        assert_eq!(
            g.ready(|| None),
            vec!["both"],
            "an idle device passed everything"
        );
        assert_eq!(g.len(), 0);
        let asked = std::cell::Cell::new(false);
        let none = g.ready(|| {
            asked.set(true);
            None
        });
        assert!(none.is_empty());
        assert!(
            !asked.get(),
            "the timelines are not asked when nothing waits"
        );
        let mut t = Tracked::new(());
        t.used(1, 7);
        t.used(1, 4);
        assert_eq!(
            t.last_use,
            [0, 7],
            "an older value recorded later keeps the newer"
        );
    }
}
