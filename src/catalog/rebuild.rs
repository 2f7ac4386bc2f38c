//! The rows `fsck --repair` writes into a new, empty catalog: [`Rebuild`]
//! (sealed packs, their frames and chunks, from the pack indexes),
//! [`insert_rebuilt_image`] with its tags and shares (from a manifest), and
//! [`insert_rebuilt_instance`] (from an instance directory).

use std::collections::BTreeMap;

use rusqlite::{params, Connection, Statement};

use super::hkey;
use crate::error::Result;
use crate::format::{ManifestMeta, ManifestShare};
use crate::ids::{ChunkHash, ChunkId, ImageId};

/// The inserts of the store's rows, prepared once for the whole rebuild
/// (in the caller's write transaction).
pub struct Rebuild<'c> {
    conn: &'c Connection,
    pack: Statement<'c>,
    frame: Statement<'c>,
    chunk: Statement<'c>,
}

impl<'c> Rebuild<'c> {
    /// Prepares the inserts on the caller's write transaction.
    pub fn new(tx: &'c Connection) -> Result<Rebuild<'c>> {
        Ok(Rebuild {
            conn: tx,
            pack: tx.prepare(
                "INSERT INTO packs (name, state, image, size) VALUES (?1, 'sealed', NULL, ?2)",
            )?,
            frame: tx.prepare(
                "INSERT INTO frames (pack, offset, clen, nchunks) VALUES (?1, ?2, ?3, ?4)",
            )?,
            chunk: tx
                .prepare("INSERT INTO chunks (hkey, hash, frame, slot) VALUES (?1, ?2, ?3, ?4)")?,
        })
    }

    /// A sealed pack of `size` bytes; returns its row id.
    pub fn pack(&mut self, name: &str, size: u64) -> Result<i64> {
        self.pack.execute(params![name, size as i64])?;
        Ok(self.conn.last_insert_rowid())
    }

    /// A frame of pack `pack`; returns its row id.
    pub fn frame(&mut self, pack: i64, offset: u64, clen: u64, nchunks: usize) -> Result<i64> {
        self.frame
            .execute(params![pack, offset as i64, clen as i64, nchunks as i64])?;
        Ok(self.conn.last_insert_rowid())
    }

    /// A committed chunk in `slot` of `frame`; returns its id.
    pub fn chunk(&mut self, hash: &ChunkHash, frame: i64, slot: usize) -> Result<ChunkId> {
        self.chunk
            .execute(params![hkey(hash), &hash.0[..], frame, slot as i64])?;
        Ok(self.conn.last_insert_rowid())
    }
}

/// An available image from its manifest's metadata and its map blob (in
/// the caller's write transaction). The error is SQLite's own: the repair
/// reports it as the reason the image was not restored.
pub fn insert_rebuilt_image(
    tx: &Connection,
    id: &ImageId,
    meta: &ManifestMeta,
    blob: &[u8],
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO images (id, name, type, state, owner, description, source_format,
                                 virtual_size, data_bytes, content_digest, created_at, map, map_digest,
                                 parent, parent_name, source_instance, copied_from, protected,
                                 deprecated, vendor, application, app_version, restricted_from)
             VALUES (?1, ?2, ?3, 'available', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                     ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
        params![
            id.as_str(),
            meta.name,
            meta.kind,
            meta.owner,
            meta.description,
            meta.source_format,
            meta.virtual_size as i64,
            meta.data_bytes as i64,
            meta.content_digest,
            meta.created_at,
            blob,
            &blake3::hash(blob).as_bytes()[..],
            meta.parent,
            meta.parent_name,
            meta.source_instance,
            meta.copied_from,
            meta.protected,
            meta.deprecated,
            meta.vendor,
            meta.application,
            meta.app_version,
            meta.restricted_from,
        ],
    )?;
    Ok(())
}

/// A restored image's tags and shares (in the caller's write transaction).
pub fn insert_rebuilt_labels(
    tx: &Connection,
    id: &ImageId,
    tags: &BTreeMap<String, String>,
    shares: &[ManifestShare],
) -> Result<()> {
    for (k, v) in tags {
        tx.execute(
            "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
            params![id.as_str(), k, v],
        )?;
    }
    for s in shares {
        tx.execute(
            "INSERT OR REPLACE INTO image_shares (image, account, created_at) VALUES (?1, ?2, ?3)",
            params![id.as_str(), s.account, s.created_at],
        )?;
    }
    Ok(())
}

/// Owner, name and `restricted_from` of an image, for an instance of it
/// being restored (all empty if the image is not there or its row does not
/// read).
pub fn image_owner(conn: &Connection, image: &ImageId) -> (String, String, String) {
    conn.query_row(
        "SELECT owner, name, restricted_from FROM images WHERE id = ?1",
        [image.as_str()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .unwrap_or_default()
}

/// What a repair knows of an instance from its directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RebuiltInstance {
    /// `ins-…`; also its name.
    pub id: String,
    /// The image its overlay's base names (empty: none, a private copy).
    pub image: String,
    pub image_name: String,
    pub owner: String,
    /// `overlay` or `copy`.
    pub disk: &'static str,
    pub hostname: String,
    /// Unix seconds (the directory's mtime).
    pub created_at: i64,
    pub restricted_from: String,
    /// The pid of its QEMU, still running.
    pub pid: Option<i32>,
    /// `uefi` if its directory holds a UEFI variable store, else `bios`.
    pub firmware: &'static str,
}

/// An instance row, `running` if its QEMU is, else `stopped`, with 1 CPU,
/// 1024 MiB and the `auto` accelerator, booting `i.firmware` (in the caller's write
/// transaction; one that exists already is kept).
pub fn insert_rebuilt_instance(tx: &Connection, i: &RebuiltInstance) -> Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO instances (id, name, image, image_name, owner, state, disk, cpus,
                                    memory_mib, accel, hostname, created_at, restricted_from, pid,
                                    firmware)
             VALUES (?1, ?1, ?2, ?3, ?4, ?9, ?5, 1, 1024, 'auto', ?6, ?7, ?8, ?10, ?11)",
        params![
            i.id,
            i.image,
            i.image_name,
            i.owner,
            i.disk,
            i.hostname,
            i.created_at,
            i.restricted_from,
            if i.pid.is_some() {
                "running"
            } else {
                "stopped"
            },
            i.pid,
            i.firmware
        ],
    )?;
    Ok(())
}
