//! Typed views of a CPU-mapped buffer's memory, and the bookkeeping that keeps them sound:
//! while a shared view lives, nothing changes the buffer's bytes (no `write`, no kernel
//! launch, no `free`); while an exclusive view lives, nothing else reads or writes them
//! either. Conflicting calls fail at once with [`Error::ViewActive`] (waiting could deadlock
//! a thread against its own view). Moving pages is allowed: a page that moves away under a
//! view faults back, with the same bytes, on the view's next access.

use std::ops::{Deref, DerefMut};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Who is using a buffer's bytes now.
#[derive(Default, Debug)]
pub(crate) struct Access {
    state: Mutex<State>,
    /// Signalled when the last library read or write ends (a `close` may be waiting).
    idle: Condvar,
}

#[derive(Default, Debug)]
struct State {
    views: usize,
    view_mut: bool,
    readers: usize,
    writers: usize,
    /// The buffer is freed (or being freed): every use fails with [`Error::Freed`].
    closed: bool,
}

/// What an operation does to the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Use {
    /// Reads them (`Buffer::read`).
    Read,
    /// Changes or frees them (`Buffer::write`, a kernel launch, `free`).
    Write,
}

/// A use of the bytes, held until dropped.
pub(crate) struct Token<'a> {
    access: &'a Access,
    kind: Kind,
}

#[derive(Clone, Copy)]
enum Kind {
    View,
    ViewMut,
    Read,
    Write,
}

impl Access {
    fn take(&self, kind: Kind) -> Result<Token<'_>> {
        let mut s = self.state.lock();
        if s.closed {
            return Err(Error::Freed);
        }
        let ok = match kind {
            Kind::View => !s.view_mut && s.writers == 0,
            Kind::ViewMut => !s.view_mut && s.views == 0 && s.readers == 0 && s.writers == 0,
            Kind::Read => !s.view_mut,
            Kind::Write => !s.view_mut && s.views == 0,
        };
        if !ok {
            return Err(Error::ViewActive);
        }
        match kind {
            Kind::View => s.views += 1,
            Kind::ViewMut => s.view_mut = true,
            Kind::Read => s.readers += 1,
            Kind::Write => s.writers += 1,
        }
        Ok(Token { access: self, kind })
    }

    /// A read or write of the bytes by the library: fails if a view forbids it.
    pub(crate) fn begin(&self, what: Use) -> Result<Token<'_>> {
        self.take(match what {
            Use::Read => Kind::Read,
            Use::Write => Kind::Write,
        })
    }

    /// Ends every use, for `free`: fails with [`Error::ViewActive`] while a view lives (it
    /// may be the caller's own), waits for the library's reads and writes in progress (short
    /// calls, which checked the buffer before `close` and would otherwise reach whatever is
    /// mapped at its addresses next), and from then on every use fails with
    /// [`Error::Freed`]. A second `close` fails with `Freed`.
    pub(crate) fn close(&self) -> Result<()> {
        let mut s = self.state.lock();
        loop {
            if s.closed {
                return Err(Error::Freed);
            }
            if s.views > 0 || s.view_mut {
                return Err(Error::ViewActive);
            }
            if s.readers == 0 && s.writers == 0 {
                s.closed = true;
                return Ok(());
            }
            self.idle.wait(&mut s);
        }
    }
}

impl Drop for Token<'_> {
    fn drop(&mut self) {
        let mut s = self.access.state.lock();
        match self.kind {
            Kind::View => s.views -= 1,
            Kind::ViewMut => s.view_mut = false,
            Kind::Read => s.readers -= 1,
            Kind::Write => s.writers -= 1,
        }
        if s.readers == 0 && s.writers == 0 {
            self.access.idle.notify_all();
        }
    }
}

/// A shared view of a CPU-mapped buffer as `&[T]`, borrowed from the buffer. Its elements
/// are read with plain loads; pages on the device fault back on first touch.
pub struct View<'a, T> {
    slice: &'a [T],
    _token: Token<'a>,
}

/// An exclusive view of a CPU-mapped buffer as `&mut [T]`, borrowed from the buffer.
pub struct ViewMut<'a, T> {
    slice: &'a mut [T],
    _token: Token<'a>,
}

impl<'a, T: bytemuck::Pod> View<'a, T> {
    /// A view of `len` bytes at `ptr` (whole `T`s), holding `access` shared.
    ///
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped and readable (faults served) for `'a`, aligned for
    /// `T`, and its bytes must not change while the token is held (the `Access` rules).
    pub(crate) unsafe fn new(ptr: *const u8, len: usize, access: &'a Access) -> Result<Self> {
        let token = access.take(Kind::View)?;
        let n = len / std::mem::size_of::<T>().max(1);
        // SAFETY: the caller's contract: mapped, aligned, unchanged while the token lives;
        // any bit pattern is a valid `T` (`Pod`).
        let slice = unsafe { std::slice::from_raw_parts(ptr.cast::<T>(), n) };
        Ok(View {
            slice,
            _token: token,
        })
    }
}

impl<'a, T: bytemuck::Pod> ViewMut<'a, T> {
    /// An exclusive view of `len` bytes at `ptr` (whole `T`s), holding `access` exclusively.
    ///
    /// # Safety
    /// As [`View::new`], and writable; nothing else may read or write the bytes while the
    /// token is held (the `Access` rules).
    pub(crate) unsafe fn new(ptr: *mut u8, len: usize, access: &'a Access) -> Result<Self> {
        let token = access.take(Kind::ViewMut)?;
        let n = len / std::mem::size_of::<T>().max(1);
        // SAFETY: the caller's contract, and the exclusive token: no other reference reaches
        // these bytes while this one lives.
        let slice = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<T>(), n) };
        Ok(ViewMut {
            slice,
            _token: token,
        })
    }
}

impl<T> Deref for View<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T> Deref for ViewMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.slice
    }
}

impl<T> DerefMut for ViewMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.slice
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for View<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("len", &self.slice.len())
            .finish()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for ViewMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewMut")
            .field("len", &self.slice.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_exclude_what_would_change_or_alias_their_bytes() {
        let a = Access::default();
        let v1 = a.take(Kind::View).unwrap();
        let _v2 = a.take(Kind::View).unwrap();
        let r = a.begin(Use::Read).unwrap();
        assert!(matches!(a.begin(Use::Write), Err(Error::ViewActive)));
        assert!(matches!(a.take(Kind::ViewMut), Err(Error::ViewActive)));
        drop((v1, _v2, r));
        let w = a.begin(Use::Write).unwrap();
        let _w2 = a.begin(Use::Write).unwrap();
        assert!(matches!(a.take(Kind::View), Err(Error::ViewActive)));
        drop((w, _w2));
        let m = a.take(Kind::ViewMut).unwrap();
        assert!(matches!(a.begin(Use::Read), Err(Error::ViewActive)));
        assert!(matches!(a.take(Kind::View), Err(Error::ViewActive)));
        drop(m);
        a.take(Kind::ViewMut).unwrap();
    }
}
