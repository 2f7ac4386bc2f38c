//! Image metadata beyond the `images` row's content columns: tags
//! (`image_tags`), shares (`image_shares`), the edits of `image update`,
//! deletion, and the lineage `image history` and backups read (children,
//! copies into other depots, backups of an instance). Functions taking
//! `tx` run in the caller's write transaction ([`crate::catalog::write`]),
//! so that the caller can write the image's manifest in the same one.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

use crate::error::{Error, Result};

/// The tags of an image, by key.
pub fn tags_of(conn: &Connection, image: &str) -> Result<BTreeMap<String, String>> {
    let mut st = conn.prepare_cached("SELECT key, value FROM image_tags WHERE image = ?1")?;
    let rows = st.query_map([image], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Refuses caller-set tags in the recipe's namespace (`build.*`): only
/// `Depot::build_image` records them, so that `--from` can tell an image
/// it built from one merely labelled so.
pub(crate) fn check_caller_tags<'a>(keys: impl IntoIterator<Item = &'a String>) -> Result<()> {
    for k in keys {
        if k.starts_with("build.") {
            return Err(Error::Usage(format!(
                "tag {k}: the build.* tags are the recipe that `vmdepot image build` records; \
                 they are not set by hand (choose another key)"
            )));
        }
    }
    Ok(())
}

/// Sets tags (in the caller's write transaction); an empty value removes
/// the tag.
pub fn set_tags(tx: &Connection, image: &str, tags: &[(String, String)]) -> Result<()> {
    for (k, v) in tags {
        if v.is_empty() {
            tx.execute(
                "DELETE FROM image_tags WHERE image = ?1 AND key = ?2",
                params![image, k],
            )?;
        } else {
            tx.execute(
                "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
                params![image, k, v],
            )?;
        }
    }
    Ok(())
}

/// Whether a catalog error is a unique constraint's: a name taken (see
/// [`set_name`]).
pub fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// Renames an image (in the caller's write transaction), and with it the
/// image name its instances show. A name taken by another of the owner's
/// images, or by another public or marketplace image, fails with SQLite's
/// unique constraint ([`is_unique_violation`]).
pub fn set_name(tx: &Connection, image: &str, name: &str) -> Result<()> {
    tx.execute(
        "UPDATE images SET name = ?2 WHERE id = ?1",
        params![image, name],
    )?;
    tx.execute(
        "UPDATE instances SET image_name = ?2 WHERE image = ?1",
        params![image, name],
    )?;
    Ok(())
}

/// Sets an image's description (in the caller's write transaction).
pub fn set_description(tx: &Connection, image: &str, description: &str) -> Result<()> {
    tx.execute(
        "UPDATE images SET description = ?2 WHERE id = ?1",
        params![image, description],
    )?;
    Ok(())
}

/// Protects an image from deletion, or lifts that (in the caller's write
/// transaction).
pub fn set_protected(tx: &Connection, image: &str, protected: bool) -> Result<()> {
    tx.execute(
        "UPDATE images SET protected = ?2 WHERE id = ?1",
        params![image, protected],
    )?;
    Ok(())
}

/// Marks an image deprecated, or lifts that (in the caller's write
/// transaction).
pub fn set_deprecated(tx: &Connection, image: &str, deprecated: bool) -> Result<()> {
    tx.execute(
        "UPDATE images SET deprecated = ?2 WHERE id = ?1",
        params![image, deprecated],
    )?;
    Ok(())
}

/// Deletes an image's row, tags and shares (its chunks stay for gc).
pub fn delete_image(conn: &Connection, image: &str) -> Result<()> {
    crate::catalog::write(conn, |c| {
        c.execute("DELETE FROM images WHERE id = ?1", [image])?;
        c.execute("DELETE FROM image_tags WHERE image = ?1", [image])?;
        c.execute("DELETE FROM image_shares WHERE image = ?1", [image])?;
        crate::catalog::partial::forget_partial(c, image)?;
        Ok(())
    })
}

/// Whether `image` is shared with `account`.
pub fn is_shared_with(conn: &Connection, image: &str, account: &str) -> Result<bool> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM image_shares WHERE image = ?1 AND account = ?2)",
        params![image, account],
        |r| r.get(0),
    )?)
}

/// The accounts an image is shared with, sorted.
pub fn shares_of(conn: &Connection, image: &str) -> Result<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT account FROM image_shares WHERE image = ?1 ORDER BY account")?;
    let rows = st.query_map([image], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Shares an image with an account since `at` (in the caller's write
/// transaction); sharing it again changes nothing.
pub fn share(tx: &Connection, image: &str, account: &str, at: i64) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO image_shares (image, account, created_at) VALUES (?1, ?2, ?3)",
        params![image, account, at],
    )?;
    Ok(())
}

/// Stops sharing an image with an account (in the caller's write
/// transaction); returns whether it was shared.
pub fn unshare(tx: &Connection, image: &str, account: &str) -> Result<bool> {
    let n = tx.execute(
        "DELETE FROM image_shares WHERE image = ?1 AND account = ?2",
        params![image, account],
    )?;
    Ok(n > 0)
}

/// Pairs of text columns that a query on one image id returns.
fn pairs(conn: &Connection, sql: &str, image: &str) -> Result<Vec<(String, String)>> {
    let mut st = conn.prepare(sql)?;
    let rows = st.query_map([image], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Copies made of an image into other depots, oldest first: (depot
/// directory, id of the copy there).
pub fn copies_of(conn: &Connection, image: &str) -> Result<Vec<(String, String)>> {
    pairs(
        conn,
        "SELECT depot, copy_id FROM image_copies WHERE image = ?1 ORDER BY copied_at",
        image,
    )
}

/// Images captured from an image (not copies), oldest first: (id, name).
pub fn children_of(conn: &Connection, image: &str) -> Result<Vec<(String, String)>> {
    pairs(
        conn,
        "SELECT id, name FROM images WHERE parent = ?1 AND copied_from = '' ORDER BY created_at",
        image,
    )
}

/// The available, unprotected images of `owner` tagged `key=value` (the
/// backups of one instance): (id, rowid, which orders them by creation).
pub fn unprotected_tagged(
    conn: &Connection,
    key: &str,
    value: &str,
    owner: &str,
) -> Result<Vec<(String, i64)>> {
    let mut st = conn.prepare(
        "SELECT i.id, i.rowid FROM images i JOIN image_tags t ON t.image = i.id
                     WHERE t.key = ?1 AND t.value = ?2 AND i.owner = ?3
                       AND i.state = 'available' AND i.protected = 0",
    )?;
    let rows = st.query_map(params![key, value, owner], |x| Ok((x.get(0)?, x.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}
