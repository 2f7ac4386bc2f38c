//! The catalog's side of an import: the rows an import starts with, the
//! input files it remembers, and what it leaves when it fails or dies.
//!
//! Main items: [`NewImage`] and [`insert_importing`] (the `importing` row
//! and its tags that import, capture and copy begin with), [`NameHolder`]
//! (who holds a name the unique indexes refused), [`FileIdent`] with
//! [`remember_source`] and [`reuse_source`] (an unchanged input file takes
//! the content of the image it became), [`seal_pending_packs`] (the
//! commit's pack rows), and the clean-up of a dead or failed import
//! ([`pending_pack_names`], [`delete_pending_packs`],
//! [`delete_pending_chunks`], [`delete_importing_row`]).

use rusqlite::{params, Connection, OptionalExtension};

use super::{begin_write, now, write, ImageType};
use crate::catalog::images::is_unique_violation;
use crate::error::Result;
use crate::ids::ImageId;

/// The catalog row of an image about to be filled: entered as `importing`,
/// with its tags.
#[derive(Clone, Debug)]
pub struct NewImage<'a> {
    pub id: &'a ImageId,
    pub name: &'a str,
    pub kind: ImageType,
    pub owner: &'a str,
    pub description: &'a str,
    /// What the content came from (`raw`, `qcow2`, `instance`, `copy`…).
    pub source_format: &'a str,
    pub vendor: &'a str,
    pub application: &'a str,
    pub app_version: &'a str,
    /// Lineage: the id and name of the image captured or copied from.
    pub parent: Option<(&'a str, &'a str)>,
    /// The instance captured from.
    pub source_instance: Option<&'a str>,
    /// Launch-only origin of the content (`"<owner> <img-id>"` or empty).
    pub restricted_from: &'a str,
    /// Tags (key, value) set on the new image.
    pub tags: &'a [(String, String)],
}

/// Enters `new` as an `importing` row with its tags, in one write
/// transaction. Returns `false`, changing nothing, when a unique index
/// refused its name (see [`name_holder`] for who holds it).
pub fn insert_importing(conn: &Connection, new: &NewImage<'_>) -> Result<bool> {
    match try_insert_importing(conn, new) {
        Ok(()) => Ok(true),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn try_insert_importing(conn: &Connection, new: &NewImage<'_>) -> rusqlite::Result<()> {
    let tx = begin_write(conn)?;
    let (parent, parent_name) = new.parent.unzip();
    tx.execute(
        "INSERT INTO images (id, name, type, state, owner, description, source_format, created_at,
                             vendor, application, app_version, parent, parent_name, source_instance,
                             restricted_from)
         VALUES (?1, ?2, ?3, 'importing', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        params![
            new.id.as_str(),
            new.name,
            new.kind.as_str(),
            new.owner,
            new.description,
            new.source_format,
            now(),
            new.vendor,
            new.application,
            new.app_version,
            parent,
            parent_name.unwrap_or_default(),
            new.source_instance,
            new.restricted_from,
        ],
    )?;
    for (k, v) in new.tags {
        tx.execute(
            "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
            params![new.id.as_str(), k, v],
        )?;
    }
    tx.commit()
}

/// The image holding a name: its id, type and owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameHolder {
    pub id: String,
    pub kind: String,
    pub owner: String,
}

/// The image of `owner` named `name`, if any (names are unique per owner).
pub fn name_holder(conn: &Connection, owner: &str, name: &str) -> Result<Option<NameHolder>> {
    holder(
        conn,
        "SELECT id, type, owner FROM images WHERE owner = ?1 AND name = ?2",
        &[owner, name],
    )
}

/// The public or marketplace image named `name`, if any (those names are
/// unique across owners).
pub fn public_name_holder(conn: &Connection, name: &str) -> Result<Option<NameHolder>> {
    holder(
        conn,
        "SELECT id, type, owner FROM images
             WHERE name = ?1 AND type IN ('public', 'marketplace')",
        &[name],
    )
}

fn holder(conn: &Connection, sql: &str, args: &[&str]) -> Result<Option<NameHolder>> {
    Ok(conn
        .query_row(sql, rusqlite::params_from_iter(args), |r| {
            Ok(NameHolder {
                id: r.get(0)?,
                kind: r.get(1)?,
                owner: r.get(2)?,
            })
        })
        .optional()?)
}

/// Identity of an input file, as `source_files` records it: if all of it
/// is unchanged, so is the file's content (ctime moves on every write and
/// cannot be set by a user).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileIdent {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// Remembers that the file `f` became `image` (replacing what an earlier
/// import of the same file recorded).
pub fn remember_source(conn: &Connection, f: &FileIdent, image: &ImageId) -> Result<()> {
    write(conn, |c| {
        c.execute(
            "INSERT OR REPLACE INTO source_files (dev, ino, size, mtime_ns, ctime_ns, image)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                f.dev as i64,
                f.ino as i64,
                f.size as i64,
                f.mtime_ns,
                f.ctime_ns,
                image.as_str()
            ],
        )?;
        Ok(())
    })
}

/// Remembers the files remembered as image `from`'s as image `to`'s (of
/// the same content).
pub fn repoint_sources(conn: &Connection, from: &str, to: &str) -> Result<()> {
    write(conn, |c| {
        c.execute(
            "UPDATE source_files SET image = ?2 WHERE image = ?1",
            params![from, to],
        )?;
        Ok(())
    })
}

/// Makes the `importing` image `id` available with the content (size, data
/// bytes, digest, map) of the available image that the unchanged file `f`
/// became, in the caller's write transaction. Returns whether there was
/// such an image.
pub fn reuse_source(tx: &Connection, id: &ImageId, f: &FileIdent) -> Result<bool> {
    let n = tx.execute(
        "UPDATE images SET (state, virtual_size, data_bytes, content_digest, map, map_digest) =
            (SELECT 'available', o.virtual_size, o.data_bytes, o.content_digest, o.map, o.map_digest
             FROM source_files s JOIN images o ON o.id = s.image
             WHERE s.dev = ?2 AND s.ino = ?3 AND s.size = ?4 AND s.mtime_ns = ?5
               AND s.ctime_ns = ?6 AND o.state = 'available')
         WHERE id = ?1 AND EXISTS (
             SELECT 1 FROM source_files s JOIN images o ON o.id = s.image
             WHERE s.dev = ?2 AND s.ino = ?3 AND s.size = ?4 AND s.mtime_ns = ?5
               AND s.ctime_ns = ?6 AND o.state = 'available')",
        params![
            id.as_str(),
            f.dev as i64,
            f.ino as i64,
            f.size as i64,
            f.mtime_ns,
            f.ctime_ns
        ],
    )?;
    Ok(n == 1)
}

/// Seals the pending packs of the import of `id`, recording each one's
/// size from its frames (in the commit's write transaction).
pub fn seal_pending_packs(tx: &Connection, id: &ImageId) -> Result<()> {
    tx.execute(
        "UPDATE packs SET state = 'sealed', image = NULL,
                size = (SELECT COALESCE(MAX(offset + clen), 16) FROM frames WHERE frames.pack = packs.id)
         WHERE image = ?1 AND state = 'pending'",
        [id.as_str()],
    )?;
    Ok(())
}

/// Names of the pending packs of a writer: an import (its image id) or,
/// for `None`, gc's repack.
pub fn pending_pack_names(conn: &Connection, writer: Option<&str>) -> Result<Vec<String>> {
    let mut st = conn.prepare("SELECT name FROM packs WHERE image IS ?1 AND state = 'pending'")?;
    let rows = st.query_map([writer], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes the rows of a writer's pending packs and of their frames (in
/// the caller's write transaction).
pub fn delete_pending_packs(tx: &Connection, writer: Option<&str>) -> Result<()> {
    tx.execute(
        "DELETE FROM frames WHERE pack IN (SELECT id FROM packs WHERE image IS ?1 AND state = 'pending')",
        [writer],
    )?;
    tx.execute(
        "DELETE FROM packs WHERE image IS ?1 AND state = 'pending'",
        [writer],
    )?;
    Ok(())
}

/// Deletes the chunks that the import of `id` entered and has not
/// committed (in the caller's write transaction).
pub fn delete_pending_chunks(tx: &Connection, id: &ImageId) -> Result<()> {
    tx.execute(
        "DELETE FROM chunks WHERE id IN (SELECT id FROM pending_chunks WHERE import = ?1)",
        [id.key()],
    )?;
    tx.execute("DELETE FROM pending_chunks WHERE import = ?1", [id.key()])?;
    Ok(())
}

/// Deletes the image row of `id` if it is still `importing`, and its tags
/// once no row of that id is left (in the caller's write transaction).
pub fn delete_importing_row(tx: &Connection, id: &ImageId) -> Result<()> {
    tx.execute(
        "DELETE FROM images WHERE id = ?1 AND state = 'importing'",
        [id.as_str()],
    )?;
    tx.execute(
        "DELETE FROM image_tags WHERE image = ?1 AND NOT EXISTS (SELECT 1 FROM images WHERE id = ?1)",
        [id.as_str()],
    )?;
    Ok(())
}
