//! Maintenance: garbage collection, fsck, whole-store verify and stats.
//!
//! Main items: `gc` (a plan, then its application: `gc.rs`, with the
//! repack in `repack.rs`), `fsck`, `verify_all`, `stats` and
//! `usage` (who refers to which stored bytes), and [`repair`]. The
//! catalog's rows are read and written through [`crate::catalog`] (no SQL
//! here), the packs through the repository's [`ObjectStore`].
//!
//! **gc × import**: gc marks in a read snapshot (nobody waits for it), then
//! sweeps in one short `BEGIN IMMEDIATE` transaction in which images that
//! became available after the snapshot keep their chunks, and chunks entered
//! after it are not candidates. An import that reused a chunk gc then
//! collected notices at its own commit (it re-checks every reused chunk
//! inside its transaction) and starts over. A running import is recognised
//! by its lock file (`locks/<image>.lock`, flocked by the importer); only
//! imports whose lock is free are reaped. One gc runs at a time
//! (`gc.lock`); repacking copies frames outside any catalog lock.

mod fsck;
mod gc;
mod repack;
pub mod repair;
mod stats;
mod verify;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::Result;
use crate::ids::ImageId;
pub use crate::image::export::VerifyReport;
use crate::store::{ObjectInfo, ObjectKind, ObjectStore};
pub(crate) use fsck::fsck;
pub(crate) use gc::gc;
pub(crate) use stats::{stats, usage};
pub(crate) use verify::verify_all;

/// Result of `gc`: what it did, or with `dry_run` what it would do (its
/// plan).
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    /// Whether this is the plan only (`gc --dry-run`): nothing was changed.
    pub dry_run: bool,
    /// Imports and captures whose process died, whose leftovers were
    /// removed.
    pub abandoned_imports: u64,
    /// Chunks no image uses any more, removed from the catalog.
    pub chunks_removed: u64,
    /// Chunks that held the same content as another (two imports running
    /// at once each stored it): images now use one, the other is removed.
    pub chunks_merged: u64,
    /// Frames none of whose chunks is used any more.
    pub frames_removed: u64,
    /// Pack files removed: no live frame was left in them.
    pub packs_removed: u64,
    /// Packs less than half live whose live frames were copied to new packs.
    pub packs_repacked: u64,
    /// Bytes of pack files freed (removed, or repacked into smaller ones).
    pub bytes_freed: u64,
    /// Dead bytes left in packs that are at least half live.
    pub bytes_in_partly_live_packs: u64,
    /// Raw bases (launch cache) that no instance uses, and their bytes.
    pub bases_evicted: u64,
    /// Bytes of the raw bases evicted.
    pub base_bytes_freed: u64,
}

/// Result of `fsck`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    /// Damage: something an image needs is missing or inconsistent.
    pub problems: Vec<String>,
    /// Leftovers that `gc` removes (killed imports, unreferenced packs).
    pub garbage: Vec<String>,
    /// What a lost catalog could not be rebuilt from (an image without a
    /// manifest, a pack without an index): `fsck --repair` writes them.
    pub warnings: Vec<String>,
    /// Images checked.
    pub images: u64,
    /// Pack files checked.
    pub packs: u64,
    /// Chunks the catalog knows.
    pub chunks: u64,
}

impl FsckReport {
    /// Whether fsck found no damage (garbage and warnings do not count).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Per-image stored bytes.
#[derive(Clone, Debug, Serialize)]
pub struct ImageStats {
    /// The image's id.
    pub id: String,
    /// The image's name.
    pub name: String,
    /// Size of its disk, in bytes.
    pub virtual_size: u64,
    /// Bytes of the image in non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Stored (compressed) bytes no other image refers to.
    pub unique_stored_bytes: u64,
    /// Stored bytes it shares with other images.
    pub shared_stored_bytes: u64,
}

/// Result of `stats`.
#[derive(Clone, Debug, Serialize)]
pub struct Stats {
    /// Available images counted (partial, unfinished and damaged ones are
    /// not; so in every sum below).
    pub images: u64,
    /// Sum of the images' virtual sizes.
    pub logical_bytes: u64,
    /// Sum of the images' non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Distinct chunks stored, times 4 KiB.
    pub unique_chunk_bytes: u64,
    /// Distinct chunks stored.
    pub chunks: u64,
    /// Bytes of pack files on disk.
    pub stored_bytes: u64,
    /// Bytes of the SQLite catalog (with its WAL).
    pub catalog_bytes: u64,
    /// Bytes of the pack index files (`packs/XX/NAME.idx`).
    pub index_bytes: u64,
    /// Bytes of the image manifests (`manifests/`).
    pub manifest_bytes: u64,
    /// data_bytes / unique_chunk_bytes.
    pub dedup_ratio: f64,
    /// unique_chunk_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// logical_bytes / (stored_bytes + catalog_bytes + index_bytes +
    /// manifest_bytes).
    pub overall_ratio: f64,
    /// Images left out because their catalog row or map is damaged (see
    /// `fsck`).
    pub damaged_images: Vec<String>,
    /// Each counted image's sizes, oldest first.
    pub per_image: Vec<ImageStats>,
}

/// Who uses which stored bytes.
pub struct Usage {
    /// image -> (unique stored bytes, shared stored bytes)
    pub per_image: HashMap<ImageId, (u64, u64)>,
    /// Images whose row or block map is damaged, and why (they count for
    /// nothing here; fsck reports them).
    pub damaged: HashMap<ImageId, String>,
}

/// The store's packs, and the names of the indexes whose pack is gone.
/// Indexes are listed first: an index is written after its pack and
/// deleted after it, so one whose pack the later listing lacks is garbage.
fn list_packs(store: &dyn ObjectStore) -> Result<(Vec<ObjectInfo>, Vec<String>)> {
    let indexes = store.list(ObjectKind::PackIndex)?;
    let packs = store.list(ObjectKind::Pack)?;
    let names: HashSet<&str> = packs.iter().map(|p| p.name.as_str()).collect();
    let orphans = indexes
        .into_iter()
        .map(|ix| ix.name)
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    Ok((packs, orphans))
}
