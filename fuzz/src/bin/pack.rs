//! Fuzz target: pack header and frame readers (vmdepot::internals::format::PackHeader,
//! vmdepot::internals::store::{decompress_frame, PackReader}), see vmdepot_fuzz::pack_target.
use vmdepot_fuzz::{pack_target, LimitAlloc};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| pack_target(data));
}
