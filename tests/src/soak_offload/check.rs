//! The offload soak's checks of bytes and entries: through the library, in place as a
//! device mirror reads, and at the end of a run.

use hetmem::mm::hmm_range_fault;
use hetmem::offload::Buffer;
use hetmem::Error;

use super::{retried, Owned, World};
use crate::harness::unsettled;

/// The end of a run: every byte of every buffer and of the shared one, read through the
/// library and through pointers, and every entry settled.
pub(super) fn finish(w: &World, all: &[Vec<Owned>]) -> Result<(), String> {
    let pm = w.ctx.space().pagemap().clone();
    for (k, owned) in all.iter().enumerate() {
        for (s, o) in owned.iter().enumerate() {
            let Some(b) = &o.buf else { continue };
            let at = |e: String| format!("at the end, thread {k} buffer {s}: {e}");
            check_read(w, b, &o.shadow).map_err(at)?;
            check_peek(w, b, &o.shadow).map_err(at)?;
            if o.mapped {
                let v = b.view::<u8>().map_err(|e| at(format!("view: {e}")))?;
                first_difference(&v, &o.shadow).map_err(|e| at(format!("through a view: {e}")))?;
            }
            let bad = unsettled(w.ctx.space(), &pm, b.addr(), b.len().div_ceil(4096));
            if !bad.is_empty() {
                return Err(at(bad.join("; ")));
            }
        }
    }
    check_read(w, &w.shared, &w.shared_bytes).map_err(|e| format!("the shared buffer: {e}"))?;
    let bad = unsettled(
        w.ctx.space(),
        &pm,
        w.shared.addr(),
        w.shared_bytes.len() / 4096,
    );
    if !bad.is_empty() {
        return Err(format!("the shared buffer: {}", bad.join("; ")));
    }
    Ok(())
}

/// Where `got` first differs from `want`, as an error.
pub(super) fn first_difference(got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} bytes, {} expected", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => {
            let wrong = got[i..]
                .iter()
                .zip(&want[i..])
                .filter(|(a, b)| a != b)
                .count();
            Err(format!(
                "byte {i} (page {}) reads {:#04x}, {:#04x} expected ({wrong} bytes wrong from there)",
                i / 4096,
                got[i],
                want[i]
            ))
        }
    }
}

/// Reads the whole buffer with `Buffer::read` (pages on the device come back) and compares.
pub(super) fn check_read(w: &World, b: &Buffer, want: &[u8]) -> Result<(), String> {
    let mut got = vec![0u8; want.len()];
    retried(w, || b.read(0, &mut got)).map_err(|e| format!("reading it: {e}"))?;
    first_difference(&got, want)
}

/// Reads the whole buffer where its pages are, without moving them, as a device mirror
/// does: `hmm_range_fault` with the driver's owner gives each page's frame or device page,
/// read between `read_begin` and `read_retry` (retried if an invalidation ran meanwhile).
pub(super) fn check_peek(w: &World, b: &Buffer, want: &[u8]) -> Result<(), String> {
    let space = w.ctx.space();
    let owner = w.ctx.driver().owner();
    let n = b.len().div_ceil(4096);
    let mut got = vec![0u8; n * 4096];
    for _ in 0..1000 {
        let seq = space.read_begin();
        let pfns = retried(w, || hmm_range_fault(space, b.addr(), n, false, owner))
            .map_err(|e| format!("hmm_range_fault: {e}"))?;
        let mut failed = None;
        for (k, p) in pfns.iter().enumerate() {
            let out = &mut got[k * 4096..(k + 1) * 4096];
            let r = if w.device.owns(p.pfn) {
                w.device.read_page(p.pfn, 0, out).map_err(Error::from)
            } else if w.pool.contains(p.pfn) {
                // A CPU-mapped buffer's pages are home frames, which the safe accessors
                // refuse (a view may show them).
                // SAFETY: the buffer is this thread's: no other thread reaches it, and this
                // thread holds no view of it and stores through none of its pointers now.
                unsafe { w.pool.read_owned(p.pfn, 0, out) }.map_err(Error::from)
            } else {
                space.pagemap().read_frame(p.pfn, 0, out)
            };
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if space.read_retry(seq) {
            continue;
        }
        if let Some(e) = failed {
            return Err(format!("reading a page in place: {e}"));
        }
        return first_difference(&got[..want.len()], want).map_err(|e| format!("in place: {e}"));
    }
    Err(format!(
        "in place: invalidated 1000 times running ({n} pages)"
    ))
}
