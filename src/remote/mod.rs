//! Remote depots: images shared through an S3-compatible object store
//! (docs/FORMAT.md, "Remote depots"). A remote has no catalog: it is its
//! objects, packs and pack indexes exactly as a local depot writes them,
//! and image manifests. [`Remote`] is one remote opened over any
//! [`ObjectStore`] (an [`crate::store::S3Store`] in use, a memory store in
//! unit tests); [`Listed`] is one image of its listing (the metadata of
//! the highest version of its manifest that verifies), [`RemoteImage`]
//! one image with its map, loaded for an operation; [`ChunkMap`] (chunks.rs) says
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
pub(crate) mod ondemand;
#[cfg(test)]
mod ops_tests;
mod partial;
mod pull;
mod push;
#[cfg(test)]
mod tests;
mod verify;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) use chunks::{ChunkLoc, ChunkMap};
pub use config::RemoteInfo;
pub use gc::RemoteGcReport;
pub(crate) use gc::GC_LOCK;
pub use pull::PullReport;
pub use push::{grace, PushReport, PushedImage};

use crate::error::{Error, Result};
use crate::format::{self, Manifest, ManifestMeta};
use crate::ids::{ChunkHash, ImageId};
use crate::perms::Perms;
use crate::store::{ObjectKind, ObjectStore};
use listing::Tally;

/// One remote depot, opened: its name (as the operator configured it),
/// its objects, and where this host caches its pack indexes.
#[derive(Clone)]
pub struct Remote {
    name: String,
    store: Arc<dyn ObjectStore>,
    cache: PathBuf,
    perms: Perms,
}

/// One image of a remote, ready for an operation: its manifest (the
/// version in force, map included). [`Remote::find`] gives one.
#[derive(Clone, Debug)]
pub struct RemoteImage {
    /// The manifest the image is read from.
    pub(crate) manifest: Manifest,
}

/// One image of a remote's listing: the metadata of the highest version
/// of its manifest that verifies (its map was checked, not kept).
#[derive(Clone, Debug)]
pub(crate) struct Listed {
    /// The version in force.
    pub seq: u32,
    /// Its metadata.
    pub meta: ManifestMeta,
    /// Its object's name.
    pub object: String,
    /// Object names of all its versions, highest first.
    pub objects: Vec<String>,
}

/// What [`Remote::images`] found.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// The images, by id.
    pub(crate) images: BTreeMap<String, Listed>,
    /// One line for each image left out because no version of its
    /// manifest verifies (the object and what is wrong).
    pub damaged: Vec<String>,
}

impl Listed {
    /// The image's id on the remote.
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// The image's name on the remote.
    pub fn name(&self) -> &str {
        &self.meta.name
    }
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
    pub(crate) fn new(
        name: &str,
        store: Arc<dyn ObjectStore>,
        cache: PathBuf,
        perms: Perms,
    ) -> Remote {
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
    pub(crate) fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object name of version `seq` of image `id`'s manifest.
    pub(crate) fn manifest_name(id: &ImageId, seq: u32) -> String {
        format!("{id}.{seq}.manifest")
    }

    /// Every image of the remote, by id: the highest version of each
    /// manifest that decodes and verifies. A version that does not is
    /// skipped (a damaged newer version leaves the older one in force,
    /// as locally); an image none of whose versions verifies is left out
    /// and named in [`Listing::damaged`], so that one hostile object
    /// cannot hide the others. Maps are checked as they stream by, never
    /// kept: memory is the metadata, whatever the manifests' sizes.
    pub fn images(&self) -> Result<Listing> {
        self.scan(None)
    }

    /// [`Remote::images`], each listed image's distinct chunks counted in
    /// `tally` when given.
    fn scan(&self, mut tally: Option<&mut Tally>) -> Result<Listing> {
        let mut by_id: BTreeMap<ImageId, Vec<(u32, String)>> = BTreeMap::new();
        for o in self.store.list(ObjectKind::Manifest)? {
            if let Some((id, seq)) = crate::repo::manifest::parse_name(&o.name) {
                by_id.entry(id).or_default().push((seq, o.name));
            }
        }
        let mut out = Listing::default();
        for (id, mut versions) in by_id {
            versions.sort_unstable_by_key(|v| std::cmp::Reverse(v.0));
            match self.read_versions(&id, &versions, tally.as_deref_mut())? {
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
        mut tally: Option<&mut Tally>,
    ) -> Result<std::result::Result<Listed, Error>> {
        let objects: Vec<String> = versions.iter().map(|v| v.1.clone()).collect();
        let mut last_err = None;
        for (seq, name) in versions {
            let Some(bytes) = self.store.get(ObjectKind::Manifest, name)? else {
                continue;
            };
            let mut seen = HashSet::new();
            let counting = tally.is_some();
            let checked = self.check_listed(id, *seq, name, &bytes, |h| {
                if counting {
                    seen.insert(h);
                }
            });
            match checked {
                Ok(meta) => {
                    if let Some(t) = tally.as_deref_mut() {
                        t.add(id.as_str(), seen);
                    }
                    let object = name.clone();
                    return Ok(Ok(Listed {
                        seq: *seq,
                        meta,
                        object,
                        objects,
                    }));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Ok(Err(last_err.unwrap_or_else(|| self.not_found(id.as_str()))))
    }

    /// The listed image with its map, for an operation on it: its
    /// manifest read again and decoded (memory: its own map, which its
    /// virtual size bounds). Gone meanwhile: not found.
    pub(crate) fn load(&self, listed: &Listed) -> Result<RemoteImage> {
        let id = ImageId::parse(listed.id())
            .ok_or_else(|| Error::ImageNotFound(format!("{}:{}", self.name, listed.id())))?;
        let Some(bytes) = self.store.get(ObjectKind::Manifest, &listed.object)? else {
            return Err(Error::ImageNotFound(format!("{}:{id}", self.name)));
        };
        let manifest = self.check_manifest(&id, listed.seq, &listed.object, &bytes)?;
        Ok(RemoteImage { manifest })
    }

    /// Decodes a manifest object and checks it is the one its name says.
    fn check_manifest(&self, id: &ImageId, seq: u32, name: &str, bytes: &[u8]) -> Result<Manifest> {
        let label = self.store.label(ObjectKind::Manifest, name);
        let m = format::decode_manifest(bytes)
            .map_err(|e| self.manifest_damaged(&label, id, &e.to_string()))?;
        self.check_identity(&label, id, seq, m.seq, &m.meta)?;
        Ok(m)
    }

    /// [`Remote::check_manifest`] streaming the map through `each` (every
    /// stored block's hash) instead of keeping it.
    fn check_listed(
        &self,
        id: &ImageId,
        seq: u32,
        name: &str,
        bytes: &[u8],
        mut each: impl FnMut(ChunkHash),
    ) -> Result<ManifestMeta> {
        let label = self.store.label(ObjectKind::Manifest, name);
        let (got_seq, meta) = format::visit_manifest(bytes, |_, h| each(h))
            .map_err(|e| self.manifest_damaged(&label, id, &e.to_string()))?;
        self.check_identity(&label, id, seq, got_seq, &meta)?;
        Ok(meta)
    }

    /// Refuses a manifest that is not the version its object name says.
    fn check_identity(
        &self,
        label: &str,
        id: &ImageId,
        seq: u32,
        got_seq: u32,
        meta: &ManifestMeta,
    ) -> Result<()> {
        if got_seq != seq || meta.id != id.as_str() {
            return Err(self.manifest_damaged(
                label,
                id,
                &format!(
                    "it says it is version {got_seq} of {:?}, its name says version {seq} of {id}",
                    meta.id
                ),
            ));
        }
        Ok(())
    }

    /// The error for a damaged manifest of image `id`: deleting the image
    /// (every version of its manifest) is the fix.
    fn manifest_damaged(&self, label: &str, id: &ImageId, what: &str) -> Error {
        Error::StoreDamaged(format!(
            "remote {}: {label}: {what}; `vmdepot image delete {}:{id}` deletes the image (every version of its manifest)",
            self.name, self.name
        ))
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
        self.damaged_of(label, what, "IMAGE")
    }

    /// [`Remote::damaged`] of an object that the remote image `image` (an
    /// id) reads, which the hint names.
    pub(crate) fn damaged_of(&self, label: &str, what: &str, image: &str) -> Error {
        // (an object's label names the remote too)
        let label = label
            .strip_suffix(&format!(" (remote {})", self.name))
            .unwrap_or(label);
        Error::StoreDamaged(format!(
            "remote {}: {label}: {what}; `vmdepot image verify {}:{image}` checks the image, `vmdepot gc --remote {}` removes what no image needs",
            self.name, self.name, self.name
        ))
    }
}
