//! `image push`: a local image onto a remote ([`crate::Depot::push_image`],
//! docs/FORMAT.md "Remote depots", push steps 1-4). Only the chunks the
//! remote lacks (by its [`super::ChunkMap`]) travel, through the transfer
//! core that `image copy` uses, into new remote packs ([`RemoteSink`]: each
//! pack's index is PUT once the pack is, so a killed push resumes without
//! sending them again); the manifest is PUT last, within half the remote's
//! [`grace`] of the push's start. [`PushReport`] says what travelled.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Listed, Remote};
use crate::catalog;
use crate::depot::access::Op;
use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::format::{self, Manifest, CHUNK, PACK_TARGET_BYTES};
use crate::ids::{ChunkHash, ChunkId};
use crate::lifecycle::transfer::{plan_order, send_plan, FrameSink, Sender};
use crate::progress::Progress;
use crate::store::{ObjectKind, ObjectStore, PackRotator};

/// How long a remote's gc keeps what it retired before purging it, and
/// so the bound on a push (its manifest is written within half of it):
/// `VMDEPOT_REMOTE_GRACE_SECS` seconds (a test knob), else 24 hours.
pub fn grace() -> Duration {
    std::env::var("VMDEPOT_REMOTE_GRACE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(24 * 3600), Duration::from_secs)
}

/// The pushed image as the remote lists it.
#[derive(Clone, Debug, Serialize)]
pub struct PushedImage {
    /// Its id (the local image's).
    pub id: String,
    /// Its name on the remote.
    pub name: String,
}

/// What a push did.
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    /// The remote's name.
    pub remote: String,
    /// The image on the remote.
    pub image: PushedImage,
    /// Distinct chunks the image uses.
    pub chunks: u64,
    /// Chunks the remote already had (not sent).
    pub chunks_present: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Of them, those sent first, in the order the image's first lazily
    /// served run read them (its read profile; 0 without one): frames
    /// that hold what a boot reads together.
    pub chunks_read_first: u64,
    /// Compressed bytes sent (in new packs).
    pub bytes_sent: u64,
    /// Frames sent as they were (no recompression).
    pub frames_whole: u64,
    /// Packs written on the remote.
    pub packs: u64,
    /// The remote had the image already (same id and content): nothing
    /// was sent.
    pub already: bool,
}

/// The bounds a push runs within (tests shrink them).
pub(crate) struct PushLimits {
    /// The remote's gc grace: the manifest is PUT before half of it.
    pub(crate) grace: Duration,
    /// A remote pack is sealed once it reaches this size.
    pub(crate) pack_target: u64,
}

impl Default for PushLimits {
    fn default() -> PushLimits {
        PushLimits {
            grace: grace(),
            pack_target: PACK_TARGET_BYTES,
        }
    }
}

impl Depot {
    /// Pushes a local image (the acting account needs Op::Copy on it:
    /// owner, or public/marketplace; launch-only refused) to the remote.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub fn push_image(
        &self,
        remote: &Remote,
        image: &str,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<PushReport> {
        self.push_within(remote, image, name, progress, &PushLimits::default())
    }

    /// [`Depot::push_image`] within `limits`.
    pub(crate) fn push_within(
        &self,
        remote: &Remote,
        image: &str,
        name: Option<&str>,
        progress: &dyn Progress,
        limits: &PushLimits,
    ) -> Result<PushReport> {
        let (row, _) = self.available_for(image, Op::Copy)?;
        let t0 = Instant::now();
        let mut manifest = catalog::read(&self.repo.conn, |tx| {
            crate::repo::manifest::build(tx, &row.id, 0)
        })?;
        if let Some(n) = name {
            crate::image::names::check_name(n)?;
            manifest.meta.name = n.to_owned();
        }
        let plan = crate::image::export::plan(&self.repo, &row)?;
        let order = plan_order(&plan);
        let mut rep = PushReport {
            remote: remote.name().to_owned(),
            image: PushedImage {
                id: row.id.to_string(),
                name: manifest.meta.name.clone(),
            },
            chunks: order.len() as u64,
            chunks_present: 0,
            chunks_sent: 0,
            chunks_read_first: 0,
            bytes_sent: 0,
            frames_whole: 0,
            packs: 0,
            already: false,
        };
        if let Some(there) = remote.holds_already(&manifest)? {
            // Nothing is written: the remote keeps the name it has.
            rep.image.name = there;
            rep.chunks_present = rep.chunks;
            rep.already = true;
            return Ok(rep);
        }
        let have = remote.chunk_map()?;
        let missing: Vec<ChunkId> = order
            .iter()
            .copied()
            .filter(|c| !have.contains(&plan.chunks[c].hash))
            .collect();
        rep.chunks_present = rep.chunks - missing.len() as u64;
        progress.begin("push", missing.len() as u64 * CHUNK);
        let mut sink = RemoteSink::new(remote.store().as_ref(), limits.pack_target);
        // What the image's first lazy run read goes first, in frames of
        // its own (large ones, compressed harder: a lazy boot reads them
        // whole); then the rest, in map order, in small frames.
        let (first, rest) = read_first(self.root(), &row, &plan, &missing);
        rep.chunks_read_first = first.len() as u64;
        let mut sender = Sender::new(&mut sink, progress);
        sender.next_frames(format::FRAME_CHUNKS, format::READ_FIRST_LEVEL)?;
        send_plan(self, &row, &plan, &first, &mut sender)?;
        sender.next_frames(format::REMOTE_FRAME_CHUNKS, format::ZSTD_LEVEL)?;
        send_plan(self, &row, &plan, &rest, &mut sender)?;
        let sent = sender.finish()?;
        progress.end();
        (rep.chunks_sent, rep.bytes_sent, rep.frames_whole) =
            (sent.chunks, sent.bytes, sent.frames_whole);
        rep.packs = sink.packs;
        remote.put_manifest(&manifest, t0, limits.grace)?;
        let to = format!("remote:{}", remote.name());
        catalog::record_copy(&self.repo.conn, &row.id, &to, &row.id)?;
        Ok(rep)
    }
}

/// The `missing` chunks of image `row` (`plan`) split in two: those of
/// the blocks of its read profile (`image::profile`), in the order read,
/// and the others, in map order.
fn read_first(
    root: &std::path::Path,
    row: &crate::catalog::ImageRow,
    plan: &crate::image::export::Plan,
    missing: &[ChunkId],
) -> (Vec<ChunkId>, Vec<ChunkId>) {
    let blocks = crate::format::blocks_for(row.virtual_size);
    let profile = crate::image::profile::read(root, row.id.as_str(), blocks);
    if profile.is_empty() {
        return (Vec::new(), missing.to_vec());
    }
    let wanted: std::collections::HashSet<ChunkId> = missing.iter().copied().collect();
    let mut taken = std::collections::HashSet::new();
    let first: Vec<ChunkId> = profile
        .iter()
        .map(|&b| plan.map.get(b))
        .filter(|c| wanted.contains(c) && taken.insert(*c))
        .collect();
    let rest = missing
        .iter()
        .copied()
        .filter(|c| !taken.contains(c))
        .collect();
    (first, rest)
}

impl Remote {
    /// The name the remote lists this image under if it holds it already
    /// with the same content (a push of it again sends nothing); an error
    /// if it holds another image of the owner under the same name, or
    /// this id with other content.
    fn holds_already(&self, m: &Manifest) -> Result<Option<String>> {
        let listing = self.images()?;
        if let Some(there) = listing.images.get(&m.meta.id) {
            if there.meta.content_digest == m.meta.content_digest {
                return Ok(Some(there.meta.name.clone()));
            }
            let object = there.objects.first().map_or("", String::as_str);
            return Err(self.damaged(
                &self.store.label(ObjectKind::Manifest, object),
                &format!(
                    "image {} there has content digest {}, the local one {}",
                    m.meta.id, there.meta.content_digest, m.meta.content_digest
                ),
            ));
        }
        let clash = |i: &&Listed| i.meta.owner == m.meta.owner && i.meta.name == m.meta.name;
        match listing.images.values().find(clash) {
            Some(other) => Err(Error::NameTaken {
                name: m.meta.name.clone(),
                existing: format!("{} on remote {}", other.id(), self.name),
            }),
            None => Ok(None),
        }
    }

    /// PUTs version 0 of an image's manifest, the last object of a push:
    /// only if the push started (`t0`) less than `grace / 2` ago, so that a
    /// remote gc cannot have purged a pack it counted on.
    fn put_manifest(&self, m: &Manifest, t0: Instant, grace: Duration) -> Result<()> {
        let took = t0.elapsed();
        if took >= grace / 2 {
            return Err(Error::Invalid(format!(
                "remote {}: the push of image {} ({}) took {} s, more than half the remote's gc grace ({} s): its manifest is not written, lest a remote gc has removed packs it counts on; run the push again (it sends only what is still missing)",
                self.name,
                m.meta.name,
                m.meta.id,
                took.as_secs(),
                grace.as_secs()
            )));
        }
        let id = crate::ids::ImageId::parse(&m.meta.id)
            .ok_or_else(|| Error::Invalid(format!("bad image id {:?}", m.meta.id)))?;
        let name = Remote::manifest_name(&id, 0);
        self.store
            .put(ObjectKind::Manifest, &name, &format::encode_manifest(m))
    }
}

/// Frames into new packs of a remote: each sealed (a multipart upload
/// completed) at `target` bytes, then its index PUT ([`crate::store::PackWriter`]
/// does both), from when its chunks count for every host.
struct RemoteSink<'a> {
    rotator: PackRotator<'a, ()>,
    target: u64,
    /// Bytes in the open pack.
    open: u64,
    /// Packs sealed.
    packs: u64,
}

impl<'a> RemoteSink<'a> {
    fn new(store: &'a dyn ObjectStore, target: u64) -> RemoteSink<'a> {
        RemoteSink {
            rotator: PackRotator::new(store, Box::new(|_: &str| Ok(()))),
            target,
            open: 0,
            packs: 0,
        }
    }

    /// Seals the open pack, if any.
    fn seal(&mut self) -> Result<()> {
        if self.rotator.finish()?.is_some() {
            self.packs += 1;
        }
        self.open = 0;
        Ok(())
    }
}

impl FrameSink for RemoteSink<'_> {
    fn push(&mut self, frame: &[u8], hashes: Vec<ChunkHash>) -> Result<()> {
        let placed = self.rotator.append(frame, &hashes)?;
        if placed.sealed.is_some() {
            self.packs += 1;
            self.open = 0;
            return Ok(());
        }
        self.open = placed.offset + frame.len() as u64;
        if self.open >= self.target {
            self.seal()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.seal()
    }
}
