//! A new image's row and its undoing, shared by import, capture and copy.
//!
//! `create_image` takes the image's import lock, enters its row as
//! `importing` (hidden from other accounts, and from gc while the lock is
//! held) and hands a `Cleanup` guard to the code that fills it; if that
//! fails, the guard removes the row and whatever was stored for it
//! (`crate::image::reap::drop_import_leftovers`).

use tracing::instrument;

use crate::catalog;
use crate::error::Result;
use crate::ids::ImageId;
use crate::image::import::ImportOptions;
use crate::image::names::{check_name, name_clash};
use crate::image::reap;
use crate::repo::Repo;

/// A new image: its row is entered as `importing`, `fill` must make it
/// available; if `fill` fails, the row and whatever it stored are removed.
#[instrument(skip_all, err(level = "debug"), fields(name = %opts.name))]
pub(crate) fn create_image(
    repo: &Repo,
    owner: &str,
    opts: &ImportOptions,
    format_name: &str,
    fill: impl FnOnce(&Cleanup<'_>) -> Result<()>,
) -> Result<ImageId> {
    check_name(&opts.name)?;
    let id = ImageId::generate();
    let _lock = repo.lock_import(&id)?;
    let mut guard = Cleanup {
        repo,
        id: &id,
        armed: true,
    };
    insert_importing_row(repo, owner, &id, opts, format_name)?;
    fill(&guard)?;
    guard.armed = false;
    drop(guard);
    let _ = std::fs::remove_file(repo.lock_path(&id));
    Ok(id)
}

/// Enters the `importing` row of `id`. A name refused by the unique
/// indexes may belong to an import that was killed: those are reaped once
/// and the insert retried, else the error names the image holding it.
fn insert_importing_row(
    repo: &Repo,
    owner: &str,
    id: &ImageId,
    opts: &ImportOptions,
    format_name: &str,
) -> Result<()> {
    let new = catalog::NewImage {
        id,
        name: &opts.name,
        kind: opts.kind,
        owner,
        description: &opts.description,
        source_format: format_name,
        vendor: &opts.vendor,
        application: &opts.application,
        app_version: &opts.app_version,
        parent: opts
            .parent
            .as_ref()
            .map(|(id, name)| (id.as_str(), name.as_str())),
        source_instance: opts.source_instance.as_deref(),
        restricted_from: &opts.restricted_from,
        tags: &opts.tags,
    };
    if catalog::insert_importing(&repo.conn, &new)? {
        return Ok(());
    }
    if reap::reap_abandoned(repo)? > 0
        && matches!(catalog::insert_importing(&repo.conn, &new), Ok(true))
    {
        return Ok(());
    }
    Err(name_clash(
        &repo.conn,
        owner,
        &opts.name,
        opts.kind.as_str(),
    ))
}

/// Undoes a failed import when dropped armed: its row, its pending chunks
/// and packs, its temporary and lock files.
pub(crate) struct Cleanup<'a> {
    repo: &'a Repo,
    /// The image being filled.
    pub(crate) id: &'a ImageId,
    armed: bool,
}

impl Cleanup<'_> {
    /// Removes what was stored for the image so far (pending chunks,
    /// frames and packs), keeping its row: before an import starts over.
    pub(crate) fn drop_stored(&self) -> Result<()> {
        reap::drop_import_leftovers(self.repo, self.id, false)
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut r = reap::drop_import_leftovers(self.repo, self.id, true);
        if r.is_err() && crate::repo::release_reserve(self.repo.root()) {
            // Out of space: the reserve gives SQLite room to write.
            r = reap::drop_import_leftovers(self.repo, self.id, true);
        }
        if let Err(e) = r {
            tracing::warn!(
                "the failed import {} could not be undone ({}): its catalog row (state importing) and pending packs are left; `vmdepot gc` removes them",
                self.id,
                crate::error::one_line(&e.to_string())
            );
        }
    }
}
