//! Depot permissions. A depot is private to its owner: every directory
//! 0700, every file 0600 (read-only bases 0400). A depot created with a
//! group (`--group`) is shared by that group instead: directories 2770
//! (setgid, so everything in it takes the group), files 0660 (bases 0440).
//!
//! Two mechanisms, so that neither the caller's umask nor files that QEMU
//! and qemu-img create themselves can open the depot up:
//!
//! - opening a [`crate::Depot`] sets the **process umask** to 0077 (0007 for
//!   a group depot); child processes (QEMU, qemu-img) inherit it. The
//!   umask the process had before its first open is kept:
//!   [`caller_umask`] (exports use it for the files they write outside the
//!   depot). A process that opens several depots has the umask of the one
//!   opened last;
//! - files and directories the library creates get explicit modes
//!   ([`Perms`]), and files QEMU makes (sockets, serial log, pid file) are
//!   set to the file mode once QEMU is up (a daemonized QEMU sets its own
//!   umask, 027).

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::stat::{umask, Mode};

use crate::error::{Error, IoContext, Result};

/// The modes of one depot's files and directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms {
    group: bool,
}

impl Perms {
    /// Private to the owner (the default).
    pub const PRIVATE: Perms = Perms { group: false };
    /// Shared by the depot's group.
    pub const GROUP: Perms = Perms { group: true };

    /// Mode of files: 0600, or 0660 in a group depot.
    pub fn file(self) -> u32 {
        if self.group {
            0o660
        } else {
            0o600
        }
    }

    /// Mode of directories: 0700, or 2770 in a group depot (the setgid bit
    /// is set on the root; directories below inherit it).
    pub fn dir(self) -> u32 {
        if self.group {
            0o2770
        } else {
            0o700
        }
    }

    /// The process umask while this depot is open: 0077, or 0007.
    pub fn umask(self) -> u32 {
        if self.group {
            0o007
        } else {
            0o077
        }
    }

    /// `mkdir -p` with the directory mode (for directories inside a depot).
    pub(crate) fn mkdir_all(self, p: &Path) -> Result<()> {
        DirBuilder::new()
            .recursive(true)
            .mode(self.dir() & 0o777)
            .create(p)
            .at(p)
    }

    /// Options that create files with the file mode.
    pub(crate) fn open_options(self) -> OpenOptions {
        let mut o = OpenOptions::new();
        o.mode(self.file());
        o
    }

    /// Replaces the file `p` with `body`: written to `tmp` (the file
    /// mode; a symlink there is refused, not followed), then renamed over
    /// `p` (readers see the old or the new one).
    pub(crate) fn replace_file(self, p: &Path, tmp: &Path, body: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.open_options()
            .custom_flags(libc::O_NOFOLLOW)
            .create(true)
            .truncate(true)
            .write(true)
            .open(tmp)
            .and_then(|mut f| f.write_all(body))
            .and_then(|_| std::fs::rename(tmp, p))
    }

    /// Opens the lock file at `p` (created with the file mode if missing)
    /// and takes a flock on it (`how`: shared or exclusive, waiting or
    /// not); held until the returned value drops. Every lock file of a
    /// depot is taken here.
    pub(crate) fn flock(self, p: &Path, how: FlockArg) -> Result<Flock<File>> {
        let f = self
            .open_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(p)
            .at(p)?;
        Flock::lock(f, how).map_err(|(_, e)| Error::io(p, e.into()))
    }

    /// Sets a file someone else created (QEMU's sockets, log, pid file) to
    /// the file mode. A missing file is not an error.
    pub(crate) fn fix(self, p: &Path) -> Result<()> {
        match std::fs::set_permissions(p, std::fs::Permissions::from_mode(self.file())) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.at(p),
        }
    }
}

/// The umask before the first depot was opened (`None`: none opened yet).
static CALLER_UMASK: Mutex<Option<u32>> = Mutex::new(None);

/// Sets the process umask for a depot with `perms`; remembers the caller's.
pub(crate) fn apply_umask(perms: Perms) {
    let mut saved = CALLER_UMASK.lock().unwrap_or_else(|e| e.into_inner());
    let old = umask(Mode::from_bits_truncate(perms.umask() as _));
    saved.get_or_insert(old.bits() as u32);
}

/// The caller's umask: the process umask before vmdepot first set it (or the
/// current one if no depot was opened yet). Files written for the caller
/// outside the depot (image exports) get `0666 & !caller_umask()`.
pub fn caller_umask() -> u32 {
    let saved = CALLER_UMASK.lock().unwrap_or_else(|e| e.into_inner());
    match *saved {
        Some(m) => m,
        None => {
            let m = umask(Mode::from_bits_truncate(0o022));
            umask(m);
            m.bits() as u32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(
            (
                Perms::PRIVATE.file(),
                Perms::PRIVATE.dir(),
                Perms::PRIVATE.umask()
            ),
            (0o600, 0o700, 0o077)
        );
        assert_eq!(
            (
                Perms::GROUP.file(),
                Perms::GROUP.dir(),
                Perms::GROUP.umask()
            ),
            (0o660, 0o2770, 0o007)
        );
    }
}
