//! The `packs`, `frames` and `chunks` rows as maintenance reads them.
//!
//! Main items: [`PackState`] (a pack row's `state`), [`PackRow`] and
//! [`pack_rows`] (every pack row, checked), [`FrameRow`] and
//! [`frames_of_pack`], [`slot_hashes`] (a frame's slots for a pack index),
//! and the whole-table reads of fsck, verify and stats. The catalog says
//! where chunks are; it never reads a pack.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension};

use super::{check_pack_name, text_lossy};
use crate::error::Result;
use crate::format::{FRAME_CHUNKS, UNUSED_SLOT};
use crate::ids::ChunkHash;

/// The state of a pack row (`packs.state`; the SQL text spells these as
/// literals, which [`PackState::as_str`] gives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackState {
    /// Registered before its object exists, while an import, a copy or
    /// gc's repack writes it (`image` names the import or copy; none for
    /// gc). Its frames are no chunk's home yet.
    Pending,
    /// Durable, with its index, and part of the store.
    Sealed,
}

impl PackState {
    /// The text stored in `packs.state`.
    pub fn as_str(self) -> &'static str {
        match self {
            PackState::Pending => "pending",
            PackState::Sealed => "sealed",
        }
    }

    /// The state stored as `s` (`None`: not a pack state).
    pub fn parse(s: &str) -> Option<PackState> {
        [PackState::Pending, PackState::Sealed]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// One pack row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRow {
    pub id: i64,
    /// 32 lowercase hex digits (checked).
    pub name: String,
    pub state: PackState,
    /// Bytes of the sealed pack (0 while pending).
    pub size: u64,
}

/// Every pack row; a row that breaks the schema's rules is `Err`, the
/// message naming it (fsck reports it, gc refuses to run).
pub fn pack_rows(conn: &Connection) -> Result<Vec<std::result::Result<PackRow, String>>> {
    let mut out = Vec::new();
    let mut st = conn.prepare("SELECT id, name, state, size FROM packs")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let (name, utf8) = text_lossy(r, 1)?;
        let (state, _) = text_lossy(r, 2)?;
        let size = match r.get_ref(3)? {
            rusqlite::types::ValueRef::Integer(v) => v,
            _ => -1,
        };
        if let Err(e) = check_pack_name(id, &name, utf8) {
            out.push(Err(e.to_string()));
            continue;
        }
        match PackState::parse(&state) {
            Some(state) if size >= 0 => out.push(Ok(PackRow {
                id,
                name,
                state,
                size: size as u64,
            })),
            _ => out.push(Err(format!(
                "catalog table packs, row {id}: state {state:?} or size is not valid"
            ))),
        }
    }
    Ok(out)
}

/// The pending packs: name, and the import or copy writing each (`None`:
/// gc's repack).
pub fn pending_packs(conn: &Connection) -> Result<Vec<(String, Option<String>)>> {
    let mut st = conn.prepare("SELECT name, image FROM packs WHERE state = 'pending'")?;
    let rows = st.query_map([], |r| {
        Ok((
            text_lossy(r, 0)?.0,
            r.get::<_, Option<String>>(1).unwrap_or(None),
        ))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether the catalog has a sealed pack of this name.
pub fn pack_is_sealed(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM packs WHERE name = ?1 AND state = 'sealed'",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// The sealed packs: id, name, size.
pub fn sealed_packs(conn: &Connection) -> Result<Vec<(i64, String, i64)>> {
    let mut st = conn.prepare("SELECT id, name, size FROM packs WHERE state = 'sealed'")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Bytes of the sealed packs.
pub fn sealed_pack_bytes(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COALESCE(SUM(size), 0) FROM packs WHERE state = 'sealed'",
        [],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// One frame of a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRow {
    pub id: i64,
    /// Byte offset of the zstd frame in its pack.
    pub offset: u64,
    /// Its compressed length.
    pub clen: u64,
    /// Chunks in the frame, as the row says (clamp before use).
    pub nchunks: i64,
}

/// The frames of a pack, in pack order.
pub fn frames_of_pack(conn: &Connection, pack: i64) -> Result<Vec<FrameRow>> {
    let mut st = conn.prepare_cached(
        "SELECT id, offset, clen, nchunks FROM frames WHERE pack = ?1 ORDER BY offset",
    )?;
    let rows = st.query_map([pack], |r| {
        Ok(FrameRow {
            id: r.get(0)?,
            offset: r.get::<_, i64>(1)? as u64,
            clen: r.get::<_, i64>(2)? as u64,
            nchunks: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The hash of each of a frame's `nchunks` slots, for its pack index:
/// the chunks the catalog knows in it ([`UNUSED_SLOT`] elsewhere).
pub fn slot_hashes(conn: &Connection, frame: i64, nchunks: i64) -> Result<Vec<ChunkHash>> {
    let mut hashes = vec![UNUSED_SLOT; nchunks.clamp(0, FRAME_CHUNKS as i64) as usize];
    let mut st = conn.prepare_cached("SELECT slot, hash FROM chunks WHERE frame = ?1")?;
    let mut rows = st.query([frame])?;
    while let Some(r) = rows.next()? {
        let (slot, h): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
        if let (Some(s), Ok(h)) = (hashes.get_mut(slot as usize), h.try_into()) {
            *s = ChunkHash(h);
        }
    }
    Ok(hashes)
}

/// A frame with the state of its pack, as fsck checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameCheck {
    pub id: i64,
    pub pack: i64,
    pub offset: i64,
    pub clen: i64,
    pub nchunks: i64,
    /// The state of the frame's pack: `None` if its row is missing,
    /// `Some(None)` if the row's state is not a pack state.
    pub pack_state: Option<Option<PackState>>,
}

/// Every frame with its pack's state.
pub fn frames_with_pack_state(conn: &Connection) -> Result<Vec<FrameCheck>> {
    let mut st = conn.prepare("SELECT f.id, f.pack, f.offset, f.clen, f.nchunks, p.state FROM frames f LEFT JOIN packs p ON p.id = f.pack")?;
    let rows = st.query_map([], |r| {
        let state: Option<String> = r.get(5)?;
        Ok(FrameCheck {
            id: r.get(0)?,
            pack: r.get(1)?,
            offset: r.get(2)?,
            clen: r.get(3)?,
            nchunks: r.get(4)?,
            pack_state: state.map(|s| PackState::parse(&s)),
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Calls `f(id, frame, slot)` for every chunk.
pub fn for_each_chunk_slot(conn: &Connection, mut f: impl FnMut(i64, i64, i64)) -> Result<()> {
    let mut st = conn.prepare("SELECT id, frame, slot FROM chunks")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        f(r.get(0)?, r.get(1)?, r.get(2)?);
    }
    Ok(())
}

/// A frame of a sealed pack, for verify.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedFrame {
    pub id: i64,
    /// The pack's name.
    pub pack: String,
    pub offset: u64,
    pub clen: u64,
    pub nchunks: u32,
}

/// Every frame of every sealed pack, pack by pack in pack order.
pub fn sealed_frames(conn: &Connection) -> Result<Vec<SealedFrame>> {
    let mut st = conn.prepare(
        "SELECT f.id, p.name, f.offset, f.clen, f.nchunks FROM frames f JOIN packs p ON p.id = f.pack
             WHERE p.state = 'sealed'
             ORDER BY p.id, f.offset",
    )?;
    let rows = st.query_map([], |r| {
        Ok(SealedFrame {
            id: r.get(0)?,
            pack: r.get(1)?,
            offset: r.get::<_, i64>(2)? as u64,
            clen: r.get::<_, i64>(3)? as u64,
            nchunks: r.get::<_, i64>(4)? as u32,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The committed chunks of each frame: frame -> (slot, hash).
pub fn committed_slots(conn: &Connection) -> Result<HashMap<i64, Vec<(u32, ChunkHash)>>> {
    let mut by_frame: HashMap<i64, Vec<(u32, ChunkHash)>> = HashMap::new();
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
    Ok(by_frame)
}

/// How many committed chunks there are.
pub fn committed_chunk_count(conn: &Connection) -> Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM chunks WHERE id NOT IN (SELECT id FROM pending_chunks)",
        [],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// Each frame's compressed bytes per chunk slot.
pub fn frame_bytes_per_chunk(conn: &Connection) -> Result<HashMap<i64, f64>> {
    let mut st = conn.prepare("SELECT id, clen, nchunks FROM frames")?;
    let rows = st.query_map([], |r| {
        let clen: i64 = r.get(1)?;
        let n: i64 = r.get(2)?;
        Ok((r.get::<_, i64>(0)?, clen as f64 / n.max(1) as f64))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Calls `f(chunk, frame)` for the chunks with ids in `first..=last`.
pub fn for_each_chunk_between(
    conn: &Connection,
    first: i64,
    last: i64,
    mut f: impl FnMut(i64, i64),
) -> Result<()> {
    let mut st = conn.prepare_cached("SELECT id, frame FROM chunks WHERE id BETWEEN ?1 AND ?2")?;
    let mut rows = st.query([first, last])?;
    while let Some(r) = rows.next()? {
        f(r.get(0)?, r.get(1)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_states_are_the_schemas() {
        let schema = crate::catalog::MIGRATIONS[0];
        for s in [PackState::Pending, PackState::Sealed] {
            assert_eq!(PackState::parse(s.as_str()), Some(s));
        }
        assert!(schema.contains("CHECK (state IN ('pending', 'sealed'))"));
        assert_eq!(PackState::parse("open"), None);
    }
}
