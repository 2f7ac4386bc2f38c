//! Remote depots: images shared through an S3-compatible object store
//! (docs/FORMAT.md, "Remote depots"). A remote has no catalog: it is its
//! objects, packs and pack indexes exactly as a local depot writes them,
//! and image manifests. [`Remote`] is one remote opened over any
//! [`ObjectStore`] (an [`crate::store::S3Store`] in use, a memory store in
//! unit tests); [`RemoteImage`] is one image of its listing (the highest
//! version of its manifest that verifies); [`ChunkMap`] (chunks.rs) says
//! where each chunk the remote holds is, from the pack indexes, which are
//! cached under the local depot because they never change.
//!
//! This layer sits on top of the library (below the CLI only): push and
//! pull use the depot's access rules and the copy machinery of
//! [`crate::lifecycle`].

mod access;
mod chunks;
mod config;
mod fetch;
mod gc;
mod listing;
#[cfg(test)]
mod ops_tests;
mod pull;
mod push;
#[cfg(test)]
mod tests;
mod verify;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use chunks::{ChunkLoc, ChunkMap};
pub use config::{check_remote_name, RemoteInfo, REMOTE_MARKER};
pub use gc::{RemoteGcReport, GC_LOCK, LOCK_FRESH};
pub use pull::PullReport;
pub use push::{grace, PushReport, PushedImage};

use crate::error::{Error, Result};
use crate::format::{self, Manifest};
use crate::ids::ImageId;
use crate::perms::Perms;
use crate::store::{ObjectKind, ObjectStore};

/// One remote depot, opened: its name (as the operator configured it),
/// its objects, and where this host caches its pack indexes.
#[derive(Clone)]
pub struct Remote {
    name: String,
    store: Arc<dyn ObjectStore>,
    cache: PathBuf,
    perms: Perms,
}

/// One image of a remote: its manifest (highest version that verifies)
/// and the names of every version's object.
#[derive(Clone, Debug)]
pub struct RemoteImage {
    /// The manifest the image is read from.
    pub manifest: Manifest,
    /// Object names of all its versions, highest first (the first is
    /// `manifest`'s unless a higher one did not verify).
    pub objects: Vec<String>,
}

/// What [`Remote::images`] found.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The images, by id.
    pub images: BTreeMap<String, RemoteImage>,
    /// One line for each image left out because no version of its
    /// manifest verifies (the object and what is wrong).
    pub damaged: Vec<String>,
}

impl RemoteImage {
    /// The image's id on the remote (its manifest's `id`).
    pub fn id(&self) -> &str {
        &self.manifest.meta.id
    }

    /// The image's name on the remote.
    pub fn name(&self) -> &str {
        &self.manifest.meta.name
    }
}

impl Remote {
    /// A remote called `name` over `store`; pack indexes are cached in
    /// `cache` (created when first needed, with the depot's `perms`).
    pub fn new(name: &str, store: Arc<dyn ObjectStore>, cache: PathBuf, perms: Perms) -> Remote {
        Remote {
            name: name.to_owned(),
            store,
            cache,
            perms,
        }
    }

    /// The remote's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its objects.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where its pack indexes are cached on this host.
    pub fn cache_dir(&self) -> &std::path::Path {
        &self.cache
    }

    /// The object name of version `seq` of image `id`'s manifest.
    pub fn manifest_name(id: &ImageId, seq: u32) -> String {
        format!("{id}.{seq}.manifest")
    }

    /// Every image of the remote, by id: the highest version of each
    /// manifest that decodes and verifies. A version that does not is
    /// skipped (a damaged newer version leaves the older one in force,
    /// as locally); an image none of whose versions verifies is left out
    /// and named in [`Listing::damaged`], so that one hostile object
    /// cannot hide the others.
    pub fn images(&self) -> Result<Listing> {
        let mut by_id: BTreeMap<ImageId, Vec<(u32, String)>> = BTreeMap::new();
        for o in self.store.list(ObjectKind::Manifest)? {
            if let Some((id, seq)) = crate::repo::manifest::parse_name(&o.name) {
                by_id.entry(id).or_default().push((seq, o.name));
            }
        }
        let mut out = Listing::default();
        for (id, mut versions) in by_id {
            versions.sort_unstable_by_key(|v| std::cmp::Reverse(v.0));
            match self.read_versions(&id, &versions)? {
                Ok(img) => {
                    out.images.insert(id.to_string(), img);
                }
                Err(e) => out.damaged.push(e.to_string()),
            }
        }
        Ok(out)
    }

    /// The image's highest version that verifies (the inner error: none
    /// does); a version gone since the listing (deleted meanwhile) is
    /// skipped. The outer error: the remote failed.
    fn read_versions(
        &self,
        id: &ImageId,
        versions: &[(u32, String)],
    ) -> Result<std::result::Result<RemoteImage, Error>> {
        let objects: Vec<String> = versions.iter().map(|v| v.1.clone()).collect();
        let mut last_err = None;
        for (seq, name) in versions {
            let Some(bytes) = self.store.get(ObjectKind::Manifest, name)? else {
                continue;
            };
            match self.check_manifest(id, *seq, name, &bytes) {
                Ok(manifest) => return Ok(Ok(RemoteImage { manifest, objects })),
                Err(e) => last_err = Some(e),
            }
        }
        Ok(Err(last_err.unwrap_or_else(|| self.not_found(id.as_str()))))
    }

    /// Decodes a manifest object and checks it is the one its name says.
    fn check_manifest(&self, id: &ImageId, seq: u32, name: &str, bytes: &[u8]) -> Result<Manifest> {
        let label = self.store.label(ObjectKind::Manifest, name);
        let damaged = |what: &str| {
            Error::StoreDamaged(format!(
                "remote {}: {label}: {what}; `vmdepot image delete {}:{id}` deletes the image (every version of its manifest)",
                self.name, self.name
            ))
        };
        let m = format::decode_manifest(bytes).map_err(|e| damaged(&e.to_string()))?;
        if m.seq != seq || m.meta.id != id.as_str() {
            return Err(damaged(&format!(
                "it says it is version {} of {:?}, its name says version {seq} of {id}",
                m.seq, m.meta.id
            )));
        }
        Ok(m)
    }

    /// The error for an image `reference` that is not on the remote (or
    /// not seen by the account).
    pub(crate) fn not_found(&self, reference: &str) -> Error {
        Error::RemoteImageNotFound {
            remote: self.name.clone(),
            image: reference.to_owned(),
        }
    }

    /// The error for a damaged remote object.
    pub(crate) fn damaged(&self, label: &str, what: &str) -> Error {
        Error::StoreDamaged(format!(
            "remote {}: {label}: {what}; `vmdepot image verify {}:IMAGE` checks an image, `vmdepot gc --remote {}` removes what no image needs",
            self.name, self.name, self.name
        ))
    }
}
