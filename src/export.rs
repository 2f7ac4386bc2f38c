//! Materialisation: rebuild an image's raw content from the store, checking
//! every chunk's hash and the image's content digest.
//!
//! Main items: [`export`] (raw, sparse, or qcow2 through qemu-img) and
//! [`verify_image`] (the same work without writing). Workers take BLAKE3
//! subtree pieces of the image ([`crate::digest`]), so the digest is
//! computed in parallel and in any order; zero blocks are holes and are
//! never written.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::catalog::{self, ChunkLoc, FrameLoc, ImageRow};
use crate::depot::Depot;
use crate::digest::{self, PieceHash};
use crate::error::{Error, IoContext, Result};
use crate::format::{CHUNK, CHUNK_SIZE, ZERO_BLOCK};
use crate::ids::{hex, ChunkHash, ChunkId};
use crate::import::PIECE_BYTES;
use crate::maint::VerifyReport;
use crate::progress::Progress;
use crate::store::{pack_path, PackReader};

/// Output formats of `image export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    Qcow2,
}

impl ExportFormat {
    pub fn parse(s: &str) -> Result<ExportFormat> {
        match s {
            "raw" => Ok(ExportFormat::Raw),
            "qcow2" => Ok(ExportFormat::Qcow2),
            _ => Err(Error::Invalid(format!(
                "unknown export format {s:?}: use raw or qcow2"
            ))),
        }
    }
}

/// Removes a file on drop unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub(crate) fn export(
    depot: &Depot,
    row: &ImageRow,
    out: &Path,
    format: ExportFormat,
    progress: &dyn Progress,
) -> Result<()> {
    // Written beside the target and renamed into place: a failed export
    // leaves no partial file.
    let partial = sibling(out, ".vmdepot-partial");
    let raw_path = match format {
        ExportFormat::Raw => partial.clone(),
        ExportFormat::Qcow2 => sibling(out, ".vmdepot-raw"),
    };
    let mut guard_raw = TempFile(Some(raw_path.clone()));
    let mut guard_partial = TempFile(Some(partial.clone()));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&raw_path)
        .at(&raw_path)?;
    file.set_len(row.virtual_size).at(&raw_path)?;
    materialise(depot, row, Some((&file, &raw_path)), progress)?;
    file.sync_all().at(&raw_path)?;
    drop(file);
    if format == ExportFormat::Qcow2 {
        progress.begin("qcow2", 0);
        let r = crate::source::qemu_img(&[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            path_str(&raw_path)?,
            path_str(&partial)?,
        ]);
        progress.end();
        r?;
    }
    std::fs::rename(&partial, out).at(out)?;
    guard_partial.0 = None;
    if format == ExportFormat::Raw {
        guard_raw.0 = None;
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", p.display())))
}

pub(crate) fn verify_image(
    depot: &Depot,
    row: &ImageRow,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let chunks = materialise(depot, row, None, progress)?;
    Ok(VerifyReport {
        images: 1,
        chunks,
        bytes: row.virtual_size,
    })
}

/// Everything a worker needs to find a chunk's bytes.
struct Plan {
    map: Vec<ChunkId>,
    chunks: HashMap<ChunkId, ChunkLoc>,
    frames: HashMap<i64, FrameLoc>,
    packs: HashMap<i64, String>,
}

fn plan(depot: &Depot, row: &ImageRow) -> Result<Plan> {
    let label = || format!("{} ({})", row.name, row.id);
    let map = catalog::image_map(&depot.conn, &row.id)?;
    let mut chunks = HashMap::new();
    let mut frames = HashMap::new();
    let mut packs = HashMap::new();
    for (i, &cid) in map.iter().enumerate() {
        if cid == ZERO_BLOCK || chunks.contains_key(&cid) {
            continue;
        }
        let missing = |what: String| Error::Corrupt {
            image: label(),
            offset: i as u64 * CHUNK,
            detail: what,
        };
        let loc = catalog::chunk_loc(&depot.conn, cid)?
            .ok_or_else(|| missing(format!("chunk {cid} is missing from the catalog")))?;
        if let std::collections::hash_map::Entry::Vacant(v) = frames.entry(loc.frame) {
            let f = catalog::frame_loc(&depot.conn, loc.frame)?.ok_or_else(|| {
                missing(format!("frame {} is missing from the catalog", loc.frame))
            })?;
            if let std::collections::hash_map::Entry::Vacant(p) = packs.entry(f.pack) {
                let name = catalog::pack_name(&depot.conn, f.pack)?.ok_or_else(|| {
                    missing(format!("pack {} is missing from the catalog", f.pack))
                })?;
                p.insert(name);
            }
            v.insert(f);
        }
        chunks.insert(cid, loc);
    }
    Ok(Plan {
        map,
        chunks,
        frames,
        packs,
    })
}

/// Rebuilds the image into `out` (pre-sized, sparse) or just checks it.
/// Returns the number of data blocks checked.
fn materialise(
    depot: &Depot,
    row: &ImageRow,
    out: Option<(&File, &Path)>,
    progress: &dyn Progress,
) -> Result<u64> {
    let plan = plan(depot, row)?;
    let label = format!("{} ({})", row.name, row.id);
    let pieces = digest::split(row.virtual_size, PIECE_BYTES);
    let next = AtomicUsize::new(0);
    let abort = AtomicBool::new(false);
    let results: Mutex<Vec<Option<PieceHash>>> = Mutex::new(vec![None; pieces.leaves.len()]);
    let readers: Mutex<HashMap<i64, Arc<PackReader>>> = Mutex::new(HashMap::new());
    let checked = std::sync::atomic::AtomicU64::new(0);
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let root = depot.root();
    progress.begin("materialise", row.virtual_size);
    let errs: Vec<Error> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut w = Worker {
                        plan: &plan,
                        label: &label,
                        root,
                        readers: &readers,
                        cache: Vec::new(),
                        wbuf: Vec::with_capacity(1 << 20),
                        wstart: 0,
                        out,
                    };
                    loop {
                        if abort.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(piece) = pieces.leaves.get(i) else {
                            return Ok(());
                        };
                        let r = w.piece(piece, row.virtual_size, progress);
                        match r {
                            Ok((h, n)) => {
                                checked.fetch_add(n, Ordering::Relaxed);
                                results.lock().unwrap()[i] = Some(pieces.finish(&h));
                            }
                            Err(e) => {
                                abort.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                })
            })
            .collect();
        hs.into_iter()
            .filter_map(|h| h.join().expect("materialise worker panicked").err())
            .collect()
    });
    progress.end();
    if let Some(e) = errs.into_iter().next() {
        return Err(e);
    }
    let results: Vec<PieceHash> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every piece done"))
        .collect();
    let got = hex(pieces.root(&results).as_bytes());
    if row.content_digest.as_deref() != Some(got.as_str()) {
        return Err(Error::Corrupt {
            image: label,
            offset: 0,
            detail: format!(
                "content digest is {got}, the catalog records {}",
                row.content_digest.as_deref().unwrap_or("none")
            ),
        });
    }
    Ok(checked.into_inner())
}

/// Decompressed frames a worker keeps (most recent last).
const FRAME_CACHE: usize = 8;

struct Worker<'a> {
    plan: &'a Plan,
    label: &'a str,
    root: &'a Path,
    readers: &'a Mutex<HashMap<i64, Arc<PackReader>>>,
    cache: Vec<(i64, Vec<u8>)>,
    wbuf: Vec<u8>,
    wstart: u64,
    out: Option<(&'a File, &'a Path)>,
}

impl Worker<'_> {
    fn piece(
        &mut self,
        piece: &digest::Piece,
        size: u64,
        progress: &dyn Progress,
    ) -> Result<(blake3::Hasher, u64)> {
        let mut h = digest::piece_hasher(piece);
        let mut checked = 0;
        let end = piece.offset + piece.len;
        let mut off = piece.offset;
        let mut zeros = 0u64;
        while off < end {
            let blk = (off / CHUNK) as usize;
            let len = (end - off).min(CHUNK);
            let cid = self.plan.map[blk];
            if cid == ZERO_BLOCK {
                zeros += len;
            } else {
                if zeros > 0 {
                    digest::update_zeros(&mut h, zeros);
                    zeros = 0;
                }
                let data = self.chunk(cid, off)?;
                let data = &data[..len as usize];
                h.update(data);
                if self.out.is_some() {
                    if self.wstart + self.wbuf.len() as u64 != off || self.wbuf.len() >= 1 << 20 {
                        self.flush()?;
                        self.wstart = off;
                    }
                    self.wbuf.extend_from_slice(data);
                }
                checked += 1;
            }
            off += len;
            if off % (4 << 20) == 0 {
                progress.advance(4 << 20);
            }
        }
        if zeros > 0 {
            digest::update_zeros(&mut h, zeros);
        }
        self.flush()?;
        let _ = size;
        Ok((h, checked))
    }

    fn flush(&mut self) -> Result<()> {
        if let Some((f, p)) = self.out {
            if !self.wbuf.is_empty() {
                f.write_all_at(&self.wbuf, self.wstart).at(p)?;
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    /// The 4 KiB of chunk `cid`, hash-checked; `off` is where the image
    /// uses it (for error messages).
    fn chunk(&mut self, cid: ChunkId, off: u64) -> Result<Vec<u8>> {
        let loc = self.plan.chunks[&cid];
        let pos = match self.cache.iter().position(|(f, _)| *f == loc.frame) {
            Some(p) => p,
            None => {
                let data = self.read_frame(loc.frame).map_err(|e| Error::Corrupt {
                    image: self.label.to_owned(),
                    offset: off,
                    detail: e.to_string(),
                })?;
                if self.cache.len() >= FRAME_CACHE {
                    self.cache.remove(0);
                }
                self.cache.push((loc.frame, data));
                self.cache.len() - 1
            }
        };
        let frame = &self.cache[pos].1;
        let s = loc.slot as usize * CHUNK_SIZE;
        let Some(data) = frame.get(s..s + CHUNK_SIZE) else {
            return Err(Error::Corrupt {
                image: self.label.to_owned(),
                offset: off,
                detail: format!("chunk {cid}: slot {} outside its frame", loc.slot),
            });
        };
        if ChunkHash::of(data) != loc.hash {
            return Err(Error::Corrupt {
                image: self.label.to_owned(),
                offset: off,
                detail: format!(
                    "chunk {cid} (frame {}, slot {}) does not match its hash {:?}: the pack file was damaged; run `vmdepot fsck`",
                    loc.frame, loc.slot, loc.hash
                ),
            });
        }
        Ok(data.to_vec())
    }

    fn read_frame(&self, frame: i64) -> Result<Vec<u8>> {
        let f = &self.plan.frames[&frame];
        let reader = {
            let mut r = self.readers.lock().unwrap();
            match r.get(&f.pack) {
                Some(x) => x.clone(),
                None => {
                    let p = pack_path(self.root, &self.plan.packs[&f.pack]);
                    let x = Arc::new(PackReader::open(&p)?);
                    r.insert(f.pack, x.clone());
                    x
                }
            }
        };
        let mut out = Vec::new();
        reader.read_frame(f.offset, f.clen, f.nchunks as usize, &mut out)?;
        Ok(out)
    }
}
