//! The crate's error type.
//!
//! Policy: every public function returns [`Result`]. Messages name the image,
//! file or byte offset involved and, where there is one, the fix. The binary
//! wraps these with `anyhow` context and prints them with `{:#}`.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in vmdepot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    /// (The OS error is part of the message, not a separate source: the
    /// CLI prints the chain, which would say it twice.)
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The filesystem holding the depot is full.
    #[error("no space left on the device holding {path}: free some space (or run `vmdepot gc`) and retry; nothing was changed")]
    NoSpace { path: PathBuf },
    /// The SQLite catalog failed.
    #[error("catalog: {0}")]
    Sqlite(rusqlite::Error),
    /// A catalog schema migration failed.
    #[error("catalog migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// No image has this id or name.
    #[error("no image named or with id {0:?}: see `vmdepot image list`")]
    ImageNotFound(String),
    /// No instance has this id or name.
    #[error("no instance named or with id {0:?}: see `vmdepot instance list`")]
    InstanceNotFound(String),
    /// The image exists but is not in a state that allows the operation.
    #[error("image {image} is {state}, not available")]
    ImageNotAvailable { image: String, state: String },
    /// An image name is already taken by one of the account's images
    /// (`existing`: that image).
    #[error("an image named {name:?} already exists ({existing}): pick another --name or delete that image first")]
    NameTaken { name: String, existing: String },
    /// A public or marketplace name is taken by another public or
    /// marketplace image (of any owner).
    #[error("the name {name:?} is taken by {existing}: public and marketplace names are unique across accounts; pick another --name")]
    PublicNameTaken { name: String, existing: String },
    /// A name matches several images the account sees.
    #[error("the name {name:?} matches several images: {matches}; use the id")]
    AmbiguousName { name: String, matches: String },
    /// An input file was refused before it was read as a disk.
    #[error("refused {file}: {reason}")]
    Refused { file: PathBuf, reason: String },
    /// An input file is damaged or not what it claims to be.
    #[error("{file}: {reason}")]
    BadInput { file: PathBuf, reason: String },
    /// Stored data does not match its hash.
    #[error("image {image}: corrupt data at byte offset {offset}: {detail}")]
    Corrupt {
        image: String,
        offset: u64,
        detail: String,
    },
    /// The store is damaged outside of any one image.
    #[error("store damaged: {0}")]
    StoreDamaged(String),
    /// An external tool (qemu-img) failed or is missing.
    #[error("{tool}: {detail}")]
    Tool { tool: String, detail: String },
    /// The acting account may not do this (the message names the rule).
    #[error("{0}")]
    NotPermitted(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A malformed argument (an account name, `--group` on an existing
    /// depot): exit code 2, as for command-line usage errors.
    #[error("{0}")]
    Usage(String),
    /// Internal: a concurrent gc removed chunks this import referenced; the
    /// import starts over (never escapes `Depot::import`).
    #[error("chunks referenced by this import were collected by a concurrent gc")]
    ChunksVanished,
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Error::NoSpace {
                path: "the depot's catalog".into(),
            },
            _ => Error::Sqlite(e),
        }
    }
}

impl Error {
    /// Wraps an I/O error with the file it happened on, turning ENOSPC into
    /// [`Error::NoSpace`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            Error::NoSpace { path }
        } else {
            Error::Io {
                path,
                error: source,
            }
        }
    }

    /// Exit code for scripts: 1 generic (a taken name too), 2 usage (a
    /// name that matches several images), 3 not found, 4 refused/bad
    /// input, 5 corrupt store, 6 no space, 7 not permitted for this
    /// account.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::AmbiguousName { .. } => 2,
            Error::ImageNotFound(_) | Error::InstanceNotFound(_) => 3,
            Error::Refused { .. } | Error::BadInput { .. } => 4,
            Error::Corrupt { .. } | Error::StoreDamaged(_) => 5,
            Error::NoSpace { .. } => 6,
            Error::NotPermitted(_) => 7,
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// Extension to attach a path to `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
