//! gc's repack: the live frames of packs less than half live are copied,
//! compressed bytes as they are, into new packs ([`repack`]); what a gc
//! killed while repacking left is removed by the next ([`drop_leftovers`]).

use crate::catalog;
use crate::error::Result;
use crate::image::reap::drop_pending_packs;
use crate::repo::Repo;
use crate::store::{remove_pack, PackReader, PackRotator, Sealed};

/// Copies the live frames of `packs` (row id, name) into new packs, then
/// points the frames there and drops the old packs. Only gc moves or
/// deletes frames of sealed packs, and one gc runs at a time, so the
/// copying needs no catalog lock; the switch is one short write
/// transaction. New packs are registered (pending, no image) before their
/// objects exist; a gc killed meanwhile leaves them to the next gc.
pub(super) fn repack(repo: &Repo, packs: &[(i64, String)]) -> Result<()> {
    if packs.is_empty() {
        return Ok(());
    }
    let conn = &repo.conn;
    let mut moves: Vec<(i64, i64, u64)> = Vec::new(); // frame, new pack row, offset
    let mut sealed: Vec<(i64, u64)> = Vec::new(); // new pack row, size
    let mut out = PackRotator::new(
        repo.store(),
        Box::new(|name: &str| catalog::insert_repack_pack(conn, name)),
    );
    let mut note_sealed = |s: Option<Sealed<i64>>| sealed.extend(s.map(|s| (s.pack, s.size)));
    for (pid, name) in packs {
        let reader = PackReader::open(repo.store(), name)?;
        for f in catalog::frames_of_pack(conn, *pid)? {
            // The new index names the chunks the catalog knows in the
            // frame (others' slots are unused).
            let hashes = catalog::slot_hashes(conn, f.id, f.nchunks)?;
            let placed = out.append(&reader.frame_bytes(f.offset, f.clen)?, &hashes)?;
            moves.push((f.id, placed.pack, placed.offset));
            note_sealed(placed.sealed);
        }
    }
    note_sealed(out.finish()?);
    let old: Vec<i64> = packs.iter().map(|(pid, _)| *pid).collect();
    catalog::switch_repacked(conn, &moves, &sealed, &old)?;
    for (_, name) in packs {
        remove_pack(repo.store(), name)?;
    }
    Ok(())
}

/// Removes the pending packs of a gc that was killed while repacking.
pub(super) fn drop_leftovers(repo: &Repo) -> Result<()> {
    let names = catalog::write(&repo.conn, |tx| drop_pending_packs(tx, None))?;
    for n in &names {
        remove_pack(repo.store(), n)?;
    }
    Ok(())
}
