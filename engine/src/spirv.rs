//! WGSL to SPIR-V with naga: used by `build.rs` for the engine's own kernels and at run time
//! for user kernels, so both go through the same validation and options.

/// Why a source did not compile: naga's rendered message (naming the stage that failed:
/// parse, entry point, validation, SPIR-V), and the byte offsets in the source it points
/// at, most important first.
pub type Failure = (String, Vec<usize>);

/// Parses WGSL into a module.
pub fn parse(source: &str) -> Result<naga::Module, Failure> {
    naga::front::wgsl::parse_str(source).map_err(|e| {
        let at = e
            .labels()
            .filter_map(|(s, _)| s.to_range())
            .map(|r| r.start);
        let at = at.collect();
        (format!("WGSL: {}", e.emit_to_string(source)), at)
    })
}

/// Validates `module` (parsed from `source`) and writes SPIR-V words for its compute entry
/// point `entry`.
pub fn to_spirv(module: &naga::Module, source: &str, entry: &str) -> Result<Vec<u32>, Failure> {
    if !module
        .entry_points
        .iter()
        .any(|e| e.name == entry && e.stage == naga::ShaderStage::Compute)
    {
        return Err((
            format!("entry point: no compute entry point named `{entry}`"),
            Vec::new(),
        ));
    }
    let info = naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::empty(),
    )
    .validate(module)
    .map_err(|e| {
        let at = e.spans().filter_map(|(s, _)| s.to_range()).map(|r| r.start);
        let at = at.collect();
        (format!("validation: {}", e.emit_to_string(source)), at)
    })?;
    let options = naga::back::spv::Options {
        lang_version: (1, 3),
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.to_string(),
    };
    naga::back::spv::write_vec(module, &info, &options, Some(&pipeline))
        .map_err(|e| (format!("SPIR-V: {e}"), Vec::new()))
}

/// Compiles `source` to SPIR-V words for its compute entry point `entry`; the error is
/// naga's message.
#[allow(dead_code)] // the build script's entry; the engine itself inspects between the steps
pub fn wgsl_to_spirv(source: &str, entry: &str) -> Result<Vec<u32>, String> {
    let module = parse(source).map_err(|f| f.0)?;
    to_spirv(&module, source, entry).map_err(|f| f.0)
}
