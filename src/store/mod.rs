//! The chunk store: immutable objects (packs of zstd frames and their
//! indexes) behind a storage trait. It knows nothing of images or of the
//! catalog: which frame holds which chunk is the catalog's business.
//!
//! Main types: [`ObjectStore`], the seam (write-once objects by
//! [`ObjectKind`] and name, written through an [`ObjectWriter`], read by
//! range through an [`ObjectReader`], listed, deleted with a grace period:
//! see its doc); [`LocalDir`], its implementation on a depot directory
//! (`packs/XX/NAME.pack` and `packs/XX/NAME.idx`, docs/FORMAT.md; the only
//! mmap); [`PackWriter`] and [`PackReader`], a pack over any store;
//! [`PackRotator`], the one writer of packs that rotates at
//! [`crate::format::PACK_TARGET_BYTES`]; [`ReaderCache`], the packs an
//! operation has open; [`S3Store`], the store of a remote depot on
//! S3-compatible object storage, at an [`S3Location`].
//!
//! A pack is written once, sealed (durable) with its index, and never
//! modified after that; gc deletes whole packs.

mod cache;
mod local;
#[cfg(test)]
mod memory;
mod object;
mod pack;
mod rotate;
mod s3;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::Path;

pub use cache::ReaderCache;
pub use local::LocalDir;
#[cfg(test)]
pub use memory::MemoryStore;
pub use object::{
    ObjectInfo, ObjectKind, ObjectReader, ObjectStore, ObjectWriter, RangeBytes, DELETE_GRACE,
};
#[cfg(test)]
pub use pack::PackWriter;
pub use pack::{read_index, remove_pack, write_index, PackReader};
pub use rotate::{PackRotator, Sealed};
pub use s3::{Patience, S3Credentials, S3Location, S3Store};

use crate::error::{Error, IoContext, Result};
use crate::format::CHUNK_SIZE;
use crate::ids::random_hex;

/// Whether `name` is a pack name: 32 lowercase hex digits.
pub fn valid_pack_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A fresh random pack name (32 hex digits).
pub fn new_pack_name() -> String {
    random_hex(16)
}

/// Whether an error is an object (or file) that does not exist.
pub fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound)
}

/// Compresses a frame: `data` is a whole number of chunks.
pub fn compress_frame(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    debug_assert_eq!(data.len() % CHUNK_SIZE, 0);
    zstd::bulk::compress(data, level)
}

/// Why a frame did not decompress to what the catalog says it holds.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// zstd refused the bytes.
    #[error("zstd: {0}")]
    Zstd(std::io::Error),
    /// The frame decompressed to another size than its chunk count's.
    #[error("decompressed to {got} bytes, expected {want}")]
    Size { got: usize, want: usize },
}

/// Decompresses a frame that must hold exactly `nchunks` chunks.
pub fn decompress_frame(
    src: &[u8],
    nchunks: usize,
    out: &mut Vec<u8>,
) -> std::result::Result<(), FrameError> {
    thread_local! {
        // A decompression context per thread, made once: making one per
        // frame was 1% of an export.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let want = nchunks * CHUNK_SIZE;
    out.clear();
    out.reserve(want);
    let got = DCTX.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Decompressor::new().map_err(FrameError::Zstd)?);
        }
        c.as_mut()
            .expect("made above")
            .decompress_to_buffer(src, out)
            .map_err(FrameError::Zstd)
    })?;
    if got != want {
        return Err(FrameError::Size { got, want });
    }
    Ok(())
}

/// fsyncs a directory so that entries created in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}
