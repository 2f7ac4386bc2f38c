//! The `instances` table: [`InstanceRow`] (one instance as stored),
//! [`NewInstance`] (what a launch enters), and every statement the launch
//! layer, the lifecycle and the depot run on instances: lookups by
//! reference and owner, the state changes (`pending` → `stopped` →
//! `running` → `stopped`, or `failed`), deletion, and the questions other
//! layers ask (who runs from a base, who uses an image).

use rusqlite::{params, Connection, OptionalExtension};

use crate::catalog::state::{DiskMode, InstanceState};
use crate::catalog::write;
use crate::error::{Error, Result};

/// One instance as the catalog stores it.
#[derive(Clone, Debug)]
pub struct InstanceRow {
    /// `ins-<16 hex>`.
    pub id: String,
    pub name: String,
    /// Id of the image it was launched (or restored) from; that image may
    /// be deleted since.
    pub image: String,
    /// The image's current name (its last one, once it is deleted).
    pub image_name: String,
    pub owner: String,
    pub state: InstanceState,
    pub disk: DiskMode,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The accelerator asked for: `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// The accelerator the last start used (empty before the first).
    pub accel_used: String,
    pub hostname: String,
    /// The JSON list of its port forwards (`launch::qemu::Forward`).
    pub forwards: String,
    /// The host port forwarded to guest port 22, if any.
    pub ssh_port: Option<u16>,
    /// QEMU's pid while running.
    pub pid: Option<i32>,
    /// Unix seconds.
    pub created_at: i64,
    /// Why it failed (empty otherwise).
    pub error: String,
    /// Launch-only origin of the disk's content (see `depot/access.rs`),
    /// or empty.
    pub restricted_from: String,
    /// An ephemeral instance's owner: the process whose end ends the
    /// instance (`proc::Lease`), `None` for the others.
    pub owner_lease: Option<String>,
    /// The user to SSH in as (the image's `ssh-user` tag at launch).
    pub ssh_user: Option<String>,
    /// The firmware it boots with: `bios` or `uefi`.
    pub firmware: String,
}

const COLS: &str = "id, name, image, image_name, owner, state, disk, cpus, memory_mib, accel, \
                    accel_used, hostname, forwards, ssh_port, pid, created_at, error, \
                    restricted_from, owner_lease, ssh_user, firmware";

fn row_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<InstanceRow> {
    Ok(InstanceRow {
        id: r.get(0)?,
        name: r.get(1)?,
        image: r.get(2)?,
        image_name: r.get(3)?,
        owner: r.get(4)?,
        state: r.get(5)?,
        disk: r.get(6)?,
        cpus: r.get(7)?,
        memory_mib: r.get::<_, i64>(8)? as u64,
        accel: r.get(9)?,
        accel_used: r.get(10)?,
        hostname: r.get(11)?,
        forwards: r.get(12)?,
        ssh_port: r.get(13)?,
        pid: r.get(14)?,
        created_at: r.get(15)?,
        error: r.get(16)?,
        restricted_from: r.get(17)?,
        owner_lease: r.get(18)?,
        ssh_user: r.get(19)?,
        firmware: r.get(20)?,
    })
}

/// The instance of `owner` with this id or name (an account sees its own
/// instances only).
pub fn find_instance(
    conn: &Connection,
    reference: &str,
    owner: &str,
) -> Result<Option<InstanceRow>> {
    let sql = format!("SELECT {COLS} FROM instances WHERE (id = ?1 OR name = ?1) AND owner = ?2");
    Ok(conn
        .query_row(&sql, params![reference, owner], row_from)
        .optional()?)
}

/// The ids of `owner`'s instances, oldest first.
pub fn instance_ids(conn: &Connection, owner: &str) -> Result<Vec<String>> {
    let mut st =
        conn.prepare("SELECT id FROM instances WHERE owner = ?1 ORDER BY created_at, name")?;
    let rows = st.query_map([owner], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The name of the instance `id`, whoever owns it, if it still exists.
pub fn instance_name(conn: &Connection, id: &str) -> Result<Option<String>> {
    Ok(conn
        .query_row("SELECT name FROM instances WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?)
}

/// How many instances (of any owner) were launched or restored from `image`.
pub fn count_using_image(conn: &Connection, image: &str) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM instances WHERE image = ?1",
        [image],
        |r| r.get(0),
    )?)
}

/// The running instances of `image` with disks of `mode` as the catalog
/// records them: (id, name, pid). Whether each QEMU still lives is the
/// caller's check.
pub fn running_of(
    conn: &Connection,
    image: &str,
    mode: DiskMode,
) -> Result<Vec<(String, String, Option<i32>)>> {
    let mut st = conn.prepare_cached(
        "SELECT id, name, pid FROM instances
         WHERE image = ?1 AND disk = ?2 AND state = 'running'",
    )?;
    let rows = st.query_map(params![image, mode.as_str()], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// One instance a launch enters (as `pending`).
#[derive(Clone, Debug)]
pub struct NewInstance<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub image: &'a str,
    pub image_name: &'a str,
    pub owner: &'a str,
    pub disk: DiskMode,
    pub cpus: u32,
    pub memory_mib: u64,
    /// The accelerator asked for: `auto`, `kvm` or `tcg`.
    pub accel: &'a str,
    pub hostname: String,
    pub created_at: i64,
    pub restricted_from: &'a str,
    /// An ephemeral instance's owner (`proc::Lease`).
    pub owner_lease: Option<&'a str>,
    /// The image's `ssh-user` tag.
    pub ssh_user: Option<&'a str>,
    /// `bios` or `uefi`.
    pub firmware: &'a str,
}

/// Enters the instances of one launch as `pending`, all or none. A name
/// that is taken is an error naming it.
pub fn insert_pending(conn: &Connection, rows: &[NewInstance<'_>]) -> Result<()> {
    write(conn, |tx| {
        let mut ins = tx.prepare_cached(
            "INSERT INTO instances (id, name, image, image_name, owner, state, disk, cpus,
                     memory_mib, accel, hostname, created_at, restricted_from, owner_lease,
                     ssh_user, firmware)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7, ?8, ?9, ?10, ?11, ?12,
                             ?13, ?14, ?15)",
        )?;
        for n in rows {
            let r = ins.execute(params![
                n.id,
                n.name,
                n.image,
                n.image_name,
                n.owner,
                n.disk,
                n.cpus,
                n.memory_mib as i64,
                n.accel,
                n.hostname,
                n.created_at,
                n.restricted_from,
                n.owner_lease,
                n.ssh_user,
                n.firmware
            ]);
            match r {
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
                {
                    return Err(Error::Invalid(format!(
                        "an instance named {:?} already exists: pick another --name \
                         or delete that instance first",
                        n.name
                    )));
                }
                r => r?,
            };
        }
        Ok(())
    })
}

/// Records a launched instance's forwards once its disk and seed are made:
/// it is `stopped` (ready to start) from now on.
pub fn set_prepared(
    conn: &Connection,
    id: &str,
    forwards: &str,
    ssh_port: Option<u16>,
) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET forwards = ?2, ssh_port = ?3, state = 'stopped' WHERE id = ?1",
        params![id, forwards, ssh_port],
    )
}

/// Records new forwards (an automatic SSH port picked again).
pub fn set_forwards(
    conn: &Connection,
    id: &str,
    forwards: &str,
    ssh_port: Option<u16>,
) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET forwards = ?2, ssh_port = ?3 WHERE id = ?1",
        params![id, forwards, ssh_port],
    )
}

/// Records a QEMU that runs, and the accelerator it uses.
pub fn set_running(conn: &Connection, id: &str, pid: i32, accel_used: &str) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET state = 'running', pid = ?2, accel_used = ?3, error = '' WHERE id = ?1",
        params![id, pid, accel_used],
    )
}

/// Records that the QEMU `pid` of a running instance is gone (a row that
/// another start changed meanwhile is left alone).
pub fn set_stopped(conn: &Connection, id: &str, pid: Option<i32>) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET state = 'stopped', pid = NULL
         WHERE id = ?1 AND state = 'running' AND pid IS ?2",
        params![id, pid],
    )
}

/// Records a start that failed, and why.
pub fn set_failed(conn: &Connection, id: &str, msg: &str) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET state = 'failed', pid = NULL, error = ?2 WHERE id = ?1",
        params![id, msg],
    )
}

/// Records that the launch making a `pending` instance died.
pub fn fail_interrupted_launch(conn: &Connection, id: &str) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET state = 'failed', error = 'its launch was interrupted' WHERE id = ?1 AND state = 'pending'",
        [id],
    )
}

/// Makes a restored instance's disk the content of `image` (launch-only
/// or not: `restricted_from`).
pub fn set_image(
    conn: &Connection,
    id: &str,
    image: &str,
    image_name: &str,
    restricted_from: &str,
) -> Result<()> {
    execute_write(
        conn,
        "UPDATE instances SET image = ?2, image_name = ?3, restricted_from = ?4
                 WHERE id = ?1",
        params![id, image, image_name, restricted_from],
    )
}

/// The ephemeral instances (of any owner): (id, pid, owner lease).
pub fn ephemeral(conn: &Connection) -> Result<Vec<(String, Option<i32>, String)>> {
    let mut st = conn.prepare_cached(
        "SELECT id, pid, owner_lease FROM instances WHERE owner_lease IS NOT NULL",
    )?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Deletes an instance's row.
pub fn delete_instance(conn: &Connection, id: &str) -> Result<()> {
    write(conn, |tx| {
        tx.execute("DELETE FROM instances WHERE id = ?1", [id])?;
        Ok(())
    })
}

/// One statement in its own write transaction ([`write`]).
fn execute_write(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<()> {
    write(conn, |tx| {
        tx.execute(sql, params)?;
        Ok(())
    })
}

/// The image and disk mode of the instance `id`, whoever owns it, if it
/// exists (what the lazy disk server checks before it serves a QEMU).
pub fn image_and_disk(conn: &Connection, id: &str) -> Result<Option<(String, DiskMode)>> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT image, disk FROM instances WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    Ok(row.and_then(|(img, d)| DiskMode::parse(&d).ok().map(|d| (img, d))))
}

/// Turns the lazy instances of `image` into overlays on its base file
/// (made by the caller): what a forced delete of the image leaves them,
/// since their disk can no longer be read from the store. Returns how
/// many.
pub fn lazy_to_overlay(conn: &Connection, image: &str) -> Result<usize> {
    Ok(conn.execute(
        "UPDATE instances SET disk = 'overlay' WHERE image = ?1 AND disk = 'lazy'",
        [image],
    )?)
}

/// How many lazy instances use `image`.
pub fn count_lazy_of(conn: &Connection, image: &str) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT COUNT(*) FROM instances WHERE image = ?1 AND disk = 'lazy'",
        [image],
        |r| r.get(0),
    )?)
}
