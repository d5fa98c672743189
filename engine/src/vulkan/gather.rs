//! The gather kernel (`shaders/gather.wgsl`, compiled to SPIR-V by `build.rs`): copies many
//! scattered pages between two bound objects in one dispatch.

use ash::vk;

use super::context::Context;
use super::pipeline::Pipeline;
use crate::error::Result;

static SPIRV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gather.spv"));

/// Workgroups per dispatch dimension (the minimum every device supports).
const MAX_GROUPS_X: u32 = 65_535;

/// The gather pipeline and what binding it needs.
pub(crate) struct Gather {
    pipeline: Pipeline,
    /// Largest object that can be bound as a storage buffer.
    pub(crate) max_binding: u64,
    /// Alignment of storage-buffer binding offsets.
    pub(crate) offset_align: u64,
}

impl Gather {
    pub(crate) fn new(ctx: &Context) -> Result<Gather> {
        let words = ash::util::read_spv(&mut std::io::Cursor::new(SPIRV))
            .map_err(|e| crate::EngineError::Vulkan(format!("gather SPIR-V: {e}")))?;
        Ok(Gather {
            pipeline: Pipeline::new(ctx, &words, c"gather", 3)?,
            max_binding: ctx.limits.max_storage_buffer_range as u64,
            offset_align: ctx.limits.min_storage_buffer_offset_alignment.max(16),
        })
    }

    /// A descriptor pool with room for `sets` gather dispatches.
    pub(crate) fn pool(&self, ctx: &Context, sets: u32) -> Result<vk::DescriptorPool> {
        Pipeline::pool(ctx, sets, 3)
    }

    /// Records one dispatch copying `count` pages, whose pairs sit at `pairs_offset` in `pairs`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        ctx: &Context,
        cb: vk::CommandBuffer,
        pool: vk::DescriptorPool,
        src: (vk::Buffer, u64),
        dst: (vk::Buffer, u64),
        pairs: vk::Buffer,
        pairs_offset: u64,
        count: u32,
    ) -> Result<()> {
        let set = self.pipeline.bind(
            ctx,
            pool,
            &[
                (src.0, 0, src.1),
                (dst.0, 0, dst.1),
                (pairs, pairs_offset, count as u64 * 8),
            ],
        )?;
        let x = count.min(MAX_GROUPS_X);
        let y = count.div_ceil(x);
        // Every pair index was resolved by the engine inside its object; all three buffers
        // live until the batch retires.
        self.pipeline.dispatch(ctx, cb, set, [x, y, 1]);
        Ok(())
    }

    /// Destroys the pipeline objects; the device must be idle.
    pub(crate) fn destroy(&self, ctx: &Context) {
        self.pipeline.destroy(ctx);
    }
}
