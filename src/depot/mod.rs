//! [`Depot`]: the public face of the library. Opens (or creates) a depot
//! directory and runs image operations on it.
//!
//! Layout of a depot directory (docs/FORMAT.md has the details):
//! `catalog.db` (SQLite), `packs/` (chunk data), `locks/` (one lock file per
//! running import), `tmp/` (qemu-img conversions of foreign formats),
//! `group` (only in a depot shared by a group: the group's name). Modes:
//! [`crate::perms`] (private 0700/0600, or 2770/0660 for a group depot).

pub mod access;

use std::fs::{self};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use tracing::instrument;

pub use crate::catalog::ImageType;
use crate::catalog::{self, ImageRow};
use crate::depot::access::{Access, Op};
use crate::error::{Error, IoContext, Result};
use crate::ids::ImageId;
use crate::image::export::{self, ExportFormat};
pub use crate::image::import::ImportOptions;
use crate::maint::repair::RepairReport;
use crate::maint::{self, FsckReport, GcReport, Stats, VerifyReport};
use crate::perms::{self, Perms};
use crate::progress::Progress;
use crate::repo::{ensure_reserve, fs_full, release_reserve, Repo};
use crate::store::LocalDir;

/// What `image update` changes (`None`: unchanged).
#[derive(Clone, Debug, Default)]
pub struct ImageUpdate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub protected: Option<bool>,
    pub deprecated: Option<bool>,
    /// Tags to set (key, value); an empty value removes the tag.
    pub tags: Vec<(String, String)>,
}

/// One step of an image's lineage (`image history`).
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    /// `self`, `parent`, `source-instance`, `copied-from`, `copy`, `child`.
    pub relation: String,
    pub id: String,
    pub name: String,
    /// Where it lives: a depot directory, or empty for this depot.
    pub depot: String,
    /// Whether it still exists (as far as this depot knows).
    pub exists: bool,
}

/// An image as users see it (`image show --json`).
#[derive(Clone, Debug, Serialize)]
pub struct ImageInfo {
    pub id: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    pub owner: String,
    pub description: String,
    pub source_format: String,
    pub virtual_size: u64,
    /// Bytes of the image in non-zero 4 KiB blocks.
    pub data_bytes: u64,
    /// Hex BLAKE3 of the raw content (null while importing).
    pub content_digest: Option<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Stored (compressed) bytes no other image refers to: what deleting
    /// this image would free.
    pub unique_stored_bytes: u64,
    /// Stored bytes this image shares with other images.
    pub shared_stored_bytes: u64,
    /// Image it was captured or copied from (lineage), and its name then.
    pub parent: Option<String>,
    pub parent_name: String,
    /// Instance it was captured from.
    pub source_instance: Option<String>,
    /// For a copy: `DEPOT img-…` of the image it was copied from.
    pub copied_from: String,
    pub protected: bool,
    pub deprecated: bool,
    pub tags: std::collections::BTreeMap<String, String>,
    /// Marketplace images: vendor, application, version.
    pub vendor: String,
    pub application: String,
    pub app_version: String,
    /// Accounts it is shared with (shown to its owner only).
    pub shared_with: Vec<String>,
    /// Its content came from an image shared with its owner: it can be
    /// launched and captured, never exported, copied or shared.
    pub launch_only: bool,
    /// For a launch-only image: `"<owner> <img-id>"` of that shared image.
    pub restricted_from: String,
    /// Why the image is damaged (its catalog row or block map), if it is:
    /// then its state is `damaged`, and it can only be shown and deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damage: Option<String>,
}

/// How a depot is opened (see [`Depot::open_with`]).
#[derive(Clone, Debug, Default)]
pub struct DepotOptions {
    /// Act as this account (default: `VMDEPOT_ACCOUNT`, else the Unix user).
    pub account: Option<String>,
    /// Create the depot shared by this Unix group (directories 2770, files
    /// 0660) instead of private to its owner. Only when the depot is
    /// created; the choice is kept in `DEPOT/group`.
    pub group: Option<String>,
    /// What the caller will do (default: write). A depot opened to
    /// [`Intent::Read`] on a full or read-only filesystem is opened
    /// without writing anything; one opened to [`Intent::Free`] on a full
    /// filesystem first releases the depot's space reserve.
    pub intent: Intent,
}

/// What a caller of [`Depot::open_with`] will do with the depot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Intent {
    /// Change it (import, update, launch, …).
    #[default]
    Write,
    /// Only read it (list, show, export, verify, fsck, stats): on a full or
    /// read-only filesystem the catalog is opened read-only and nothing is
    /// written (no marker, no chmod, no migration).
    Read,
    /// Free space (image delete, gc): on a full filesystem the space
    /// reserve (`DEPOT/reserve`) is released first, so that SQLite can
    /// write its WAL.
    Free,
}

/// The file in a depot that names the group sharing it.
const GROUP_FILE: &str = "group";

/// An open depot.
pub struct Depot {
    pub(crate) repo: Repo,
    account: String,
}

impl Depot {
    /// Opens the depot at `root`, creating the directory and catalog if
    /// needed (private to the owner). Several processes may open one depot
    /// at once. Sets the process umask (see [`crate::perms`]).
    pub fn open(root: impl AsRef<Path>) -> Result<Depot> {
        Depot::open_with(root, &DepotOptions::default())
    }

    /// Opens (or creates) the depot at `root` as [`Depot::open`] does, with
    /// an account and, for a new depot, a sharing group.
    ///
    /// Permissions: the process umask becomes 0077 (0007 for a group
    /// depot), and everything the library creates gets explicit modes
    /// (see [`crate::perms`]). An existing depot whose root directory is
    /// more open than that is closed again (root chmod 0700, or 2770) when
    /// its owner opens it: the root's mode alone closes access to
    /// everything below it.
    #[instrument(skip_all, err(level = "debug"), fields(root = %root.as_ref().display()))]
    pub fn open_with(root: impl AsRef<Path>, opts: &DepotOptions) -> Result<Depot> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let account = match &opts.account {
            Some(a) => {
                check_account(a)?;
                a.clone()
            }
            None => {
                let a = default_account();
                check_account(&a).map_err(|e| {
                    Error::Usage(format!(
                        "{e} (from VMDEPOT_ACCOUNT or the Unix user name): pass --account NAME"
                    ))
                })?;
                a
            }
        };
        let root = root.as_ref().to_owned();
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).at(parent)?;
        }
        let stored = read_group(&root)?;
        let fresh = !root.join("catalog.db").exists();
        let full = !fresh && fs_full(&root);
        if full && opts.intent == Intent::Read && opts.group.is_none() {
            return Depot::open_read_only(root, account, stored);
        }
        if full && opts.intent == Intent::Free {
            release_reserve(&root);
        }
        let group = match (&opts.group, &stored) {
            (Some(g), Some(s)) if g == s => Some(s.clone()),
            (Some(g), None) if fresh => Some(g.clone()),
            (Some(g), _) => {
                return Err(Error::Usage(format!(
                    "--group {g}: the depot {} already exists ({}); --group applies only when a depot is created",
                    root.display(),
                    match &stored {
                        Some(s) => format!("shared with group {s}"),
                        None => "private".into(),
                    }
                )))
            }
            (None, s) => s.clone(),
        };
        let perms = if group.is_some() {
            Perms::GROUP
        } else {
            Perms::PRIVATE
        };
        perms::apply_umask(perms);
        match fs::DirBuilder::new()
            .mode(perms.dir() & 0o777)
            .create(&root)
        {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.at(&root)?,
        }
        if let (Some(g), None) = (&group, &stored) {
            // A new group depot: the root takes the group and setgid (all
            // below inherit the group), then the choice is recorded.
            let gid = nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "--group {g}: no such group on this host: pick an existing group (getent group)"
                    ))
                })?
                .gid;
            nix::unistd::chown(&root, None, Some(gid)).map_err(|e| Error::io(&root, e.into()))?;
            fs::set_permissions(&root, fs::Permissions::from_mode(perms.dir())).at(&root)?;
            let p = root.join(GROUP_FILE);
            let mut f = perms
                .open_options()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .at(&p)?;
            std::io::Write::write_all(&mut f, format!("{g}\n").as_bytes()).at(&p)?;
        }
        // An existing depot opened by its owner: close its root again.
        let meta = fs::metadata(&root).at(&root)?;
        if meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o7777 != perms.dir() {
            fs::set_permissions(&root, fs::Permissions::from_mode(perms.dir())).at(&root)?;
        }
        LocalDir::new(&root, perms).create_dir()?;
        for d in ["locks", "tmp", "manifests"] {
            perms.mkdir_all(&root.join(d))?;
        }
        // Absolute from here on: overlays name their base by this path, and
        // QEMU runs with another working directory.
        let root = fs::canonicalize(&root).at(&root)?;
        let marker = read_marker(&root)?;
        let existing = match &marker {
            Some(id) => Some(format!(
                "the depot's marker {} (depot {id}) exists",
                root.join(MARKER).display()
            )),
            None => pack_files_exist(&root, perms),
        };
        let cat = root.join("catalog.db");
        let conn = match catalog::open(&cat, perms.file(), existing.as_deref()) {
            Err(Error::NoSpace { .. }) if opts.intent == Intent::Read && !fresh => {
                catalog::open_read_only(&cat, perms.file(), existing.as_deref())?
            }
            Err(Error::NoSpace { .. }) if opts.intent != Intent::Read && release_reserve(&root) => {
                catalog::open(&cat, perms.file(), existing.as_deref())?
            }
            r => r?,
        };
        if opts.intent != Intent::Read {
            ensure_reserve(&root, perms);
        }
        if marker.is_none() {
            // A new depot, or one made before markers (migration).
            if let Err(e) = write_marker(&root, perms) {
                if existing.is_none() {
                    return Err(e);
                }
                tracing::warn!("could not write the depot marker: {e}");
            }
        }
        Ok(Depot {
            repo: Repo::new(root, conn, perms),
            account,
        })
    }

    /// [`Depot::open_with`] for [`Intent::Read`] on a full or read-only
    /// filesystem: writes nothing (no directories, modes, marker or
    /// migration), and opens the catalog read-only.
    fn open_read_only(root: PathBuf, account: String, group: Option<String>) -> Result<Depot> {
        let perms = if group.is_some() {
            Perms::GROUP
        } else {
            Perms::PRIVATE
        };
        perms::apply_umask(perms);
        let root = fs::canonicalize(&root).at(&root)?;
        let marker = read_marker(&root)?;
        let existing = match &marker {
            Some(id) => format!(
                "the depot's marker {} (depot {id}) exists",
                root.join(MARKER).display()
            ),
            None => "the depot exists".into(),
        };
        let conn =
            catalog::open_read_only(&root.join("catalog.db"), perms.file(), Some(&existing))?;
        tracing::debug!("the depot's filesystem is full or read-only: catalog opened read-only");
        Ok(Depot {
            repo: Repo::new(root, conn, perms),
            account,
        })
    }

    /// `fsck --repair`: opens the depot even if its catalog is missing,
    /// empty or damaged (which [`Depot::open_with`] refuses), and then
    /// rebuilds the catalog from the pack files, their indexes and the
    /// image manifests (the damaged catalog's files are moved aside to
    /// `catalog.db.damaged-<unix time>`); a sound catalog is kept, and the
    /// manifests and pack indexes it lacks are written. Run it while no
    /// other vmdepot process uses the depot. See [`crate::maint::repair`].
    pub fn repair(root: impl AsRef<Path>, opts: &DepotOptions) -> Result<RepairReport> {
        let root = root.as_ref();
        let reason = match Depot::open_with(root, opts) {
            Ok(d) => match catalog_damage(&d.repo.conn) {
                None => return crate::maint::repair::complete(&d.repo),
                Some(why) => why,
            },
            Err(e @ (Error::StoreDamaged(_) | Error::Sqlite(_))) => e.to_string(),
            Err(e) => return Err(e),
        };
        let root = fs::canonicalize(root).at(root)?;
        let mut rep = RepairReport {
            rebuilt: true,
            reason,
            ..Default::default()
        };
        let perms = if read_group(&root)?.is_some() {
            Perms::GROUP
        } else {
            Perms::PRIVATE
        };
        let stamp = catalog::now();
        for ext in ["", "-wal", "-shm"] {
            let p = root.join(format!("catalog.db{ext}"));
            if p.exists() {
                let to = root.join(format!("catalog.db.damaged-{stamp}{ext}"));
                fs::rename(&p, &to).at(&p)?;
                rep.set_aside.push(to.display().to_string());
            }
        }
        crate::store::sync_dir(&root)?;
        drop(catalog::open(&root.join("catalog.db"), perms.file(), None)?);
        let depot = Depot::open_with(&root, opts)?;
        crate::maint::repair::rebuild(&depot.repo, &mut rep)?;
        rep.bases_recorded = crate::image::bases::adopt_unrecorded_bases(&depot.repo)?;
        let more = crate::maint::repair::complete(&depot.repo)?;
        rep.manifests_written += more.manifests_written;
        rep.indexes_written += more.indexes_written;
        rep.problems.extend(more.problems);
        Ok(rep)
    }

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
    pub fn perms(&self) -> Perms {
        self.repo.perms
    }

    /// The group sharing this depot, if it is a group depot.
    pub fn group(&self) -> Result<Option<String>> {
        read_group(&self.repo.root)
    }

    pub fn account(&self) -> &str {
        &self.account
    }

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
    /// A file is written as a new file (mode [`export::export_file_mode`])
    /// and renamed over `out`, never through a link planted there; a block
    /// device is written in place (every block, zeros included). Refused:
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
        export::export_stream(&self.repo, &row, w, progress)
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
    pub fn stats(&self) -> Result<Stats> {
        maint::stats(&self.repo)
    }

    /// The images this account can see (its own, public and marketplace
    /// ones, and those shared with it, shown with type `shared`), running
    /// imports included, abandoned ones hidden.
    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let rows = catalog::list_images(&self.repo.conn)?;
        let usage = maint::usage(&self.repo)?;
        let mut out = Vec::new();
        for r in rows {
            if r.state == "importing" && !self.repo.import_alive(&r.id) {
                continue;
            }
            if let Some(a) = self.access(&r)? {
                out.push(self.info_from_row(r, a, &usage)?);
            }
        }
        Ok(out)
    }

    /// One image by id or name (among those this account can see).
    pub fn image(&self, reference: &str) -> Result<ImageInfo> {
        let (row, access) = self.image_for(reference, Op::Show)?;
        let usage = maint::usage(&self.repo)?;
        self.info_from_row(row, access, &usage)
    }

    /// Deletes an image (its chunks are freed by the next `gc`). Refused for
    /// a protected image; for one that is shared or that instances use,
    /// unless `force`.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn delete_image(&self, reference: &str, force: bool) -> Result<ImageInfo> {
        let (row, access) = self.image_for(reference, Op::Delete)?;
        let info = self.info_from_row(row, access, &maint::usage(&self.repo)?)?;
        let what = format!("image {} ({})", info.name, info.id);
        if info.state == "creating" {
            return Err(Error::ImageNotAvailable {
                image: what,
                state: info.state,
            });
        }
        if info.protected {
            return Err(Error::NotPermitted(format!(
                "{what} is protected: `vmdepot image update {} --unprotect` first",
                info.id
            )));
        }
        let users: i64 = self.repo.conn.query_row(
            "SELECT COUNT(*) FROM instances WHERE image = ?1",
            [&info.id],
            |r| r.get(0),
        )?;
        if !force && !info.shared_with.is_empty() {
            return Err(Error::NotPermitted(format!(
                "{what} is shared with {}: unshare it first, or delete with --force",
                info.shared_with.join(", ")
            )));
        }
        if !force && users > 0 {
            return Err(Error::NotPermitted(format!(
                "{what} is used by {users} instance(s): delete them first, or delete with --force \
                 (they keep running from their base)"
            )));
        }
        catalog::write(&self.repo.conn, |c| {
            c.execute("DELETE FROM images WHERE id = ?1", [&info.id])?;
            c.execute("DELETE FROM image_tags WHERE image = ?1", [&info.id])?;
            c.execute("DELETE FROM image_shares WHERE image = ?1", [&info.id])?;
            Ok(())
        })?;
        // After the commit (a crash in between leaves an orphan gc removes).
        if let Some(id) = ImageId::parse(&info.id) {
            crate::repo::manifest::remove_all(&self.repo.root, &id)?;
        }
        Ok(info)
    }

    /// Changes an image's name, description, protection, deprecation or
    /// tags (owner only).
    pub fn update_image(&self, reference: &str, u: &ImageUpdate) -> Result<ImageInfo> {
        let (row, _) = self.image_for(reference, Op::Update)?;
        if let Some(n) = &u.name {
            crate::image::import::check_name(n)?;
        }
        for (k, _) in &u.tags {
            if k.is_empty() || k.contains('=') {
                return Err(Error::Invalid(format!(
                    "bad tag key {k:?}: use --tag KEY=VALUE"
                )));
            }
        }
        let r = catalog::write(&self.repo.conn, |tx| {
            if let Some(n) = &u.name {
                tx.execute(
                    "UPDATE images SET name = ?2 WHERE id = ?1",
                    params![row.id.as_str(), n],
                )?;
            }
            if let Some(d) = &u.description {
                tx.execute(
                    "UPDATE images SET description = ?2 WHERE id = ?1",
                    params![row.id.as_str(), d],
                )?;
            }
            if let Some(p) = u.protected {
                tx.execute(
                    "UPDATE images SET protected = ?2 WHERE id = ?1",
                    params![row.id.as_str(), p],
                )?;
            }
            if let Some(p) = u.deprecated {
                tx.execute(
                    "UPDATE images SET deprecated = ?2 WHERE id = ?1",
                    params![row.id.as_str(), p],
                )?;
            }
            set_tags(tx, row.id.as_str(), &u.tags)?;
            crate::repo::manifest::write_next(tx, &self.repo.root, self.repo.perms, &row.id)
        });
        match r {
            Err(Error::Sqlite(e)) if is_unique(&e) => Err(crate::image::import::name_clash(
                &self.repo.conn,
                self.account(),
                u.name.as_deref().unwrap_or_default(),
                &row.kind,
            )),
            r => r,
        }?
        .committed();
        self.image(row.id.as_str())
    }

    /// Shares a custom image with another account: it sees it as type
    /// `shared` and may only launch it (owner only).
    pub fn share_image(&self, reference: &str, account: &str) -> Result<ImageInfo> {
        let (row, _) = self.available_for(reference, Op::Share)?;
        if row.kind != "custom" {
            return Err(Error::Invalid(format!(
                "image {} ({}) is {}: every account can already use it; only custom images are shared",
                row.name, row.id, row.kind
            )));
        }
        check_account(account)?;
        if account == self.account() {
            return Err(Error::Invalid(format!(
                "share with another account than yourself ({account:?})"
            )));
        }
        catalog::write(&self.repo.conn, |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO image_shares (image, account, created_at) VALUES (?1, ?2, ?3)",
                params![row.id.as_str(), account, catalog::now()],
            )?;
            crate::repo::manifest::write_next(tx, &self.repo.root, self.repo.perms, &row.id)
        })?
        .committed();
        self.image(row.id.as_str())
    }

    /// Stops sharing an image with an account (owner only).
    pub fn unshare_image(&self, reference: &str, account: &str) -> Result<ImageInfo> {
        check_account(account)?;
        let (row, _) = self.image_for(reference, Op::Share)?;
        let n = catalog::write(&self.repo.conn, |tx| {
            let n = tx.execute(
                "DELETE FROM image_shares WHERE image = ?1 AND account = ?2",
                params![row.id.as_str(), account],
            )?;
            let m = match n {
                0 => None,
                _ => Some(crate::repo::manifest::write_next(
                    tx,
                    &self.repo.root,
                    self.repo.perms,
                    &row.id,
                )?),
            };
            Ok((n, m))
        })
        .map(|(n, m)| {
            if let Some(m) = m {
                m.committed();
            }
            n
        })?;
        if n == 0 {
            return Err(Error::Invalid(format!(
                "image {} ({}) is not shared with {account:?}",
                row.name, row.id
            )));
        }
        self.image(row.id.as_str())
    }

    /// The accounts an image is shared with (owner only).
    pub fn image_shares(&self, reference: &str) -> Result<Vec<String>> {
        let (row, _) = self.image_for(reference, Op::Share)?;
        shares_of(&self.repo.conn, row.id.as_str())
    }

    /// The image's lineage: itself, its parent chain, the instance it was
    /// captured from, where it was copied from, copies made of it, and
    /// images captured from it.
    pub fn image_history(&self, reference: &str) -> Result<Vec<HistoryEntry>> {
        let (row, _) = self.image_for(reference, Op::Show)?;
        let mut out = vec![HistoryEntry {
            relation: "self".into(),
            id: row.id.to_string(),
            name: row.name.clone(),
            depot: String::new(),
            exists: true,
        }];
        if let Some(i) = &row.source_instance {
            let name: Option<String> = self
                .repo
                .conn
                .query_row("SELECT name FROM instances WHERE id = ?1", [i], |r| {
                    r.get(0)
                })
                .optional()?;
            out.push(HistoryEntry {
                relation: "source-instance".into(),
                id: i.clone(),
                exists: name.is_some(),
                name: name.unwrap_or_default(),
                depot: String::new(),
            });
        }
        if !row.copied_from.is_empty() {
            let (d, id) = row
                .copied_from
                .rsplit_once(' ')
                .unwrap_or(("", &row.copied_from));
            out.push(HistoryEntry {
                relation: "copied-from".into(),
                id: id.to_owned(),
                name: row.parent_name.clone(),
                depot: d.to_owned(),
                exists: true,
            });
        }
        // Parent chain (within this depot).
        let mut next = if row.copied_from.is_empty() {
            row.parent.clone().map(|p| (p, row.parent_name.clone()))
        } else {
            None
        };
        let mut guard = 0;
        while let Some((pid, pname)) = next.take() {
            guard += 1;
            if guard > 1000 {
                break;
            }
            let p = catalog::find_images(&self.repo.conn, &pid)?
                .into_iter()
                .next();
            out.push(HistoryEntry {
                relation: "parent".into(),
                id: pid,
                name: p.as_ref().map(|p| p.name.clone()).unwrap_or(pname),
                depot: String::new(),
                exists: p.is_some(),
            });
            next = p.and_then(|p| p.parent.map(|q| (q, p.parent_name)));
        }
        let pairs = |sql: &str| -> Result<Vec<(String, String)>> {
            let mut st = self.repo.conn.prepare(sql)?;
            let rows = st.query_map([row.id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        };
        for (depot, id) in
            pairs("SELECT depot, copy_id FROM image_copies WHERE image = ?1 ORDER BY copied_at")?
        {
            out.push(HistoryEntry {
                relation: "copy".into(),
                id,
                name: String::new(),
                depot,
                exists: true,
            });
        }
        for (id, name) in pairs(
            "SELECT id, name FROM images WHERE parent = ?1 AND copied_from = '' ORDER BY created_at",
        )? {
            out.push(HistoryEntry {
                relation: "child".into(),
                id,
                name,
                depot: String::new(),
                exists: true,
            });
        }
        Ok(out)
    }

    fn info_from_row(
        &self,
        r: ImageRow,
        access: Access,
        usage: &maint::Usage,
    ) -> Result<ImageInfo> {
        let (unique, shared) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
        let damage = r
            .damage
            .clone()
            .or_else(|| usage.damaged.get(&r.id).cloned());
        let tags = {
            let mut st = self
                .repo
                .conn
                .prepare_cached("SELECT key, value FROM image_tags WHERE image = ?1")?;
            let rows = st.query_map([r.id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let shared_with = if access == Access::Owner {
            shares_of(&self.repo.conn, r.id.as_str())?
        } else {
            Vec::new()
        };
        Ok(ImageInfo {
            id: r.id.to_string(),
            name: r.name,
            kind: if access == Access::Shared {
                "shared".into()
            } else {
                r.kind
            },
            state: if damage.is_some() {
                "damaged".into()
            } else {
                shown_state(&r.state, r.deprecated)
            },
            owner: r.owner,
            description: r.description,
            source_format: r.source_format,
            virtual_size: r.virtual_size,
            data_bytes: r.data_bytes,
            content_digest: r.content_digest,
            created_at: rfc3339(r.created_at),
            unique_stored_bytes: unique,
            shared_stored_bytes: shared,
            parent: r.parent,
            parent_name: r.parent_name,
            source_instance: r.source_instance,
            copied_from: r.copied_from,
            protected: r.protected,
            deprecated: r.deprecated,
            tags,
            vendor: r.vendor,
            application: r.application,
            app_version: r.app_version,
            shared_with,
            launch_only: !r.restricted_from.is_empty(),
            restricted_from: r.restricted_from,
            damage,
        })
    }
}

/// The depot marker file (docs/FORMAT.md): written once, when the depot is
/// created (or first opened by a vmdepot that knows markers).
pub const MARKER: &str = "VMDEPOT";

/// The first line of the marker.
const MARKER_MAGIC: &str = "vmdepot-depot";

/// The depot format version the marker names.
pub const FORMAT_VERSION: u32 = 1;

/// The depot id from the marker, if there is a marker.
fn read_marker(root: &Path) -> Result<Option<String>> {
    let p = root.join(MARKER);
    let text = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let bad = |why: &str| {
        Error::StoreDamaged(format!(
            "{}: not a vmdepot depot marker ({why}); it should hold `{MARKER_MAGIC}`, `format=N` and `id=<32 hex>` lines",
            p.display()
        ))
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad("not UTF-8"))?;
    let mut lines = text.split_terminator('\n');
    if lines.next() != Some(MARKER_MAGIC) {
        return Err(bad("bad first line"));
    }
    let format: u32 = lines
        .next()
        .and_then(|l| l.strip_prefix("format="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| bad("bad format line"))?;
    if format > FORMAT_VERSION {
        return Err(Error::Invalid(format!(
            "{}: the depot has format {format}, this vmdepot knows format {FORMAT_VERSION} at most: use a newer vmdepot",
            p.display()
        )));
    }
    let id = lines
        .next()
        .and_then(|l| l.strip_prefix("id="))
        .filter(|id| crate::store::valid_pack_name(id))
        .ok_or_else(|| bad("bad id line"))?;
    Ok(Some(id.to_owned()))
}

/// Writes the marker with a fresh depot id, atomically and durably: a
/// fsynced temporary hard-linked to the name (a concurrent first open that
/// won keeps its own), then the directory fsynced.
fn write_marker(root: &Path, perms: Perms) -> Result<()> {
    use std::io::Write;
    let id = crate::ids::random_hex(16);
    let text = format!("{MARKER_MAGIC}\nformat={FORMAT_VERSION}\nid={id}\n");
    let tmp = root.join(format!("{MARKER}.tmp-{}", crate::ids::random_hex(8)));
    let r = (|| {
        let mut f = perms
            .open_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .at(&tmp)?;
        f.write_all(text.as_bytes()).at(&tmp)?;
        f.sync_all().at(&tmp)?;
        let m = root.join(MARKER);
        match fs::hard_link(&tmp, &m) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::io(&m, e)),
            _ => Ok(()),
        }
    })();
    let _ = fs::remove_file(&tmp);
    r?;
    crate::store::sync_dir(root)
}

/// What is wrong with an open catalog, if anything (SQLite's own check).
fn catalog_damage(conn: &Connection) -> Option<String> {
    match conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
        Ok(s) if s == "ok" => {
            // Every table readable (a truncated file may pass the check of
            // the pages it still has).
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

/// Where the depot directory at `root` holds packs, if it does.
fn pack_files_exist(root: &Path, perms: Perms) -> Option<String> {
    use crate::store::{ObjectKind, ObjectStore};
    let store = LocalDir::new(root, perms);
    let packs = store.list(ObjectKind::Pack).ok()?;
    (!packs.is_empty()).then(|| format!("pack files exist in {}", store.dir().display()))
}

/// The state users see (the cloud services' names): `creating` while the
/// import or capture runs, `available`, or `deprecated`.
pub(crate) fn shown_state(state: &str, deprecated: bool) -> String {
    match state {
        "importing" => "creating".into(),
        "available" if deprecated => "deprecated".into(),
        s => s.into(),
    }
}

fn shares_of(conn: &Connection, image: &str) -> Result<Vec<String>> {
    let mut st =
        conn.prepare_cached("SELECT account FROM image_shares WHERE image = ?1 ORDER BY account")?;
    let rows = st.query_map([image], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Sets tags in a write transaction; an empty value removes the tag.
pub(crate) fn set_tags(tx: &Connection, image: &str, tags: &[(String, String)]) -> Result<()> {
    for (k, v) in tags {
        if v.is_empty() {
            tx.execute(
                "DELETE FROM image_tags WHERE image = ?1 AND key = ?2",
                params![image, k],
            )?;
        } else {
            tx.execute(
                "INSERT OR REPLACE INTO image_tags (image, key, value) VALUES (?1, ?2, ?3)",
                params![image, k, v],
            )?;
        }
    }
    Ok(())
}

fn is_unique(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE)
}

/// The acting account: `VMDEPOT_ACCOUNT`, else the Unix user's name.
fn default_account() -> String {
    if let Ok(a) = std::env::var("VMDEPOT_ACCOUNT") {
        if !a.is_empty() {
            return a;
        }
    }
    let uid = nix::unistd::geteuid();
    nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// The group recorded in a depot (`DEPOT/group`), if any.
fn read_group(root: &Path) -> Result<Option<String>> {
    let p = root.join(GROUP_FILE);
    match fs::read_to_string(&p) {
        Ok(s) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&p, e)),
    }
}

/// Checks an account name: the rules of a Unix user name (`useradd`'s
/// default): 1 to 32 characters, a lowercase letter or `_` first, then
/// lowercase letters, digits, `_` or `-`, optionally ending in `$`.
/// Anything else (empty, upper case, spaces, `/`, control characters) is an
/// [`Error::Usage`].
pub fn check_account(a: &str) -> Result<()> {
    let b = a.as_bytes();
    let body = b.strip_suffix(b"$").unwrap_or(b);
    let ok = !body.is_empty()
        && b.len() <= 32
        && (body[0].is_ascii_lowercase() || body[0] == b'_')
        && body
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Usage(format!(
            "invalid account name {a:?}: use 1-32 characters, a lowercase letter or '_' first, \
             then lowercase letters, digits, '_' or '-' (a Unix user name)"
        )))
    }
}

/// Unix seconds as RFC 3339 UTC (`2026-11-27T10:38:21Z`).
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
