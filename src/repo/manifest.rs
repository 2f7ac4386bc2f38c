//! Image manifests on disk: `DEPOT/manifests/<img-id>.<seq>.manifest`.
//!
//! A manifest is an immutable file holding everything the catalog knows of
//! one image (metadata, tags, shares, and its block map naming chunks by
//! BLAKE3 hash), so that a lost catalog can be rebuilt from the packs, their
//! indexes and the manifests (`fsck --repair`, [`crate::maint::repair`]). The
//! codec is [`crate::format::encode_manifest`]; this module writes, lists
//! and removes the files.
//!
//! **Invariant**: an image's manifest is durable (file and directory
//! fsynced) before the catalog transaction that makes it available, or that
//! changes its metadata, commits. A metadata change writes version `seq + 1`
//! (never rewriting a file); the highest version that verifies wins, older
//! ones are removed after the commit. Deleting an image removes its
//! manifests after the commit; gc removes those of images the catalog does
//! not know.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::catalog::{self, ImageState};
use crate::error::{Error, IoContext, Result};
use crate::format::{self, HashBlockMap, Manifest, ManifestMeta, ManifestShare};
use crate::ids::ImageId;
use crate::perms::Perms;

/// The directory of manifests.
pub fn dir(root: &Path) -> PathBuf {
    root.join("manifests")
}

/// Path of version `seq` of an image's manifest.
pub fn path(root: &Path, id: &ImageId, seq: u32) -> PathBuf {
    dir(root).join(format!("{id}.{seq}.manifest"))
}

/// Parses a manifest file name: `<img-id>.<seq>.manifest`.
pub fn parse_name(name: &str) -> Option<(ImageId, u32)> {
    let stem = name.strip_suffix(".manifest")?;
    let (id, seq) = stem.split_once('.')?;
    let id = ImageId::parse(id).filter(|i| i.as_str() == id)?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) || seq.len() > 10 {
        return None;
    }
    Some((id, seq.parse().ok()?))
}

/// Every manifest file, by image, versions sorted highest first.
pub fn list_all(root: &Path) -> Result<BTreeMap<ImageId, Vec<(u32, PathBuf)>>> {
    let d = dir(root);
    let mut out: BTreeMap<ImageId, Vec<(u32, PathBuf)>> = BTreeMap::new();
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io(&d, e)),
    };
    for f in rd.flatten() {
        let name = f.file_name();
        if let Some((id, seq)) = name.to_str().and_then(parse_name) {
            out.entry(id).or_default().push((seq, f.path()));
        }
    }
    for v in out.values_mut() {
        v.sort_unstable_by_key(|v| std::cmp::Reverse(v.0));
    }
    Ok(out)
}

/// The versions of one image's manifest, highest first.
pub fn versions(root: &Path, id: &ImageId) -> Result<Vec<(u32, PathBuf)>> {
    // One image: its names share a prefix; reading the directory is what
    // an object store's prefix listing will be.
    Ok(list_all(root)?.remove(id).unwrap_or_default())
}

/// Reads and checks one manifest file.
pub fn read(p: &Path) -> Result<Manifest> {
    let b = std::fs::read(p).at(p)?;
    format::decode_manifest(&b).map_err(|e| Error::StoreDamaged(format!("{}: {e}", p.display())))
}

/// The image's manifest as the catalog describes it now (`conn` may be the
/// caller's write transaction; the image must have its map).
pub fn build(conn: &Connection, id: &ImageId, seq: u32) -> Result<Manifest> {
    let row = catalog::find_images(conn, id.as_str())?
        .into_iter()
        .find(|r| &r.id == id)
        .ok_or_else(|| Error::ImageNotFound(id.to_string()))?;
    row.check_sound()?;
    let map = catalog::image_map(conn, id)?;
    let mut ids: Vec<i64> = map.data().map(|(_, c)| c).collect();
    ids.sort_unstable();
    ids.dedup();
    let locs = catalog::chunk_locs(conn, &ids)?;
    let mut runs = Vec::with_capacity(map.runs.len());
    for r in &map.runs {
        let mut hashes = Vec::with_capacity(r.ids.len());
        for (i, c) in r.ids.iter().enumerate() {
            let loc = locs.get(c).ok_or_else(|| {
                Error::StoreDamaged(format!(
                    "image {} ({id}): chunk {c} at byte offset {} is missing from the catalog",
                    row.name,
                    (r.start + i as u64) * format::CHUNK
                ))
            })?;
            hashes.push(loc.hash);
        }
        runs.push((r.start, hashes));
    }
    let tags = catalog::image_tags(conn, id)?;
    let shares = catalog::image_shares(conn, id)?
        .into_iter()
        .map(|(account, created_at)| ManifestShare {
            account,
            created_at,
        })
        .collect();
    Ok(Manifest {
        seq,
        meta: ManifestMeta {
            id: id.to_string(),
            name: row.name,
            kind: row.kind,
            owner: row.owner,
            description: row.description,
            source_format: row.source_format,
            virtual_size: row.virtual_size,
            data_bytes: row.data_bytes,
            content_digest: row.content_digest.unwrap_or_default(),
            created_at: row.created_at,
            parent: row.parent,
            parent_name: row.parent_name,
            source_instance: row.source_instance,
            copied_from: row.copied_from,
            protected: row.protected,
            deprecated: row.deprecated,
            vendor: row.vendor,
            application: row.application,
            app_version: row.app_version,
            restricted_from: row.restricted_from,
            tags,
            shares,
            written_at: catalog::now(),
        },
        map: HashBlockMap {
            nblocks: map.nblocks,
            runs,
        },
    })
}

/// A manifest version written but whose catalog change is not committed
/// yet: [`Written::committed`] removes the older versions, dropping it
/// uncommitted removes the new file.
pub struct Written {
    root: PathBuf,
    id: ImageId,
    seq: u32,
    /// `None`: nothing written (the image is still being created: its
    /// import's commit writes the manifest).
    path: Option<PathBuf>,
    done: bool,
}

impl Written {
    /// The catalog change committed: older versions go.
    pub fn committed(mut self) {
        self.done = true;
        if self.path.is_none() {
            return;
        }
        if let Ok(vs) = versions(&self.root, &self.id) {
            for (seq, p) in vs {
                if seq < self.seq {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

impl Drop for Written {
    fn drop(&mut self) {
        if let (false, Some(p)) = (self.done, &self.path) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes the next version of the image's manifest from the catalog (in
/// the caller's write transaction, before it commits): created new,
/// fsynced, directory fsynced.
pub fn write_next(conn: &Connection, root: &Path, perms: Perms, id: &ImageId) -> Result<Written> {
    let seq = versions(root, id)?.first().map_or(0, |(s, _)| s + 1);
    let path = match catalog::image_state(conn, id)? {
        Some(ImageState::Available) => Some(write_file(root, perms, &build(conn, id, seq)?)?),
        _ => None,
    };
    Ok(Written {
        root: root.to_owned(),
        id: id.clone(),
        seq,
        path,
        done: false,
    })
}

/// Writes a manifest file durably; returns its path.
pub fn write_file(root: &Path, perms: Perms, m: &Manifest) -> Result<PathBuf> {
    let id = ImageId::parse(&m.meta.id)
        .ok_or_else(|| Error::Invalid(format!("manifest of bad image id {:?}", m.meta.id)))?;
    let d = dir(root);
    if !d.exists() {
        perms.mkdir_all(&d)?;
        crate::store::sync_dir(root)?;
    }
    let p = path(root, &id, m.seq);
    let bytes = format::encode_manifest(m);
    let r = (|| {
        let mut f = perms
            .open_options()
            .write(true)
            .create_new(true)
            .open(&p)
            .at(&p)?;
        f.write_all(&bytes).at(&p)?;
        f.sync_all().at(&p)
    })();
    if let Err(e) = r {
        if !matches!(&e, Error::Io { error, .. } if error.kind() == std::io::ErrorKind::AlreadyExists)
        {
            let _ = std::fs::remove_file(&p);
        }
        return Err(e);
    }
    crate::store::sync_dir(&d)?;
    Ok(p)
}

/// Removes every version of an image's manifest (after the catalog
/// commit that deleted it).
pub fn remove_all(root: &Path, id: &ImageId) -> Result<()> {
    for (_, p) in versions(root, id)? {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
            _ => {}
        }
    }
    Ok(())
}

/// What is wrong with an image's manifests (`None`: its newest version
/// verifies and describes the catalog row's content).
pub fn check(root: &Path, row: &catalog::ImageRow) -> Option<String> {
    let vs = match versions(root, &row.id) {
        Ok(vs) => vs,
        Err(e) => return Some(e.to_string()),
    };
    let Some((_, p)) = vs.first() else {
        return Some("no manifest: a lost catalog would lose it".into());
    };
    match read(p) {
        Err(e) => Some(format!("its newest manifest is damaged: {e}")),
        Ok(m)
            if m.meta.id != row.id.as_str()
                || Some(&m.meta.content_digest) != row.content_digest.as_ref()
                || m.meta.virtual_size != row.virtual_size =>
        {
            Some(format!(
                "{}: describes other content than the catalog",
                p.display()
            ))
        }
        Ok(_) => None,
    }
}

/// Manifests of images that have no catalog row (deleted, or an import
/// that died before its commit and was reaped).
pub fn orphans(conn: &Connection, root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (id, vs) in list_all(root)? {
        if !catalog::image_exists(conn, &id)? {
            out.extend(vs.into_iter().map(|(_, p)| p));
        }
    }
    Ok(out)
}

/// Sizes of the manifest files by image (for stats and measurements).
pub fn sizes(root: &Path) -> Result<HashMap<ImageId, u64>> {
    Ok(list_all(root)?
        .into_iter()
        .map(|(id, vs)| {
            let n = vs
                .iter()
                .filter_map(|(_, p)| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum();
            (id, n)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let id = ImageId::parse("img-0123456789abcdef").unwrap();
        let p = path(Path::new("/d"), &id, 12);
        let n = p.file_name().unwrap().to_str().unwrap();
        assert_eq!(n, "img-0123456789abcdef.12.manifest");
        assert_eq!(parse_name(n), Some((id, 12)));
        for bad in [
            "img-0123456789abcdef.manifest",
            "img-0123456789abcdef.x.manifest",
            "img-0123456789ABCDEF.1.manifest",
            "img-0123456789abcdef.1.manifest.tmp",
            "debian.1.manifest",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }
}
