//! CPU access to the driver's device memory: the engine's [`Device`] as the page map's
//! [`FrameAccess`] for a coherent pagemap (reads and writes of device pages, done by the
//! device). A driver's business, not `mm`'s: `mm` only knows the trait.

use hetmem_engine::{Device, EngineError, Pfn};

use crate::mm::FrameAccess;

impl FrameAccess for Device {
    fn read(&self, pfn: Pfn, offset: usize, out: &mut [u8]) -> Result<(), EngineError> {
        self.read_page(pfn, offset, out)
    }
    fn write(&self, pfn: Pfn, offset: usize, data: &[u8]) -> Result<(), EngineError> {
        self.write_page(pfn, offset, data)
    }
}
