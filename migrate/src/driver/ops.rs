//! The driver's pagemap callbacks (the kernel's `dev_pagemap_ops`): device pages freed back
//! to the device, and CPU faults on device-private pages served with a fault-around window,
//! also after the driver is gone.

use std::sync::atomic::Ordering;
use std::sync::Weak;

use hetmem_engine::{Device, EngineError, Pfn};
use parking_lot::Mutex;

use super::migrate::Inner;
use crate::error::{Error, ErrorKind, Result};
use crate::migration::*;
use crate::mm::{FaultContext, Owner, Page, PagemapOps, Pte, VirtAddr, PAGE};

/// The driver's pagemap callbacks. Once the driver is gone, a device that still holds pages
/// (its teardown could not bring them all home: no host frames) stays here, so that a fault
/// can still copy a page home and a freed page still goes back to the device.
pub(crate) struct Ops {
    driver: Weak<Inner>,
    pub(crate) orphan: Mutex<Option<(Device, Owner)>>,
}

impl Ops {
    /// The callbacks of the driver `driver` (not orphaned).
    pub(crate) fn new(driver: Weak<Inner>) -> Ops {
        Ops {
            driver,
            orphan: Mutex::new(None),
        }
    }

    /// The device to free pages into: the driver's, or the orphaned one.
    fn device(&self) -> Option<Device> {
        match self.driver.upgrade() {
            Some(d) => Some(d.device.clone()),
            None => self.orphan.lock().as_ref().map(|(d, _)| d.clone()),
        }
    }
}

impl PagemapOps for Ops {
    fn page_free(&self, page: &Page) {
        if let Some(d) = self.device() {
            if let Err(e) = d.free_page(page.pfn()) {
                tracing::error!("page_free {}: {e}", page.pfn());
            }
        }
    }

    fn pages_free(&self, pages: &[&Page]) {
        let pfns: Vec<Pfn> = pages.iter().map(|p| p.pfn()).collect();
        self.pfns_free(pages, &pfns);
    }

    fn pfns_free(&self, _: &[&Page], pfns: &[Pfn]) {
        if let Some(d) = self.device() {
            if let Err(e) = d.free_pages(pfns) {
                tracing::error!("pages_free of {} pages: {e}", pfns.len());
            }
        }
    }

    fn migrate_to_ram(&self, f: FaultContext<'_>) -> Result<()> {
        let Some(d) = self.driver.upgrade() else {
            let orphan = self.orphan.lock().clone();
            return match orphan {
                Some((device, owner)) => bring_home(&device, owner, &f),
                None => Err(Error::Engine(EngineError::DeviceLost(
                    "the page's driver was dropped".into(),
                ))),
            };
        };
        d.counters.faults.fetch_add(1, Ordering::Relaxed);
        // An aligned window around the fault, clipped to the mapping.
        let vma = f.space.vma(f.addr).ok_or(Error::NotMapped(f.addr))?;
        let span = d.fault_around as u64 * PAGE;
        let start = VirtAddr(f.addr.get() / span * span).max(vma.start);
        let end = start.saturating_add(span).min(vma.end);
        let flags = MIGRATE_VMA_SELECT_DEVICE_PRIVATE;
        let fault_page = Some(f.page.pfn());
        let moved = match d.migrate(f.space, start, end, flags, fault_page, false) {
            // Short of host frames for the window: the faulting page alone may still fit.
            Err(e) if e.kind() == ErrorKind::OutOfMemory && end - start > PAGE => {
                d.migrate(f.space, f.addr, f.addr + PAGE, flags, fault_page, false)?
            }
            other => other?,
        };
        // A fault whose page could not be copied back fails (it would fault forever).
        let stayed =
            matches!(f.space.pte(f.addr), Pte::DevicePrivate { pfn, .. } if pfn == f.page.pfn());
        if moved.failed > 0 && stayed {
            return Err(Error::FaultFailed {
                addr: f.addr,
                reason: format!("the copy of device page {} to host failed", f.page.pfn()),
            });
        }
        Ok(())
    }
}

/// A fault on a page of a driver that is gone: the page alone comes home through the device
/// the driver left behind.
fn bring_home(device: &Device, owner: Owner, f: &FaultContext<'_>) -> Result<()> {
    let pm = f.space.pagemap();
    let mut m = Migration::setup_checked(
        f.space,
        f.addr,
        f.addr + PAGE,
        MIGRATE_VMA_SELECT_DEVICE_PRIVATE,
        owner,
        Some(f.page.pfn()),
        true,
    )?;
    let want: Vec<usize> = m.collected().map(|(i, _)| i).collect();
    if want.is_empty() {
        return Ok(());
    }
    let frames = pm.frames().alloc_batch(want.len(), false)?;
    if let Err(e) = pm.alloc_system_at(&frames, true) {
        let _ = pm.frames().free_batch(&frames);
        return Err(e);
    }
    for (&i, &h) in want.iter().zip(&frames) {
        m.dst_mut()[i] = migrate_pfn(h);
    }
    // SAFETY: the migration holds every page of the batch locked and unmapped (CPU
    // pointers included) until the copy settles.
    let out = m
        .submit(|pairs| unsafe { device.copy_owned(pairs, false) })
        .wait()?
        .finalize();
    if out.failed > 0 {
        return Err(Error::FaultFailed {
            addr: f.addr,
            reason: format!("the copy of device page {} to host failed", f.page.pfn()),
        });
    }
    Ok(())
}
