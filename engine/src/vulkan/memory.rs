//! Vulkan memory objects: device chunks (gpu-allocator), imported host segments
//! (`VK_EXT_external_memory_host`) and staging buffers.

use std::ptr::NonNull;

use ash::vk;
use gpu_allocator::vulkan::{Allocation, AllocationCreateDesc, AllocationScheme, Allocator};
use gpu_allocator::MemoryLocation;

use super::context::Context;
use super::conv::error;
use super::VulkanBackend;
use crate::copy::{MemoryId, Place};
use crate::error::{EngineError, Result};

/// Usage of every buffer the engine creates: copy source and destination, kernel binding.
const USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::TRANSFER_SRC.as_raw()
        | vk::BufferUsageFlags::TRANSFER_DST.as_raw()
        | vk::BufferUsageFlags::STORAGE_BUFFER.as_raw(),
);

/// Where a buffer's memory came from.
enum Backing {
    Allocated(Allocation),
    Imported(vk::DeviceMemory),
}

/// A buffer over one memory object, with its host mapping when it has a coherent one.
pub(crate) struct Buffer {
    pub(crate) buffer: vk::Buffer,
    pub(crate) size: u64,
    mapped: Option<NonNull<u8>>,
    backing: Backing,
}

// SAFETY: Vulkan handles are plain values; the mapping is only used through the engine's
// synchronised paths (a page is never written by two parties at once).
unsafe impl Send for Buffer {}
// SAFETY: as for `Send`.
unsafe impl Sync for Buffer {}

impl Buffer {
    /// The host address of byte `offset`, when the memory is mapped and coherent.
    pub(crate) fn host_ptr(&self, offset: u64) -> Option<*mut u8> {
        debug_assert!(offset <= self.size);
        // SAFETY: `offset` lies inside the mapping, which covers the whole buffer.
        self.mapped
            .map(|p| unsafe { p.as_ptr().add(offset as usize) })
    }
}

/// Creates a buffer of `size` bytes in memory of `location`.
pub(crate) fn allocate(
    ctx: &Context,
    allocator: &mut Allocator,
    size: u64,
    location: MemoryLocation,
    name: &str,
) -> Result<Buffer> {
    let info = vk::BufferCreateInfo::default()
        .size(size)
        .usage(USAGE)
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    let dev = &ctx.device;
    // SAFETY: the device is live and the create info outlives the call.
    let buffer =
        unsafe { dev.create_buffer(&info, None) }.map_err(|e| error("vkCreateBuffer", e))?;
    // SAFETY: `buffer` was just created on this device.
    let requirements = unsafe { dev.get_buffer_memory_requirements(buffer) };
    let alloc = allocator.allocate(&AllocationCreateDesc {
        name,
        requirements,
        location,
        linear: true,
        allocation_scheme: AllocationScheme::DedicatedBuffer(buffer),
    });
    let alloc = match alloc {
        Ok(a) => a,
        Err(e) => {
            // SAFETY: the buffer has no memory bound and no use recorded.
            unsafe { dev.destroy_buffer(buffer, None) };
            return Err(match e {
                gpu_allocator::AllocationError::OutOfMemory => EngineError::OutOfDeviceMemory {
                    requested: (size / 4096) as usize,
                    available: 0,
                    budget_pages: 0,
                },
                other => EngineError::Vulkan(format!("gpu-allocator: {other}")),
            });
        }
    };
    // SAFETY: the allocation satisfies the buffer's requirements and is bound once.
    if let Err(e) = unsafe { dev.bind_buffer_memory(buffer, alloc.memory(), alloc.offset()) } {
        // SAFETY: nothing uses the buffer yet.
        unsafe { dev.destroy_buffer(buffer, None) };
        let _ = allocator.free(alloc);
        return Err(error("vkBindBufferMemory", e));
    }
    let coherent = alloc
        .memory_properties()
        .contains(vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT);
    let mapped = if coherent {
        alloc.mapped_ptr().map(|p| p.cast())
    } else {
        None
    };
    Ok(Buffer {
        buffer,
        size,
        mapped,
        backing: Backing::Allocated(alloc),
    })
}

/// Wraps `len` bytes of host memory at `ptr` (aligned as the device requires) in a buffer.
pub(crate) fn import_host(ctx: &Context, ptr: *mut u8, len: usize) -> Result<Buffer> {
    let ext = ctx
        .host_memory
        .as_ref()
        .ok_or_else(|| EngineError::Vulkan("host memory import is not enabled".into()))?;
    let handle = vk::ExternalMemoryHandleTypeFlags::HOST_ALLOCATION_EXT;
    let mut props = vk::MemoryHostPointerPropertiesEXT::default();
    // SAFETY: `ptr` is a live, page-aligned host allocation of `len` bytes owned by the frame
    // pool, which outlives every buffer made from it; the output struct is valid.
    let r = unsafe {
        (ext.fp().get_memory_host_pointer_properties_ext)(
            ctx.device.handle(),
            handle,
            ptr.cast(),
            &mut props,
        )
    };
    if r != vk::Result::SUCCESS {
        return Err(error("vkGetMemoryHostPointerPropertiesEXT", r));
    }
    let mut ext_info = vk::ExternalMemoryBufferCreateInfo::default().handle_types(handle);
    let info = vk::BufferCreateInfo::default()
        .size(len as u64)
        .usage(USAGE)
        .sharing_mode(vk::SharingMode::EXCLUSIVE)
        .push_next(&mut ext_info);
    let dev = &ctx.device;
    // SAFETY: the device is live and the create info outlives the call.
    let buffer =
        unsafe { dev.create_buffer(&info, None) }.map_err(|e| error("vkCreateBuffer", e))?;
    // SAFETY: `buffer` was just created on this device.
    let req = unsafe { dev.get_buffer_memory_requirements(buffer) };
    let bits = req.memory_type_bits & props.memory_type_bits;
    if bits == 0 {
        // SAFETY: nothing uses the buffer yet.
        unsafe { dev.destroy_buffer(buffer, None) };
        return Err(EngineError::Vulkan(
            "no memory type can import host frames".into(),
        ));
    }
    let mut import = vk::ImportMemoryHostPointerInfoEXT::default()
        .handle_type(handle)
        .host_pointer(ptr.cast());
    let alloc_info = vk::MemoryAllocateInfo::default()
        .allocation_size(len as u64)
        .memory_type_index(bits.trailing_zeros())
        .push_next(&mut import);
    // SAFETY: as for the pointer-properties call; the memory type accepts this pointer.
    let memory = match unsafe { dev.allocate_memory(&alloc_info, None) } {
        Ok(m) => m,
        Err(e) => {
            // SAFETY: nothing uses the buffer yet.
            unsafe { dev.destroy_buffer(buffer, None) };
            return Err(error("vkAllocateMemory (host import)", e));
        }
    };
    // SAFETY: the imported memory covers the whole buffer and is bound once.
    if let Err(e) = unsafe { dev.bind_buffer_memory(buffer, memory, 0) } {
        // SAFETY: nothing uses either object yet.
        unsafe {
            dev.destroy_buffer(buffer, None);
            dev.free_memory(memory, None);
        }
        return Err(error("vkBindBufferMemory (host import)", e));
    }
    Ok(Buffer {
        buffer,
        size: len as u64,
        mapped: NonNull::new(ptr),
        backing: Backing::Imported(memory),
    })
}

/// Destroys a buffer and releases its memory; the GPU must be done with it.
pub(crate) fn destroy(ctx: &Context, allocator: &mut Allocator, b: Buffer) {
    // SAFETY: the caller waited for every submission that used the buffer.
    unsafe { ctx.device.destroy_buffer(b.buffer, None) };
    match b.backing {
        Backing::Allocated(a) => {
            let _ = allocator.free(a);
        }
        // SAFETY: the buffer bound to it is gone; the host memory itself stays with the pool.
        Backing::Imported(m) => unsafe { ctx.device.free_memory(m, None) },
    }
}

/// Staging buffers kept for reuse after their batch completes.
const STAGING_CACHE: usize = 4;

/// Where the backend's bytes live: chunks, imported frame segments, staging buffers, and
/// the host mappings of each.
impl VulkanBackend {
    /// The buffer holding `memory`, importing a frame segment on first use.
    pub(super) fn buffer_of(&self, memory: MemoryId) -> Result<vk::Buffer> {
        Ok(self.bound_of(memory)?.0)
    }

    /// The buffer holding `memory` and its size in bytes.
    pub(super) fn bound_of(&self, memory: MemoryId) -> Result<(vk::Buffer, u64)> {
        match memory {
            MemoryId::Chunk(c) => self
                .chunks
                .read()
                .get(c as usize)
                .and_then(Option::as_ref)
                .map(|b| (b.buffer, b.size))
                .ok_or_else(|| EngineError::DeviceLost(format!("chunk {c} does not exist"))),
            MemoryId::Frames(s) => {
                let s = s as usize;
                if let Some(b) = &self.imports.read()[s] {
                    return Ok((b.buffer, b.size));
                }
                let mut imports = self.imports.write();
                if imports[s].is_none() {
                    let (ptr, len) = self.frames.segment(s);
                    imports[s] = Some(import_host(&self.ctx, ptr, len)?);
                }
                let b = imports[s].as_ref().expect("imported above");
                Ok((b.buffer, b.size))
            }
        }
    }

    /// A staging buffer of at least `size` bytes, mapped and coherent.
    pub(super) fn staging_buffer(&self, size: u64) -> Result<Buffer> {
        {
            let mut cache = self.staging.lock();
            if let Some(i) = cache.iter().position(|b| b.size >= size) {
                return Ok(cache.swap_remove(i));
            }
        }
        let mut guard = self.allocator.lock();
        let allocator = guard.as_mut().expect("allocator lives until drop");
        let b = allocate(
            &self.ctx,
            allocator,
            size.max(1 << 20),
            MemoryLocation::GpuToCpu,
            "hetmem staging",
        )?;
        if b.host_ptr(0).is_none() {
            destroy(&self.ctx, allocator, b);
            return Err(EngineError::Vulkan(
                "no host-coherent memory for staging".into(),
            ));
        }
        Ok(b)
    }

    pub(super) fn release_staging(&self, bufs: Vec<Buffer>) {
        let mut cache = self.staging.lock();
        for b in bufs {
            if cache.len() < STAGING_CACHE {
                cache.push(b);
            } else {
                let mut guard = self.allocator.lock();
                destroy(
                    &self.ctx,
                    guard.as_mut().expect("allocator lives until drop"),
                    b,
                );
            }
        }
    }

    /// The host address of any location, when its memory is mapped.
    pub(super) fn host_ptr(&self, at: Place) -> Option<*mut u8> {
        match at.memory {
            MemoryId::Frames(_) => Some(self.frames.place_ptr(at)),
            MemoryId::Chunk(_) => self.chunk_host_ptr(at),
        }
    }

    pub(super) fn chunk_host_ptr(&self, at: Place) -> Option<*mut u8> {
        let MemoryId::Chunk(c) = at.memory else {
            return None;
        };
        self.chunks
            .read()
            .get(c as usize)?
            .as_ref()?
            .host_ptr(at.offset)
    }

    pub(super) fn copy_through_staging(
        &self,
        at: Place,
        len: usize,
        to_device: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> Result<()> {
        let chunk = self.buffer_of(at.memory)?;
        let staging = self.staging_buffer(len as u64)?;
        let sp = staging.host_ptr(0).expect("staging is mapped");
        if let Some(data) = to_device {
            // SAFETY: the staging buffer holds at least `len` bytes and is ours alone.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), sp, len) };
        }
        let (src, dst, so, doff) = if to_device.is_some() {
            (staging.buffer, chunk, 0, at.offset)
        } else {
            (chunk, staging.buffer, at.offset, 0)
        };
        let r = self.run_now(|cb| {
            let region = [vk::BufferCopy {
                src_offset: so,
                dst_offset: doff,
                size: len as u64,
            }];
            // SAFETY: both buffers are live and the region lies inside each.
            unsafe { self.ctx.device.cmd_copy_buffer(cb, src, dst, &region) };
            Ok(())
        });
        if let (Ok(()), Some(out)) = (&r, out) {
            // SAFETY: the copy completed; the staging buffer holds `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(sp, out.as_mut_ptr(), len) };
        }
        self.release_staging(vec![staging]);
        r
    }
}
