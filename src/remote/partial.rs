//! Partial images: `instance run REMOTE:IMAGE` with a lazy disk starts at
//! once from a local image whose content is still at the remote
//! (`catalog::partial`). Its disk server (`image::lazy`) fetches the
//! frames its instances read, entering them in the depot as a pull does
//! (the depot is the cache); a prefetch (`--prefetch`) or an `image pull`
//! fetches the rest and makes it an ordinary pulled image.
//!
//! [`Depot::partial_copy`] finds one, [`Depot::begin_partial`] makes one
//! (the manifest checked as a pull checks it, the image's owner, type,
//! shares and metadata from it), [`Depot::complete_partial`] completes
//! one (one process at a time: its import lock).

use super::pull::{check_pulled, import_options, origin};
use super::{Remote, RemoteImage};
use crate::catalog::{self, partial::PartialRow, ImageState};
use crate::depot::{Depot, ImageInfo};
use crate::error::{Error, Result};
use crate::format;
use crate::ids::ImageId;
use crate::image::create::create_image;
use crate::progress::Progress;

impl Depot {
    /// The partial image run from this remote image, if there is one this
    /// account may launch (the same origin and content digest).
    pub fn partial_copy(&self, remote: &Remote, image: &RemoteImage) -> Result<Option<ImageInfo>> {
        self.copy_of(remote, image, ImageState::Partial)
    }

    /// A new partial image of the remote image `image`: its row (named and
    /// owned as a pull would make it) with no chunk yet; its disk server
    /// fetches what its instances read.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub fn begin_partial(&self, remote: &Remote, image: &RemoteImage) -> Result<ImageInfo> {
        let m = &image.manifest;
        check_pulled(remote, m)?;
        let opts = import_options(m, None)?;
        self.check_local_name(&opts.name)?;
        let row = PartialRow {
            remote: remote.name().to_owned(),
            manifest: format::encode_manifest(m),
            prefetch: false,
        };
        let id = create_image(
            &self.repo,
            &m.meta.owner,
            &opts,
            &m.meta.source_format,
            |guard| {
                let conn = &self.repo.conn;
                catalog::set_copied_from(conn, guard.id, &origin(remote, &m.meta.id))?;
                catalog::write(conn, |tx| {
                    for s in &m.meta.shares {
                        catalog::images::share(tx, guard.id.as_str(), &s.account, s.created_at)?;
                    }
                    Ok(())
                })?;
                let meta = &m.meta;
                catalog::partial::make_partial(
                    conn,
                    guard.id,
                    meta.virtual_size,
                    meta.data_bytes,
                    &meta.content_digest,
                    &row,
                )
            },
        )?;
        self.image(id.as_str())
    }

    /// Asks the disk server of the partial image `id` to fetch the rest of
    /// it in the background (it starts when an instance connects, or at
    /// once if one is connected).
    pub fn prefetch(&self, id: &str) -> Result<()> {
        catalog::partial::set_prefetch(&self.repo.conn, id)
    }

    /// The manifest and remote name of the partial image `id` (`None`: it
    /// is not partial, or no more).
    pub(crate) fn partial_source(&self, id: &str) -> Result<Option<(String, format::Manifest)>> {
        let Some(row) = catalog::partial::partial(&self.repo.conn, id)? else {
            return Ok(None);
        };
        let m = format::decode_manifest(&row.manifest).map_err(|e| {
            Error::StoreDamaged(format!(
                "catalog table partial_images, image {id}: its manifest cannot be decoded: {e}; \
                 delete the image and run it again"
            ))
        })?;
        Ok(Some((row.remote, m)))
    }

    /// Fetches what the partial image `id` still lacks from `remote` and
    /// makes it available (an ordinary pulled image from then on). One
    /// process at a time: another one completing it is an error.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub(crate) fn complete_partial(
        &self,
        remote: &Remote,
        id: &str,
        progress: &dyn Progress,
    ) -> Result<super::PullReport> {
        let image_id = ImageId::parse(id).ok_or_else(|| Error::ImageNotFound(id.to_owned()))?;
        let _lock = self.repo.lock_import(&image_id).map_err(|_| {
            Error::Invalid(format!(
                "image {id} is being fetched by another process (a pull, or its disk server's \
                 prefetch): wait for it"
            ))
        })?;
        let done = || self.image(id);
        let Some((_, m)) = self.partial_source(id)? else {
            // completed meanwhile
            let _ = std::fs::remove_file(self.repo.lock_path(&image_id));
            return Err(Error::ImageNotAvailable {
                image: done()?.name,
                state: "available: already complete".into(),
            });
        };
        let pulled = self.fetch_into(remote, &m, &image_id, progress)?;
        let _ = std::fs::remove_file(self.repo.lock_path(&image_id));
        Ok(pulled.report(remote, done()?))
    }
}
