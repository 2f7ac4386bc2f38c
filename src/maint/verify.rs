//! Whole-store verify: every frame re-read and every chunk re-hashed.

use std::collections::HashMap;

use super::fsck::{fsck_snapshot, is_not_found, pack_live, settle_missing};
use crate::error::{Error, Result};
use crate::format::{CHUNK, CHUNK_SIZE};
use crate::ids::ChunkHash;
pub use crate::image::export::VerifyReport;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{pack_path, PackReader};

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
