//! fsck: the structure of the catalog and the store, and launch bases.
//!
//! [`fsck_snapshot`] checks, in the caller's read snapshot, the pack rows
//! against the store's objects, frames against their packs, chunks against
//! their frames, images against their chunks and manifests, and sealed
//! packs against their indexes; [`settle_missing`] then tells a pack gc
//! retired since the snapshot from one that is lost.

use std::collections::{HashMap, HashSet};

use super::{list_packs, FsckReport};
use crate::catalog::{self, FrameCheck, ImageRow, ImageState, PackRow, PackState};
use crate::error::Result;
use crate::format::{self, PackHeader, CHUNK};
use crate::ids::ImageId;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{is_not_found, read_index, ObjectInfo, ObjectKind, ObjectStore, PackReader};

/// Checks the catalog and the store; with `full_bases`, every launch base
/// is read back in full and its digest compared (otherwise bases get the
/// launch's cheap check: record, size, sampled blocks).
pub(crate) fn fsck(repo: &Repo, full_bases: bool, progress: &dyn Progress) -> Result<FsckReport> {
    let (mut rep, missing) = catalog::read(&repo.conn, |_| fsck_snapshot(repo))?;
    settle_missing(repo, &mut rep, missing)?;
    check_bases(repo, &mut rep, full_bases, progress)?;
    Ok(rep)
}

/// Packs whose object was missing when fsck looked: (name, problem).
pub(super) type MissingPacks = Vec<(String, String)>;

/// Whether the catalog (now, not in an earlier snapshot) has a sealed
/// pack of this name.
pub(super) fn pack_live(repo: &Repo, name: &str) -> Result<bool> {
    catalog::pack_is_sealed(&repo.conn, name)
}

/// A pack seen in a snapshot whose object is gone is damage only if the
/// catalog still has it now: gc deletes a pack after committing its removal
/// (deleted or repacked), which may be after the snapshot was taken.
/// Returns the packs found retired.
pub(super) fn settle_missing(
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
    let images: HashMap<String, ImageRow> = catalog::list_images(&repo.conn)?
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
            .filter(|r| r.damage.is_none() && r.state == Some(ImageState::Available));
        if let Some(why) = crate::image::bases::base_problem(repo, &id, img, full, progress)? {
            rep.problems.push(why);
        }
    }
    Ok(())
}

/// The structural checks, in the caller's read snapshot; packs whose
/// object was missing are returned for [`settle_missing`].
pub(super) fn fsck_snapshot(repo: &Repo) -> Result<(FsckReport, MissingPacks)> {
    let mut rep = FsckReport::default();
    let mut missing = MissingPacks::new();
    let conn = &repo.conn;
    let ok = catalog::integrity::quick_check(conn)?;
    if ok != "ok" {
        rep.problems
            .push(format!("catalog: SQLite quick_check says {ok}"));
    }
    let packs = pack_rows(repo, &mut rep)?;
    let (objects, orphan_indexes) = list_packs(repo.store())?;
    let pack_len = check_packs(repo, &packs, &objects, &mut rep, &mut missing)?;
    let frames = check_frames(conn, &pack_len, &mut rep)?;
    let chunk_ids = check_chunks(conn, &frames, &mut rep)?;
    for row in catalog::list_images(conn)? {
        check_image(repo, &row, &chunk_ids, &mut rep);
    }
    check_indexes(repo.store(), &packs, &mut rep);
    for p in crate::repo::manifest::orphans(conn, repo.root())? {
        rep.garbage.push(format!(
            "{}: manifest of an image the catalog does not have",
            p.display()
        ));
    }
    for name in orphan_indexes {
        rep.garbage.push(format!(
            "{}: index of a pack that is gone",
            repo.store().label(ObjectKind::PackIndex, &name)
        ));
    }
    Ok((rep, missing))
}

/// The pack rows that are sound; the others are problems.
fn pack_rows(repo: &Repo, rep: &mut FsckReport) -> Result<Vec<PackRow>> {
    let mut packs = Vec::new();
    for r in catalog::pack_rows(&repo.conn)? {
        match r {
            Ok(p) => packs.push(p),
            Err(problem) => rep.problems.push(problem),
        }
    }
    Ok(packs)
}

/// Pending packs whose writer (an import, or gc repacking) is alive.
fn alive_pending(repo: &Repo) -> Result<HashSet<String>> {
    let mut alive = HashSet::new();
    for (name, writer) in catalog::pending_packs(&repo.conn)? {
        let writer_alive = match writer.as_deref() {
            Some(i) => ImageId::parse(i).is_some_and(|i| repo.import_alive(&i)),
            None => repo.gc_running(), // gc repacking
        };
        if writer_alive {
            alive.insert(name);
        }
    }
    Ok(alive)
}

/// Each pack row against the store: a pending one whose writer died is
/// garbage, a sealed one must be there, complete, with a sound header.
/// Objects no row names are garbage. Returns the sealed packs' sizes.
fn check_packs(
    repo: &Repo,
    packs: &[PackRow],
    objects: &[ObjectInfo],
    rep: &mut FsckReport,
    missing: &mut MissingPacks,
) -> Result<HashMap<i64, u64>> {
    let store = repo.store();
    let alive = alive_pending(repo)?;
    let mut pack_len = HashMap::new();
    for p in packs {
        rep.packs += 1;
        match p.state {
            PackState::Pending if !alive.contains(&p.name) => rep.garbage.push(format!(
                "pack {}: left pending by an import or gc that died",
                p.name
            )),
            PackState::Pending => {}
            PackState::Sealed => match check_sealed(store, p) {
                SealedCheck::Sound(len) => {
                    pack_len.insert(p.id, len);
                }
                SealedCheck::Missing(problem) => missing.push((p.name.clone(), problem)),
                SealedCheck::Damaged(problem) => rep.problems.push(problem),
            },
        }
    }
    let known: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    for o in objects.iter().filter(|o| !known.contains(o.name.as_str())) {
        rep.garbage.push(format!(
            "{}: pack file unknown to the catalog",
            store.label(ObjectKind::Pack, &o.name)
        ));
    }
    Ok(pack_len)
}

/// What the store has of a sealed pack.
enum SealedCheck {
    /// There, at least as long as the catalog says, its header sound: its
    /// length.
    Sound(u64),
    /// Not there (damage, unless gc retired it since the snapshot).
    Missing(String),
    /// There but short, unreadable or not a pack.
    Damaged(String),
}

fn check_sealed(store: &dyn ObjectStore, p: &PackRow) -> SealedCheck {
    let name = &p.name;
    let gone = || {
        let label = store.label(ObjectKind::Pack, name);
        SealedCheck::Missing(format!("pack {name}: file {label} is missing"))
    };
    let len = match store.stat(ObjectKind::Pack, name) {
        Ok(None) => return gone(),
        Err(e) => return SealedCheck::Damaged(format!("pack {name}: {e}")),
        Ok(Some(len)) => len,
    };
    if len < p.size {
        return SealedCheck::Damaged(format!(
            "pack {name}: file is {len} bytes, the catalog expects {}",
            p.size
        ));
    }
    match PackReader::open(store, name) {
        Err(e) if is_not_found(&e) => gone(),
        Err(e) => SealedCheck::Damaged(format!("pack {name}: {e}")),
        Ok(_) => SealedCheck::Sound(len),
    }
}

/// Each frame against its pack; returns every frame's chunk count.
fn check_frames(
    conn: &rusqlite::Connection,
    pack_len: &HashMap<i64, u64>,
    rep: &mut FsckReport,
) -> Result<HashMap<i64, u32>> {
    let mut frames = HashMap::new();
    for f in catalog::frames_with_pack_state(conn)? {
        frames.insert(f.id, f.nchunks as u32);
        match f.pack_state {
            None => rep
                .problems
                .push(format!("frame {}: its pack {} is missing", f.id, f.pack)),
            Some(Some(PackState::Sealed)) => rep.problems.extend(frame_outside(&f, pack_len)),
            Some(_) => {} // a running import's (or a dead one's: see packs)
        }
    }
    Ok(frames)
}

/// The problem of a frame of a sealed pack whose bytes lie outside it.
fn frame_outside(f: &FrameCheck, pack_len: &HashMap<i64, u64>) -> Option<String> {
    let &len = pack_len.get(&f.pack)?;
    let end = f.offset + f.clen;
    (end as u64 > len || f.offset < PackHeader::SIZE as i64).then(|| {
        format!(
            "frame {}: bytes {}..{end} lie outside its pack ({len} bytes)",
            f.id, f.offset
        )
    })
}

/// Each chunk against its frame; returns every chunk id.
fn check_chunks(
    conn: &rusqlite::Connection,
    frames: &HashMap<i64, u32>,
    rep: &mut FsckReport,
) -> Result<HashSet<i64>> {
    let mut chunk_ids = HashSet::new();
    catalog::for_each_chunk_slot(conn, |id, frame, slot| {
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
    })?;
    Ok(chunk_ids)
}

/// An image row: damage, a dead import, its map against the chunks, its
/// manifest.
fn check_image(repo: &Repo, row: &ImageRow, chunk_ids: &HashSet<i64>, rep: &mut FsckReport) {
    let who = format!("image {} ({})", row.name, row.id);
    if let Some(d) = &row.damage {
        rep.images += 1;
        rep.problems.push(format!("{who}: {d}"));
        return;
    }
    if row.state == Some(ImageState::Importing) {
        if !repo.import_alive(&row.id) {
            rep.garbage.push(format!("{who}: import died"));
        }
        return;
    }
    if row.state == Some(ImageState::Partial) {
        // Its content is at its remote; the chunks fetched so far are
        // checked with the store's.
        rep.images += 1;
        match catalog::partial::partial(&repo.conn, row.id.as_str()) {
            Ok(Some(p)) if crate::format::decode_manifest(&p.manifest).is_ok() => {}
            Ok(Some(_)) => rep.problems.push(format!(
                "{who}: partial, but the manifest it runs from cannot be decoded: delete it"
            )),
            Ok(None) => rep.problems.push(format!(
                "{who}: partial, but its remote and manifest are not recorded: delete it"
            )),
            Err(e) => rep.problems.push(format!("{who}: {e}")),
        }
        return;
    }
    rep.images += 1;
    match catalog::image_map(&repo.conn, &row.id) {
        Err(e) => rep.problems.push(format!("{who}: {e}")),
        Ok(map) => {
            if map.nblocks != format::blocks_for(row.virtual_size) {
                rep.problems.push(format!(
                    "{who}: map has {} blocks for {} bytes",
                    map.nblocks, row.virtual_size
                ));
            }
            if let Some((i, c)) = map.data().find(|(_, c)| !chunk_ids.contains(c)) {
                rep.problems.push(format!(
                    "{who}: chunk {c} at byte offset {} is missing",
                    i * CHUNK
                ));
            }
        }
    }
    if let Some(w) = crate::repo::manifest::check(repo.root(), row) {
        rep.warnings
            .push(format!("{who}: {w} (`vmdepot fsck --repair` writes one)"));
    }
}

/// Sealed packs without a sound index (what a lost catalog could not be
/// rebuilt from quickly).
fn check_indexes(store: &dyn ObjectStore, packs: &[PackRow], rep: &mut FsckReport) {
    for p in packs.iter().filter(|p| p.state == PackState::Sealed) {
        match read_index(store, &p.name) {
            Ok(Some(_)) => {}
            Ok(None) => rep.warnings.push(format!(
                "pack {}: no index file (`vmdepot fsck --repair` writes one)",
                p.name
            )),
            Err(e) => rep
                .warnings
                .push(format!("{e} (`vmdepot fsck --repair` writes a new one)")),
        }
    }
}
