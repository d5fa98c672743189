//! Compute pipelines whose bindings are all storage buffers of one descriptor set.

use ash::vk;

use super::context::Context;
use super::conv::error;
use crate::error::Result;

/// A compute pipeline with its layouts.
pub(crate) struct Pipeline {
    pub(crate) set_layout: vk::DescriptorSetLayout,
    pub(crate) layout: vk::PipelineLayout,
    pub(crate) pipeline: vk::Pipeline,
}

impl Pipeline {
    /// Builds the pipeline of `entry` in `spirv`, whose set 0 has `bindings` storage buffers.
    pub(crate) fn new(
        ctx: &Context,
        spirv: &[u32],
        entry: &std::ffi::CStr,
        bindings: u32,
    ) -> Result<Pipeline> {
        let dev = &ctx.device;
        let module_info = vk::ShaderModuleCreateInfo::default().code(spirv);
        // SAFETY: the SPIR-V was produced and validated by naga.
        let module = unsafe { dev.create_shader_module(&module_info, None) }
            .map_err(|e| error("vkCreateShaderModule", e))?;
        let binds: Vec<_> = (0..bindings)
            .map(|b| {
                vk::DescriptorSetLayoutBinding::default()
                    .binding(b)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .descriptor_count(1)
                    .stage_flags(vk::ShaderStageFlags::COMPUTE)
            })
            .collect();
        let set_info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&binds);
        // SAFETY: the device is live and the infos outlive the calls below.
        let set_layout = match unsafe { dev.create_descriptor_set_layout(&set_info, None) } {
            Ok(l) => l,
            Err(e) => {
                // SAFETY: nothing uses the module yet.
                unsafe { dev.destroy_shader_module(module, None) };
                return Err(error("vkCreateDescriptorSetLayout", e));
            }
        };
        let layouts = [set_layout];
        let layout_info = vk::PipelineLayoutCreateInfo::default().set_layouts(&layouts);
        // SAFETY: as above.
        let layout = match unsafe { dev.create_pipeline_layout(&layout_info, None) } {
            Ok(l) => l,
            Err(e) => {
                // SAFETY: nothing uses the module or the set layout yet.
                unsafe {
                    dev.destroy_shader_module(module, None);
                    dev.destroy_descriptor_set_layout(set_layout, None);
                }
                return Err(error("vkCreatePipelineLayout", e));
            }
        };
        let stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(module)
            .name(entry);
        let info = vk::ComputePipelineCreateInfo::default()
            .stage(stage)
            .layout(layout);
        // SAFETY: as above; the module has the entry point `entry`.
        let pipeline =
            unsafe { dev.create_compute_pipelines(vk::PipelineCache::null(), &[info], None) };
        // SAFETY: the module is no longer needed once the pipeline exists (or failed).
        unsafe { dev.destroy_shader_module(module, None) };
        match pipeline {
            Ok(p) => Ok(Pipeline {
                set_layout,
                layout,
                pipeline: p[0],
            }),
            Err((_, e)) => {
                // SAFETY: no pipeline uses the layouts.
                unsafe {
                    dev.destroy_pipeline_layout(layout, None);
                    dev.destroy_descriptor_set_layout(set_layout, None);
                }
                Err(error("vkCreateComputePipelines", e))
            }
        }
    }

    /// A descriptor pool with room for `sets` sets of `bindings` storage buffers.
    pub(crate) fn pool(ctx: &Context, sets: u32, bindings: u32) -> Result<vk::DescriptorPool> {
        let sizes = [vk::DescriptorPoolSize {
            ty: vk::DescriptorType::STORAGE_BUFFER,
            descriptor_count: bindings * sets,
        }];
        let info = vk::DescriptorPoolCreateInfo::default()
            .max_sets(sets)
            .pool_sizes(&sizes);
        // SAFETY: the device is live and the info outlives the call.
        unsafe { ctx.device.create_descriptor_pool(&info, None) }
            .map_err(|e| error("vkCreateDescriptorPool", e))
    }

    /// Allocates a set from `pool` and points binding `i` at `buffers[i]` (buffer, offset,
    /// range).
    pub(crate) fn bind(
        &self,
        ctx: &Context,
        pool: vk::DescriptorPool,
        buffers: &[(vk::Buffer, u64, u64)],
    ) -> Result<vk::DescriptorSet> {
        let dev = &ctx.device;
        let layouts = [self.set_layout];
        let alloc = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(pool)
            .set_layouts(&layouts);
        // SAFETY: the pool was sized by the caller for every set it allocates.
        let set = unsafe { dev.allocate_descriptor_sets(&alloc) }
            .map_err(|e| error("vkAllocateDescriptorSets", e))?[0];
        let infos: Vec<[vk::DescriptorBufferInfo; 1]> = buffers
            .iter()
            .map(|&(buffer, offset, range)| {
                [vk::DescriptorBufferInfo {
                    buffer,
                    offset,
                    range,
                }]
            })
            .collect();
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
        // SAFETY: the set is fresh and not in use by any command buffer.
        unsafe { dev.update_descriptor_sets(&writes, &[]) };
        Ok(set)
    }

    /// Records binding the pipeline and `set`, and one dispatch of `groups`.
    pub(crate) fn dispatch(
        &self,
        ctx: &Context,
        cb: vk::CommandBuffer,
        set: vk::DescriptorSet,
        groups: [u32; 3],
    ) {
        let dev = &ctx.device;
        // SAFETY: `cb` is recording on a compute-capable queue; the set's buffers live until
        // the batch retires (the caller holds them).
        unsafe {
            dev.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, self.pipeline);
            dev.cmd_bind_descriptor_sets(
                cb,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &[set],
                &[],
            );
            dev.cmd_dispatch(cb, groups[0], groups[1], groups[2]);
        }
    }

    /// Destroys the pipeline objects; the device must not be using them.
    pub(crate) fn destroy(&self, ctx: &Context) {
        // SAFETY: the caller made sure nothing uses the pipeline any more.
        unsafe {
            ctx.device.destroy_pipeline(self.pipeline, None);
            ctx.device.destroy_pipeline_layout(self.layout, None);
            ctx.device
                .destroy_descriptor_set_layout(self.set_layout, None);
        }
    }
}
