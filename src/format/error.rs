//! [`FormatError`]: what a decoder of the on-disk format found wrong, and
//! [`Part`], the structure it was decoding. No I/O: callers add the file or
//! catalog row the bytes came from.

use std::fmt;

/// The structure of docs/FORMAT.md a decoder was reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// A pack file's header.
    Pack,
    /// An image map blob (catalog `images.map`).
    Map,
    /// A pack index file (`packs/XX/NAME.idx`).
    Index,
    /// An image manifest (`manifests/IMAGE.SEQ.manifest`).
    Manifest,
}

impl Part {
    /// How messages name a file of this structure ("not a vmdepot …").
    fn file_name(self) -> &'static str {
        match self {
            Part::Pack => "pack file",
            Part::Map => "image map",
            Part::Index => "pack index",
            Part::Manifest => "image manifest",
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Pack => "pack",
            Part::Map => "image map",
            Part::Index => "pack index",
            Part::Manifest => "manifest",
        })
    }
}

/// Bytes that are not what docs/FORMAT.md describes; the message says what
/// is wrong and in which structure.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its fixed-size header.
    #[error("{part} shorter than its {size}-byte header")]
    Short { part: Part, size: usize },
    /// The magic number is not this structure's.
    #[error("not a vmdepot {} (bad magic)", .part.file_name())]
    BadMagic { part: Part },
    /// A pack header whose chunk size is not 4096.
    #[error("unsupported chunk size {0}")]
    PackChunkSize(u32),
    /// The BLAKE3 the header records does not match the file's bytes.
    #[error("{part}: the file does not match its BLAKE3 in the header")]
    Checksum { part: Part },
    /// Anything else wrong in the structure: truncated, overflowing,
    /// trailing bytes, an undecodable body.
    #[error("{part}: {detail}")]
    Invalid { part: Part, detail: String },
}

/// [`FormatError::Invalid`] of `part`.
pub(crate) fn invalid(part: Part, detail: impl Into<String>) -> FormatError {
    FormatError::Invalid {
        part,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_structure() {
        let short = FormatError::Short {
            part: Part::Index,
            size: 80,
        };
        assert_eq!(
            short.to_string(),
            "pack index shorter than its 80-byte header"
        );
        let magic = FormatError::BadMagic { part: Part::Pack };
        assert_eq!(magic.to_string(), "not a vmdepot pack file (bad magic)");
        assert_eq!(
            invalid(Part::Map, "truncated").to_string(),
            "image map: truncated"
        );
        assert_eq!(
            FormatError::PackChunkSize(512).to_string(),
            "unsupported chunk size 512"
        );
    }
}
