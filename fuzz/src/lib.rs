//! Shared parts of vmdepot's fuzz targets (one binary per target in
//! src/bin/): the 64 MiB allocation limit, the scratch file that inputs of
//! file-reading parsers are written to, and the target bodies themselves so
//! that `mkseeds` and the reproduction tests can call them too.
//!
//! Every target must return normally on every input: a panic (turned into
//! an abort by `afl::fuzz!`), an abort from [`LimitAlloc`] or a run past
//! AFL's timeout is a finding.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use vmdepot::internals::{format, source, store};
use vmdepot::SourceFormat;

/// Largest heap, live in total or in one allocation, that a target may use
/// on any input (the limit). AFL's `-m` is a second, coarser
/// backstop on the address space.
pub const HEAP_LIMIT: usize = 64 << 20;

/// A global allocator that aborts (a crash for AFL) when one allocation or
/// the live total would pass [`HEAP_LIMIT`]; a libFuzzer `-malloc_limit_mb`
/// / `-rss_limit_mb` for stable Rust.
pub struct LimitAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);

fn over_limit(size: usize) -> ! {
    let msg = b"vmdepot-fuzz: allocation over the 64 MiB heap limit\n";
    // SAFETY: writing a static buffer to fd 2; nothing may allocate here.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    let _ = size;
    std::process::abort()
}

fn account(size: usize) {
    if size > HEAP_LIMIT || LIVE.fetch_add(size, Ordering::Relaxed) + size > HEAP_LIMIT {
        over_limit(size)
    }
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for LimitAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        account(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        account(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > l.size() {
            account(new - l.size());
        } else {
            LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
        }
        System.realloc(p, l, new)
    }
}

/// The scratch file inputs are written to: in `$VMDEPOT_FUZZ_TMP` (run.sh
/// points it at a directory on tmpfs that it removes afterwards) or the
/// system temp dir, named after the parent process so the children that one
/// AFL fork server starts reuse one file.
pub fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir = std::env::var_os("VMDEPOT_FUZZ_TMP")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        // SAFETY: getppid has no preconditions.
        let ppid = unsafe { libc::getppid() };
        dir.join(format!("vmdepot-fuzz-input-{ppid}"))
    })
}

fn write_scratch(data: &[u8]) -> &'static PathBuf {
    let p = scratch();
    std::fs::write(p, data).expect("write the scratch input file");
    p
}

/// Which input format a `source_*` target feeds [`source::inspect_headers`].
#[derive(Clone, Copy, Debug)]
pub enum Source {
    /// The input as it is: detection of every format, then its checks.
    Any,
    /// The input with the qcow2 magic forced over its first bytes.
    Qcow2,
    /// The input with the VMDK sparse magic forced over its first bytes.
    Vmdk,
    /// The input as it is, with `--format vhd` (footer at the end or a copy
    /// at the start).
    Vhd,
}

/// Detection and header checks of an input image (everything `inspect`
/// does before it calls qemu-img), on `data` written to a file.
pub fn source_target(data: &[u8], kind: Source) {
    let mut buf;
    let (input, expected) = match kind {
        Source::Any => (data, None),
        Source::Vhd => (data, Some(SourceFormat::Vhd)),
        Source::Qcow2 | Source::Vmdk => {
            let magic: &[u8] = match kind {
                Source::Qcow2 => b"QFI\xfb",
                _ => b"KDMV",
            };
            buf = data.to_vec();
            let n = magic.len().min(buf.len());
            buf[..n].copy_from_slice(&magic[..n]);
            (&buf[..], None)
        }
    };
    let p = write_scratch(input);
    let Ok(opened) = source::open_input(p) else {
        return;
    };
    if let Ok(ins) = source::inspect_headers(&opened, expected) {
        // What inspect hands on must be sane for what it claims.
        assert_eq!(ins.file_size, input.len() as u64);
        if let Some(want) = expected {
            assert_eq!(ins.format, want);
        }
    }
}

/// Largest image the map target decodes for: 2^20 blocks (4 GiB), so that
/// a valid map's own memory stays well under [`HEAP_LIMIT`].
pub const MAP_MAX_BLOCKS: u64 = 1 << 20;

/// The image map codec: decode, and a decoded map must encode back to a map
/// that decodes to the same thing.
pub fn map_target(data: &[u8]) {
    if let Ok(m) = format::decode_map_within(data, MAP_MAX_BLOCKS) {
        assert!(m.nblocks <= MAP_MAX_BLOCKS);
        let mut end = 0;
        for r in &m.runs {
            assert!(
                r.start >= end && !r.ids.is_empty(),
                "runs overlap or are empty"
            );
            end = r.start + r.ids.len() as u64;
        }
        assert!(end <= m.nblocks);
        let again = format::encode_map(&m);
        assert_eq!(format::decode_map(&again).as_ref(), Ok(&m));
        if let Some(r) = m.runs.last() {
            assert_eq!(m.get(r.start), r.ids[0]);
        }
    }
}

/// Bytes before the pack file in a `pack` input: the catalog's view of one
/// frame (`nchunks - 1` u8, `offset` u32 LE, `clen` u32 LE), which the
/// reader is given by the catalog in real use.
pub const PACK_PREFIX: usize = 9;

/// Pack files: the header parse, a frame decompressed from bytes, and
/// [`store::PackReader`] reading that frame from the file.
pub fn pack_target(data: &[u8]) {
    if data.len() < PACK_PREFIX {
        return;
    }
    let nchunks = data[0] as usize + 1;
    let offset = u32::from_le_bytes(data[1..5].try_into().unwrap()) as u64;
    let clen = u32::from_le_bytes(data[5..9].try_into().unwrap()) as u64;
    let pack = &data[PACK_PREFIX..];
    let _ = format::PackHeader::parse(pack);
    let mut out = Vec::new();
    if pack.len() > format::PackHeader::SIZE {
        if decompress_ok(&pack[format::PackHeader::SIZE..], nchunks, &mut out) {
            assert_eq!(out.len(), nchunks * format::CHUNK_SIZE);
        }
    }
    let store = write_scratch_pack(pack);
    if let Ok(r) = store::PackReader::open(store, SCRATCH_PACK) {
        if r.read_frame(offset, clen, nchunks, &mut out).is_ok() {
            assert_eq!(out.len(), nchunks * format::CHUNK_SIZE);
        }
    }
}

/// The name of the one pack of [`write_scratch_pack`]'s store.
const SCRATCH_PACK: &str = "00000000000000000000000000000000";

/// A local store beside the scratch file whose one pack holds `pack`.
fn write_scratch_pack(pack: &[u8]) -> &'static store::LocalDir {
    use store::{LocalDir, ObjectKind};
    static S: OnceLock<LocalDir> = OnceLock::new();
    let s = S.get_or_init(|| {
        let root = scratch().with_extension("depot");
        LocalDir::new(&root, vmdepot::internals::Perms::PRIVATE)
    });
    let p = s.path(ObjectKind::Pack, SCRATCH_PACK).expect("a pack name");
    std::fs::create_dir_all(p.parent().expect("a pack directory")).expect("make the scratch store");
    std::fs::write(&p, pack).expect("write the scratch pack");
    s
}

fn decompress_ok(src: &[u8], nchunks: usize, out: &mut Vec<u8>) -> bool {
    store::decompress_frame(src, nchunks, out).is_ok()
}
