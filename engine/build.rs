//! Compiles the WGSL kernels in `shaders/` to SPIR-V for the Vulkan backend.

use std::path::PathBuf;

/// (file in shaders/, entry point)
const KERNELS: &[(&str, &str)] = &[("gather.wgsl", "gather")];

fn main() {
    let shaders = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for &(file, entry) in KERNELS {
        let path = shaders.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        let source = std::fs::read_to_string(&path).expect("read shader");
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&source)));
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{file}: {}", e.emit_to_string(&source)));
        let options = naga::back::spv::Options {
            lang_version: (1, 3),
            ..Default::default()
        };
        let pipeline = naga::back::spv::PipelineOptions {
            shader_stage: naga::ShaderStage::Compute,
            entry_point: entry.to_string(),
        };
        let words = naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{file}: SPIR-V: {e}"));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let name = file.replace(".wgsl", ".spv");
        std::fs::write(out.join(name), bytes).expect("write SPIR-V");
    }
}
