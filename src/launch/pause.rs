//! The pause lease ([`PauseLease`]): how a live capture that pauses a guest
//! leaves a record that outlives it, and how the next command that looks at
//! the instance ends a pause whose owner died ([`end_orphaned_pause`]).

use std::fs;

use crate::error::{IoContext, Result};
use crate::launch::instance::QMP_STATUS_TIMEOUT;
use crate::launch::paths::Paths;
use crate::launch::qmp::{Qmp, RunState};
use crate::perms::Perms;

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock
/// ticks since boot): with the pid it names a process, never a later one
/// that got the same pid. `None`: no such process, or a zombie.
fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A pause lease: `instances/ID/pause`, one line `PID START` naming the
/// process that paused the guest (QMP `stop`) and its start time. Written
/// (atomically) under the instance lock before the pause, removed after the
/// guest is resumed, lock still held. A lease whose owner is dead — the
/// lock being free says so, the pid and start time confirm it — means a
/// killed capture: the next command that looks at the instance resumes the
/// guest ([`end_orphaned_pause`]).
pub(crate) struct PauseLease {
    path: std::path::PathBuf,
}

impl PauseLease {
    /// Takes the lease (the caller holds the instance lock).
    pub(crate) fn take(p: &Paths, perms: Perms) -> Result<PauseLease> {
        use std::io::Write;
        let pid = std::process::id() as i32;
        let start = process_start(pid).unwrap_or(0);
        let path = p.pause();
        let tmp = p.pause_tmp();
        {
            let mut f = perms
                .open_options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&tmp)
                .at(&tmp)?;
            writeln!(f, "{pid} {start}").at(&tmp)?;
        }
        fs::rename(&tmp, &path).at(&path)?;
        Ok(PauseLease { path })
    }

    /// Ends the lease once the guest runs again.
    pub(crate) fn release(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether the process a lease names still lives (an unreadable lease:
/// no, its writer died before the rename or wrote garbage).
fn lease_owner_alive(text: &str) -> bool {
    let mut w = text.split_whitespace();
    let (Some(Ok(pid)), Some(Ok(start))) = (
        w.next().map(str::parse::<i32>),
        w.next().map(str::parse::<u64>),
    ) else {
        return false;
    };
    pid > 0 && process_start(pid) == Some(start)
}

/// Resumes the guest behind `p` if it is paused; whether it did.
fn resume_if_paused(p: &Paths) -> Result<bool> {
    let mut q = Qmp::connect_timeout(&p.files().qmp, QMP_STATUS_TIMEOUT)?;
    if q.run_state()? != RunState::Paused {
        return Ok(false);
    }
    q.resume()?;
    Ok(true)
}

/// With the instance lock held and QEMU alive: ends a pause whose owner is
/// dead (QMP `cont` if the guest is paused, then the lease is removed).
/// Returns whether it resumed the guest. Failures are logged: the lease
/// stays for the next command.
pub(crate) fn end_orphaned_pause(p: &Paths) -> bool {
    let path = p.pause();
    let Ok(text) = fs::read_to_string(&path) else {
        return false;
    };
    if lease_owner_alive(&text) {
        return false;
    }
    match resume_if_paused(p) {
        Ok(resumed) => {
            if resumed {
                tracing::warn!(
                    "{}: the guest was left paused by process {} (gone): resumed it",
                    p.dir.display(),
                    text.split_whitespace().next().unwrap_or("?")
                );
            }
            let _ = fs::remove_file(&path);
            resumed
        }
        Err(e) => {
            tracing::warn!(
                "{}: could not end a dead process's pause: {e}",
                p.dir.display()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_lease_owners() {
        let me = std::process::id() as i32;
        let start = process_start(me).expect("own start time");
        assert!(lease_owner_alive(&format!("{me} {start}\n")));
        // the same pid with another start time is another process
        assert!(!lease_owner_alive(&format!("{me} {}\n", start + 1)));
        for bad in ["", "garbage", "0 0", "-1 5", &format!("{me}")] {
            assert!(!lease_owner_alive(bad), "{bad:?}");
        }
    }
}
