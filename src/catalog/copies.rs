//! The catalog's side of copying an image into another depot: the rows a
//! copy writes in the source (its `image_copies` record) and in the target
//! (lineage, the frames and chunks that arrive, the packs they are in).
//!
//! Main items: [`record_copy`] (the source remembers the copy),
//! [`set_copied_from`] (the target's image names its origin),
//! [`CopyInserter`] (a sealed pack's frames and the chunks a copy brought,
//! named in `copy_chunks` so that gc keeps them until the image holds
//! them), [`seal_copied_pack`] (that pack made part of the store) and
//! [`delete_copy_chunks`] (the image holds them now).

use rusqlite::{params, CachedStatement, Connection};

use super::chunks::RowInserter;
use super::{now, write};
use crate::error::Result;
use crate::ids::{ChunkHash, ChunkId, ImageId};

/// Records in the source depot that `image` was copied to the depot at
/// `depot` as its image `copy` (one write transaction).
pub fn record_copy(conn: &Connection, image: &ImageId, depot: &str, copy: &ImageId) -> Result<()> {
    write(conn, |tx| {
        tx.execute(
            "INSERT INTO image_copies (image, depot, copy_id, copied_at) VALUES (?1, ?2, ?3, ?4)",
            params![image.as_str(), depot, copy.as_str(), now()],
        )?;
        Ok(())
    })
}

/// Records in the target depot where its image `id` was copied from:
/// `origin` is `"<depot directory> <img-id>"` (one write transaction).
pub fn set_copied_from(conn: &Connection, id: &ImageId, origin: &str) -> Result<()> {
    write(conn, |tx| {
        tx.execute(
            "UPDATE images SET copied_from = ?2 WHERE id = ?1",
            params![id.as_str(), origin],
        )?;
        Ok(())
    })
}

/// Inserts the frames of a sealed pack and the chunks a copy brought, in
/// the caller's write transaction, each statement prepared once: every
/// chunk is entered committed and named in `copy_chunks` under the copy's
/// job (so that a copy killed later resumes without sending it again).
pub struct CopyInserter<'c> {
    rows: RowInserter<'c>,
    mark: CachedStatement<'c>,
    job: &'c str,
    at: i64,
}

impl<'c> CopyInserter<'c> {
    /// Prepares the inserts on `tx` (a write transaction) for the copy
    /// `job` (`"<source depot> <img-id>"`).
    pub fn new(tx: &'c Connection, job: &'c str) -> Result<CopyInserter<'c>> {
        Ok(CopyInserter {
            rows: RowInserter::new(tx)?,
            mark: tx.prepare_cached(
                "INSERT OR REPLACE INTO copy_chunks (id, job, at) VALUES (?1, ?2, ?3)",
            )?,
            job,
            at: now(),
        })
    }

    /// Enters a frame of `nchunks` chunks, `clen` bytes at `offset` in pack
    /// `pack`; returns its id.
    pub fn frame(&mut self, pack: i64, offset: u64, clen: u64, nchunks: usize) -> Result<i64> {
        self.rows.frame(pack, offset, clen, nchunks)
    }

    /// Enters the chunk `hash` at `slot` of frame `frame`, named as this
    /// copy's; returns its id.
    pub fn chunk(&mut self, hash: &ChunkHash, frame: i64, slot: usize) -> Result<ChunkId> {
        let id = self.rows.chunk(hash, frame, slot)?;
        self.mark.execute(params![id, self.job, self.at])?;
        Ok(id)
    }
}

/// Makes the copy's pending pack `pack` sealed, `size` bytes, and no
/// longer the copy's (in the caller's write transaction).
pub fn seal_copied_pack(tx: &Connection, pack: i64, size: u64) -> Result<()> {
    tx.execute(
        "UPDATE packs SET state = 'sealed', image = NULL, size = ?2 WHERE id = ?1",
        params![pack, size as i64],
    )?;
    Ok(())
}

/// The chunk ids the copy `job` brought so far (of a partial image: what
/// its instances' reads fetched), sorted.
pub fn copy_chunk_ids(conn: &Connection, job: &str) -> Result<Vec<i64>> {
    let mut st = conn.prepare("SELECT id FROM copy_chunks WHERE job = ?1 ORDER BY id")?;
    let ids = st.query_map([job], |r| r.get(0))?;
    Ok(ids.collect::<rusqlite::Result<Vec<i64>>>()?)
}

/// Forgets the chunks the copy `job` brought (in the caller's write
/// transaction, the one that gives them to the copied image).
pub fn delete_copy_chunks(tx: &Connection, job: &str) -> Result<()> {
    tx.execute("DELETE FROM copy_chunks WHERE job = ?1", [job])?;
    Ok(())
}
