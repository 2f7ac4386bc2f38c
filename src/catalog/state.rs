//! The states and kinds the catalog stores as text, as enums: [`ImageState`]
//! (`images.state`), [`InstanceState`] (`instances.state`) and [`DiskMode`]
//! (`instances.disk`), and the typed accessor [`ImageRow::image_type`]
//! (`ImageType` itself is older and lives in `catalog/mod.rs`;
//! [`ImageRow::state`] is an `ImageState` already). Each has `parse` and
//! the rusqlite conversions it needs, so that no code above the catalog
//! compares these columns as strings. These are the stored states; what
//! users see is `depot::ImageState` and `launch::instance::InstanceState`. The text of each value is the one the schema's `CHECK`
//! constraints name (migrations in `catalog/mod.rs`).

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::Serialize;

use crate::catalog::{ImageRow, ImageType};
use crate::error::{Error, Result};

/// Where an image is in its life (`images.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageState {
    /// An import or capture is writing it (shown as `creating`).
    Importing,
    /// Its content is complete and durable.
    Available,
    /// A remote image run lazily: its content is at the remote, and the
    /// depot holds the chunks its instances read so far (`partial_images`).
    Partial,
}

impl ImageState {
    /// The text the catalog stores (SQL names it literally; the tests use
    /// this).
    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Importing => "importing",
            ImageState::Available => "available",
            ImageState::Partial => "partial",
        }
    }

    /// The state a stored text names, if it is one the schema allows.
    pub fn parse(s: &str) -> Option<ImageState> {
        match s {
            "importing" => Some(ImageState::Importing),
            "available" => Some(ImageState::Available),
            "partial" => Some(ImageState::Partial),
            _ => None,
        }
    }
}

impl ImageRow {
    /// The row's type; `None` when the stored text is none the schema
    /// allows (the row is damaged then).
    pub fn image_type(&self) -> Option<ImageType> {
        ImageType::parse(&self.kind).ok()
    }
}

/// Where an instance is in its life (`instances.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Its launch is making it (rows entered, disks and seed not yet).
    Pending,
    /// Its QEMU lives.
    Running,
    /// Made, and no QEMU runs it.
    Stopped,
    /// Its launch was interrupted or its QEMU did not start (`error` says
    /// why).
    Failed,
}

impl InstanceState {
    /// The text the catalog stores (SQL names it literally; the tests use
    /// this).
    #[cfg(test)]
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        }
    }

    /// The state a stored text names, if it is one the schema allows.
    pub fn parse(s: &str) -> Option<InstanceState> {
        match s {
            "pending" => Some(InstanceState::Pending),
            "running" => Some(InstanceState::Running),
            "stopped" => Some(InstanceState::Stopped),
            "failed" => Some(InstanceState::Failed),
            _ => None,
        }
    }
}

/// How an instance's disk is made (`instances.disk`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMode {
    /// A qcow2 overlay whose backing QEMU reads from vmdepot's NBD server,
    /// straight from the chunk store: no base file (the default).
    Lazy,
    /// A qcow2 overlay over the image's shared raw base file
    /// (`bases/IMAGE.raw`, made on first use).
    Overlay,
    /// A private sparse raw copy of the image.
    Copy,
}

impl DiskMode {
    /// `lazy`, `overlay` or `copy` (`--disk`); anything else is an error
    /// naming them.
    pub fn parse(s: &str) -> Result<DiskMode> {
        match s {
            "lazy" => Ok(DiskMode::Lazy),
            "overlay" => Ok(DiskMode::Overlay),
            "copy" => Ok(DiskMode::Copy),
            _ => Err(Error::Invalid(format!(
                "unknown disk mode {s:?}: use lazy, overlay or copy"
            ))),
        }
    }

    /// The text the catalog stores (and `--disk` takes).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMode::Lazy => "lazy",
            DiskMode::Overlay => "overlay",
            DiskMode::Copy => "copy",
        }
    }
}

/// A stored text as one of the values `parse` knows, or a conversion error
/// quoting it (the schema's `CHECK` constraints make that a damaged catalog).
fn from_text<T>(v: ValueRef<'_>, parse: impl FnOnce(&str) -> Option<T>) -> FromSqlResult<T> {
    let s = v.as_str()?;
    parse(s).ok_or_else(|| FromSqlError::Other(format!("unknown value {s:?}").into()))
}

impl FromSql for InstanceState {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        from_text(v, InstanceState::parse)
    }
}

impl ToSql for DiskMode {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for DiskMode {
    fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
        from_text(v, |s| DiskMode::parse(s).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_round_trip() {
        for s in [
            ImageState::Importing,
            ImageState::Available,
            ImageState::Partial,
        ] {
            assert_eq!(ImageState::parse(s.as_str()), Some(s));
        }
        for s in [
            InstanceState::Pending,
            InstanceState::Running,
            InstanceState::Stopped,
            InstanceState::Failed,
        ] {
            assert_eq!(InstanceState::parse(s.as_str()), Some(s));
        }
        for d in [DiskMode::Lazy, DiskMode::Overlay, DiskMode::Copy] {
            assert_eq!(DiskMode::parse(d.as_str()).unwrap(), d);
        }
        assert_eq!(ImageState::parse("sealed"), None);
        assert_eq!(InstanceState::parse("paused"), None);
        assert!(DiskMode::parse("qcow2").is_err());
    }
}
