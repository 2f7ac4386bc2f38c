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

use nix::fcntl::FlockArg;
use rusqlite::params;

use crate::catalog;
use crate::depot::access::Op;
use crate::depot::{Depot, ImageInfo, ImageType, ImportOptions};
use crate::error::{Error, IoContext, Result};
use crate::image::{import, input::Input};
use crate::launch::instance::{self, DiskMode, InstanceInfo};
use crate::launch::qemu::Qmp;
use crate::progress::Progress;

/// What `image create --from-instance` asks for.
#[derive(Clone, Debug)]
pub struct CaptureOptions {
    pub name: String,
    pub description: String,
    /// Capture a running instance: pause it (QMP `stop`, which flushes its
    /// disks), read, resume. Without it a running instance is refused.
    pub live: bool,
    pub tags: Vec<(String, String)>,
}

impl CaptureOptions {
    pub fn new(name: impl Into<String>) -> CaptureOptions {
        CaptureOptions {
            name: name.into(),
            description: String::new(),
            live: false,
            tags: Vec::new(),
        }
    }
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

impl Depot {
    /// Stores an instance's current disk as a new custom image whose parent
    /// is the instance's image.
    pub fn capture(
        &self,
        instance: &str,
        opts: &CaptureOptions,
        progress: &dyn Progress,
    ) -> Result<ImageInfo> {
        let instance::Held { r, p, .. } = &self.hold(instance)?;
        // The parent, for its chunks: gone (deleted or unshared since)
        // means no shortcut.
        let parent = match self.image_for(&r.image, Op::Capture) {
            Ok((row, _)) => Some(row),
            Err(Error::ImageNotFound(_)) => None,
            Err(e) => return Err(e),
        };
        // Launch-only content stays launch-only: what the instance carries
        // (set at launch and restore), else what its image, still in the
        // catalog whoever may see it now, would give it.
        let restricted_from = if r.restricted_from.is_empty() {
            catalog::find_images(&self.repo.conn, &r.image)?
                .iter()
                .find(|row| row.id.as_str() == r.image)
                .map(|row| crate::depot::access::restriction_of(row, self.account()))
                .unwrap_or_default()
        } else {
            r.restricted_from.clone()
        };
        let running = r.state == "running";
        if running && !opts.live {
            return Err(Error::Invalid(format!(
                "instance {} ({}) is running: stop it first, or capture with --live \
                 (pauses the guest while its disk is read)",
                r.name, r.id
            )));
        }
        // The pause: a lease first (so that a kill at any moment leaves a
        // record the next command acts on, see `instance::PauseLease`),
        // then QMP `stop`. QMP is not held while the disk is read: QEMU
        // serves one QMP client at a time, and `instance show` must be
        // able to see the pause meanwhile.
        let mut paused = None;
        if running {
            let qmp = p.files().qmp;
            let mut q = Qmp::connect(&qmp)?;
            if q.run_state()? == "paused" {
                // Paused by someone else (not vmdepot: no lease): read it
                // as it is and leave it paused.
                tracing::info!("instance {} is paused already: not pausing it", r.id);
            } else {
                let lease = instance::PauseLease::take(p, self.perms())?;
                if let Err(e) = q.pause() {
                    lease.release();
                    return Err(e);
                }
                paused = Some((lease, std::time::Instant::now()));
            }
            drop(q);
            test_hook_paused();
        }
        let result = (|| {
            let input = match r.disk {
                DiskMode::Overlay => {
                    let map = match &parent {
                        Some(row) => Some(catalog::image_map(&self.repo.conn, &row.id)?),
                        None => None,
                    };
                    Input::overlay(
                        &crate::image::bases::base_path(self.root(), &r.image),
                        &p.disk(DiskMode::Overlay),
                        map,
                    )?
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
            io.tags = opts.tags.clone();
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
        })();
        if let Some((lease, since)) = paused {
            // Resume whatever happened: the guest keeps running.
            let resumed = Qmp::connect(&p.files().qmp).and_then(|mut q| q.resume());
            tracing::info!(
                "instance {}: guest paused for {} ms",
                r.id,
                since.elapsed().as_millis()
            );
            match resumed {
                // A lease left behind (resume failed) is ended by the next
                // command that looks at the instance, once this process
                // has exited.
                Ok(()) => lease.release(),
                Err(e) if result.is_ok() => return Err(e),
                Err(_) => {}
            }
        }
        let id = result?;
        self.image(id.as_str())
    }

    /// A backup: a capture named after the instance and the time, tagged
    /// `backup-of=INSTANCE-ID` (live if the instance runs). With `keep`,
    /// prunes this instance's older backups down to the `keep` newest
    /// (protected ones are never pruned); nothing else is touched.
    /// Returns the new image and the ids pruned.
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
            let t = crate::depot::rfc3339(catalog::now())
                .replace([':', '-'], "")
                .to_lowercase();
            format!("{}-backup-{t}-{}", r.name, crate::ids::random_hex(2))
        });
        let mut opts = CaptureOptions::new(name);
        opts.description = format!("backup of instance {} ({})", r.name, r.id);
        opts.live = r.state == "running";
        opts.tags = vec![(BACKUP_TAG.into(), r.id.clone())];
        let info = self.capture(&r.id, &opts, progress)?;
        let mut pruned = Vec::new();
        if let Some(keep) = keep {
            let backups: Vec<(String, i64)> = {
                let mut st = self.repo.conn.prepare(
                    "SELECT i.id, i.rowid FROM images i JOIN image_tags t ON t.image = i.id
                     WHERE t.key = ?1 AND t.value = ?2 AND i.owner = ?3
                       AND i.state = 'available' AND i.protected = 0",
                )?;
                let rows = st.query_map(params![BACKUP_TAG, r.id, self.account()], |x| {
                    Ok((x.get(0)?, x.get(1)?))
                })?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            // The new backup is always kept, whatever the clock says.
            let others: Vec<(String, i64)> =
                backups.into_iter().filter(|b| b.0 != info.id).collect();
            for id in select_prune(&others, keep - 1) {
                self.delete_image(&id, false)?;
                pruned.push(id);
            }
        }
        Ok((info, pruned))
    }

    /// Makes an instance's disk the content of `image` again (a new overlay
    /// over that image's base, or a new private copy). A running instance
    /// is stopped first and started again after.
    pub fn restore_instance(
        &self,
        instance: &str,
        image: &str,
        progress: &dyn Progress,
    ) -> Result<(InstanceInfo, Option<String>)> {
        let (img, _) = self.available_for(image, Op::Launch)?;
        let r = self.fresh_row(instance)?;
        let was_running = r.state == "running";
        if was_running {
            self.stop_instance(&r.id, false, instance::STOP_TIMEOUT)?;
        }
        {
            let instance::Held { r: now, p, .. } = &self.hold(&r.id)?;
            if now.state == "running" {
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
            let _base_lock = crate::image::bases::base_flock(
                &self.repo,
                img.id.as_str(),
                FlockArg::LockExclusive,
            )?;
            let base = match r.disk {
                DiskMode::Overlay => Some(crate::image::bases::ensure_base(
                    &self.repo, &img, progress,
                )?),
                DiskMode::Copy => None,
            };
            instance::make_disk(self, &img, base.as_deref(), &fresh, progress)?;
            // Durable before it replaces the old disk: fsync, rename, fsync
            // the directory (qemu-img does not sync the overlay it creates).
            std::fs::File::open(&fresh)
                .and_then(|f| f.sync_all())
                .at(&fresh)?;
            std::fs::rename(&fresh, &disk).at(&disk)?;
            crate::store::sync_dir(&p.dir)?;
            catalog::write(&self.repo.conn, |tx| {
                // The disk is the image's content now, launch-only or not.
                tx.execute(
                    "UPDATE instances SET image = ?2, image_name = ?3, restricted_from = ?4
                     WHERE id = ?1",
                    params![
                        r.id,
                        img.id.as_str(),
                        img.name,
                        crate::depot::access::restriction_of(&img, self.account())
                    ],
                )?;
                Ok(())
            })?;
        }
        if was_running {
            return self.start_instance(&r.id);
        }
        Ok((self.instance(&r.id)?, None))
    }
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
