//! Maintenance: garbage collection, fsck, whole-store verify and stats.
//!
//! Main items: [`gc`], [`fsck`], [`verify_all`], [`stats`], and [`usage`]
//! (who refers to which stored bytes), plus the clean-up of imports that
//! died ([`reap_abandoned`]).
//!
//! **gc × import**: gc marks in a read snapshot (nobody waits for it), then
//! sweeps in one short `BEGIN IMMEDIATE` transaction in which images that
//! became available after the snapshot keep their chunks, and chunks entered
//! after it are not candidates. An import that reused a chunk gc then
//! collected notices at its own commit (it re-checks every reused chunk
//! inside its transaction) and starts over. A running import is recognised
//! by its lock file (`locks/<image>.lock`, flocked by the importer); only
//! imports whose lock is free are reaped. One gc runs at a time
//! (`gc.lock`); repacking copies frames outside any catalog lock.

pub mod repair;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rusqlite::OptionalExtension;
use serde::Serialize;

use crate::catalog;
use crate::error::{Error, Result};
use crate::format::{self, PackHeader, CHUNK, CHUNK_SIZE};
use crate::ids::{ChunkHash, ImageId};
pub use crate::image::export::VerifyReport;
use crate::image::reap::{
    abandoned_imports, drop_import_leftovers, drop_pending_packs, remove_if_exists,
};
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{pack_path, PackReader};

/// Result of `gc`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub abandoned_imports: u64,
    pub chunks_removed: u64,
    /// Chunks that held the same content as another (two imports running
    /// at once each stored it): images now use one, the other is removed.
    pub chunks_merged: u64,
    pub frames_removed: u64,
    pub packs_removed: u64,
    /// Packs less than half live whose live frames were copied to new packs.
    pub packs_repacked: u64,
    pub bytes_freed: u64,
    /// Dead bytes left in packs that are at least half live.
    pub bytes_in_partly_live_packs: u64,
    /// Raw bases (launch cache) that no instance uses, and their bytes.
    pub bases_evicted: u64,
    pub base_bytes_freed: u64,
}

/// Result of `fsck`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// Damage: something an image needs is missing or inconsistent.
    pub problems: Vec<String>,
    /// Leftovers that `gc` removes (killed imports, unreferenced packs).
    pub garbage: Vec<String>,
    /// What a lost catalog could not be rebuilt from (an image without a
    /// manifest, a pack without an index): `fsck --repair` writes them.
    pub warnings: Vec<String>,
    pub images: u64,
    pub packs: u64,
    pub chunks: u64,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Per-image stored bytes.
#[derive(Clone, Debug, Serialize)]
pub struct ImageStats {
    pub id: String,
    pub name: String,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub unique_stored_bytes: u64,
    pub shared_stored_bytes: u64,
}

/// Result of `stats`.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    pub images: u64,
    /// Sum of the images' virtual sizes.
    pub logical_bytes: u64,
    /// Sum of the images' non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Distinct chunks stored, times 4 KiB.
    pub unique_chunk_bytes: u64,
    pub chunks: u64,
    /// Bytes of pack files on disk.
    pub stored_bytes: u64,
    /// Bytes of the SQLite catalog (with its WAL).
    pub catalog_bytes: u64,
    /// Bytes of the pack index files (`packs/XX/NAME.idx`).
    pub index_bytes: u64,
    /// Bytes of the image manifests (`manifests/`).
    pub manifest_bytes: u64,
    /// data_bytes / unique_chunk_bytes.
    pub dedup_ratio: f64,
    /// unique_chunk_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// logical_bytes / (stored_bytes + catalog_bytes + index_bytes +
    /// manifest_bytes).
    pub overall_ratio: f64,
    /// Images left out because their catalog row or map is damaged (see
    /// `fsck`).
    pub damaged_images: Vec<String>,
    pub per_image: Vec<ImageStats>,
}

/// Who uses which stored bytes.
pub struct Usage {
    /// image -> (unique stored bytes, shared stored bytes)
    pub per_image: HashMap<ImageId, (u64, u64)>,
    /// Images whose row or block map is damaged, and why (they count for
    /// nothing here; fsck reports them).
    pub damaged: HashMap<ImageId, String>,
}

/// Per image: stored bytes no other image uses, and stored bytes shared.
/// A chunk's stored size is its frame's compressed size shared equally by
/// the frame's chunks. Memory: 16 bytes per (image, distinct chunk).
pub(crate) fn usage(repo: &Repo) -> Result<Usage> {
    let conn = &repo.conn;
    // Distinct chunk ids of each image, sorted; maps decoded one at a time.
    let mut per: Vec<(ImageId, Vec<i64>)> = Vec::new();
    let mut damaged = HashMap::new();
    for r in catalog::list_images(conn)? {
        if let Some(d) = r.damage {
            damaged.insert(r.id, d);
            continue;
        }
        if r.state != "available" {
            continue;
        }
        let map = match catalog::image_map(conn, &r.id) {
            Ok(m) => m,
            Err(e) => {
                damaged.insert(r.id, e.to_string());
                continue;
            }
        };
        let mut ids: Vec<i64> = map.data().map(|(_, c)| c).collect();
        ids.sort_unstable();
        ids.dedup();
        per.push((r.id, ids));
    }
    // Every image's ids together: a chunk is shared if it appears twice.
    let mut all: Vec<i64> = per.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    all.sort_unstable();
    let users = |c: i64| all.partition_point(|&x| x <= c) - all.partition_point(|&x| x < c);
    let frame_size: HashMap<i64, f64> = {
        let mut st = conn.prepare("SELECT id, clen, nchunks FROM frames")?;
        let rows = st.query_map([], |r| {
            let clen: i64 = r.get(1)?;
            let n: i64 = r.get(2)?;
            Ok((r.get::<_, i64>(0)?, clen as f64 / n.max(1) as f64))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut st = conn.prepare_cached("SELECT id, frame FROM chunks WHERE id BETWEEN ?1 AND ?2")?;
    let mut per_image = HashMap::new();
    for (img, ids) in &per {
        let (mut unique, mut shared) = (0f64, 0f64);
        for (first, last) in format::id_runs(ids) {
            let mut rows = st.query([first, last])?;
            while let Some(r) = rows.next()? {
                let (c, f): (i64, i64) = (r.get(0)?, r.get(1)?);
                let sz = frame_size.get(&f).copied().unwrap_or(0.0);
                if users(c) == 1 {
                    unique += sz;
                } else {
                    shared += sz;
                }
            }
        }
        per_image.insert(img.clone(), (unique.round() as u64, shared.round() as u64));
    }
    Ok(Usage { per_image, damaged })
}

/// Files under packs/ (name without extension -> path).
pub(crate) fn pack_files(root: &Path) -> Result<HashMap<String, PathBuf>> {
    let mut out = HashMap::new();
    let packs = root.join("packs");
    let rd = std::fs::read_dir(&packs).map_err(|e| Error::io(&packs, e))?;
    for sub in rd.flatten() {
        let Ok(rd2) = std::fs::read_dir(sub.path()) else {
            continue;
        };
        for f in rd2.flatten() {
            let p = f.path();
            if p.extension().is_none_or(|e| e != "pack") {
                continue;
            }
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                out.insert(stem.to_owned(), p.clone());
            }
        }
    }
    Ok(out)
}

/// Index files under packs/ whose pack file is gone (a pack is created
/// before its index, and removed before it).
fn orphan_indexes(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root.join("packs")) else {
        return out;
    };
    for sub in rd.flatten() {
        let Ok(rd2) = std::fs::read_dir(sub.path()) else {
            continue;
        };
        for f in rd2.flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "idx") && !p.with_extension("pack").exists() {
                out.push(p);
            }
        }
    }
    out
}

pub(crate) fn gc(repo: &Repo, dry_run: bool) -> Result<GcReport> {
    let _one_gc = repo.lock_gc()?;
    // gc decides what is garbage from the catalog: on a damaged one it
    // would delete what images still need.
    check_catalog_sound(repo)?;
    let mut rep = GcReport {
        dry_run,
        ..Default::default()
    };
    // 1. Killed imports, and packs a killed gc was writing (only gc writes
    //    pending packs of no image, and no other gc runs).
    let dead = abandoned_imports(repo)?;
    rep.abandoned_imports = dead.len() as u64;
    if !dry_run {
        for id in &dead {
            drop_import_leftovers(repo, id, true)?;
        }
        drop_repack_leftovers(repo)?;
    }
    // 2. Mark in a read snapshot: imports go on writing meanwhile.
    let marked = {
        let tx = repo.conn.unchecked_transaction()?;
        let m = mark(&tx)?;
        tx.commit()?;
        m
    };
    // 3. Sweep under the write lock. Images that became available after the
    //    snapshot keep what they use; chunks entered since are not
    //    candidates. An import that reuses a swept chunk finds out at its
    //    commit (it re-checks) and starts over.
    let tx = catalog::begin_write(&repo.conn)?;
    let mut rescued = IdSet::new(marked.max_id);
    for r in catalog::list_images(&tx)? {
        if r.state == "available" && !marked.images.contains(&r.id) {
            for (_, c) in catalog::image_map(&tx, &r.id)?.data() {
                rescued.insert(c);
            }
        }
    }
    // Images that named a duplicate now name the chunk kept (same content,
    // so the same digest); the duplicates are candidates like any other.
    for img in &marked.remap {
        let map = catalog::image_map(&tx, img)?;
        let map = map.map_ids(|c| marked.dups.get(&c).copied().unwrap_or(c));
        catalog::replace_map(&tx, img, &map)?;
    }
    rep.chunks_merged = marked
        .candidates
        .iter()
        .filter(|(id, _)| marked.dups.contains_key(id) && !rescued.contains(*id))
        .count() as u64;
    let mut dead_in_frame: HashMap<i64, u32> = HashMap::new();
    {
        let mut del = tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?;
        for &(id, frame) in &marked.candidates {
            if !rescued.contains(id) {
                del.execute([id])?;
                rep.chunks_removed += 1;
                *dead_in_frame.entry(frame).or_default() += 1;
            }
        }
    }
    // Frames left without chunks (chunks never move between frames), then
    // sealed packs left without frames.
    {
        let mut del = tx.prepare_cached(
            "DELETE FROM frames WHERE id = ?1
             AND pack IN (SELECT id FROM packs WHERE state = 'sealed')",
        )?;
        for (f, n) in &dead_in_frame {
            if marked.frame_chunks.get(f) == Some(n) {
                rep.frames_removed += del.execute([f])? as u64;
            }
        }
    }
    let dead_packs: Vec<(String, i64)> = {
        let mut st = tx.prepare(
            "SELECT name, size FROM packs p WHERE state = 'sealed'
             AND NOT EXISTS (SELECT 1 FROM frames f WHERE f.pack = p.id)",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    tx.execute(
        "DELETE FROM packs WHERE state = 'sealed' AND NOT EXISTS (SELECT 1 FROM frames f WHERE f.pack = packs.id)",
        [],
    )?;
    rep.packs_removed = dead_packs.len() as u64;
    // Remembered input files whose image is gone.
    tx.execute(
        "DELETE FROM copy_chunks WHERE id NOT IN (SELECT id FROM chunks) OR at <= ?1",
        [catalog::now() - COPY_GRACE_SECS],
    )?;
    for t in ["source_files", "image_tags", "image_shares"] {
        tx.execute(
            &format!("DELETE FROM {t} WHERE image NOT IN (SELECT id FROM images)"),
            [],
        )?;
    }
    let freed_whole: i64 = dead_packs.iter().map(|(_, s)| *s).sum();
    // Pack files on disk that the catalog does not know (rows are written
    // before files, and no row is added while we hold the write lock, so
    // these are garbage).
    let known: HashSet<String> = {
        let mut st = tx.prepare("SELECT name FROM packs")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let orphans: Vec<PathBuf> = pack_files(repo.root())?
        .into_iter()
        .filter(|(n, _)| !known.contains(n))
        .map(|(_, p)| p)
        .collect();
    let orphan_bytes: u64 = orphans
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    rep.packs_removed += orphans.len() as u64;
    rep.bytes_freed = freed_whole as u64 + orphan_bytes;
    // Packs less than half live are repacked (below).
    let mut sparse_packs: Vec<(i64, String)> = Vec::new();
    {
        let mut st = tx.prepare(
            "SELECT p.id, p.name, p.size, COALESCE(SUM(f.clen), 0) FROM packs p
             JOIN frames f ON f.pack = p.id WHERE p.state = 'sealed' GROUP BY p.id",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (pid, name, size, live): (i64, String, i64, i64) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let dead = (size - PackHeader::SIZE as i64 - live).max(0) as u64;
            if live * 2 >= size {
                rep.bytes_in_partly_live_packs += dead;
            } else {
                rep.packs_repacked += 1;
                rep.bytes_freed += dead;
                sparse_packs.push((pid, name));
            }
        }
    }
    if dry_run {
        tx.rollback()?;
        (rep.bases_evicted, rep.base_bytes_freed) =
            crate::image::bases::evict_unused_bases(repo, true)?;
        return Ok(rep);
    }
    tx.commit()?;
    // Readers that mapped an old pack keep their mapping (unlink).
    for n in dead_packs.iter().map(|(n, _)| n) {
        crate::store::remove_pack(repo.root(), n)?;
    }
    for p in &orphans {
        remove_if_exists(p)?;
        remove_if_exists(&p.with_extension("idx"))?;
    }
    for p in orphan_indexes(repo.root()) {
        remove_if_exists(&p)?;
    }
    // Manifests of images the catalog no longer has (deleted: the delete
    // removes them after its commit; imports that died before theirs).
    for p in crate::repo::manifest::orphans(&repo.conn, repo.root())? {
        remove_if_exists(&p)?;
    }
    repack(repo, &sparse_packs)?;
    (rep.bases_evicted, rep.base_bytes_freed) =
        crate::image::bases::evict_unused_bases(repo, false)?;
    catalog::vacuum_free_pages(&repo.conn);
    // Temp files and lock files of imports that are no longer running.
    for dir in ["tmp", "locks"] {
        let d = repo.root().join(dir);
        if let Ok(rd) = std::fs::read_dir(&d) {
            for f in rd.flatten() {
                let p = f.path();
                let Some(id) = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(ImageId::parse)
                else {
                    continue;
                };
                if !repo.import_alive(&id) {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }
    Ok(rep)
}

/// Refuses (exit 5) a catalog with a damaged pack row, image row or image
/// map, naming it: gc must not collect on what it cannot read.
fn check_catalog_sound(repo: &Repo) -> Result<()> {
    catalog::check_pack_names(&repo.conn)?;
    for r in catalog::list_images(&repo.conn)? {
        r.check_sound()?;
        if r.state == "available" {
            catalog::image_map(&repo.conn, &r.id).map_err(|e| {
                Error::StoreDamaged(format!(
                    "gc refused: image {} ({}): {e}; it may still need chunks that gc would free: delete the image or restore catalog.db from a backup",
                    r.name, r.id
                ))
            })?;
        }
    }
    Ok(())
}

/// How long gc keeps the chunks of a copy that did not finish (so that it
/// can resume without sending them again): 7 days.
pub const COPY_GRACE_SECS: i64 = 7 * 24 * 3600;

/// A set of chunk ids up to a maximum, one bit each.
struct IdSet(Vec<u64>);

impl IdSet {
    fn new(max_id: i64) -> IdSet {
        IdSet(vec![0; (max_id.max(0) as usize >> 6) + 1])
    }

    /// Ids above the maximum are ignored.
    fn insert(&mut self, id: i64) {
        if let Some(w) = self.0.get_mut(id as usize >> 6) {
            *w |= 1 << (id & 63);
        }
    }

    fn contains(&self, id: i64) -> bool {
        self.0
            .get(id as usize >> 6)
            .is_some_and(|w| w & (1 << (id & 63)) != 0)
    }
}

/// What gc's mark phase found in one snapshot.
struct Marked {
    /// Available images whose chunks were marked.
    images: HashSet<ImageId>,
    max_id: i64,
    /// Committed chunks no image uses: (chunk, frame).
    candidates: Vec<(i64, i64)>,
    /// Chunks per frame, for frames with a candidate.
    frame_chunks: HashMap<i64, u32>,
    /// Duplicate chunk -> the chunk of the same content that is kept.
    dups: HashMap<i64, i64>,
    /// Images whose maps name a duplicate (rewritten by the sweep).
    remap: Vec<ImageId>,
}

fn mark(tx: &rusqlite::Transaction<'_>) -> Result<Marked> {
    let max_id: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM chunks", [], |r| r.get(0))?;
    let dups = duplicate_chunks(tx)?;
    let mut keep = IdSet::new(max_id);
    let mut images = HashSet::new();
    let mut remap = Vec::new();
    for r in catalog::list_images(tx)? {
        if r.state == "available" {
            let mut uses_dup = false;
            for (_, c) in catalog::image_map(tx, &r.id)?.data() {
                match dups.get(&c) {
                    Some(&kept) => {
                        keep.insert(kept);
                        uses_dup = true;
                    }
                    None => keep.insert(c),
                }
            }
            if uses_dup {
                remap.push(r.id.clone());
            }
            images.insert(r.id);
        }
    }
    // Chunks pending for a running import are its own business; those an
    // unfinished copy brought wait for it to resume (for a while).
    {
        let mut st = tx.prepare(
            "SELECT id FROM pending_chunks UNION ALL SELECT id FROM copy_chunks WHERE at > ?1",
        )?;
        let mut rows = st.query([catalog::now() - COPY_GRACE_SECS])?;
        while let Some(r) = rows.next()? {
            keep.insert(r.get(0)?);
        }
    }
    let mut candidates = Vec::new();
    let mut frame_chunks: HashMap<i64, u32> = HashMap::new();
    {
        let mut st = tx.prepare("SELECT id, frame FROM chunks")?;
        let mut rows = st.query([])?;
        let mut all: HashMap<i64, u32> = HashMap::new();
        while let Some(r) = rows.next()? {
            let (id, frame): (i64, i64) = (r.get(0)?, r.get(1)?);
            *all.entry(frame).or_default() += 1;
            if !keep.contains(id) {
                candidates.push((id, frame));
            }
        }
        for &(_, f) in &candidates {
            frame_chunks.insert(f, all[&f]);
        }
    }
    Ok(Marked {
        images,
        max_id,
        candidates,
        frame_chunks,
        dups,
        remap,
    })
}

/// Committed chunks whose content another committed chunk holds too:
/// duplicate id -> the (lowest) id kept. Found through the `hkey` index.
fn duplicate_chunks(tx: &rusqlite::Transaction<'_>) -> Result<HashMap<i64, i64>> {
    let mut out = HashMap::new();
    let keys: Vec<i64> = {
        let mut st = tx.prepare("SELECT hkey FROM chunks GROUP BY hkey HAVING COUNT(*) > 1")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut st = tx.prepare(
        "SELECT c.id, c.hash FROM chunks c WHERE c.hkey = ?1
         AND NOT EXISTS (SELECT 1 FROM pending_chunks p WHERE p.id = c.id) ORDER BY c.id",
    )?;
    for k in keys {
        let mut first: HashMap<Vec<u8>, i64> = HashMap::new();
        let mut rows = st.query([k])?;
        while let Some(r) = rows.next()? {
            let (id, hash): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
            match first.get(&hash) {
                Some(&kept) => {
                    out.insert(id, kept);
                }
                None => {
                    first.insert(hash, id);
                }
            }
        }
    }
    Ok(out)
}

/// Copies the live frames of `packs` into new packs (compressed bytes as
/// they are), then points the frames there and drops the old packs. Only
/// gc moves or deletes frames of sealed packs, and one gc runs at a time,
/// so the copying needs no catalog lock; the switch is one short write
/// transaction. New packs are registered (pending, no image) before their
/// files exist; a gc killed meanwhile leaves them to the next gc.
fn repack(repo: &Repo, packs: &[(i64, String)]) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let mut moves: Vec<(i64, i64, u64)> = Vec::new(); // frame, new pack row, offset
    let mut sealed: Vec<(i64, u64)> = Vec::new(); // new pack row, size
    let mut writer: Option<(i64, crate::store::PackWriter)> = None;
    for (pid, name) in packs {
        let reader = PackReader::open(&pack_path(repo.root(), name)?)?;
        let frames: Vec<(i64, u64, u64, i64)> = {
            let mut st = repo.conn.prepare_cached(
                "SELECT id, offset, clen, nchunks FROM frames WHERE pack = ?1 ORDER BY offset",
            )?;
            let rows = st.query_map([pid], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                    r.get::<_, i64>(3)?.clamp(0, format::FRAME_CHUNKS as i64),
                ))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (fid, off, clen, nchunks) in frames {
            if writer
                .as_ref()
                .is_some_and(|(_, w)| w.len() >= format::PACK_TARGET_BYTES)
            {
                let (id, w) = writer.take().unwrap();
                sealed.push((id, w.seal()?));
            }
            if writer.is_none() {
                let n = crate::store::new_pack_name();
                let id = catalog::write(&repo.conn, |c| {
                    c.execute(
                        "INSERT INTO packs (name, state) VALUES (?1, 'pending')",
                        [&n],
                    )?;
                    Ok(c.last_insert_rowid())
                })?;
                writer = Some((
                    id,
                    crate::store::PackWriter::create(repo.root(), &n, repo.perms())?,
                ));
            }
            // The new index names the chunks the catalog knows in the
            // frame (others' slots are unused).
            let mut hashes = vec![format::UNUSED_SLOT; nchunks as usize];
            {
                let mut st = repo
                    .conn
                    .prepare_cached("SELECT slot, hash FROM chunks WHERE frame = ?1")?;
                let mut rows = st.query([fid])?;
                while let Some(r) = rows.next()? {
                    let (slot, h): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
                    if let (Some(s), Ok(h)) = (hashes.get_mut(slot as usize), h.try_into()) {
                        *s = ChunkHash(h);
                    }
                }
            }
            let (new_id, w) = writer.as_mut().unwrap();
            moves.push((
                fid,
                *new_id,
                w.append(&reader.frame_bytes(off, clen)?, &hashes)?,
            ));
        }
    }
    if let Some((id, w)) = writer {
        sealed.push((id, w.seal()?));
    }
    catalog::write(&repo.conn, |tx| {
        let mut mv = tx.prepare_cached("UPDATE frames SET pack = ?2, offset = ?3 WHERE id = ?1")?;
        for (fid, pack, off) in &moves {
            mv.execute(rusqlite::params![fid, pack, *off as i64])?;
        }
        let mut seal =
            tx.prepare_cached("UPDATE packs SET state = 'sealed', size = ?2 WHERE id = ?1")?;
        for (id, size) in &sealed {
            seal.execute(rusqlite::params![id, *size as i64])?;
        }
        let mut del = tx.prepare_cached("DELETE FROM packs WHERE id = ?1")?;
        for (pid, _) in packs {
            del.execute([pid])?;
        }
        Ok(())
    })?;
    for (_, name) in packs {
        crate::store::remove_pack(repo.root(), name)?;
    }
    Ok(())
}

/// Removes the pending packs of a gc that was killed while repacking.
fn drop_repack_leftovers(repo: &Repo) -> Result<()> {
    let names = catalog::write(&repo.conn, |tx| drop_pending_packs(tx, None))?;
    for n in &names {
        crate::store::remove_pack(repo.root(), n)?;
    }
    Ok(())
}

/// Checks the catalog and the store; with `full_bases`, every launch base
/// is read back in full and its digest compared (otherwise bases get the
/// launch's cheap check: record, size, sampled blocks).
pub(crate) fn fsck(repo: &Repo, full_bases: bool, progress: &dyn Progress) -> Result<FsckReport> {
    let (mut rep, missing) = {
        let tx = repo.conn.unchecked_transaction()?;
        let r = fsck_snapshot(repo)?;
        tx.finish()?;
        r
    };
    settle_missing(repo, &mut rep, missing)?;
    check_bases(repo, &mut rep, full_bases, progress)?;
    Ok(rep)
}

/// Packs whose file was missing when fsck looked: (name, problem).
type MissingPacks = Vec<(String, String)>;

/// Whether the catalog (now, not in an earlier snapshot) has a sealed
/// pack of this name.
fn pack_live(repo: &Repo, name: &str) -> Result<bool> {
    Ok(repo
        .conn
        .query_row(
            "SELECT 1 FROM packs WHERE name = ?1 AND state = 'sealed'",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// A pack seen in a snapshot whose file is gone is damage only if the
/// catalog still has it now: gc unlinks a pack after committing its removal
/// (deleted or repacked), which may be after the snapshot was taken.
/// Returns the packs found retired.
fn settle_missing(
    repo: &Repo,
    rep: &mut FsckReport,
    missing: MissingPacks,
) -> Result<HashSet<String>> {
    let mut retired = HashSet::new();
    for (name, problem) in missing {
        if pack_live(repo, &name)? {
            rep.problems.push(problem);
        } else {
            retired.insert(name);
        }
    }
    Ok(retired)
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
}

/// Launch bases: each file in `bases/` against its record and image.
fn check_bases(
    repo: &Repo,
    rep: &mut FsckReport,
    full: bool,
    progress: &dyn Progress,
) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(repo.root().join("bases")) else {
        return Ok(());
    };
    let images: HashMap<String, catalog::ImageRow> = catalog::list_images(&repo.conn)?
        .into_iter()
        .map(|r| (r.id.as_str().to_owned(), r))
        .collect();
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter_map(|n| n.strip_suffix(".raw").map(str::to_owned))
        .collect();
    names.sort();
    for id in names {
        let img = images
            .get(&id)
            .filter(|r| r.damage.is_none() && r.state == "available");
        if let Some(why) = crate::image::bases::base_problem(repo, &id, img, full, progress)? {
            rep.problems.push(why);
        }
    }
    Ok(())
}

fn fsck_snapshot(repo: &Repo) -> Result<(FsckReport, MissingPacks)> {
    let mut rep = FsckReport::default();
    let mut missing = MissingPacks::new();
    let conn = &repo.conn;
    let ok: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if ok != "ok" {
        rep.problems
            .push(format!("catalog: SQLite quick_check says {ok}"));
    }
    // Packs.
    let mut packs: Vec<(i64, String, String, i64)> = Vec::new();
    {
        let mut st = conn.prepare("SELECT id, name, state, size FROM packs")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            let (name, utf8) = catalog::text_lossy(r, 1)?;
            let (state, _) = catalog::text_lossy(r, 2)?;
            let size = match r.get_ref(3)? {
                rusqlite::types::ValueRef::Integer(v) => v,
                _ => -1,
            };
            if let Err(e) = catalog::check_pack_name(id, &name, utf8) {
                rep.problems.push(e.to_string());
                continue;
            }
            if !matches!(state.as_str(), "pending" | "sealed") || size < 0 {
                rep.problems.push(format!(
                    "catalog table packs, row {id}: state {state:?} or size is not valid"
                ));
                continue;
            }
            packs.push((id, name, state, size));
        }
    }
    let on_disk = pack_files(repo.root())?;
    let mut pack_len: HashMap<i64, u64> = HashMap::new();
    let alive_pending: HashSet<String> = {
        let mut st = conn.prepare("SELECT name, image FROM packs WHERE state = 'pending'")?;
        let rows = st.query_map([], |r| {
            Ok((
                catalog::text_lossy(r, 0)?.0,
                r.get::<_, Option<String>>(1).unwrap_or(None),
            ))
        })?;
        let mut s = HashSet::new();
        for r in rows {
            let (n, img) = r?;
            let writer_alive = match img.as_deref() {
                Some(i) => ImageId::parse(i).is_some_and(|i| repo.import_alive(&i)),
                None => repo.gc_running(), // gc repacking
            };
            if writer_alive {
                s.insert(n);
            }
        }
        s
    };
    for (id, name, state, size) in &packs {
        rep.packs += 1;
        if state == "pending" {
            if !alive_pending.contains(name) {
                rep.garbage.push(format!(
                    "pack {name}: left pending by an import or gc that died"
                ));
            }
            continue;
        }
        let p = pack_path(repo.root(), name)?;
        let gone = || {
            (
                name.clone(),
                format!("pack {name}: file {} is missing", p.display()),
            )
        };
        match std::fs::metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(gone()),
            Err(e) => rep.problems.push(format!("pack {name}: {e}")),
            Ok(m) if m.len() < *size as u64 => rep.problems.push(format!(
                "pack {name}: file is {} bytes, the catalog expects {size}",
                m.len()
            )),
            Ok(m) => match PackReader::open(&p) {
                Err(e) if is_not_found(&e) => missing.push(gone()),
                Err(e) => rep.problems.push(format!("pack {name}: {e}")),
                Ok(_) => {
                    pack_len.insert(*id, m.len());
                }
            },
        }
    }
    let known: HashSet<&String> = packs.iter().map(|(_, n, _, _)| n).collect();
    for (n, p) in &on_disk {
        if !known.contains(n) {
            rep.garbage
                .push(format!("{}: pack file unknown to the catalog", p.display()));
        }
    }
    // Frames.
    let mut frames: HashMap<i64, u32> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT f.id, f.pack, f.offset, f.clen, f.nchunks, p.state FROM frames f LEFT JOIN packs p ON p.id = f.pack")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (id, pack, off, clen, n): (i64, i64, i64, i64, i64) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
            let state: Option<String> = r.get(5)?;
            frames.insert(id, n as u32);
            match state.as_deref() {
                None => rep
                    .problems
                    .push(format!("frame {id}: its pack {pack} is missing")),
                Some("sealed") => {
                    if let Some(&len) = pack_len.get(&pack) {
                        if (off + clen) as u64 > len || off < PackHeader::SIZE as i64 {
                            rep.problems.push(format!(
                                "frame {id}: bytes {off}..{} lie outside its pack ({len} bytes)",
                                off + clen
                            ));
                        }
                    }
                }
                Some(_) => {} // a running import's (or a dead one's: see packs)
            }
        }
    }
    // Chunks.
    let mut chunk_ids: HashSet<i64> = HashSet::new();
    {
        let mut st = conn.prepare("SELECT id, frame, slot FROM chunks")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (id, frame, slot): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            rep.chunks += 1;
            chunk_ids.insert(id);
            match frames.get(&frame) {
                None => rep
                    .problems
                    .push(format!("chunk {id}: frame {frame} is missing")),
                Some(&n) if slot as u32 >= n => rep.problems.push(format!(
                    "chunk {id}: slot {slot} past the {n} chunks of frame {frame}"
                )),
                _ => {}
            }
        }
    }
    // Images.
    for row in catalog::list_images(conn)? {
        if let Some(d) = &row.damage {
            rep.images += 1;
            rep.problems
                .push(format!("image {} ({}): {d}", row.name, row.id));
            continue;
        }
        if row.state == "importing" {
            if !repo.import_alive(&row.id) {
                rep.garbage
                    .push(format!("image {} ({}): import died", row.name, row.id));
            }
            continue;
        }
        rep.images += 1;
        match catalog::image_map(conn, &row.id) {
            Err(e) => rep
                .problems
                .push(format!("image {} ({}): {e}", row.name, row.id)),
            Ok(map) => {
                if map.nblocks != format::blocks_for(row.virtual_size) {
                    rep.problems.push(format!(
                        "image {} ({}): map has {} blocks for {} bytes",
                        row.name, row.id, map.nblocks, row.virtual_size
                    ));
                }
                if let Some((i, c)) = map.data().find(|(_, c)| !chunk_ids.contains(c)) {
                    rep.problems.push(format!(
                        "image {} ({}): chunk {c} at byte offset {} is missing",
                        row.name,
                        row.id,
                        i * CHUNK
                    ));
                }
            }
        }
        if let Some(w) = crate::repo::manifest::check(repo.root(), &row) {
            rep.warnings.push(format!(
                "image {} ({}): {w} (`vmdepot fsck --repair` writes one)",
                row.name, row.id
            ));
        }
    }
    for (_, name, state, _) in &packs {
        if state != "sealed" {
            continue;
        }
        match crate::store::read_index(repo.root(), name) {
            Ok(Some(_)) => {}
            Ok(None) => rep.warnings.push(format!(
                "pack {name}: no index file (`vmdepot fsck --repair` writes one)"
            )),
            Err(e) => rep
                .warnings
                .push(format!("{e} (`vmdepot fsck --repair` writes a new one)")),
        }
    }
    for p in crate::repo::manifest::orphans(conn, repo.root())? {
        rep.garbage.push(format!(
            "{}: manifest of an image the catalog does not have",
            p.display()
        ));
    }
    for p in orphan_indexes(repo.root()) {
        rep.garbage
            .push(format!("{}: index of a pack that is gone", p.display()));
    }
    Ok((rep, missing))
}

/// Re-reads every frame of every sealed pack and checks every chunk's hash;
/// checks every image's map too.
///
/// Everything is read from one snapshot of the catalog, so a concurrent gc
/// cannot make it inconsistent; a pack that gc retires after the snapshot
/// (its file unlinked) is skipped once the catalog confirms it is gone.
pub(crate) fn verify_all(repo: &Repo, progress: &dyn Progress) -> Result<VerifyReport> {
    let conn = &repo.conn;
    let snapshot = conn.unchecked_transaction()?;
    let (mut fsck, missing) = fsck_snapshot(repo)?;
    let mut by_frame: HashMap<i64, Vec<(u32, ChunkHash)>> = HashMap::new();
    {
        let mut st = conn.prepare(
            "SELECT frame, slot, hash FROM chunks WHERE id NOT IN (SELECT id FROM pending_chunks)",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let h: Vec<u8> = r.get(2)?;
            by_frame.entry(r.get(0)?).or_default().push((
                r.get::<_, i64>(1)? as u32,
                ChunkHash(h.as_slice().try_into().unwrap_or([0; 32])),
            ));
        }
    }
    let frames: Vec<(i64, String, u64, u64, u32)> = {
        let mut st = conn.prepare(
            "SELECT f.id, p.name, f.offset, f.clen, f.nchunks FROM frames f JOIN packs p ON p.id = f.pack
             WHERE p.state = 'sealed'
             ORDER BY p.id, f.offset",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
                r.get::<_, i64>(4)? as u32,
            ))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    snapshot.finish()?;
    let mut retired = settle_missing(repo, &mut fsck, missing)?;
    if let Some(p) = fsck.problems.first() {
        return Err(Error::StoreDamaged(p.clone()));
    }
    let total: u64 = frames.iter().map(|f| f.3).sum();
    progress.begin("verify", total);
    let mut rep = VerifyReport {
        images: fsck.images,
        ..Default::default()
    };
    let mut reader: Option<(String, PackReader)> = None;
    let mut buf = Vec::new();
    for (fid, pack, off, clen, n) in &frames {
        if retired.contains(pack) {
            progress.advance(*clen);
            continue;
        }
        if reader.as_ref().map(|(p, _)| p != pack).unwrap_or(true) {
            match PackReader::open(&pack_path(repo.root(), pack)?) {
                Ok(r) => reader = Some((pack.clone(), r)),
                Err(e) if is_not_found(&e) && !pack_live(repo, pack)? => {
                    // gc deleted or repacked it after the snapshot.
                    retired.insert(pack.clone());
                    progress.advance(*clen);
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        let r = &reader.as_ref().unwrap().1;
        r.read_frame(*off, *clen, *n as usize, &mut buf)?;
        for (slot, hash) in by_frame.get(fid).map(|v| v.as_slice()).unwrap_or(&[]) {
            let s = *slot as usize * CHUNK_SIZE;
            if ChunkHash::of(&buf[s..s + CHUNK_SIZE]) != *hash {
                return Err(Error::StoreDamaged(format!(
                    "pack {pack}: frame at offset {off}, slot {slot}: content does not match its hash {hash:?}; the images using it cannot be exported (see `vmdepot image verify IMAGE`)"
                )));
            }
            rep.chunks += 1;
            rep.bytes += CHUNK;
        }
        progress.advance(*clen);
    }
    progress.end();
    Ok(rep)
}

pub(crate) fn stats(repo: &Repo) -> Result<Stats> {
    let conn = &repo.conn;
    let usage = usage(repo)?;
    let rows: Vec<_> = catalog::list_images(conn)?
        .into_iter()
        .filter(|r| r.state == "available" && !usage.damaged.contains_key(&r.id))
        .collect();
    let mut damaged: Vec<String> = usage.damaged.values().cloned().collect();
    damaged.sort();
    let chunks: i64 = conn.query_row(
        "SELECT COUNT(*) FROM chunks WHERE id NOT IN (SELECT id FROM pending_chunks)",
        [],
        |r| r.get(0),
    )?;
    let stored: i64 = conn.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM packs WHERE state = 'sealed'",
        [],
        |r| r.get(0),
    )?;
    let catalog_bytes: u64 = ["catalog.db", "catalog.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(repo.root().join(f)).ok())
        .map(|m| m.len())
        .sum();
    let index_bytes: u64 = pack_files(repo.root())?
        .values()
        .filter_map(|p| std::fs::metadata(p.with_extension("idx")).ok())
        .map(|m| m.len())
        .sum();
    let manifest_bytes: u64 = crate::repo::manifest::sizes(repo.root())?.values().sum();
    let overhead = catalog_bytes + index_bytes + manifest_bytes;
    let logical: u64 = rows.iter().map(|r| r.virtual_size).sum();
    let data: u64 = rows.iter().map(|r| r.data_bytes).sum();
    let uniq = chunks as u64 * CHUNK;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Ok(Stats {
        images: rows.len() as u64,
        logical_bytes: logical,
        data_bytes: data,
        unique_chunk_bytes: uniq,
        chunks: chunks as u64,
        stored_bytes: stored as u64,
        catalog_bytes,
        index_bytes,
        manifest_bytes,
        dedup_ratio: ratio(data, uniq),
        compression_ratio: ratio(uniq, stored as u64),
        overall_ratio: ratio(logical, stored as u64 + overhead),
        damaged_images: damaged,
        per_image: rows
            .into_iter()
            .map(|r| {
                let (u, s) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
                ImageStats {
                    id: r.id.to_string(),
                    name: r.name,
                    virtual_size: r.virtual_size,
                    data_bytes: r.data_bytes,
                    unique_stored_bytes: u,
                    shared_stored_bytes: s,
                }
            })
            .collect(),
    })
}
