//! Instances: QEMU virtual machines started from images, as the depot
//! shows them.
//!
//! Main items: [`LaunchOptions`] (what [`Depot::launch`] takes),
//! [`Launched`], [`InstanceInfo`] (what `instance show` prints),
//! [`Depot::instance`] and [`Depot::list_instances`], and `Held`, an
//! instance locked for a change of state. The rest of the launch layer
//! does the changes: `create` (launch), `start` (start, foreground start:
//! [`Foreground`]), `control` (stop, restart, delete), `process` (QEMU
//! processes), `pause` (the pause lease), `unit` (systemd units) and
//! `handle` ([`Instance`], the handle a test harness holds).
//!
//! **State is true**: a row says `running` only while its QEMU lives; every
//! read of an instance checks the pid (and that the pid is our QEMU) and
//! records a death as `stopped`; a running guest is shown `paused` when QMP
//! `query-status` says so, and a pause whose owner died is ended by
//! whichever command looks at the instance next.

use std::fmt;
use std::fs::File;
use std::path::PathBuf;
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tracing::instrument;

pub use super::handle::{Instance, SerialLines};
pub use super::process::{console_attached, press_power_button};
pub use super::start::Foreground;
pub use crate::catalog::DiskMode;

use super::paths::Paths;
use super::pause::end_orphaned_pause;
use crate::catalog;
use crate::catalog::instances::{self, InstanceRow};
use crate::depot::display::non_empty;
use crate::depot::{Depot, Timestamp};
use crate::error::{Error, Result};
use crate::launch::firmware::Firmware;
use crate::launch::qemu::{Accel, Forward};
use crate::launch::qmp::{Qmp, RunState};

/// What `instance run` asks for.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Image id or name.
    pub image: String,
    /// Instance name; with `count` > 1 the instances are NAME-1 … NAME-N.
    /// Default: the image's name plus a short random suffix.
    pub name: Option<String>,
    /// How many instances (1 to [`MAX_COUNT`](crate::MAX_COUNT)).
    pub count: u32,
    /// Virtual CPUs (1 to [`MAX_CPUS`](crate::MAX_CPUS)).
    pub cpus: u32,
    /// Guest memory in MiB (at least [`MIN_MEMORY_MIB`](crate::MIN_MEMORY_MIB)).
    pub memory_mib: u64,
    /// How each instance's disk is made (default: lazy).
    pub disk: DiskMode,
    /// The accelerator (default: auto).
    pub accel: Accel,
    /// The firmware (default: auto, from the image's `firmware` tag).
    pub firmware: Firmware,
    /// The guest's hostname (default: the instance name).
    pub hostname: Option<String>,
    /// Public keys (file contents) for the generated user-data.
    pub ssh_keys: Vec<String>,
    /// User-data document; replaces the generated one.
    pub user_data: Option<String>,
    /// Host ports to forward to guest ports (refused with a `count` over
    /// 1: every instance would need the same host port).
    pub forwards: Vec<Forward>,
    /// Forward a free host port to guest port 22 (shown as `ssh_port`).
    pub ssh_forward: bool,
    /// Also give the generated user-data the account's own public key
    /// ([`Depot::ssh_key`], made the first time), so that
    /// [`Depot::ssh_command`] logs in without a key of the caller's.
    pub depot_key: bool,
    /// Tie the instances to this process (harnesses): each is destroyed
    /// when its [`Instance`] handle drops, and its QEMU dies with this
    /// process however it ends (a child with a parent-death signal, not
    /// daemonized); what is left of it (row, directory) is removed by the
    /// next opening of the depot once this process is gone.
    pub ephemeral: bool,
    /// Create and prepare the instances but do not start them (the caller
    /// starts one in the foreground).
    pub no_start: bool,
}

impl LaunchOptions {
    /// One instance of `image`: 1 CPU, 512 MiB, a lazy disk (served by
    /// the `vmdepot` binary: `VMDEPOT_BIN`, this executable if it is
    /// `vmdepot`, one beside or above it, or the one on `PATH`), the
    /// accelerator chosen automatically, SSH forwarded.
    pub fn new(image: impl Into<String>) -> LaunchOptions {
        LaunchOptions {
            image: image.into(),
            name: None,
            count: 1,
            cpus: 1,
            memory_mib: 512,
            disk: DiskMode::Lazy,
            accel: Accel::Auto,
            firmware: Firmware::Auto,
            hostname: None,
            ssh_keys: Vec::new(),
            user_data: None,
            forwards: Vec::new(),
            ssh_forward: true,
            depot_key: true,
            ephemeral: false,
            no_start: false,
        }
    }
}

/// Where an instance is in its life, as users see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Its launch is making it (disks and seed not ready yet).
    Pending,
    /// Its QEMU lives and the guest runs.
    Running,
    /// Its QEMU lives and the guest's CPUs are stopped (QMP `stop`, a
    /// live capture, `instance pause`).
    Paused,
    /// Made, and no QEMU runs it.
    Stopped,
    /// Its launch was interrupted or its QEMU did not start
    /// ([`InstanceInfo::error`] says why).
    Failed,
}

impl InstanceState {
    /// `pending`, `running`, `paused`, `stopped` or `failed` (the JSON text).
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Paused => "paused",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
        }
    }

    /// Whether QEMU runs for the instance (running or paused).
    pub fn is_up(self) -> bool {
        matches!(self, InstanceState::Running | InstanceState::Paused)
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An instance as users see it (`instance show --json`).
#[derive(Clone, Debug, Serialize)]
pub struct InstanceInfo {
    /// Its id (`ins-…`).
    pub id: String,
    /// Its name (unique per account).
    pub name: String,
    /// Id of the image it was launched from.
    pub image: String,
    /// That image's name at launch.
    pub image_name: String,
    /// The account that owns it.
    pub owner: String,
    /// Where it is in its life, as the process table and QMP say now.
    pub state: InstanceState,
    /// What QMP `query-status` said (`running`, `paused`, `io-error`, …),
    /// when QEMU lives and answered.
    pub run_state: Option<String>,
    /// The accelerator of the last start (kvm or tcg), or the request
    /// before its first start.
    pub accel: Accel,
    /// QEMU's process id while it runs.
    pub pid: Option<i32>,
    /// The host port forwarded to the guest's SSH port (22), if any.
    pub ssh_port: Option<u16>,
    /// Host ports forwarded to guest ports.
    pub forwards: Vec<Forward>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory, in MiB.
    pub memory_mib: u64,
    /// How its disk is made.
    pub disk: DiskMode,
    /// The guest's hostname (in its seed).
    pub hostname: String,
    /// When it was launched.
    pub created_at: Timestamp,
    /// Its directory (`DEPOT/instances/ins-…`).
    pub dir: PathBuf,
    /// The guest's serial console output, as a file.
    pub serial_log: PathBuf,
    /// QEMU's QMP control socket.
    pub qmp_socket: PathBuf,
    /// The socket of the guest's serial console (`instance console`).
    pub console_socket: PathBuf,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// A lazy disk: bytes of stored image data its disk server served to
    /// it so far (zero blocks not counted); `None` for other disks.
    pub store_bytes_read: Option<u64>,
    /// A lazy disk of a remote image: bytes fetched from the remote for it;
    /// `None` otherwise.
    pub remote_bytes_fetched: Option<u64>,
    /// A lazy disk: the last read its disk server could not serve (the
    /// guest got an I/O error), if any; a remote that failed and came back
    /// is cleared by the next read from it.
    pub disk_error: Option<String>,
    /// The user to SSH in as: its image's `ssh-user` tag at launch.
    pub ssh_user: Option<String>,
    /// The firmware it boots with (`bios` or `uefi`), chosen at launch.
    pub firmware: Firmware,
    /// Whether it is ephemeral: tied to the process that launched it (see
    /// [`LaunchOptions::ephemeral`]).
    pub ephemeral: bool,
}

/// The image tag naming the user to SSH in as (`ssh-user=debian`): an
/// instance records it at launch, and `instance run` prints it in its
/// `ssh` command.
pub const SSH_USER_TAG: &str = "ssh-user";

/// Result of a launch.
pub struct Launched {
    /// The instances, in the order of their names (NAME-1 … NAME-N).
    pub instances: Vec<Instance>,
    /// A one-line notice for the user (e.g. why TCG instead of KVM).
    pub notice: Option<String>,
}

/// How long `stop` waits for the guest to power off before killing QEMU.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a status query waits for QMP (another client may have it).
pub const QMP_STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// An instance held for a change of state (see [`Depot::hold`]): its row
/// as it truly is, its paths, and its lock, held until this drops.
pub(crate) struct Held {
    pub(crate) r: InstanceRow,
    pub(crate) p: Paths,
    pub(crate) _lock: Flock<File>,
}

/// The forwards an instance row records (an unreadable list: none).
pub(crate) fn forwards_of(r: &InstanceRow) -> Vec<Forward> {
    serde_json::from_str(&r.forwards).unwrap_or_default()
}

/// Forwards as the catalog records them (a JSON list).
pub(crate) fn forwards_json(forwards: &[Forward]) -> String {
    serde_json::to_string(forwards).expect("forwards serialise")
}

impl Depot {
    /// This account's instance with this id or name, as the catalog says.
    pub(crate) fn row(&self, reference: &str) -> Result<InstanceRow> {
        instances::find_instance(&self.repo.conn, reference, self.account())?
            .ok_or_else(|| Error::InstanceNotFound(reference.to_owned()))
    }

    /// Re-reads a row and records a QEMU that died (or a launch that was
    /// interrupted): never a stale `running`.
    pub(crate) fn fresh_row(&self, reference: &str) -> Result<InstanceRow> {
        let r = self.row(reference)?;
        match r.state {
            catalog::InstanceState::Running
                if !r.pid.is_some_and(|p| crate::proc::pid_alive(p, &r.id)) =>
            {
                instances::set_stopped(&self.repo.conn, &r.id, r.pid)?;
            }
            catalog::InstanceState::Pending
                if !crate::repo::held(&Paths::new(self.root(), &r.id).lock()) =>
            {
                instances::fail_interrupted_launch(&self.repo.conn, &r.id)?;
            }
            _ => return Ok(r),
        }
        self.row(&r.id)
    }

    /// Takes the instance's lock (waiting for another state change) and
    /// reads its true state.
    pub(crate) fn hold(&self, reference: &str) -> Result<Held> {
        let id = self.row(reference)?.id;
        let p = Paths::new(self.root(), &id);
        let lock = self.perms().flock(&p.lock(), FlockArg::LockExclusive)?;
        let r = self.fresh_row(&id)?;
        if r.state == catalog::InstanceState::Running {
            // With the lock ours, a lease left here is a dead process's.
            end_orphaned_pause(&p);
        }
        Ok(Held { r, p, _lock: lock })
    }

    /// The guest's run state (QMP `query-status`) of a running instance,
    /// after ending a pause whose owner died: taking the instance's lock
    /// without waiting (a holder ends such a pause itself in `hold`, and a
    /// live capture holds it for as long as its pause lasts). `None` when
    /// QMP does not answer within [`QMP_STATUS_TIMEOUT`].
    fn run_state(&self, r: &InstanceRow) -> Option<RunState> {
        let p = Paths::new(self.root(), &r.id);
        if p.pause().exists() {
            if let Ok(_lock) = self
                .perms()
                .flock(&p.lock(), FlockArg::LockExclusiveNonblock)
            {
                end_orphaned_pause(&p);
            }
        }
        match Qmp::connect_timeout(&p.files().qmp, QMP_STATUS_TIMEOUT)
            .and_then(|mut q| q.run_state())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!("instance {}: no run state: {e}", r.id);
                None
            }
        }
    }

    /// What users see of a row (`run_state`: the guest's, if it runs).
    pub(crate) fn info(&self, r: InstanceRow, run_state: Option<RunState>) -> InstanceInfo {
        let p = Paths::new(self.root(), &r.id);
        let files = p.files();
        let paused =
            r.state == catalog::InstanceState::Running && run_state == Some(RunState::Paused);
        let stats = (r.disk == DiskMode::Lazy).then(|| crate::image::serve::read_stats(&p.dir));
        // (a remote image run lazily: fetched bytes are shown, 0 too)
        let partial = stats.is_some()
            && matches!(
                crate::catalog::partial::partial(&self.repo.conn, &r.image),
                Ok(Some(_))
            );
        let accel = match r.accel_used.as_str() {
            "" => &r.accel,
            used => used,
        };
        InstanceInfo {
            // (only `Accel::as_str` texts are stored)
            accel: Accel::parse(accel).unwrap_or(Accel::Auto),
            state: match r.state {
                catalog::InstanceState::Running if paused => InstanceState::Paused,
                catalog::InstanceState::Running => InstanceState::Running,
                catalog::InstanceState::Pending => InstanceState::Pending,
                catalog::InstanceState::Stopped => InstanceState::Stopped,
                catalog::InstanceState::Failed => InstanceState::Failed,
            },
            run_state: run_state.map(|s| s.as_str().to_owned()),
            forwards: forwards_of(&r),
            id: r.id,
            name: r.name,
            image: r.image,
            image_name: r.image_name,
            owner: r.owner,
            pid: r.pid,
            ssh_port: r.ssh_port,
            cpus: r.cpus,
            memory_mib: r.memory_mib,
            disk: r.disk,
            hostname: r.hostname,
            created_at: Timestamp::from_unix(r.created_at),
            dir: p.dir,
            serial_log: files.serial_log,
            qmp_socket: files.qmp,
            console_socket: files.console,
            error: non_empty(r.error),
            store_bytes_read: stats.as_ref().map(|s| s.store_bytes_read),
            remote_bytes_fetched: stats
                .as_ref()
                .filter(|s| s.remote_bytes_fetched > 0 || partial)
                .map(|s| s.remote_bytes_fetched),
            disk_error: stats.and_then(|s| non_empty(s.error)),
            ssh_user: r.ssh_user,
            // (only `bios` and `uefi` are stored: the column's CHECK)
            firmware: Firmware::parse(&r.firmware).unwrap_or(Firmware::Bios),
            ephemeral: r.owner_lease.is_some(),
        }
    }

    /// A handle on this account's existing instance `reference` (by id or
    /// name), to wait for its serial lines or write to its console. Not
    /// ephemeral: dropping it leaves the instance as it is.
    pub fn instance_handle(&self, reference: &str) -> Result<Instance> {
        let info = self.instance(reference)?;
        Ok(Instance::new(self, info, false))
    }

    /// One instance by id or name, with its true state.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn instance(&self, reference: &str) -> Result<InstanceInfo> {
        let r = self.fresh_row(reference)?;
        let run_state = match r.state {
            catalog::InstanceState::Running => self.run_state(&r),
            _ => None,
        };
        if r.state == catalog::InstanceState::Running && r.disk == DiskMode::Lazy {
            // Its disk server died: QEMU reconnects to a new one.
            let dir = Paths::new(self.root(), &r.id).dir;
            crate::launch::disk::restart_if_gone(&self.repo, &r.image, &dir);
        }
        Ok(self.info(r, run_state))
    }

    /// This account's instances, oldest first, with their true states.
    #[instrument(skip_all, err(level = "debug"))]
    pub fn list_instances(&self) -> Result<Vec<InstanceInfo>> {
        let ids = instances::instance_ids(&self.repo.conn, self.account())?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.instance(&id) {
                Ok(i) => out.push(i),
                Err(Error::InstanceNotFound(_)) => {} // deleted meanwhile
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON of `instance show --json`: typed fields serialize as the
    /// text the CLI always printed, absent ones as null.
    #[test]
    fn info_serializes_as_the_cli_prints_it() {
        let info = InstanceInfo {
            id: "ins-0123456789abcdef".into(),
            name: "web".into(),
            image: "img-0123456789abcdef".into(),
            image_name: "base".into(),
            owner: "alice".into(),
            state: InstanceState::Paused,
            run_state: Some("paused".into()),
            accel: Accel::Kvm,
            pid: Some(42),
            ssh_port: None,
            forwards: vec![Forward {
                addr: "127.0.0.1".into(),
                host: 8080,
                guest: 80,
            }],
            cpus: 1,
            memory_mib: 512,
            disk: DiskMode::Lazy,
            hostname: "web".into(),
            created_at: Timestamp::from_unix(1_700_000_000),
            dir: "/d/instances/ins-0123456789abcdef".into(),
            serial_log: "/d/s.log".into(),
            qmp_socket: "/d/qmp.sock".into(),
            console_socket: "/d/console.sock".into(),
            error: None,
            store_bytes_read: Some(4096),
            remote_bytes_fetched: None,
            disk_error: Some("read at offset 0 failed".into()),
            ssh_user: Some("debian".into()),
            firmware: Firmware::Uefi,
            ephemeral: true,
        };
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"id":"ins-0123456789abcdef","name":"web","image":"img-0123456789abcdef","image_name":"base","owner":"alice","state":"paused","run_state":"paused","accel":"kvm","pid":42,"ssh_port":null,"forwards":[{"addr":"127.0.0.1","host":8080,"guest":80}],"cpus":1,"memory_mib":512,"disk":"lazy","hostname":"web","created_at":"2023-11-14T22:13:20Z","dir":"/d/instances/ins-0123456789abcdef","serial_log":"/d/s.log","qmp_socket":"/d/qmp.sock","console_socket":"/d/console.sock","error":null,"store_bytes_read":4096,"remote_bytes_fetched":null,"disk_error":"read at offset 0 failed","ssh_user":"debian","firmware":"uefi","ephemeral":true}"#
        );
    }
}
