//! vmdepot: an embedded, local machine-image service for a hypervisor host.
//!
//! The library is the product; the `vmdepot` binary is a thin shell over it.
//! The main type is [`Depot`]: open a directory, then [`Depot::import`],
//! [`Depot::export`], [`Depot::verify`], [`Depot::gc`], [`Depot::fsck`] and
//! [`Depot::stats`]; instances with [`Depot::launch`] (an [`Instance`] handle
//! waits for serial output and, if ephemeral, dies with its QEMU); the image
//! lifecycle with [`Depot::capture`], [`Depot::backup_instance`],
//! [`Depot::restore_instance`], [`Depot::copy_image`] and sharing, under the
//! rules of `access`. The library never prints: long operations report through
//! the [`Progress`] trait, and every failure is an [`Error`] that names the
//! image, file or offset involved.
//!
//! A test harness's use of the library, end to end:
//!
//! ```
//! use vmdepot::{Depot, ExportFormat, ImportOptions, NoProgress};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! // a small raw disk: 1 MiB of data, then 3 MiB of zeros
//! let disk = dir.path().join("disk.raw");
//! let mut content: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
//! content.resize(4 << 20, 0);
//! std::fs::write(&disk, &content)?;
//!
//! let depot = Depot::open(dir.path().join("depot"))?;
//! let img = depot.import(&disk, &ImportOptions::new("base"), &NoProgress)?;
//! assert_eq!(img.content_digest.as_deref(), Some(blake3::hash(&content).to_hex().as_str()));
//! assert_eq!(img.data_bytes, 1 << 20);
//!
//! let out = dir.path().join("out.raw");
//! depot.export("base", &out, ExportFormat::Raw, &NoProgress)?;
//! assert_eq!(std::fs::read(&out)?, content);
//! depot.verify(Some(&img.id), &NoProgress)?;
//! assert!(depot.fsck()?.is_clean());
//!
//! depot.delete_image("base", false)?;
//! let freed = depot.gc(false)?;
//! assert_eq!(freed.chunks_removed, 256);
//! assert_eq!(depot.stats()?.stored_bytes, 0);
//! # Ok(())
//! # }
//! ```
//!
//! Layers, each depending only on those above it in this list (checked by
//! `tests/it/layers.rs`): [`format`](mod@format) (byte layouts, no I/O), [`digest`],
//! [`store`] (immutable pack objects), [`catalog`] (every SQL statement),
//! [`repo`] (the context below the depot), [`image`] (import, export,
//! sources), [`maint`] (gc, fsck, verify, stats, repair), [`depot`] (the
//! public face and access rules), [`launch`] (QEMU, seeds, instances),
//! [`lifecycle`] (capture, backup, restore, copy). [`error`], [`ids`],
//! [`perms`], [`progress`] and [`proc`] are shared by all.
#![deny(unsafe_code)]

pub mod catalog;
pub mod depot;
pub mod digest;
pub mod error;
pub mod format;
pub mod ids;
pub mod image;
pub mod launch;
pub mod lifecycle;
pub mod maint;
pub mod perms;
pub mod proc;
pub mod progress;
pub mod remote;
pub mod repo;
pub mod store;

pub use depot::{
    check_account, Depot, DepotOptions, HistoryEntry, ImageInfo, ImageKind, ImageState, ImageType,
    ImageUpdate, ImportOptions, Intent, Relation, Timestamp,
};
pub use error::{Error, Result};
pub use ids::{ChunkHash, ImageId};
pub use image::export::{export_file_mode, ExportFormat};
pub use image::source::SourceFormat;
pub use launch::instance::{
    DiskMode, Foreground, Instance, InstanceInfo, InstanceState, LaunchOptions, Launched,
};
pub use launch::qemu::{Accel, Forward};
pub use maint::{FsckReport, GcReport, Stats, VerifyReport};
pub use progress::{NoProgress, Progress};
pub use remote::ondemand::serve_lazy_disks;
