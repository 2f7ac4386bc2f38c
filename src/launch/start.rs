//! Starting an instance that exists: detached ([`Depot::start_instance`])
//! or with QEMU as a child of this process ([`Depot::start_foreground`],
//! for systemd units), and [`Foreground`], the handle on such a child.
//! Both take the instance's lock, refuse a running instance, choose the
//! accelerator, make sure the host ports are free and that an overlay's
//! launch base checks out, and record `running` or `failed` (with QEMU's
//! own words).

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::fcntl::FlockArg;
use tracing::instrument;

use crate::catalog::instances::{self, InstanceRow};
use crate::catalog::{self, DiskMode, InstanceState};
use crate::depot::Depot;
use crate::error::{Error, IoContext, Result};
use crate::image::bases::{self, base_flock, base_path};
use crate::launch::accel::{choose_accel, Accel};
use crate::launch::disk::InProcess;
use crate::launch::instance::{forwards_json, forwards_of, Held, InstanceInfo};
use crate::launch::paths::Paths;
use crate::launch::process::{
    clean_runtime_files, fix_runtime_modes, prepare_firmware, spawn_detached, vm_config,
    wait_detached, watch_accel, QemuLog, Spawned,
};
use crate::launch::qemu;
use crate::launch::qmp::Qmp;
use crate::progress::NoProgress;

/// An instance ready to start (see `Depot::prepare_start`).
struct Starting {
    held: Held,
    qemu_bin: PathBuf,
    accel: Accel,
    notice: Option<String>,
}

/// The error of an instance that did not start, with QEMU's words `msg`.
fn start_error(r: &InstanceRow, msg: &str) -> Error {
    Error::QemuFailed {
        instance: format!("{} ({})", r.name, r.id),
        detail: msg.to_owned(),
    }
}

impl Depot {
    /// What every start does first: hold the instance, refuse if it runs,
    /// choose the accelerator, make sure its host ports are free.
    fn prepare_start(&self, reference: &str) -> Result<Starting> {
        let qemu_bin = qemu::qemu_binary()?;
        let mut h = self.hold(reference)?;
        if h.r.state == InstanceState::Running {
            return Err(Error::Invalid(format!(
                "instance {} ({}) is already running",
                h.r.name, h.r.id
            )));
        }
        let (accel, notice) = choose_accel(
            &qemu_bin,
            Accel::parse(&h.r.accel)?,
            self.root(),
            self.perms().file(),
        )?;
        if h.r.firmware == "uefi" {
            crate::launch::firmware::check_ovmf()?;
        }
        self.refresh_forwards(&mut h.r)?;
        if h.r.disk == DiskMode::Overlay {
            self.check_start_base(&h.r)?;
        }
        Ok(Starting {
            held: h,
            qemu_bin,
            accel,
            notice,
        })
    }

    /// The base of a stopped overlay instance about to start, checked like a
    /// launch's (under the base's lock: [`bases::ensure_base`], rebuilt if
    /// bad and no running QEMU has it open), so a base a power cut emptied
    /// is never booted. A base whose image was deleted cannot be rebuilt:
    /// any problem with it ([`Depot::deleted_base_problem`]) refuses the
    /// start.
    fn check_start_base(&self, r: &InstanceRow) -> Result<()> {
        let _base_lock = base_flock(&self.repo, &r.image, FlockArg::LockExclusive)?;
        let img = catalog::find_images(&self.repo.conn, &r.image)?
            .into_iter()
            .find(|i| i.id.as_str() == r.image);
        if let Some(img) = img {
            bases::ensure_base(&self.repo, &img, &NoProgress)?;
            return Ok(());
        }
        match self.deleted_base_problem(&r.image)? {
            Some(why) => Err(Error::StoreDamaged(format!(
                "instance {} ({}) cannot start: {why} (its image is deleted, so \
                 the base cannot be rebuilt)",
                r.name, r.id
            ))),
            None => Ok(()),
        }
    }

    /// What is wrong with the launch base of the deleted image `image`
    /// (a missing base included), if anything.
    fn deleted_base_problem(&self, image: &str) -> Result<Option<String>> {
        let p = base_path(self.root(), image);
        if !p.exists() {
            return Ok(Some(format!(
                "launch base {} of deleted image {image} is missing",
                p.display()
            )));
        }
        bases::base_problem(&self.repo, image, None, false, &NoProgress)
    }

    /// Re-picks a free host port for an automatic SSH forward whose port was
    /// taken meanwhile (and records it); a user's own forward must be free.
    fn refresh_forwards(&self, r: &mut InstanceRow) -> Result<()> {
        let mut forwards = forwards_of(r);
        let mut changed = false;
        for f in forwards.iter_mut() {
            let automatic = f.guest == 22 && Some(f.host) == r.ssh_port && f.addr == "127.0.0.1";
            match f.check_free() {
                Err(_) if automatic => {
                    f.host = qemu::free_port()?;
                    changed = true;
                }
                r => r?,
            }
        }
        if changed {
            r.ssh_port = forwards.iter().find(|f| f.guest == 22).map(|f| f.host);
            r.forwards = forwards_json(&forwards);
            instances::set_forwards(&self.repo.conn, &r.id, &r.forwards, r.ssh_port)?;
        }
        Ok(())
    }

    /// Starts a stopped (or failed) instance, detached. Returns it, and a
    /// notice for the user (why TCG instead of KVM).
    #[instrument(skip_all, err(level = "debug"))]
    pub fn start_instance(&self, reference: &str) -> Result<(InstanceInfo, Option<String>)> {
        let s = self.prepare_start(reference)?;
        let Held { r, p, .. } = &s.held;
        let child = spawn_detached(p, &s.qemu_bin, r, s.accel, &self.repo)?;
        self.finish_start(r, child, s.accel)?;
        Ok((self.instance(&r.id)?, s.notice))
    }

    /// Waits for a detached start; records `running` (or `failed`, with
    /// QEMU's own words, which the error repeats).
    pub(crate) fn finish_start(&self, r: &InstanceRow, child: Spawned, accel: Accel) -> Result<()> {
        let p = Paths::new(self.root(), &r.id);
        match wait_detached(&p, &r.id, child, accel)? {
            Ok(pid) => {
                fix_runtime_modes(self.perms(), &p.files());
                instances::set_running(&self.repo.conn, &r.id, pid, accel.as_str())
            }
            Err(msg) => {
                instances::set_failed(&self.repo.conn, &r.id, &msg)?;
                Err(start_error(r, &msg))
            }
        }
    }

    /// Starts a stopped instance with QEMU as a child of this process (for
    /// systemd units and `--foreground`). QEMU's messages go to the
    /// instance's `qemu.log`; a start that fails records and returns them.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn start_foreground(&self, reference: &str) -> Result<(Foreground, Option<String>)> {
        let Starting {
            held: Held { r, p, _lock },
            qemu_bin,
            accel,
            notice,
        } = self.prepare_start(reference)?;
        let cfg = vm_config(&p, &r, accel, true);
        prepare_firmware(&p, &r, self.perms())?;
        clean_runtime_files(&p);
        crate::launch::process::mark_serial_start(&p, self.perms());
        let disk_server = match r.disk {
            DiskMode::Lazy => {
                // This run's counts start from zero.
                let _ = fs::remove_file(crate::image::serve::stats_path(&p.dir));
                Some(InProcess::start(
                    &self.repo,
                    &r.image,
                    &r.id,
                    &p.disk_sock(),
                )?)
            }
            _ => None,
        };
        let (log, log_file) = QemuLog::open(&p, self.perms())?;
        let mut child = Command::new(&qemu_bin)
            .args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .process_group(0)
            .spawn()
            .at(&qemu_bin)?;
        let pid = child.id() as i32;
        // QEMU is up when its QMP socket answers.
        let up = Qmp::connect_retry(&cfg.files.qmp, Duration::from_secs(30));
        if let Err(e) = up.and_then(|mut q| watch_accel(&mut q, accel)) {
            let _ = child.kill();
            let _ = child.wait();
            let msg = log.said().unwrap_or_else(|| e.to_string());
            instances::set_failed(&self.repo.conn, &r.id, &msg)?;
            return Err(start_error(&r, &msg));
        }
        fix_runtime_modes(self.perms(), &cfg.files);
        instances::set_running(&self.repo.conn, &r.id, pid, accel.as_str())?;
        let fg = Foreground {
            root: self.root().to_owned(),
            id: r.id,
            qmp: cfg.files.qmp,
            child,
            _disk_server: disk_server,
        };
        Ok((fg, notice))
    }
}

/// QEMU running as a child of this process.
pub struct Foreground {
    root: PathBuf,
    id: String,
    qmp: PathBuf,
    child: Child,
    /// A lazy disk's server, a thread of this process (one process tree
    /// for a systemd unit); it stops after QEMU.
    _disk_server: Option<InProcess>,
}

impl Foreground {
    /// QEMU's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The instance's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The QMP socket (to press the power button from a signal handler).
    pub fn qmp_socket(&self) -> &Path {
        &self.qmp
    }

    /// Waits for QEMU to exit; records `stopped`. Returns QEMU's exit code.
    pub fn wait(mut self) -> Result<i32> {
        let st = self.child.wait().at(&self.qmp)?;
        let depot = Depot::open(&self.root)?;
        let pid = Some(self.child.id() as i32);
        instances::set_stopped(&depot.repo.conn, &self.id, pid)?;
        clean_runtime_files(&Paths::new(&self.root, &self.id));
        Ok(st.code().unwrap_or(1))
    }
}
