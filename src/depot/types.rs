//! The depot's public types: [`ImageInfo`] (an image as users see it),
//! [`ImageUpdate`] (what `image update` changes), [`HistoryEntry`] (one
//! step of `image history`), and [`DepotOptions`] with [`Intent`] (how a
//! depot is opened).

use serde::Serialize;

/// What `image update` changes (`None`: unchanged).
#[derive(Clone, Debug, Default)]
pub struct ImageUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub protected: Option<bool>,
    pub deprecated: Option<bool>,
    /// Tags to set (key, value); an empty value removes the tag.
    pub tags: Vec<(String, String)>,
}

/// One step of an image's lineage (`image history`).
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    /// `self`, `parent`, `source-instance`, `copied-from`, `copy`, `child`.
    pub relation: String,
    pub id: String,
    pub name: String,
    /// Where it lives: a depot directory, or null for this depot.
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub depot: String,
    /// Whether it still exists (as far as this depot knows).
    pub exists: bool,
}

/// An image as users see it (`image show --json`).
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    pub owner: String,
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub description: String,
    pub source_format: String,
    pub virtual_size: u64,
    /// Bytes of the image in non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Hex BLAKE3 of the raw content (null while importing).
    pub content_digest: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Stored (compressed) bytes no other image refers to: what deleting
    /// this image would free.
    pub unique_stored_bytes: u64,
    /// Stored bytes this image shares with other images.
    pub shared_stored_bytes: u64,
    /// Image it was captured or copied from (lineage), and its name then.
    pub parent: Option<String>,
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub parent_name: String,
    /// Instance it was captured from.
    pub source_instance: Option<String>,
    /// For a copy: `DEPOT img-…` of the image it was copied from.
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub copied_from: String,
    pub protected: bool,
    pub deprecated: bool,
    pub tags: std::collections::BTreeMap<String, String>,
    /// Marketplace images: vendor, application, version.
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub vendor: String,
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub application: String,
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub app_version: String,
    /// Accounts it is shared with (shown to its owner only).
    pub shared_with: Vec<String>,
    /// Its content came from an image shared with its owner: it can be
    /// launched and captured, never exported, copied or shared.
    pub launch_only: bool,
    /// For a launch-only image: `"<owner> <img-id>"` of that shared image.
    #[serde(serialize_with = "crate::depot::display::empty_as_null")]
    pub restricted_from: String,
    /// Why the image is damaged (its catalog row or block map), if it is:
    /// then its state is `damaged`, and it can only be shown and deleted.
    pub damage: Option<String>,
}

/// How a depot is opened (see [`Depot::open_with`](super::Depot::open_with)).
#[derive(Clone, Debug, Default)]
pub struct DepotOptions {
    /// Act as this account (default: `VMDEPOT_ACCOUNT`, else the Unix user).
    pub account: Option<String>,
    /// Create the depot shared by this Unix group (directories 2770, files
    /// 0660) instead of private to its owner. Only when the depot is
    /// created; the choice is kept in `DEPOT/group`.
    pub group: Option<String>,
    /// What the caller will do (default: write). A depot opened to
    /// [`Intent::Read`] on a full or read-only filesystem is opened
    /// without writing anything; one opened to [`Intent::Free`] on a full
    /// filesystem first releases the depot's space reserve.
    pub intent: Intent,
    /// Open only a depot that exists: a directory holding no depot (no
    /// catalog, no marker, no packs), or none at all, is
    /// [`Error::DepotNotFound`](crate::Error::DepotNotFound) and nothing is
    /// created (the CLI's commands that only look). Default: a missing
    /// depot is created.
    pub existing_only: bool,
}

/// What a caller of [`Depot::open_with`](super::Depot::open_with) will do with the depot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Intent {
    /// Change it (import, update, launch, …).
    #[default]
    Write,
    /// Only read it (list, show, export, verify, fsck, stats): on a full or
    /// read-only filesystem the catalog is opened read-only and nothing is
    /// written (no marker, no chmod, no migration).
    Read,
    /// Free space (image delete, gc): on a full filesystem the space
    /// reserve (`DEPOT/reserve`) is released first, so that SQLite can
    /// write its WAL.
    Free,
}
