//! The floor under a device-resident pointer scan on this machine, with no hetmem code at all:
//! the three things such a scan must do to 256 MiB, each timed alone on one thread, over a
//! memfd as hetmem's host frames are:
//! - copy the bytes back into host frames (one `memcpy`);
//! - map the frames into the process in 4 KiB entries (touching one byte per page of a fresh
//!   shared mapping: the kernel maps up to its fault-around size per fault), and, beside it,
//!   the same through `MAP_POPULATE`;
//! - scan the mapped bytes (u64 sum, as the `pointers` bench does).
//!
//! A scan of device-resident memory needs all three; a scan of host-resident, mapped memory
//! only the last. `cargo run --release -p hetmem-bench --example scan_floor [MiB] [rounds]`.

use std::time::Instant;

/// Maps `len` bytes of `fd` shared with protection `prot` and extra `flags`.
fn map(fd: i32, len: usize, prot: i32, flags: i32) -> anyhow::Result<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel; nothing else is at that address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED | flags,
            fd,
            0,
        )
    };
    anyhow::ensure!(
        p != libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    Ok(p.cast())
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: `p` is a mapping of `len` bytes this program made and no longer reads.
    unsafe { libc::munmap(p.cast(), len) };
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(4), |a| a.parse())?;
    let len = mib << 20;
    // SAFETY: a plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"scan-floor".as_ptr(), 0) };
    anyhow::ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is the memfd just made.
    anyhow::ensure!(unsafe { libc::ftruncate(fd, len as libc::off_t) } == 0);
    let frames = map(fd, len, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    // SAFETY: `frames` maps `len` writable bytes that only this slice reaches.
    let frames = unsafe { std::slice::from_raw_parts_mut(frames, len) };
    frames.fill(1);
    let device: Vec<u64> = (0..len as u64 / 8).collect();
    for _ in 0..rounds {
        let t = Instant::now();
        // SAFETY: both spans are `len` bytes and do not overlap (a Vec and a mapping).
        unsafe {
            std::ptr::copy_nonoverlapping(device.as_ptr().cast::<u8>(), frames.as_mut_ptr(), len)
        };
        let copy = t.elapsed();

        let view = map(fd, len, libc::PROT_READ, 0)?;
        let t = Instant::now();
        let mut touched = 0u64;
        for off in (0..len).step_by(4096) {
            // SAFETY: `view` maps `len` readable bytes; `off` is inside.
            touched += u64::from(unsafe { std::ptr::read_volatile(view.add(off)) });
        }
        let mapping = t.elapsed();
        // SAFETY: `view` maps `len` bytes, aligned to a page, so to u64.
        let words = unsafe { std::slice::from_raw_parts(view.cast::<u64>(), len / 8) };
        let t = Instant::now();
        let sum = words.iter().fold(0u64, |a, &w| a.wrapping_add(w));
        let scan = t.elapsed();
        unmap(view, len);

        let t = Instant::now();
        let populated = map(fd, len, libc::PROT_READ, libc::MAP_POPULATE)?;
        let populate = t.elapsed();
        unmap(populated, len);
        std::hint::black_box((touched, sum));
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        println!(
            "{mib} MiB: copy back {:.1} ms, map in 4 KiB entries {:.1} ms (MAP_POPULATE {:.1} ms), \
             scan {:.1} ms; the three {:.1} ms of CPU time for a device-resident scan, against \
             {:.1} ms for a host-resident one",
            ms(copy),
            ms(mapping),
            ms(populate),
            ms(scan),
            ms(copy + mapping + scan),
            ms(scan)
        );
    }
    Ok(())
}
