//! Fuzz target: vmdepot::internals::source::inspect_headers (see vmdepot_fuzz::source_target).
use vmdepot_fuzz::{source_target, LimitAlloc, Source};

#[global_allocator]
static ALLOC: LimitAlloc = LimitAlloc;

fn main() {
    afl::fuzz!(|data: &[u8]| source_target(data, Source::Vhd));
}
