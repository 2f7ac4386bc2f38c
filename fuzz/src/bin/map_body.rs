//! Fuzz target: the image map's body (varints, runs, id deltas) without
//! the zstd layer in the way: the input is compressed and given its magic
//! here, then decoded by vmdepot_fuzz::map_target.
use vmdepot_fuzz::{map_target, LimitAlloc};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let mut blob = vmdepot::internals::format::MAP_MAGIC_1_0.to_vec();
        blob.extend(zstd::bulk::compress(data, 1).expect("zstd compress to memory"));
        map_target(&blob);
    });
}
