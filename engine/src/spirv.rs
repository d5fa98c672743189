//! WGSL to SPIR-V with naga: used by `build.rs` for the engine's own kernels and at run time
//! for user kernels, so both go through the same validation and options.

/// Compiles `source` to SPIR-V words for its compute entry point `entry`; the error names
/// the stage that failed (parse, entry point, validation, SPIR-V) with naga's message.
pub fn wgsl_to_spirv(source: &str, entry: &str) -> Result<Vec<u32>, String> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| format!("WGSL: {}", e.emit_to_string(source)))?;
    if !module
        .entry_points
        .iter()
        .any(|e| e.name == entry && e.stage == naga::ShaderStage::Compute)
    {
        return Err(format!(
            "entry point: no compute entry point named `{entry}`"
        ));
    }
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(&module)
    .map_err(|e| format!("validation: {}", e.emit_to_string(source)))?;
    let options = naga::back::spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
        .map_err(|e| format!("SPIR-V: {e}"))
}
