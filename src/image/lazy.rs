//! An image read in place from the chunk store, at any offset: what a lazy
//! instance's disk server serves (`image::serve`) and what a capture of a
//! lazy instance reads where its overlay has no cluster of its own.
//!
//! [`LazyImage`] holds the image's block map and its own catalog
//! connection. A read looks up where its blocks' chunks are now (one range
//! query per run of chunk ids, then each frame's row), decompresses each
//! frame once into a small cache, and checks **every chunk it returns
//! against its BLAKE3 hash**: damaged or missing data is a [`ReadFailure`]
//! naming the byte offset, never wrong bytes. Since the locations are
//! looked up per read, a gc that repacks meanwhile is harmless: a pack
//! removed between the look-up and the read is retried once with fresh
//! locations (a pack opened before its removal stays readable).
//!
//! A **partial** image (a remote image run lazily, `remote::ondemand`)
//! has no map of chunk ids yet: its blocks are the manifest's hashes,
//! each looked up in the depot when first read (and remembered), and a
//! chunk the depot lacks is fetched from the remote, checked the same way.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use crate::catalog::{self, ImageRow};
use crate::error::{Error, Result};
use crate::format::{BlockMap, CHUNK, CHUNK_SIZE, ZERO_BLOCK};
use crate::ids::{ChunkHash, ChunkId};
use crate::store::{ObjectStore, PackReader};

/// Decompressed frames kept (1 MiB each at most).
const FRAMES_KEPT: usize = 32;
/// Packs kept open.
const PACKS_KEPT: usize = 64;

/// Why a read of a lazy image failed: the first bad byte offset and what
/// was wrong there.
#[derive(Clone, Debug)]
pub struct ReadFailure {
    pub(crate) offset: u64,
    pub(crate) detail: String,
    /// The remote failed (not the depot's data).
    pub(crate) remote: bool,
}

/// A chunk served from a fetched frame: the decompressed frame and the
/// chunk's byte offset in it.
pub(crate) type FetchedChunk = (Arc<Vec<u8>>, usize);

/// Where a partial image's chunks that the depot lacks come from (the
/// remote layer's `remote::ondemand`: this layer only reads through it).
pub(crate) trait RemoteChunks: Send + Sync {
    /// The image's map by hash (its manifest's).
    fn map(&self) -> &crate::format::HashBlockMap;
    /// The chunk `hash`: its frame, decompressed and checked, with the
    /// chunk's byte offset there, and the compressed bytes fetched for it
    /// now (0: it was in memory).
    fn chunk(&self, hash: &ChunkHash) -> Result<(FetchedChunk, u64)>;
    /// Starts fetching the rest of the image in the background (once).
    fn prefetch(&self);
}

/// What one read served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Served {
    /// Bytes of stored data (not zero blocks).
    pub(crate) data: u64,
    /// Compressed bytes fetched from a remote for it.
    pub(crate) fetched: u64,
}

/// An image of the depot, readable at any offset (see the module docs).
pub struct LazyImage {
    /// `NAME (img-…)`.
    pub(crate) label: String,
    pub(crate) size: u64,
    /// Opened on first use (`warm`): a launch does not wait for the map.
    db: Mutex<Option<Db>>,
    image: crate::ids::ImageId,
    catalog: std::path::PathBuf,
    file_mode: u32,
    store: Box<dyn ObjectStore>,
    packs: Mutex<Kept<String, Arc<PackReader>>>,
    frames: Mutex<Kept<FrameKey, Arc<Vec<u8>>>>,
    /// A partial image's remote side.
    remote: Option<Arc<dyn RemoteChunks>>,
    /// The image's read profile being recorded (`image::profile`).
    reads: Option<Mutex<super::profile::Recorder>>,
}

/// A frame by its pack's name and its offset there (content that never
/// changes: a repacked frame is at another pack).
type FrameKey = (String, u64);

/// A small cache that forgets the oldest entry first.
struct Kept<K, V> {
    cap: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + std::hash::Hash, V: Clone> Kept<K, V> {
    fn new(cap: usize) -> Self {
        Kept {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, k: &K) -> Option<V> {
        self.map.get(k).cloned()
    }

    fn put(&mut self, k: K, v: V) {
        if self.map.insert(k.clone(), v).is_none() {
            self.order.push_back(k);
            if self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }
}

/// The connection reads go through, the map it read, and the inode of
/// the catalog file it opened: a catalog replaced meanwhile (`fsck
/// --repair` rebuilds it, with new chunk ids) is opened again and the map
/// read again.
struct Db {
    conn: Connection,
    map: Map,
    ino: u64,
}

/// An image's blocks: chunk ids, or (a partial image) the hashes of its
/// manifest, each resolved to the depot's chunk when there is one.
enum Map {
    Ids(BlockMap),
    Hashes(HashMap<ChunkHash, ChunkId>),
}

pub(crate) fn inode(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.ino()).unwrap_or(0)
}

/// Where one stored block's bytes are.
struct BlockLoc {
    blk: u64,
    hash: crate::ids::ChunkHash,
    pack: String,
    offset: u64,
    clen: u64,
    nchunks: u32,
    slot: u32,
}

impl LazyImage {
    /// The available image `row` of `repo`, read through a connection of
    /// its own, opened (and the map read) on first use.
    pub(crate) fn new(row: &ImageRow, repo: &crate::repo::Repo) -> Result<LazyImage> {
        Ok(LazyImage {
            label: format!("{} ({})", row.name, row.id),
            size: row.virtual_size,
            db: Mutex::new(None),
            image: row.id.clone(),
            catalog: repo.root().join("catalog.db"),
            file_mode: repo.perms().file(),
            store: repo.own_store(),
            packs: Mutex::new(Kept::new(PACKS_KEPT)),
            frames: Mutex::new(Kept::new(FRAMES_KEPT)),
            remote: None,
            reads: None,
        })
    }

    /// The partial image `row` of `repo`, whose chunks the depot lacks
    /// come from `remote`.
    pub(crate) fn partial(
        row: &ImageRow,
        repo: &crate::repo::Repo,
        remote: Arc<dyn RemoteChunks>,
    ) -> Result<LazyImage> {
        let mut img = LazyImage::new(row, repo)?;
        img.remote = Some(remote);
        Ok(img)
    }

    /// Records the image's read profile while it has none (a disk
    /// server's reads; not a capture's, which reads everything).
    pub(crate) fn recording_reads(mut self, repo: &crate::repo::Repo) -> LazyImage {
        self.reads =
            super::profile::Recorder::new(repo.root(), &self.image, repo.perms()).map(Mutex::new);
        self
    }

    /// A partial image's remote side.
    pub(crate) fn remote(&self) -> Option<&Arc<dyn RemoteChunks>> {
        self.remote.as_ref()
    }

    /// Opens the connection and reads the map now, if not done yet, or
    /// again if the catalog was replaced.
    pub(crate) fn warm(&self) -> Result<()> {
        let mut guard = self.db.lock().unwrap();
        self.current(&mut guard).map(drop)
    }

    /// The open connection and map, (re)opened as needed.
    fn current<'g>(&self, guard: &'g mut Option<Db>) -> Result<&'g mut Db> {
        if guard.as_ref().is_none_or(|d| d.ino != inode(&self.catalog)) {
            *guard = Some(self.reopen()?);
        }
        Ok(guard.as_mut().expect("just set"))
    }

    /// The byte ranges of `[0, size)` that hold stored blocks, in order.
    pub(crate) fn data_ranges(&self, size: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut guard = self.db.lock().unwrap();
        let db = self.current(&mut guard)?;
        let blocks: Box<dyn Iterator<Item = u64>> = match (&db.map, &self.remote) {
            (Map::Ids(m), _) => Box::new(m.data().map(|(b, _)| b)),
            (Map::Hashes(_), Some(r)) => Box::new(
                r.map()
                    .runs
                    .iter()
                    .flat_map(|(s, h)| *s..*s + h.len() as u64),
            ),
            (Map::Hashes(_), None) => Box::new(std::iter::empty()),
        };
        for blk in blocks {
            let (s, e) = (blk * CHUNK, ((blk + 1) * CHUNK).min(size));
            if s >= e {
                break;
            }
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        Ok(out)
    }

    /// Fills `buf` with the image's bytes at `off` (zeros past its end).
    /// Returns how many of them were stored data.
    pub(crate) fn read(
        &self,
        buf: &mut [u8],
        off: u64,
    ) -> std::result::Result<Served, ReadFailure> {
        match self.read_once(buf, off) {
            Ok(n) => Ok(n),
            // The remote failed: its own retries were tried.
            Err(f) if f.remote => Err(f),
            // A pack removed by gc after the look-up: look up again, with
            // nothing cached.
            Err(_) => {
                self.packs.lock().unwrap().clear();
                self.frames.lock().unwrap().clear();
                if let Some(Db {
                    map: Map::Hashes(resolved),
                    ..
                }) = &mut *self.db.lock().unwrap()
                {
                    resolved.clear();
                }
                self.read_once(buf, off)
            }
        }
    }

    fn read_once(&self, buf: &mut [u8], off: u64) -> std::result::Result<Served, ReadFailure> {
        buf.fill(0);
        if buf.is_empty() || off >= self.size {
            return Ok(Served::default());
        }
        let end = (off + buf.len() as u64).min(self.size);
        let (locs, missing) = self.locate(off / CHUNK, (end - 1) / CHUNK)?;
        if let Some(r) = &self.reads {
            let blocks = locs
                .iter()
                .map(|l| l.blk)
                .chain(missing.iter().map(|m| m.0));
            r.lock().unwrap().note(blocks);
        }
        let mut served = Served::default();
        // The part of block `b0..b0 + CHUNK` inside [off, end) into `buf`.
        let mut put = |buf: &mut [u8], b0: u64, chunk: &[u8]| {
            let from = off.max(b0);
            let to = end.min(b0 + CHUNK);
            let dst = (from - off) as usize..(to - off) as usize;
            let src = (from - b0) as usize..(to - b0) as usize;
            buf[dst].copy_from_slice(&chunk[src]);
            served.data += to - from;
        };
        if let Some(remote) = &self.remote {
            for (blk, hash) in &missing {
                let ((frame, at), n) = remote.chunk(hash).map_err(|e| ReadFailure {
                    offset: blk * CHUNK,
                    detail: crate::error::one_line(&e.to_string()),
                    remote: true,
                })?;
                put(buf, blk * CHUNK, &frame[at..at + CHUNK_SIZE]);
                served.fetched += n;
            }
        }
        let mut frame_buf = Vec::new();
        for l in &locs {
            let frame = self.frame(l, &mut frame_buf)?;
            let s = l.slot as usize * CHUNK_SIZE;
            let Some(chunk) = frame.get(s..s + CHUNK_SIZE) else {
                return Err(self.failure(
                    l.blk * CHUNK,
                    format!("slot {} lies outside its frame in pack {}", l.slot, l.pack),
                ));
            };
            if crate::ids::ChunkHash::of(chunk) != l.hash {
                return Err(self.failure(
                    l.blk * CHUNK,
                    format!(
                        "the stored chunk does not match its hash (pack {}, frame at byte {})",
                        l.pack, l.offset
                    ),
                ));
            }
            put(buf, l.blk * CHUNK, chunk);
        }
        Ok(served)
    }

    fn failure(&self, offset: u64, detail: String) -> ReadFailure {
        ReadFailure {
            offset,
            detail,
            remote: false,
        }
    }

    /// Where the stored blocks in `first..=last` are now; and (a partial
    /// image) those the depot lacks, with their hashes.
    #[allow(clippy::type_complexity)]
    fn locate(
        &self,
        first: u64,
        last: u64,
    ) -> std::result::Result<(Vec<BlockLoc>, Vec<(u64, ChunkHash)>), ReadFailure> {
        let mut guard = self.db.lock().unwrap();
        let cur = self
            .current(&mut guard)
            .map_err(|e| self.failure(first * CHUNK, e.to_string()))?;
        let mut missing = Vec::new();
        let blocks: Vec<(u64, ChunkId)> = match (&mut cur.map, &self.remote) {
            (Map::Ids(m), _) => (first..=last)
                .map(|b| (b, m.get(b)))
                .filter(|&(_, c)| c != ZERO_BLOCK)
                .collect(),
            (Map::Hashes(resolved), Some(r)) => {
                let mut v = Vec::new();
                for b in first..=last {
                    let Some(h) = r.map().get(b) else { continue };
                    let id = match resolved.get(h) {
                        Some(&id) => Some(id),
                        None => catalog::chunk_by_hash(&cur.conn, h, &self.image)
                            .map_err(|e| self.failure(b * CHUNK, e.to_string()))?,
                    };
                    match id {
                        Some(id) => {
                            resolved.insert(*h, id);
                            v.push((b, id));
                        }
                        None => missing.push((b, *h)),
                    }
                }
                v
            }
            (Map::Hashes(_), None) => Vec::new(),
        };
        let db = &cur.conn;
        if blocks.is_empty() {
            return Ok((Vec::new(), missing));
        }
        let mut ids: Vec<ChunkId> = blocks.iter().map(|&(_, c)| c).collect();
        ids.sort_unstable();
        ids.dedup();
        let fail = |b: u64, e: Error| self.failure(b * CHUNK, e.to_string());
        let chunks = catalog::chunk_locs(db, &ids).map_err(|e| fail(first, e))?;
        let mut frames = HashMap::new();
        let mut out = Vec::with_capacity(blocks.len());
        for (blk, cid) in blocks {
            let Some(c) = chunks.get(&cid) else {
                return Err(self.failure(
                    blk * CHUNK,
                    format!("chunk {cid} is missing from the catalog"),
                ));
            };
            if let std::collections::hash_map::Entry::Vacant(v) = frames.entry(c.frame) {
                let f = catalog::frame_loc(db, c.frame)
                    .map_err(|e| fail(blk, e))?
                    .ok_or_else(|| {
                        self.failure(
                            blk * CHUNK,
                            format!("frame {} is missing from the catalog", c.frame),
                        )
                    })?;
                let pack = catalog::pack_name(db, f.pack)
                    .map_err(|e| fail(blk, e))?
                    .ok_or_else(|| {
                        self.failure(
                            blk * CHUNK,
                            format!("pack {} is missing from the catalog", f.pack),
                        )
                    })?;
                v.insert((f, pack));
            }
            let (f, pack) = &frames[&c.frame];
            out.push(BlockLoc {
                blk,
                hash: c.hash,
                pack: pack.clone(),
                offset: f.offset,
                clen: f.clen,
                nchunks: f.nchunks,
                slot: c.slot,
            });
        }
        Ok((out, missing))
    }

    /// A new connection to the catalog file now at its path, and the map
    /// read through it.
    fn reopen(&self) -> Result<Db> {
        let ino = inode(&self.catalog);
        let conn = catalog::open(&self.catalog, self.file_mode, Some("the depot is in use"))?;
        let map = match self.remote {
            Some(_) => Map::Hashes(HashMap::new()),
            None => Map::Ids(catalog::image_map(&conn, &self.image)?),
        };
        tracing::debug!("image {}: catalog opened, map read", self.label);
        Ok(Db { conn, map, ino })
    }

    /// The decompressed frame `l` is in.
    fn frame(
        &self,
        l: &BlockLoc,
        buf: &mut Vec<u8>,
    ) -> std::result::Result<Arc<Vec<u8>>, ReadFailure> {
        let key = (l.pack.clone(), l.offset);
        if let Some(f) = self.frames.lock().unwrap().get(&key) {
            return Ok(f);
        }
        let fail = |e: Error| self.failure(l.blk * CHUNK, e.to_string());
        let cached = self.packs.lock().unwrap().get(&l.pack);
        let reader = match cached {
            Some(r) => r,
            None => {
                let r = Arc::new(PackReader::open(&*self.store, &l.pack).map_err(fail)?);
                self.packs.lock().unwrap().put(l.pack.clone(), r.clone());
                r
            }
        };
        reader
            .read_frame(l.offset, l.clen, l.nchunks as usize, buf)
            .map_err(fail)?;
        let f = Arc::new(std::mem::take(buf));
        self.frames.lock().unwrap().put(key, f.clone());
        Ok(f)
    }
}
