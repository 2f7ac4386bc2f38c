//! [`Paths`]: where an instance's files live. `DEPOT/instances/ID/` holds
//! the disk (`disk.qcow2` overlay on the image's base, or a private sparse
//! `disk.raw`), `seed.img` (NoCloud), QEMU's `qmp.sock`, `console.sock`,
//! `serial.log`, `qemu.pid`, a UEFI instance's `efivars.fd` and
//! (foreground starts) `qemu.log`, the `lock` flocked by whoever changes
//! the instance's state and, while a live capture has the guest paused,
//! the `pause` lease (see [`super::pause::PauseLease`]).

use std::path::{Path, PathBuf};

use crate::catalog::DiskMode;
use crate::error::{Error, Result};
use crate::launch::qemu::VmFiles;

/// Paths of an instance's files.
pub(crate) struct Paths {
    /// `DEPOT/instances/ID`.
    pub(crate) dir: PathBuf,
}

impl Paths {
    /// The files of instance `id` of the depot at `root`.
    pub(crate) fn new(root: &Path, id: &str) -> Paths {
        Paths::in_dir(crate::repo::orphans::instance_dir(root, id))
    }

    /// The files of the instance whose directory is `dir`.
    pub(crate) fn in_dir(dir: PathBuf) -> Paths {
        Paths { dir }
    }

    /// The disk, by how it is made.
    pub(crate) fn disk(&self, mode: DiskMode) -> PathBuf {
        self.dir.join(match mode {
            DiskMode::Lazy | DiskMode::Overlay => "disk.qcow2",
            DiskMode::Copy => "disk.raw",
        })
    }

    /// The NoCloud seed.
    pub(crate) fn seed(&self) -> PathBuf {
        self.dir.join("seed.img")
    }

    /// A UEFI instance's variable store.
    pub(crate) fn efivars(&self) -> PathBuf {
        self.dir.join(crate::launch::firmware::VARS_FILE)
    }

    /// The lock whoever changes the instance's state holds.
    pub(crate) fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// The pause lease.
    pub(crate) fn pause(&self) -> PathBuf {
        self.dir.join("pause")
    }

    /// The temporary a pause lease is written to before its rename.
    pub(crate) fn pause_tmp(&self) -> PathBuf {
        self.dir.join("pause.tmp")
    }

    /// The socket of a foreground start's own lazy disk server.
    pub(crate) fn disk_sock(&self) -> PathBuf {
        self.dir.join("disk.sock")
    }

    /// The depot's root (`DEPOT` of `DEPOT/instances/ID`).
    pub(crate) fn root(&self) -> &Path {
        self.dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/"))
    }

    /// QEMU's own messages when it runs in the foreground.
    pub(crate) fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// The files QEMU makes.
    pub(crate) fn files(&self) -> VmFiles {
        VmFiles {
            qmp: self.dir.join("qmp.sock"),
            console: self.dir.join("console.sock"),
            serial_log: self.dir.join("serial.log"),
            pidfile: self.dir.join("qemu.pid"),
        }
    }
}

/// A path as UTF-8 text (for `qemu-img` arguments and systemd units), or an
/// error naming it.
pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("{}: path is not UTF-8", p.display())))
}
