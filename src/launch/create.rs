//! [`Depot::launch`]: instances made from an image and started, in steps:
//! the request checked, the rows entered (`pending`) under the base's lock
//! with the shared raw base made once, a disk (overlay or private copy), a
//! NoCloud seed and the port forwards per instance (`stopped`), then all
//! QEMUs started at once. A [`LaunchGuard`] removes everything of a launch
//! that did not finish. [`make_disk`] makes an instance disk (restore uses
//! it too).

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use tracing::instrument;

use crate::catalog::instances::{self, InstanceRow, NewInstance};
use crate::catalog::{self, DiskMode, ImageRow};
use crate::depot::access::{restriction_of, Op};
use crate::depot::Depot;
use crate::error::{Error, Result};
use crate::ids::random_hex;
use crate::image::bases::{self, base_flock};
use crate::image::export::ExportFormat;
use crate::launch::accel::{choose_accel, Accel};
use crate::launch::firmware::{check_ovmf, choose_firmware, Firmware, FIRMWARE_TAG};
use crate::launch::handle::Instance;
use crate::launch::instance::{forwards_json, LaunchOptions, Launched, SSH_USER_TAG};
use crate::launch::names::{check_hostname, check_name, hostname_from};
use crate::launch::paths::{path_str, Paths};
use crate::launch::process::{spawn_detached, stop_qemu, Spawned};
use crate::launch::qemu::{self, Forward};
use crate::launch::seed::{self, write_seed, Seed};
use crate::progress::Progress;
use crate::repo::Repo;

/// Checks what a launch asks for before anything is made; returns the
/// names of its instances (`opts.name`, or the image's name with a random
/// suffix; NAME-1 … NAME-N for several).
fn checked_names(opts: &LaunchOptions, image_name: &str) -> Result<Vec<String>> {
    if !(1..=qemu::MAX_COUNT).contains(&opts.count) {
        return Err(Error::Usage(format!(
            "--count {}: launch 1 to {} instances at once",
            opts.count,
            qemu::MAX_COUNT
        )));
    }
    if !(1..=qemu::MAX_CPUS).contains(&opts.cpus) {
        return Err(Error::Usage(format!(
            "--cpus {}: use 1 to {}",
            opts.cpus,
            qemu::MAX_CPUS
        )));
    }
    qemu::check_memory(opts.memory_mib)?;
    for f in &opts.forwards {
        f.check_free()?;
    }
    if opts.count > 1 && !opts.forwards.is_empty() {
        return Err(Error::Usage(
            "--forward with --count > 1: every instance would need the same host port; \
             launch them one by one"
                .into(),
        ));
    }
    let base_name = match &opts.name {
        Some(n) => n.clone(),
        None => format!("{image_name}-{}", random_hex(2)),
    };
    let names: Vec<String> = if opts.count == 1 {
        vec![base_name]
    } else {
        (1..=opts.count)
            .map(|i| format!("{base_name}-{i}"))
            .collect()
    };
    for n in &names {
        check_name(n)?;
    }
    seed::check_sizes(opts.user_data.as_deref(), &opts.ssh_keys)?;
    if let Some(h) = &opts.hostname {
        check_hostname(h)?;
    }
    Ok(names)
}

/// The hostname of the `i`-th (from 0) instance of a launch, named `name`.
fn hostname_for(opts: &LaunchOptions, i: usize, name: &str) -> String {
    match &opts.hostname {
        Some(h) if opts.count == 1 => h.clone(),
        Some(h) => format!("{h}-{}", i + 1),
        None => hostname_from(name),
    }
}

/// The forwards of one instance: the requested ones, and unless asked not
/// to (or a forward to guest port 22 is requested) a free host port to
/// guest port 22, distinct from the ports in `taken` (the kernel may hand
/// the same free port out twice within one launch).
fn launch_forwards(opts: &LaunchOptions, taken: &mut HashSet<u16>) -> Result<Vec<Forward>> {
    let mut forwards = opts.forwards.clone();
    if opts.ssh_forward && !forwards.iter().any(|f| f.guest == 22) {
        let mut port = qemu::free_port()?;
        while !taken.insert(port) {
            port = qemu::free_port()?;
        }
        forwards.insert(
            0,
            Forward {
                addr: "127.0.0.1".into(),
                host: port,
                guest: 22,
            },
        );
    }
    Ok(forwards)
}

impl Depot {
    /// Launches `opts.count` instances of an image: one shared raw base
    /// (made once), a qcow2 overlay (or private copy) and a NoCloud seed per
    /// instance, QEMU started detached. On any error nothing of this launch
    /// is left behind.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn launch(&self, opts: &LaunchOptions, progress: &dyn Progress) -> Result<Launched> {
        let qemu_bin = qemu::qemu_binary()?;
        let lazy = opts.disk == DiskMode::Lazy;
        let (img, _) = self.usable_for(&opts.image, Op::Launch, lazy)?;
        let names = checked_names(opts, &img.name)?;
        let tags = catalog::images::tags_of(&self.repo.conn, img.id.as_str())?;
        let firmware = choose_firmware(
            opts.firmware,
            &img.name,
            tags.get(FIRMWARE_TAG).map(String::as_str),
        )?;
        if firmware == Firmware::Uefi {
            check_ovmf()?;
        }
        let (accel, notice) =
            choose_accel(&qemu_bin, opts.accel, self.root(), self.perms().file())?;
        for d in ["instances", "bases"] {
            self.perms().mkdir_all(&self.root().join(d))?;
        }
        let mut guard = LaunchGuard {
            depot: self,
            ids: Vec::new(),
            locks: Vec::new(),
        };
        let base = self.enter_instances(&img, opts, &names, firmware, &mut guard, progress)?;
        let mut ports_taken = HashSet::new();
        for id in &guard.ids {
            self.prepare_instance(id, &img, base.as_deref(), opts, &mut ports_taken, progress)?;
        }
        if !opts.no_start {
            self.start_all(&guard.ids, &qemu_bin, accel)?;
        }
        let instances = guard
            .ids
            .iter()
            .map(|id| {
                let info = self.instance(id)?;
                Ok(Instance::new(self, info, opts.ephemeral))
            })
            .collect::<Result<_>>()?;
        guard.ids.clear();
        Ok(Launched { instances, notice })
    }

    /// Makes the directories of the launch's instances (their locks taken,
    /// both recorded in `guard`), enters their rows as `pending`, and makes
    /// the shared base of an overlay launch: all under the base's lock, so
    /// that gc sees the base is in use before it could evict it. Returns
    /// the base. The instances boot `firmware`.
    fn enter_instances(
        &self,
        img: &ImageRow,
        opts: &LaunchOptions,
        names: &[String],
        firmware: Firmware,
        guard: &mut LaunchGuard<'_>,
        progress: &dyn Progress,
    ) -> Result<Option<PathBuf>> {
        let _base_lock = base_flock(&self.repo, img.id.as_str(), FlockArg::LockExclusive)?;
        for _ in names {
            let id = format!("ins-{}", random_hex(8));
            let p = Paths::new(self.root(), &id);
            self.perms().mkdir_all(&p.dir)?;
            let lock = self.perms().flock(&p.lock(), FlockArg::LockExclusive)?;
            guard.locks.push(lock);
            guard.ids.push(id);
        }
        let now = catalog::now();
        let restricted_from = restriction_of(img, self.account());
        let owner_lease = match opts.ephemeral {
            true => Some(crate::proc::own_lease().ok_or_else(|| {
                Error::Invalid(
                    "an ephemeral launch needs /proc (to record its owner process)".into(),
                )
            })?),
            false => None,
        };
        let ssh_user =
            catalog::images::tags_of(&self.repo.conn, img.id.as_str())?.remove(SSH_USER_TAG);
        let rows: Vec<NewInstance<'_>> = guard
            .ids
            .iter()
            .zip(names)
            .enumerate()
            .map(|(i, (id, name))| NewInstance {
                id,
                name,
                image: img.id.as_str(),
                image_name: &img.name,
                owner: self.account(),
                disk: opts.disk,
                cpus: opts.cpus,
                memory_mib: opts.memory_mib,
                accel: opts.accel.as_str(),
                hostname: hostname_for(opts, i, name),
                created_at: now,
                restricted_from: &restricted_from,
                owner_lease: owner_lease.as_deref(),
                ssh_user: ssh_user.as_deref(),
                firmware: firmware.as_str(),
            })
            .collect();
        instances::insert_pending(&self.repo.conn, &rows)?;
        match opts.disk {
            DiskMode::Overlay => Ok(Some(bases::ensure_base(&self.repo, img, progress)?)),
            DiskMode::Lazy | DiskMode::Copy => Ok(None),
        }
    }

    /// Makes one entered instance ready to start: its disk, its seed and
    /// its forwards (host ports already given to this launch's instances
    /// in `ports_taken`); it is `stopped` then.
    fn prepare_instance(
        &self,
        id: &str,
        img: &ImageRow,
        base: Option<&Path>,
        opts: &LaunchOptions,
        ports_taken: &mut HashSet<u16>,
        progress: &dyn Progress,
    ) -> Result<()> {
        let row = self.row(id)?;
        let p = Paths::new(self.root(), id);
        for f in [p.files().qmp, p.files().console] {
            qemu::check_socket_path(&f)?;
        }
        make_disk(
            &self.repo,
            img,
            opts.disk,
            base,
            &p.disk(opts.disk),
            progress,
        )?;
        // (a UEFI instance's variable store from the start: repair knows
        // its firmware by it, started or not)
        crate::launch::process::prepare_firmware(&p, &row, self.perms())?;
        let mut keys = opts.ssh_keys.clone();
        if opts.depot_key && opts.user_data.is_none() {
            match self.ssh_public_key() {
                Ok(k) => keys.push(k),
                Err(e) => tracing::warn!("the guest gets no key of the depot's: {e}"),
            }
        }
        let seed = Seed::new(id, &row.hostname, opts.user_data.clone(), &keys);
        write_seed(&p.seed(), &seed, self.perms().file())?;
        let forwards = launch_forwards(opts, ports_taken)?;
        let ssh = forwards.iter().find(|f| f.guest == 22).map(|f| f.host);
        instances::set_prepared(&self.repo.conn, id, &forwards_json(&forwards), ssh)
    }

    /// Starts the instances `ids`, then waits for them all (QEMU start-up
    /// overlaps); the first failure is the error.
    fn start_all(&self, ids: &[String], qemu_bin: &Path, accel: Accel) -> Result<()> {
        let rows: Vec<InstanceRow> = ids.iter().map(|id| self.row(id)).collect::<Result<_>>()?;
        let started: Vec<Result<Spawned>> = rows
            .iter()
            .map(|r| {
                let p = Paths::new(self.root(), &r.id);
                spawn_detached(&p, qemu_bin, r, accel, &self.repo)
            })
            .collect();
        let mut first_err = None;
        for (r, c) in rows.iter().zip(started) {
            if let Err(e) = c.and_then(|c| self.finish_start(r, c, accel)) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Removes the rows and directories (killing any QEMU) of a launch that did
/// not finish: the instances in `ids` when it drops.
struct LaunchGuard<'a> {
    depot: &'a Depot,
    ids: Vec<String>,
    locks: Vec<Flock<File>>,
}

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let p = Paths::new(self.depot.root(), id);
            if let Some(pid) = crate::proc::read_pidfile(&p.files().pidfile) {
                if crate::proc::pid_alive(pid, id) {
                    stop_qemu(&p, pid, id, true, Duration::ZERO);
                }
            }
            let _ = instances::delete_instance(&self.depot.repo.conn, id);
            let _ = crate::repo::orphans::remove_instance_dir(&p.dir);
        }
        self.locks.clear();
    }
}

/// An instance disk at `dest` of `mode`: a qcow2 overlay on `base` (made
/// by the caller), a lazy overlay (its header names the base file path
/// all the same, so the overlay says whose content it holds; QEMU is given
/// its backing at start), or a private sparse raw copy of the image.
pub(crate) fn make_disk(
    repo: &Repo,
    img: &ImageRow,
    mode: DiskMode,
    base: Option<&Path>,
    dest: &Path,
    progress: &dyn Progress,
) -> Result<()> {
    let made = match (mode, base) {
        (DiskMode::Overlay, Some(b)) => crate::image::source::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(b)?,
            "-F",
            "raw",
            path_str(dest)?,
        ])
        .map(drop),
        (DiskMode::Lazy, _) => {
            let b = bases::base_path(repo.root(), img.id.as_str());
            crate::image::source::qemu_img(&[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-b",
                path_str(&b)?,
                "-F",
                "raw",
                path_str(dest)?,
                &img.virtual_size.to_string(),
            ])
            .map(drop)
        }
        _ => return crate::image::export::export(repo, img, dest, ExportFormat::Raw, progress),
    };
    made?;
    // qemu-img creates it with its own idea of the mode (0640 under a
    // group depot's umask 007).
    repo.perms().fix(dest)
}
