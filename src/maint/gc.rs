//! Garbage collection: reap dead imports, mark in a read snapshot, sweep
//! in one short write transaction, repack sparse packs, evict unused
//! launch bases.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use super::*;
use crate::catalog;
use crate::error::{Error, Result};
use crate::format::{self, PackHeader};
use crate::ids::{ChunkHash, ImageId};
use crate::image::reap::{
    abandoned_imports, drop_import_leftovers, drop_pending_packs, remove_if_exists,
};
use crate::repo::Repo;
use crate::store::{pack_path, PackReader};

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
