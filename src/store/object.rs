//! The storage seam: [`ObjectStore`], a store of immutable objects named by
//! [`ObjectKind`] and name, with [`ObjectWriter`] (an object written once,
//! by appending, then sealed) and [`ObjectReader`] (ranged reads of a
//! sealed object). [`ObjectInfo`] is one entry of a listing.
//!
//! It is shaped for object storage (S3-compatible stores such as Garage):
//! an object is written once and never changed (a writer is a multipart
//! upload there: appends are parts, [`ObjectWriter::seal`] completes it),
//! readers fetch byte ranges (one zstd frame at a time), listing is by kind,
//! and deletion is deferred (see [`ObjectStore::delete`]). Nothing here
//! relies on an unlinked file staying readable; [`super::LocalDir`] says
//! why its immediate unlink keeps the same promise.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::Result;

/// What an object is; each kind is listed on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ObjectKind {
    /// A pack: a header, then zstd frames (docs/FORMAT.md, "Pack files").
    Pack,
    /// A pack's index, named like its pack (docs/FORMAT.md, "Pack index").
    PackIndex,
    /// An image manifest of a remote depot, named
    /// `<img-id>.<seq>.manifest` (docs/FORMAT.md, "Remote depots"). A
    /// local depot keeps its manifests as files (`crate::repo::manifest`):
    /// [`super::LocalDir`] refuses this kind.
    Manifest,
    /// A remote depot's lock and marker objects (`gc.lock`, `VMDEPOT`);
    /// [`super::LocalDir`] refuses this kind.
    Meta,
}

impl ObjectKind {
    /// Every kind.
    pub const ALL: [ObjectKind; 4] = [
        ObjectKind::Pack,
        ObjectKind::PackIndex,
        ObjectKind::Manifest,
        ObjectKind::Meta,
    ];
}

/// One object found by [`ObjectStore::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object's name (for packs and indexes: 32 lowercase hex digits).
    pub name: String,
    /// Its size in bytes now (a pack being written grows).
    pub size: u64,
    /// When it was written (for [`ObjectStore::retired`]: when it was
    /// retired), by the store's clock, where the store tells.
    pub modified: Option<SystemTime>,
}

/// The bytes of a ranged read: mapped from a local file, or fetched.
pub type RangeBytes = Box<dyn std::ops::Deref<Target = [u8]> + Send + Sync>;

/// How long a deleted object stays readable for the readers that opened
/// it before the delete, at least (see [`ObjectStore::delete`]). Longer
/// than any export, copy or verify runs.
pub const DELETE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// An object being written: bytes appended in order, then sealed once.
///
/// An object whose writer is dropped without [`ObjectWriter::seal`] is
/// torn: a remote store never shows it (the multipart upload is aborted or
/// expires); [`super::LocalDir`] leaves the partial file, which the
/// caller's records (a pending pack row) name so that gc removes it.
pub trait ObjectWriter: Send {
    /// Appends bytes at the end of the object.
    fn append(&mut self, bytes: &[u8]) -> Result<()>;

    /// Bytes appended so far.
    fn len(&self) -> u64;

    /// Whether nothing was appended yet.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the object durable and readable, as it is now; returns its
    /// size. After this it never changes.
    fn seal(self: Box<Self>) -> Result<u64>;
}

/// A sealed object open for ranged reads.
pub trait ObjectReader: Send + Sync {
    /// The object's size in bytes.
    fn len(&self) -> u64;

    /// Whether the object has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `len` bytes at `offset`; an error naming the object and the
    /// range if they lie past its end (a torn or truncated object).
    fn read_range(&self, offset: u64, len: u64) -> Result<RangeBytes>;

    /// How messages name the object (a file path for [`super::LocalDir`]).
    fn label(&self) -> &str;
}

/// A store of immutable objects by kind and name.
///
/// **Write once**: [`ObjectStore::create`] and [`ObjectStore::put`] fail
/// if the object exists; a name is written again only after its object
/// was deleted (repair replaces a damaged index that way).
///
/// **Deferred deletion**: the store's caller (gc) deletes an object only
/// after its own records stopped naming it, but a reader may still hold a
/// plan made from older records (an export that has not fetched all its
/// frames yet). So [`ObjectStore::delete`] retires an object at once (it
/// is no longer listed, stat'ed or read whole) while every reader opened
/// before the delete keeps reading it for [`DELETE_GRACE`] at least.
/// A remote implementation must therefore not DELETE at once: it records
/// the deletion (a tombstone object with its time, or an object tag) and
/// [`ObjectStore::purge`], which gc calls, deletes what has been retired
/// for longer than the grace period. [`super::LocalDir`] unlinks at once:
/// a local reader holds the file open (its descriptor and its frame
/// mappings), and POSIX keeps an unlinked file's bytes readable through
/// them, for as long as the reader lives. Objects of kind
/// [`ObjectKind::Meta`] (the remote's marker, the gc lock) are not
/// deferred: no reader plans from them, and a lock must be gone, not
/// retired, once released.
pub trait ObjectStore: Send + Sync {
    /// Starts writing a new object (its name must be free).
    fn create(&self, kind: ObjectKind, name: &str) -> Result<Box<dyn ObjectWriter>>;

    /// Writes a whole, small object at once, durably (its name must be free).
    fn put(&self, kind: ObjectKind, name: &str, bytes: &[u8]) -> Result<()>;

    /// Opens an object for ranged reads; an object that does not exist is
    /// [`crate::Error::Io`] of kind `NotFound` (see [`super::is_not_found`]).
    fn open(&self, kind: ObjectKind, name: &str) -> Result<Arc<dyn ObjectReader>>;

    /// Reads a whole object (`Ok(None)`: there is none).
    fn get(&self, kind: ObjectKind, name: &str) -> Result<Option<Vec<u8>>>;

    /// A live object's size and time, asked of that object alone (no
    /// listing, which some stores serve stale); `Ok(None)`: there is none.
    fn info(&self, kind: ObjectKind, name: &str) -> Result<Option<ObjectInfo>>;

    /// The size of an object (`Ok(None)`: there is none).
    fn stat(&self, kind: ObjectKind, name: &str) -> Result<Option<u64>> {
        Ok(self.info(kind, name)?.map(|o| o.size))
    }

    /// Every object of a kind, in no particular order (torn ones too, where
    /// the store keeps them).
    fn list(&self, kind: ObjectKind) -> Result<Vec<ObjectInfo>>;

    /// Retires an object (gone already is fine); see the trait's doc for
    /// what stays readable, and for how long (a meta object is deleted).
    fn delete(&self, kind: ObjectKind, name: &str) -> Result<()>;

    /// The retired objects of a kind whose bytes are still held, with the
    /// time each was retired in [`ObjectInfo::modified`] (none where
    /// [`ObjectStore::delete`] frees the bytes itself).
    fn retired(&self, _kind: ObjectKind) -> Result<Vec<ObjectInfo>> {
        Ok(Vec::new())
    }

    /// Takes a retired object back: listed and readable again, as if it
    /// had never been deleted (a remote gc does this for a pack that an
    /// image pushed after the pack was retired names). An error if its
    /// bytes are gone.
    fn revive(&self, kind: ObjectKind, name: &str) -> Result<()>;

    /// Removes the bytes of the retired objects of a kind that `names`
    /// lists (from the caller's own [`ObjectStore::retired`] listing), each
    /// only if it is still retired and was retired at or before
    /// `retired_by`: one revived, or retired again later, since that
    /// listing is kept. Returns the names whose bytes it removed (none
    /// where [`ObjectStore::delete`] frees the bytes itself).
    fn purge_retired(
        &self,
        _kind: ObjectKind,
        _names: &[String],
        _retired_by: SystemTime,
    ) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Removes the bytes of every object retired `older_than` ago or
    /// longer by the store's clock: [`ObjectStore::purge_retired`] on a
    /// fresh listing. A depot's gc passes [`DELETE_GRACE`]; a remote gc,
    /// which must purge only what its own earlier listing showed, calls
    /// [`ObjectStore::purge_retired`] itself.
    fn purge(&self, older_than: Duration) -> Result<()> {
        let cutoff = self.now().checked_sub(older_than).unwrap_or(UNIX_EPOCH);
        for kind in ObjectKind::ALL {
            let due: Vec<String> = (self.retired(kind)?.into_iter())
                .filter(|o| o.modified.is_some_and(|m| m <= cutoff))
                .map(|o| o.name)
                .collect();
            if !due.is_empty() {
                self.purge_retired(kind, &due, cutoff)?;
            }
        }
        Ok(())
    }

    /// How messages name an object (a file path for [`super::LocalDir`]).
    fn label(&self, kind: ObjectKind, name: &str) -> String;

    /// The time now by the store's clock, the clock of
    /// [`ObjectInfo::modified`] (a remote gc compares write and retirement
    /// times with it); this host's clock unless the store has its own.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
