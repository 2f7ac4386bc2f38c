//! Not part of vmdepot's API: what its own fuzz targets (`fuzz/`) and
//! integration tests (`tests/it`) reach below the public face, and nothing
//! else. The parsers of untrusted bytes are fuzzed one by one, and the S3
//! store is tested against a real Garage cluster, without a depot around
//! them. Anything here may change or go in any release.

/// The byte layouts the fuzz targets decode and encode (`format`).
pub mod format {
    pub use crate::format::{
        decode_map, decode_map_within, encode_map, BlockMap, MapBuilder, PackHeader, CHUNK_SIZE,
        MAP_MAGIC_1_0,
    };
}

/// The header checks of input images (`image::source`).
pub mod source {
    pub use crate::image::source::{inspect_headers, open_input};
}

/// The object store and the pack codec (`store`).
pub mod store {
    pub use crate::store::{
        compress_frame, decompress_frame, is_not_found, LocalDir, ObjectInfo, ObjectKind,
        ObjectReader, ObjectStore, ObjectWriter, PackReader, S3Credentials, S3Location, S3Store,
        DELETE_GRACE,
    };
}

pub use crate::perms::Perms;
