//! Import: cut an image into 4 KiB chunks, store the new ones, commit the
//! image.
//!
//! The content is split into BLAKE3 subtree pieces ([`crate::digest`]);
//! worker threads (one per core) take pieces and, for each 4 KiB block,
//! skip holes (SEEK_DATA) and all-zero blocks, hash the block, look it up
//! (this import's new chunks first, then the catalog), and batch new chunks
//! into frames that they compress themselves. A writer thread appends the
//! compressed frames to pending pack files. When all pieces are done the
//! packs are fsynced and one catalog transaction inserts frames and chunks
//! and flips the image to `available`.
//!
//! **Invariant**: the image row becomes `available` in the same transaction
//! that inserts its chunks, after its pack files are durable; a reused chunk
//! is checked to still exist inside that transaction (a concurrent gc may
//! have collected it, in which case the import starts over).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

use rusqlite::{params, Connection};

use crate::catalog;
use crate::catalog::ImageType;
use crate::digest::{self, PieceHash, Pieces};
use crate::error::{Error, IoContext, Result};
use crate::format::{self, CHUNK, CHUNK_SIZE, FRAME_CHUNKS, ZSTD_LEVEL};
use crate::ids::{hex, ChunkHash, ChunkId, ImageId};
use crate::image::source::{self, FileIdent, Opened, Reader, SourceFormat};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{self, ObjectStore, PackRotator};

/// Read buffer per worker.
const READ_BYTES: usize = 1 << 20;
/// What `import` needs besides the file.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub name: String,
    pub kind: ImageType,
    pub description: String,
    /// `None` detects the format from the content.
    pub format: Option<SourceFormat>,
    /// Read the file even when it is unchanged (same device, inode, size,
    /// mtime and ctime) since an earlier import whose image still exists.
    pub reread: bool,
    /// Marketplace images: vendor, application and its version.
    pub vendor: String,
    pub application: String,
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

pub(crate) fn import(
    repo: &Repo,
    owner: &str,
    file: &Path,
    opts: &ImportOptions,
    progress: &dyn Progress,
) -> Result<ImageId> {
    check_name(&opts.name)?;
    // The input is opened once; everything about it is checked, on that
    // open file, before the catalog changes.
    let opened = source::open_input(file)?;
    let ins = source::inspect(&opened, opts.format)?;
    let id = create_image(repo, owner, opts, ins.format.name(), |guard| {
        if let Some(f) = opened.ident.as_ref().filter(|_| !opts.reread) {
            if reuse_unchanged(repo, guard.id, f)? {
                return Ok(());
            }
        }
        let reader = Reader::open(&opened, &ins, &repo.root().join("tmp"))?;
        let input = Input {
            path: file.to_owned(),
            size: ins.virtual_size,
            file: reader,
            overlay: None,
            source: Some(&opened),
        };
        ingest_retrying(repo, guard, &input, progress)
    })?;
    // Remember the file (it did not change while it was read: checked
    // before the commit).
    if let Some(f) = &opened.ident {
        remember(f, repo, &id)?;
    }
    Ok(id)
}

/// Imports content that is not a plain file (a captured instance disk).
/// Same guarantees as [`import`]: visible only when complete, nothing left
/// on failure.
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

/// A new image: its row is entered as `importing` (hidden from others, and
/// from gc while its lock is held), `fill` must make it available; if
/// `fill` fails, the row and whatever it stored are removed.
pub(crate) fn create_image(
    repo: &Repo,
    owner: &str,
    opts: &ImportOptions,
    format_name: &str,
    fill: impl FnOnce(&Cleanup<'_>) -> Result<()>,
) -> Result<ImageId> {
    check_name(&opts.name)?;
    let id = ImageId::generate();
    let _lock = repo.lock_import(&id)?;
    let mut guard = Cleanup {
        repo,
        id: &id,
        armed: true,
    };
    insert_importing_row(repo, owner, &id, opts, format_name)?;
    fill(&guard)?;
    guard.armed = false;
    drop(guard);
    let _ = std::fs::remove_file(repo.lock_path(&id));
    Ok(id)
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
                guard.drop_pending_packs()?;
            }
            r => return r,
        }
    }
}

/// What an import reads: a raw file, or a raw base with the ranges a qcow2
/// overlay changed (`patches`) laid over it.
pub(crate) struct Input<'a> {
    pub path: std::path::PathBuf,
    pub size: u64,
    file: Reader,
    overlay: Option<Overlay>,
    /// The opened input file, checked to be unchanged before the commit.
    source: Option<&'a Opened>,
}

struct Overlay {
    path: std::path::PathBuf,
    file: File,
    /// Sorted, disjoint, 4 KiB-aligned `(start, end, at)`: guest bytes
    /// `start..end` are the overlay file's bytes from `at`, or zeros.
    patches: Vec<(u64, u64, Option<u64>)>,
    /// The base's image map, when that image still exists: blocks outside
    /// every patch are the base's, so they keep its chunks.
    parent: Option<crate::format::BlockMap>,
}

impl Input<'_> {
    /// A raw file (an instance's private disk copy).
    pub(crate) fn plain(path: &Path, size: u64) -> Result<Input<'static>> {
        Ok(Input {
            path: path.to_owned(),
            size,
            file: Reader::File(File::open(path).at(path)?),
            overlay: None,
            source: None,
        })
    }

    /// A raw base (the parent's content) plus a qcow2 overlay on it. Only
    /// the overlay's own clusters are read from it (`qemu-img map`);
    /// `--force-share` lets a paused QEMU keep the image open.
    pub(crate) fn overlay(
        base: &Path,
        overlay: &Path,
        parent: Option<crate::format::BlockMap>,
    ) -> Result<Input<'static>> {
        let out = source::qemu_img(&[
            "map",
            "--force-share",
            "--output=json",
            "-f",
            "qcow2",
            overlay.to_str().ok_or_else(|| {
                Error::Invalid(format!("{}: path is not UTF-8", overlay.display()))
            })?,
        ])?;
        let map: Vec<serde_json::Value> =
            serde_json::from_slice(&out).map_err(|e| Error::Tool {
                tool: "qemu-img map".into(),
                detail: format!("{}: {e}", overlay.display()),
            })?;
        let mut size = 0u64;
        let mut patches: Vec<(u64, u64, Option<u64>)> = Vec::new();
        for m in &map {
            let num = |k: &str| m.get(k).and_then(serde_json::Value::as_u64);
            let flag = |k: &str| {
                m.get(k)
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false)
            };
            let (Some(start), Some(len)) = (num("start"), num("length")) else {
                continue;
            };
            size = size.max(start + len);
            if num("depth") != Some(0) {
                continue; // the base's bytes
            }
            if start % CHUNK != 0 || (len % CHUNK != 0 && start + len != size) {
                return Err(Error::BadInput {
                    file: overlay.to_owned(),
                    reason: format!("cluster at byte {start} is not 4 KiB aligned"),
                });
            }
            let at = if flag("zero") && !flag("data") {
                None
            } else if flag("data") {
                Some(num("offset").ok_or_else(|| Error::BadInput {
                    file: overlay.to_owned(),
                    reason: format!(
                        "cluster at byte {start} has no plain offset (compressed?): not supported"
                    ),
                })?)
            } else {
                continue; // unallocated at depth 0: the base's
            };
            patches.push((start, start + len, at));
        }
        patches.sort_unstable_by_key(|p| p.0);
        Ok(Input {
            path: base.to_owned(),
            size,
            file: Reader::File(File::open(base).at(base)?),
            source: None,
            overlay: Some(Overlay {
                path: overlay.to_owned(),
                file: File::open(overlay).at(overlay)?,
                patches,
                parent,
            }),
        })
    }

    /// Data ranges (holes and zero patches left out).
    fn extents(&self) -> Result<Vec<(u64, u64)>> {
        let base = self.file.data_extents(self.size).at(&self.path)?;
        let Some(ov) = &self.overlay else {
            return Ok(base);
        };
        // base minus every patch, plus the data patches
        let mut out = Vec::new();
        let mut pi = 0;
        for (s, e) in base {
            let mut pos = s;
            while pi < ov.patches.len() && ov.patches[pi].1 <= pos {
                pi += 1;
            }
            let mut k = pi;
            while pos < e {
                match ov.patches.get(k) {
                    Some(&(ps, pe, _)) if ps < e => {
                        if ps > pos {
                            out.push((pos, ps));
                        }
                        pos = pos.max(pe);
                        k += 1;
                    }
                    _ => {
                        out.push((pos, e));
                        pos = e;
                    }
                }
            }
        }
        out.extend(
            ov.patches
                .iter()
                .filter(|p| p.2.is_some())
                .map(|&(s, e, _)| (s, e)),
        );
        out.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (s, e) in out {
            match merged.last_mut() {
                Some((_, pe)) if s <= *pe => *pe = (*pe).max(e),
                _ => merged.push((s, e)),
            }
        }
        Ok(merged)
    }

    /// Reads guest bytes at `off` (a short read only at the end).
    fn read_at_full(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let Some(ov) = &self.overlay else {
            return self.file.read_at(buf, off).at(&self.path);
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            if pos >= self.size {
                break;
            }
            let rest = &mut buf[done..];
            let i = ov.patches.partition_point(|p| p.1 <= pos);
            let n = match ov.patches.get(i) {
                Some(&(s, e, at)) if s <= pos => {
                    let n = rest.len().min((e - pos) as usize);
                    match at {
                        Some(at) => {
                            let got = read_at_full(&ov.file, &mut rest[..n], at + (pos - s))
                                .at(&ov.path)?;
                            if got < n {
                                return Err(Error::BadInput {
                                    file: ov.path.clone(),
                                    reason: format!(
                                        "cluster data at byte {} is missing",
                                        at + (pos - s)
                                    ),
                                });
                            }
                        }
                        None => rest[..n].fill(0),
                    }
                    n
                }
                next => {
                    let lim = next.map_or(self.size, |p| p.0).min(self.size);
                    let n = rest.len().min((lim - pos) as usize);
                    let got = self.file.read_at(&mut rest[..n], pos).at(&self.path)?;
                    if got < n {
                        // the base is shorter than the overlay: zeros
                        rest[got..n].fill(0);
                    }
                    n
                }
            };
            done += n;
        }
        Ok(done)
    }

    /// The map entry of a block the overlay did not change, when the base's
    /// map is known.
    fn known(&self, block: u64) -> Option<u64> {
        let ov = self.overlay.as_ref()?;
        let parent = ov.parent.as_ref()?;
        let off = block * CHUNK;
        let i = ov.patches.partition_point(|p| p.1 <= off);
        if ov.patches.get(i).is_some_and(|p| p.0 <= off) {
            return None;
        }
        if block >= parent.nblocks {
            return None;
        }
        Some(parent.get(block) as u64)
    }
}

/// Remembers an imported file by its identity, so an unchanged file
/// imported again takes this image's content without being read.
fn remember(f: &FileIdent, repo: &Repo, image: &ImageId) -> Result<()> {
    catalog::write(&repo.conn, |c| {
        c.execute(
            "INSERT OR REPLACE INTO source_files (dev, ino, size, mtime_ns, ctime_ns, image)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                f.dev as i64,
                f.ino as i64,
                f.size as i64,
                f.mtime_ns,
                f.ctime_ns,
                image.as_str()
            ],
        )?;
        Ok(())
    })
}

/// If `file` was imported before, is unchanged, and that image still
/// exists, the new image takes its content (map and digest) without reading
/// the file. One transaction: the earlier image's chunks cannot be collected
/// in between.
fn reuse_unchanged(repo: &Repo, id: &ImageId, f: &FileIdent) -> Result<bool> {
    let tx = catalog::begin_write(&repo.conn)?;
    let n = tx.execute(
        "UPDATE images SET (state, virtual_size, data_bytes, content_digest, map, map_digest) =
            (SELECT 'available', o.virtual_size, o.data_bytes, o.content_digest, o.map, o.map_digest
             FROM source_files s JOIN images o ON o.id = s.image
             WHERE s.dev = ?2 AND s.ino = ?3 AND s.size = ?4 AND s.mtime_ns = ?5
               AND s.ctime_ns = ?6 AND o.state = 'available')
         WHERE id = ?1 AND EXISTS (
             SELECT 1 FROM source_files s JOIN images o ON o.id = s.image
             WHERE s.dev = ?2 AND s.ino = ?3 AND s.size = ?4 AND s.mtime_ns = ?5
               AND s.ctime_ns = ?6 AND o.state = 'available')",
        params![
            id.as_str(),
            f.dev as i64,
            f.ino as i64,
            f.size as i64,
            f.mtime_ns,
            f.ctime_ns
        ],
    )?;
    if n == 1 {
        let manifest = crate::repo::manifest::write_next(&tx, repo.root(), repo.perms(), id)?;
        tx.commit()?;
        manifest.committed();
        return Ok(true);
    }
    tx.commit()?;
    Ok(false)
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.chars().any(|c| c.is_control() || c == '/')
        || ImageId::parse(name).is_some()
    {
        return Err(Error::Invalid(format!(
            "invalid image name {name:?}: use 1-200 printable characters without '/', not of the form img-<16 hex>"
        )));
    }
    Ok(())
}

pub(crate) fn insert_importing_row(
    repo: &Repo,
    owner: &str,
    id: &ImageId,
    opts: &ImportOptions,
    fmt: &str,
) -> Result<()> {
    // Not `catalog::write`: the caller looks at the SQLite error itself.
    let insert = || -> rusqlite::Result<()> {
        let tx = catalog::begin_write(&repo.conn)?;
        let (parent, parent_name) = opts.parent.clone().unzip();
        tx.execute(
            "INSERT INTO images (id, name, type, state, owner, description, source_format, created_at,
                                 vendor, application, app_version, parent, parent_name, source_instance,
                                 restricted_from)
             VALUES (?1, ?2, ?3, 'importing', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                id.as_str(),
                opts.name,
                opts.kind.as_str(),
                owner,
                opts.description,
                fmt,
                catalog::now(),
                opts.vendor,
                opts.application,
                opts.app_version,
                parent,
                parent_name.unwrap_or_default(),
                opts.source_instance,
                opts.restricted_from,
            ],
        )?;
        for (k, v) in &opts.tags {
            tx.execute(
                "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
                params![id.as_str(), k, v],
            )?;
        }
        tx.commit()
    };
    match insert() {
        Ok(_) => Ok(()),
        Err(e) if is_unique_violation(&e) => {
            // The name may belong to an import that was killed: reap it once.
            if crate::image::reap::reap_abandoned(repo)? > 0 && insert().is_ok() {
                return Ok(());
            }
            Err(name_clash(
                &repo.conn,
                owner,
                &opts.name,
                opts.kind.as_str(),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// The error for a name that the catalog's unique indexes refused for an
/// image of `owner` and type `kind`: the account's own image of that name,
/// else the public or marketplace image holding it (names are unique per
/// owner, and public and marketplace names across owners).
pub(crate) fn name_clash(conn: &Connection, owner: &str, name: &str, kind: &str) -> Error {
    let holder = |sql: &str, args: &[&str]| -> Option<(String, String, String)> {
        conn.query_row(sql, rusqlite::params_from_iter(args), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .ok()
    };
    if let Some((id, kind, _)) = holder(
        "SELECT id, type, owner FROM images WHERE owner = ?1 AND name = ?2",
        &[owner, name],
    ) {
        return Error::NameTaken {
            name: name.to_owned(),
            existing: format!("{id}, {kind}"),
        };
    }
    if matches!(kind, "public" | "marketplace") {
        if let Some((id, kind, owner)) = holder(
            "SELECT id, type, owner FROM images
             WHERE name = ?1 AND type IN ('public', 'marketplace')",
            &[name],
        ) {
            return Error::PublicNameTaken {
                name: name.to_owned(),
                existing: format!("{kind} image {id} of {owner}"),
            };
        }
    }
    Error::NameTaken {
        name: name.to_owned(),
        existing: "it was deleted meanwhile: retry".to_owned(),
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Undoes a failed import: its row, its pending packs, its temp files.
pub(crate) struct Cleanup<'a> {
    pub(crate) repo: &'a Repo,
    pub(crate) id: &'a ImageId,
    pub(crate) armed: bool,
}

impl Cleanup<'_> {
    fn drop_pending_packs(&self) -> Result<()> {
        crate::image::reap::drop_import_leftovers(self.repo, self.id, false)
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut r = crate::image::reap::drop_import_leftovers(self.repo, self.id, true);
            if r.is_err() && crate::repo::release_reserve(self.repo.root()) {
                // Out of space: the reserve gives SQLite room to write.
                r = crate::image::reap::drop_import_leftovers(self.repo, self.id, true);
            }
            if let Err(e) = r {
                tracing::warn!(
                    "the failed import {} could not be undone ({}): its catalog row (state importing) and pending packs are left; `vmdepot gc` removes them",
                    self.id,
                    crate::error::one_line(&e.to_string())
                );
            }
        }
    }
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

fn ingest(repo: &Repo, id: &ImageId, raw: &Input, progress: &dyn Progress) -> Result<()> {
    let extents = raw.extents()?;
    let pieces = digest::split_sparse(raw.size, digest::LEAF_BYTES, |off, len| {
        let i = extents.partition_point(|&(_, e)| e <= off);
        extents.get(i).is_some_and(|&(s, _)| s < off + len)
    });
    let zero_cvs = catalog::load_zero_cvs(&repo.conn, raw.size)?;
    // Taken before any look-up: chunks allocated after it may have been
    // missed by the workers.
    let start_seq = chunk_sequence(&repo.conn)?;
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
    if let Some(src) = raw.source {
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

fn read_at_full(f: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off) {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                off += k as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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

/// The highest chunk id ever allocated.
fn chunk_sequence(conn: &Connection) -> Result<i64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'chunks'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
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
    *seen_seq = chunk_sequence(&tx)?;
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
    tx: &rusqlite::Transaction<'_>,
    id: &ImageId,
    batch: &[Entered],
    out: &mut HashMap<u64, FrameIds>,
    seen_seq: i64,
    pending: bool,
) -> Result<()> {
    // Chunk ids only grow (AUTOINCREMENT): if none was allocated since our
    // last batch, no other import committed content the workers missed.
    let others = chunk_sequence(tx)? != seen_seq;
    let mut frame = tx.prepare_cached(
        "INSERT INTO frames (pack, offset, clen, nchunks) VALUES (?1, ?2, ?3, ?4)",
    )?;
    let mut chunk =
        tx.prepare_cached("INSERT INTO chunks (hkey, hash, frame, slot) VALUES (?1, ?2, ?3, ?4)")?;
    let mut mark = tx.prepare_cached("INSERT INTO pending_chunks (id, import) VALUES (?1, ?2)")?;
    for msg in batch {
        frame.execute(params![
            msg.pack,
            msg.offset as i64,
            msg.clen as i64,
            msg.hashes.len() as i64
        ])?;
        let fid = tx.last_insert_rowid();
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
            chunk.execute(params![catalog::hkey(h), &h.0[..], fid, slot as i64])?;
            let cid = tx.last_insert_rowid();
            if pending {
                mark.execute(params![cid, id.key()])?;
            }
            ids.inserted += 1;
            if ids.first == 0 {
                ids.first = cid - (slot - ids.existing.len()) as i64;
            }
        }
        out.insert(msg.seq, ids);
    }
    Ok(())
}

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
    let pending_ranges: Vec<(ChunkId, i64)> = frames
        .values()
        .filter(|f| f.inserted > 0)
        .map(|f| (f.first, f.inserted))
        .collect();
    enter_rows(&tx, id, &last, &mut frames, seen_seq, false)?;
    let chunk_id = |e: u64| -> ChunkId {
        if e & NEW != 0 {
            frames[&((e & !NEW) >> 8)].id((e & 0xff) as u8)
        } else {
            e as ChunkId
        }
    };
    // Runs of consecutive chunk ids the image uses.
    let mut runs: Vec<(ChunkId, ChunkId)> = Vec::new();
    for e in results.iter().flat_map(|r| r.entries.iter()) {
        if *e == 0 {
            continue;
        }
        let c = chunk_id(*e);
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
    {
        // Every chunk used must still exist (a concurrent gc may have taken
        // a reused one) and be committed or this import's own.
        let mut count = tx.prepare_cached(
            "SELECT COUNT(*) FROM chunks c WHERE c.id BETWEEN ?1 AND ?2 AND NOT EXISTS
             (SELECT 1 FROM pending_chunks p WHERE p.id = c.id AND p.import != ?3)",
        )?;
        for &(a, b) in &merged {
            let n: i64 = count.query_row(params![a, b, id.key()], |r| r.get(0))?;
            if n != b - a + 1 {
                return Err(Error::ChunksVanished);
            }
        }
    }
    let mut b = format::MapBuilder::default();
    for r in &results {
        if r.entries.is_empty() {
            b.push_zeros(r.nblocks);
        }
        for &e in &r.entries {
            b.push(if e == 0 { 0 } else { chunk_id(e) });
        }
    }
    let map = b.finish();
    debug_assert_eq!(map.nblocks, format::blocks_for(size));
    catalog::set_available(
        &tx,
        id,
        size,
        data_blocks * CHUNK,
        &hex(digest.as_bytes()),
        &map,
    )?;
    {
        // By id ranges: one pass, no set of row ids in memory.
        let mut done =
            tx.prepare_cached("DELETE FROM pending_chunks WHERE id BETWEEN ?1 AND ?2")?;
        for (first, n) in pending_ranges {
            done.execute(params![first, first + n - 1])?;
        }
    }
    tx.execute(
        "UPDATE packs SET state = 'sealed', image = NULL,
                size = (SELECT COALESCE(MAX(offset + clen), 16) FROM frames WHERE frames.pack = packs.id)
         WHERE image = ?1 AND state = 'pending'",
        [id.as_str()],
    )?;
    catalog::save_zero_cvs(&tx, &zero_cvs)?;
    // The manifest is durable before the image is available.
    let manifest = crate::repo::manifest::write_next(&tx, repo.root(), repo.perms(), id)?;
    tx.commit()?;
    manifest.committed();
    if pending {
        catalog::vacuum_free_pages(&repo.conn);
    }
    Ok(())
}
