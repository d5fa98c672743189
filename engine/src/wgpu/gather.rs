//! The WGSL gather kernel under wgpu: the same source the Vulkan backend compiles to SPIR-V.

use wgpu::util::DeviceExt;

use crate::copy::CopyGroup;

/// Workgroups per dispatch dimension (the minimum every device supports).
const MAX_GROUPS_X: u32 = 65_535;

pub(crate) struct Gather {
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
}

impl Gather {
    pub(crate) fn new(device: &wgpu::Device) -> Gather {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("hetmem gather"),
            source: wgpu::ShaderSource::Wgsl(include_str!("../../../shaders/gather.wgsl").into()),
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("hetmem gather"),
            layout: None,
            module: &module,
            entry_point: Some("gather"),
            compilation_options: Default::default(),
            cache: None,
        });
        let layout = pipeline.get_bind_group_layout(0);
        Gather { pipeline, layout }
    }

    /// Records one dispatch that copies every page of `g` from `src` to `dst` (two buffers).
    pub(crate) fn record(
        &self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        dst: &wgpu::Buffer,
        g: &CopyGroup,
    ) {
        let pairs = g.page_pairs();
        let list = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("hetmem gather pairs"),
            contents: bytemuck::cast_slice(&pairs),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("hetmem gather"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: dst.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: list.as_entire_binding(),
                },
            ],
        });
        let count = pairs.len() as u32;
        let x = count.min(MAX_GROUPS_X);
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(x, count.div_ceil(x), 1);
    }
}
