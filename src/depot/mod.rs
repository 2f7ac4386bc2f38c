//! [`Depot`]: the public face of the library. Opens (or creates) a depot
//! directory and runs image operations on it, under the access rules.
//!
//! Files: `open` (opening, the marker, accounts), [`types`] (the public
//! types: [`ImageInfo`], [`ImageUpdate`], [`HistoryEntry`],
//! [`DepotOptions`], [`Intent`]), `images` (metadata operations: list,
//! show, update, share, history, delete), [`access`] (who may do what) and
//! [`display`] (times and states as users see them). This file holds the
//! [`Depot`] type and the operations that hand an image to the layers
//! below (import, export, verify, gc, fsck, stats).
//!
//! Layout of a depot directory (docs/FORMAT.md has the details):
//! `VMDEPOT` (the marker), `catalog.db` (SQLite), `packs/` (chunk data and
//! pack indexes), `manifests/` (one per image version), `locks/` (one lock
//! file per running import), `gc.lock`, `tmp/` (qemu-nbd sockets of running
//! imports), `bases/` (launch bases), `instances/`, `reserve` (the space
//! reserve), `group` (only in a depot shared by a group). Modes:
//! [`crate::perms`] (private 0700/0600, or 2770/0660 for a group depot).

pub mod access;
pub mod display;
mod images;
mod open;
pub mod types;

use std::fs;
use std::path::{Path, PathBuf};

use tracing::instrument;

pub use crate::catalog::ImageType;
pub use crate::image::import::ImportOptions;
pub use display::rfc3339;
pub use open::check_account;
pub use types::{
    DepotOptions, HistoryEntry, ImageInfo, ImageKind, ImageState, ImageUpdate, Intent, Relation,
    Timestamp,
};

use crate::depot::access::Op;
use crate::error::{Error, Result};
use crate::image::export::{self, ExportFormat};
use crate::maint::{self, FsckReport, GcReport, Stats, VerifyReport};
use crate::perms::Perms;
use crate::progress::Progress;
use crate::repo::{ensure_reserve, Repo};

/// An open depot: the repository below it and the acting account.
pub struct Depot {
    pub(crate) repo: Repo,
    account: String,
}

impl Depot {
    /// Acts as `account` from now on (default: the Unix user, or
    /// `VMDEPOT_ACCOUNT`). The name must be a valid account name
    /// ([`check_account`]).
    pub fn with_account(mut self, account: impl Into<String>) -> Result<Depot> {
        let account = account.into();
        check_account(&account)?;
        self.account = account;
        Ok(self)
    }

    /// The modes of this depot's files and directories.
    pub(crate) fn perms(&self) -> Perms {
        self.repo.perms
    }

    /// The group sharing this depot, if it is a group depot.
    pub fn group(&self) -> Result<Option<String>> {
        open::read_group(&self.repo.root)
    }

    /// The acting account.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The depot's root directory (absolute).
    pub fn root(&self) -> &Path {
        &self.repo.root
    }

    /// The default depot directory: `VMDEPOT_DIR`, else `/var/lib/vmdepot`
    /// for root and `$XDG_DATA_HOME/vmdepot` (or `~/.local/share/vmdepot`)
    /// otherwise.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("VMDEPOT_DIR") {
            return d.into();
        }
        if nix::unistd::geteuid().is_root() {
            return "/var/lib/vmdepot".into();
        }
        if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
            return PathBuf::from(x).join("vmdepot");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/".into());
        PathBuf::from(home).join(".local/share/vmdepot")
    }

    /// Imports a disk image file (raw, qcow2, vmdk, vhdx, vhd: detected from
    /// the content). The image is visible as `available` only once all its
    /// data is durable; on any error the depot is left as it was.
    #[instrument(skip_all, err(level = "debug"), fields(file = %file.as_ref().display()))]
    pub fn import(
        &self,
        file: impl AsRef<Path>,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImageInfo> {
        let id =
            crate::image::import::import(&self.repo, &self.account, file.as_ref(), opts, progress)?;
        self.image(id.as_str())
    }

    /// Writes an image to `out` (raw: sparse; qcow2: via qemu-img), checking
    /// the image's content digest of what was written.
    ///
    /// A file is written as a new file (mode
    /// [`export_file_mode`](crate::export_file_mode)) and renamed over
    /// `out`, never through a link planted there; a block device is
    /// written in place (every block, zeros included). Refused:
    /// a destination inside the depot, a symlink, a directory, a FIFO, a
    /// socket or a character device (see [`Depot::export_to`] for streams).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn export(
        &self,
        image: &str,
        out: impl AsRef<Path>,
        format: ExportFormat,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (row, _) = self.available_for(image, Op::Export)?;
        export::export_user(&self.repo, &row, out.as_ref(), format, progress)
            .map_err(|e| self.target_no_space(e))
    }

    /// A full destination on another filesystem than the depot's is
    /// [`Error::NoSpaceTarget`]: gc cannot free space there.
    fn target_no_space(&self, e: Error) -> Error {
        use std::os::unix::fs::MetadataExt;
        match e {
            Error::NoSpace { path } if !path.starts_with(&self.repo.root) => {
                let dev = |p: &Path| {
                    p.ancestors()
                        .find_map(|a| fs::metadata(a).ok())
                        .map(|m| m.dev())
                };
                let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
                if dev(dir.unwrap_or(Path::new("."))) == dev(&self.repo.root) {
                    Error::NoSpace { path }
                } else {
                    Error::NoSpaceTarget { path }
                }
            }
            e => e,
        }
    }

    /// Streams an image's raw content to `w` in order (zeros written as
    /// zeros), checking its content digest on the way: a mismatch is an
    /// error, reported after the bytes were written.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn export_to(
        &self,
        image: &str,
        w: &mut dyn std::io::Write,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (row, _) = self.available_for(image, Op::Export)?;
        // Only writes to `w` fail for space: it is never the depot.
        export::export_stream(&self.repo, &row, w, progress).map_err(|e| match e {
            Error::NoSpace { path } => Error::NoSpaceTarget { path },
            e => e,
        })
    }

    /// Re-reads and re-hashes every chunk: of one image (and its content
    /// digest, and its launch base read back in full if it has one), or of
    /// the whole store when `image` is `None`.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn verify(&self, image: Option<&str>, progress: &dyn Progress) -> Result<VerifyReport> {
        match image {
            Some(r) => {
                let (row, _) = self.available_for(r, Op::Verify)?;
                let rep = export::verify_image(&self.repo, &row, progress)?;
                // Its launch base, if it has one, in full.
                let id = row.id.as_str().to_owned();
                if let Some(why) =
                    crate::image::bases::base_problem(&self.repo, &id, Some(&row), true, progress)?
                {
                    return Err(Error::StoreDamaged(why));
                }
                Ok(rep)
            }
            None => maint::verify_all(&self.repo, progress),
        }
    }

    /// Removes what no image refers to: chunks, frames, packs, and whatever
    /// a killed import left behind. `dry_run` only reports.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        let r = maint::gc(&self.repo, dry_run)?;
        if !dry_run {
            // The reserve comes back once gc gave space back.
            ensure_reserve(&self.repo.root, self.repo.perms);
        }
        Ok(r)
    }

    /// Checks the structure of the catalog and the store, and gives launch
    /// bases the cheap check a launch makes (record, size, sampled blocks).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn fsck(&self) -> Result<FsckReport> {
        maint::fsck(&self.repo, false, &crate::progress::NoProgress)
    }

    /// [`Depot::fsck`], and every launch base read back in full and its
    /// digest compared with the one recorded (`fsck --bases`).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn fsck_bases(&self, progress: &dyn Progress) -> Result<FsckReport> {
        maint::fsck(&self.repo, true, progress)
    }

    /// Logical vs stored bytes, dedup and compression ratios, per image.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn stats(&self) -> Result<Stats> {
        maint::stats(&self.repo)
    }
}
