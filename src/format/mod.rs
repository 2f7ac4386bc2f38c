//! On-disk format constants and pure encoders/decoders (no I/O).
//!
//! docs/FORMAT.md is the byte-by-byte description; this module is its code.
//! Main items: [`CHUNK_SIZE`], the pack header [`PackHeader`], and the image
//! map codec ([`encode_map`] / [`decode_map`]) that turns an image's list of
//! per-block chunk ids into the compact blob the catalog stores; the pack
//! index and manifest codecs. Decoders return a [`FormatError`] saying what
//! is wrong and in which [`Part`].
//!
//! DO NOT MODIFY the magic numbers or the encodings below: depots written by
//! earlier builds must stay readable. A new layout gets a new versioned
//! constant and a new code path.

mod error;

pub use error::{FormatError, Part};

use crate::ids::{ChunkHash, ChunkId};
use error::invalid;

/// Dedup granularity: images are cut into chunks of this size at offsets
/// that are multiples of it. The last chunk of an image is zero-padded.
pub const CHUNK_SIZE: usize = 4096;
/// [`CHUNK_SIZE`] as u64, for offset arithmetic.
pub const CHUNK: u64 = CHUNK_SIZE as u64;

/// How many new chunks are compressed together into one zstd frame (the
/// unit of decompression). Measured on Debian image A (2 GiB, 177 MiB of
/// data), packs after import: 32 chunks 58.8 MB, 128 chunks 54.8 MB,
/// 256 chunks (1 MiB) 53.2 MB; `zstd -3` of the whole file 50.1 MB.
/// readers take the count from the catalog, so changing it needs no migration.
pub const FRAME_CHUNKS: usize = 256;
// The import's in-progress map keeps the slot in 8 bits.
const _: () = assert!(FRAME_CHUNKS <= 256);

/// How many chunks a frame that a push writes to a remote holds at most
/// (local frames of more are recompressed on the way). A lazy boot from
/// the remote fetches whole frames, so smaller ones fetch less that the
/// guest does not read. Measured on the Debian 12 fixture (622.6 MiB of
/// data), pushed, then booted lazily from the remote until SSH answered:
/// 256 chunks: 178.3 MiB stored, 79.1 MiB fetched; 64 chunks: 185.3 MiB
/// stored (+3.9 %), 54.9 MiB fetched (-31 %); 32 chunks: 192.3 MiB
/// (+7.9 %), 50.7 MiB (-36 %).
pub const REMOTE_FRAME_CHUNKS: usize = 64;
const _: () = assert!(REMOTE_FRAME_CHUNKS <= FRAME_CHUNKS);

/// zstd level of the frames (of up to [`FRAME_CHUNKS`] chunks) that a
/// push writes for the chunks of an image's read profile
/// (`image::profile`): written once, fetched whole by every lazy boot from
/// the remote. Measured on the Debian 12 fixture (21,800 chunks read
/// first, 85 MiB), fetched until SSH by a lazy boot from the remote: at
/// level 9, 37.4 MiB (20.3 % of stored); at 19, 35.7 MiB (19.5 %), for a
/// push of 18.0 s where a push without a profile takes 5.9 s.
pub const READ_FIRST_LEVEL: i32 = 19;

/// A pack file is sealed and a new one started once it reaches this size.
pub const PACK_TARGET_BYTES: u64 = 64 << 20;

/// zstd level for new frames.
pub const ZSTD_LEVEL: i32 = 3;

/// Pack file magic, version 1.0: the first 8 bytes of
/// BLAKE3("vmdepot pack file v1.0"). DO NOT MODIFY.
pub const PACK_MAGIC_1_0: [u8; 8] = [0x07, 0x86, 0x69, 0xa9, 0x1c, 0x39, 0xad, 0xdb];

/// Image map blob magic, version 1.0: the first 4 bytes of
/// BLAKE3("vmdepot image map v1.0"). DO NOT MODIFY.
pub const MAP_MAGIC_1_0: [u8; 4] = [0x5a, 0x83, 0x97, 0x51];

/// Pack index magic, version 1.0: the first 8 bytes of
/// BLAKE3("vmdepot pack index v1.0"). DO NOT MODIFY.
pub const INDEX_MAGIC_1_0: [u8; 8] = [0xd4, 0x4a, 0x9b, 0xdd, 0xc9, 0xaf, 0x0c, 0x22];

/// Image manifest magic, version 1.0: the first 8 bytes of
/// BLAKE3("vmdepot image manifest v1.0"). DO NOT MODIFY.
pub const MANIFEST_MAGIC_1_0: [u8; 8] = [0xf5, 0x89, 0xf7, 0x4f, 0x0e, 0x10, 0x6d, 0x34];

/// The fixed 16-byte header at the start of every pack file.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackHeader {
    /// `PACK_MAGIC_1_0`.
    pub magic: [u8; 8],
    /// Chunk size in bytes, little-endian (4096).
    pub chunk_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

const _: () = assert!(std::mem::size_of::<PackHeader>() == PackHeader::SIZE);

impl PackHeader {
    /// Size of the header on disk; frames start at this offset.
    pub const SIZE: usize = 16;

    /// The header of a pack written now: the current magic, 4 KiB chunks.
    pub fn new() -> PackHeader {
        PackHeader {
            magic: PACK_MAGIC_1_0,
            chunk_size: CHUNK_SIZE as u32,
            reserved: 0,
        }
    }

    /// The header's 16 bytes as they are on disk.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[..8].copy_from_slice(&self.magic);
        b[8..12].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[12..16].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }

    /// Parses and checks a header; the error says what is wrong.
    pub fn parse(b: &[u8]) -> Result<PackHeader, FormatError> {
        if b.len() < Self::SIZE {
            return Err(FormatError::Short {
                part: Part::Pack,
                size: Self::SIZE,
            });
        }
        let h = PackHeader {
            magic: b[..8].try_into().unwrap(),
            chunk_size: u32::from_le_bytes(b[8..12].try_into().unwrap()),
            reserved: u32::from_le_bytes(b[12..16].try_into().unwrap()),
        };
        if h.magic != PACK_MAGIC_1_0 {
            return Err(FormatError::BadMagic { part: Part::Pack });
        }
        if h.chunk_size as usize != CHUNK_SIZE {
            return Err(FormatError::PackChunkSize(h.chunk_size));
        }
        Ok(h)
    }
}

impl Default for PackHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// One block of an image in a map: all zero, or a stored chunk.
pub const ZERO_BLOCK: ChunkId = 0;

/// A run of consecutive stored blocks of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// Index of the first block.
    pub start: u64,
    /// Chunk id of each block of the run (all > 0).
    pub ids: Vec<ChunkId>,
}

/// An image map in memory: the runs of stored blocks; every other block is
/// zero. Memory is proportional to the data, not to the virtual size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    /// Blocks in the image.
    pub nblocks: u64,
    /// Runs in block order, not overlapping, not empty.
    pub runs: Vec<Run>,
}

impl BlockMap {
    /// Builds a map from one entry per block ([`ZERO_BLOCK`] or a chunk id).
    pub fn from_blocks(blocks: &[ChunkId]) -> BlockMap {
        let mut b = MapBuilder::default();
        for &id in blocks {
            b.push(id);
        }
        b.finish()
    }

    /// The chunk of block `blk` ([`ZERO_BLOCK`] for a zero block).
    pub fn get(&self, blk: u64) -> ChunkId {
        let i = self.runs.partition_point(|r| r.start <= blk);
        match i.checked_sub(1).map(|i| &self.runs[i]) {
            Some(r) if blk < r.start + r.ids.len() as u64 => r.ids[(blk - r.start) as usize],
            _ => ZERO_BLOCK,
        }
    }

    /// Whether any block in `first..last` is stored.
    pub fn has_data(&self, first: u64, last: u64) -> bool {
        let i = self
            .runs
            .partition_point(|r| r.start + r.ids.len() as u64 <= first);
        self.runs.get(i).is_some_and(|r| r.start < last)
    }

    /// The same map with every chunk id replaced by `f(id)` (another
    /// depot's ids for the same content, or one chunk for two with the same
    /// hash). `f` must not return [`ZERO_BLOCK`].
    pub fn map_ids(&self, mut f: impl FnMut(ChunkId) -> ChunkId) -> BlockMap {
        BlockMap {
            nblocks: self.nblocks,
            runs: self
                .runs
                .iter()
                .map(|r| Run {
                    start: r.start,
                    ids: r.ids.iter().map(|&c| f(c)).collect(),
                })
                .collect(),
        }
    }

    /// `(block, chunk id)` of every stored block, in order.
    pub fn data(&self) -> impl Iterator<Item = (u64, ChunkId)> + '_ {
        self.runs.iter().flat_map(|r| {
            r.ids
                .iter()
                .enumerate()
                .map(move |(i, &id)| (r.start + i as u64, id))
        })
    }

    /// Number of stored blocks.
    pub fn data_blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.ids.len() as u64).sum()
    }
}

/// Builds a [`BlockMap`] block by block; zero runs cost nothing.
#[derive(Default)]
pub struct MapBuilder {
    map: BlockMap,
}

impl MapBuilder {
    /// Appends one block: chunk `id`, or a zero block for [`ZERO_BLOCK`].
    pub fn push(&mut self, id: ChunkId) {
        if id == ZERO_BLOCK {
            self.map.nblocks += 1;
            return;
        }
        let blk = self.map.nblocks;
        match self.map.runs.last_mut() {
            Some(r) if r.start + r.ids.len() as u64 == blk => r.ids.push(id),
            _ => self.map.runs.push(Run {
                start: blk,
                ids: vec![id],
            }),
        }
        self.map.nblocks += 1;
    }

    /// Blocks described so far.
    pub fn len(&self) -> u64 {
        self.map.nblocks
    }

    /// Whether no block was described yet.
    pub fn is_empty(&self) -> bool {
        self.map.nblocks == 0
    }

    /// Appends `n` zero blocks.
    pub fn push_zeros(&mut self, n: u64) {
        self.map.nblocks += n;
    }

    /// The map of the blocks pushed.
    pub fn finish(self) -> BlockMap {
        self.map
    }
}

/// Encodes an image map.
///
/// Layout (docs/FORMAT.md, "Image map"): magic, then a zstd frame holding
/// `varint(nblocks)` followed by runs `varint(zeros) varint(n) n×zigzag-varint(id
/// delta)` until `nblocks` blocks are described.
pub fn encode_map(map: &BlockMap) -> Vec<u8> {
    let mut body = Vec::new();
    put_varint(&mut body, map.nblocks);
    let mut prev: i64 = 0;
    let mut pos = 0u64;
    for r in &map.runs {
        put_varint(&mut body, r.start - pos);
        put_varint(&mut body, r.ids.len() as u64);
        for &id in &r.ids {
            put_varint(&mut body, zigzag(id - prev));
            prev = id;
        }
        pos = r.start + r.ids.len() as u64;
    }
    if pos < map.nblocks {
        put_varint(&mut body, map.nblocks - pos);
        put_varint(&mut body, 0);
    }
    let mut out = MAP_MAGIC_1_0.to_vec();
    out.extend(zstd::bulk::compress(&body, ZSTD_LEVEL).expect("zstd compress to memory"));
    out
}

/// Decodes [`encode_map`]'s output; the error says what is wrong.
pub fn decode_map(blob: &[u8]) -> Result<BlockMap, FormatError> {
    decode_map_within(blob, MAP_MAX_BLOCKS)
}

/// Largest block count a map may have (4 PiB of 4 KiB blocks).
const MAP_MAX_BLOCKS: u64 = 1 << 40;

/// Largest zstd window a map's frame may ask for (8 MiB: [`ZSTD_LEVEL`]
/// uses 2 MiB at most, zstd up to level 19 8 MiB). Without it a 20-byte
/// blob could make the decoder allocate zstd's default limit, 128 MiB.
const MAP_WINDOW_LOG_MAX: u32 = 23;

/// [`decode_map`] of a map that may describe at most `max_blocks` blocks.
///
/// The body is decoded as a stream, never held whole: memory is the zstd
/// window plus the map itself (which `max_blocks` bounds), whatever the
/// blob's compression ratio.
pub fn decode_map_within(blob: &[u8], max_blocks: u64) -> Result<BlockMap, FormatError> {
    use std::io::BufRead;
    if blob.len() < 4 || blob[..4] != MAP_MAGIC_1_0 {
        return Err(invalid(Part::Map, "bad magic"));
    }
    let zerr = |e: std::io::Error| invalid(Part::Map, e.to_string());
    let mut dec = zstd::stream::read::Decoder::with_buffer(&blob[4..]).map_err(zerr)?;
    dec.window_log_max(MAP_WINDOW_LOG_MAX).map_err(zerr)?;
    let mut p = std::io::BufReader::with_capacity(64 << 10, dec);
    let n = read_varint(&mut p, Part::Map)?;
    if n > max_blocks.min(MAP_MAX_BLOCKS) {
        return Err(invalid(Part::Map, "absurd block count"));
    }
    let mut map = BlockMap {
        nblocks: n,
        runs: Vec::new(),
    };
    let mut pos = 0u64;
    let mut prev: i64 = 0;
    while pos < n {
        let z = read_varint(&mut p, Part::Map)?;
        let d = read_varint(&mut p, Part::Map)?;
        if z.checked_add(d)
            .and_then(|x| x.checked_add(pos))
            .is_none_or(|e| e > n)
            || (z == 0 && d == 0)
        {
            return Err(invalid(Part::Map, "runs overflow the block count"));
        }
        pos += z;
        if d > 0 {
            // d is only a claim until its ids are read: reserve little.
            let mut ids = Vec::with_capacity(d.min(4096) as usize);
            for _ in 0..d {
                let id = prev
                    .checked_add(unzigzag(read_varint(&mut p, Part::Map)?))
                    .filter(|&id| id > 0)
                    .ok_or_else(|| invalid(Part::Map, "invalid chunk id"))?;
                ids.push(id);
                prev = id;
            }
            map.runs.push(Run { start: pos, ids });
            pos += d;
        }
    }
    if !p.fill_buf().map_err(zerr)?.is_empty() {
        return Err(invalid(Part::Map, "trailing bytes"));
    }
    Ok(map)
}

/// Reads a LEB128 varint from a stream.
fn read_varint(r: &mut impl std::io::BufRead, part: Part) -> Result<u64, FormatError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = match r.fill_buf() {
            Ok([b, ..]) => *b,
            Ok([]) => return Err(invalid(part, "truncated")),
            Err(e) => return Err(invalid(part, e.to_string())),
        };
        r.consume(1);
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(invalid(part, "varint too long"))
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// LEB128 unsigned varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Runs of consecutive values in sorted `ids`, as inclusive `(first, last)`.
pub fn id_runs(ids: &[ChunkId]) -> impl Iterator<Item = (ChunkId, ChunkId)> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let first = *ids.get(i)?;
        let mut j = i + 1;
        while j < ids.len() && ids[j] == ids[j - 1] + 1 {
            j += 1;
        }
        let last = ids[j - 1];
        i = j;
        Some((first, last))
    })
}

/// Number of 4 KiB blocks covering `size` bytes.
pub fn blocks_for(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// Parses 32 lowercase hex digits into 16 bytes.
fn unhex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A slot hash of all zero bytes: no chunk is indexed for the slot.
pub const UNUSED_SLOT: ChunkHash = ChunkHash([0; 32]);

/// One frame of a pack, as its index describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexFrame {
    /// Byte offset of the zstd frame in the pack.
    pub offset: u64,
    /// Its compressed length.
    pub clen: u64,
    /// BLAKE3 of each slot's 4096 bytes, in slot order ([`UNUSED_SLOT`]:
    /// a slot whose bytes no chunk uses).
    pub hashes: Vec<ChunkHash>,
}

/// The index of one pack (`packs/XX/NAME.idx`): where each frame is and
/// which chunk each slot holds, so the catalog's chunk table can be rebuilt
/// without decompressing the pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    /// The pack's name (32 lowercase hex digits).
    pub pack: String,
    /// The pack file's length when it was sealed.
    pub pack_len: u64,
    pub frames: Vec<IndexFrame>,
}

/// Size of the pack index header.
pub const INDEX_HEADER: usize = 80;

/// Encodes a pack index (docs/FORMAT.md, "Pack index").
pub fn encode_index(ix: &PackIndex) -> Vec<u8> {
    let mut body = Vec::with_capacity(ix.frames.iter().map(|f| 20 + 32 * f.hashes.len()).sum());
    for f in &ix.frames {
        body.extend_from_slice(&f.offset.to_le_bytes());
        body.extend_from_slice(&f.clen.to_le_bytes());
        body.extend_from_slice(&(f.hashes.len() as u32).to_le_bytes());
        for h in &f.hashes {
            body.extend_from_slice(&h.0);
        }
    }
    let mut out = Vec::with_capacity(INDEX_HEADER + body.len());
    out.extend_from_slice(&INDEX_MAGIC_1_0);
    out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(ix.frames.len() as u32).to_le_bytes());
    out.extend_from_slice(&unhex16(&ix.pack).expect("pack names are 32 hex digits"));
    out.extend_from_slice(&ix.pack_len.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let sum = covered(&out, &body);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// The BLAKE3 a header records: of the header bytes before it, then the
/// body (every other byte of the file).
fn covered(head: &[u8], body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(body);
    h.finalize()
}

/// Decodes and checks a pack index; the error says what is wrong.
pub fn decode_index(b: &[u8]) -> Result<PackIndex, FormatError> {
    if b.len() < INDEX_HEADER {
        return Err(FormatError::Short {
            part: Part::Index,
            size: INDEX_HEADER,
        });
    }
    if b[..8] != INDEX_MAGIC_1_0 {
        return Err(FormatError::BadMagic { part: Part::Index });
    }
    if le_u32(b, 8) as usize != CHUNK_SIZE {
        return Err(invalid(
            Part::Index,
            format!("unsupported chunk size {}", le_u32(b, 8)),
        ));
    }
    let nframes = le_u32(b, 12) as usize;
    let pack = crate::ids::hex(&b[16..32]);
    let pack_len = le_u64(b, 32);
    let body_len = le_u64(b, 40);
    if body_len != (b.len() - INDEX_HEADER) as u64 {
        return Err(invalid(
            Part::Index,
            format!(
                "body is {} bytes, the header says {body_len}",
                b.len() - INDEX_HEADER
            ),
        ));
    }
    let body = &b[INDEX_HEADER..];
    if covered(&b[..48], body).as_bytes()[..] != b[48..80] {
        return Err(FormatError::Checksum { part: Part::Index });
    }
    let mut frames = Vec::with_capacity(nframes.min(body.len() / 20));
    let mut p = 0usize;
    for _ in 0..nframes {
        if body.len() - p < 20 {
            return Err(invalid(Part::Index, "truncated frame entry"));
        }
        let offset = le_u64(body, p);
        let clen = le_u64(body, p + 8);
        let n = le_u32(body, p + 16) as usize;
        p += 20;
        if n > FRAME_CHUNKS || (body.len() - p) / 32 < n {
            return Err(invalid(Part::Index, "bad chunk count in a frame entry"));
        }
        let hashes = (0..n)
            .map(|i| ChunkHash(body[p + 32 * i..p + 32 * (i + 1)].try_into().unwrap()))
            .collect();
        p += 32 * n;
        frames.push(IndexFrame {
            offset,
            clen,
            hashes,
        });
    }
    if p != body.len() {
        return Err(invalid(Part::Index, "trailing bytes"));
    }
    Ok(PackIndex {
        pack,
        pack_len,
        frames,
    })
}

/// A tenant's share of an image, as a manifest records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestShare {
    pub account: String,
    pub created_at: i64,
}

/// An image's metadata as its manifest records it (JSON in the manifest
/// body; unknown fields are ignored, missing ones take their defaults).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ManifestMeta {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub owner: String,
    pub description: String,
    pub source_format: String,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub content_digest: String,
    pub created_at: i64,
    pub parent: Option<String>,
    pub parent_name: String,
    pub source_instance: Option<String>,
    pub copied_from: String,
    pub protected: bool,
    pub deprecated: bool,
    pub vendor: String,
    pub application: String,
    pub app_version: String,
    pub restricted_from: String,
    pub tags: std::collections::BTreeMap<String, String>,
    pub shares: Vec<ManifestShare>,
    /// Unix seconds when this manifest version was written.
    pub written_at: i64,
}

/// An image's block map naming chunks by hash: stays meaningful without
/// the catalog (chunk ids are the catalog's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HashBlockMap {
    pub nblocks: u64,
    /// `(first block, hash of each block)`, in block order, not empty.
    pub runs: Vec<(u64, Vec<ChunkHash>)>,
}

impl HashBlockMap {
    /// The hash of block `blk`'s chunk (`None`: a zero block).
    pub fn get(&self, blk: u64) -> Option<&ChunkHash> {
        let i = self.runs.partition_point(|r| r.0 <= blk);
        let r = &self.runs[i.checked_sub(1)?];
        r.1.get((blk - r.0) as usize)
    }
}

/// One version of an image's manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Version number: 0 at creation, +1 at each metadata change.
    pub seq: u32,
    pub meta: ManifestMeta,
    pub map: HashBlockMap,
}

/// Size of the manifest header.
pub const MANIFEST_HEADER: usize = 56;

/// Encodes a manifest (docs/FORMAT.md, "Image manifest").
pub fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let meta = serde_json::to_vec(&m.meta).expect("manifest metadata is serialisable");
    let mut plain = Vec::with_capacity(
        4 + meta.len() + 16 + 32 * m.map.runs.iter().map(|r| r.1.len()).sum::<usize>(),
    );
    plain.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    plain.extend_from_slice(&meta);
    put_varint(&mut plain, m.map.nblocks);
    let mut pos = 0u64;
    for (start, hashes) in &m.map.runs {
        put_varint(&mut plain, start - pos);
        put_varint(&mut plain, hashes.len() as u64);
        for h in hashes {
            plain.extend_from_slice(&h.0);
        }
        pos = start + hashes.len() as u64;
    }
    if pos < m.map.nblocks {
        put_varint(&mut plain, m.map.nblocks - pos);
        put_varint(&mut plain, 0);
    }
    let body = zstd::bulk::compress(&plain, ZSTD_LEVEL).expect("zstd compress to memory");
    let mut out = Vec::with_capacity(MANIFEST_HEADER + body.len());
    out.extend_from_slice(&MANIFEST_MAGIC_1_0);
    out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&m.seq.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    let sum = covered(&out, &body);
    out.extend_from_slice(sum.as_bytes());
    out.extend_from_slice(&body);
    out
}

/// The most bytes a manifest body of `body_len` compressed bytes may
/// decompress to: 64 times its size plus 16 MiB. Hashes do not compress,
/// so a real map is near 1:1; far beyond that is a decompression bomb
/// (a remote's manifests are untrusted input).
pub fn manifest_plain_limit(body_len: usize) -> usize {
    body_len.saturating_mul(64).saturating_add(16 << 20)
}

/// A reader of at most `left` bytes of `inner`: reading more is an error
/// naming the limit (a decompression bomb), so no caller ever holds more.
struct Capped<R> {
    inner: R,
    left: u64,
    limit: u64,
    compressed: usize,
}

impl<R: std::io::Read> std::io::Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left + 1).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "the body decompresses to more than {} bytes ({} compressed): refused as a decompression bomb",
                self.limit, self.compressed
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A manifest's checked header: its version and a stream of its plain
/// body (decompressed as read, at most [`manifest_plain_limit`] bytes).
fn open_manifest(b: &[u8]) -> Result<(u32, impl std::io::BufRead + '_), FormatError> {
    if b.len() < MANIFEST_HEADER {
        return Err(FormatError::Short {
            part: Part::Manifest,
            size: MANIFEST_HEADER,
        });
    }
    if b[..8] != MANIFEST_MAGIC_1_0 {
        return Err(FormatError::BadMagic {
            part: Part::Manifest,
        });
    }
    if le_u32(b, 8) as usize != CHUNK_SIZE {
        return Err(invalid(
            Part::Manifest,
            format!("unsupported chunk size {}", le_u32(b, 8)),
        ));
    }
    let body = &b[MANIFEST_HEADER..];
    if le_u64(b, 16) != body.len() as u64 {
        return Err(invalid(
            Part::Manifest,
            format!(
                "body is {} bytes, the header says {}",
                body.len(),
                le_u64(b, 16)
            ),
        ));
    }
    if covered(&b[..24], body).as_bytes()[..] != b[24..56] {
        return Err(FormatError::Checksum {
            part: Part::Manifest,
        });
    }
    let zerr = |e: std::io::Error| invalid(Part::Manifest, e.to_string());
    let mut dec = zstd::stream::read::Decoder::with_buffer(body).map_err(zerr)?;
    dec.window_log_max(MAP_WINDOW_LOG_MAX).map_err(zerr)?;
    let limit = manifest_plain_limit(body.len()) as u64;
    let capped = Capped {
        inner: dec,
        left: limit,
        limit,
        compressed: body.len(),
    };
    Ok((
        le_u32(b, 12),
        std::io::BufReader::with_capacity(64 << 10, capped),
    ))
}

/// Reads a manifest body's metadata (its length, then JSON).
fn read_meta(r: &mut impl std::io::BufRead) -> Result<ManifestMeta, FormatError> {
    use std::io::Read;
    let ioerr = |e: std::io::Error| invalid(Part::Manifest, e.to_string());
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => invalid(Part::Manifest, "truncated"),
        _ => ioerr(e),
    })?;
    let mlen = u64::from(u32::from_le_bytes(len));
    // The length is only a claim: the buffer grows with what arrives.
    let mut json = Vec::new();
    r.take(mlen).read_to_end(&mut json).map_err(ioerr)?;
    if (json.len() as u64) < mlen {
        return Err(invalid(Part::Manifest, "truncated metadata"));
    }
    serde_json::from_slice(&json).map_err(|e| invalid(Part::Manifest, format!("metadata: {e}")))
}

/// Reads a manifest body's map of `nblocks` blocks (the metadata's
/// virtual size), calling `each(block, hash)` for every stored block in
/// order, and checks nothing follows it.
fn read_hash_runs(
    r: &mut impl std::io::BufRead,
    nblocks: u64,
    mut each: impl FnMut(u64, ChunkHash),
) -> Result<(), FormatError> {
    let part = Part::Manifest;
    let n = read_varint(r, part)?;
    if n != nblocks {
        return Err(invalid(
            part,
            format!("maps {n} blocks, its virtual size needs {nblocks}"),
        ));
    }
    let mut pos = 0u64;
    while pos < n {
        let z = read_varint(r, part)?;
        let d = read_varint(r, part)?;
        if z.checked_add(d)
            .and_then(|x| x.checked_add(pos))
            .is_none_or(|e| e > n)
            || (z == 0 && d == 0)
        {
            return Err(invalid(part, "runs overflow the block count"));
        }
        pos += z;
        for _ in 0..d {
            let mut h = [0u8; 32];
            r.read_exact(&mut h)
                .map_err(|e| invalid(part, format!("truncated hash run: {e}")))?;
            each(pos, ChunkHash(h));
            pos += 1;
        }
    }
    let ioerr = |e: std::io::Error| invalid(part, e.to_string());
    if !r.fill_buf().map_err(ioerr)?.is_empty() {
        return Err(invalid(part, "trailing bytes"));
    }
    Ok(())
}

/// Decodes and checks a manifest, calling `each(block, hash)` for every
/// stored block in block order instead of building its map. The body is
/// streamed: memory is the metadata and the zstd window. Its map must
/// describe exactly the blocks of its virtual size.
pub fn visit_manifest(
    b: &[u8],
    each: impl FnMut(u64, ChunkHash),
) -> Result<(u32, ManifestMeta), FormatError> {
    let (seq, mut body) = open_manifest(b)?;
    let meta = read_meta(&mut body)?;
    let nblocks = blocks_for(meta.virtual_size);
    if nblocks > MAP_MAX_BLOCKS {
        return Err(invalid(Part::Manifest, "absurd virtual size"));
    }
    read_hash_runs(&mut body, nblocks, each)?;
    Ok((seq, meta))
}

/// Decodes and checks a manifest; the error says what is wrong. Memory
/// is its map (32 bytes a stored block, as many as its virtual size and
/// [`manifest_plain_limit`] allow), never its decompressed body.
pub fn decode_manifest(b: &[u8]) -> Result<Manifest, FormatError> {
    let mut runs: Vec<(u64, Vec<ChunkHash>)> = Vec::new();
    let (seq, meta) = visit_manifest(b, |blk, h| match runs.last_mut() {
        Some((start, hs)) if *start + hs.len() as u64 == blk => hs.push(h),
        _ => runs.push((blk, vec![h])),
    })?;
    let map = HashBlockMap {
        nblocks: blocks_for(meta.virtual_size),
        runs,
    };
    Ok(Manifest { seq, meta, map })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_derived_from_their_descriptions() {
        let pack = blake3::hash(b"vmdepot pack file v1.0");
        assert_eq!(PACK_MAGIC_1_0[..], pack.as_bytes()[..8]);
        let map = blake3::hash(b"vmdepot image map v1.0");
        assert_eq!(MAP_MAGIC_1_0[..], map.as_bytes()[..4]);
    }

    #[test]
    fn new_magics_are_derived_from_their_descriptions() {
        let ix = blake3::hash(b"vmdepot pack index v1.0");
        assert_eq!(
            INDEX_MAGIC_1_0[..],
            ix.as_bytes()[..8],
            "{:02x?}",
            &ix.as_bytes()[..8]
        );
        let m = blake3::hash(b"vmdepot image manifest v1.0");
        assert_eq!(
            MANIFEST_MAGIC_1_0[..],
            m.as_bytes()[..8],
            "{:02x?}",
            &m.as_bytes()[..8]
        );
    }

    #[test]
    fn pack_index_round_trip_and_damage() {
        let ix = PackIndex {
            pack: "0123456789abcdef0123456789abcdef".into(),
            pack_len: 1234,
            frames: vec![
                IndexFrame {
                    offset: 16,
                    clen: 100,
                    hashes: vec![ChunkHash([7; 32]), UNUSED_SLOT],
                },
                IndexFrame {
                    offset: 116,
                    clen: 50,
                    hashes: vec![ChunkHash([9; 32])],
                },
            ],
        };
        let b = encode_index(&ix);
        assert_eq!(b.len(), INDEX_HEADER + 2 * 20 + 3 * 32);
        assert_eq!(decode_index(&b), Ok(ix));
        for i in [0, 20, 60, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_index(&bad).is_err(), "byte {i}");
        }
        assert!(decode_index(&b[..b.len() - 1]).is_err());
    }

    #[test]
    fn manifest_round_trip_and_damage() {
        let mut meta = ManifestMeta {
            id: "img-0123456789abcdef".into(),
            name: "debian".into(),
            kind: "custom".into(),
            virtual_size: 10 * 4096,
            ..Default::default()
        };
        meta.tags.insert("k".into(), "v".into());
        meta.shares.push(ManifestShare {
            account: "bob".into(),
            created_at: 5,
        });
        let m = Manifest {
            seq: 3,
            meta,
            map: HashBlockMap {
                nblocks: 10,
                runs: vec![
                    (1, vec![ChunkHash([1; 32]), ChunkHash([2; 32])]),
                    (8, vec![ChunkHash([1; 32])]),
                ],
            },
        };
        let b = encode_manifest(&m);
        assert_eq!(decode_manifest(&b), Ok(m));
        for i in [0, 12, 30, b.len() - 1] {
            let mut bad = b.clone();
            bad[i] ^= 1;
            assert!(decode_manifest(&bad).is_err(), "byte {i}");
        }
        assert!(decode_manifest(&b[..40]).is_err());
    }

    #[test]
    fn a_manifest_that_decompresses_far_beyond_its_size_is_refused() {
        let m = Manifest {
            seq: 0,
            meta: ManifestMeta {
                id: "img-0123456789abcdef".into(),
                description: "a".repeat(40 << 20),
                ..Default::default()
            },
            map: HashBlockMap {
                nblocks: 0,
                runs: vec![],
            },
        };
        let b = encode_manifest(&m);
        assert!(b.len() < 1 << 20, "{}", b.len());
        let e = decode_manifest(&b).unwrap_err().to_string();
        assert!(e.contains("decompression bomb"), "{e}");
    }

    #[test]
    fn a_manifest_map_must_fit_its_virtual_size_and_meta_skips_it() {
        let mut m = Manifest {
            seq: 1,
            meta: ManifestMeta {
                id: "img-0123456789abcdef".into(),
                virtual_size: 3 * 4096,
                ..Default::default()
            },
            map: HashBlockMap {
                nblocks: 3,
                runs: vec![(0, vec![ChunkHash([7; 32]); 3])],
            },
        };
        let b = encode_manifest(&m);
        let mut seen = Vec::new();
        let visited = visit_manifest(&b, |blk, h| seen.push((blk, h)));
        assert_eq!(visited, Ok((1, m.meta.clone())));
        assert_eq!(seen.len(), 3);
        // a map of more blocks than the virtual size claims is refused
        m.meta.virtual_size = 4096;
        let e = decode_manifest(&encode_manifest(&m))
            .unwrap_err()
            .to_string();
        assert!(e.contains("maps 3 blocks, its virtual size needs 1"), "{e}");
    }

    #[test]
    fn pack_header_round_trip() {
        let h = PackHeader::new();
        assert_eq!(PackHeader::parse(&h.to_bytes()), Ok(h));
        let mut bad = h.to_bytes();
        bad[0] ^= 1;
        assert!(PackHeader::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(PackHeader::parse(&bad[..10]).is_err());
    }

    #[test]
    fn map_round_trip() {
        let cases: Vec<Vec<ChunkId>> = vec![
            vec![],
            vec![0, 0, 0],
            vec![1, 2, 3, 0, 0, 7, 7, 7, 0, 2],
            (1..100_000).chain([0; 500]).chain(5..9).collect(),
            vec![i64::MAX / 4, 1, 0],
        ];
        for c in cases {
            let m = BlockMap::from_blocks(&c);
            let back = decode_map(&encode_map(&m)).unwrap();
            assert_eq!(back, m);
            assert_eq!(back.nblocks, c.len() as u64);
            let stored: Vec<(u64, ChunkId)> = (0..)
                .zip(c.iter().copied())
                .filter(|&(_, id)| id != ZERO_BLOCK)
                .collect();
            assert_eq!(back.data().collect::<Vec<_>>(), stored);
            for (i, &id) in c.iter().enumerate() {
                assert_eq!(back.get(i as u64), id);
            }
        }
    }

    #[test]
    fn sequential_map_is_small() {
        let blocks: Vec<ChunkId> = (1..=524_288).collect();
        assert!(encode_map(&BlockMap::from_blocks(&blocks)).len() < 4096);
    }

    #[test]
    fn corrupt_maps_are_errors_not_panics() {
        let good = encode_map(&BlockMap::from_blocks(&[1, 2, 0, 3]));
        assert!(decode_map(&good[..3]).is_err());
        let mut bad_magic = good.clone();
        bad_magic[0] ^= 0xff;
        assert!(decode_map(&bad_magic).is_err());
        let body = {
            let mut b = Vec::new();
            put_varint(&mut b, 2);
            put_varint(&mut b, 5);
            put_varint(&mut b, 0);
            b
        };
        let mut blob = MAP_MAGIC_1_0.to_vec();
        blob.extend(zstd::bulk::compress(&body, 1).unwrap());
        assert!(decode_map(&blob)
            .unwrap_err()
            .to_string()
            .contains("overflow"));
    }

    /// Found by fuzz/ (map_body): an id delta past i64::MAX overflowed
    /// (a panic with overflow checks) instead of being an invalid id.
    #[test]
    fn id_delta_overflow_is_an_error() {
        let mut body = Vec::new();
        put_varint(&mut body, 2);
        put_varint(&mut body, 0);
        put_varint(&mut body, 2);
        put_varint(&mut body, zigzag(i64::MAX));
        put_varint(&mut body, zigzag(1));
        let mut blob = MAP_MAGIC_1_0.to_vec();
        blob.extend(zstd::bulk::compress(&body, 1).unwrap());
        assert!(decode_map(&blob)
            .unwrap_err()
            .to_string()
            .contains("invalid chunk id"));
    }

    /// A tiny blob whose body decompresses to 128 MiB: decoding used to hold
    /// the whole body in memory; now it streams and stops at the first
    /// inconsistency, and `decode_map_within` bounds the block count.
    #[test]
    fn zstd_bombs_are_decoded_as_streams() {
        let mut body = Vec::new();
        put_varint(&mut body, 1 << 40);
        body.resize(1 << 27, 0x80); // one endless varint
        let mut blob = MAP_MAGIC_1_0.to_vec();
        blob.extend(zstd::bulk::compress(&body, 1).unwrap());
        drop(body);
        assert!(blob.len() < 64 << 10);
        assert!(decode_map(&blob)
            .unwrap_err()
            .to_string()
            .contains("varint too long"));
        let m = BlockMap::from_blocks(&[0, 1, 2]);
        assert!(decode_map_within(&encode_map(&m), 2).is_err());
        assert_eq!(decode_map_within(&encode_map(&m), 3).unwrap(), m);
    }

    /// A frame that asks for a 128 MiB zstd window is refused before the
    /// decoder allocates it.
    #[test]
    fn huge_zstd_windows_are_refused() {
        use std::io::Write;
        let mut body = Vec::new();
        put_varint(&mut body, 1);
        put_varint(&mut body, 1);
        put_varint(&mut body, 0);
        // A stream of unknown size keeps the window it is given.
        let mut e = zstd::stream::write::Encoder::new(MAP_MAGIC_1_0.to_vec(), 1).unwrap();
        e.window_log(27).unwrap();
        e.write_all(&body).unwrap();
        let blob = e.finish().unwrap();
        assert!(decode_map(&blob).is_err());
        // The same body in a frame of an ordinary window decodes.
        let mut ok = MAP_MAGIC_1_0.to_vec();
        ok.extend(zstd::bulk::compress(&body, ZSTD_LEVEL).unwrap());
        assert_eq!(decode_map(&ok).unwrap().nblocks, 1);
    }

    #[test]
    fn huge_sparse_maps_are_small() {
        let mut b = MapBuilder::default();
        b.push_zeros(1 << 28); // 1 TiB of zeros
        b.push(7);
        b.push(8);
        b.push_zeros(1 << 20);
        let m = b.finish();
        assert_eq!(m.nblocks, (1 << 28) + 2 + (1 << 20));
        assert_eq!(m.runs.len(), 1);
        assert!(m.has_data(0, (1 << 28) + 1));
        assert!(!m.has_data(0, 1 << 28));
        assert!(!m.has_data((1 << 28) + 2, m.nblocks));
        assert_eq!(m.get(1 << 28), 7);
        assert_eq!(m.get(0), ZERO_BLOCK);
        assert_eq!(m.data_blocks(), 2);
        let back = decode_map(&encode_map(&m)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn id_runs_split_at_gaps() {
        let runs: Vec<_> = id_runs(&[1, 2, 3, 7, 9, 10]).collect();
        assert_eq!(runs, vec![(1, 3), (7, 7), (9, 10)]);
        assert_eq!(id_runs(&[]).count(), 0);
    }

    #[test]
    fn varint_edges() {
        for v in [0u64, 1, 127, 128, 300, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut p = &b[..];
            assert_eq!(read_varint(&mut p, Part::Map).unwrap(), v);
            assert!(p.is_empty());
        }
        for v in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
