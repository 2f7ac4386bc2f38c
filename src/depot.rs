//! [`Depot`]: the public face of the library. Opens (or creates) a depot
//! directory and runs image operations on it.
//!
//! Layout of a depot directory (docs/FORMAT.md has the details):
//! `catalog.db` (SQLite), `packs/` (chunk data), `locks/` (one lock file per
//! running import), `tmp/` (qemu-img conversions of foreign formats).

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::Connection;
use serde::Serialize;
use tracing::instrument;

use crate::catalog::{self, ImageRow};
use crate::error::{Error, IoContext, Result};
use crate::export::{self, ExportFormat};
use crate::ids::ImageId;
use crate::maint::{self, FsckReport, GcReport, Stats, VerifyReport};
use crate::progress::Progress;
use crate::source::SourceFormat;

/// The type of an image (PRODUCT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageType {
    Public,
    Marketplace,
    Custom,
}

impl ImageType {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageType::Public => "public",
            ImageType::Marketplace => "marketplace",
            ImageType::Custom => "custom",
        }
    }

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

/// What `import` needs besides the file.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub name: String,
    pub kind: ImageType,
    pub description: String,
    /// `None` detects the format from the content.
    pub format: Option<SourceFormat>,
    /// Read the file even when it is unchanged (same device, inode, size,
    /// mtime and ctime) since an earlier import whose image still exists.
    pub reread: bool,
}

impl ImportOptions {
    pub fn new(name: impl Into<String>) -> ImportOptions {
        ImportOptions {
            name: name.into(),
            kind: ImageType::Custom,
            description: String::new(),
            format: None,
            reread: false,
        }
    }
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
}

/// An open depot.
pub struct Depot {
    root: PathBuf,
    pub(crate) conn: Connection,
    account: String,
}

impl Depot {
    /// Opens the depot at `root`, creating the directory and catalog if
    /// needed. Several processes may open one depot at once.
    #[instrument(skip_all, err(level = "debug"), fields(root = %root.as_ref().display()))]
    pub fn open(root: impl AsRef<Path>) -> Result<Depot> {
        let root = root.as_ref().to_owned();
        for d in ["", "packs", "locks", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).at(&p)?;
        }
        // Absolute from here on: overlays name their base by this path, and
        // QEMU runs with another working directory.
        let root = fs::canonicalize(&root).at(&root)?;
        let conn = catalog::open(&root.join("catalog.db"))?;
        Ok(Depot {
            root,
            conn,
            account: default_account(),
        })
    }

    /// Acts as `account` from now on (default: the Unix user, or
    /// `VMDEPOT_ACCOUNT`).
    pub fn with_account(mut self, account: impl Into<String>) -> Depot {
        self.account = account.into();
        self
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn root(&self) -> &Path {
        &self.root
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
        let id = crate::import::import(self, file.as_ref(), opts, progress)?;
        self.image(id.as_str())
    }

    /// Writes an image to `out` (raw: sparse; qcow2: via qemu-img), checking
    /// every chunk's hash and the image's content digest on the way.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn export(
        &self,
        image: &str,
        out: impl AsRef<Path>,
        format: ExportFormat,
        progress: &dyn Progress,
    ) -> Result<()> {
        let row = self.available_image(image)?;
        export::export(self, &row, out.as_ref(), format, progress)
    }

    /// Re-reads and re-hashes every chunk: of one image (and its content
    /// digest), or of the whole store when `image` is `None`.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn verify(&self, image: Option<&str>, progress: &dyn Progress) -> Result<VerifyReport> {
        match image {
            Some(r) => {
                let row = self.available_image(r)?;
                export::verify_image(self, &row, progress)
            }
            None => maint::verify_all(self, progress),
        }
    }

    /// Removes what no image refers to: chunks, frames, packs, and whatever
    /// a killed import left behind. `dry_run` only reports.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn gc(&self, dry_run: bool) -> Result<GcReport> {
        maint::gc(self, dry_run)
    }

    /// Checks the structure of the catalog and the store.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn fsck(&self) -> Result<FsckReport> {
        maint::fsck(self)
    }

    /// Logical vs stored bytes, dedup and compression ratios, per image.
    pub fn stats(&self) -> Result<Stats> {
        maint::stats(self)
    }

    /// All images (running imports included; abandoned ones hidden).
    pub fn list_images(&self) -> Result<Vec<ImageInfo>> {
        let rows = catalog::list_images(&self.conn)?;
        let usage = maint::usage(self)?;
        Ok(rows
            .into_iter()
            .filter(|r| r.state != "importing" || self.import_alive(&r.id))
            .map(|r| info_from_row(r, &usage))
            .collect())
    }

    /// One image by id or name.
    pub fn image(&self, reference: &str) -> Result<ImageInfo> {
        let row = self.visible_image(reference)?;
        let usage = maint::usage(self)?;
        Ok(info_from_row(row, &usage))
    }

    /// Deletes an image. Its chunks are freed by the next `gc`.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn delete_image(&self, reference: &str) -> Result<ImageInfo> {
        let info = self.image(reference)?;
        if info.state == "importing" {
            return Err(Error::ImageNotAvailable {
                image: format!("{} ({})", info.name, info.id),
                state: info.state,
            });
        }
        catalog::write(&self.conn, |c| {
            Ok(c.execute("DELETE FROM images WHERE id = ?1", [&info.id])?)
        })?;
        Ok(info)
    }

    fn visible_image(&self, reference: &str) -> Result<ImageRow> {
        let row = catalog::find_image(&self.conn, reference)?;
        if row.state == "importing" && !self.import_alive(&row.id) {
            return Err(Error::ImageNotFound(reference.to_owned()));
        }
        Ok(row)
    }

    pub(crate) fn available_image(&self, reference: &str) -> Result<ImageRow> {
        let row = self.visible_image(reference)?;
        if row.state != "available" {
            return Err(Error::ImageNotAvailable {
                image: format!("{} ({})", row.name, row.id),
                state: row.state,
            });
        }
        Ok(row)
    }

    pub(crate) fn lock_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("locks").join(format!("{id}.lock"))
    }

    pub(crate) fn tmp_path(&self, id: &ImageId) -> PathBuf {
        self.root.join("tmp").join(format!("{id}.raw"))
    }

    /// Takes the lock that marks a running import of `id` (held until drop).
    pub(crate) fn lock_import(&self, id: &ImageId) -> Result<Flock<File>> {
        use std::os::unix::fs::MetadataExt;
        let p = self.lock_path(id);
        loop {
            let f = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .at(&p)?;
            let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| Error::io(&p, e.into()))?;
            // gc may have removed the file between open and flock: the lock
            // only counts if the path still names the file we locked.
            let ours = lock.metadata().at(&p)?.ino();
            if std::fs::metadata(&p).map(|m| m.ino()).ok() == Some(ours) {
                return Ok(lock);
            }
        }
    }

    /// Takes the lock that lets one gc run at a time (held until drop);
    /// waits for a gc that runs.
    pub(crate) fn lock_gc(&self) -> Result<Flock<File>> {
        let p = self.root.join("gc.lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .at(&p)?;
        Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::io(&p, e.into()))
    }

    /// Whether a gc is running (its lock is held).
    pub(crate) fn gc_running(&self) -> bool {
        held(&self.root.join("gc.lock"))
    }

    /// Whether the import of `id` is still running (its lock is held).
    pub(crate) fn import_alive(&self, id: &ImageId) -> bool {
        held(&self.lock_path(id))
    }
}

/// Whether some process holds an exclusive flock on the file at `p`.
fn held(p: &Path) -> bool {
    let Ok(f) = File::open(p) else {
        return false;
    };
    match Flock::lock(f, FlockArg::LockSharedNonblock) {
        Ok(_) => false,
        Err((_, e)) => e == nix::errno::Errno::EWOULDBLOCK,
    }
}

fn info_from_row(r: ImageRow, usage: &maint::Usage) -> ImageInfo {
    let (unique, shared) = usage.per_image.get(&r.id).copied().unwrap_or((0, 0));
    ImageInfo {
        id: r.id.to_string(),
        name: r.name,
        kind: r.kind,
        state: r.state,
        owner: r.owner,
        description: r.description,
        source_format: r.source_format,
        virtual_size: r.virtual_size,
        data_bytes: r.data_bytes,
        content_digest: r.content_digest,
        created_at: rfc3339(r.created_at),
        unique_stored_bytes: unique,
        shared_stored_bytes: shared,
    }
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
