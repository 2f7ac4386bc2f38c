//! The catalog's side of storing new chunks: frames and chunk rows as an
//! import enters them, pending until its commit.
//!
//! Main items: [`chunk_sequence`] (the highest chunk id ever allocated: ids
//! only grow, so an unchanged sequence means no chunk was entered since),
//! [`ChunkInserter`] (the prepared inserts of one write transaction; its
//! frame and chunk inserts are shared with a copy's),
//! [`chunk_runs_usable`] (the commit's check that every chunk an image uses
//! is still there) and [`delete_pending_marks`] (the commit making pending
//! chunks part of the store).

use rusqlite::{params, CachedStatement, Connection, OptionalExtension};

use super::hkey;
use crate::error::Result;
use crate::ids::{ChunkHash, ChunkId, ImageId};

/// The highest chunk id ever allocated (0 before the first).
pub fn chunk_sequence(conn: &Connection) -> Result<i64> {
    Ok(conn
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'chunks'",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0))
}

/// The frame and chunk inserts of one write transaction, shared by an
/// import's [`ChunkInserter`] and a copy's
/// [`super::copies::CopyInserter`].
pub(super) struct RowInserter<'c> {
    tx: &'c Connection,
    frame: CachedStatement<'c>,
    chunk: CachedStatement<'c>,
}

impl<'c> RowInserter<'c> {
    /// Prepares the inserts on `tx` (a write transaction).
    pub(super) fn new(tx: &'c Connection) -> Result<RowInserter<'c>> {
        Ok(RowInserter {
            tx,
            frame: tx.prepare_cached(
                "INSERT INTO frames (pack, offset, clen, nchunks) VALUES (?1, ?2, ?3, ?4)",
            )?,
            chunk: tx.prepare_cached(
                "INSERT INTO chunks (hkey, hash, frame, slot) VALUES (?1, ?2, ?3, ?4)",
            )?,
        })
    }

    /// Enters a frame; returns its id.
    pub(super) fn frame(
        &mut self,
        pack: i64,
        offset: u64,
        clen: u64,
        nchunks: usize,
    ) -> Result<i64> {
        self.frame
            .execute(params![pack, offset as i64, clen as i64, nchunks as i64])?;
        Ok(self.tx.last_insert_rowid())
    }

    /// Enters a chunk; returns its id.
    pub(super) fn chunk(&mut self, hash: &ChunkHash, frame: i64, slot: usize) -> Result<ChunkId> {
        self.chunk
            .execute(params![hkey(hash), &hash.0[..], frame, slot as i64])?;
        Ok(self.tx.last_insert_rowid())
    }
}

/// Inserts frames, chunks and pending marks in the caller's write
/// transaction, each statement prepared once for the whole batch.
pub struct ChunkInserter<'c> {
    rows: RowInserter<'c>,
    mark: CachedStatement<'c>,
}

impl<'c> ChunkInserter<'c> {
    /// Prepares the inserts on `tx` (a write transaction).
    pub fn new(tx: &'c Connection) -> Result<ChunkInserter<'c>> {
        Ok(ChunkInserter {
            rows: RowInserter::new(tx)?,
            mark: tx.prepare_cached("INSERT INTO pending_chunks (id, import) VALUES (?1, ?2)")?,
        })
    }

    /// Enters a frame of `nchunks` chunks, `clen` bytes at `offset` in pack
    /// `pack`; returns its id.
    pub fn frame(&mut self, pack: i64, offset: u64, clen: u64, nchunks: usize) -> Result<i64> {
        self.rows.frame(pack, offset, clen, nchunks)
    }

    /// Enters the chunk `hash` at `slot` of frame `frame`; returns its id.
    pub fn chunk(&mut self, hash: &ChunkHash, frame: i64, slot: usize) -> Result<ChunkId> {
        self.rows.chunk(hash, frame, slot)
    }

    /// Marks the chunk `id` as pending for the import of `image` (found by
    /// that import only, until its commit).
    pub fn mark_pending(&mut self, id: ChunkId, image: &ImageId) -> Result<()> {
        self.mark.execute(params![id, image.key()])?;
        Ok(())
    }
}

/// Whether every chunk id of the inclusive `runs` still exists and is
/// committed or pending for the import of `image` (a concurrent gc may
/// have collected a reused one). In the commit's write transaction.
pub fn chunk_runs_usable(
    tx: &Connection,
    runs: &[(ChunkId, ChunkId)],
    image: &ImageId,
) -> Result<bool> {
    let mut count = tx.prepare_cached(
        "SELECT COUNT(*) FROM chunks c WHERE c.id BETWEEN ?1 AND ?2 AND NOT EXISTS
             (SELECT 1 FROM pending_chunks p WHERE p.id = c.id AND p.import != ?3)",
    )?;
    for &(a, b) in runs {
        let n: i64 = count.query_row(params![a, b, image.key()], |r| r.get(0))?;
        if n != b - a + 1 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Drops the pending marks of the chunk ids in the inclusive `ranges`:
/// those chunks are part of the store from the commit on. By id ranges:
/// one pass, no set of row ids in memory.
pub fn delete_pending_marks(
    tx: &Connection,
    ranges: impl IntoIterator<Item = (ChunkId, ChunkId)>,
) -> Result<()> {
    let mut done = tx.prepare_cached("DELETE FROM pending_chunks WHERE id BETWEEN ?1 AND ?2")?;
    for (first, last) in ranges {
        done.execute(params![first, last])?;
    }
    Ok(())
}
