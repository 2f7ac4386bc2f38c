//! The custom-image lifecycle around instances: capture an instance's disk
//! as a new image ([`Depot::capture`], `image create --from-instance`),
//! backups with retention ([`Depot::backup_instance`], [`select_prune`]) and
//! restore ([`Depot::restore_instance`]).
//!
//! Capture reads only what the instance changed: its qcow2 overlay's own
//! clusters (`qemu-img map`), laid over the raw base, which is the parent
//! image's content; blocks outside those clusters keep the parent's chunks
//! without being hashed or compressed again (`input::Input::overlay`). The
//! content digest still covers every byte.

pub mod copy;
pub(crate) mod transfer;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use nix::fcntl::FlockArg;
use tracing::instrument;

use crate::catalog::instances::{self, InstanceRow};
use crate::catalog::{self, DiskMode, ImageRow, InstanceState};
use crate::depot::access::{restriction_of, Op};
use crate::depot::display::rfc3339;
use crate::depot::{Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, IoContext, Result};
use crate::image::bases::{base_flock, base_path, ensure_base};
use crate::image::import;
use crate::image::input::Input;
use crate::image::lazy::LazyImage;
use crate::image::source::Reader;
use crate::launch::create::make_disk;
use crate::launch::firmware::FIRMWARE_TAG;
use crate::launch::instance::{Held, InstanceInfo, SSH_USER_TAG, STOP_TIMEOUT};
use crate::launch::paths::Paths;
use crate::launch::pause::PauseLease;
use crate::launch::qmp::{Qmp, RunState};
use crate::progress::Progress;

/// What `image create --from-instance` asks for.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    /// The new image's name.
    pub name: String,
    /// The new image's description (empty: none).
    pub description: String,
    /// Capture a running instance: pause it (QMP `stop`, which flushes its
    /// disks), read, resume. Without it a running instance is refused.
    pub live: bool,
    /// Tags (key, value) set on the new image, over those it carries from
    /// the instance's image (`os`, `release`, `ssh-user`, `firmware`).
    pub tags: Vec<(String, String)>,
}

impl CaptureOptions {
    /// A capture into a custom image named `name`, of a stopped instance,
    /// with no description and no tags.
    pub fn new(name: impl Into<String>) -> CaptureOptions {
        CaptureOptions {
            name: name.into(),
            description: String::new(),
            live: false,
            tags: Vec::new(),
        }
    }
}

/// The tags a capture (and a backup) carries from its instance's image,
/// what the guest is and how it boots and is reached: `os`, `release`,
/// `ssh-user` (else the user the instance recorded at launch) and
/// `firmware` (else `uefi` if the instance booted UEFI: the disk it
/// captures boots so). The recipe (`build.*`) is not carried: the capture
/// was not built from it. The caller's tags are set after these (and win).
pub(crate) const CARRIED_TAGS: &[&str] = &["os", "release", SSH_USER_TAG, FIRMWARE_TAG];

fn carried_tags(conn: &rusqlite::Connection, r: &InstanceRow) -> Result<Vec<(String, String)>> {
    let mut tags = catalog::images::tags_of(conn, &r.image)?;
    tags.retain(|k, _| CARRIED_TAGS.contains(&k.as_str()));
    if let Some(u) = r.ssh_user.as_ref().filter(|u| !u.is_empty()) {
        tags.entry(SSH_USER_TAG.to_owned())
            .or_insert_with(|| u.clone());
    }
    if r.firmware == "uefi" {
        tags.entry(FIRMWARE_TAG.to_owned())
            .or_insert_with(|| "uefi".to_owned());
    }
    Ok(tags.into_iter().collect())
}

/// Test-only hook: with `VMDEPOT_TEST_PAUSED_SLEEP_MS=N` in the
/// environment, a live capture sleeps N ms right after pausing the guest,
/// so that tests can kill it (or look at the instance) while the guest is
/// paused. Not for production use.
fn test_hook_paused() {
    if let Some(ms) = std::env::var("VMDEPOT_TEST_PAUSED_SLEEP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// The tag that marks a backup and names its instance.
pub const BACKUP_TAG: &str = "backup-of";

/// Which backups to prune: all but the `keep` newest. `backups` is
/// `(image id, creation order)` (the catalog's row order: finer than the
/// clock's seconds); ties by id. Pure.
pub fn select_prune(backups: &[(String, i64)], keep: usize) -> Vec<String> {
    let mut v: Vec<&(String, i64)> = backups.iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    v.into_iter().skip(keep).map(|(id, _)| id.clone()).collect()
}

/// A guest a live capture paused: its lease and since when.
struct Paused {
    lease: PauseLease,
    since: Instant,
}

/// Pauses a running guest for a live capture: a lease first (so that a
/// kill at any moment leaves a record the next command acts on, see
/// [`PauseLease`]), then QMP `stop`. QMP is not held while the disk is
/// read: QEMU serves one QMP client at a time, and `instance show` must be
/// able to see the pause meanwhile. A guest paused already (by someone
/// else than vmdepot: no lease) is read as it is and left paused: `None`.
fn pause_for_capture(
    r: &InstanceRow,
    p: &Paths,
    perms: crate::perms::Perms,
) -> Result<Option<Paused>> {
    let mut q = Qmp::connect(&p.files().qmp)?;
    if q.run_state()? == RunState::Paused {
        tracing::info!("instance {} is paused already: not pausing it", r.id);
        return Ok(None);
    }
    let lease = PauseLease::take(p, perms)?;
    if let Err(e) = q.pause() {
        lease.release();
        return Err(e);
    }
    Ok(Some(Paused {
        lease,
        since: Instant::now(),
    }))
}

/// Resumes a guest a capture paused, whatever the capture's `result`: the
/// guest keeps running. A failed resume is the error of a capture that
/// worked; its lease is left behind then, and the next command that looks
/// at the instance ends it once this process has exited.
fn resume_after_capture<T>(
    r: &InstanceRow,
    p: &Paths,
    paused: Paused,
    result: &Result<T>,
) -> Result<()> {
    let resumed = Qmp::connect(&p.files().qmp).and_then(|mut q| q.resume());
    tracing::info!(
        "instance {}: guest paused for {} ms",
        r.id,
        paused.since.elapsed().as_millis()
    );
    match resumed {
        Ok(()) => {
            paused.lease.release();
            Ok(())
        }
        Err(e) if result.is_ok() => Err(e),
        Err(_) => Ok(()),
    }
}

impl Depot {
    /// Stores an instance's current disk as a new custom image whose parent
    /// is the instance's image.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn capture(
        &self,
        instance: &str,
        opts: &CaptureOptions,
        progress: &dyn Progress,
    ) -> Result<ImageInfo> {
        crate::catalog::images::check_caller_tags(opts.tags.iter().map(|(k, _)| k))?;
        let Held { r, p, .. } = &self.hold(instance)?;
        // The parent, for its chunks: gone (deleted or unshared since)
        // means no shortcut.
        let parent = match self.image_for(&r.image, Op::Capture) {
            Ok((row, _)) => Some(row),
            Err(Error::ImageNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        let restricted_from = self.capture_restriction(r)?;
        let running = r.state == InstanceState::Running;
        if running && !opts.live {
            return Err(Error::Invalid(format!(
                "instance {} ({}) is running: stop it first, or capture with --live \
                 (pauses the guest while its disk is read)",
                r.name, r.id
            )));
        }
        let mut paused = None;
        if running {
            paused = pause_for_capture(r, p, self.perms())?;
            test_hook_paused();
        }
        let result = self.capture_disk(r, p, parent.as_ref(), opts, restricted_from, progress);
        if let Some(paused) = paused {
            resume_after_capture(r, p, paused, &result)?;
        }
        let id = result?;
        self.image(id.as_str())
    }

    /// The launch-only origin a capture of `r` carries: what the instance
    /// carries (set at launch and restore), else what its image, still in
    /// the catalog whoever may see it now, would give it. Launch-only
    /// content stays launch-only.
    fn capture_restriction(&self, r: &InstanceRow) -> Result<String> {
        if !r.restricted_from.is_empty() {
            return Ok(r.restricted_from.clone());
        }
        Ok(catalog::find_images(&self.repo.conn, &r.image)?
            .iter()
            .find(|row| row.id.as_str() == r.image)
            .map(|row| restriction_of(row, self.account()))
            .unwrap_or_default())
    }

    /// Imports the disk of instance `r` as a new custom image: an overlay
    /// is read over its base with the `parent`'s map (only the overlay's
    /// own clusters are read), a private copy in full.
    fn capture_disk(
        &self,
        r: &InstanceRow,
        p: &Paths,
        parent: Option<&ImageRow>,
        opts: &CaptureOptions,
        restricted_from: String,
        progress: &dyn Progress,
    ) -> Result<crate::ids::ImageId> {
        let input = match r.disk {
            DiskMode::Overlay => {
                let map = match parent {
                    Some(row) => Some(catalog::image_map(&self.repo.conn, &row.id)?),
                    None => None,
                };
                let base = base_path(self.root(), &r.image);
                let file = std::fs::File::open(&base).at(&base)?;
                Input::overlay(&base, Reader::File(file), &p.disk(r.disk), map)?
            }
            DiskMode::Lazy => {
                let row = catalog::find_images(&self.repo.conn, &r.image)?
                    .into_iter()
                    .find(|i| i.id.as_str() == r.image)
                    .ok_or_else(|| {
                        Error::StoreDamaged(format!(
                            "instance {} ({}): its image {} is gone from the catalog",
                            r.name, r.id, r.image
                        ))
                    })?;
                if row.state == Some(crate::catalog::ImageState::Partial) {
                    // (no map of its own yet: its content is at the remote)
                    self.usable_for(row.id.as_str(), Op::Capture, false)?;
                }
                let img = LazyImage::new(&row, &self.repo)?;
                let map = Some(catalog::image_map(&self.repo.conn, &row.id)?);
                let label = std::path::PathBuf::from(format!("image {}", img.label));
                Input::overlay(&label, Reader::Image(Arc::new(img)), &p.disk(r.disk), map)?
            }
            DiskMode::Copy => {
                let d = p.disk(DiskMode::Copy);
                let size = std::fs::metadata(&d).at(&d)?.len();
                Input::plain(&d, size)?
            }
        };
        let mut io = ImportOptions::new(opts.name.clone());
        io.kind = ImageType::Custom;
        io.description = opts.description.clone();
        io.tags = carried_tags(&self.repo.conn, r)?;
        io.tags.extend(opts.tags.iter().cloned());
        io.parent = Some((r.image.clone(), r.image_name.clone()));
        io.source_instance = Some(r.id.clone());
        io.restricted_from = restricted_from;
        import::import_input(
            &self.repo,
            self.account(),
            &input,
            &io,
            "instance",
            progress,
        )
    }

    /// A backup: a capture named after the instance and the time, tagged
    /// `backup-of=INSTANCE-ID` (live if the instance runs). With `keep`,
    /// prunes this instance's older backups down to the `keep` newest
    /// (protected ones are never pruned); nothing else is touched.
    /// Returns the new image and the ids pruned.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn backup_instance(
        &self,
        instance: &str,
        name: Option<String>,
        keep: Option<usize>,
        progress: &dyn Progress,
    ) -> Result<(ImageInfo, Vec<String>)> {
        if keep == Some(0) {
            return Err(Error::Invalid(
                "--keep 0 would delete the backup just made: keep at least 1".into(),
            ));
        }
        let r = self.fresh_row(instance)?;
        let name = name.unwrap_or_else(|| {
            let t = rfc3339(catalog::now())
                .replace([':', '-'], "")
                .to_lowercase();
            format!("{}-backup-{t}-{}", r.name, crate::ids::random_hex(2))
        });
        let mut opts = CaptureOptions::new(name);
        opts.description = format!("backup of instance {} ({})", r.name, r.id);
        opts.live = r.state == InstanceState::Running;
        opts.tags = vec![(BACKUP_TAG.into(), r.id.clone())];
        let info = self.capture(&r.id, &opts, progress)?;
        let pruned = match keep {
            Some(keep) => self.prune_backups(&r.id, &info.id, keep)?,
            None => Vec::new(),
        };
        Ok((info, pruned))
    }

    /// Deletes the backups of instance `instance` but the `keep` newest,
    /// `newest` (the one just made) always kept whatever the clock says;
    /// returns the ids deleted.
    fn prune_backups(&self, instance: &str, newest: &str, keep: usize) -> Result<Vec<String>> {
        let backups = catalog::images::unprotected_tagged(
            &self.repo.conn,
            BACKUP_TAG,
            instance,
            self.account(),
        )?;
        let others: Vec<(String, i64)> = backups.into_iter().filter(|b| b.0 != newest).collect();
        let mut pruned = Vec::new();
        for id in select_prune(&others, keep - 1) {
            self.delete_image(&id, false)?;
            pruned.push(id);
        }
        Ok(pruned)
    }

    /// Makes an instance's disk the content of `image` again (a new overlay
    /// over that image's base, or a new private copy). A running instance
    /// is stopped first and started again after.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn restore_instance(
        &self,
        instance: &str,
        image: &str,
        progress: &dyn Progress,
    ) -> Result<(InstanceInfo, Option<String>)> {
        let (img, _) = self.available_for(image, Op::Launch)?;
        let r = self.fresh_row(instance)?;
        let was_running = r.state == InstanceState::Running;
        if was_running {
            self.stop_quietly(&r.id, false, STOP_TIMEOUT)?;
        }
        self.replace_disk(&r, &img, progress)?;
        if was_running {
            return self.start_instance(&r.id);
        }
        Ok((self.instance(&r.id)?, None))
    }

    /// Replaces the disk of the stopped instance `r` by a new one of `img`
    /// (under the instance's lock), durably, and records the image.
    fn replace_disk(&self, r: &InstanceRow, img: &ImageRow, progress: &dyn Progress) -> Result<()> {
        let Held { r: now, p, .. } = &self.hold(&r.id)?;
        if now.state == InstanceState::Running {
            return Err(Error::Invalid(format!(
                "instance {} ({}) was started again meanwhile: its disk is in use; \
                 stop it and restore again",
                r.name, r.id
            )));
        }
        let disk = p.disk(r.disk);
        let fresh = p.dir.join(format!(
            "{}.restore",
            disk.file_name().unwrap().to_string_lossy()
        ));
        let _ = std::fs::remove_file(&fresh);
        // Under the base's lock, like a launch: gc cannot evict it
        // between the base being made and the row naming its image.
        let _base_lock = base_flock(&self.repo, img.id.as_str(), FlockArg::LockExclusive)?;
        let base = match r.disk {
            DiskMode::Overlay => Some(ensure_base(&self.repo, img, progress)?),
            DiskMode::Lazy | DiskMode::Copy => None,
        };
        make_disk(&self.repo, img, r.disk, base.as_deref(), &fresh, progress)?;
        install_durably(&fresh, &disk, &p.dir)?;
        // The disk is the image's content now, launch-only or not.
        instances::set_image(
            &self.repo.conn,
            &r.id,
            img.id.as_str(),
            &img.name,
            &restriction_of(img, self.account()),
        )
    }
}

/// Renames `fresh` over `dest` in `dir`, durable before it replaces the
/// old file: fsync, rename, fsync the directory (qemu-img does not sync
/// the overlay it creates).
fn install_durably(fresh: &Path, dest: &Path, dir: &Path) -> Result<()> {
    std::fs::File::open(fresh)
        .and_then(|f| f.sync_all())
        .at(fresh)?;
    std::fs::rename(fresh, dest).at(dest)?;
    crate::store::sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest() {
        let b = |id: &str, t: i64| (id.to_string(), t);
        let v = vec![b("a", 10), b("b", 30), b("c", 20), b("d", 40)];
        assert_eq!(select_prune(&v, 2), vec!["c".to_string(), "a".to_string()]);
        assert_eq!(select_prune(&v, 4), Vec::<String>::new());
        assert_eq!(select_prune(&v, 10), Vec::<String>::new());
        assert_eq!(select_prune(&v, 0).len(), 4);
        // same second: the id decides, so the choice is stable
        let v = vec![b("x", 5), b("y", 5), b("z", 5)];
        assert_eq!(select_prune(&v, 1), vec!["y".to_string(), "x".to_string()]);
        assert!(select_prune(&[], 3).is_empty());
    }
}
