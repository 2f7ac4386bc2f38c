//! Packs over any [`ObjectStore`]: [`PackWriter`] appends compressed frames
//! to a new pack object and seals it with its index object; [`PackReader`]
//! checks a sealed pack's header and reads (and decompresses) its frames by
//! range. [`read_index`], [`write_index`] and [`remove_pack`] are the index
//! and deletion rules of docs/FORMAT.md; [`PackReader::reindex`] walks a
//! pack's frames when its index is lost.

use super::object::{ObjectKind, ObjectReader, ObjectStore, ObjectWriter, RangeBytes};
use super::{decompress_frame, FrameError};
use crate::error::{Error, Result};
use crate::format::{self, IndexFrame, PackHeader, PackIndex, CHUNK_SIZE, FRAME_CHUNKS};
use crate::ids::ChunkHash;
use std::sync::Arc;

/// Reads and checks a pack's index (`Ok(None)`: there is none).
pub fn read_index(store: &dyn ObjectStore, name: &str) -> Result<Option<PackIndex>> {
    let Some(b) = store.get(ObjectKind::PackIndex, name)? else {
        return Ok(None);
    };
    let label = || store.label(ObjectKind::PackIndex, name);
    let ix =
        format::decode_index(&b).map_err(|e| Error::StoreDamaged(format!("{}: {e}", label())))?;
    if ix.pack != name {
        return Err(Error::StoreDamaged(format!(
            "{}: it indexes pack {}, not {name}",
            label(),
            ix.pack
        )));
    }
    Ok(Some(ix))
}

/// Writes a pack's index durably (its name must be free: a damaged index
/// is deleted first).
pub fn write_index(store: &dyn ObjectStore, ix: &PackIndex) -> Result<()> {
    store.put(ObjectKind::PackIndex, &ix.pack, &format::encode_index(ix))
}

/// Deletes a pack and then its index (either may be gone already): an
/// index never outlives its pack for long, and one whose pack is gone is
/// garbage.
pub fn remove_pack(store: &dyn ObjectStore, name: &str) -> Result<()> {
    store.delete(ObjectKind::Pack, name)?;
    store.delete(ObjectKind::PackIndex, name)
}

/// Appends frames to one new pack; sealing writes its index.
pub struct PackWriter<'s> {
    store: &'s dyn ObjectStore,
    object: Box<dyn ObjectWriter>,
    index: PackIndex,
}

impl<'s> PackWriter<'s> {
    /// Creates the pack object and writes its header.
    pub fn create(store: &'s dyn ObjectStore, name: &str) -> Result<PackWriter<'s>> {
        let mut object = store.create(ObjectKind::Pack, name)?;
        object.append(&PackHeader::new().to_bytes())?;
        Ok(PackWriter {
            store,
            object,
            index: PackIndex {
                pack: name.to_owned(),
                pack_len: 0,
                frames: Vec::new(),
            },
        })
    }

    /// Appends one compressed frame whose slots hold chunks of these
    /// hashes ([`format::UNUSED_SLOT`] for a slot no chunk uses); returns
    /// its offset in the pack.
    pub fn append(&mut self, frame: &[u8], hashes: &[ChunkHash]) -> Result<u64> {
        let offset = self.object.len();
        self.object.append(frame)?;
        self.index.frames.push(IndexFrame {
            offset,
            clen: frame.len() as u64,
            hashes: hashes.to_vec(),
        });
        Ok(offset)
    }

    /// Current size of the pack in bytes.
    pub fn len(&self) -> u64 {
        self.object.len()
    }

    /// Makes the pack durable, then its index (so an index exists only for
    /// a complete pack); returns the pack's size.
    pub fn seal(mut self) -> Result<u64> {
        let len = self.object.seal()?;
        self.index.pack_len = len;
        write_index(self.store, &self.index)?;
        Ok(len)
    }
}

/// A sealed pack, open for reading frames. Each frame is fetched (mapped,
/// locally) only while it is decompressed, so a reader's memory is one
/// frame, not the pack.
pub struct PackReader {
    object: Arc<dyn ObjectReader>,
}

impl PackReader {
    /// Opens a sealed pack and checks its header.
    pub fn open(store: &dyn ObjectStore, name: &str) -> Result<PackReader> {
        let object = store.open(ObjectKind::Pack, name)?;
        let n = object.len().min(PackHeader::SIZE as u64);
        let head = object.read_range(0, n)?;
        PackHeader::parse(&head)
            .map_err(|e| Error::StoreDamaged(format!("{}: {e}", object.label())))?;
        Ok(PackReader { object })
    }

    /// The pack's size in bytes.
    fn len(&self) -> u64 {
        self.object.len()
    }

    /// The compressed bytes of a frame, checked against the pack's size.
    pub fn frame_bytes(&self, offset: u64, clen: u64) -> Result<RangeBytes> {
        let end = offset.checked_add(clen).filter(|&e| e <= self.len());
        match end {
            Some(_) if offset >= PackHeader::SIZE as u64 => self.object.read_range(offset, clen),
            _ => Err(Error::StoreDamaged(format!(
                "{}: frame at offset {offset} (+{clen} bytes) lies outside the pack ({} bytes)",
                self.object.label(),
                self.len()
            ))),
        }
    }

    /// Decompresses a frame of `nchunks` chunks into `out` (resized).
    pub fn read_frame(
        &self,
        offset: u64,
        clen: u64,
        nchunks: usize,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let src = self.frame_bytes(offset, clen)?;
        decompress_frame(&src, nchunks, out).map_err(|e| {
            Error::StoreDamaged(format!(
                "{}: frame at offset {offset}: {e}; `vmdepot image verify` checks every image's data",
                self.object.label()
            ))
        })
    }

    /// Reads the pack whose index (named `name`) is missing or damaged:
    /// walks its zstd frames and hashes every 4 KiB slot. Stops at the
    /// first bytes that are not one of vmdepot's frames, and says so.
    pub fn reindex(&self, name: &str) -> Result<(PackIndex, Option<String>)> {
        let bytes = self.object.read_range(0, self.len())?;
        let mut walk = FrameWalk {
            label: self.object.label(),
            bytes: &bytes,
            off: PackHeader::SIZE,
            buf: Vec::new(),
        };
        let mut frames = Vec::new();
        let trouble = loop {
            match walk.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break None,
                Err(t) => break Some(t),
            }
        };
        let ix = PackIndex {
            pack: name.to_owned(),
            pack_len: self.len(),
            frames,
        };
        Ok((ix, trouble))
    }
}

/// [`PackReader::reindex`]'s walk over a whole pack's bytes.
struct FrameWalk<'a> {
    label: &'a str,
    bytes: &'a [u8],
    off: usize,
    buf: Vec<u8>,
}

impl FrameWalk<'_> {
    /// The frame at the current offset (`Ok(None)`: the end), or what is
    /// wrong there.
    fn next_frame(&mut self) -> std::result::Result<Option<IndexFrame>, String> {
        let (label, off) = (self.label, self.off);
        let Some(rest) = self.bytes.get(off..).filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        let clen = match zstd::zstd_safe::find_frame_compressed_size(rest) {
            Ok(n) if n > 0 && n <= rest.len() => n,
            _ => {
                return Err(format!(
                    "{label}: bytes from offset {off} are not a complete zstd frame; ignored"
                ))
            }
        };
        let nchunks = match zstd::zstd_safe::get_frame_content_size(rest) {
            Ok(Some(n))
                if n % CHUNK_SIZE as u64 == 0 && n / CHUNK_SIZE as u64 <= FRAME_CHUNKS as u64 =>
            {
                (n / CHUNK_SIZE as u64) as usize
            }
            _ => {
                return Err(format!(
                "{label}: the frame at offset {off} is not one of vmdepot's; the rest is ignored"
            ))
            }
        };
        decompress_frame(&rest[..clen], nchunks, &mut self.buf).map_err(|e: FrameError| {
            format!("{label}: the frame at offset {off}: {e}; the rest is ignored")
        })?;
        self.off += clen;
        Ok(Some(IndexFrame {
            offset: off as u64,
            clen: clen as u64,
            hashes: self
                .buf
                .chunks_exact(CHUNK_SIZE)
                .map(ChunkHash::of)
                .collect(),
        }))
    }
}
