//! The depot's public types: [`ImageInfo`] (an image as users see it,
//! with its [`ImageKind`] and [`ImageState`]), [`Timestamp`] (a time the
//! depot recorded), [`ImageUpdate`] (what `image update` changes),
//! [`HistoryEntry`] (one step of `image history`, its [`Relation`]), and
//! [`DepotOptions`] with [`Intent`] (how a depot is opened).
//!
//! Every type here serializes (`--json`) as the CLI prints it: enums as
//! their lowercase names, times as RFC 3339 UTC, an absent value as `null`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::catalog::ImageType;
use crate::depot::display::rfc3339;
use crate::error::{Error, Result};

/// A time the depot recorded, to the second: shown (`Display`) and
/// serialized as RFC 3339 UTC (`2026-11-27T10:38:21Z`); a
/// [`SystemTime`] through `From`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The time `secs` seconds after the Unix epoch (before it if negative).
    pub(crate) fn from_unix(secs: i64) -> Timestamp {
        Timestamp(secs)
    }

    /// Seconds since the Unix epoch (negative before it).
    pub fn unix(self) -> i64 {
        self.0
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> SystemTime {
        let d = Duration::from_secs(t.0.unsigned_abs());
        if t.0 >= 0 {
            UNIX_EPOCH + d
        } else {
            UNIX_EPOCH - d
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&rfc3339(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// An image's type as the account that sees it knows it: its
/// [`ImageType`], or [`Shared`](ImageKind::Shared) for a custom image of
/// another account shared with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// A public image: every account sees and launches it.
    Public,
    /// A marketplace image: public, with a vendor, application and version.
    Marketplace,
    /// A custom image of the account that sees it.
    Custom,
    /// A custom image of another account, shared with this one.
    Shared,
}

impl ImageKind {
    /// `public`, `marketplace`, `custom` or `shared` (the JSON text).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Public => "public",
            ImageKind::Marketplace => "marketplace",
            ImageKind::Custom => "custom",
            ImageKind::Shared => "shared",
        }
    }
}

impl From<ImageType> for ImageKind {
    fn from(t: ImageType) -> ImageKind {
        match t {
            ImageType::Public => ImageKind::Public,
            ImageType::Marketplace => ImageKind::Marketplace,
            ImageType::Custom => ImageKind::Custom,
        }
    }
}

impl fmt::Display for ImageKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageKind {
    type Err = Error;

    /// `public`, `marketplace`, `custom` or `shared` (`image list --type`);
    /// anything else is an error naming them.
    fn from_str(s: &str) -> Result<ImageKind> {
        match s {
            "shared" => Ok(ImageKind::Shared),
            s => ImageType::parse(s).map(ImageKind::from).map_err(|_| {
                Error::Invalid(format!(
                    "unknown image type {s:?}: use public, marketplace, custom or shared"
                ))
            }),
        }
    }
}

/// Where an image is in its life, as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    /// An import or capture is writing it.
    Creating,
    /// Its content is complete: it can be launched, exported and copied.
    Available,
    /// Available, and marked deprecated (`image update --deprecate`).
    Deprecated,
    /// A remote image run lazily: the depot holds only what its instances
    /// read so far (`image pull` fetches the rest).
    Partial,
    /// Its catalog row or block map is damaged ([`ImageInfo::damage`] says
    /// how): it can only be shown and deleted.
    Damaged,
}

impl ImageState {
    /// `creating`, `available`, `deprecated`, `partial` or `damaged` (the
    /// JSON text).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Creating => "creating",
            ImageState::Available => "available",
            ImageState::Deprecated => "deprecated",
            ImageState::Partial => "partial",
            ImageState::Damaged => "damaged",
        }
    }
}

impl fmt::Display for ImageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an entry of `image history` is related to the image asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Relation {
    /// The image itself (the first entry).
    #[serde(rename = "self")]
    Itself,
    /// An image it was captured from, directly or further up.
    Parent,
    /// The instance it was captured from.
    SourceInstance,
    /// The image in another depot it was copied from.
    CopiedFrom,
    /// A copy of it made into another depot.
    Copy,
    /// An image captured from an instance of it.
    Child,
}

impl Relation {
    /// `self`, `parent`, `source-instance`, `copied-from`, `copy` or
    /// `child` (the JSON text).
    pub fn as_str(self) -> &'static str {
        match self {
            Relation::Itself => "self",
            Relation::Parent => "parent",
            Relation::SourceInstance => "source-instance",
            Relation::CopiedFrom => "copied-from",
            Relation::Copy => "copy",
            Relation::Child => "child",
        }
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `image update` changes (`None`: unchanged).
#[derive(Clone, Debug, Default)]
pub struct ImageUpdate {
    /// A new name.
    pub name: Option<String>,
    /// A new description (empty: none).
    pub description: Option<String>,
    /// Protect it from deletion, or stop protecting it.
    pub protected: Option<bool>,
    /// Deprecate it, or undeprecate it.
    pub deprecated: Option<bool>,
    /// Tags to set (key, value); an empty value removes the tag.
    pub tags: Vec<(String, String)>,
}

/// One step of an image's lineage (`image history`).
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    /// How it is related to the image asked about.
    pub relation: Relation,
    /// Its id: an image id (`img-…`), or an instance id for
    /// [`Relation::SourceInstance`].
    pub id: String,
    /// Its name (as this depot last knew it; empty for a copy in another
    /// depot, whose name there this depot does not know).
    pub name: String,
    /// Where it lives: a depot directory, or `None` for this depot.
    pub depot: Option<String>,
    /// Whether it still exists (as far as this depot knows).
    pub exists: bool,
}

/// An image as users see it (`image show --json`).
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    /// Its id (`img-` and 16 hex digits).
    pub id: String,
    /// Its name (unique per owner; public and marketplace names are unique
    /// across owners).
    pub name: String,
    /// Its type as this account sees it; `None` only for a damaged row
    /// whose stored type is unknown ([`damage`](ImageInfo::damage) names it).
    #[serde(rename = "type")]
    pub kind: Option<ImageKind>,
    /// Where it is in its life ([`ImageState::Damaged`] when `damage` is set).
    pub state: ImageState,
    /// The account that owns it.
    pub owner: String,
    /// Its description, if it has one.
    pub description: Option<String>,
    /// What it was made from: the input's format (`raw`, `qcow2`, `vmdk`,
    /// `vhdx`, `vhd`, `vdi`), or `instance` for a capture.
    pub source_format: String,
    /// Size of the disk, in bytes.
    pub virtual_size: u64,
    /// Bytes of the image in non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Hex BLAKE3 of the raw content (`None` while importing).
    pub content_digest: Option<String>,
    /// When it was created (imported, captured or copied).
    pub created_at: Timestamp,
    /// Stored (compressed) bytes no other image refers to: what deleting
    /// this image would free.
    pub unique_stored_bytes: u64,
    /// Stored bytes this image shares with other images.
    pub shared_stored_bytes: u64,
    /// Id of the image it was captured or copied from (lineage), if any.
    pub parent: Option<String>,
    /// The parent's name when this image was made, if it has a parent.
    pub parent_name: Option<String>,
    /// Id of the instance it was captured from, if it is a capture.
    pub source_instance: Option<String>,
    /// For a copy: `DEPOT img-…` of the image it was copied from (or
    /// `remote:REMOTE img-…` for an image pulled from a remote).
    pub copied_from: Option<String>,
    /// Whether it is protected from deletion (`image update --protect`).
    pub protected: bool,
    /// Whether it is deprecated: hidden from `image list` without `--all`.
    pub deprecated: bool,
    /// Its tags, key to value.
    pub tags: std::collections::BTreeMap<String, String>,
    /// A marketplace image's vendor (`None` for other images).
    pub vendor: Option<String>,
    /// A marketplace image's application (`None` for other images).
    pub application: Option<String>,
    /// A marketplace image's application version, if it has one.
    pub app_version: Option<String>,
    /// Accounts it is shared with (shown to its owner only).
    pub shared_with: Vec<String>,
    /// Its content came from an image shared with its owner: it can be
    /// launched and captured, never exported, copied or shared.
    pub launch_only: bool,
    /// For a launch-only image: `"<owner> <img-id>"` of that shared image.
    pub restricted_from: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON of `image show --json`: typed fields serialize as the text
    /// the CLI always printed, absent ones as null.
    #[test]
    fn image_info_serializes_as_the_cli_prints_it() {
        let info = ImageInfo {
            id: "img-0123456789abcdef".into(),
            name: "app".into(),
            kind: Some(ImageKind::Marketplace),
            state: ImageState::Deprecated,
            owner: "alice".into(),
            description: None,
            source_format: "qcow2".into(),
            virtual_size: 1 << 20,
            data_bytes: 4096,
            content_digest: Some("ab".into()),
            created_at: Timestamp::from_unix(951_782_400),
            unique_stored_bytes: 10,
            shared_stored_bytes: 0,
            parent: None,
            parent_name: None,
            source_instance: None,
            copied_from: None,
            protected: true,
            deprecated: true,
            tags: [("os".to_owned(), "linux".to_owned())].into(),
            vendor: Some("acme".into()),
            application: Some("db".into()),
            app_version: None,
            shared_with: Vec::new(),
            launch_only: false,
            restricted_from: None,
            damage: None,
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"id":"img-0123456789abcdef","name":"app","type":"marketplace","state":"deprecated","owner":"alice","description":null,"source_format":"qcow2","virtual_size":1048576,"data_bytes":4096,"content_digest":"ab","created_at":"2000-02-29T00:00:00Z","unique_stored_bytes":10,"shared_stored_bytes":0,"parent":null,"parent_name":null,"source_instance":null,"copied_from":null,"protected":true,"deprecated":true,"tags":{"os":"linux"},"vendor":"acme","application":"db","app_version":null,"shared_with":[],"launch_only":false,"restricted_from":null,"damage":null}"#
        );
        let entry = HistoryEntry {
            relation: Relation::CopiedFrom,
            id: "img-0123456789abcdef".into(),
            name: "app".into(),
            depot: None,
            exists: true,
        };
        assert_eq!(
            serde_json::to_string(&entry).unwrap(),
            r#"{"relation":"copied-from","id":"img-0123456789abcdef","name":"app","depot":null,"exists":true}"#
        );
    }
}
