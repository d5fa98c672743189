//! The gather kernel (`shaders/gather.wgsl`, compiled to SPIR-V by `build.rs`): copies many
//! scattered pages between two bound objects in one dispatch.

use ash::vk;

use super::context::Context;
use super::conv::error;
use crate::error::Result;

static SPIRV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/gather.spv"));

/// Workgroups per dispatch dimension (the minimum every device supports).
const MAX_GROUPS_X: u32 = 65_535;

/// The gather pipeline and what binding it needs.
pub(crate) struct Gather {
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    /// Largest object that can be bound as a storage buffer.
    pub(crate) max_binding: u64,
    /// Alignment of storage-buffer binding offsets.
    pub(crate) offset_align: u64,
}

impl Gather {
    pub(crate) fn new(ctx: &Context) -> Result<Gather> {
        let dev = &ctx.device;
        let words = ash::util::read_spv(&mut std::io::Cursor::new(SPIRV))
            .map_err(|e| crate::EngineError::Vulkan(format!("gather SPIR-V: {e}")))?;
        let module_info = vk::ShaderModuleCreateInfo::default().code(&words);
        // SAFETY: the SPIR-V was produced and validated by naga at build time.
        let module = unsafe { dev.create_shader_module(&module_info, None) }
            .map_err(|e| error("vkCreateShaderModule", e))?;
        let bindings: Vec<_> = (0..3)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let set_info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: the device is live and the infos outlive the calls below.
        let set_layout = unsafe { dev.create_descriptor_set_layout(&set_info, None) }
            .map_err(|e| error("vkCreateDescriptorSetLayout", e))?;
        let layouts = [set_layout];
        let layout_info = vk::PipelineLayoutCreateInfo::default().set_layouts(&layouts);
        // SAFETY: as above.
        let layout = unsafe { dev.create_pipeline_layout(&layout_info, None) }
            .map_err(|e| error("vkCreatePipelineLayout", e))?;
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(c"gather");
        let info = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(layout);
        // SAFETY: as above; the module's entry point is `gather`.
        let pipeline =
            unsafe { dev.create_compute_pipelines(vk::PipelineCache::null(), &[info], None) };
        // SAFETY: the module is no longer needed once the pipeline exists (or failed).
        unsafe { dev.destroy_shader_module(module, None) };
        let pipeline = pipeline.map_err(|(_, e)| error("vkCreateComputePipelines", e))?[0];
        Ok(Gather {
            set_layout,
            layout,
            pipeline,
            max_binding: ctx.limits.max_storage_buffer_range as u64,
            offset_align: ctx.limits.min_storage_buffer_offset_alignment.max(16),
        })
    }

    /// A descriptor pool with room for `sets` gather dispatches.
    pub(crate) fn pool(&self, ctx: &Context, sets: u32) -> Result<vk::DescriptorPool> {
        let sizes = [vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: 3 * sets,
        }];
        let info = vk::DescriptorPoolCreateInfo::default()
            .max_sets(sets)
            .pool_sizes(&sizes);
        // SAFETY: the device is live and the info outlives the call.
        unsafe { ctx.device.create_descriptor_pool(&info, None) }
            .map_err(|e| error("vkCreateDescriptorPool", e))
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
        let dev = &ctx.device;
        let layouts = [self.set_layout];
        let alloc = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(pool)
            .set_layouts(&layouts);
        // SAFETY: the pool was sized for every dispatch of this batch.
        let set = unsafe { dev.allocate_descriptor_sets(&alloc) }
            .map_err(|e| error("vkAllocateDescriptorSets", e))?[0];
        let infos = [
            [vk::DescriptorBufferInfo {
                buffer: src.0,
                offset: 0,
                range: src.1,
            }],
            [vk::DescriptorBufferInfo {
                buffer: dst.0,
                offset: 0,
                range: dst.1,
            }],
            [vk::DescriptorBufferInfo {
                buffer: pairs,
                offset: pairs_offset,
                range: count as u64 * 8,
            }],
        ];
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(b, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(b as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        let x = count.min(MAX_GROUPS_X);
        let y = count.div_ceil(x);
        // SAFETY: the set is fresh and not in use; `cb` is recording on a compute-capable
        // queue; all three buffers live until the batch retires; every pair index was
        // resolved by the engine inside its object.
        unsafe {
            dev.update_descriptor_sets(&writes, &[]);
            dev.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, self.pipeline);
            dev.cmd_bind_descriptor_sets(
                cb,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &[set],
                &[],
            );
            dev.cmd_dispatch(cb, x, y, 1);
        }
        Ok(())
    }

    /// Destroys the pipeline objects; the device must be idle.
    pub(crate) fn destroy(&self, ctx: &Context) {
        // SAFETY: the caller waited for idle; nothing uses the pipeline any more.
        unsafe {
            ctx.device.destroy_pipeline(self.pipeline, None);
            ctx.device.destroy_pipeline_layout(self.layout, None);
            ctx.device
                .destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}
