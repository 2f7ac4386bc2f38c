//! Ephemeral instances whose owner is gone. An ephemeral instance records
//! its owner's lease (`proc::own_lease`); its QEMU is the owner's child and
//! dies with it (`launch::owned`), and whichever vmdepot process opens the
//! depot next finds the lease no longer held and removes what is left: a
//! QEMU that survived (one started again from another process), the row,
//! the directory.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::catalog::instances;
use crate::error::Result;
use crate::repo::Repo;

/// A UEFI instance's variable store in its directory (`launch::firmware`;
/// a repair reads the firmware from its presence).
pub(crate) const EFIVARS_FILE: &str = "efivars.fd";

/// `DEPOT/instances/ID`: the directory of instance `id`.
pub(crate) fn instance_dir(root: &Path, id: &str) -> PathBuf {
    root.join("instances").join(id)
}

/// Removes an instance's directory. It is renamed first (to
/// `instances/.removed-ID`, which repair ignores): a lazy disk's server
/// that writes its last counts into `instances/ID/` by path as its QEMU
/// disconnects then finds no directory, instead of making the removal fail
/// with a file it made meanwhile.
pub(crate) fn remove_instance_dir(dir: &Path) -> std::io::Result<()> {
    let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
        return fs::remove_dir_all(dir);
    };
    let gone = dir.with_file_name(format!(".removed-{name}"));
    // (what a removal that died left)
    let _ = fs::remove_dir_all(&gone);
    match fs::rename(dir, &gone) {
        Ok(()) => fs::remove_dir_all(&gone),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes every ephemeral instance whose owner is gone; returns their
/// ids. An instance whose lock another process holds (it is being acted
/// on) is left for the next time.
pub(crate) fn reap(repo: &Repo) -> Result<Vec<String>> {
    let mut reaped = Vec::new();
    for (id, pid, lease) in instances::ephemeral(&repo.conn)? {
        if !crate::proc::lease_gone(&lease) {
            continue;
        }
        let dir = instance_dir(&repo.root, &id);
        let _lock = match File::open(dir.join("lock")) {
            Ok(f) => match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                Ok(l) => Some(l),
                Err(_) => continue,
            },
            Err(_) => None,
        };
        if let Some(pid) = pid.filter(|&p| crate::proc::pid_alive(p, &id)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            let end = Instant::now() + Duration::from_secs(5);
            while crate::proc::pid_alive(pid, &id) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        instances::delete_instance(&repo.conn, &id)?;
        if let Err(e) = remove_instance_dir(&dir) {
            tracing::warn!("could not remove {}: {e}", dir.display());
        }
        let owner = lease.split(' ').nth(2).unwrap_or("?");
        tracing::info!("removed ephemeral instance {id}: its owner (pid {owner}) is gone");
        reaped.push(id);
    }
    Ok(reaped)
}
