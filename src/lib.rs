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
//! `tests/it/layers.rs`): `format` (byte layouts, no I/O), `digest`,
//! `store` (immutable pack objects), `catalog` (every SQL statement),
//! `repo` (the context below the depot), `image` (import, export,
//! sources), `maint` (gc, fsck, verify, stats, repair), `depot` (the
//! public face and access rules), `launch` (QEMU, seeds, instances),
//! `lifecycle` (capture, backup, restore, copy), `build` (images built
//! from the distribution's packages), `remote` (remote depots).
//! `error`, `ids`, `perms`, `progress` and `proc` are shared by all. The
//! modules are private: the API is what this page lists, re-exported here.
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod build;
mod catalog;
mod depot;
mod digest;
mod error;
mod format;
mod ids;
mod image;
#[doc(hidden)]
pub mod internals;
mod launch;
mod lifecycle;
mod maint;
mod perms;
mod proc;
mod progress;
mod remote;
mod repo;
mod store;

pub use build::{check_package, BuildOptions, RECIPE_TAGS, SYSTEMS};
pub use depot::access::Op;
pub use depot::{
    check_account, Depot, DepotOptions, HistoryEntry, ImageInfo, ImageKind, ImageState, ImageType,
    ImageUpdate, ImportOptions, Intent, Relation, Timestamp,
};
pub use error::{Error, Result};
pub use image::export::{export_file_mode, ExportFormat};
pub use image::source::SourceFormat;
pub use launch::firmware::{Firmware, FIRMWARE_TAG};
pub use launch::instance::{
    console_attached, press_power_button, DiskMode, Foreground, Instance, InstanceInfo,
    InstanceState, LaunchOptions, Launched, SerialLines, SSH_USER_TAG, STOP_TIMEOUT,
};
pub use launch::qemu::{
    parse_memory, sd_notify_ready, Accel, Forward, MAX_COUNT, MAX_CPUS, MIN_MEMORY_MIB,
};
pub use launch::seed::{MAX_SSH_KEY, MAX_USER_DATA};
pub use launch::ssh::shell_quote;
pub use lifecycle::copy::CopyReport;
pub use lifecycle::CaptureOptions;
pub use maint::repair::RepairReport;
pub use maint::{FsckReport, GcReport, ImageStats, Stats, VerifyReport};
pub use progress::{NoProgress, Progress};
pub use remote::ondemand::serve_lazy_disks;
pub use remote::{
    grace as remote_grace, Listing, PullReport, PushReport, PushedImage, Remote, RemoteGcReport,
    RemoteImage, RemoteInfo,
};
