//! QEMU processes of instances, below the catalog's view of them: the
//! [`VmConfig`] of an instance row, spawning QEMU detached
//! ([`spawn_detached`], [`wait_detached`]), stopping it ([`stop_qemu`]),
//! the files of a run (cleaned before a start, given the depot's modes
//! after), the first words of QEMU's complaints, and the power button a
//! signal handler presses ([`press_power_button`]).

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::catalog::instances::InstanceRow;
use crate::catalog::DiskMode;
use crate::error::{Error, IoContext, Result};
use crate::launch::accel::{kvm_internal_error, Accel};
use crate::launch::instance::forwards_of;
use crate::launch::owned::{spawn_owned, OwnedChild};
use crate::launch::paths::Paths;
use crate::launch::qemu::{DiskSpec, VmConfig, VmFiles, CONSOLE_CHARDEV};
use crate::launch::qmp::{Qmp, RunState};
use crate::perms::Perms;

/// What QEMU is asked to run for the instance `r` (files under `p`); a
/// lazy disk is read from the image's disk server, or with `foreground`
/// from this process's own server on the instance's `disk.sock`.
pub(crate) fn vm_config(p: &Paths, r: &InstanceRow, accel: Accel, foreground: bool) -> VmConfig {
    let path = p.disk(r.disk);
    let disk = match r.disk {
        DiskMode::Lazy => DiskSpec::Lazy {
            overlay: path,
            socket: if foreground {
                p.disk_sock()
            } else {
                crate::image::serve::server_files(p.root(), &r.image).sock
            },
            export: r.id.clone(),
        },
        DiskMode::Overlay => DiskSpec::File {
            path,
            format: "qcow2",
        },
        DiskMode::Copy => DiskSpec::File {
            path,
            format: "raw",
        },
    };
    VmConfig {
        tag: r.id.clone(),
        accel,
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        disk,
        seed: Some(p.seed()),
        forwards: forwards_of(r),
        files: p.files(),
        efivars: (r.firmware == "uefi").then(|| p.efivars()),
    }
}

/// Gives a UEFI instance its variable store if it has none yet (made at
/// its first start, or again after it was removed: the guest then finds
/// its boot loader on its disk's EFI system partition).
pub(crate) fn prepare_firmware(p: &Paths, r: &InstanceRow, perms: Perms) -> Result<()> {
    match r.firmware.as_str() {
        "uefi" => crate::launch::firmware::ensure_vars(&p.efivars(), perms),
        _ => Ok(()),
    }
}

/// Sockets and pid file of an earlier run (QEMU refuses a stale socket
/// path only sometimes; a stale pid file misleads), and a pause lease,
/// which names a pause of the QEMU that is gone.
pub(crate) fn clean_runtime_files(p: &Paths) {
    let f = p.files();
    for path in [&f.qmp, &f.console, &f.pidfile, &p.pause(), &p.disk_sock()] {
        let _ = fs::remove_file(path);
    }
}

/// Notes where QEMU's next run begins in the serial log (its length now),
/// in `serial.start`: serial waits read from there, not the runs before.
pub(crate) fn mark_serial_start(p: &Paths, perms: Perms) {
    let f = p.files();
    let len = fs::metadata(&f.serial_log).map_or(0, |m| m.len());
    let mark = p.dir.join("serial.start");
    let tmp = p.dir.join("serial.start.tmp");
    if let Err(e) = perms.replace_file(&mark, &tmp, len.to_string().as_bytes()) {
        tracing::warn!("{}: {e}", mark.display());
    }
}

/// Where the current run begins in the serial log `log` (see
/// [`mark_serial_start`]); 0 if not noted.
pub(crate) fn serial_start(log: &Path) -> u64 {
    let mark = log.with_file_name("serial.start");
    fs::read_to_string(mark)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Gives the files QEMU made (sockets, serial log, pid file) the depot's
/// file mode: QEMU makes sockets 0777 & !umask, and a daemonized QEMU sets
/// its umask to 027 before it opens them. (The instance directory is 0700
/// or 2770 in any case.)
pub(crate) fn fix_runtime_modes(perms: Perms, f: &VmFiles) {
    for p in [&f.qmp, &f.console, &f.serial_log, &f.pidfile] {
        if let Err(e) = perms.fix(p) {
            tracing::warn!("{e}");
        }
    }
}

/// A QEMU started for an instance, and for a lazy disk the users lease of
/// its image's disk server, held until QEMU is up (connected to it).
pub(crate) struct Spawned {
    qemu: Started,
    pub(crate) _lease: Option<crate::launch::disk::UsersLease>,
}

/// How a QEMU was started.
enum Started {
    /// With `-daemonize`: the child returns once the VM is set up.
    Daemonizing(Child),
    /// An ephemeral instance's, by the process that owns it: a child of
    /// this process that dies with it ([`super::owned`]), its messages in
    /// `qemu.log`.
    Owned(OwnedChild, QemuLog),
}

/// Starts QEMU for the instance `r`: detached (`-daemonize`), or for an
/// ephemeral instance that this process owns, as its child that dies with
/// it. A lazy disk's server is made sure of first (`launch::disk`).
pub(crate) fn spawn_detached(
    p: &Paths,
    qemu_bin: &Path,
    r: &InstanceRow,
    accel: Accel,
    repo: &crate::repo::Repo,
) -> Result<Spawned> {
    let cfg = vm_config(p, r, accel, false);
    prepare_firmware(p, r, repo.perms)?;
    clean_runtime_files(p);
    mark_serial_start(p, repo.perms);
    let lease = match r.disk {
        DiskMode::Lazy => {
            // This run's counts start from zero.
            let _ = fs::remove_file(crate::image::serve::stats_path(&p.dir));
            Some(crate::launch::disk::ensure_server(repo, &r.image)?)
        }
        _ => None,
    };
    let mut cmd = Command::new(qemu_bin);
    cmd.args(cfg.args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0);
    let mine = r.owner_lease.is_some() && r.owner_lease == crate::proc::own_lease();
    let qemu = if mine {
        let (log, log_file) = QemuLog::open(p, repo.perms)?;
        cmd.stderr(log_file);
        Started::Owned(spawn_owned(cmd).at(qemu_bin)?, log)
    } else {
        cmd.arg("-daemonize").stderr(Stdio::piped());
        Started::Daemonizing(cmd.spawn().at(qemu_bin)?)
    };
    Ok(Spawned {
        qemu,
        _lease: lease,
    })
}

/// Waits for a detached start: QEMU's pid once the VM runs (under KVM,
/// once it survived [`watch_accel`]), or the message to record as the
/// instance's error (QEMU's own words). An I/O error waiting is an error.
pub(crate) fn wait_detached(
    p: &Paths,
    id: &str,
    spawned: Spawned,
    accel: Accel,
) -> Result<std::result::Result<i32, String>> {
    let files = p.files();
    let kvm_hint = |mut msg: String| {
        if accel == Accel::Kvm {
            msg.push_str(" (KVM may not work on this host: try --accel tcg or auto)");
        }
        msg
    };
    let (pid, qmp) = match spawned.qemu {
        Started::Daemonizing(child) => {
            let out = child.wait_with_output().at(&files.pidfile)?;
            match (
                out.status.success(),
                crate::proc::read_pidfile(&files.pidfile),
            ) {
                (true, Some(pid)) => (pid, None),
                _ => {
                    let msg = first_lines(&out.stderr)
                        .unwrap_or_else(|| format!("QEMU exited with {}", out.status));
                    return Ok(Err(kvm_hint(msg)));
                }
            }
        }
        Started::Owned(child, log) => {
            let pid = child.pid() as i32;
            // It runs once it answers on QMP.
            match Qmp::connect_until(&files.qmp, Duration::from_secs(30), || child.exited()) {
                Ok(q) => (pid, Some(q)),
                Err(e) => {
                    kill(pid);
                    let msg = log
                        .said()
                        .unwrap_or_else(|| format!("QEMU did not start: {e}"));
                    return Ok(Err(kvm_hint(msg)));
                }
            }
        }
    };
    if accel != Accel::Kvm {
        return Ok(Ok(pid));
    }
    let watched = match qmp {
        Some(q) => Ok(q),
        None => Qmp::connect_retry(&files.qmp, Duration::from_secs(10)),
    }
    .and_then(|mut q| watch_accel(&mut q, accel));
    Ok(watched.map(|_| pid).map_err(|e| {
        stop_qemu(p, pid, id, true, Duration::ZERO);
        e.to_string()
    }))
}

/// SIGKILL to `pid`.
fn kill(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// QEMU's messages of a start that does not daemonize (foreground, ephemeral): a file (a pipe nobody reads
/// would block a long-running QEMU once full), appended to.
pub(crate) struct QemuLog {
    path: PathBuf,
    /// Its length before this start.
    start: u64,
}

impl QemuLog {
    /// Opens the instance's `qemu.log` for QEMU's stderr.
    pub(crate) fn open(p: &Paths, perms: Perms) -> Result<(QemuLog, File)> {
        let path = p.qemu_log();
        let file = perms
            .open_options()
            .create(true)
            .append(true)
            .open(&path)
            .at(&path)?;
        let start = file.metadata().at(&path)?.len();
        Ok((QemuLog { path, start }, file))
    }

    /// The first lines QEMU wrote during this start, if any.
    pub(crate) fn said(&self) -> Option<String> {
        let said = fs::read(&self.path).unwrap_or_default();
        first_lines(said.get(self.start as usize..).unwrap_or_default())
    }
}

/// The first lines of QEMU's stderr, joined.
pub(crate) fn first_lines(stderr: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("qemu-system-x86_64: "))
        .take(3)
        .collect();
    (!lines.is_empty()).then(|| lines.join("; "))
}

/// Under KVM, watches the first moments of the guest
/// ([`kvm_internal_error`]): a guest KVM cannot run is an error saying so.
pub(crate) fn watch_accel(q: &mut Qmp, accel: Accel) -> Result<()> {
    if accel == Accel::Kvm && kvm_internal_error(q)? {
        return Err(Error::Tool {
            tool: "qemu-system-x86_64".into(),
            detail: "the guest died with a KVM internal error: KVM does not work on this \
                     host; use --accel tcg (or auto)"
                .into(),
        });
    }
    Ok(())
}

/// Presses the power button through QMP, resuming a paused guest first
/// (it could not see the press); true if the press went through.
fn press_resuming(qmp: &Path, id: &str) -> bool {
    let pressed = Qmp::connect(qmp).and_then(|mut q| {
        if q.run_state()? == RunState::Paused {
            tracing::info!("instance {id} is paused: resuming it to press its power button");
            q.resume()?;
        }
        q.powerdown()
    });
    pressed.is_ok()
}

/// Waits until the QEMU `pid` of instance `id` is gone, or `deadline`,
/// looking every `poll`.
fn wait_gone(pid: i32, id: &str, deadline: Instant, poll: Duration) {
    while Instant::now() < deadline && crate::proc::pid_alive(pid, id) {
        std::thread::sleep(poll);
    }
}

/// How [`stop_qemu`] ended a QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The guest powered off (or QEMU was already gone).
    PoweredOff,
    /// Killed at once, as asked (`force`).
    Forced,
    /// The power button was pressed, but QEMU still ran at the timeout:
    /// killed.
    IgnoredButton,
    /// QMP did not take the press (no answer): killed.
    NoQmp,
}

/// Powers a QEMU off (or, with `force` or after `timeout`, kills it) and
/// waits until it is gone; says how it ended. The caller holds the
/// instance lock, so no live capture pauses the guest meanwhile.
pub(crate) fn stop_qemu(p: &Paths, pid: i32, id: &str, force: bool, timeout: Duration) -> Stopped {
    let deadline = Instant::now() + timeout;
    let pressed = !force && press_resuming(&p.files().qmp, id);
    if pressed {
        wait_gone(pid, id, deadline, Duration::from_millis(50));
    }
    let mut how = Stopped::PoweredOff;
    if crate::proc::pid_alive(pid, id) {
        how = match (force, pressed) {
            (true, _) => Stopped::Forced,
            (false, true) => Stopped::IgnoredButton,
            (false, false) => Stopped::NoQmp,
        };
        kill(pid);
        let end = Instant::now() + Duration::from_secs(10);
        wait_gone(pid, id, end, Duration::from_millis(10));
    }
    clean_runtime_files(p);
    how
}

/// Whether a client (another `vmdepot instance console`, a harness) is
/// attached to the serial console of the QEMU behind `qmp`: QEMU serves one
/// at a time, and a second one would wait, connected but dead, until the
/// first detaches. False if QMP does not say.
pub fn console_attached(qmp: &Path) -> bool {
    Qmp::connect_timeout(qmp, crate::launch::instance::QMP_STATUS_TIMEOUT)
        .and_then(|mut q| q.chardev_connected(CONSOLE_CHARDEV))
        .is_ok_and(|c| c == Some(true))
}

/// Presses the power button of the QEMU behind `qmp` (signal handlers).
/// A paused guest is resumed first unless a live capture (holding the
/// instance's lock) is pausing it: it resumes the guest itself, which then
/// sees the press.
pub fn press_power_button(qmp: &Path) -> Result<()> {
    let mut q = Qmp::connect(qmp)?;
    if q.run_state()? == RunState::Paused {
        let p = Paths::in_dir(qmp.parent().unwrap_or(Path::new(".")).to_owned());
        // The lock file exists (the instance's launch made it): opened, not
        // created, since this process may not know the depot's modes.
        if let Ok(f) = File::open(p.lock()) {
            if let Ok(_lock) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                q.resume()?;
                let _ = fs::remove_file(p.pause());
            }
        }
    }
    q.powerdown()
}
