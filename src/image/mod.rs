//! Image operations on a repository: what goes in and what comes out.
//!
//! [`source`] opens and inspects an input disk (raw, qcow2, vmdk, vhd, vhdx,
//! vdi) safely and reads it as extents, through [`nbd`] for foreign formats;
//! [`input`] is what an import reads (a source, a raw file, or capture's
//! overlay reader); [`import`] is the pipeline that chunks, deduplicates,
//! compresses and commits an image into a row that [`create`] enters (and
//! undoes on failure) under the rules of [`names`]; [`reap`] cleans up after
//! dead imports; [`export`] writes an image back out as raw or qcow2;
//! [`bases`] keeps the raw launch bases. Works on a [`crate::repo::Repo`];
//! knows nothing of accounts, instances or the public `Depot`.

pub mod bases;
pub mod create;
pub mod export;
pub mod import;
pub mod input;
pub mod lazy;
pub mod names;
pub mod nbd;
pub(crate) mod nbd_server;
pub(crate) mod profile;
pub mod reap;
pub mod serve;
pub mod source;
