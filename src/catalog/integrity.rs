//! SQLite's own view of the catalog file: [`damage`] says whether an open
//! catalog can be trusted (`fsck --repair` rebuilds one that cannot);
//! [`quick_check`] is the check fsck reports.

use rusqlite::Connection;

use crate::error::Result;

/// What is wrong with an open catalog, if anything: SQLite's quick check,
/// then every table read (a truncated file may pass the check of the pages
/// it still has).
pub fn damage(conn: &Connection) -> Option<String> {
    match quick_check(conn) {
        Ok(s) if s == "ok" => {
            let r = conn.query_row(
                "SELECT (SELECT COUNT(*) FROM images) + (SELECT COUNT(*) FROM chunks)
                      + (SELECT COUNT(*) FROM frames) + (SELECT COUNT(*) FROM packs)",
                [],
                |r| r.get::<_, i64>(0),
            );
            r.err().map(|e| format!("the catalog cannot be read: {e}"))
        }
        Ok(s) => Some(format!("SQLite quick_check says {s}")),
        Err(e) => Some(format!("the catalog cannot be checked: {e}")),
    }
}

/// What SQLite's `PRAGMA quick_check` says ("ok" when sound).
pub fn quick_check(conn: &Connection) -> Result<String> {
    Ok(conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?)
}
