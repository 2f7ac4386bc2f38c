//! A remote's images as users see them: [`Remote::list_images`] and
//! [`Remote::show`] give [`ImageInfo`]s with the fields of a local
//! `image list` (state `available`, or `deprecated`; stored sizes from the
//! remote's pack indexes, a chunk's share of its frame's compressed size,
//! as locally); [`Depot::delete_remote_image`] retires every version of
//! an image's manifest (its packs are the remote gc's business).

use std::collections::{HashMap, HashSet};

use super::access::access_of;
use super::{ChunkMap, Listed, Listing, Remote};
use crate::catalog::{self, ImageType};
use crate::depot::access::{Access, Op};
use crate::depot::display::{non_empty, shown_state};
use crate::depot::{Depot, ImageInfo, ImageKind, ImageState, Timestamp};
use crate::error::{Error, Result};
use crate::format::ManifestMeta;
use crate::ids::{ChunkHash, ImageId};
use crate::store::ObjectKind;

/// Per image id: stored bytes no other image of the remote uses, and
/// stored bytes shared with others.
struct Usage(HashMap<String, (u64, u64)>);

/// Counts, image by image as a listing streams their maps, how many
/// images use each chunk and each image's stored bytes: memory is one
/// entry per distinct chunk of the remote, never a map.
pub(crate) struct Tally<'m> {
    /// Where the remote's chunks are (their sizes).
    map: &'m ChunkMap,
    /// Ids of the images counted, in order.
    ids: Vec<String>,
    /// Per image (same order): all its stored bytes.
    total: Vec<f64>,
    /// Per chunk: how many images use it, and the last one counted.
    users: HashMap<ChunkHash, (u32, u32)>,
}

impl<'m> Tally<'m> {
    fn new(map: &'m ChunkMap) -> Tally<'m> {
        Tally {
            map,
            ids: Vec::new(),
            total: Vec::new(),
            users: HashMap::new(),
        }
    }

    /// A chunk's share of its frame's compressed size (0: no pack has it).
    fn size(&self, h: &ChunkHash) -> f64 {
        self.map
            .get(h)
            .map_or(0.0, |loc| loc.clen as f64 / f64::from(loc.nchunks.max(1)))
    }

    /// Counts image `id`, which uses the distinct chunks `chunks`.
    pub(crate) fn add(&mut self, id: &str, chunks: HashSet<ChunkHash>) {
        let me = self.ids.len() as u32;
        let mut total = 0.0;
        for h in chunks {
            total += self.size(&h);
            let u = self.users.entry(h).or_insert((0, me));
            *u = (u.0 + 1, me);
        }
        self.ids.push(id.to_owned());
        self.total.push(total);
    }

    /// Each image's unique and shared stored bytes.
    fn finish(self) -> Usage {
        let mut unique = vec![0f64; self.ids.len()];
        for (h, (n, who)) in &self.users {
            if *n == 1 {
                unique[*who as usize] += self.size(h);
            }
        }
        let out = self
            .ids
            .into_iter()
            .zip(self.total.iter().zip(unique))
            .map(|(id, (t, u))| (id, (u.round() as u64, (t - u).max(0.0).round() as u64)))
            .collect();
        Usage(out)
    }
}

impl Remote {
    /// The listing and every image's stored bytes.
    fn images_with_usage(&self) -> Result<(Listing, Usage)> {
        let map = self.chunk_map()?;
        let mut tally = Tally::new(&map);
        let listing = self.scan(Some(&mut tally))?;
        Ok((listing, tally.finish()))
    }
}

/// A remote image as `account` (related to it by `access`) sees it.
fn info(m: &ManifestMeta, access: Access, usage: &Usage) -> ImageInfo {
    let (unique, shared) = usage.0.get(&m.id).copied().unwrap_or((0, 0));
    let shared_with = if access == Access::Owner {
        m.shares.iter().map(|s| s.account.clone()).collect()
    } else {
        Vec::new()
    };
    ImageInfo {
        id: m.id.clone(),
        name: m.name.clone(),
        kind: if access == Access::Shared {
            Some(ImageKind::Shared)
        } else {
            ImageType::parse(&m.kind).ok().map(ImageKind::from)
        },
        state: shown_state(Some(catalog::ImageState::Available), m.deprecated),
        owner: m.owner.clone(),
        description: non_empty(m.description.clone()),
        source_format: m.source_format.clone(),
        virtual_size: m.virtual_size,
        data_bytes: m.data_bytes,
        content_digest: Some(m.content_digest.clone()).filter(|d| !d.is_empty()),
        created_at: Timestamp::from_unix(m.created_at),
        unique_stored_bytes: unique,
        shared_stored_bytes: shared,
        parent: m.parent.clone(),
        parent_name: non_empty(m.parent_name.clone()),
        source_instance: m.source_instance.clone(),
        copied_from: non_empty(m.copied_from.clone()),
        protected: m.protected,
        deprecated: m.deprecated,
        tags: m.tags.clone(),
        vendor: non_empty(m.vendor.clone()),
        application: non_empty(m.application.clone()),
        app_version: non_empty(m.app_version.clone()),
        shared_with,
        launch_only: !m.restricted_from.is_empty(),
        restricted_from: non_empty(m.restricted_from.clone()),
        damage: None,
    }
}

impl Remote {
    /// The images `account` sees on the remote, oldest first, and one
    /// line for each manifest object that does not verify (the image is
    /// left out; the others are listed).
    pub fn list_images(&self, account: &str) -> Result<(Vec<ImageInfo>, Vec<String>)> {
        let (listing, usage) = self.images_with_usage()?;
        let mut visible: Vec<(&Listed, Access)> = listing
            .images
            .values()
            .filter_map(|i| Some((i, access_of(&i.meta, account)?)))
            .collect();
        visible.sort_by(|a, b| {
            let key = |i: &Listed| (i.meta.created_at, i.name().to_owned());
            key(a.0).cmp(&key(b.0))
        });
        let infos = visible
            .iter()
            .map(|(i, a)| info(&i.meta, *a, &usage))
            .collect();
        Ok((infos, listing.damaged))
    }

    /// One image (id or name) that `account` sees.
    pub fn show(&self, reference: &str, account: &str) -> Result<ImageInfo> {
        let (listing, usage) = self.images_with_usage()?;
        let img = self.find_listed(&listing, reference, account, Op::Show)?;
        let access = access_of(&img.meta, account).unwrap_or(Access::Everyone);
        Ok(info(&img.meta, access, &usage))
    }

    /// The manifest objects of image `id` (every version, readable or not).
    fn manifest_objects(&self, id: &ImageId) -> Result<Vec<String>> {
        Ok(self
            .store()
            .list(ObjectKind::Manifest)?
            .into_iter()
            .filter(|o| crate::repo::manifest::parse_name(&o.name).is_some_and(|(i, _)| &i == id))
            .map(|o| o.name)
            .collect())
    }

    /// Retires manifest objects (a tombstone each).
    fn retire_manifests(&self, objects: &[String]) -> Result<()> {
        for o in objects {
            self.store().delete(ObjectKind::Manifest, o)?;
        }
        Ok(())
    }
}

impl Depot {
    /// Deletes an image of a remote (owner only; a protected image is
    /// refused): every version of its manifest is retired at once, its
    /// packs are left to `gc --remote`. An image none of whose manifest
    /// versions verifies can be deleted by its id by anyone (nobody can
    /// tell its owner, and nobody can read it); the returned info then
    /// holds only the id and the damage.
    pub fn delete_remote_image(&self, remote: &Remote, reference: &str) -> Result<ImageInfo> {
        let listing = remote.images()?;
        let img = match remote.find_listed(&listing, reference, self.account(), Op::Delete) {
            Err(Error::RemoteImageNotFound { .. } | Error::StoreDamaged(_))
                if ImageId::parse(reference).is_some() =>
            {
                return self.delete_damaged_remote_image(remote, &listing, reference);
            }
            r => r?,
        };
        let shown = info(&img.meta, Access::Owner, &Usage(HashMap::new()));
        if shown.protected {
            return Err(Error::Conflict(format!(
                "image {} ({}) on remote {} is protected: it cannot be deleted there (its manifest says so; push an unprotected copy under another name if it must go)",
                shown.name,
                shown.id,
                remote.name()
            )));
        }
        remote.retire_manifests(&img.objects)?;
        Ok(shown)
    }

    /// [`Depot::delete_remote_image`] of an id none of whose versions
    /// verifies (not found if it has no manifest at all, or a readable
    /// version: then it is someone else's unseen image).
    fn delete_damaged_remote_image(
        &self,
        remote: &Remote,
        listing: &Listing,
        reference: &str,
    ) -> Result<ImageInfo> {
        let not_found = || remote.not_found(reference);
        let id = ImageId::parse(reference).ok_or_else(not_found)?;
        let objects = remote.manifest_objects(&id)?;
        if objects.is_empty() || listing.images.contains_key(id.as_str()) {
            return Err(not_found());
        }
        remote.retire_manifests(&objects)?;
        let damage = listing
            .damaged
            .iter()
            .find(|d| d.contains(id.as_str()))
            .cloned()
            .unwrap_or_else(|| "no version of its manifest verifies".into());
        let m = ManifestMeta {
            id: id.to_string(),
            ..Default::default()
        };
        let mut shown = info(&m, Access::Owner, &Usage(HashMap::new()));
        shown.state = ImageState::Damaged;
        shown.damage = Some(damage);
        Ok(shown)
    }
}
