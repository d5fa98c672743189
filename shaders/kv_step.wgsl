// The demo's device step (`cargo xtask demo`): adds a per-block amount to every word of each
// block of the step's working set, in device memory, through the device page table.
//
// Bound buffer b is block b of the working set; hm_arg(0) is the pages per block and
// hm_arg(1 + b) the amount for block b. One workgroup per page, which it translates once,
// its 64 lanes updating four words at a time (on lavapipe 64 lanes with a loop ran 20%
// faster than 256 lanes without one); the dispatch (`hetmem::offload::workgroups`) spreads
// the pages over two or three dimensions when one does not hold them all, and the grid may
// have a few workgroups more than pages.

@compute @workgroup_size(64)
fn kv_step(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
) {
    let pages = hm_arg(0);
    // The workgroup's index: the first lane's index with one lane per workgroup.
    let g = hm_invocation(wg, nwg, 0u, 1u);
    let b = g / pages;
    if (b >= hm_buffers()) {
        return;
    }
    let add = hm_arg(1u + b);
    let page = hm_page(b, g % pages);
    for (var q = lane; q < HM_PAGE_WORDS / 4u; q += 64u) {
        hm_page_store4(page, q, hm_page_load4(page, q) + vec4<u32>(add));
    }
}
