//! `image pull`: a remote image into the local depot as a new independent
//! image ([`crate::Depot::pull_image`], docs/FORMAT.md "Remote depots",
//! pull). Only the chunks the depot lacks (by hash) travel: ranged reads
//! of the frames that hold them (fetch.rs), each chunk checked against its
//! hash, entered in local packs batch by batch through the sink `image
//! copy` uses (so a killed pull resumes), and the image made available in
//! one transaction keeping the manifest's owner, type, shares and
//! metadata, with `copied_from` = `remote:<NAME> <img-id>`.
//! [`Depot::local_copy`] finds the local original or an earlier pull.
//! [`PullReport`] says what travelled.
//!
//! The manifest is hostile until [`check_pulled`] passed: its sizes agree,
//! its names and accounts are ones the catalog accepts; and the fetched
//! content must hash to its content digest before the image is available.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use super::fetch::{fetch, plan_reads};
use super::{Remote, RemoteImage};
use crate::catalog::{self, ImageState};
use crate::depot::{check_account, Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, Result};
use crate::format::{blocks_for, BlockMap, HashBlockMap, Manifest, Run, CHUNK};
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::image::create::create_image;
use crate::image::export::digest_unlisted;
use crate::lifecycle::transfer::{make_available, present_in, Content, LocalSink, Sender};
use crate::progress::Progress;

/// What a pull did.
#[derive(Clone, Debug, Serialize)]
pub struct PullReport {
    /// The remote's name.
    pub remote: String,
    /// The new local image.
    pub image: ImageInfo,
    /// Distinct chunks the image uses.
    pub chunks: u64,
    /// Chunks the depot already had (not fetched).
    pub chunks_present: u64,
    /// Chunks fetched.
    pub chunks_fetched: u64,
    /// Compressed bytes fetched (ranged reads).
    pub bytes_fetched: u64,
    /// Frames entered as they were fetched (no recompression).
    pub frames_whole: u64,
    /// Ranged reads made.
    pub gets: u64,
}

/// The counts of a pull before its image is shown.
pub(super) struct Pulled {
    chunks: u64,
    present: u64,
    fetched: u64,
    bytes: u64,
    frames_whole: u64,
    gets: u64,
}

impl Depot {
    /// Pulls a remote image (already resolved and access-checked by the
    /// caller) into this depot as a new independent image; `name` renames
    /// it locally.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub fn pull_image(
        &self,
        remote: &Remote,
        image: &RemoteImage,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<PullReport> {
        let m = &image.manifest;
        check_pulled(remote, m)?;
        if let Some(p) = self.partial_copy(remote, image)? {
            if name.is_none_or(|n| n == p.name) {
                // run lazily before: complete it in place
                return self.complete_partial(remote, &p.id, progress);
            }
        }
        let opts = import_options(m, name)?;
        self.check_local_name(&opts.name)?;
        let mut pulled = None;
        let id = create_image(
            &self.repo,
            &m.meta.owner,
            &opts,
            &m.meta.source_format,
            |guard| {
                pulled = Some(self.fetch_into(remote, m, guard.id, progress)?);
                Ok(())
            },
        )?;
        let p = pulled.expect("set by a successful pull");
        Ok(p.report(remote, self.image(id.as_str())?))
    }

    /// The local image that holds this remote image's content, if one is
    /// available (for `instance run REMOTE:IMAGE`: no second pull, no name
    /// clash): the original it was pushed from (the same id), or one
    /// pulled from it earlier (`copied_from` = `"remote:<NAME> <img-id>"`);
    /// either with the same content digest.
    pub fn local_copy(&self, remote: &Remote, image: &RemoteImage) -> Result<Option<ImageInfo>> {
        self.copy_of(remote, image, ImageState::Available)
    }

    /// The local image in `state` with this remote image's content that
    /// this account may see: its original (the same id) or one pulled or
    /// run from it (its `copied_from`).
    pub(super) fn copy_of(
        &self,
        remote: &Remote,
        image: &RemoteImage,
        state: ImageState,
    ) -> Result<Option<ImageInfo>> {
        let origin = origin(remote, image.id());
        let digest = &image.manifest.meta.content_digest;
        for row in catalog::list_images(&self.repo.conn)? {
            let ours = row.id.as_str() == image.id() || row.copied_from == origin;
            let same = ours
                && row.damage.is_none()
                && row.state == Some(state)
                && row.content_digest.as_ref() == Some(digest);
            if same && self.access(&row)?.is_some() {
                return self.image(row.id.as_str()).map(Some);
            }
        }
        Ok(None)
    }

    /// Fetches what the depot lacks of `m` into the new (or partial)
    /// image `id` and makes it available (one transaction); the caller's
    /// guard undoes a failure of a new one.
    pub(super) fn fetch_into(
        &self,
        remote: &Remote,
        m: &Manifest,
        id: &ImageId,
        progress: &dyn Progress,
    ) -> Result<Pulled> {
        let hashes = distinct(&m.map);
        let present = present_in(self, &hashes, id)?;
        // The pull's job names its origin: the same text as the lineage.
        let job = origin(remote, &m.meta.id);
        catalog::set_copied_from(&self.repo.conn, id, &job)?;
        let missing: Vec<ChunkHash> = hashes
            .iter()
            .copied()
            .filter(|h| !present.contains(h))
            .collect();
        let label = format!("{} ({})", m.meta.name, m.meta.id);
        let reads = if missing.is_empty() {
            Vec::new()
        } else {
            plan_reads(remote, &remote.chunk_map()?, &missing, &label)?
        };
        progress.begin("pull", missing.len() as u64 * CHUNK);
        let mut sink = LocalSink::new(self, id, &job);
        let mut sender = Sender::new(&mut sink, progress);
        let fetched = fetch(remote, &reads, &label, &mut sender)?;
        let sent = sender.finish()?;
        progress.end();
        let content = Content {
            virtual_size: m.meta.virtual_size,
            data_bytes: m.meta.data_bytes,
            digest: &m.meta.content_digest,
            hashes: &hashes,
        };
        self.check_pulled_digest(remote, m, id, &hashes, progress)?;
        let what = format!("pull of {}:{label}", remote.name());
        let map = |ids: &HashMap<ChunkHash, ChunkId>| block_map(&m.map, ids);
        let shares = |tx: &rusqlite::Connection| {
            for s in &m.meta.shares {
                catalog::images::share(tx, id.as_str(), &s.account, s.created_at)?;
            }
            catalog::partial::forget_partial(tx, id.as_str())
        };
        make_available(self, id, &job, &what, &content, map, shares)?;
        Ok(Pulled {
            chunks: hashes.len() as u64,
            present: present.len() as u64,
            fetched: sent.chunks,
            bytes: fetched.bytes,
            frames_whole: sent.frames_whole,
            gets: fetched.gets,
        })
    }
}

impl Pulled {
    /// The report of this pull of `image` from `remote`.
    pub(super) fn report(self, remote: &Remote, image: ImageInfo) -> PullReport {
        PullReport {
            remote: remote.name().to_owned(),
            image,
            chunks: self.chunks,
            chunks_present: self.present,
            chunks_fetched: self.fetched,
            bytes_fetched: self.bytes,
            frames_whole: self.frames_whole,
            gets: self.gets,
        }
    }
}

impl Depot {
    /// Refuses a pulled image whose content (its chunks, each already
    /// checked against its hash) does not hash to its manifest's content
    /// digest, before it becomes available: the digest is taken as `image
    /// verify` takes it.
    fn check_pulled_digest(
        &self,
        remote: &Remote,
        m: &Manifest,
        id: &ImageId,
        hashes: &[ChunkHash],
        progress: &dyn Progress,
    ) -> Result<()> {
        let conn = &self.repo.conn;
        let ids = catalog::read(conn, |tx| {
            let mut ids = HashMap::with_capacity(hashes.len());
            for h in hashes {
                if let Some(c) = catalog::chunk_by_hash(tx, h, id)? {
                    ids.insert(*h, c);
                }
            }
            Ok(ids)
        })?;
        let label = format!("image {} ({})", m.meta.name, m.meta.id);
        if ids.len() < hashes.len() {
            return Err(Error::Invalid(format!(
                "pull of {}:{label}: a chunk vanished from {} meanwhile (a gc there?): run it again",
                remote.name(),
                self.root().display()
            )));
        }
        let mut row = catalog::find_images(conn, id.as_str())?
            .into_iter()
            .find(|r| r.id == *id)
            .ok_or_else(|| Error::ImageNotFound(id.to_string()))?;
        row.virtual_size = m.meta.virtual_size;
        let got = digest_unlisted(&self.repo, &row, block_map(&m.map, &ids), progress)?;
        if got == m.meta.content_digest {
            return Ok(());
        }
        Err(remote.damaged(
            &label,
            &format!(
                "its content hashes to {got}, its manifest says {}: the manifest does not describe this content; nothing was entered",
                m.meta.content_digest
            ),
        ))
    }
}

/// The lineage text (and transfer job) of a pull of remote image `id`.
pub(super) fn origin(remote: &Remote, id: &str) -> String {
    origin_of(remote.name(), id)
}

/// [`origin`] by the remote's name.
pub(super) fn origin_of(remote: &str, id: &str) -> String {
    format!("remote:{remote} {id}")
}

/// The distinct hashes of a map, in map order.
fn distinct(map: &HashBlockMap) -> Vec<ChunkHash> {
    let mut seen = HashSet::new();
    map.runs
        .iter()
        .flat_map(|r| r.1.iter())
        .filter(|h| seen.insert(**h))
        .copied()
        .collect()
}

/// The local block map of a manifest's map (`ids`: every hash's chunk).
fn block_map(map: &HashBlockMap, ids: &HashMap<ChunkHash, ChunkId>) -> BlockMap {
    BlockMap {
        nblocks: map.nblocks,
        runs: map
            .runs
            .iter()
            .map(|(start, hashes)| Run {
                start: *start,
                ids: hashes.iter().map(|h| ids[h]).collect(),
            })
            .collect(),
    }
}

/// The new image's options from its manifest (`name`: renamed locally).
pub(super) fn import_options(m: &Manifest, name: Option<&str>) -> Result<ImportOptions> {
    let meta = &m.meta;
    let mut opts = ImportOptions::new(name.unwrap_or(&meta.name));
    opts.kind = ImageType::parse(&meta.kind)?;
    opts.description = meta.description.clone();
    opts.vendor = meta.vendor.clone();
    opts.application = meta.application.clone();
    opts.app_version = meta.app_version.clone();
    opts.tags = meta
        .tags
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    opts.parent = Some((meta.id.clone(), meta.name.clone()));
    opts.restricted_from = meta.restricted_from.clone();
    Ok(opts)
}

/// The longest free-text field a pulled manifest may carry.
const MAX_TEXT: usize = 64 << 10;

/// Refuses a manifest whose fields disagree or that the catalog could not
/// hold: sizes (over the import limit: refused as import refuses it),
/// digest, accounts, type, text lengths.
pub(crate) fn check_pulled(remote: &Remote, m: &Manifest) -> Result<()> {
    let meta = &m.meta;
    let bad = |what: String| {
        let label = format!("image {} ({})", meta.name, meta.id);
        remote.damaged(&label, &format!("its manifest {what}"))
    };
    remote.check_size(meta)?;
    if m.map.nblocks != blocks_for(meta.virtual_size) {
        return Err(bad(format!(
            "maps {} blocks for a virtual size of {} bytes",
            m.map.nblocks, meta.virtual_size
        )));
    }
    if meta.data_bytes > m.map.nblocks * CHUNK {
        return Err(bad(format!("says {} data bytes", meta.data_bytes)));
    }
    let hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(&meta.content_digest) {
        return Err(bad(format!("has content digest {:?}", meta.content_digest)));
    }
    ImageType::parse(&meta.kind).map_err(|_| bad(format!("has type {:?}", meta.kind)))?;
    let accounts = std::iter::once(&meta.owner).chain(meta.shares.iter().map(|s| &s.account));
    for a in accounts {
        check_account(a).map_err(|_| bad(format!("names account {a:?}")))?;
    }
    let texts = [
        &meta.name,
        &meta.parent_name,
        &meta.description,
        &meta.source_format,
        &meta.vendor,
        &meta.application,
        &meta.app_version,
        &meta.restricted_from,
    ];
    let tags = meta.tags.iter().flat_map(|(k, v)| [k, v]);
    if texts.into_iter().chain(tags).any(|t| t.len() > MAX_TEXT) || meta.tags.len() > 1024 {
        return Err(bad(format!(
            "holds a text field or tag list over {MAX_TEXT} bytes"
        )));
    }
    Ok(())
}
