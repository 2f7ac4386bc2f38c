//! Image operations on a repository: what goes in and what comes out.
//!
//! [`source`] opens and inspects an input disk (raw, qcow2, vmdk, vhd, vhdx,
//! vdi) safely and reads it as extents, through [`nbd`] for foreign formats;
//! [`import`] is the pipeline that chunks, deduplicates, compresses and
//! commits an image (also capture's overlay reader); [`export`] writes an
//! image back out as raw or qcow2. Works on a [`crate::repo::Repo`]; knows
//! nothing of accounts, instances or the public `Depot`.

pub mod bases;
pub mod export;
pub mod import;
pub mod nbd;
pub mod reap;
pub mod source;
