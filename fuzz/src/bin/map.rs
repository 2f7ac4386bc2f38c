//! Fuzz target: vmdepot::internals::format::decode_map_within on a whole map blob
//! (magic + zstd frame), see vmdepot_fuzz::map_target.
use vmdepot_fuzz::{map_target, LimitAlloc};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| map_target(data));
}
