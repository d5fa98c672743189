//! The CPU copier of a CPU Vulkan device (lavapipe): a thread that copies queued batches
//! with streaming stores, ordered with the device's queues through a timeline semaphore that
//! the thread signals from the host.
//!
//! On lavapipe a "device copy" is a memcpy run by the driver's queue thread, at 6-8 GB/s for
//! long regions on this project's VM, where a streaming copy reaches the memory bus's
//! 13-14 GB/s. A batch submitted with `queue_only` (the driver's pipelined migrations: the
//! calling thread goes on with the next chunk's page-table work) is therefore copied here:
//!
//! 1. the batch's spans are resolved under the chunks' lock, like a recorded batch;
//! 2. the job is queued to the copier with the values every queue had reached in submission
//!    order (the copy must come after every batch submitted before it);
//! 3. an empty batch is submitted on the transfer queue that waits for the copier's timeline
//!    to reach the job's value: its transfer-timeline value is the ticket's, so waiting,
//!    polling, retirement and the ordering of later batches work as for any batch;
//! 4. the copier waits for the earlier batches, copies, and signals its timeline.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use ash::vk;
use parking_lot::Mutex;

use super::conv::error;
use super::queue::wait_timeline as wait;
use crate::error::Result;
use crate::memcopy::{copy_spans, Span};

/// A queued copy: what to wait for, what to copy, what to signal.
struct Job {
    /// (timeline, value) of every queue at submission: the copy starts after them.
    after: Vec<(vk::Semaphore, u64)>,
    work: Arc<Work>,
    /// The copier timeline's value once this job is done.
    value: u64,
}

/// A job's copy, cut into pieces that the copier thread and threads waiting for a ticket
/// claim one at a time: two cores stream more bytes per second than one on this project's
/// VM (16.5 against 13.6 GB/s), and a thread waiting for its copy has nothing else to do.
struct Work {
    spans: Vec<Span>,
    /// `pieces[i]..pieces[i + 1]` is piece `i` of `spans`.
    pieces: Vec<usize>,
    /// Next piece to claim.
    next: AtomicUsize,
    /// Pieces copied (and fenced).
    done: AtomicUsize,
}

/// Spans are cut to at most this many bytes, and pieces gather spans up to about as many.
const PIECE_BYTES: usize = 512 << 10;

impl Work {
    fn new(spans: Vec<Span>) -> Work {
        let mut cut = Vec::with_capacity(spans.len());
        for s in spans {
            s.cut_into(PIECE_BYTES, &mut cut);
        }
        let mut pieces = vec![0];
        let mut bytes = 0;
        for (i, s) in cut.iter().enumerate() {
            bytes += s.len;
            if bytes >= PIECE_BYTES || i + 1 == cut.len() {
                pieces.push(i + 1);
                bytes = 0;
            }
        }
        Work {
            spans: cut,
            pieces,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        }
    }

    fn count(&self) -> usize {
        self.pieces.len() - 1
    }

    /// Claims and copies pieces until none is left to claim.
    fn help(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count() {
                return;
            }
            let piece = &self.spans[self.pieces[i]..self.pieces[i + 1]];
            // SAFETY: see `run`: the spans are live, disjoint, and each piece is claimed by
            // exactly one thread; `copy_spans` fences its streaming stores before returning.
            unsafe { copy_spans(piece, true) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    fn finished(&self) -> bool {
        self.done.load(Ordering::Acquire) == self.count()
    }
}

/// The copier thread and its timeline.
pub(crate) struct Copier {
    /// The copier's timeline semaphore, signalled from the host after each job.
    pub(crate) timeline: vk::Semaphore,
    /// Sender and last value handed out, under one lock so that values reach the thread in
    /// increasing order.
    state: Mutex<Option<(mpsc::Sender<Job>, u64)>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The job being copied, once its earlier batches are done: helpers join it.
    current: Arc<Mutex<Option<Arc<Work>>>>,
    /// The transfer-queue value of the last batch that waits for a job.
    last_batch: std::sync::atomic::AtomicU64,
}

impl Copier {
    /// Creates the timeline and starts the thread.
    pub(crate) fn new(device: &ash::Device) -> Result<Copier> {
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        let info = vk::SemaphoreCreateInfo::default().push_next(&mut ty);
        // SAFETY: the device is live and the create info outlives the call.
        let timeline = unsafe { device.create_semaphore(&info, None) }
            .map_err(|e| error("vkCreateSemaphore", e))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let dev = device.clone();
        let current = Arc::new(Mutex::new(None));
        let shown = current.clone();
        let thread = std::thread::Builder::new()
            .name("hetmem-copier".into())
            .spawn(move || run(&dev, timeline, rx, &shown));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                // SAFETY: nothing waits on or signals the new semaphore yet.
                unsafe { device.destroy_semaphore(timeline, None) };
                return Err(crate::error::EngineError::Vulkan(format!(
                    "cannot start the copier thread: {e}"
                )));
            }
        };
        Ok(Copier {
            timeline,
            state: Mutex::new(Some((tx, 0))),
            thread: Mutex::new(Some(thread)),
            current,
            last_batch: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Queues `spans` to be copied after the (timeline, value) pairs in `after`; returns the
    /// copier timeline's value that signals the copy done.
    pub(crate) fn queue(&self, after: Vec<(vk::Semaphore, u64)>, spans: Vec<Span>) -> Result<u64> {
        let mut state = self.state.lock();
        let Some((tx, last)) = state.as_mut() else {
            return Err(crate::error::EngineError::DeviceLost(
                "the copier has stopped".into(),
            ));
        };
        let value = *last + 1;
        tx.send(Job {
            after,
            work: Arc::new(Work::new(spans)),
            value,
        })
        .map_err(|_| crate::error::EngineError::DeviceLost("the copier thread has ended".into()))?;
        *last = value;
        Ok(value)
    }

    /// Records that transfer-queue batch `value` waits for a job that covers every batch
    /// before it (the caller records only a batch submitted right after the transfer-queue
    /// value its job waits for: one that another thread submitted in between would not be).
    pub(crate) fn submitted(&self, value: u64) {
        self.last_batch.fetch_max(value, Ordering::AcqRel);
    }

    /// Whether the transfer queue's latest batch `value` is one that waits for a job: a new
    /// job need not wait for it, since jobs run in order and that job waited for everything
    /// before it.
    pub(crate) fn is_own_batch(&self, value: u64) -> bool {
        value != 0 && self.last_batch.load(Ordering::Acquire) == value
    }

    /// Copies pieces of the job being copied, if there is one with pieces left; false if
    /// there was nothing to help with. For a thread about to wait for a ticket.
    pub(crate) fn help(&self) -> bool {
        let work = self.current.lock().clone();
        match work {
            Some(w) if w.next.load(Ordering::Relaxed) < w.count() => {
                w.help();
                true
            }
            _ => false,
        }
    }

    /// Blocks until the job with `value` is done (errors are logged: a lost device ends the
    /// wait too).
    pub(crate) fn wait(&self, device: &ash::Device, value: u64) {
        if let Err(e) = wait(device, self.timeline, value) {
            tracing::warn!("copier: waiting for job {value} failed: {e}");
        }
    }

    /// Stops the thread after it has finished (and signalled) every queued job. Must run
    /// before the device is idled for teardown (queued batches wait for the jobs); idempotent.
    pub(crate) fn stop(&self) {
        drop(self.state.lock().take());
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// Destroys the timeline. Only after [`Copier::stop`] and once the device is idle: a
    /// batch that waits on the semaphore may still be pending after the copier signalled it.
    pub(crate) fn destroy(&self, device: &ash::Device) {
        // SAFETY: the thread has ended (stop), and the caller waited for the device to be
        // idle, so no queue operation that waits on the semaphore is pending.
        unsafe { device.destroy_semaphore(self.timeline, None) };
    }
}

/// The copier thread: one job at a time, in order, until the sender is dropped.
fn run(
    device: &ash::Device,
    timeline: vk::Semaphore,
    rx: mpsc::Receiver<Job>,
    current: &Mutex<Option<Arc<Work>>>,
) {
    for job in rx {
        for &(sem, value) in &job.after {
            if let Err(e) = wait(device, sem, value) {
                // A lost device fails every ticket through its queues; the copy is moot.
                tracing::warn!("copier: waiting for earlier batches failed: {e}");
            }
        }
        // The spans were resolved inside live chunks and host frames; the batch that waits
        // for this job's value keeps them alive (a freed chunk is destroyed only once the
        // transfer timeline passes that batch); the plan refused overlapping pairs; the caller
        // holds every page involved (a migration keeps them locked until its ticket is done).
        *current.lock() = Some(job.work.clone());
        job.work.help();
        // Helpers may still be copying the pieces they claimed.
        let mut spins = 0u32;
        while !job.work.finished() {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *current.lock() = None;
        let info = vk::SemaphoreSignalInfo::default()
            .semaphore(timeline)
            .value(job.value);
        // SAFETY: only this thread signals the copier timeline, with increasing values.
        if let Err(e) = unsafe { device.signal_semaphore(&info) } {
            tracing::error!("copier: vkSignalSemaphore failed: {e}");
        }
    }
}
