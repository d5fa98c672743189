// hetmem's helper for user kernels: managed addresses translated through the device page
// table, so a kernel reads and writes managed buffers wherever their pages sit in device
// memory, and only the pages the launch bound.
//
// The runtime appends this file to a kernel's source and binds, in group 0:
//   binding 0  hm_table: a header, then one word per virtual page of the address space's
//              window: the device page holding it, plus one; 0 when the page is not on the
//              device;
//   binding 1  hm_meta: how many buffers the launch binds, then for each its first virtual
//              page (relative to the window) and its page count, then the caller's argument
//              words;
//   binding 2… one binding per chunk of device memory (`hm_chunkN`, words in fours),
//              generated for the device in place of the marker line below, with
//              HM_CHUNK_PAGES and the `hm__chunk_load[4]` / `hm__chunk_store[4]` switches.
// Every access is checked against the launch's bound ranges: an access outside them (a
// buffer index not bound, a page past the buffer's range, a word past its page) or to a
// page not on the device records a fault (the buffer, page and word of the first one),
// reads zeros and writes nothing; the launch then fails naming the buffer and offset.
// Kernels reach the bindings only through the functions here: compiling refuses a kernel
// that declares a resource of its own (in any group), names one of the bindings above,
// calls one of the helper's internal functions (named `hm__…`), or builds or modifies an
// `HmPage` itself.

struct HmTable {
    // Accesses that found no device page.
    faults: atomic<u32>,
    // The first such access (valid when `faults` > 0): bound buffer, page in it, word in
    // the page.
    fault_buffer: atomic<u32>,
    fault_page: atomic<u32>,
    fault_word: atomic<u32>,
    entries: array<u32>,
}

@group(0) @binding(0) var<storage, read_write> hm_table: HmTable;
@group(0) @binding(1) var<storage, read> hm_meta: array<u32>;

// Words in a 4 KiB page.
const HM_PAGE_WORDS: u32 = 1024u;

//@hetmem-chunks

// Buffers bound to this launch.
fn hm_buffers() -> u32 {
    return hm_meta[0];
}

// Pages bound to buffer `i` (0 if the launch did not bind it).
fn hm_buffer_pages(i: u32) -> u32 {
    if (i >= hm_meta[0]) {
        return 0u;
    }
    return hm_meta[2u + 2u * i];
}

// The caller's argument word `i`.
fn hm_arg(i: u32) -> u32 {
    return hm_meta[1u + 2u * hm_meta[0] + i];
}

// A managed address: a bound buffer, a page of it and a word inside the page.
struct HmPtr {
    buffer: u32,
    page: u32,
    word: u32,
}

// The managed address of byte `offset` (a multiple of 4) of bound buffer `buffer`.
fn hm_ptr(buffer: u32, offset: u32) -> HmPtr {
    let w = offset / 4u;
    return HmPtr(buffer, w / HM_PAGE_WORDS, w % HM_PAGE_WORDS);
}

// The managed address `words` words after `p`.
fn hm_add(p: HmPtr, words: u32) -> HmPtr {
    let w = p.word + words;
    return HmPtr(p.buffer, p.page + w / HM_PAGE_WORDS, w % HM_PAGE_WORDS);
}

// The device page behind page `page` of bound buffer `buffer`, plus one; 0 (and a recorded
// fault at `word` of that page) if the page lies outside the buffer's bound range, `word`
// outside the page, or the page is not on the device.
fn hm__translate(buffer: u32, page: u32, word: u32) -> u32 {
    var e = 0u;
    if (buffer < hm_meta[0] && page < hm_meta[2u + 2u * buffer] && word < HM_PAGE_WORDS) {
        let v = hm_meta[1u + 2u * buffer] + page;
        if (v < arrayLength(&hm_table.entries)) {
            e = hm_table.entries[v];
        }
    }
    if (e == 0u) {
        if (atomicAdd(&hm_table.faults, 1u) == 0u) {
            atomicStore(&hm_table.fault_buffer, buffer);
            atomicStore(&hm_table.fault_page, page);
            atomicStore(&hm_table.fault_word, word);
        }
    }
    return e;
}

// Reads the word at `p`.
fn hm_load(p: HmPtr) -> u32 {
    let e = hm__translate(p.buffer, p.page, p.word);
    if (e == 0u) {
        return 0u;
    }
    let d = e - 1u;
    return hm__chunk_load(d / HM_CHUNK_PAGES, (d % HM_CHUNK_PAGES) * HM_PAGE_WORDS + p.word);
}

// Writes the word at `p`.
fn hm_store(p: HmPtr, v: u32) {
    let e = hm__translate(p.buffer, p.page, p.word);
    if (e == 0u) {
        return;
    }
    let d = e - 1u;
    hm__chunk_store(d / HM_CHUNK_PAGES, (d % HM_CHUNK_PAGES) * HM_PAGE_WORDS + p.word, v);
}

// A device page, translated once for kernels that work a page at a time. Only `hm_page`
// makes one (compiling refuses a kernel that builds one or keeps one in a `var`), so its
// fields always name a page of a bound range.
struct HmPage {
    // Chunk of device memory, and the page's first word in it.
    chunk: u32,
    first: u32,
    // False when the page is outside the buffer's bound range or not on the device (a
    // fault was recorded).
    present: bool,
}

// Translates page `page` of bound buffer `buffer`.
fn hm_page(buffer: u32, page: u32) -> HmPage {
    let e = hm__translate(buffer, page, 0u);
    if (e == 0u) {
        return HmPage(0u, 0u, false);
    }
    let d = e - 1u;
    return HmPage(d / HM_CHUNK_PAGES, (d % HM_CHUNK_PAGES) * HM_PAGE_WORDS, true);
}

// Reads word `word` (0..HM_PAGE_WORDS) of a translated page; zero if it is not present or
// `word` lies outside the page.
fn hm_page_load(p: HmPage, word: u32) -> u32 {
    if (!p.present || word >= HM_PAGE_WORDS) {
        return 0u;
    }
    return hm__chunk_load(p.chunk, p.first + word);
}

// Writes word `word` of a translated page; dropped if it is not present or `word` lies
// outside the page.
fn hm_page_store(p: HmPage, word: u32, v: u32) {
    if (p.present && word < HM_PAGE_WORDS) {
        hm__chunk_store(p.chunk, p.first + word, v);
    }
}

// Reads words 4q..4q+3 of a translated page (q in 0..HM_PAGE_WORDS / 4); zeros if it is not
// present or `q` lies outside the page.
fn hm_page_load4(p: HmPage, q: u32) -> vec4<u32> {
    if (!p.present || q >= HM_PAGE_WORDS / 4u) {
        return vec4<u32>();
    }
    return hm__chunk_load4(p.chunk, (p.first >> 2u) + q);
}

// Writes words 4q..4q+3 of a translated page; dropped if it is not present or `q` lies
// outside the page.
fn hm_page_store4(p: HmPage, q: u32, v: vec4<u32>) {
    if (p.present && q < HM_PAGE_WORDS / 4u) {
        hm__chunk_store4(p.chunk, (p.first >> 2u) + q, v);
    }
}

// The index of this invocation across the whole launch, for dispatches that spread
// workgroups over two or three dimensions (`hetmem::offload::workgroups`): workgroups count
// along x, then y, then z; `size` is the kernel's workgroup size (x * y * z of
// @workgroup_size). Pass the builtins workgroup_id, num_workgroups and
// local_invocation_index.
fn hm_invocation(wg: vec3<u32>, nwg: vec3<u32>, lane: u32, size: u32) -> u32 {
    return ((wg.z * nwg.y + wg.y) * nwg.x + wg.x) * size + lane;
}
