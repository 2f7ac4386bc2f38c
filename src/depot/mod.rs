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

/// The name prefix of [`Depot::ensure_imported`]'s probe images.
const PROBE_PREFIX: &str = ".vmdepot-ensure-";

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
        crate::catalog::images::check_caller_tags(opts.tags.iter().map(|(k, _)| k))?;
        let id =
            crate::image::import::import(&self.repo, &self.account, file.as_ref(), opts, progress)?;
        self.image(id.as_str())
    }

    /// Makes sure the disk image `file` is imported as `opts.name`: the
    /// image of that name (one this account can see) if it has the same
    /// content, else a new import. Idempotent, for a harness that imports
    /// its fixture on every run.
    ///
    /// The content is compared by its digest, nothing else (type, tags and
    /// description of an existing image are left as they are). To learn
    /// the file's digest it is imported under a temporary name
    /// (`.vmdepot-ensure-<hex>`, a custom image, deleted after): an
    /// unchanged file (same device, inode, size, mtime and ctime) is not
    /// read again, and a changed one stores only what no image holds.
    /// Other content is [`Error::ContentDiffers`] (exit code 1): nothing of
    /// the existing image changes; delete it, or import under another name.
    #[instrument(skip_all, err(level = "debug"), fields(file = %file.as_ref().display()))]
    pub fn ensure_imported(
        &self,
        file: impl AsRef<Path>,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<ImageInfo> {
        let file = file.as_ref();
        self.remove_stale_probes();
        let existing = self.settled_image(file, opts, progress)?;
        let existing = match existing {
            Ok(i) => i,
            Err(imported) => return Ok(imported),
        };
        // The probe's name carries this process's lease, so that the
        // probe of a process killed meanwhile is known for what it is.
        let lease = crate::proc::own_lease()
            .unwrap_or_default()
            .replace(' ', "_");
        let mut probe = ImportOptions::new(format!(
            "{PROBE_PREFIX}{lease}_{}",
            crate::ids::random_hex(4)
        ));
        probe.format = opts.format;
        probe.reread = opts.reread;
        let probed = self.import(file, &probe, progress)?;
        let same = probed.content_digest == existing.content_digest;
        if same {
            // The file is now remembered as the probe's: as the existing
            // image's instead, so that the next call does not read it.
            crate::catalog::repoint_sources(&self.repo.conn, &probed.id, &existing.id)?;
        }
        self.delete_image(&probed.id, true)?;
        if !same {
            return Err(Error::ContentDiffers {
                image: format!("{} ({})", existing.name, existing.id),
                file: file.to_owned(),
            });
        }
        Ok(existing)
    }

    /// [`Depot::ensure_imported`]'s image named `opts.name` once no import
    /// of it runs (`Ok`), or the image it imported when there was none
    /// (`Err`: nothing to compare).
    fn settled_image(
        &self,
        file: &Path,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<std::result::Result<ImageInfo, ImageInfo>> {
        loop {
            match self.image(&opts.name) {
                // Another process imports it: its content is known once
                // that import ends (or fails, and the name is free again).
                Ok(i) if i.state == ImageState::Creating => {
                    std::thread::sleep(std::time::Duration::from_millis(200))
                }
                Ok(i) => return Ok(Ok(i)),
                Err(Error::ImageNotFound(_)) => match self.import(file, opts, progress) {
                    // Another process took the name meanwhile: look again.
                    Err(Error::NameTaken { .. }) => continue,
                    r => return r.map(Err),
                },
                Err(e) => return Err(e),
            }
        }
    }

    /// Deletes the probes of [`Depot::ensure_imported`] that a process
    /// killed before it deleted them left (their names carry its lease).
    fn remove_stale_probes(&self) {
        // Catalog rows, not `list_images`: no usage figures computed.
        let Ok(rows) = crate::catalog::list_images(&self.repo.conn) else {
            return;
        };
        for r in rows.iter().filter(|r| r.owner == self.account()) {
            let Some(rest) = r.name.strip_prefix(PROBE_PREFIX) else {
                continue;
            };
            let lease = rest
                .rsplit_once('_')
                .map_or("", |(l, _)| l)
                .replace('_', " ");
            let creating = r.state == Some(crate::catalog::ImageState::Importing);
            if !creating && crate::proc::lease_gone(&lease) {
                if let Err(e) = self.delete_image(r.id.as_str(), true) {
                    tracing::warn!("could not delete the stale probe image {}: {e}", r.name);
                }
            }
        }
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
