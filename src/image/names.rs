//! Image name rules: `check_name` (what a name may be) and
//! `name_clash` (the error for a name the catalog's unique indexes
//! refused, naming the image that holds it). Shared by import, capture,
//! copy and rename.

use rusqlite::Connection;

use crate::catalog;
use crate::error::{Error, Result};
use crate::ids::ImageId;

/// Refuses a name that is empty, over 200 bytes, has a control character
/// or `/`, or looks like an image id (`img-<16 hex>`): a usage error.
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 200
        || name.chars().any(|c| c.is_control() || c == '/')
        || ImageId::parse(name).is_some()
    {
        return Err(Error::Usage(format!(
            "invalid image name {name:?}: use 1-200 printable characters without '/', not of the form img-<16 hex>"
        )));
    }
    Ok(())
}

/// Refuses, before long work, a name that [`check_name`] refuses or that
/// an image of `owner` (or, for a public or marketplace `kind`, any
/// public or marketplace image) already has. The catalog's unique indexes
/// still decide at commit: this only spares the work.
pub(crate) fn check_name_free(
    conn: &Connection,
    owner: &str,
    name: &str,
    kind: &str,
) -> Result<()> {
    check_name(name)?;
    let public = matches!(kind, "public" | "marketplace");
    if catalog::name_holder(conn, owner, name)?.is_some()
        || (public && catalog::public_name_holder(conn, name)?.is_some())
    {
        return Err(name_clash(conn, owner, name, kind));
    }
    Ok(())
}

/// The error for a name that the catalog's unique indexes refused for an
/// image of `owner` and type `kind`: the account's own image of that name,
/// else the public or marketplace image holding it (names are unique per
/// owner, and public and marketplace names across owners).
pub(crate) fn name_clash(conn: &Connection, owner: &str, name: &str, kind: &str) -> Error {
    if let Some(h) = catalog::name_holder(conn, owner, name).ok().flatten() {
        return Error::NameTaken {
            name: name.to_owned(),
            existing: format!("{}, {}", h.id, h.kind),
        };
    }
    if matches!(kind, "public" | "marketplace") {
        if let Some(h) = catalog::public_name_holder(conn, name).ok().flatten() {
            return Error::PublicNameTaken {
                name: name.to_owned(),
                existing: format!("{} image {} of {}", h.kind, h.id, h.owner),
            };
        }
    }
    Error::NameTaken {
        name: name.to_owned(),
        existing: "it was deleted meanwhile: retry".to_owned(),
    }
}
