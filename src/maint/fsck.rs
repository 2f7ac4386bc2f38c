//! fsck: the structure of the catalog and the store, and launch bases.

use std::collections::{HashMap, HashSet};

use rusqlite::OptionalExtension;

use super::*;
use crate::catalog;
use crate::error::{Error, Result};
use crate::format::{self, PackHeader, CHUNK};
use crate::ids::ImageId;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{pack_path, PackReader};

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
pub(super) type MissingPacks = Vec<(String, String)>;

/// Whether the catalog (now, not in an earlier snapshot) has a sealed
/// pack of this name.
pub(super) fn pack_live(repo: &Repo, name: &str) -> Result<bool> {
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

pub(super) fn is_not_found(e: &Error) -> bool {
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

pub(super) fn fsck_snapshot(repo: &Repo) -> Result<(FsckReport, MissingPacks)> {
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
