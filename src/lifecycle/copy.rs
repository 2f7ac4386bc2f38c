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

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use crate::catalog;
use crate::depot::access::Op;
use crate::depot::{Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, Result};
use crate::format::CHUNK;
use crate::ids::{ChunkHash, ChunkId, ImageId};
use crate::image::create::create_image;
use crate::image::export::Plan;
use crate::progress::Progress;

use super::transfer::{
    make_available, plan_order, present_in, send_plan, Content, LocalSink, Sender,
};

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
        let mut opts = ImportOptions::new(name.unwrap_or(&row.name));
        opts.kind = ImageType::parse(&row.kind)?;
        opts.description = row.description.clone();
        opts.vendor = row.vendor.clone();
        opts.application = row.application.clone();
        opts.app_version = row.app_version.clone();
        opts.tags = catalog::images::tags_of(&self.repo.conn, row.id.as_str())?
            .into_iter()
            .collect();
        opts.parent = Some((row.id.to_string(), row.name.clone()));
        let mut report = None;
        let id = create_image(
            &dst.repo,
            dst.account(),
            &opts,
            &row.source_format,
            |guard| {
                report = Some(self.send(&dst, &row, &plan, guard.id, progress)?);
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
        id: &ImageId,
        progress: &dyn Progress,
    ) -> Result<CopyReport> {
        let order = plan_order(plan);
        let hashes: Vec<ChunkHash> = order.iter().map(|c| plan.chunks[c].hash).collect();
        let present = present_in(dst, &hashes, id)?;
        // The copy's job names its origin: the same text as the lineage.
        let job = format!("{} {}", self.root().display(), row.id);
        catalog::set_copied_from(&dst.repo.conn, id, &job)?;

        // Send what is missing, frame by frame of the source.
        let missing: Vec<ChunkId> = order
            .iter()
            .copied()
            .filter(|c| !present.contains(&plan.chunks[c].hash))
            .collect();
        progress.begin("copy", missing.len() as u64 * CHUNK);
        let mut sink = LocalSink::new(dst, id, &job);
        let mut sender = Sender::new(&mut sink, progress);
        send_plan(self, row, plan, &missing, &mut sender)?;
        let sent = sender.finish()?;
        progress.end();
        let content = Content {
            virtual_size: row.virtual_size,
            data_bytes: row.data_bytes,
            digest: row.content_digest.as_deref().unwrap_or_default(),
            hashes: &hashes,
        };
        let what = format!("copy of {} ({})", row.name, row.id);
        let map =
            |ids: &HashMap<ChunkHash, ChunkId>| plan.map.map_ids(|c| ids[&plan.chunks[&c].hash]);
        make_available(dst, id, &job, &what, &content, map, |_| Ok(()))?;
        Ok(CopyReport {
            image: self.image(row.id.as_str())?,
            chunks: order.len() as u64,
            chunks_present: present.len() as u64,
            chunks_sent: sent.chunks,
            bytes_sent: sent.bytes,
            frames_whole: sent.frames_whole,
        })
    }
}
