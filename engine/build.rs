//! Compiles the WGSL kernels in `shaders/` to SPIR-V for the Vulkan backend.

use std::path::PathBuf;

#[path = "src/spirv.rs"]
mod spirv;

/// (file in shaders/, entry point)
const KERNELS: &[(&str, &str)] = &[("gather.wgsl", "gather")];

fn main() {
    // Read at run time: cargo may reuse one build-script binary for two checkouts.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let shaders = PathBuf::from(manifest).join("../shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for &(file, entry) in KERNELS {
        let path = shaders.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        println!("cargo:rerun-if-changed=src/spirv.rs");
        let source = std::fs::read_to_string(&path).expect("read shader");
        let words = spirv::wgsl_to_spirv(&source, entry).unwrap_or_else(|e| panic!("{file}: {e}"));
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let name = file.replace(".wgsl", ".spv");
        std::fs::write(out.join(name), bytes).expect("write SPIR-V");
    }
}
