//! The SQLite catalog: images, packs, frames and the chunk index.
//!
//! Main items: [`open`] (a configured connection with the schema migrated),
//! [`ImageRow`] and the queries the image operations share. The catalog
//! knows where a chunk lives (pack, frame, slot) but never reads pack files.
//! Maintenance's rows: `packs.rs` ([`PackState`], pack, frame and chunk
//! reads of fsck, verify and stats), `gc.rs` (the mark's reads, the
//! sweep's deletes, the repack's rows), `rebuild.rs` (what `fsck --repair`
//! inserts).
//!
//! The statements of an import are in `chunks.rs` (frames and chunk rows
//! as they are entered), `imports.rs` (the `importing` row, remembered input
//! files, the clean-up of a failed import) and `manifest.rs` (what a
//! manifest reads besides the row and map), re-exported here; a copy's
//! are in `copies.rs`.
//!
//! Settings: WAL journal, `synchronous=FULL` (a committed image survives a
//! power cut), a 60 s busy timeout so that several vmdepot processes can
//! work on one depot, and migrations versioned by `PRAGMA user_version`
//! through `rusqlite_migration`.

mod gc;
mod packs;
mod rebuild;

pub use gc::*;
pub use packs::*;
pub use rebuild::*;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use rusqlite_migration::{Migrations, M};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ids::{ChunkHash, ChunkId, ImageId};

mod chunks;
mod copies;
pub mod images;
mod imports;
pub mod instances;
pub mod integrity;
mod manifest;
pub mod partial;
pub mod state;

pub use chunks::{chunk_runs_usable, chunk_sequence, delete_pending_marks, ChunkInserter};
pub use copies::{
    copy_chunk_ids, delete_copy_chunks, record_copy, seal_copied_pack, set_copied_from,
    CopyInserter,
};
pub use imports::{
    delete_importing_row, delete_pending_chunks, delete_pending_packs, insert_importing,
    name_holder, pending_pack_names, public_name_holder, remember_source, repoint_sources,
    reuse_source, seal_pending_packs, FileIdent, NewImage,
};
pub use manifest::{image_exists, image_shares, image_state, image_tags};
pub use state::{DiskMode, ImageState, InstanceState};

/// The type of an image: who sees it, and how unique its name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    /// Every account sees and launches it; its name is unique across owners.
    Public,
    /// A public image with a vendor, application and version.
    Marketplace,
    /// Its owner's own image (shared with other accounts if its owner says so).
    Custom,
}

impl ImageType {
    /// `public`, `marketplace` or `custom` (the catalog's text, `--type`).
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Public => "public",
            ImageType::Marketplace => "marketplace",
            ImageType::Custom => "custom",
        }
    }

    /// The type `as_str` names; anything else is an error naming the three.
    pub fn parse(s: &str) -> Result<ImageType> {
        match s {
            "public" => Ok(ImageType::Public),
            "marketplace" => Ok(ImageType::Marketplace),
            "custom" => Ok(ImageType::Custom),
            _ => Err(Error::Invalid(format!(
                "unknown image type {s:?}: use public, marketplace or custom"
            ))),
        }
    }
}

/// The schema, one entry per version. DO NOT edit a released entry: add one.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE images (
    id             TEXT PRIMARY KEY,            -- img-<16 hex>
    name           TEXT NOT NULL,
    type           TEXT NOT NULL CHECK (type IN ('public', 'marketplace', 'custom')),
    state          TEXT NOT NULL CHECK (state IN ('importing', 'available')),
    owner          TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    source_format  TEXT NOT NULL DEFAULT '',
    virtual_size   INTEGER NOT NULL DEFAULT 0,
    data_bytes     INTEGER NOT NULL DEFAULT 0,  -- bytes in non-zero blocks
    content_digest TEXT,                        -- hex BLAKE3 of the raw content
    created_at     INTEGER NOT NULL,            -- unix seconds
    map            BLOB,                        -- format::encode_map, NULL while importing
    map_digest     BLOB                         -- BLAKE3 of map
);
CREATE UNIQUE INDEX images_by_name ON images(name);

CREATE TABLE packs (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    name   TEXT NOT NULL UNIQUE,                -- 32 hex; file packs/<2>/<name>.pack
    state  TEXT NOT NULL CHECK (state IN ('pending', 'sealed')),
    image  TEXT,                                -- the import writing it, while pending
    size   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE frames (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    pack    INTEGER NOT NULL REFERENCES packs(id),
    offset  INTEGER NOT NULL,                   -- byte offset of the zstd frame in the pack
    clen    INTEGER NOT NULL,                   -- compressed length
    nchunks INTEGER NOT NULL                    -- chunks in the frame (decompressed = nchunks*4096)
);
CREATE INDEX frames_by_pack ON frames(pack);

CREATE TABLE chunks (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,    -- never reused: maps refer to it
    hkey  INTEGER NOT NULL,                     -- first 8 bytes of hash (LE, signed): the index key
    hash  BLOB NOT NULL,                        -- BLAKE3 of the 4096-byte chunk; unique
    frame INTEGER NOT NULL REFERENCES frames(id),
    slot  INTEGER NOT NULL                      -- index of the chunk in its frame
);
-- An 8-byte key indexes a third of the bytes of the full 32-byte hash;
-- lookups compare the full hash. Uniqueness of hash is kept by the importer
-- (it checks before inserting, inside its write transaction).
CREATE INDEX chunks_by_hkey ON chunks(hkey);
"#,
    // v2: chaining values of all-zero digest leaves (see digest::ZeroCvs).
    r#"
CREATE TABLE zero_cvs (
    offset INTEGER NOT NULL,
    len    INTEGER NOT NULL,
    cv     BLOB NOT NULL,                       -- BLAKE3 chaining value, 32 bytes
    PRIMARY KEY (offset, len)
) WITHOUT ROWID;

-- Input files imported before: an unchanged file (same dev, inode, size,
-- mtime, ctime) is re-imported from the image it became, without reading it.
-- Chunks entered by a running import, before the commit that makes them
-- part of the store (`import` = ImageId::key of that import). Kept apart
-- from `chunks` so that committing deletes rows here instead of rewriting
-- chunk rows.
CREATE TABLE pending_chunks (
    id     INTEGER PRIMARY KEY,                 -- chunks.id
    import INTEGER NOT NULL
);
CREATE INDEX pending_by_import ON pending_chunks(import);

CREATE TABLE source_files (
    dev      INTEGER NOT NULL,
    ino      INTEGER NOT NULL,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    image    TEXT NOT NULL,
    PRIMARY KEY (dev, ino)
) WITHOUT ROWID;
"#,
    // v3: instances (see launch/instance.rs).
    r#"
CREATE TABLE instances (
    id         TEXT PRIMARY KEY,                -- ins-<16 hex>
    name       TEXT NOT NULL UNIQUE,
    image      TEXT NOT NULL,                   -- images.id launched from (may be deleted since)
    image_name TEXT NOT NULL,                   -- its name at launch
    owner      TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'running', 'stopped', 'failed')),
    disk       TEXT NOT NULL CHECK (disk IN ('overlay', 'copy')),
    cpus       INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    accel      TEXT NOT NULL,                   -- requested: auto, kvm, tcg
    accel_used TEXT NOT NULL DEFAULT '',        -- what the last start used
    hostname   TEXT NOT NULL,
    forwards   TEXT NOT NULL DEFAULT '[]',      -- JSON list of qemu::Forward
    ssh_port   INTEGER,                         -- host port forwarded to guest port 22
    pid        INTEGER,                         -- QEMU's pid while running
    created_at INTEGER NOT NULL,
    error      TEXT NOT NULL DEFAULT ''         -- why it failed
);
CREATE INDEX instances_by_image ON instances(image);
"#,
    // v4: the image lifecycle (lineage, protection, deprecation,
    // marketplace fields, tags, shares).
    r#"
ALTER TABLE images ADD COLUMN parent TEXT;                      -- image captured or copied from
ALTER TABLE images ADD COLUMN parent_name TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN source_instance TEXT;             -- instance captured from
ALTER TABLE images ADD COLUMN copied_from TEXT NOT NULL DEFAULT ''; -- "DEPOT img-…" of a copy's origin
ALTER TABLE images ADD COLUMN protected INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN deprecated INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN vendor TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN application TEXT NOT NULL DEFAULT '';
ALTER TABLE images ADD COLUMN app_version TEXT NOT NULL DEFAULT '';

CREATE TABLE image_tags (
    image TEXT NOT NULL,
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (image, key)
) WITHOUT ROWID;

CREATE TABLE image_shares (
    image      TEXT NOT NULL,
    account    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (image, account)
) WITHOUT ROWID;
CREATE INDEX shares_by_account ON image_shares(account);

-- Copies of an image made into other depots (lineage, `image history`).
CREATE TABLE image_copies (
    image     TEXT NOT NULL,
    depot     TEXT NOT NULL,
    copy_id   TEXT NOT NULL,
    copied_at INTEGER NOT NULL
);
CREATE INDEX copies_by_image ON image_copies(image);

-- Names are unique per owner: an account learns nothing of others' custom
-- images from a name it picks.
DROP INDEX images_by_name;
CREATE UNIQUE INDEX images_by_owner_name ON images(owner, name);
CREATE INDEX images_by_name ON images(name);
"#,
    // v5: chunks that an unfinished copy into this depot brought (kept by
    // gc for a grace period, so that a killed copy resumes).
    r#"
CREATE TABLE copy_chunks (
    id   INTEGER PRIMARY KEY,                   -- chunks.id
    job  TEXT NOT NULL,                         -- "<source depot> <source img-id>"
    at   INTEGER NOT NULL                       -- unix seconds
);
CREATE INDEX copy_chunks_by_job ON copy_chunks(job);
"#,
    // v6: launch-only content. `restricted_from` = "<owner> <img-id>" of
    // the shared image whose content an image or instance carries ('' =
    // none): set at launch, restore and capture, never lifted (see
    // access.rs). Backfilled from the lineage recorded so far: an instance
    // of another account's custom image, a capture over such an image or
    // over a launch-only one.
    r#"
ALTER TABLE images ADD COLUMN restricted_from TEXT NOT NULL DEFAULT '';
ALTER TABLE instances ADD COLUMN restricted_from TEXT NOT NULL DEFAULT '';

WITH RECURSIVE lo(id, origin) AS (
    SELECT c.id, p.owner || ' ' || p.id
      FROM images c JOIN images p ON p.id = c.parent
     WHERE c.source_instance IS NOT NULL AND c.copied_from = ''
       AND p.type = 'custom' AND p.owner != c.owner
    UNION
    SELECT c.id, lo.origin
      FROM images c JOIN lo ON c.parent = lo.id
     WHERE c.source_instance IS NOT NULL AND c.copied_from = ''
)
UPDATE images SET restricted_from = (SELECT origin FROM lo WHERE lo.id = images.id LIMIT 1)
 WHERE id IN (SELECT id FROM lo);

UPDATE instances SET restricted_from = COALESCE((
    SELECT CASE WHEN i.restricted_from != '' THEN i.restricted_from
                WHEN i.type = 'custom' AND i.owner != instances.owner THEN i.owner || ' ' || i.id
                ELSE '' END
      FROM images i WHERE i.id = instances.image), '');
"#,
    // v7: public and marketplace names are unique across owners (nobody
    // publishes under another's public name). Duplicates from before keep
    // the oldest's name; the newer ones are renamed "<name>-<img-id>".
    r#"
UPDATE images SET name = name || '-' || id
 WHERE type IN ('public', 'marketplace') AND EXISTS (
       SELECT 1 FROM images o
        WHERE o.type IN ('public', 'marketplace') AND o.name = images.name
          AND (o.created_at < images.created_at
               OR (o.created_at = images.created_at AND o.rowid < images.rowid)));
CREATE UNIQUE INDEX images_public_name ON images(name) WHERE type IN ('public', 'marketplace');
"#,
    // v8: launch bases recorded once they are complete and durable (file
    // fsynced, renamed, directory fsynced); a base file without its row, or
    // not matching it, is never booted (see image::bases::ensure_base).
    r#"
CREATE TABLE bases (
    image      TEXT PRIMARY KEY,                -- images.id; file bases/<image>.raw
    size       INTEGER NOT NULL,                -- bytes (the image's virtual size)
    digest     TEXT NOT NULL,                   -- hex BLAKE3 of the whole file
    created_at INTEGER NOT NULL                 -- unix seconds
) WITHOUT ROWID;
"#,
    // v9: lazy instance disks (`disk = 'lazy'`: a qcow2 overlay whose
    // backing QEMU reads from vmdepot's NBD server, image::serve). SQLite
    // cannot change a CHECK in place: the table is rebuilt, rows as they
    // are.
    r#"
CREATE TABLE instances_v9 (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    image      TEXT NOT NULL,
    image_name TEXT NOT NULL,
    owner      TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'running', 'stopped', 'failed')),
    disk       TEXT NOT NULL CHECK (disk IN ('lazy', 'overlay', 'copy')),
    cpus       INTEGER NOT NULL,
    memory_mib INTEGER NOT NULL,
    accel      TEXT NOT NULL,
    accel_used TEXT NOT NULL DEFAULT '',
    hostname   TEXT NOT NULL,
    forwards   TEXT NOT NULL DEFAULT '[]',
    ssh_port   INTEGER,
    pid        INTEGER,
    created_at INTEGER NOT NULL,
    error      TEXT NOT NULL DEFAULT '',
    restricted_from TEXT NOT NULL DEFAULT ''
);
INSERT INTO instances_v9 (id, name, image, image_name, owner, state, disk, cpus, memory_mib,
                          accel, accel_used, hostname, forwards, ssh_port, pid, created_at,
                          error, restricted_from)
     SELECT id, name, image, image_name, owner, state, disk, cpus, memory_mib,
            accel, accel_used, hostname, forwards, ssh_port, pid, created_at,
            error, restricted_from
       FROM instances;
DROP TABLE instances;
ALTER TABLE instances_v9 RENAME TO instances;
CREATE INDEX instances_by_image ON instances(image);
"#,
    // v10: partial images (`state = 'partial'`): a remote image run lazily,
    // whose chunks are fetched as its instances read them. The images
    // table is rebuilt for the CHECK, rows and indexes as they are;
    // `partial_images` holds each one's remote and manifest.
    r#"
CREATE TABLE images_v10 (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    type           TEXT NOT NULL CHECK (type IN ('public', 'marketplace', 'custom')),
    state          TEXT NOT NULL CHECK (state IN ('importing', 'available', 'partial')),
    owner          TEXT NOT NULL,
    description    TEXT NOT NULL DEFAULT '',
    source_format  TEXT NOT NULL DEFAULT '',
    virtual_size   INTEGER NOT NULL DEFAULT 0,
    data_bytes     INTEGER NOT NULL DEFAULT 0,
    content_digest TEXT,
    created_at     INTEGER NOT NULL,
    map            BLOB,
    map_digest     BLOB,
    parent TEXT,
    parent_name TEXT NOT NULL DEFAULT '',
    source_instance TEXT,
    copied_from TEXT NOT NULL DEFAULT '',
    protected INTEGER NOT NULL DEFAULT 0,
    deprecated INTEGER NOT NULL DEFAULT 0,
    vendor TEXT NOT NULL DEFAULT '',
    application TEXT NOT NULL DEFAULT '',
    app_version TEXT NOT NULL DEFAULT '',
    restricted_from TEXT NOT NULL DEFAULT ''
);
INSERT INTO images_v10 (id, name, type, state, owner, description, source_format, virtual_size,
                        data_bytes, content_digest, created_at, map, map_digest, parent,
                        parent_name, source_instance, copied_from, protected, deprecated,
                        vendor, application, app_version, restricted_from)
     SELECT id, name, type, state, owner, description, source_format, virtual_size,
            data_bytes, content_digest, created_at, map, map_digest, parent,
            parent_name, source_instance, copied_from, protected, deprecated,
            vendor, application, app_version, restricted_from
       FROM images;
DROP TABLE images;
ALTER TABLE images_v10 RENAME TO images;
CREATE UNIQUE INDEX images_by_owner_name ON images(owner, name);
CREATE INDEX images_by_name ON images(name);
CREATE UNIQUE INDEX images_public_name ON images(name) WHERE type IN ('public', 'marketplace');
CREATE TABLE partial_images (
    image    TEXT PRIMARY KEY,                  -- images.id, state 'partial'
    remote   TEXT NOT NULL,                     -- the remote's name (DEPOT/remotes/NAME.json)
    manifest BLOB NOT NULL,                     -- the remote manifest it is run from (FORMAT.md)
    prefetch INTEGER NOT NULL DEFAULT 0         -- 1: its disk server fetches the rest
) WITHOUT ROWID;
"#,
    // v11: ephemeral instances record their owner (a process: when it is
    // gone, any later opening of the depot kills and deletes them), and
    // instances the user their image names for SSH (its `ssh-user` tag).
    r#"
ALTER TABLE instances ADD COLUMN owner_lease TEXT;  -- ephemeral: 'BOOT_ID PID START_TICKS' of its owner
ALTER TABLE instances ADD COLUMN ssh_user TEXT;     -- the image's ssh-user tag at launch
"#,
    // v12: the firmware each instance boots with (`instance run
    // --firmware`), chosen at launch; instances made before boot BIOS.
    r#"
ALTER TABLE instances ADD COLUMN firmware TEXT NOT NULL DEFAULT 'bios'
    CHECK (firmware IN ('bios', 'uefi'));
"#,
];

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

/// Creates an empty file at `path` with `file_mode` unless one exists.
///
/// A file that exists is never opened here: closing any descriptor of a
/// SQLite file drops every POSIX lock this process holds on it, the other
/// connections' included (fcntl locks are per process). A connection that
/// lost its shared lock lets another process, closing its last connection,
/// checkpoint and delete the WAL under it, after which it reads a stale
/// snapshot and writes into a deleted file.
fn create_only(path: &Path, file_mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(file_mode)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Opens (creating if needed) the catalog at `path`, configured and migrated.
/// A new catalog and its lock file are created with `file_mode` (SQLite gives
/// its `-wal` and `-shm` files the catalog's mode).
///
/// `existing` says why the depot is known to exist already (its marker,
/// pack files): then a missing or empty catalog (no schema, `user_version`
/// 0) is not created afresh but refused, since the depot's images would
/// silently vanish and gc would delete every pack.
pub fn open(path: &Path, file_mode: u32, existing: Option<&str>) -> Result<Connection> {
    use std::os::unix::fs::OpenOptionsExt;
    // Creating the catalog, switching it to WAL and migrating it are
    // serialised between processes by a lock file beside it (SQLite gives
    // "database is locked" without waiting for a journal-mode change).
    let lock_path = path.with_extension("db.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(file_mode)
        .open(&lock_path)
        .map_err(|e| Error::io(&lock_path, e))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(&lock_path, e.into()))?;
    let lost = |what: &str| {
        Error::StoreDamaged(format!(
            "{}: the catalog is {what}, but {}: the depot's images are unknown without it: run `vmdepot fsck --repair` to rebuild it from the packs and manifests (or restore catalog.db, and catalog.db-wal if the backup has one, from a backup); nothing was changed",
            path.display(),
            existing.unwrap_or_default()
        ))
    };
    if existing.is_some() && !path.exists() {
        return Err(lost("missing"));
    }
    create_only(path, file_mode)?;
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 && existing.is_some() {
        return Err(lost("empty (no schema)"));
    }
    if version == 0 {
        // Only possible before the file is initialised: lets
        // `vacuum_free_pages` give freed pages back to the filesystem.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    // journal_mode returns a row; pragma_update would reject it.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Invalid(format!(
            "{}: the filesystem does not support SQLite's WAL mode (got {mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "cache_size", -16384)?; // 16 MiB
    migrate(&mut conn)?;
    Ok(conn)
}

/// Opens the catalog for reading only, writing nothing: for read-only
/// commands on a full (or read-only) filesystem, where [`open`] fails
/// because SQLite cannot extend `catalog.db-shm`.
///
/// `SQLITE_OPEN_READ_ONLY` with `readonly_shm=1`: SQLite maps `-shm`
/// read-only when a writer has it open, and otherwise reads the WAL into
/// heap memory (safe with WAL writers, unlike `immutable`). `-shm` must
/// exist for that: an empty one is created if it is missing (a name, no
/// data block), as SQLite itself creates an empty `-wal`. The schema must
/// be current (migrating writes).
pub fn open_read_only(path: &Path, file_mode: u32, existing: Option<&str>) -> Result<Connection> {
    use rusqlite::OpenFlags;
    if !path.exists() {
        return Err(Error::StoreDamaged(format!(
            "{}: the catalog is missing, but {}: restore catalog.db from a backup; nothing was changed",
            path.display(),
            existing.unwrap_or("the depot exists")
        )));
    }
    let mut shm = path.as_os_str().to_owned();
    shm.push("-shm");
    let shm = std::path::PathBuf::from(shm);
    create_only(&shm, file_mode)?;
    let mut uri = String::from("file:");
    for &b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/._-~".contains(&b) {
            uri.push(b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?readonly_shm=1");
    let conn = Connection::open_with_flags(
        &uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 && existing.is_some() {
        return Err(Error::StoreDamaged(format!(
            "{}: the catalog is empty (no schema), but {}: restore catalog.db from a backup; nothing was changed",
            path.display(),
            existing.unwrap_or_default()
        )));
    }
    if version as usize != MIGRATIONS.len() {
        return Err(Error::NoSpace {
            path: path.to_owned(),
        });
    }
    conn.pragma_update(None, "cache_size", -16384)?;
    Ok(conn)
}

/// Brings the schema to the newest version (the caller holds the lock).
fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current as usize == MIGRATIONS.len() {
        return Ok(());
    }
    migrations().to_latest(conn)?;
    Ok(())
}

/// One image as the catalog stores it (without the map blob).
#[derive(Clone, Debug)]
pub struct ImageRow {
    pub id: ImageId,
    pub name: String,
    pub kind: String,
    /// `None` when the stored text is none the schema allows (the row is
    /// damaged then: see [`ImageRow::damage`]).
    pub state: Option<ImageState>,
    pub owner: String,
    pub description: String,
    pub source_format: String,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub content_digest: Option<String>,
    pub created_at: i64,
    pub parent: Option<String>,
    pub parent_name: String,
    pub source_instance: Option<String>,
    pub copied_from: String,
    pub protected: bool,
    pub deprecated: bool,
    pub vendor: String,
    pub application: String,
    pub app_version: String,
    /// `"<owner> <img-id>"` of the shared image whose content this image
    /// carries (launch-only for its owner), or empty.
    pub restricted_from: String,
    /// What is wrong with the row, if it is damaged (then it may only be
    /// shown, listed as damaged, and deleted).
    pub damage: Option<String>,
}

impl ImageRow {
    /// Refuses a damaged row (exit 5), naming it.
    pub fn check_sound(&self) -> Result<()> {
        match &self.damage {
            Some(d) => Err(Error::StoreDamaged(format!(
                "image {} ({}): {d}; run `vmdepot fsck`, and delete the image or restore catalog.db from a backup",
                self.name, self.id
            ))),
            None => Ok(()),
        }
    }
}

const IMAGE_COLS: &str = "id, name, type, state, owner, description, source_format, \
                          virtual_size, data_bytes, content_digest, created_at, parent, \
                          parent_name, source_instance, copied_from, protected, deprecated, \
                          vendor, application, app_version, restricted_from";

/// Reads a row's columns leniently, noting what is wrong with them instead
/// of failing: one damaged row must not hide the others.
struct Lenient<'a, 'b> {
    r: &'a rusqlite::Row<'b>,
    bad: Vec<String>,
}

impl Lenient<'_, '_> {
    fn text(&mut self, i: usize, col: &str) -> rusqlite::Result<String> {
        let (s, ok) = text_lossy(self.r, i)?;
        if !ok {
            self.bad.push(format!("column {col} is not UTF-8 text"));
        }
        Ok(s)
    }

    fn opt_text(&mut self, i: usize, col: &str) -> rusqlite::Result<Option<String>> {
        match self.r.get_ref(i)? {
            rusqlite::types::ValueRef::Null => Ok(None),
            _ => self.text(i, col).map(Some),
        }
    }

    fn int(&mut self, i: usize, col: &str) -> rusqlite::Result<i64> {
        match self.r.get_ref(i)? {
            rusqlite::types::ValueRef::Integer(v) => Ok(v),
            _ => {
                self.bad.push(format!("column {col} is not an integer"));
                Ok(0)
            }
        }
    }

    fn size(&mut self, i: usize, col: &str) -> rusqlite::Result<u64> {
        let v = self.int(i, col)?;
        if v < 0 {
            self.bad.push(format!("column {col} is negative ({v})"));
        }
        Ok(v.max(0) as u64)
    }
}

/// The text of column `i`, and whether it was valid UTF-8 text (anything
/// else is shown lossily).
pub fn text_lossy(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<(String, bool)> {
    use rusqlite::types::ValueRef;
    Ok(match r.get_ref(i)? {
        ValueRef::Text(b) => match std::str::from_utf8(b) {
            Ok(s) => (s.to_owned(), true),
            Err(_) => (String::from_utf8_lossy(b).into_owned(), false),
        },
        ValueRef::Blob(b) => (String::from_utf8_lossy(b).into_owned(), false),
        ValueRef::Integer(v) => (v.to_string(), false),
        ValueRef::Real(v) => (v.to_string(), false),
        ValueRef::Null => (String::new(), false),
    })
}

fn image_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    let mut l = Lenient { r, bad: Vec::new() };
    let id = l.text(0, "id")?;
    if ImageId::parse(&id).is_none() {
        l.bad.push(format!("id {id:?} is not img-<16 hex digits>"));
    }
    let kind = l.text(2, "type")?;
    if !matches!(kind.as_str(), "public" | "marketplace" | "custom") {
        l.bad.push(format!(
            "type {kind:?} is not public, marketplace or custom"
        ));
    }
    let state_text = l.text(3, "state")?;
    let state = ImageState::parse(&state_text);
    if state.is_none() {
        l.bad.push(format!(
            "state {state_text:?} is not importing, available or partial"
        ));
    }
    let mut row = ImageRow {
        id: ImageId::from_db(id),
        name: l.text(1, "name")?,
        kind,
        state,
        owner: l.text(4, "owner")?,
        description: l.text(5, "description")?,
        source_format: l.text(6, "source_format")?,
        virtual_size: l.size(7, "virtual_size")?,
        data_bytes: l.size(8, "data_bytes")?,
        content_digest: l.opt_text(9, "content_digest")?,
        created_at: l.int(10, "created_at")?,
        parent: l.opt_text(11, "parent")?,
        parent_name: l.text(12, "parent_name")?,
        source_instance: l.opt_text(13, "source_instance")?,
        copied_from: l.text(14, "copied_from")?,
        protected: l.int(15, "protected")? != 0,
        deprecated: l.int(16, "deprecated")? != 0,
        vendor: l.text(17, "vendor")?,
        application: l.text(18, "application")?,
        app_version: l.text(19, "app_version")?,
        restricted_from: l.text(20, "restricted_from")?,
        damage: None,
    };
    if !l.bad.is_empty() {
        row.damage = Some(format!(
            "catalog table images, row {}: {}",
            row.id,
            l.bad.join(", ")
        ));
    }
    Ok(row)
}

/// Every image with this id or name (names are unique per owner, and
/// public and marketplace names across owners).
pub fn find_images(conn: &Connection, reference: &str) -> Result<Vec<ImageRow>> {
    let sql = format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1 OR name = ?1");
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map([reference], image_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// All images, oldest first.
pub fn list_images(conn: &Connection) -> Result<Vec<ImageRow>> {
    let sql = format!("SELECT {IMAGE_COLS} FROM images ORDER BY created_at, name");
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map([], image_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The encoded map of an available image, checked against its digest.
pub fn image_map(conn: &Connection, id: &ImageId) -> Result<crate::format::BlockMap> {
    let (blob, digest): (Option<Vec<u8>>, Option<Vec<u8>>) = conn.query_row(
        "SELECT map, map_digest FROM images WHERE id = ?1",
        [id.as_str()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(blob), Some(digest)) = (blob, digest) else {
        return Err(Error::StoreDamaged(format!(
            "catalog table images, image {id}: it has no block map"
        )));
    };
    if blake3::hash(&blob).as_bytes()[..] != digest[..] {
        return Err(Error::StoreDamaged(format!(
            "catalog table images, image {id}: its block map does not match its recorded digest"
        )));
    }
    crate::format::decode_map(&blob).map_err(|e| {
        Error::StoreDamaged(format!(
            "catalog table images, image {id}: its block map cannot be decoded: {e}"
        ))
    })
}

/// Where a chunk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkLoc {
    pub hash: ChunkHash,
    pub frame: i64,
    pub slot: u32,
}

/// Where a frame lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameLoc {
    pub pack: i64,
    pub offset: u64,
    pub clen: u64,
    pub nchunks: u32,
}

/// Looks up chunks by id (`ids` sorted): one range query per run of
/// consecutive ids, which is how images use them.
pub fn chunk_locs(conn: &Connection, ids: &[ChunkId]) -> Result<HashMap<ChunkId, ChunkLoc>> {
    let mut st =
        conn.prepare_cached("SELECT id, hash, frame, slot FROM chunks WHERE id BETWEEN ?1 AND ?2")?;
    let mut out = HashMap::with_capacity(ids.len());
    for (first, last) in crate::format::id_runs(ids) {
        let mut rows = st.query([first, last])?;
        while let Some(r) = rows.next()? {
            let h: Vec<u8> = r.get(1)?;
            out.insert(
                r.get(0)?,
                ChunkLoc {
                    hash: ChunkHash(h.as_slice().try_into().unwrap_or([0; 32])),
                    frame: r.get(2)?,
                    slot: r.get::<_, i64>(3)? as u32,
                },
            );
        }
    }
    Ok(out)
}

/// Looks up a frame by id.
pub fn frame_loc(conn: &Connection, id: i64) -> Result<Option<FrameLoc>> {
    let mut st =
        conn.prepare_cached("SELECT pack, offset, clen, nchunks FROM frames WHERE id = ?1")?;
    Ok(st
        .query_row([id], |r| {
            Ok(FrameLoc {
                pack: r.get(0)?,
                offset: r.get::<_, i64>(1)? as u64,
                clen: r.get::<_, i64>(2)? as u64,
                nchunks: r.get::<_, i64>(3)? as u32,
            })
        })
        .optional()?)
}

/// Name of a pack by id (checked: a damaged row is an error naming it).
pub fn pack_name(conn: &Connection, id: i64) -> Result<Option<String>> {
    let mut st = conn.prepare_cached("SELECT name FROM packs WHERE id = ?1")?;
    let Some((name, utf8)) = st.query_row([id], |r| text_lossy(r, 0)).optional()? else {
        return Ok(None);
    };
    check_pack_name(id, &name, utf8)?;
    Ok(Some(name))
}

/// A pack row's name must be what [`crate::store::new_pack_name`] makes.
pub fn check_pack_name(id: i64, name: &str, utf8: bool) -> Result<()> {
    if utf8 && crate::store::valid_pack_name(name) {
        return Ok(());
    }
    Err(Error::StoreDamaged(format!(
        "catalog table packs, row {id}: pack name {name:?} is not 32 lowercase hex digits; run `vmdepot fsck`, and restore catalog.db from a backup"
    )))
}

/// Every pack row's name checked (gc runs only on sound pack rows).
pub fn check_pack_names(conn: &Connection) -> Result<()> {
    let mut st = conn.prepare("SELECT id, name FROM packs")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let (name, utf8) = text_lossy(r, 1)?;
        check_pack_name(r.get(0)?, &name, utf8)?;
    }
    Ok(())
}

/// The index key of a hash: its first 8 bytes.
pub fn hkey(hash: &ChunkHash) -> i64 {
    i64::from_le_bytes(hash.0[..8].try_into().unwrap())
}

/// The chunk id stored for a hash, if any: a committed chunk, or one that
/// the import of `image` entered and has not committed yet. (Other imports'
/// pending chunks are not durable yet and are never shared.)
pub fn chunk_by_hash(
    conn: &Connection,
    hash: &ChunkHash,
    image: &ImageId,
) -> Result<Option<ChunkId>> {
    let mut st = conn.prepare_cached(
        "SELECT c.id FROM chunks c WHERE c.hkey = ?1 AND c.hash = ?2 AND NOT EXISTS
         (SELECT 1 FROM pending_chunks p WHERE p.id = c.id AND p.import != ?3)",
    )?;
    Ok(st
        .query_row(params![hkey(hash), &hash.0[..], image.key()], |r| r.get(0))
        .optional()?)
}

/// Runs `f` in a write transaction taken at once (`BEGIN IMMEDIATE`).
///
/// Every write goes through here or another IMMEDIATE transaction: an
/// autocommit write starts as a read and, in WAL mode, fails at once with
/// "database is locked" (no busy wait) when another process committed
/// between its read and its write.
pub fn write<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    let tx = begin_write(conn)?;
    let v = f(&tx)?;
    tx.commit()?;
    Ok(v)
}

/// Runs `f` in one read transaction: one snapshot of the catalog, and
/// SQLite's file locks taken once for all of `f`'s queries.
pub fn read<T>(conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    let tx = conn.unchecked_transaction()?;
    let v = f(&tx)?;
    tx.finish()?;
    Ok(v)
}

/// `BEGIN IMMEDIATE`, waiting for other writers. SQLite's busy handler
/// covers most waits, but under concurrent writers and gc it was measured to
/// return a plain SQLITE_BUSY at once now and then (WAL mode, several
/// processes): those are retried here, for up to the same 60 s.
pub fn begin_write(conn: &Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mut pause = std::time::Duration::from_millis(2);
    loop {
        match rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate) {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

/// How long a writer waits for others.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Replaces the map of an available image by one of the same content (gc
/// merging chunks of equal hash); in the caller's write transaction.
/// Returns whether the image was still there.
pub fn replace_map(tx: &Connection, id: &ImageId, map: &crate::format::BlockMap) -> Result<bool> {
    let blob = crate::format::encode_map(map);
    let map_digest = blake3::hash(&blob);
    let n = tx.execute(
        "UPDATE images SET map = ?2, map_digest = ?3 WHERE id = ?1 AND state = 'available'",
        params![id.as_str(), blob, &map_digest.as_bytes()[..]],
    )?;
    Ok(n == 1)
}

/// Makes an image available with its content (in the caller's write
/// transaction): size, data bytes, digest, map and the map's digest.
pub fn set_available(
    tx: &Connection,
    id: &ImageId,
    size: u64,
    data_bytes: u64,
    digest_hex: &str,
    map: &crate::format::BlockMap,
) -> Result<()> {
    let blob = crate::format::encode_map(map);
    let map_digest = blake3::hash(&blob);
    tx.execute(
        "UPDATE images SET state = 'available', virtual_size = ?2, data_bytes = ?3,
                content_digest = ?4, map = ?5, map_digest = ?6
         WHERE id = ?1",
        params![
            id.as_str(),
            size as i64,
            data_bytes as i64,
            digest_hex,
            blob,
            &map_digest.as_bytes()[..]
        ],
    )?;
    Ok(())
}

/// Registers a pack file that an import is about to write.
pub fn insert_pending_pack(conn: &Connection, name: &str, image: &ImageId) -> Result<i64> {
    write(conn, |c| {
        c.execute(
            "INSERT INTO packs (name, state, image) VALUES (?1, 'pending', ?2)",
            params![name, image.as_str()],
        )?;
        Ok(c.last_insert_rowid())
    })
}

/// The known zero-leaf chaining values for content of `size` bytes.
pub fn load_zero_cvs(conn: &Connection, size: u64) -> Result<crate::digest::ZeroCvs> {
    let mut st = conn.prepare_cached("SELECT offset, len, cv FROM zero_cvs WHERE offset < ?1")?;
    let rows = st.query_map([size as i64], |r| {
        let cv: Vec<u8> = r.get(2)?;
        Ok((
            (r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64),
            cv.as_slice().try_into().unwrap_or([0u8; 32]),
        ))
    })?;
    Ok(crate::digest::ZeroCvs::new(
        rows.collect::<rusqlite::Result<_>>()?,
    ))
}

/// Keeps newly computed zero-leaf chaining values.
pub fn save_zero_cvs(conn: &Connection, cvs: &[(u64, u64, [u8; 32])]) -> Result<()> {
    let mut st = conn
        .prepare_cached("INSERT OR IGNORE INTO zero_cvs (offset, len, cv) VALUES (?1, ?2, ?3)")?;
    for (o, l, cv) in cvs {
        st.execute(params![*o as i64, *l as i64, &cv[..]])?;
    }
    Ok(())
}

/// Returns the catalog's free pages to the filesystem (best effort).
pub fn vacuum_free_pages(conn: &Connection) {
    // The pragma frees one page per step: step it to the end.
    let run = || {
        write(conn, |c| {
            let mut st = c.prepare("PRAGMA incremental_vacuum")?;
            let mut rows = st.query([])?;
            while rows.next()?.is_some() {}
            Ok(())
        })
    };
    if let Err(e) = run() {
        tracing::debug!("incremental vacuum: {e}");
    }
}

/// Current unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What the catalog records of a complete launch base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseRecord {
    pub size: u64,
    pub digest: String,
}

/// The record of the base of `image`, if it is recorded as complete.
pub fn base_record(conn: &Connection, image: &str) -> Result<Option<BaseRecord>> {
    Ok(conn
        .query_row(
            "SELECT size, digest FROM bases WHERE image = ?1",
            [image],
            |r| {
                Ok(BaseRecord {
                    size: r.get::<_, i64>(0)? as u64,
                    digest: r.get(1)?,
                })
            },
        )
        .optional()?)
}

/// Records the base of `image` as complete (its file is durable).
pub fn record_base(conn: &Connection, image: &str, rec: &BaseRecord) -> Result<()> {
    write(conn, |tx| {
        tx.execute(
            "INSERT OR REPLACE INTO bases (image, size, digest, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![image, rec.size as i64, rec.digest, now()],
        )?;
        Ok(())
    })
}

/// Forgets the base of `image` (its file is gone or about to be rebuilt).
pub fn forget_base(conn: &Connection, image: &str) -> Result<()> {
    write(conn, |tx| {
        tx.execute("DELETE FROM bases WHERE image = ?1", [image])?;
        Ok(())
    })
}

/// The images whose bases are recorded (ids as stored, unchecked).
pub fn recorded_bases(conn: &Connection) -> Result<Vec<String>> {
    let mut st = conn.prepare("SELECT image FROM bases")?;
    let rows = st.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Image ids that instances use through a launch base (gc keeps their bases).
pub(crate) fn images_with_overlays(conn: &Connection) -> Result<std::collections::HashSet<String>> {
    let mut st = conn.prepare("SELECT DISTINCT image FROM instances WHERE disk = 'overlay'")?;
    let rows = st.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
        let n = MIGRATIONS.len();
        let mut c = Connection::open_in_memory().unwrap();
        migrations().to_latest(&mut c).unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            v as usize, n,
            "user_version must equal the number of migrations"
        );
    }

    /// v6 marks what leaked before it (captures over another account's
    /// custom image, transitively, and instances of such images); v7 keeps
    /// the oldest public name and renames newer duplicates.
    #[test]
    fn v6_and_v7_fix_existing_catalogs() {
        let mut c = Connection::open_in_memory().unwrap();
        migrations().to_version(&mut c, 5).unwrap();
        let img = |id: &str, name: &str, kind: &str, owner: &str, at: i64, parent: Option<&str>| {
            let captured = parent.map(|_| "ins-0");
            c.execute(
                "INSERT INTO images (id, name, type, state, owner, created_at, parent, source_instance)
                 VALUES (?1, ?2, ?3, 'available', ?4, ?5, ?6, ?7)",
                params![id, name, kind, owner, at, parent, captured],
            )
            .unwrap();
        };
        img("img-s", "secret", "custom", "alice", 1, None);
        img("img-b1", "b1", "custom", "bob", 2, Some("img-s"));
        img("img-b2", "b2", "custom", "bob", 3, Some("img-b1"));
        img("img-own", "own", "custom", "bob", 4, None);
        img("img-b3", "b3", "custom", "bob", 5, Some("img-own"));
        img("img-a2", "a2", "custom", "alice", 6, Some("img-s"));
        img("img-p1", "debian", "public", "alice", 7, None);
        img("img-p2", "debian", "public", "eve", 8, None);
        img("img-p3", "debian", "marketplace", "mallory", 9, None);
        img("img-c", "debian", "custom", "bob", 10, None);
        for (id, image, owner) in [
            ("ins-1", "img-s", "bob"),
            ("ins-2", "img-b2", "bob"),
            ("ins-3", "img-own", "bob"),
            ("ins-4", "img-gone", "bob"),
        ] {
            c.execute(
                "INSERT INTO instances (id, name, image, image_name, owner, state, disk, cpus,
                                        memory_mib, accel, hostname, created_at)
                 VALUES (?1, ?1, ?2, '', ?3, 'stopped', 'overlay', 1, 512, 'auto', 'h', 0)",
                params![id, image, owner],
            )
            .unwrap();
        }
        migrations().to_latest(&mut c).unwrap();
        let col = |table: &str, col: &str, id: &str| -> String {
            c.query_row(
                &format!("SELECT {col} FROM {table} WHERE id = ?1"),
                [id],
                |r| r.get(0),
            )
            .unwrap()
        };
        for id in ["img-b1", "img-b2"] {
            assert_eq!(col("images", "restricted_from", id), "alice img-s", "{id}");
        }
        for id in ["img-s", "img-own", "img-b3", "img-a2", "img-p1", "img-c"] {
            assert_eq!(col("images", "restricted_from", id), "", "{id}");
        }
        for (id, want) in [
            ("ins-1", "alice img-s"),
            ("ins-2", "alice img-s"),
            ("ins-3", ""),
            ("ins-4", ""),
        ] {
            assert_eq!(col("instances", "restricted_from", id), want, "{id}");
        }
        assert_eq!(col("images", "name", "img-p1"), "debian");
        assert_eq!(col("images", "name", "img-p2"), "debian-img-p2");
        assert_eq!(col("images", "name", "img-p3"), "debian-img-p3");
        assert_eq!(col("images", "name", "img-c"), "debian");
        // from now on the index refuses a second public "debian"
        let dup = c.execute(
            "INSERT INTO images (id, name, type, state, owner, created_at)
             VALUES ('img-x', 'debian', 'marketplace', 'importing', 'trudy', 11)",
            [],
        );
        assert!(dup.is_err());
    }

    #[test]
    fn open_twice_and_find() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("catalog.db");
        let c = open(&p, 0o600, None).unwrap();
        drop(open(&p, 0o600, Some("test")).unwrap());
        assert!(find_images(&c, "nope").unwrap().is_empty());
    }
}
