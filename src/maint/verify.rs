//! Whole-store verify: every frame re-read and every chunk re-hashed.

use super::fsck::{fsck_snapshot, pack_live, settle_missing};
use crate::catalog::{self, SealedFrame};
use crate::error::{Error, Result};
use crate::format::{CHUNK, CHUNK_SIZE};
use crate::ids::ChunkHash;
pub use crate::image::export::VerifyReport;
use crate::progress::Progress;
use crate::repo::Repo;
use crate::store::{is_not_found, PackReader, ReaderCache};

/// Re-reads every frame of every sealed pack and checks every chunk's hash;
/// checks every image's map too.
///
/// Everything is read from one snapshot of the catalog, so a concurrent gc
/// cannot make it inconsistent; a pack that gc retires after the snapshot
/// (its object deleted) is skipped once the catalog confirms it is gone.
pub(crate) fn verify_all(repo: &Repo, progress: &dyn Progress) -> Result<VerifyReport> {
    let conn = &repo.conn;
    let ((mut fsck, missing), by_frame, frames) = catalog::read(conn, |c| {
        Ok((
            fsck_snapshot(repo)?,
            catalog::committed_slots(c)?,
            catalog::sealed_frames(c)?,
        ))
    })?;
    let mut retired = settle_missing(repo, &mut fsck, missing)?;
    if let Some(p) = fsck.problems.first() {
        return Err(Error::StoreDamaged(p.clone()));
    }
    let total: u64 = frames.iter().map(|f| f.clen).sum();
    progress.begin("verify", total);
    let mut rep = VerifyReport {
        images: fsck.images,
        ..Default::default()
    };
    let readers = ReaderCache::new(repo.store());
    let mut buf = Vec::new();
    for f in &frames {
        if !retired.contains(&f.pack) {
            let Some(reader) = open(repo, &readers, f)? else {
                // gc deleted or repacked it after the snapshot.
                retired.insert(f.pack.clone());
                progress.advance(f.clen);
                continue;
            };
            reader.read_frame(f.offset, f.clen, f.nchunks as usize, &mut buf)?;
            let slots = by_frame.get(&f.id).map(|v| v.as_slice()).unwrap_or(&[]);
            check_slots(f, &buf, slots)?;
            rep.chunks += slots.len() as u64;
            rep.bytes += slots.len() as u64 * CHUNK;
        }
        progress.advance(f.clen);
    }
    progress.end();
    Ok(rep)
}

/// The reader of a frame's pack; `None` if gc retired the pack since the
/// snapshot (it is gone, and the catalog no longer has it).
fn open<'f>(
    repo: &Repo,
    readers: &ReaderCache<'_, &'f str>,
    f: &'f SealedFrame,
) -> Result<Option<std::sync::Arc<PackReader>>> {
    match readers.get(&f.pack, &f.pack) {
        Ok(r) => Ok(Some(r)),
        Err(e) if is_not_found(&e) && !pack_live(repo, &f.pack)? => Ok(None),
        Err(e) => Err(e),
    }
}

/// Every committed chunk of a decompressed frame against its hash.
fn check_slots(f: &SealedFrame, buf: &[u8], slots: &[(u32, ChunkHash)]) -> Result<()> {
    for (slot, hash) in slots {
        let s = *slot as usize * CHUNK_SIZE;
        if ChunkHash::of(&buf[s..s + CHUNK_SIZE]) != *hash {
            return Err(Error::StoreDamaged(format!(
                "pack {}: frame at offset {}, slot {slot}: content does not match its hash {hash:?}; the images using it cannot be exported (see `vmdepot image verify IMAGE`)",
                f.pack, f.offset
            )));
        }
    }
    Ok(())
}
