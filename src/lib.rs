//! vmdepot: an embedded, local machine-image service for a hypervisor host.
//!
//! The library is the product; the `vmdepot` binary is a thin shell over it.
//! The main type is [`Depot`]: open a directory, then [`Depot::import`],
//! [`Depot::export`], [`Depot::verify`], [`Depot::gc`], [`Depot::fsck`] and
//! [`Depot::stats`]. The library never prints: long operations report through
//! the [`Progress`] trait, and every failure is an [`Error`] that names the
//! image, file or offset involved.
//!
//! Module direction (nothing points backwards): `format` (no I/O) → `digest`
//! → `store` (pack files) → `catalog` (SQLite) → `source` / `import` /
//! `export` / `maint` (image operations) → `depot` (the public face) → CLI.
#![deny(unsafe_code)]

pub mod catalog;
pub mod depot;
pub mod digest;
pub mod error;
pub mod export;
pub mod format;
pub mod ids;
pub mod import;
pub mod maint;
pub mod progress;
pub mod source;
pub mod store;

pub use depot::{Depot, ImageInfo, ImageType, ImportOptions};
pub use error::{Error, Result};
pub use export::ExportFormat;
pub use ids::{ChunkHash, ImageId};
pub use maint::{FsckReport, GcReport, Stats, VerifyReport};
pub use progress::{NoProgress, Progress};
pub use source::SourceFormat;
