//! A userfaultfd, over the raw system call and ioctls (declared here from the kernel's UAPI,
//! so the build needs no bindgen): opening it with or without kernel-mode faults, the feature
//! handshake, registration, and the resolving ioctls the CPU mirror uses.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `_IOC(dir, 0xAA, nr, size)` as the generic ioctl encoding builds it.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, 24);
const UFFDIO_REGISTER: u64 = ioc(IOC_READ | IOC_WRITE, 0x00, 32);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, 16);
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, 16);
const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_READ | IOC_WRITE, 0x06, 24);
const UFFDIO_CONTINUE: u64 = ioc(IOC_READ | IOC_WRITE, 0x07, 32);

const UFFD_API: u64 = 0xAA;
/// Flag of the `userfaultfd` system call: only faults from user mode are reported.
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Features asked for.
const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const FEATURE_THREAD_ID: u64 = 1 << 8;
const FEATURE_MINOR_SHMEM: u64 = 1 << 10;
const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

const REGISTER_MODE_MISSING: u64 = 1 << 0;
const REGISTER_MODE_WP: u64 = 1 << 1;
const REGISTER_MODE_MINOR: u64 = 1 << 2;

const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Maps the page write-protected (the kernel's `UFFDIO_CONTINUE_MODE_WP`, Linux 6.4 on).
const CONTINUE_MODE_WP: u64 = 1 << 1;

/// The event of a page fault message.
const EVENT_PAGEFAULT: u8 = 0x12;
/// Flags of a page fault message.
pub(crate) const FAULT_WRITE: u64 = 1 << 0;
pub(crate) const FAULT_WP: u64 = 1 << 1;

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}

#[repr(C)]
struct Continue {
    range: Range,
    mode: u64,
    mapped: i64,
}

/// One message as the kernel writes it (32 bytes); only page faults are asked for.
#[repr(C)]
#[derive(Clone, Copy)]
struct Msg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    ptid: u32,
    _pad: u32,
}

/// A page fault read from the descriptor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    /// The faulting address (page-aligned by the kernel unless exact addresses were asked).
    pub(crate) addr: u64,
    /// `FAULT_WRITE`, `FAULT_WP`, ...
    pub(crate) flags: u64,
    /// The faulting thread.
    pub(crate) tid: u32,
}

/// Which faults reach the handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultScope {
    /// Every access, including the kernel's own on behalf of a system call (`read(2)` into a
    /// managed buffer): needs privilege (`CAP_SYS_PTRACE`, or `vm.unprivileged_userfaultfd`).
    All,
    /// Accesses from user mode only (`UFFD_USER_MODE_ONLY`): a system call that touches a
    /// page that is not present fails with `EFAULT` instead of being served.
    UserOnly,
}

/// An open userfaultfd (non-blocking).
pub(crate) struct Uffd {
    fd: OwnedFd,
    scope: FaultScope,
}

fn ioctl<T>(fd: &OwnedFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is one of the userfaultfd requests declared above, whose argument is the
    // `#[repr(C)]` struct `T` laid out as the kernel expects; `arg` is a live exclusive borrow.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd that serves every fault if the process may, else one that serves
    /// user-mode faults only; negotiates shmem minor faults and write protection.
    pub(crate) fn open() -> io::Result<Uffd> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let (fd, scope) = match open_raw(flags) {
            Ok(fd) => (fd, FaultScope::All),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                (open_raw(flags | UFFD_USER_MODE_ONLY)?, FaultScope::UserOnly)
            }
            Err(e) => return Err(e),
        };
        let mut api = Api {
            api: UFFD_API,
            features: FEATURE_PAGEFAULT_FLAG_WP
                | FEATURE_MISSING_SHMEM
                | FEATURE_THREAD_ID
                | FEATURE_MINOR_SHMEM
                | FEATURE_WP_HUGETLBFS_SHMEM,
            ioctls: 0,
        };
        ioctl(&fd, UFFDIO_API, &mut api)?;
        Ok(Uffd { fd, scope })
    }

    /// Which faults this descriptor serves.
    pub(crate) fn scope(&self) -> FaultScope {
        self.scope
    }

    /// Registers `[start, start + len)` (a shared mapping of a memfd) for missing and minor
    /// faults and for write protection.
    pub(crate) fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Register {
            range: Range { start, len },
            mode: REGISTER_MODE_MISSING | REGISTER_MODE_MINOR | REGISTER_MODE_WP,
            ioctls: 0,
        };
        ioctl(&self.fd, UFFDIO_REGISTER, &mut r)
    }

    /// Ends the registration of `[start, start + len)`.
    pub(crate) fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(&self.fd, UFFDIO_UNREGISTER, &mut r)
    }

    /// Maps the page-cache pages behind `[start, start + len)` (which must exist) and wakes
    /// the threads waiting there; `wp` maps them write-protected. Pages mapped already are
    /// skipped over. Returns the bytes skipped (mapped already).
    pub(crate) fn map(&self, start: u64, len: u64, wp: bool) -> io::Result<u64> {
        let mut done = 0u64;
        let mut skipped = 0u64;
        while done < len {
            let mut c = Continue {
                range: Range {
                    start: start + done,
                    len: len - done,
                },
                mode: if wp { CONTINUE_MODE_WP } else { 0 },
                mapped: 0,
            };
            match ioctl(&self.fd, UFFDIO_CONTINUE, &mut c) {
                Ok(()) => return Ok(skipped),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // A page of the range was mapped already: step over it.
                    done += c.mapped.max(0) as u64 + crate::mm::PAGE;
                    skipped += crate::mm::PAGE;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    done += c.mapped.max(0) as u64;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(skipped)
    }

    /// Sets (`wp`) or clears write protection of the mapped pages of the range; clearing
    /// wakes the threads waiting there.
    pub(crate) fn write_protect(&self, start: u64, len: u64, wp: bool) -> io::Result<()> {
        let mut w = WriteProtect {
            range: Range { start, len },
            mode: if wp { WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(&self.fd, UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Wakes the threads waiting on faults in the range without resolving them (they fault
    /// again).
    pub(crate) fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(&self.fd, UFFDIO_WAKE, &mut r)
    }

    /// Waits up to `timeout_ms` for faults, then reads the page faults pending (none on a
    /// timeout or an interrupted wait).
    pub(crate) fn read_faults(&self, timeout_ms: i32, out: &mut Vec<Fault>) -> io::Result<()> {
        out.clear();
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, borrowed for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n <= 0 {
            return Ok(());
        }
        let mut msgs = [Msg {
            event: 0,
            _reserved: [0; 7],
            flags: 0,
            address: 0,
            ptid: 0,
            _pad: 0,
        }; 16];
        // SAFETY: the buffer is `msgs`, valid for writes of its whole size; the kernel writes
        // whole 32-byte messages into it.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                std::mem::size_of_val(&msgs),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        let n = got as usize / std::mem::size_of::<Msg>();
        out.extend(
            msgs[..n]
                .iter()
                .filter(|m| m.event == EVENT_PAGEFAULT)
                .map(|m| Fault {
                    addr: m.address,
                    flags: m.flags,
                    tid: m.ptid,
                }),
        );
        Ok(())
    }
}

fn open_raw(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the userfaultfd system call takes only flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_uapi() {
        assert_eq!(std::mem::size_of::<Msg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
    }
}
