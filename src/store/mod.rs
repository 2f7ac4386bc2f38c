//! The chunk store on disk: pack files of zstd frames.
//!
//! Main types: [`PackWriter`] appends compressed frames to a new pack file;
//! [`PackReader`] maps a sealed pack read-only and decompresses frames. The
//! store knows nothing of images or of the catalog: which frame holds which
//! chunk is the catalog's business.
//!
//! Paths: `DEPOT/packs/<first two hex digits>/<32 hex digits>.pack`, and
//! beside it `<32 hex digits>.idx`, the pack's index (frames and the hash of
//! every slot), written at seal so that the catalog can be rebuilt.
//! A pack is written once, fsynced, and never modified in place after that
//! ("sealed"); gc deletes whole packs.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::format::{IndexFrame, PackHeader, PackIndex, CHUNK_SIZE};
use crate::ids::{random_hex, ChunkHash};
use crate::perms::Perms;

/// Path of a pack file given the depot root and the pack's name (32
/// lowercase hex digits; anything else is a damaged catalog).
pub fn pack_path(root: &Path, name: &str) -> Result<PathBuf> {
    if !valid_pack_name(name) {
        return Err(Error::StoreDamaged(format!(
            "pack name {name:?} in the catalog is not 32 lowercase hex digits; run `vmdepot fsck`"
        )));
    }
    Ok(root
        .join("packs")
        .join(&name[..2])
        .join(format!("{name}.pack")))
}

/// Path of a pack's index file (`packs/XX/NAME.idx`, docs/FORMAT.md).
pub fn index_path(root: &Path, name: &str) -> Result<PathBuf> {
    Ok(pack_path(root, name)?.with_extension("idx"))
}

/// Reads and checks a pack's index file (`Ok(None)`: there is none).
pub fn read_index(root: &Path, name: &str) -> Result<Option<PackIndex>> {
    let p = index_path(root, name)?;
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::error::Error::io(&p, e)),
    };
    let ix = crate::format::decode_index(&b)
        .map_err(|e| Error::StoreDamaged(format!("{}: {e}", p.display())))?;
    if ix.pack != name {
        return Err(Error::StoreDamaged(format!(
            "{}: it indexes pack {}, not {name}",
            p.display(),
            ix.pack
        )));
    }
    Ok(Some(ix))
}

/// Writes a pack's index file durably (created new, fsynced; the caller
/// fsyncs the directory).
pub fn write_index(root: &Path, ix: &PackIndex, perms: Perms) -> Result<()> {
    let p = index_path(root, &ix.pack)?;
    let mut f = perms
        .open_options()
        .write(true)
        .create_new(true)
        .open(&p)
        .at(&p)?;
    f.write_all(&crate::format::encode_index(ix)).at(&p)?;
    f.sync_all().at(&p)
}

/// Removes a pack file and its index (either may be missing already).
pub fn remove_pack(root: &Path, name: &str) -> Result<()> {
    for p in [pack_path(root, name)?, index_path(root, name)?] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(crate::error::Error::io(&p, e))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `name` is a pack name: 32 lowercase hex digits.
pub fn valid_pack_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random pack name (32 hex digits).
pub fn new_pack_name() -> String {
    random_hex(16)
}

/// Compresses a frame: `data` is a whole number of chunks.
pub fn compress_frame(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    debug_assert_eq!(data.len() % CHUNK_SIZE, 0);
    zstd::bulk::compress(data, level)
}

/// Appends frames to one new pack file.
pub struct PackWriter {
    file: File,
    path: PathBuf,
    len: u64,
    root: PathBuf,
    perms: Perms,
    index: PackIndex,
}

impl PackWriter {
    /// Creates the pack file (and its fan-out directory) with the depot's
    /// modes and writes the header.
    pub fn create(root: &Path, name: &str, perms: Perms) -> Result<PackWriter> {
        let path = pack_path(root, name)?;
        let dir = path.parent().expect("pack path has a parent");
        if !dir.exists() {
            perms.mkdir_all(dir)?;
            sync_dir(dir.parent().expect("packs dir"))?;
        }
        let mut file = perms
            .open_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .at(&path)?;
        file.write_all(&PackHeader::new().to_bytes()).at(&path)?;
        Ok(PackWriter {
            file,
            path,
            len: PackHeader::SIZE as u64,
            root: root.to_owned(),
            perms,
            index: PackIndex {
                pack: name.to_owned(),
                pack_len: 0,
                frames: Vec::new(),
            },
        })
    }

    /// Appends one compressed frame whose slots hold chunks of these
    /// hashes ([`crate::format::UNUSED_SLOT`] for a slot no chunk uses);
    /// returns its offset in the pack.
    pub fn append(&mut self, frame: &[u8], hashes: &[ChunkHash]) -> Result<u64> {
        let off = self.len;
        self.file.write_all(frame).at(&self.path)?;
        self.len += frame.len() as u64;
        self.index.frames.push(IndexFrame {
            offset: off,
            clen: frame.len() as u64,
            hashes: hashes.to_vec(),
        });
        Ok(off)
    }

    /// Current size of the pack in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == PackHeader::SIZE as u64
    }

    /// Makes the pack durable: file data, then its index file
    /// (`NAME.idx`), then their directory entries.
    pub fn seal(mut self) -> Result<u64> {
        self.file.sync_all().at(&self.path)?;
        self.index.pack_len = self.len;
        write_index(&self.root, &self.index, self.perms)?;
        sync_dir(self.path.parent().expect("pack dir"))?;
        Ok(self.len)
    }
}

/// fsyncs a directory so that entries created in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// A sealed pack, open for reading frames. Each frame is mapped only while
/// it is decompressed, so a reader's memory is one frame, not the pack.
pub struct PackReader {
    file: File,
    len: u64,
    path: PathBuf,
}

impl PackReader {
    /// Opens a sealed pack and checks its header.
    pub fn open(path: &Path) -> Result<PackReader> {
        let file = File::open(path).at(path)?;
        let len = file.metadata().at(path)?.len();
        let mut head = [0u8; PackHeader::SIZE];
        let n = std::os::unix::fs::FileExt::read_at(&file, &mut head, 0).at(path)?;
        PackHeader::parse(&head[..n])
            .map_err(|e| Error::StoreDamaged(format!("{}: {e}", path.display())))?;
        Ok(PackReader {
            file,
            len,
            path: path.to_owned(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len <= PackHeader::SIZE as u64
    }

    /// Maps the compressed bytes of a frame, checked against the pack's size.
    pub fn frame_bytes(&self, offset: u64, clen: u64) -> Result<FrameBytes> {
        let end = offset.checked_add(clen).filter(|&e| e <= self.len);
        match end {
            Some(_) if offset >= PackHeader::SIZE as u64 => {
                FrameBytes::map(&self.file, offset, clen).at(&self.path)
            }
            _ => Err(Error::StoreDamaged(format!(
                "{}: frame at offset {offset} (+{clen} bytes) lies outside the pack ({} bytes)",
                self.path.display(),
                self.len
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
                self.path.display()
            ))
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The bytes of one frame, mapped from its sealed pack.
pub struct FrameBytes {
    map: memmap2::Mmap,
    skip: usize,
}

impl FrameBytes {
    fn map(file: &File, offset: u64, len: u64) -> std::io::Result<FrameBytes> {
        let page = 4096u64;
        let start = offset / page * page;
        let skip = (offset - start) as usize;
        let map = map_sealed_pack(file, start, skip + len as usize)?;
        Ok(FrameBytes { map, skip })
    }
}

impl std::ops::Deref for FrameBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.skip..]
    }
}

/// Decompresses a frame that must hold exactly `nchunks` chunks.
pub fn decompress_frame(
    src: &[u8],
    nchunks: usize,
    out: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    thread_local! {
        // A decompression context per thread, made once: making one per
        // frame was 1% of an export.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let want = nchunks * CHUNK_SIZE;
    out.clear();
    out.reserve(want);
    let n = DCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?);
        }
        c.as_mut()
            .expect("made above")
            .decompress_to_buffer(src, out)
            .map_err(|e| format!("zstd: {e}"))
    })?;
    if n != want {
        return Err(format!("decompressed to {n} bytes, expected {want}"));
    }
    Ok(())
}

/// The only mmap in vmdepot.
///
/// # Safety (the promise this relies on)
/// Sealed pack files are never modified in place: they are written once by a
/// [`PackWriter`], fsynced, and afterwards only deleted whole (unlink keeps an
/// existing mapping valid). So the mapped bytes cannot change under a reader.
#[allow(unsafe_code)]
fn map_sealed_pack(file: &File, offset: u64, len: usize) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: see the function's doc: sealed packs are immutable once written.
    unsafe {
        memmap2::MmapOptions::new()
            .offset(offset)
            .len(len)
            .map(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_seal_read() {
        let dir = tempfile::tempdir().unwrap();
        let name = new_pack_name();
        let mut w = PackWriter::create(dir.path(), &name, Perms::PRIVATE).unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE * 3).map(|i| (i % 7) as u8).collect();
        let c = compress_frame(&data, 3).unwrap();
        let hashes: Vec<ChunkHash> = data.chunks(CHUNK_SIZE).map(ChunkHash::of).collect();
        let off = w.append(&c, &hashes).unwrap();
        assert_eq!(off, PackHeader::SIZE as u64);
        let len = w.seal().unwrap();
        let ix = read_index(dir.path(), &name).unwrap().unwrap();
        assert_eq!(ix.pack_len, len);
        assert_eq!(ix.frames.len(), 1);
        assert_eq!(ix.frames[0].offset, off);
        assert_eq!(ix.frames[0].hashes, hashes);
        let r = PackReader::open(&pack_path(dir.path(), &name).unwrap()).unwrap();
        let mut out = Vec::new();
        r.read_frame(off, c.len() as u64, 3, &mut out).unwrap();
        assert_eq!(out, data);
        // a wrong chunk count or range is an error naming the pack
        assert!(r.read_frame(off, c.len() as u64, 2, &mut out).is_err());
        let e = r
            .read_frame(off, c.len() as u64 + 1, 3, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains(&name), "{e}");
    }
}
