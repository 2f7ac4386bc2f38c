//! Copying an image to another depot (another "region"): the target gets an
//! independent image (same content digest, its own id, lineage recorded on
//! both sides). Only chunks the target lacks travel; a frame whose chunks
//! are all needed and all missing travels as its compressed bytes, others
//! are recompressed from the missing chunks only.
//!
//! **Resumable**: what arrives is stored in sealed packs and entered as
//! committed chunks batch by batch, so a copy killed at any point leaves
//! them in the target and the next copy does not send them again. They
//! belong to no image yet: `copy_chunks` names them, and gc keeps them for
//! [`crate::maint::COPY_GRACE_SECS`] (then a copy never resumed is
//! collected). The image itself becomes visible in the target only at the end,
//! in one transaction, like an import.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde::Serialize;

use crate::catalog;
use crate::depot::access::Op;
use crate::depot::{Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, IoContext, Result};
use crate::format::{CHUNK, CHUNK_SIZE, FRAME_CHUNKS, UNUSED_SLOT, ZSTD_LEVEL};
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::image::create::create_image;
use crate::image::export::Plan;
use crate::progress::Progress;
use crate::store::{self, PackRotator, ReaderCache, Sealed};

/// What a copy did.
#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    /// The new image in the target depot.
    pub image: ImageInfo,
    /// Distinct chunks the image uses.
    pub chunks: u64,
    /// Chunks the target already had (not sent).
    pub chunks_present: u64,
    /// Chunks sent.
    pub chunks_sent: u64,
    /// Compressed bytes written to the target's packs.
    pub bytes_sent: u64,
    /// Frames sent as they were (no recompression).
    pub frames_whole: u64,
}

impl Depot {
    /// Copies an image into the depot at `target` (created if needed) as an
    /// image of the acting account there.
    #[tracing::instrument(skip_all, err(level = "debug"))]
    pub fn copy_image(
        &self,
        image: &str,
        target: &Path,
        name: Option<&str>,
        progress: &dyn Progress,
    ) -> Result<CopyReport> {
        let (row, _) = self.available_for(image, Op::Copy)?;
        let dst = Depot::open(target)?.with_account(self.account())?;
        if dst.root() == self.root() {
            return Err(Error::Invalid(format!(
                "{} is this depot: copy to another depot directory",
                target.display()
            )));
        }
        let plan = crate::image::export::plan(&self.repo, &row)?;
        // Distinct chunks in map order (the order frames were written in).
        let mut seen = HashSet::new();
        let order: Vec<ChunkId> = plan
            .map
            .data()
            .map(|(_, c)| c)
            .filter(|c| seen.insert(*c))
            .collect();
        let mut opts = ImportOptions::new(name.unwrap_or(&row.name));
        opts.kind = ImageType::parse(&row.kind)?;
        opts.description = row.description.clone();
        opts.vendor = row.vendor.clone();
        opts.application = row.application.clone();
        opts.app_version = row.app_version.clone();
        opts.parent = Some((row.id.to_string(), row.name.clone()));
        let mut report = None;
        let id = create_image(
            &dst.repo,
            dst.account(),
            &opts,
            &row.source_format,
            |guard| {
                report = Some(self.send(&dst, &row, &plan, &order, guard.id, progress)?);
                Ok(())
            },
        )?;
        let mut rep = report.expect("set by a successful copy");
        catalog::record_copy(
            &self.repo.conn,
            &row.id,
            &dst.root().display().to_string(),
            &id,
        )?;
        // The digest is the source's, as recorded: every chunk sent was
        // checked against its hash, and materialisation checks the digest.
        rep.image = dst.image(id.as_str())?;
        Ok(rep)
    }

    /// Sends what the target lacks and makes the new image `id` available
    /// there (one transaction); the caller's guard undoes a failure.
    fn send(
        &self,
        dst: &Depot,
        row: &catalog::ImageRow,
        plan: &Plan,
        order: &[ChunkId],
        id: &ImageId,
        progress: &dyn Progress,
    ) -> Result<CopyReport> {
        let present = present_in(dst, plan, order, id)?;
        // The copy's job names its origin: the same text as the lineage.
        let job = format!("{} {}", self.root().display(), row.id);
        catalog::set_copied_from(&dst.repo.conn, id, &job)?;

        // Send what is missing, frame by frame of the source.
        let missing: Vec<ChunkId> = order
            .iter()
            .copied()
            .filter(|c| !present.contains(c))
            .collect();
        progress.begin("copy", missing.len() as u64 * CHUNK);
        let mut out = Outgoing::new(dst, id, &job);
        let mut rep = CopyReport {
            image: self.image(row.id.as_str())?,
            chunks: order.len() as u64,
            chunks_present: present.len() as u64,
            chunks_sent: 0,
            bytes_sent: 0,
            frames_whole: 0,
        };
        let frames = by_frame(plan, &missing);
        self.send_frames(row, plan, &frames, &mut out, &mut rep, progress)?;
        out.finish()?;
        progress.end();
        make_available(dst, row, plan, order, id, &job)?;
        Ok(rep)
    }

    /// Sends the `chunks` of each source frame: the frame's compressed
    /// bytes as they are when it holds nothing else, the chunks
    /// recompressed into new frames otherwise.
    fn send_frames(
        &self,
        row: &catalog::ImageRow,
        plan: &Plan,
        frames: &[(i64, Vec<ChunkId>)],
        out: &mut Outgoing<'_>,
        rep: &mut CopyReport,
        progress: &dyn Progress,
    ) -> Result<()> {
        let readers = ReaderCache::new(self.repo.store());
        let mut buf = Vec::new();
        let mut fresh = FrameAcc::default();
        for (frame, chunks) in frames {
            let f = &plan.frames[frame];
            let reader = readers.get(f.pack, &plan.packs[&f.pack])?;
            reader.read_frame(f.offset, f.clen, f.nchunks as usize, &mut buf)?;
            check_chunks(row, plan, chunks, &buf)?;
            // Every slot of the frame is a chunk this image needs and the
            // target lacks (`chunks` are distinct): send the frame as it is.
            if chunks.len() == f.nchunks as usize {
                let bytes = reader.frame_bytes(f.offset, f.clen)?.to_vec();
                rep.bytes_sent += bytes.len() as u64;
                out.push(bytes, slot_hashes(plan, chunks, f.nchunks))?;
                rep.frames_whole += 1;
            } else {
                for &c in chunks {
                    let loc = &plan.chunks[&c];
                    let s = loc.slot as usize * CHUNK_SIZE;
                    rep.bytes_sent += fresh.add(&buf[s..s + CHUNK_SIZE], loc.hash, out)?;
                }
            }
            rep.chunks_sent += chunks.len() as u64;
            progress.advance(chunks.len() as u64 * CHUNK);
        }
        rep.bytes_sent += fresh.flush(out)?;
        Ok(())
    }
}

/// The chunks of `order` the target already has (committed, or brought
/// by an earlier run of this copy), in one read transaction.
fn present_in(
    dst: &Depot,
    plan: &Plan,
    order: &[ChunkId],
    id: &ImageId,
) -> Result<HashSet<ChunkId>> {
    catalog::read(&dst.repo.conn, |tx| {
        let mut p = HashSet::new();
        for &c in order {
            if catalog::chunk_by_hash(tx, &plan.chunks[&c].hash, id)?.is_some() {
                p.insert(c);
            }
        }
        Ok(p)
    })
}

/// The `missing` chunks grouped by their source frame, frames in the
/// order their first chunk comes.
fn by_frame(plan: &Plan, missing: &[ChunkId]) -> Vec<(i64, Vec<ChunkId>)> {
    let mut out: Vec<(i64, Vec<ChunkId>)> = Vec::new();
    let mut idx: HashMap<i64, usize> = HashMap::new();
    for &c in missing {
        let f = plan.chunks[&c].frame;
        let i = *idx.entry(f).or_insert_with(|| {
            out.push((f, Vec::new()));
            out.len() - 1
        });
        out[i].1.push(c);
    }
    out
}

/// Every chunk sent is checked against its hash first: `buf` holds the
/// decompressed frame of `chunks`.
fn check_chunks(
    row: &catalog::ImageRow,
    plan: &Plan,
    chunks: &[ChunkId],
    buf: &[u8],
) -> Result<()> {
    for &c in chunks {
        let loc = &plan.chunks[&c];
        let s = loc.slot as usize * CHUNK_SIZE;
        if ChunkHash::of(&buf[s..s + CHUNK_SIZE]) != loc.hash {
            return Err(Error::Corrupt {
                image: format!("{} ({})", row.name, row.id),
                offset: plan.map.data().find(|&(_, x)| x == c).map_or(0, |(b, _)| b) * CHUNK,
                detail: format!("stored chunk {c} does not match its hash; not copied"),
            });
        }
    }
    Ok(())
}

/// The hash of each of a frame's `nchunks` slots, all of them `chunks`.
fn slot_hashes(plan: &Plan, chunks: &[ChunkId], nchunks: u32) -> Vec<ChunkHash> {
    let mut hashes = vec![UNUSED_SLOT; nchunks as usize];
    for &c in chunks {
        let loc = &plan.chunks[&c];
        hashes[loc.slot as usize] = loc.hash;
    }
    hashes
}

/// The image `id` made available in the target, in one transaction, if
/// every chunk is there: its map in the target's chunk ids, the copy's
/// `copy_chunks` names dropped, its manifest written.
fn make_available(
    dst: &Depot,
    row: &catalog::ImageRow,
    plan: &Plan,
    order: &[ChunkId],
    id: &ImageId,
    job: &str,
) -> Result<()> {
    let tx = catalog::begin_write(&dst.repo.conn)?;
    let mut ids: HashMap<ChunkId, ChunkId> = HashMap::with_capacity(order.len());
    for &c in order {
        let Some(t) = catalog::chunk_by_hash(&tx, &plan.chunks[&c].hash, id)? else {
            return Err(Error::Invalid(format!(
                "copy of {} ({}): a chunk vanished from {} meanwhile (a gc there?): run the copy again",
                row.name,
                row.id,
                dst.root().display()
            )));
        };
        ids.insert(c, t);
    }
    let map = plan.map.map_ids(|c| ids[&c]);
    // The image holds them now; gc needs no reminder.
    catalog::delete_copy_chunks(&tx, job)?;
    catalog::set_available(
        &tx,
        id,
        row.virtual_size,
        row.data_bytes,
        row.content_digest.as_deref().unwrap_or_default(),
        &map,
    )?;
    let manifest = crate::repo::manifest::write_next(&tx, dst.root(), dst.perms(), id)?;
    tx.commit()?;
    manifest.committed();
    Ok(())
}

/// New chunks gathered for one recompressed frame.
#[derive(Default)]
struct FrameAcc {
    data: Vec<u8>,
    hashes: Vec<ChunkHash>,
}

impl FrameAcc {
    /// Adds a chunk; when the frame is full, sends it (returns the
    /// compressed bytes sent, 0 otherwise).
    fn add(&mut self, data: &[u8], hash: ChunkHash, out: &mut Outgoing<'_>) -> Result<u64> {
        self.data.extend_from_slice(data);
        self.hashes.push(hash);
        if self.hashes.len() >= FRAME_CHUNKS {
            return self.flush(out);
        }
        Ok(0)
    }

    /// Compresses and sends the gathered chunks as one frame; returns its
    /// compressed bytes.
    fn flush(&mut self, out: &mut Outgoing<'_>) -> Result<u64> {
        if self.hashes.is_empty() {
            return Ok(0);
        }
        let c = store::compress_frame(&self.data, ZSTD_LEVEL).at(out.depot.root())?;
        let n = c.len() as u64;
        out.push(c, std::mem::take(&mut self.hashes))?;
        self.data.clear();
        Ok(n)
    }
}

/// Frames on their way into the target: one pack at a time (registered
/// pending), entered (as committed chunks) when it is full and sealed, and
/// at the end.
struct Outgoing<'a> {
    depot: &'a Depot,
    id: &'a ImageId,
    job: &'a str,
    packs: PackRotator<'a, i64>,
    frames: Vec<(u64, u64, Vec<ChunkHash>)>,
}

impl<'a> Outgoing<'a> {
    fn new(depot: &'a Depot, id: &'a ImageId, job: &'a str) -> Outgoing<'a> {
        let conn = &depot.repo.conn;
        Outgoing {
            depot,
            id,
            job,
            packs: PackRotator::new(
                depot.repo.store(),
                Box::new(move |name: &str| catalog::insert_pending_pack(conn, name, id)),
            ),
            frames: Vec::new(),
        }
    }

    fn push(&mut self, bytes: Vec<u8>, hashes: Vec<ChunkHash>) -> Result<()> {
        let placed = self.packs.append(&bytes, &hashes)?;
        self.frames
            .push((placed.offset, bytes.len() as u64, hashes));
        match placed.sealed {
            Some(s) => self.enter(s),
            None => Ok(()),
        }
    }

    /// One transaction once a pack is sealed: its frames, their chunks
    /// (committed; content that arrived meanwhile is skipped), the pack
    /// sealed.
    fn enter(&mut self, sealed: Sealed<i64>) -> Result<()> {
        let Sealed { pack: pid, size } = sealed;
        let frames = std::mem::take(&mut self.frames);
        catalog::write(&self.depot.repo.conn, |tx| {
            let mut ins = catalog::CopyInserter::new(tx, self.job)?;
            for (off, clen, hashes) in &frames {
                let fid = ins.frame(pid, *off, *clen, hashes.len())?;
                for (slot, h) in hashes.iter().enumerate() {
                    if *h == UNUSED_SLOT || catalog::chunk_by_hash(tx, h, self.id)?.is_some() {
                        continue; // a slot this copy does not need, or already there
                    }
                    ins.chunk(h, fid, slot)?;
                }
            }
            catalog::seal_copied_pack(tx, pid, size)
        })
    }

    /// Seals and enters the last pack.
    fn finish(&mut self) -> Result<()> {
        match self.packs.finish()? {
            Some(s) => self.enter(s),
            None => Ok(()),
        }
    }
}
