//! Partial images: a remote image run lazily (`instance run REMOTE:IMAGE`,
//! disk `lazy`), whose row is `partial` and whose `partial_images` row
//! holds the remote's name and the manifest it is run from. The chunks
//! its instances read are entered as a pull enters them, named in
//! `copy_chunks` under the pull's job (`remote:NAME img-id`, the row's
//! `copied_from`); gc keeps those while the image is partial, whatever
//! their age. A completed pull makes it `available` and drops its
//! `partial_images` row in the same transaction.

use rusqlite::{params, Connection, OptionalExtension};

use super::write;
use crate::error::Result;
use crate::ids::ImageId;

/// What `partial_images` holds of one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialRow {
    /// The remote's name.
    pub remote: String,
    /// The remote manifest (`format::encode_manifest`) it is run from.
    pub manifest: Vec<u8>,
    /// Whether its disk server fetches the rest in the background.
    pub prefetch: bool,
}

/// Makes the `importing` image `id` partial: its size, data bytes and
/// content digest from the manifest, its remote and manifest recorded
/// (one write transaction).
pub fn make_partial(
    conn: &Connection,
    id: &ImageId,
    size: u64,
    data_bytes: u64,
    digest: &str,
    row: &PartialRow,
) -> Result<()> {
    write(conn, |tx| {
        tx.execute(
            "UPDATE images SET state = 'partial', virtual_size = ?2, data_bytes = ?3,
                    content_digest = ?4
             WHERE id = ?1 AND state = 'importing'",
            params![id.as_str(), size as i64, data_bytes as i64, digest],
        )?;
        tx.execute(
            "INSERT OR REPLACE INTO partial_images (image, remote, manifest, prefetch)
             VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), row.remote, row.manifest, row.prefetch],
        )?;
        Ok(())
    })
}

/// The `partial_images` row of `id`, if it is partial.
pub fn partial(conn: &Connection, id: &str) -> Result<Option<PartialRow>> {
    Ok(conn
        .query_row(
            "SELECT p.remote, p.manifest, p.prefetch FROM partial_images p
               JOIN images i ON i.id = p.image
              WHERE p.image = ?1 AND i.state = 'partial'",
            [id],
            |r| {
                Ok(PartialRow {
                    remote: r.get(0)?,
                    manifest: r.get(1)?,
                    prefetch: r.get::<_, i64>(2)? != 0,
                })
            },
        )
        .optional()?)
}

/// Asks the disk server of the partial image `id` to fetch the rest.
pub fn set_prefetch(conn: &Connection, id: &str) -> Result<()> {
    write(conn, |tx| {
        tx.execute(
            "UPDATE partial_images SET prefetch = 1 WHERE image = ?1",
            [id],
        )?;
        Ok(())
    })
}

/// Drops the `partial_images` row of `id` (in the caller's write
/// transaction): the image became available, or is deleted.
pub fn forget_partial(tx: &Connection, id: &str) -> Result<()> {
    tx.execute("DELETE FROM partial_images WHERE image = ?1", [id])?;
    Ok(())
}
