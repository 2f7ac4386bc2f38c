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
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The filesystem holding the depot is full.
    #[error("no space left on the device holding {path}: run `vmdepot gc` (after `vmdepot image delete` of images no longer needed) or free some space on that filesystem, and retry")]
    NoSpace {
        /// The file being written when the space ran out.
        path: PathBuf,
    },
    /// The filesystem holding an output outside the depot (an export's
    /// destination) is full: gc cannot help there.
    #[error("no space left on the filesystem holding {path} (not the depot's filesystem): free space there, or export somewhere else, and retry")]
    NoSpaceTarget {
        /// The output file.
        path: PathBuf,
    },
    /// The SQLite catalog failed.
    #[error("catalog: {0}")]
    Sqlite(rusqlite::Error),
    /// A catalog schema migration failed.
    #[error("catalog migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    /// No image has this id or name.
    #[error("no image named or with id {0:?}: see `vmdepot image list`")]
    ImageNotFound(String),
    /// No image of a remote depot has this id or name (for this account).
    #[error("no image named or with id {image:?} on remote {remote}: see `vmdepot image list --remote {remote}`")]
    RemoteImageNotFound {
        /// The remote's name.
        remote: String,
        /// The reference asked.
        image: String,
    },
    /// No instance has this id or name.
    #[error("no instance named or with id {0:?}: see `vmdepot instance list`")]
    InstanceNotFound(String),
    /// No remote of this name is configured (the message says how to add
    /// one).
    #[error("{0}")]
    RemoteNotFound(String),
    /// A command that only looks at a depot found none at this path (it
    /// creates none).
    #[error("no depot at {}: check --depot (or VMDEPOT_DIR); a depot is created by the first command that writes to it, such as `vmdepot image import`", path.display())]
    DepotNotFound {
        /// The directory asked for.
        path: PathBuf,
    },
    /// The image exists but is not in a state that allows the operation.
    #[error("image {image} is {state}, not available")]
    ImageNotAvailable {
        /// `NAME (ID)`.
        image: String,
        /// Its state as users see it (`creating`, `partial` with the hint).
        state: String,
    },
    /// An image name is already taken by one of the account's images
    /// (`existing`: that image).
    #[error("an image named {name:?} already exists ({existing}): pick another --name or delete that image first")]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The image that has it (`ID, TYPE`), or why none can be named.
        existing: String,
    },
    /// A public or marketplace name is taken by another public or
    /// marketplace image (of any owner).
    #[error("the name {name:?} is taken by {existing}: public and marketplace names are unique across accounts; pick another --name")]
    PublicNameTaken {
        /// The name asked for.
        name: String,
        /// `TYPE image ID of OWNER`: the image that has it.
        existing: String,
    },
    /// A name matches several images the account sees.
    #[error("the name {name:?} matches several images: {matches}; use the id")]
    AmbiguousName {
        /// The name asked for.
        name: String,
        /// The images it matches, oldest first (ids, types and owners).
        matches: String,
    },
    /// An input file was refused before it was read as a disk.
    #[error("refused {file}: {reason}")]
    Refused {
        /// The input or destination file.
        file: PathBuf,
        /// Why it was refused, and what to do instead.
        reason: String,
    },
    /// An input file is damaged or not what it claims to be.
    #[error("{file}: {reason}")]
    BadInput {
        /// The input file.
        file: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Stored data does not match its hash.
    #[error("image {image}: corrupt data at byte offset {offset}: {detail}")]
    Corrupt {
        /// `NAME (ID)` of the image whose data it is.
        image: String,
        /// Byte offset in the image of the damaged block (0 when the damage
        /// is not one block's, such as a wrong content digest).
        offset: u64,
        /// What is wrong (which chunk, pack or frame, and how).
        detail: String,
    },
    /// The store is damaged outside of any one image.
    #[error("store damaged: {0}")]
    StoreDamaged(String),
    /// An external tool (qemu-img) failed or is missing.
    #[error("{tool}: {detail}")]
    Tool {
        /// The tool (`qemu-img info`, `qemu-img map`, …).
        tool: String,
        /// What went wrong, naming the file it worked on.
        detail: String,
    },
    /// The acting account may not do this (the message names the rule).
    #[error("{0}")]
    NotPermitted(String),
    /// The state of an image or instance refuses the operation, whoever
    /// asks (it is protected, shared, in use, being read): exit code 1, and
    /// the message names what to do first.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong.
    #[error("{0}")]
    Invalid(String),
    /// A malformed argument (an account name, `--group` on an existing
    /// depot): exit code 2, as for command-line usage errors.
    #[error("{0}")]
    Usage(String),
    /// Waiting for a line on an instance's serial console ran out of time
    /// (QEMU still runs).
    #[error("instance {instance}: timed out after {waited:?} before {needle:?} appeared on its serial console (last lines: {last:?})")]
    Timeout {
        /// `NAME (ID)`.
        instance: String,
        /// The text waited for.
        needle: String,
        /// How long it waited.
        waited: std::time::Duration,
        /// The console's last lines.
        last: String,
    },
    /// The instance's QEMU exited while something waited for the guest.
    #[error("instance {instance}: QEMU exited before {needle:?} appeared on its serial console (last lines: {last:?}); `vmdepot instance logs` shows the console")]
    GuestExited {
        /// `NAME (ID)`.
        instance: String,
        /// The text waited for.
        needle: String,
        /// The console's last lines.
        last: String,
    },
    /// [`crate::Depot::ensure_imported`]: an image of that name exists with
    /// other content than the file. Exit code 1.
    #[error("image {image} exists with other content than {}: delete it first (`vmdepot image delete`) or import the file under another name", .file.display())]
    ContentDiffers {
        /// `NAME (ID)` of the existing image.
        image: String,
        /// The file.
        file: PathBuf,
    },
    /// An instance's QEMU did not start (it exited, or never answered):
    /// QEMU's own words in `detail`. The instance is `failed`, with the
    /// same words as its error.
    #[error("instance {instance} did not start: {detail}")]
    QemuFailed {
        /// `NAME (ID)`.
        instance: String,
        /// What QEMU said (its first lines), or why it was given up on.
        detail: String,
    },
    /// Another client (an `instance console`, another harness) holds the
    /// instance's serial console: QEMU serves one at a time.
    #[error("the console of instance {instance} is busy: another client is attached; detach it first (Ctrl-] in its `vmdepot instance console`)")]
    ConsoleBusy {
        /// `NAME (ID)`.
        instance: String,
    },
    /// Stopping an instance had to kill its QEMU: the guest was still
    /// running `waited` after its power button was pressed (a guest that is
    /// still booting may not listen to the button yet), or, with `waited`
    /// `None`, QMP did not take the press. The instance is stopped.
    #[error("instance {instance} {} and was killed (it is stopped){}", ignored_how(.waited), ignored_fix(.waited))]
    PowerButtonIgnored {
        /// `NAME (ID)`.
        instance: String,
        /// How long the guest had after the press.
        waited: Option<std::time::Duration>,
    },
    /// A remote depot (S3-compatible object storage) failed: the request
    /// was refused (wrong credentials, missing bucket), the endpoint is
    /// unreachable, or the retries gave up. Exit code 8. The message is
    /// one line: what failed, on which object or bucket, the HTTP status
    /// or cause, and the fix.
    #[error("remote {remote}: {message}")]
    Remote {
        /// The remote's name.
        remote: String,
        /// What failed, on which object, and the fix.
        message: String,
    },
    /// Internal: a concurrent gc removed chunks this import referenced; the
    /// import starts over (never escapes `Depot::import`).
    #[error("chunks referenced by this import were collected by a concurrent gc")]
    ChunksVanished,
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        use rusqlite::ErrorCode;
        let extended = match &e {
            rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
            _ => 0,
        };
        let not_utf8 = match &e {
            rusqlite::Error::Utf8Error(_) => true,
            rusqlite::Error::FromSqlConversionFailure(_, _, err) => {
                err.downcast_ref::<std::str::Utf8Error>().is_some()
                    || err.downcast_ref::<std::string::FromUtf8Error>().is_some()
            }
            _ => false,
        };
        match e.sqlite_error_code() {
            // SHMSIZE: SQLite could not extend catalog.db-shm (ENOSPC).
            Some(ErrorCode::DiskFull) => Error::NoSpace {
                path: "the depot's catalog".into(),
            },
            _ if extended == rusqlite::ffi::SQLITE_IOERR_SHMSIZE => Error::NoSpace {
                path: "the depot's catalog".into(),
            },
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                Error::StoreDamaged(format!(
                    "catalog: {e}: the catalog file catalog.db is damaged; restore it (and catalog.db-wal if the backup has one) from a backup"
                ))
            }
            _ if not_utf8 => Error::StoreDamaged(format!(
                "catalog: a value is not UTF-8 text ({e}): the catalog is damaged; `vmdepot fsck` names damaged image rows; restore catalog.db from a backup"
            )),
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

    /// [`Error::Refused`]: the input or destination `file`, and why.
    pub(crate) fn refused(file: &std::path::Path, reason: impl Into<String>) -> Error {
        Error::Refused {
            file: file.to_owned(),
            reason: reason.into(),
        }
    }

    /// Exit code for scripts: 1 generic (a taken name, an image protected,
    /// shared or in use too), 2 usage (a name that matches several images),
    /// 3 not found (an image, instance, remote or depot), 4 refused/bad
    /// input, 5 corrupt store, 6 no space, 7 not permitted for this
    /// account, 8 a remote depot failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::AmbiguousName { .. } => 2,
            Error::ImageNotFound(_) | Error::InstanceNotFound(_) => 3,
            Error::RemoteImageNotFound { .. }
            | Error::RemoteNotFound(_)
            | Error::DepotNotFound { .. } => 3,
            Error::Refused { .. } | Error::BadInput { .. } => 4,
            Error::Corrupt { .. } | Error::StoreDamaged(_) => 5,
            Error::NoSpace { .. } | Error::NoSpaceTarget { .. } => 6,
            Error::NotPermitted(_) => 7,
            Error::Remote { .. } => 8,
            Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// What the guest did with the power button ([`Error::PowerButtonIgnored`]).
fn ignored_how(waited: &Option<std::time::Duration>) -> String {
    match waited {
        Some(w) => format!("ignored the power button for {} s", w.as_secs()),
        None => "did not take the power button (its QMP socket did not answer)".to_owned(),
    }
}

/// The advice of [`Error::PowerButtonIgnored`].
fn ignored_fix(waited: &Option<std::time::Duration>) -> &'static str {
    match waited {
        Some(_) => {
            ": a guest still booting may not listen to it yet (a longer --timeout gives it time; --force kills at once)"
        }
        None => "",
    }
}

/// `s` on one line: line breaks and other control characters as spaces
/// (for log lines).
pub(crate) fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control())
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
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
