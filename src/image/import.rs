//! Import: cut an image into 4 KiB chunks, store the new ones, commit the
//! image.
//!
//! Main items: [`ImportOptions`], `import` (a file: opened and checked by
//! [`crate::image::source`], or taken from an earlier import of the same
//! unchanged file without reading it) and `import_input` (any
//! `Input`, e.g. capture's overlay reader). Both fill a row made by
//! `create_image`. Name rules are in [`crate::image::names`].
//!
//! The pipeline: the content is split into BLAKE3 subtree pieces
//! ([`crate::digest`]); worker threads (one per core, at most 8) take
//! pieces and, for each 4 KiB block, skip holes (SEEK_DATA) and all-zero
//! blocks, hash the block, look it up (this import's new chunks first, then
//! the catalog, one autocommit query per look-up), and batch new chunks
//! into frames that they compress themselves. A writer thread appends the
//! compressed frames to pending pack files and enters them in the catalog,
//! batch by batch, as chunks pending for this import. When all pieces are
//! done the packs are fsynced and one catalog transaction inserts the last
//! frames and chunks and flips the image to `available`.
//!
//! **Invariant**: the image row becomes `available` in the same transaction
//! that commits its chunks, after its pack files are durable; a reused chunk
//! is checked to still exist inside that transaction (a concurrent gc may
//! have collected it, in which case the import starts over).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use rusqlite::Connection;
use tracing::instrument;

use crate::catalog;
use crate::catalog::ImageType;
use crate::digest::{self, PieceHash, Pieces};
use crate::error::{Error, IoContext, Result};
use crate::format::{self, CHUNK, CHUNK_SIZE, FRAME_CHUNKS, ZSTD_LEVEL};
use crate::ids::{hex, ChunkHash, ChunkId, ImageId};
use crate::image::create::{create_image, Cleanup};
use crate::image::input::Input;
use crate::image::names::check_name;
use crate::image::source::{self, Reader, SourceFormat};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{self, ObjectStore, PackRotator};

/// Read buffer per worker.
const READ_BYTES: usize = 1 << 20;

/// What `import` needs besides the file.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The new image's name: 1 to 200 bytes, no control character or `/`,
    /// not shaped like an image id (`img-` and 16 hex digits).
    pub name: String,
    /// Public, marketplace or custom (the default).
    pub kind: ImageType,
    /// Free text shown with the image.
    pub description: String,
    /// `None` detects the format from the content.
    pub format: Option<SourceFormat>,
    /// Read the file even when it is unchanged (same device, inode, size,
    /// mtime and ctime) since an earlier import whose image still exists.
    pub reread: bool,
    /// A marketplace image's vendor (required for one, empty for others).
    pub vendor: String,
    /// A marketplace image's application (required for one, empty for others).
    pub application: String,
    /// A marketplace image's application version (may be empty).
    pub app_version: String,
    /// Tags (key, value) set on the new image.
    pub tags: Vec<(String, String)>,
    /// Lineage of a captured image (set by capture, not by users).
    pub(crate) parent: Option<(String, String)>,
    pub(crate) source_instance: Option<String>,
    /// Launch-only origin of the content (set by capture; see access.rs).
    pub(crate) restricted_from: String,
}

impl ImportOptions {
    /// Options for a custom image named `name`, everything else empty.
    pub fn new(name: impl Into<String>) -> ImportOptions {
        ImportOptions {
            name: name.into(),
            kind: ImageType::Custom,
            description: String::new(),
            format: None,
            reread: false,
            vendor: String::new(),
            application: String::new(),
            app_version: String::new(),
            tags: Vec::new(),
            parent: None,
            source_instance: None,
            restricted_from: String::new(),
        }
    }
}

/// How many times an import restarts after a concurrent gc took its chunks.
const ATTEMPTS: usize = 3;

/// Entry of the in-progress map: 0 zero block, a positive chunk id, or a
/// new chunk `NEW | seq << 8 | slot`.
const NEW: u64 = 1 << 63;

/// Imports the disk image `file` as a new image of `owner`. The file is
/// opened once and everything about it is checked, on that open file,
/// before the catalog changes; an unchanged file imported before (same
/// device, inode, size, mtime and ctime) takes that image's content
/// without being read, unless `opts.reread`.
#[instrument(skip_all, err(level = "debug"), fields(file = %file.display()))]
pub(crate) fn import(
    repo: &Repo,
    owner: &str,
    file: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImageId> {
    check_name(&opts.name)?;
    let opened = source::open_input(file)?;
    let ins = source::inspect(&opened, opts.format)?;
    let id = create_image(repo, owner, opts, ins.format.name(), |guard| {
        if let Some(f) = opened.ident.as_ref().filter(|_| !opts.reread) {
            if reuse_unchanged(repo, guard.id, f)? {
                return Ok(());
            }
        }
        let reader = Reader::open(&opened, &ins, &repo.root().join("tmp"))?;
        let input = Input::opened(&opened, reader, ins.virtual_size);
        ingest_retrying(repo, guard, &input, progress)
    })?;
    // Remember the file, so that an unchanged file imported again takes
    // this image's content without being read (it did not change while it
    // was read: checked before the commit).
    if let Some(f) = &opened.ident {
        catalog::remember_source(&repo.conn, f, &id)?;
    }
    Ok(id)
}

/// Imports content that is not a plain file (a captured instance disk).
/// Same guarantees as [`import`]: visible only when complete, nothing left
/// on failure.
#[instrument(skip_all, err(level = "debug"), fields(path = %input.path.display()))]
pub(crate) fn import_input(
    repo: &Repo,
    owner: &str,
    input: &Input,
    opts: &ImportOptions,
    format_name: &str,
    progress: &dyn Progress,
) -> Result<ImageId> {
    create_image(repo, owner, opts, format_name, |guard| {
        ingest_retrying(repo, guard, input, progress)
    })
}

/// [`ingest`], started over (a few times) when a concurrent gc collected
/// chunks it reused.
fn ingest_retrying(
    repo: &Repo,
    guard: &Cleanup<'_>,
    input: &Input,
    progress: &dyn Progress,
) -> Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match ingest(repo, guard.id, input, progress) {
            Err(Error::ChunksVanished) if attempt < ATTEMPTS => {
                tracing::info!(image = %guard.id, "a concurrent gc collected reused chunks; starting over");
                guard.drop_stored()?;
            }
            r => return r,
        }
    }
}

/// If the file `f` was imported before, is unchanged, and that image still
/// exists, the new image takes its content (map and digest) without reading
/// the file. One transaction: the earlier image's chunks cannot be collected
/// in between.
fn reuse_unchanged(repo: &Repo, id: &ImageId, f: &catalog::FileIdent) -> Result<bool> {
    let tx = catalog::begin_write(&repo.conn)?;
    if !catalog::reuse_source(&tx, id, f)? {
        tx.commit()?;
        return Ok(false);
    }
    let manifest = crate::repo::manifest::write_next(&tx, repo.root(), repo.perms(), id)?;
    tx.commit()?;
    manifest.committed();
    Ok(true)
}

/// A compressed frame on its way to the writer.
struct FrameMsg {
    seq: u64,
    data: Vec<u8>,
    hashes: Vec<ChunkHash>,
}

/// The chunk ids the writer gave a frame's slots: consecutive from
/// `first`, except slots whose content was already in the catalog.
#[derive(Default)]
struct FrameIds {
    first: ChunkId,
    /// Chunks inserted for this frame (ids `first..first + inserted`).
    inserted: i64,
    /// (slot, existing chunk id), by slot.
    existing: Vec<(u8, ChunkId)>,
}

impl FrameIds {
    fn id(&self, slot: u8) -> ChunkId {
        match self.existing.binary_search_by_key(&slot, |&(s, _)| s) {
            Ok(i) => self.existing[i].1,
            Err(before) => self.first + i64::from(slot) - before as i64,
        }
    }
}

/// What a worker found in one piece.
struct PieceResult {
    /// One entry per block; empty for a zero piece.
    entries: Vec<u64>,
    nblocks: u64,
    hash: PieceHash,
    data_blocks: u64,
}

/// Shared by the workers of one import.
struct Shared<'a> {
    image: &'a ImageId,
    input: &'a Input<'a>,
    raw_path: &'a Path,
    size: u64,
    extents: Vec<(u64, u64)>,
    pieces: Pieces,
    next_piece: AtomicUsize,
    next_seq: AtomicU64,
    /// New chunks of this import that the writer has not yet entered in
    /// the catalog: hash -> NEW entry. Bounded: the writer removes what it
    /// commits (as `pending` rows that only this import can see).
    new: Mutex<HashMap<ChunkHash, u64>>,
    results: Mutex<Vec<Option<PieceResult>>>,
    zero_cvs: digest::ZeroCvs,
    abort: AtomicBool,
    progress: &'a dyn Progress,
}

/// One attempt at storing `raw` as the content of the `importing` image
/// `id`: workers and the writer thread, then the check that the source did
/// not change, then the commit.
fn ingest(repo: &Repo, id: &ImageId, raw: &Input, progress: &dyn Progress) -> Result<()> {
    let extents = raw.extents()?;
    let pieces = digest::split_sparse(raw.size, digest::LEAF_BYTES, |off, len| {
        let i = extents.partition_point(|&(_, e)| e <= off);
        extents.get(i).is_some_and(|&(s, _)| s < off + len)
    });
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, raw.size)?;
    // Taken before any look-up: chunks allocated after it may have been
    // missed by the workers.
    let start_seq = catalog::chunk_sequence(&repo.conn)?;
    let npieces = pieces.leaves.len();
    let shared = Shared {
        image: id,
        input: raw,
        raw_path: &raw.path,
        size: raw.size,
        extents,
        pieces,
        next_piece: AtomicUsize::new(0),
        next_seq: AtomicU64::new(0),
        new: Mutex::new(HashMap::new()),
        results: Mutex::new((0..npieces).map(|_| None).collect()),
        zero_cvs,
        abort: AtomicBool::new(false),
        progress,
    };
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let db_path = repo.root().join("catalog.db");
    let store = repo.store();
    progress.begin("import", raw.size);
    let (tx, rx) = mpsc::sync_channel::<FrameMsg>(workers * 4);
    let (written, worker_errs) = std::thread::scope(|s| {
        let writer = s.spawn(|| write_frames(store, &db_path, id, rx, &shared.new, start_seq));
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let tx = tx.clone();
                let shared = &shared;
                let db_path = &db_path;
                s.spawn(move || {
                    let r = work(shared, db_path, tx);
                    if r.is_err() {
                        shared.abort.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        drop(tx);
        let errs: Vec<Error> = handles
            .into_iter()
            .filter_map(|h| h.join().expect("import worker panicked").err())
            .collect();
        (writer.join().expect("pack writer panicked"), errs)
    });
    progress.end();
    // The writer's error (e.g. ENOSPC) is the root cause when there is one.
    let written = written?;
    if let Some(e) = worker_errs.into_iter().next() {
        return Err(e);
    }
    let Shared {
        results,
        pieces,
        zero_cvs,
        ..
    } = shared;
    let results: Vec<PieceResult> = results
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|r| r.expect("every piece processed"))
        .collect();
    let digest = pieces.root(&results.iter().map(|r| r.hash).collect::<Vec<_>>());
    if let Some(src) = raw.source() {
        src.check_unchanged()?;
    }
    commit(
        repo,
        id,
        raw.size,
        digest,
        results,
        written,
        zero_cvs.into_added(),
    )
}

/// Takes units of leaves until none are left.
fn work(sh: &Shared<'_>, db_path: &Path, tx: mpsc::SyncSender<FrameMsg>) -> Result<()> {
    let conn = Connection::open(db_path)?;
    conn.busy_timeout(catalog::BUSY_TIMEOUT)?;
    let mut buf = vec![0u8; READ_BYTES];
    let mut frame = FrameBuf::default();
    let nleaves = sh.pieces.leaves.len();
    loop {
        if sh.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let u = sh.next_piece.fetch_add(1, Ordering::Relaxed);
        let first = u * digest::LEAVES_PER_UNIT;
        if first >= nleaves {
            break;
        }
        // Look-ups are not grouped in a read transaction: a lookup must see
        // every batch the writer entered before it dropped those chunks from
        // `new` (see `classify`).
        for i in first..(first + digest::LEAVES_PER_UNIT).min(nleaves) {
            let res = leaf(sh, &conn, i, &mut buf, &mut frame, &tx)?;
            sh.results.lock().unwrap()[i] = Some(res);
        }
    }
    frame.flush(sh, &tx)
}

/// Reads, hashes and classifies the blocks of leaf `i`.
fn leaf(
    sh: &Shared<'_>,
    conn: &Connection,
    i: usize,
    buf: &mut [u8],
    frame: &mut FrameBuf,
    tx: &mpsc::SyncSender<FrameMsg>,
) -> Result<PieceResult> {
    let piece = sh.pieces.leaves[i];
    let nblocks = format::blocks_for(piece.len) as usize;
    let pend = piece.offset + piece.len;
    // Data ranges of this leaf, widened to whole blocks.
    let first = sh.extents.partition_point(|&(_, e)| e <= piece.offset);
    let ranges: Vec<(u64, u64)> = sh.extents[first..]
        .iter()
        .take_while(|&&(s, _)| s < pend)
        .map(|&(s, e)| (s.max(piece.offset) / CHUNK * CHUNK, e.min(pend)))
        .collect();
    if piece.zero || ranges.is_empty() {
        sh.progress.advance(piece.len);
        return Ok(PieceResult {
            entries: Vec::new(),
            nblocks: nblocks as u64,
            hash: sh.zero_cvs.leaf(&sh.pieces, &piece),
            data_blocks: 0,
        });
    }
    let mut hasher = digest::piece_hasher(&piece);
    let mut entries = Vec::with_capacity(nblocks);
    let mut data_blocks = 0u64;
    let mut pos = piece.offset;
    for (s, e) in ranges {
        let s = s.max(pos);
        if s >= e {
            continue;
        }
        if s > pos {
            zero_run(&mut entries, &mut hasher, s - pos);
        }
        let e = e.div_ceil(CHUNK).saturating_mul(CHUNK).min(pend);
        let mut off = s;
        while off < e {
            let want = ((e - off) as usize).min(buf.len());
            let got = sh.input.read_at_full(&mut buf[..want], off)?;
            if got < want {
                return Err(Error::BadInput {
                    file: sh.raw_path.to_owned(),
                    reason: format!(
                        "file ended at byte {} while {} bytes were expected",
                        off + got as u64,
                        sh.size
                    ),
                });
            }
            hasher.update(&buf[..got]);
            for (k, block) in buf[..got].chunks(CHUNK_SIZE).enumerate() {
                // A block the capture knows unchanged keeps its chunk: no
                // hash, no look-up, no compression.
                let known = sh.input.known(off / CHUNK + k as u64);
                let entry = match known {
                    Some(e) => e,
                    None => classify(sh, conn, block, frame, tx)?,
                };
                data_blocks += u64::from(entry != 0);
                entries.push(entry);
            }
            off += got as u64;
        }
        pos = e;
    }
    if pend > pos {
        zero_run(&mut entries, &mut hasher, pend - pos);
    }
    sh.progress.advance(piece.len);
    debug_assert_eq!(entries.len(), nblocks);
    Ok(PieceResult {
        entries,
        nblocks: nblocks as u64,
        hash: sh.pieces.finish(&hasher),
        data_blocks,
    })
}

fn zero_run(entries: &mut Vec<u64>, hasher: &mut blake3::Hasher, len: u64) {
    digest::update_zeros(hasher, len);
    entries.resize(entries.len() + format::blocks_for(len) as usize, 0);
}

static ZERO_CHUNK: [u8; CHUNK_SIZE] = [0; CHUNK_SIZE];

/// Decides what one block is: zero, a reused chunk, or a new chunk (which
/// it adds to the worker's frame).
fn classify(
    sh: &Shared<'_>,
    conn: &Connection,
    block: &[u8],
    frame: &mut FrameBuf,
    tx: &mpsc::SyncSender<FrameMsg>,
) -> Result<u64> {
    if block == &ZERO_CHUNK[..block.len()] {
        return Ok(0);
    }
    // The image's last block may be short: chunks are zero-padded.
    let padded;
    let block = if block.len() < CHUNK_SIZE {
        let mut p = [0u8; CHUNK_SIZE];
        p[..block.len()].copy_from_slice(block);
        padded = p;
        &padded[..]
    } else {
        block
    };
    let hash = ChunkHash::of(block);
    // `new` first, then the catalog: the writer enters a batch in the
    // catalog before it drops it from `new`, so a chunk of this import is
    // found by one or the other and never stored twice.
    if let Some(&e) = sh.new.lock().unwrap().get(&hash) {
        return Ok(e);
    }
    if let Some(id) = catalog::chunk_by_hash(conn, &hash, sh.image)? {
        return Ok(id as u64);
    }
    let mut new = sh.new.lock().unwrap();
    if let Some(&e) = new.get(&hash) {
        return Ok(e);
    }
    let entry = frame.push(sh, block, hash);
    new.insert(hash, entry);
    drop(new);
    if frame.is_full() {
        frame.flush(sh, tx)?;
    }
    Ok(entry)
}

/// New chunks waiting to be compressed as one frame.
#[derive(Default)]
struct FrameBuf {
    seq: u64,
    data: Vec<u8>,
    hashes: Vec<ChunkHash>,
}

impl FrameBuf {
    fn nchunks(&self) -> usize {
        self.data.len() / CHUNK_SIZE
    }

    fn is_full(&self) -> bool {
        self.nchunks() >= FRAME_CHUNKS
    }

    fn push(&mut self, sh: &Shared<'_>, block: &[u8], hash: ChunkHash) -> u64 {
        if self.data.is_empty() {
            self.seq = sh.next_seq.fetch_add(1, Ordering::Relaxed);
            self.data.reserve(FRAME_CHUNKS * CHUNK_SIZE);
        }
        let slot = self.nchunks() as u64;
        self.data.extend_from_slice(block);
        self.hashes.push(hash);
        NEW | (self.seq << 8) | slot
    }

    fn flush(&mut self, sh: &Shared<'_>, tx: &mpsc::SyncSender<FrameMsg>) -> Result<()> {
        if self.data.is_empty() {
            return Ok(());
        }
        let data = store::compress_frame(&self.data, ZSTD_LEVEL).at(sh.raw_path)?;
        let msg = FrameMsg {
            seq: self.seq,
            data,
            hashes: std::mem::take(&mut self.hashes),
        };
        self.data.clear();
        // A closed channel means the writer failed; its error is reported.
        tx.send(msg)
            .map_err(|_| Error::StoreDamaged("pack writer stopped".into()))
    }
}

/// Frames whose chunks the writer enters in the catalog at once.
const BATCH_FRAMES: usize = 256;

/// The writer thread: appends frames to pending packs, enters their frames
/// and chunks in the catalog as rows pending for this import (batch by
/// batch, so that the import's table of new chunks stays small), seals the
/// packs. Returns the chunk ids of every frame, by frame sequence number.
fn write_frames(
    store: &dyn ObjectStore,
    db_path: &Path,
    id: &ImageId,
    rx: mpsc::Receiver<FrameMsg>,
    new: &Mutex<HashMap<ChunkHash, u64>>,
    mut seen_seq: i64,
) -> Result<Written> {
    let conn = Connection::open(db_path)?;
    conn.busy_timeout(catalog::BUSY_TIMEOUT)?;
    let mut out = HashMap::new();
    let mut packs = PackRotator::new(
        store,
        Box::new(|name: &str| catalog::insert_pending_pack(&conn, name, id)),
    );
    let mut batch: Vec<Entered> = Vec::new();
    let mut pending = false;
    for msg in rx {
        let placed = packs.append(&msg.data, &msg.hashes)?;
        batch.push(Entered {
            seq: msg.seq,
            hashes: msg.hashes,
            pack: placed.pack,
            offset: placed.offset,
            clen: msg.data.len() as u64,
        });
        if batch.len() >= BATCH_FRAMES {
            enter_batch(&conn, id, &mut batch, &mut out, new, &mut seen_seq)?;
            pending = true;
        }
    }
    packs.finish()?;
    // The last batch is entered by the commit itself, as committed rows.
    Ok(Written {
        ids: out,
        last: batch,
        seen_seq,
        pending,
    })
}

/// What the writer leaves to the commit.
struct Written {
    /// Chunk ids of the frames entered so far, by frame sequence number.
    ids: HashMap<u64, FrameIds>,
    /// Frames written but not entered yet.
    last: Vec<Entered>,
    /// The chunk sequence after the writer's last batch (or when the
    /// import started).
    seen_seq: i64,
    /// Whether any batch was entered as pending rows.
    pending: bool,
}

/// A frame written to a pack, to be entered in the catalog.
struct Entered {
    seq: u64,
    hashes: Vec<ChunkHash>,
    pack: i64,
    offset: u64,
    clen: u64,
}

/// One transaction: the batch's frames, and its chunks as pending rows.
fn enter_batch(
    conn: &Connection,
    id: &ImageId,
    batch: &mut Vec<Entered>,
    out: &mut HashMap<u64, FrameIds>,
    new: &Mutex<HashMap<ChunkHash, u64>>,
    seen_seq: &mut i64,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let tx = catalog::begin_write(conn)?;
    enter_rows(&tx, id, batch, out, *seen_seq, true)?;
    *seen_seq = catalog::chunk_sequence(&tx)?;
    tx.commit()?;
    // Entered: workers find these in the catalog from now on.
    let mut new = new.lock().unwrap();
    for msg in batch.drain(..) {
        for h in &msg.hashes {
            new.remove(h);
        }
    }
    Ok(())
}

/// Inserts the frames of `batch` and their new chunks (pending for this
/// import when `pending`), and records each frame's chunk ids in `out`.
fn enter_rows(
    tx: &Connection,
    id: &ImageId,
    batch: &[Entered],
    out: &mut HashMap<u64, FrameIds>,
    seen_seq: i64,
    pending: bool,
) -> Result<()> {
    // Chunk ids only grow (AUTOINCREMENT): if none was allocated since our
    // last batch, no other import committed content the workers missed.
    let others = catalog::chunk_sequence(tx)? != seen_seq;
    let mut ins = catalog::ChunkInserter::new(tx)?;
    for msg in batch {
        let ids = enter_frame(tx, &mut ins, id, msg, others, pending)?;
        out.insert(msg.seq, ids);
    }
    Ok(())
}

/// Inserts one frame and its chunks; returns the chunk ids of its slots.
/// With `others` (chunks were allocated by others since the last batch),
/// each hash is looked up first.
fn enter_frame(
    tx: &Connection,
    ins: &mut catalog::ChunkInserter<'_>,
    id: &ImageId,
    msg: &Entered,
    others: bool,
    pending: bool,
) -> Result<FrameIds> {
    let fid = ins.frame(msg.pack, msg.offset, msg.clen, msg.hashes.len())?;
    let mut ids = FrameIds::default();
    for (slot, h) in msg.hashes.iter().enumerate() {
        // Committed by another import meanwhile, or met twice by this
        // one across a batch boundary: use that chunk; this slot's
        // bytes stay unused.
        if others {
            if let Some(c) = catalog::chunk_by_hash(tx, h, id)? {
                ids.existing.push((slot as u8, c));
                continue;
            }
        }
        let cid = ins.chunk(h, fid, slot)?;
        if pending {
            ins.mark_pending(cid, id)?;
        }
        ids.inserted += 1;
        if ids.first == 0 {
            ids.first = cid - (slot - ids.existing.len()) as i64;
        }
    }
    Ok(ids)
}

/// The commit, in one write transaction: the last frames and chunks, the
/// check that every chunk the image uses is still there, the image made
/// available with its map, its pending chunks and packs settled, new
/// zero-leaf values kept, and its manifest written (durable before the
/// image is available).
fn commit(
    repo: &Repo,
    id: &ImageId,
    size: u64,
    digest: blake3::Hash,
    results: Vec<PieceResult>,
    written: Written,
    zero_cvs: Vec<(u64, u64, [u8; 32])>,
) -> Result<()> {
    let data_blocks: u64 = results.iter().map(|r| r.data_blocks).sum();
    // Take the write lock now: nothing may change between check and commit.
    let tx = catalog::begin_write(&repo.conn)?;
    let Written {
        ids: mut frames,
        last,
        seen_seq,
        pending,
    } = written;
    let pending_ranges: Vec<(ChunkId, ChunkId)> = frames
        .values()
        .filter(|f| f.inserted > 0)
        .map(|f| (f.first, f.first + f.inserted - 1))
        .collect();
    enter_rows(&tx, id, &last, &mut frames, seen_seq, false)?;
    // Every chunk used must still exist (a concurrent gc may have taken
    // a reused one) and be committed or this import's own.
    if !catalog::chunk_runs_usable(&tx, &used_runs(&results, &frames), id)? {
        return Err(Error::ChunksVanished);
    }
    let map = build_map(&results, &frames);
    debug_assert_eq!(map.nblocks, format::blocks_for(size));
    catalog::set_available(
        &tx,
        id,
        size,
        data_blocks * CHUNK,
        &hex(digest.as_bytes()),
        &map,
    )?;
    catalog::delete_pending_marks(&tx, pending_ranges)?;
    catalog::seal_pending_packs(&tx, id)?;
    catalog::save_zero_cvs(&tx, &zero_cvs)?;
    let manifest = crate::repo::manifest::write_next(&tx, repo.root(), repo.perms(), id)?;
    tx.commit()?;
    manifest.committed();
    if pending {
        catalog::vacuum_free_pages(&repo.conn);
    }
    Ok(())
}

/// The chunk id of a map entry (a chunk id, or a new chunk by frame
/// sequence number and slot).
fn chunk_id(frames: &HashMap<u64, FrameIds>, e: u64) -> ChunkId {
    if e & NEW != 0 {
        frames[&((e & !NEW) >> 8)].id((e & 0xff) as u8)
    } else {
        e as ChunkId
    }
}

/// The chunk ids the image uses, as sorted, disjoint inclusive runs of
/// consecutive ids.
fn used_runs(results: &[PieceResult], frames: &HashMap<u64, FrameIds>) -> Vec<(ChunkId, ChunkId)> {
    let mut runs: Vec<(ChunkId, ChunkId)> = Vec::new();
    for &e in results.iter().flat_map(|r| r.entries.iter()) {
        if e == 0 {
            continue;
        }
        let c = chunk_id(frames, e);
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == c || *end == c => *end = c,
            _ => runs.push((c, c)),
        }
    }
    runs.sort_unstable();
    let mut merged: Vec<(ChunkId, ChunkId)> = Vec::with_capacity(runs.len());
    for (a, b) in runs {
        match merged.last_mut() {
            Some((_, end)) if a <= *end + 1 => *end = (*end).max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// The image's block map from the workers' results.
fn build_map(results: &[PieceResult], frames: &HashMap<u64, FrameIds>) -> format::BlockMap {
    let mut b = format::MapBuilder::default();
    for r in results {
        if r.entries.is_empty() {
            b.push_zeros(r.nblocks);
        }
        for &e in &r.entries {
            b.push(if e == 0 { 0 } else { chunk_id(frames, e) });
        }
    }
    b.finish()
}
