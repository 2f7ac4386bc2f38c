//! The statements of gc: the mark's reads (every chunk, the duplicates,
//! what running imports and unfinished copies keep), the sweep's deletes
//! (chunks, frames, packs left without frames, rows of images that are
//! gone) and the repack's pack rows. gc decides; these only read and write
//! rows.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use crate::error::Result;

/// The highest chunk id in use.
pub fn max_chunk_id(conn: &Connection) -> Result<i64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(id), 0) FROM chunks", [], |r| r.get(0))?)
}

/// Calls `f(chunk, frame)` for every chunk.
pub fn for_each_chunk(conn: &Connection, mut f: impl FnMut(i64, i64)) -> Result<()> {
    let mut st = conn.prepare("SELECT id, frame FROM chunks")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        f(r.get(0)?, r.get(1)?);
    }
    Ok(())
}

/// Calls `f(chunk)` for the chunks no image holds that must stay: those
/// pending for a running import, those an unfinished copy brought after
/// `copy_cutoff` (unix seconds), and those fetched for a partial image
/// (`catalog::partial`), whatever their age.
pub fn for_each_kept_chunk(
    conn: &Connection,
    copy_cutoff: i64,
    mut f: impl FnMut(i64),
) -> Result<()> {
    let mut st = conn.prepare(
        "SELECT id FROM pending_chunks UNION ALL SELECT id FROM copy_chunks
          WHERE at > ?1 OR job IN (SELECT copied_from FROM images WHERE state = 'partial')",
    )?;
    let mut rows = st.query([copy_cutoff])?;
    while let Some(r) = rows.next()? {
        f(r.get(0)?);
    }
    Ok(())
}

/// Committed chunks whose content another committed chunk holds too:
/// duplicate id -> the (lowest) id kept. Found through the `hkey` index.
pub fn duplicate_chunks(conn: &Connection) -> Result<HashMap<i64, i64>> {
    let mut out = HashMap::new();
    let keys: Vec<i64> = {
        let mut st = conn.prepare("SELECT hkey FROM chunks GROUP BY hkey HAVING COUNT(*) > 1")?;
        let rows = st.query_map([], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let mut st = conn.prepare(
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

/// Calls `f(frame, pack, clen)` for every frame.
pub fn for_each_frame(conn: &Connection, mut f: impl FnMut(i64, i64, u64)) -> Result<()> {
    let mut st = conn.prepare("SELECT id, pack, clen FROM frames")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        f(r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64);
    }
    Ok(())
}

/// Deletes chunks by id (in the caller's write transaction).
pub fn delete_chunks(tx: &Connection, ids: &[i64]) -> Result<()> {
    let mut del = tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?;
    for id in ids {
        del.execute([id])?;
    }
    Ok(())
}

/// Deletes the frames of sealed packs among `ids` (in the caller's write
/// transaction); returns how many went.
pub fn delete_sealed_frames(tx: &Connection, ids: &[i64]) -> Result<u64> {
    let mut del = tx.prepare_cached(
        "DELETE FROM frames WHERE id = ?1
             AND pack IN (SELECT id FROM packs WHERE state = 'sealed')",
    )?;
    let mut n = 0;
    for id in ids {
        n += del.execute([id])? as u64;
    }
    Ok(n)
}

/// Deletes the sealed packs left without frames (in the caller's write
/// transaction); returns their names and sizes.
pub fn delete_empty_packs(tx: &Connection) -> Result<Vec<(String, i64)>> {
    let dead: Vec<(String, i64)> = {
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
    Ok(dead)
}

/// Deletes what refers to nothing any more (in the caller's write
/// transaction): chunks remembered for a copy that are gone or older than
/// `copy_cutoff`, and the remembered input files, tags and shares of
/// images that are gone.
pub fn delete_unreferenced(tx: &Connection, copy_cutoff: i64) -> Result<()> {
    tx.execute(
        "DELETE FROM copy_chunks WHERE id NOT IN (SELECT id FROM chunks)
             OR (at <= ?1 AND job NOT IN (SELECT copied_from FROM images WHERE state = 'partial'))",
        [copy_cutoff],
    )?;
    for t in ["source_files", "image_tags", "image_shares"] {
        tx.execute(
            &format!("DELETE FROM {t} WHERE image NOT IN (SELECT id FROM images)"),
            [],
        )?;
    }
    Ok(())
}

/// Registers a pack gc's repack is about to write: pending, of no image.
pub fn insert_repack_pack(conn: &Connection, name: &str) -> Result<i64> {
    super::write(conn, |c| {
        c.execute(
            "INSERT INTO packs (name, state) VALUES (?1, 'pending')",
            [name],
        )?;
        Ok(c.last_insert_rowid())
    })
}

/// One transaction: repacked frames point at their new packs
/// (`moves`: frame, new pack, offset), the new packs are sealed
/// (`sealed`: pack, size), the old packs' rows go.
pub fn switch_repacked(
    conn: &Connection,
    moves: &[(i64, i64, u64)],
    sealed: &[(i64, u64)],
    old: &[i64],
) -> Result<()> {
    super::write(conn, |tx| {
        let mut mv = tx.prepare_cached("UPDATE frames SET pack = ?2, offset = ?3 WHERE id = ?1")?;
        for (fid, pack, off) in moves {
            mv.execute(params![fid, pack, *off as i64])?;
        }
        let mut seal =
            tx.prepare_cached("UPDATE packs SET state = 'sealed', size = ?2 WHERE id = ?1")?;
        for (id, size) in sealed {
            seal.execute(params![id, *size as i64])?;
        }
        let mut del = tx.prepare_cached("DELETE FROM packs WHERE id = ?1")?;
        for pid in old {
            del.execute([pid])?;
        }
        Ok(())
    })
}
