//! What an image's manifest ([`crate::repo::manifest`]) takes from the
//! catalog besides the image row and its map, and what gc and fsck ask
//! about manifests: [`image_tags`], [`image_shares`], [`image_state`] and
//! [`image_exists`].

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension};

use super::ImageState;
use crate::error::Result;
use crate::ids::ImageId;

/// The tags of image `id`, by key.
pub fn image_tags(conn: &Connection, id: &ImageId) -> Result<BTreeMap<String, String>> {
    let mut st = conn.prepare_cached("SELECT key, value FROM image_tags WHERE image = ?1")?;
    let mut rows = st.query([id.as_str()])?;
    let mut tags = BTreeMap::new();
    while let Some(r) = rows.next()? {
        tags.insert(r.get(0)?, r.get(1)?);
    }
    Ok(tags)
}

/// The shares of image `id`: (account, unix seconds shared at), by account.
pub fn image_shares(conn: &Connection, id: &ImageId) -> Result<Vec<(String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT account, created_at FROM image_shares WHERE image = ?1 ORDER BY account",
    )?;
    let mut rows = st.query([id.as_str()])?;
    let mut shares = Vec::new();
    while let Some(r) = rows.next()? {
        shares.push((r.get(0)?, r.get(1)?));
    }
    Ok(shares)
}

/// The state of image `id` as the catalog records it (`None`: no such
/// row, or a state none the schema allows).
pub fn image_state(conn: &Connection, id: &ImageId) -> Result<Option<ImageState>> {
    let text: Option<String> = conn
        .query_row(
            "SELECT state FROM images WHERE id = ?1",
            [id.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(text.as_deref().and_then(ImageState::parse))
}

/// Whether the catalog has a row for image `id`.
pub fn image_exists(conn: &Connection, id: &ImageId) -> Result<bool> {
    let mut st = conn.prepare_cached("SELECT 1 FROM images WHERE id = ?1")?;
    Ok(st.exists([id.as_str()])?)
}
