// Gather copy: one workgroup copies one 4 KiB page from `src` to `dst`.
//
// `pairs[i]` holds (source page index, destination page index) inside the bound source and
// destination objects; the host validated every index before the dispatch. The dispatch is
// 2-D when there are more pairs than one dimension allows: pair = x + y * num_workgroups.x.

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> pairs: array<vec2<u32>>;

// 4096 bytes are 256 vec4<u32>.
const PAGE_VEC4: u32 = 256u;
const GROUP: u32 = 64u;

@compute @workgroup_size(64)
fn gather(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let i = wg.x + wg.y * nwg.x;
    if (i >= arrayLength(&pairs)) {
        return;
    }
    let p = pairs[i];
    let s = p.x * PAGE_VEC4;
    let d = p.y * PAGE_VEC4;
    for (var k = lane; k < PAGE_VEC4; k += GROUP) {
        dst[d + k] = src[s + k];
    }
}
