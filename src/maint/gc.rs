//! Garbage collection as a plan and its application.
//!
//! [`plan`] decides everything from the store's listing and one read
//! snapshot of the catalog, changing nothing: the imports to reap, the
//! chunks and frames to sweep ([`Marked`]), the packs left empty, the pack
//! objects and indexes no row names, the packs to repack, the bases to
//! evict, and the byte counts: [`GcPlan::report`] is `gc --dry-run`.
//! [`apply`] carries a plan out: it reaps, then sweeps in one short
//! `BEGIN IMMEDIATE` transaction that re-checks the plan against what
//! changed since its snapshot (images that became available keep their
//! chunks; chunks entered since were never candidates), deletes objects
//! after that commit, repacks ([`super::repack`]) and evicts bases.

use std::collections::{HashMap, HashSet};

use super::{list_packs, GcReport};
use crate::catalog::{self, ImageState, PackRow, PackState};
use crate::error::{Error, Result};
use crate::format::PackHeader;
use crate::ids::ImageId;
use crate::image::bases::evict_unused_bases;
use crate::image::reap::{abandoned_imports, drop_import_leftovers, remove_if_exists};
use crate::repo::Repo;
use crate::store::{remove_pack, ObjectInfo, ObjectKind};

/// How long gc keeps the chunks of a copy that did not finish (so that it
/// can resume without sending them again): 7 days.
pub const COPY_GRACE_SECS: i64 = 7 * 24 * 3600;

pub(crate) fn gc(repo: &Repo, dry_run: bool) -> Result<GcReport> {
    let _one_gc = repo.lock_gc()?;
    // gc decides what is garbage from the catalog: on a damaged one it
    // would delete what images still need.
    check_catalog_sound(repo)?;
    let plan = plan(repo)?;
    if dry_run {
        return Ok(plan.report);
    }
    apply(repo, plan)
}

/// Refuses (exit 5) a catalog with a damaged pack row, image row or image
/// map, naming it: gc must not collect on what it cannot read.
fn check_catalog_sound(repo: &Repo) -> Result<()> {
    catalog::check_pack_names(&repo.conn)?;
    for r in catalog::list_images(&repo.conn)? {
        r.check_sound()?;
        if r.state == Some(ImageState::Available) {
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

/// Everything one gc run would do, decided from one snapshot.
pub(crate) struct GcPlan {
    /// What the plan does, in numbers: the `--dry-run` report.
    pub(crate) report: GcReport,
    /// Imports whose process died, reaped first.
    abandoned: Vec<ImageId>,
    /// The mark: candidates for the sweep.
    marked: Marked,
    /// Frames of sealed packs all of whose chunks are candidates.
    dead_frames: Vec<i64>,
    /// Pack objects no pack row names (garbage: rows come first).
    orphans: Vec<ObjectInfo>,
    /// Index objects whose pack object is gone.
    orphan_indexes: Vec<String>,
    /// Packs less than half live: (row id, name), to repack.
    sparse: Vec<(i64, String)>,
    /// The dead bytes the repack frees.
    sparse_dead_bytes: u64,
}

/// Decides what gc does, changing nothing.
pub(crate) fn plan(repo: &Repo) -> Result<GcPlan> {
    let store = repo.store();
    let abandoned = abandoned_imports(repo)?;
    // The store first, then the snapshot: a pack object is created after
    // its row, so one listed now that the snapshot has no row for is
    // garbage for good.
    let (objects, orphan_indexes) = list_packs(store)?;
    let (marked, packs, frames) = catalog::read(&repo.conn, |c| {
        Ok((mark(c)?, sound_pack_rows(c)?, frames_by_pack(c)?))
    })?;
    let dead_frames = dead_frames(&marked, &packs, &frames);
    let mut report = GcReport {
        dry_run: true,
        abandoned_imports: abandoned.len() as u64,
        chunks_removed: marked.candidates.len() as u64,
        chunks_merged: marked.merged(|_| false),
        frames_removed: dead_frames.len() as u64,
        ..Default::default()
    };
    let dead: HashSet<i64> = dead_frames.iter().copied().collect();
    let (sparse, sparse_dead_bytes) = sort_packs(&packs, &frames, &dead, &mut report);
    let known: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    let orphans: Vec<ObjectInfo> = objects
        .iter()
        .filter(|o| !known.contains(o.name.as_str()))
        .cloned()
        .collect();
    report.packs_removed += orphans.len() as u64;
    report.bytes_freed += orphans.iter().map(|o| o.size).sum::<u64>() + sparse_dead_bytes;
    (report.bases_evicted, report.base_bytes_freed) = evict_unused_bases(repo, true)?;
    Ok(GcPlan {
        report,
        abandoned,
        marked,
        dead_frames,
        orphans,
        orphan_indexes,
        sparse,
        sparse_dead_bytes,
    })
}

/// Every pack row, refusing a damaged one (gc decides nothing on it).
fn sound_pack_rows(conn: &rusqlite::Connection) -> Result<Vec<PackRow>> {
    catalog::pack_rows(conn)?
        .into_iter()
        .map(|r| r.map_err(Error::StoreDamaged))
        .collect()
}

/// Each pack's frames: pack -> (frame, compressed length).
fn frames_by_pack(conn: &rusqlite::Connection) -> Result<HashMap<i64, Vec<(i64, u64)>>> {
    let mut out: HashMap<i64, Vec<(i64, u64)>> = HashMap::new();
    catalog::for_each_frame(conn, |frame, pack, clen| {
        out.entry(pack).or_default().push((frame, clen))
    })?;
    Ok(out)
}

/// The frames of sealed packs whose chunks are all candidates (chunks
/// never move between frames, so such a frame is no chunk's home after
/// the sweep).
fn dead_frames(
    marked: &Marked,
    packs: &[PackRow],
    frames: &HashMap<i64, Vec<(i64, u64)>>,
) -> Vec<i64> {
    let mut candidates: HashMap<i64, u32> = HashMap::new();
    for &(_, f) in &marked.candidates {
        *candidates.entry(f).or_default() += 1;
    }
    packs
        .iter()
        .filter(|p| p.state == PackState::Sealed)
        .filter_map(|p| frames.get(&p.id))
        .flatten()
        .map(|&(f, _)| f)
        .filter(|f| {
            candidates
                .get(f)
                .is_some_and(|n| marked.frame_chunks.get(f) == Some(n))
        })
        .collect()
}

/// Sorts the sealed packs by what the sweep leaves in them: none (the
/// pack goes), less than half (repacked: returned, with the bytes that
/// frees) or more (counted as partly live). Counts go to `report`.
fn sort_packs(
    packs: &[PackRow],
    frames: &HashMap<i64, Vec<(i64, u64)>>,
    dead: &HashSet<i64>,
    report: &mut GcReport,
) -> (Vec<(i64, String)>, u64) {
    let mut sparse = Vec::new();
    let mut freed = 0;
    for p in packs.iter().filter(|p| p.state == PackState::Sealed) {
        let live: Vec<u64> = frames
            .get(&p.id)
            .into_iter()
            .flatten()
            .filter(|(f, _)| !dead.contains(f))
            .map(|&(_, clen)| clen)
            .collect();
        if live.is_empty() {
            report.packs_removed += 1;
            report.bytes_freed += p.size;
            continue;
        }
        let live: u64 = live.iter().sum();
        let unused = p.size.saturating_sub(PackHeader::SIZE as u64 + live);
        if live * 2 >= p.size {
            report.bytes_in_partly_live_packs += unused;
        } else {
            report.packs_repacked += 1;
            freed += unused;
            sparse.push((p.id, p.name.clone()));
        }
    }
    (sparse, freed)
}

/// Carries out a plan; the report says what was done.
pub(crate) fn apply(repo: &Repo, plan: GcPlan) -> Result<GcReport> {
    let mut rep = GcReport {
        dry_run: false,
        abandoned_imports: plan.abandoned.len() as u64,
        packs_repacked: plan.sparse.len() as u64,
        bytes_in_partly_live_packs: plan.report.bytes_in_partly_live_packs,
        ..Default::default()
    };
    // 1. Killed imports, and packs a killed gc was writing (only gc writes
    //    pending packs of no image, and no other gc runs).
    for id in &plan.abandoned {
        drop_import_leftovers(repo, id, true)?;
    }
    super::repack::drop_leftovers(repo)?;
    // 2. The sweep, then the objects nothing names any more.
    let dead_packs = sweep(repo, &plan, &mut rep)?;
    remove_objects(repo, &plan, &dead_packs)?;
    rep.packs_removed = (dead_packs.len() + plan.orphans.len()) as u64;
    rep.bytes_freed = dead_packs.iter().map(|(_, s)| *s as u64).sum::<u64>()
        + plan.orphans.iter().map(|o| o.size).sum::<u64>()
        + plan.sparse_dead_bytes;
    // 3. Sparse packs, unused bases, the catalog's free pages, leftovers.
    super::repack::repack(repo, &plan.sparse)?;
    (rep.bases_evicted, rep.base_bytes_freed) = evict_unused_bases(repo, false)?;
    crate::image::serve::remove_stale(repo)?;
    crate::image::profile::remove_stale(repo)?;
    catalog::vacuum_free_pages(&repo.conn);
    remove_dead_run_files(repo);
    Ok(rep)
}

/// One write transaction: the plan's candidates minus what images that
/// became available since its snapshot use, their frames, the packs left
/// without frames, rows of images that are gone. Returns the packs deleted
/// (name, size).
fn sweep(repo: &Repo, plan: &GcPlan, rep: &mut GcReport) -> Result<Vec<(String, i64)>> {
    let marked = &plan.marked;
    let tx = catalog::begin_write(&repo.conn)?;
    let rescued = rescue(&tx, marked)?;
    // Images that named a duplicate now name the chunk kept (same content,
    // so the same digest); the duplicates are candidates like any other.
    for img in &marked.remap {
        let map = catalog::image_map(&tx, img)?;
        let map = map.map_ids(|c| marked.dups.get(&c).copied().unwrap_or(c));
        catalog::replace_map(&tx, img, &map)?;
    }
    rep.chunks_merged = marked.merged(|id| rescued.contains(id));
    let mut gone = Vec::with_capacity(marked.candidates.len());
    let mut dead_in_frame: HashMap<i64, u32> = HashMap::new();
    for &(id, frame) in marked
        .candidates
        .iter()
        .filter(|(id, _)| !rescued.contains(*id))
    {
        gone.push(id);
        *dead_in_frame.entry(frame).or_default() += 1;
    }
    catalog::delete_chunks(&tx, &gone)?;
    rep.chunks_removed = gone.len() as u64;
    let frames: Vec<i64> = plan
        .dead_frames
        .iter()
        .copied()
        .filter(|f| dead_in_frame.get(f) == marked.frame_chunks.get(f))
        .collect();
    rep.frames_removed = catalog::delete_sealed_frames(&tx, &frames)?;
    let dead_packs = catalog::delete_empty_packs(&tx)?;
    catalog::delete_unreferenced(&tx, catalog::now() - COPY_GRACE_SECS)?;
    tx.commit()?;
    Ok(dead_packs)
}

/// Chunks of images that became available after the plan's snapshot.
fn rescue(tx: &rusqlite::Connection, marked: &Marked) -> Result<IdSet> {
    let mut rescued = IdSet::new(marked.max_id);
    for r in catalog::list_images(tx)? {
        if r.state == Some(ImageState::Available) && !marked.images.contains(&r.id) {
            for (_, c) in catalog::image_map(tx, &r.id)?.data() {
                rescued.insert(c);
            }
        }
    }
    Ok(rescued)
}

/// After the sweep's commit: the deleted packs, the plan's orphan objects
/// and indexes, the manifests of images the catalog no longer has, and
/// what the store keeps of deletions past their grace. Readers that
/// opened a pack keep reading it (see [`crate::store::ObjectStore`]).
fn remove_objects(repo: &Repo, plan: &GcPlan, dead_packs: &[(String, i64)]) -> Result<()> {
    let store = repo.store();
    for (name, _) in dead_packs {
        remove_pack(store, name)?;
    }
    for o in &plan.orphans {
        remove_pack(store, &o.name)?;
    }
    for name in &plan.orphan_indexes {
        store.delete(ObjectKind::PackIndex, name)?;
    }
    // Deleted images (the delete removes them after its commit) and imports
    // that died before theirs.
    for p in crate::repo::manifest::orphans(&repo.conn, repo.root())? {
        remove_if_exists(&p)?;
    }
    store.purge(crate::store::DELETE_GRACE)
}

/// Temp files and lock files of imports that are no longer running.
fn remove_dead_run_files(repo: &Repo) {
    for dir in ["tmp", "locks"] {
        let Ok(rd) = std::fs::read_dir(repo.root().join(dir)) else {
            continue;
        };
        for p in rd.flatten().map(|f| f.path()) {
            let id = p
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(ImageId::parse);
            if id.is_some_and(|id| !repo.import_alive(&id)) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}

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

impl Marked {
    /// Candidates that are duplicates of a kept chunk, but for `spared`.
    fn merged(&self, spared: impl Fn(i64) -> bool) -> u64 {
        self.candidates
            .iter()
            .filter(|(id, _)| self.dups.contains_key(id) && !spared(*id))
            .count() as u64
    }
}

/// Marks, in the caller's read snapshot, every chunk an available image,
/// a running import or an unfinished copy keeps; the others are
/// candidates.
fn mark(tx: &rusqlite::Connection) -> Result<Marked> {
    let max_id = catalog::max_chunk_id(tx)?;
    let dups = catalog::duplicate_chunks(tx)?;
    let mut keep = IdSet::new(max_id);
    let mut images = HashSet::new();
    let mut remap = Vec::new();
    for r in catalog::list_images(tx)? {
        if r.state != Some(ImageState::Available) {
            continue;
        }
        let mut uses_dup = false;
        for (_, c) in catalog::image_map(tx, &r.id)?.data() {
            let kept = dups.get(&c).copied();
            uses_dup |= kept.is_some();
            keep.insert(kept.unwrap_or(c));
        }
        if uses_dup {
            remap.push(r.id.clone());
        }
        images.insert(r.id);
    }
    // Chunks pending for a running import are its own business; those an
    // unfinished copy brought wait for it to resume (for a while).
    catalog::for_each_kept_chunk(tx, catalog::now() - COPY_GRACE_SECS, |id| keep.insert(id))?;
    let mut candidates = Vec::new();
    let mut all: HashMap<i64, u32> = HashMap::new();
    catalog::for_each_chunk(tx, |id, frame| {
        *all.entry(frame).or_default() += 1;
        if !keep.contains(id) {
            candidates.push((id, frame));
        }
    })?;
    let frame_chunks = candidates.iter().map(|&(_, f)| (f, all[&f])).collect();
    Ok(Marked {
        images,
        max_id,
        candidates,
        frame_chunks,
        dups,
        remap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(id: i64, state: PackState, size: u64) -> PackRow {
        PackRow {
            id,
            name: format!("{id:032x}"),
            state,
            size,
        }
    }

    /// Candidates `(chunk, frame)`, each frame holding `per_frame` chunks.
    fn marked(candidates: Vec<(i64, i64)>, per_frame: &[(i64, u32)]) -> Marked {
        Marked {
            images: HashSet::new(),
            max_id: 100,
            frame_chunks: per_frame.iter().copied().collect(),
            candidates,
            dups: HashMap::from([(3, 1)]),
            remap: Vec::new(),
        }
    }

    #[test]
    fn the_plan_sorts_packs_by_what_the_sweep_leaves() {
        use PackState::{Pending, Sealed};
        let packs = [
            pack(1, Sealed, 1016), // frames 10 (dead) and 11 (dead): goes
            pack(2, Sealed, 1016), // frame 20 (600 live), 21 (dead): partly live
            pack(3, Sealed, 1016), // frame 30 (100 live), 31 (dead): repacked
            pack(4, Pending, 0),   // frame 40: a running import's, untouched
        ];
        let frames = HashMap::from([
            (1, vec![(10, 500), (11, 500)]),
            (2, vec![(20, 600), (21, 400)]),
            (3, vec![(30, 100), (31, 900)]),
            (4, vec![(40, 50)]),
        ]);
        // frame 20 keeps one of its two chunks; 40's chunk is a candidate
        // but its pack is pending
        let m = marked(
            vec![(1, 10), (2, 11), (3, 20), (4, 21), (5, 31), (6, 40)],
            &[(10, 1), (11, 1), (20, 2), (21, 1), (31, 1), (40, 1)],
        );
        let mut dead = dead_frames(&m, &packs, &frames);
        dead.sort();
        assert_eq!(dead, vec![10, 11, 21, 31]);
        assert_eq!(m.merged(|_| false), 1);
        assert_eq!(m.merged(|id| id == 3), 0);
        let mut rep = GcReport::default();
        let dead: HashSet<i64> = dead.into_iter().collect();
        let (sparse, freed) = sort_packs(&packs, &frames, &dead, &mut rep);
        assert_eq!(sparse, vec![(3, packs[2].name.clone())]);
        assert_eq!(freed, 1016 - 16 - 100);
        assert_eq!(rep.packs_removed, 1);
        assert_eq!(rep.bytes_freed, 1016);
        assert_eq!(rep.packs_repacked, 1);
        assert_eq!(rep.bytes_in_partly_live_packs, 1016 - 16 - 600);
    }

    #[test]
    fn id_sets_ignore_ids_past_their_maximum() {
        let mut s = IdSet::new(70);
        s.insert(0);
        s.insert(70);
        s.insert(1 << 20);
        assert!(s.contains(0) && s.contains(70));
        assert!(!s.contains(1) && !s.contains(1 << 20));
    }
}
