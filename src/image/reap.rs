//! What a killed or failed import leaves behind, and its clean-up: the
//! import's pending packs, chunks and frames, its `importing` row, its
//! temporary file and its lock file. An import cleans up after itself
//! (`drop_import_leftovers`); gc and the next import under the same name
//! reap imports whose process died (`reap_abandoned`).

use std::path::Path;

use tracing::instrument;

use crate::catalog::{self, ImageState};
use crate::error::{Error, Result};
use crate::ids::ImageId;
use crate::repo::Repo;

/// Removes what a dead import left: its pending packs and, when
/// `remove_row`, its image row, temp file and lock file.
#[instrument(skip_all, err(level = "debug"), fields(image = %id))]
pub(crate) fn drop_import_leftovers(repo: &Repo, id: &ImageId, remove_row: bool) -> Result<()> {
    let names = match forget_import(repo, id, remove_row) {
        Ok(names) => names,
        Err(Error::NoSpace { .. }) => {
            // A full disk: SQLite needs room to write. The import's pending
            // packs are read by nobody; delete their files and try again.
            for n in catalog::pending_pack_names(&repo.conn, Some(id.as_str()))? {
                crate::store::remove_pack(repo.store(), &n)?;
            }
            remove_if_exists(&repo.tmp_path(id))?;
            forget_import(repo, id, remove_row)?
        }
        Err(e) => return Err(e),
    };
    // Only files whose rows this transaction removed: never a pack that an
    // import committed meanwhile.
    for n in &names {
        crate::store::remove_pack(repo.store(), n)?;
    }
    if remove_row {
        remove_if_exists(&repo.tmp_path(id))?;
        remove_if_exists(&repo.lock_path(id))?;
    }
    Ok(())
}

/// Removes a writer's pending packs and their frames (in the caller's
/// write transaction); returns the names of the pack files to delete.
pub(crate) fn drop_pending_packs(
    tx: &rusqlite::Connection,
    writer: Option<&str>,
) -> Result<Vec<String>> {
    let names = catalog::pending_pack_names(tx, writer)?;
    catalog::delete_pending_packs(tx, writer)?;
    Ok(names)
}

/// One transaction: the import's pending chunks, frames and packs (and its
/// row); returns the names of the packs removed.
fn forget_import(repo: &Repo, id: &ImageId, remove_row: bool) -> Result<Vec<String>> {
    catalog::write(&repo.conn, |tx| {
        catalog::delete_pending_chunks(tx, id)?;
        let names = drop_pending_packs(tx, Some(id.as_str()))?;
        if remove_row {
            catalog::delete_importing_row(tx, id)?;
        }
        Ok(names)
    })
}

/// Removes the file `p`; one that is not there is no error.
pub(crate) fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(p, e)),
        _ => Ok(()),
    }
}

/// Imports whose process died (lock free).
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn abandoned_imports(repo: &Repo) -> Result<Vec<ImageId>> {
    Ok(catalog::list_images(&repo.conn)?
        .into_iter()
        .filter(|r| r.state == Some(ImageState::Importing) && !repo.import_alive(&r.id))
        .map(|r| r.id)
        .collect())
}

/// Cleans up every import whose process died; returns how many.
#[instrument(skip_all, err(level = "debug"))]
pub(crate) fn reap_abandoned(repo: &Repo) -> Result<usize> {
    let dead = abandoned_imports(repo)?;
    for id in &dead {
        drop_import_leftovers(repo, id, true)?;
    }
    Ok(dead.len())
}
